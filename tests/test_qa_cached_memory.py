"""--cache_memory: QA training on each question's frozen question-pass states, computed once. The cached states give
the loss the full pass gives (both families, real clips of the synthetic set), and the entry point trains the answer
decoder on them while the question pass stays at its weights, or refuses when part of that pass would learn."""
import json
import os

import pytest
import torch

import answer_ranking
import checkpoint
import datasets
import engine_for_qa
import model_registry
import qa_annotations
import run_simvtp_qa as run
from video_transforms import normalize_video

TINY = ["--num_frames", "2", "--input_size", "32", "--short_side_size", "32", "--batch_size", "8",
        "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--print_freq", "50", "--seed", "1",
        "--lr", "1e-2", "--warmup_epochs", "0"]
QUESTION_PASS = {"svitt_qa_tiny_patch16": ["vision_encoder", "vision_layernorm", "text_encoder"],
                 "simvtp_qa_tiny_patch16": ["encoder", "text_embeddings"]}


def _ann(root, name):
    return os.path.join(root, "annotations", name)


def _args(root, out, *extra):
    return run.get_args_parser().parse_args(["--data_root", str(root), "--output_dir", str(out), "--answer_list",
                                             _ann(root, "qa_answer_list.json"), *TINY, *extra])


@pytest.fixture(scope="module")
def tokenizer():
    return datasets.build_tokenizer()


@pytest.mark.parametrize("name", sorted(QUESTION_PASS))
def test_cached_states_padded_in_other_batches_give_the_full_passs_loss(name, synthetic_root, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = model_registry.create(name, img_size=32, num_frames=2, vocab_size=len(tokenizer)).eval()
    assert list(model.question_pass) == QUESTION_PASS[name]
    args = _args(synthetic_root, tmp_path)
    records = engine_for_qa.read_questions(_ann(synthetic_root, "qa_train.json"), args)
    dataset = engine_for_qa.train_dataset(records, args)
    collate = engine_for_qa.collator(args, tokenizer)
    items = [dataset[i] for i in range(6)]
    with torch.no_grad():
        full = collate(items)
        full["video"] = normalize_video(full["video"])
        expected = answer_ranking.qa_training_loss(model, full)
        rows = []
        for part in (items[:1], items[1:4], items[4:]):  # each part padded to its own longest question
            batch = collate(part)
            memory, mask = model.answer_memory(normalize_video(batch["video"]), batch["question_input_ids"],
                                               batch["question_mask"])
            rows += engine_for_qa.cached_items(memory, mask, part)
        cached = engine_for_qa.CachedMemoryCollator(collate)(rows)
        assert "video" not in cached and cached["memory"].shape[0] == 6
        got = answer_ranking.qa_training_loss(model, cached)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_entry_point_trains_the_decoder_on_cached_states_and_keeps_the_question_pass(synthetic_root, tmp_path,
                                                                                      capsys):
    files = ["--data_path", _ann(synthetic_root, "qa_train.json"), "--model", "simvtp_qa_tiny_patch16",
             "--epochs", "2"]
    with pytest.raises(ValueError, match="needs the whole question pass frozen, but text_embeddings would learn: "
                                         "add --freeze encoder text_embeddings"):
        run.main(_args(synthetic_root, tmp_path / "refused", *files, "--cache_memory", "--freeze", "encoder"))
    out = tmp_path / "cached"
    run.main(_args(synthetic_root, out, *files, "--cache_memory", "--freeze", "encoder", "text_embeddings",
                   "--save_ckpt_freq", "1", "--keep_last", "2"))
    questions = len(qa_annotations.read_qa_annotations(_ann(synthetic_root, "qa_train.json"), str(synthetic_root)))
    assert f"Cached the question pass of {questions} training questions" in capsys.readouterr().out
    first = checkpoint.read_checkpoint_file(str(out / "checkpoint-0.pth"))["model"]
    last = checkpoint.read_checkpoint_file(str(out / "checkpoint-1.pth"))["model"]
    frozen = [k for k in last if k.split(".")[0] in QUESTION_PASS["simvtp_qa_tiny_patch16"]]
    assert frozen and all(torch.equal(first[k], last[k]) for k in frozen)
    learnt = [k for k in last if k.startswith(("answer_decoder.", "text_cls."))]
    assert any(not torch.equal(first[k], last[k]) for k in learnt)


def test_a_broken_video_met_while_caching_is_listed_in_the_runs_broken_videos_txt(synthetic_root, broken_videos,
                                                                                  tmp_path, capsys):
    """The cache pass runs before the training loop's bookkeeping exists; the file it skips still reaches
    broken_videos.txt, named once, as a file the loop skipped would be."""
    questions = json.load(open(_ann(synthetic_root, "qa_train.json")))[:15]
    questions.append({**questions[0], "video": str(broken_videos["truncated"]), "question_id": "broken/colour"})
    anno = tmp_path / "qa_train.json"
    anno.write_text(json.dumps(questions))
    out = tmp_path / "out"
    run.main(_args(synthetic_root, out, "--data_path", str(anno), "--model", "simvtp_qa_tiny_patch16", "--epochs",
                   "1", "--cache_memory", "--freeze", "encoder", "text_embeddings"))
    assert "(1 broken videos skipped)" in capsys.readouterr().out
    listed = [line.split("\t")[0] for line in (out / "broken_videos.txt").read_text().splitlines()]
    assert listed == [str(broken_videos["truncated"])]
