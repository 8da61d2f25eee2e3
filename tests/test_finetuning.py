"""The retrieval entry point on the tiny synthetic set: fine-tuning from a pre-training checkpoint with selection on
val and a final test, --only_test on given weights (never auto-resumed over), zero-shot and re-ranking, embedding
export, layer-wise lr decay over both branches, broken test videos, broken training videos (--exclude_list, the
broken_videos.txt list), and a 2-process torchrun with --dist_eval.

The release's full-size fine-tuned key list loading strictly is tested in test_modeling.py
(test_release_checkpoint_loads_strictly_into_base_model); here the release's DeepSpeed file layout ("module")
goes through the real --only_test path with the tiny model."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import annotations
import checkpoint
import datasets
import engine_for_pretraining
import retrieval_eval as engine
import model_registry
import engine_for_retrieval
import run_simvtp_finetuning as run
import utils
import video_io
from conftest import free_port, mostly_broken_list, run_as_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num_frames", "4", "--input_size", "32", "--short_side_size", "32", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--test_num_segment", "2",
        "--test_num_crop", "1", "--print_freq", "50", "--seed", "1"]


def _ann(root, name):
    return os.path.join(root, "annotations", name)


def _args(root, out, *extra):
    argv = ["--data_root", str(root), "--output_dir", str(out), *TINY, *extra]
    return run.get_args_parser().parse_args(argv)


def _zero_shot(model, dataset, tokenizer, video_mask_ratio: float) -> dict:
    """Retrieval metrics of a model's unimodal passes on a test-mode dataset, with a fixed tube mask per video."""
    cfg = engine.EvalConfig(device=torch.device("cpu"), chunk=4, video_mask_ratio=video_mask_ratio)
    loader = engine.build_eval_loader(dataset, tokenizer, 4, 0, cfg.max_text_len)
    return engine.evaluate(model, loader, tokenizer, cfg)["metrics"]


def _per_query(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def pretrain_ckpt(module_tmp):
    """A tiny pre-training checkpoint as run_simvtp_pretraining writes it (weights + args with the model name)."""
    torch.manual_seed(0)
    model = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4,
                         vocab_size=len(datasets.build_tokenizer()))
    path = str(module_tmp.mktemp("pretrain") / "checkpoint-0.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "epoch": 0, "args": {"model": "simvtp_tiny_patch16"}},
                           path)
    return path


@pytest.fixture(scope="module")
def finetuned(synthetic_root, pretrain_ckpt, module_tmp):
    out = module_tmp.mktemp("finetune")
    args = _args(synthetic_root, out, "--model", "simvtp_dual_tiny_patch16", "--finetune", pretrain_ckpt,
                 "--data_path", _ann(synthetic_root, "train.json"), "--val_data_path", _ann(synthetic_root, "val.json"),
                 "--test_data_path", _ann(synthetic_root, "test.json"), "--epochs", "2", "--max_steps", "2",
                 "--warmup_epochs", "1", "--lr", "1e-3")
    return out, run.main(args)


@pytest.mark.slow
def test_finetune_selects_on_val_then_tests_the_best(finetuned, synthetic_root):
    out, result = finetuned
    test_captions = sum(len(r.captions) for r in annotations.read_annotations(_ann(synthetic_root, "test.json")))
    val_captions = sum(len(r.captions) for r in annotations.read_annotations(_ann(synthetic_root, "val.json")))
    for key in ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_R@50", "t2v_MdR", "t2v_MnR", "v2t_R@1", "v2t_MnR", "r1_sum"):
        assert key in result, key
    assert result["t2v_queries"] == test_captions and result["v2t_queries"] == 8
    saved = json.load(open(out / "test_metrics.json"))
    assert saved["t2v_R@1"] == result["t2v_R@1"] and "ties" in saved["note"] and saved["views"] == "2x1"
    lines = _per_query(out / "test_per_query.jsonl")
    assert len(lines) == test_captions + 8
    t2v, v2t = [q for q in lines if q["direction"] == "t2v"], [q for q in lines if q["direction"] == "v2t"]
    assert all(len(q["top"]) == 8 and 1 <= q["gt_rank"] <= 8 for q in t2v)  # 8 candidate videos
    assert all(len(q["top"]) == 10 and 1 <= q["gt_rank"] <= test_captions for q in v2t)  # top 10 of the captions
    best = checkpoint.read_checkpoint_file(str(out / "checkpoint-best.pth"))
    assert best["metric_name"] == "val_r1_sum" and best["val_metrics"]["t2v_queries"] == val_captions
    log = [json.loads(x) for x in open(out / "log.txt")]
    assert "val_r1_sum" in log[0] and "train_loss" in log[0]
    assert json.load(open(out / "args.json"))["model"] == "simvtp_dual_tiny_patch16"


@pytest.mark.slow
def test_only_test_evaluates_the_given_weights_and_never_resumes(finetuned, synthetic_root, tmp_path, capsys):
    src, _ = finetuned
    given = tmp_path / "release_layout.pth"  # the release's DeepSpeed layout: weights under "module"
    torch.save({"module": checkpoint.read_checkpoint_file(str(src / "checkpoint-best.pth"))["model"]}, given)
    out = tmp_path / "out"
    torch.manual_seed(5)  # a newer training checkpoint with other weights sits in the output folder
    other = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4)
    checkpoint.save_training_state(str(out), model=other, optimizer=torch.optim.AdamW(other.parameters()),
                                   scaler=None, epoch=9, step_in_epoch=None, global_step=90, args={})
    result = run.main(_args(synthetic_root, out, "--only_test", "--model", "simvtp_dual_tiny_patch16",
                            "--finetune", str(given), "--data_path", _ann(synthetic_root, "test.json")))
    assert "not resuming" in capsys.readouterr().out
    assert (out / "test_metrics.json").is_file()
    expected = _per_query(src / "test_per_query.jsonl")
    got = _per_query(out / "test_per_query.jsonl")
    assert [q["top"] for q in got] == [q["top"] for q in expected]
    assert result["t2v_R@1"] == json.load(open(src / "test_metrics.json"))["t2v_R@1"]
    assert not (out / "checkpoint-best.pth").exists() and checkpoint.find_latest(str(out)).endswith("checkpoint-9.pth")


def test_only_test_needs_weights_and_val_must_not_be_test(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="--finetune CKPT or --resume"):
        run.main(_args(synthetic_root, tmp_path, "--only_test", "--model", "simvtp_dual_tiny_patch16",
                       "--data_path", _ann(synthetic_root, "test.json")))
    with pytest.raises(ValueError, match="share 8 videos"):
        run.main(_args(synthetic_root, tmp_path, "--model", "simvtp_dual_tiny_patch16",
                       "--data_path", _ann(synthetic_root, "train.json"),
                       "--val_data_path", _ann(synthetic_root, "test.json"),
                       "--test_data_path", _ann(synthetic_root, "test_1k.csv")))
    with pytest.raises(ValueError, match="only 1 is supported"):
        run.main(_args(synthetic_root, tmp_path, "--num_sample", "2",
                       "--data_path", _ann(synthetic_root, "train.json")))


def test_val_fraction_holds_out_whole_videos_with_a_seed(synthetic_root):
    records = annotations.read_annotations(_ann(synthetic_root, "train.json"), synthetic_root)
    train, val = engine_for_retrieval.split_val(records, 0.25, seed=3)
    assert len(val) == 6 and len(train) == 18 and not {r.path for r in train} & {r.path for r in val}
    assert [r.path for r in engine_for_retrieval.split_val(records, 0.25, seed=3)[1]] == [r.path for r in val]


def test_release_model_name_and_deepspeed_flag_are_accepted(tmp_path, capsys):
    args = run.get_args_parser().parse_args(["--model", "vit_base_patch16_224", "--enable_deepspeed", "--device",
                                             "cpu", "--num_workers", "0", "--output_dir", str(tmp_path)])
    run.setup(args)
    assert args.model == "simvtp_dual_base_patch16"
    assert "native AMP + DDP" in capsys.readouterr().out


@pytest.mark.slow
def test_zero_shot_with_both_mask_ratios_and_reranking(synthetic_root, pretrain_ckpt, tmp_path):
    result = run.main(_args(synthetic_root, tmp_path, "--zero_shot", "--model", "simvtp_tiny_patch16",
                            "--finetune", pretrain_ckpt, "--test_data_path", _ann(synthetic_root, "test.json"),
                            "--zero_shot_video_mask_ratio", "0.5", "--rerank_k", "3"))
    saved = json.load(open(tmp_path / "zero_shot_metrics.json"))
    assert saved["video_mask_ratio"] == 0.5 and saved["rerank"]["rerank_k"] == 3
    # re-ordering inside each query's top 3 cannot move a ground truth across rank 3: R@5 and beyond are unchanged
    for d in ("t2v", "v2t"):
        for k in (5, 10, 50):
            assert result["rerank"][f"{d}_R@{k}"] == result[f"{d}_R@{k}"]
            assert result["rerank_contrastive"][f"{d}_R@{k}"] == result[f"{d}_R@{k}"]  # BLIP's sum, same top 3
    assert saved["rerank_contrastive"]["score"].endswith("+ similarity / temperature")
    assert (tmp_path / "zero_shot_per_query.jsonl").is_file()
    # the evaluation itself: mask 0 sees every tube, a mask changes the video features
    model = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4)
    checkpoint.load_pretrained(model, pretrain_ckpt, strict=True)
    records = annotations.read_annotations(_ann(synthetic_root, "test.json"), synthetic_root)
    dataset = datasets.VideoTextDataset(records, mode="test", num_frames=4, input_size=32, short_side_size=32)
    tokenizer = datasets.build_tokenizer()
    full = _zero_shot(model, dataset, tokenizer, 0.0)
    masked = _zero_shot(model, dataset, tokenizer, 0.9)
    captions = sum(len(r.captions) for r in records)
    assert full["t2v_queries"] == masked["t2v_queries"] == captions and model.training  # mode restored
    assert _zero_shot(model, dataset, tokenizer, 0.9) == masked  # fixed masks
    clips = torch.stack([dataset[i]["video"] for i in range(2)])  # [2, V, C, T, H, W]
    feats = {r: engine.encode_videos(model, clips, [0, 1], engine.EvalConfig(torch.device("cpu"), video_mask_ratio=r))
             for r in (0.0, 0.9)}
    assert not torch.allclose(feats[0.0], feats[0.9])


@pytest.mark.slow
def test_rerank_with_a_pretraining_checkpoint_on_a_finetuned_model(finetuned, synthetic_root, pretrain_ckpt,
                                                                   tmp_path, capsys):
    src, _ = finetuned
    result = run.main(_args(synthetic_root, tmp_path, "--only_test", "--model", "simvtp_dual_tiny_patch16",
                            "--finetune", str(src / "checkpoint-best.pth"),
                            "--test_data_path", _ann(synthetic_root, "test.json"),
                            "--rerank_k", "4", "--rerank_ckpt", pretrain_ckpt))
    table = capsys.readouterr().out
    assert "contrastive t2v" in table and "re-ranked k=4 t2v" in table and "re-ranked k=4 v2t" in table
    assert result["rerank"]["t2v_R@5"] == result["t2v_R@5"]
    assert json.load(open(tmp_path / "test_metrics.json"))["rerank"]["rerank_k"] == 4


def test_rerank_metrics_by_hand():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]])  # text 0 -> video 1, text 1 -> video 2
    probs = {(0, 0): 0.2, (0, 1): 0.9, (1, 0): 0.6, (1, 1): 0.6,  # t2v top-2 of each text
             (0, 2): 0.1, (1, 2): 0.3}  # v2t top-2 of video 2 (video 0 and 1 reuse the pairs above)
    m = engine.rerank_metrics(sim, torch.tensor([1, 2]), probs, k=2)
    # t2v: text 0 -> video 1 moves to rank 1; text 1 -> video 2 stays at rank 3 (outside the top 2)
    assert m["t2v_R@1"] == 50.0 and m["t2v_MnR"] == 2.0
    # v2t: video 1's candidates t0 (0.9) > t1 (0.6): rank 1; video 2: t1 (0.3) > t0 (0.1): rank 1
    assert m["v2t_R@1"] == 100.0
    assert set(engine.candidate_pairs(sim, 2)) == set(probs)


@pytest.mark.slow
def test_export_npy_and_safetensors(finetuned, synthetic_root, tmp_path):
    src, _ = finetuned
    texts = tmp_path / "queries.txt"
    texts.write_text("a red circle moves left\nA small blue square falls\n\n")  # blank lines at the end: ignored
    out = tmp_path / "emb.npy"
    run.main(_args(synthetic_root, tmp_path, "--export_embeddings", str(out), "--model", "simvtp_dual_tiny_patch16",
                   "--finetune", str(src / "checkpoint-best.pth"), "--data_path", _ann(synthetic_root, "test.json"),
                   "--text_file", str(texts)))
    emb = np.load(out)
    side = json.load(open(tmp_path / "emb.json"))
    assert emb.shape == (8 + 2, 192) and side["kinds"] == ["video"] * 8 + ["text"] * 2
    assert side["ids"][8:] == ["a red circle moves left", "A small blue square falls"]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5) and side["normalized"] is True
    from safetensors import safe_open
    out = tmp_path / "emb.safetensors"
    umask = os.umask(0o022)
    try:
        run.main(_args(synthetic_root, tmp_path, "--export_embeddings", str(out), "--model",
                       "simvtp_dual_tiny_patch16", "--finetune", str(src / "checkpoint-best.pth"), "--video_dir",
                       os.path.join(synthetic_root, "test")))
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644  # readable by others, as the umask says (safetensors alone: 0600)
    with safe_open(str(out), "pt") as f:
        ids = json.loads(f.metadata()["video_ids"])
        video = f.get_tensor("video")
        assert "text" not in f.keys()
    assert ids == sorted(os.listdir(os.path.join(synthetic_root, "test"))) and video.shape == (8, 192)
    # the same clips, the same views: the folder export equals the annotation-file export
    torch.testing.assert_close(video, torch.from_numpy(emb[:8]), rtol=1e-5, atol=1e-5)


def test_layer_decay_reaches_every_block_of_both_branches():
    model = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4)
    args = run.get_args_parser().parse_args(["--layer_decay", "0.5"])
    args.abs_lr = 1.0
    optimizer = engine_for_pretraining.build_optimizer(model, args, layer_decay=args.layer_decay)
    utils.apply_schedules(optimizer, 1.0, 0.05)
    lr_of = {}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[params[id(p)]] = group["lr"]
    assert set(lr_of) == set(names)
    for branch in ("video_encoder", "text_encoder"):
        per_block = [lr_of[f"{branch}.blocks.{i}.mlp.fc1.weight"] for i in range(4)]
        assert per_block == [0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5 ** 1]
        assert lr_of[f"{branch}.fc_norm.weight"] == 1.0
    assert lr_of["video_encoder.patch_embed.proj.weight"] == 0.5 ** 5
    assert lr_of["text_encoder.text_embeddings.word_embeddings.weight"] == 0.5 ** 5
    assert model_registry.layer_id_from_name("blocks.3.attn.qkv.weight", 4) == 4  # prefix-free names work too


def test_layer_ids_of_bert_style_names_are_their_layers_not_the_top():
    """BERT's `encoder.layer.N` names (SViTT's text encoder) must decay by depth, not fall to the top layer."""
    ids = {n: model_registry.layer_id_from_name(n, 12) for n in (
        "text_encoder.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.11.output.dense.weight",
        "text_encoder.embeddings.word_embeddings.weight", "vision_encoder.encoder.layers.5.mlp.fc1.weight",
        "itm_head.weight")}
    assert list(ids.values()) == [1, 12, 0, 6, 13]


def _test_list_with(synthetic_root, folder, *paths):
    records = json.load(open(_ann(synthetic_root, "test.json")))
    records += [{"video": str(p), "caption": [f"a broken clip {i}"]} for i, p in enumerate(paths)]
    anno = folder / "test_with_broken.json"
    anno.write_text(json.dumps(records))
    return anno


@pytest.mark.slow
def test_broken_test_video_is_still_an_error_when_evaluation_reaches_it(finetuned, synthetic_root, broken_videos,
                                                                      tmp_path):
    """Without the start-up check (--skip_eval_check) the test set is still never silently changed."""
    src, _ = finetuned
    anno = _test_list_with(synthetic_root, tmp_path, broken_videos["truncated"])
    with pytest.raises(video_io.VideoDecodeError, match="truncated.mp4"):
        run.main(_args(synthetic_root, tmp_path / "out", "--only_test", "--model", "simvtp_dual_tiny_patch16",
                       "--finetune", str(src / "checkpoint-best.pth"), "--test_data_path", str(anno),
                       "--skip_eval_check"))
    assert not (tmp_path / "out" / "test_metrics.json").exists()


def _run(capsys, *argv):
    """The entry point's `__main__` block in this process (what a user sees: exit status, stdout, stderr)."""
    return run_as_main(capsys, "run_simvtp_finetuning.py", *argv)


@pytest.mark.slow
def test_two_broken_test_videos_are_both_named_at_start_up_without_a_traceback(finetuned, synthetic_root,
                                                                               broken_videos, tmp_path, capsys):
    """Before: evaluation decoded test videos until the first broken one and died there with a traceback."""
    src, _ = finetuned
    anno = _test_list_with(synthetic_root, tmp_path, broken_videos["truncated"], broken_videos["not_a_video"])
    out = tmp_path / "out"
    proc = _run(capsys, "--only_test", "--finetune", str(src / "checkpoint-best.pth"), "--test_data_path", str(anno),
                "--data_root", str(synthetic_root), "--output_dir", str(out), *TINY)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Embed" not in proc.stdout
    assert f"test list {anno}: 2 of 10 videos cannot be used" in proc.stderr
    assert f"truncated    {broken_videos['truncated']}" in proc.stderr
    assert f"undecodable  {broken_videos['not_a_video']}" in proc.stderr
    assert not (out / "test_metrics.json").exists()


@pytest.mark.slow
def test_two_processes_both_stop_on_a_broken_test_list(finetuned, synthetic_root, broken_videos, tmp_path):
    """Each rank checks half of the list and gets every result, so each stops on its own with status 1 (started
    as torchrun starts them, without torchrun, which would kill the other rank once one fails)."""
    src, _ = finetuned
    anno = _test_list_with(synthetic_root, tmp_path, broken_videos["truncated"], broken_videos["not_a_video"])
    argv = [sys.executable, os.path.join(ROOT, "run_simvtp_finetuning.py"), "--only_test", "--dist_eval",
            "--finetune", str(src / "checkpoint-best.pth"), "--test_data_path", str(anno),
            "--data_root", str(synthetic_root), "--output_dir", str(tmp_path / "out"), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen(argv, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], results
    rank0_err, rank1_err = results[0][1], results[1][1]
    assert "2 of 10 videos cannot be used" in rank0_err and "Traceback" not in rank0_err + rank1_err
    assert str(broken_videos["truncated"]) in rank0_err and str(broken_videos["not_a_video"]) in rank0_err


def test_fine_tuning_checks_validation_and_test_lists_before_training(synthetic_root, pretrain_ckpt,
                                                                     broken_videos, tmp_path):
    val = json.load(open(_ann(synthetic_root, "val.json")))
    val.append({"video": str(broken_videos["empty"]), "caption": "an empty file"})
    val_path = tmp_path / "val.json"
    val_path.write_text(json.dumps(val))
    test_path = _test_list_with(synthetic_root, tmp_path, broken_videos["missing"])
    out = tmp_path / "out"
    with pytest.raises(annotations.EvalListError) as info:
        run.main(_args(synthetic_root, out, "--model", "simvtp_dual_tiny_patch16", "--finetune", pretrain_ckpt,
                       "--data_path", _ann(synthetic_root, "train.json"), "--val_data_path", str(val_path),
                       "--test_data_path", str(test_path), "--epochs", "1"))
    message = str(info.value)
    assert f"--val_data_path {val_path}: 1 of 9" in message and f"--test_data_path {test_path}: 1 of 9" in message
    assert str(broken_videos["empty"]) in message and str(broken_videos["missing"]) in message
    assert not checkpoint.list_checkpoints(str(out))


@pytest.mark.slow
def test_export_from_a_folder_with_an_unreadable_file_finishes_names_it_and_exits_3(finetuned, synthetic_root,
                                                                                    broken_videos, tmp_path, capsys):
    """Before: the whole export aborted, with a hint about an annotation file that this mode does not have."""
    src, _ = finetuned
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("test_00000.mp4", "test_00001.mp4", "test_00002.mp4"):
        shutil.copyfile(os.path.join(synthetic_root, "test", name), folder / name)
    shutil.copyfile(broken_videos["not_a_video"], folder / "broken.mp4")
    out = tmp_path / "emb.npy"
    proc = _run(capsys, "--export_embeddings", str(out), "--finetune", str(src / "checkpoint-best.pth"),
                "--video_dir", str(folder), "--output_dir", str(tmp_path), *TINY)
    assert proc.returncode == run.EXIT_SKIPPED == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Skipping 1 of 4 videos" in proc.stdout and f"undecodable  {folder / 'broken.mp4'}" in proc.stdout
    assert "1 unreadable video(s) skipped (exit status 3)" in proc.stdout
    side = json.load(open(tmp_path / "emb.json"))
    assert side["ids"] == ["test_00000.mp4", "test_00001.mp4", "test_00002.mp4"] and np.load(out).shape == (3, 192)
    assert [(s["video_id"], s["status"]) for s in side["skipped_videos"]] == [("broken.mp4", "undecodable")]
    assert side["skipped_videos"][0]["path"] == str(folder / "broken.mp4")


@pytest.mark.slow
def test_text_file_with_blank_lines_is_refused_naming_them(finetuned, synthetic_root, tmp_path):
    """Before: blank lines were dropped, so row i of the export was no longer line i of the file."""
    src, _ = finetuned
    texts = tmp_path / "queries.txt"
    texts.write_text("a red circle\n\nA blue square\n   \na grey disc\n\n")
    with pytest.raises(ValueError, match=r"queries.txt: blank line\(s\) 2, 4; every line is one text"):
        run.main(_args(synthetic_root, tmp_path, "--export_embeddings", str(tmp_path / "emb.npy"),
                       "--finetune", str(src / "checkpoint-best.pth"), "--text_file", str(texts)))
    assert not (tmp_path / "emb.npy").exists()


@pytest.mark.slow
def test_finetuning_replaces_broken_training_videos_and_never_opens_excluded_ones(synthetic_root, pretrain_ckpt,
                                                                                    broken_videos, tmp_path):
    anno, broken = mostly_broken_list(synthetic_root, broken_videos, tmp_path, good=10, missing=12)
    missing = sorted(p for p in broken if "gone_" in p)
    exclude = tmp_path / "dead.txt"  # relative to --data_root, as in the annotation file
    exclude.write_text("".join(os.path.relpath(p, synthetic_root) + "\n" for p in missing))
    out = tmp_path / "out"
    run.main(_args(synthetic_root, out, "--model", "simvtp_dual_tiny_patch16", "--finetune", pretrain_ckpt,
                   "--data_path", anno, "--exclude_list", str(exclude), "--epochs", "1", "--warmup_epochs", "0"))
    listed = [line.split("\t")[0] for line in (out / "broken_videos.txt").read_text().splitlines()]
    assert listed and len(listed) == len(set(listed)) and set(listed) <= broken - set(missing)
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["broken_video_files"] == len(listed) and record["train_videos_read_total"] < 24


@pytest.mark.slow
def test_torchrun_two_processes_finetune_with_dist_eval(synthetic_root, pretrain_ckpt, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "run_simvtp_finetuning.py"), "--model", "simvtp_dual_tiny_patch16",
           "--finetune", pretrain_ckpt, "--data_path", _ann(synthetic_root, "train.json"), "--val_fraction", "0.2",
           "--test_data_path", _ann(synthetic_root, "test.json"), "--data_root", str(synthetic_root),
           "--output_dir", str(out), *TINY, "--batch_size", "2", "--epochs", "1", "--max_steps", "2",
           "--warmup_epochs", "0", "--dist_eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("test retrieval on 8 videos") == 1  # rank 0 prints
    ddp = _per_query(out / "test_per_query.jsonl")
    # each rank embedded half of the test videos; gathered, they score exactly as one process does
    single = tmp_path / "single"
    run.main(_args(synthetic_root, single, "--only_test", "--model", "simvtp_dual_tiny_patch16",
                   "--finetune", str(out / "checkpoint-best.pth"),
                   "--test_data_path", _ann(synthetic_root, "test.json")))
    for a, b in zip(ddp, _per_query(single / "test_per_query.jsonl")):
        assert a["gt_rank"] == b["gt_rank"] and [c["score"] for c in a["top"]] == pytest.approx(
            [c["score"] for c in b["top"]], abs=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_fine_tune_svitt_for_retrieval_past_step_3(synthetic_root, tmp_path):
    """The recipe names the pre-training model, which is fine-tuned as its retrieval model (no MLM head): before,
    the head got no gradient and DDP stopped at step 2 ("Expected to have finished reduction")."""
    model = model_registry.create("svitt_tiny_patch16", img_size=32, num_frames=4, vocab_size=30522)
    ckpt = str(tmp_path / "svitt.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg, "epoch": 0}, ckpt)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "run_simvtp_finetuning.py"), "--model", "svitt_tiny_patch16", "--attn_block_size", "4",
           "--sparse_random_attn", "1", "--token_keep_rate", "0.5", "--token_drop_loc", "1", "--finetune", ckpt,
           "--data_path", _ann(synthetic_root, "train.json"), "--data_root", str(synthetic_root),
           "--output_dir", str(out), *TINY, "--batch_size", "2", "--epochs", "1", "--max_steps", "4",
           "--warmup_epochs", "0", "--save_ckpt_freq", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fine-tuned for retrieval as svitt_retrieval_tiny_patch16" in proc.stdout
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["global_step"] == 4


@pytest.mark.slow
def test_zero_shot_rebuilds_the_model_a_checkpoint_names_without_model_flag(synthetic_root, tmp_path):
    """Before model_cfg, the default --model (the dual encoder) was built for a pre-training file: a TypeError."""
    model = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4, decoder_depth=1,
                                  vocab_size=len(datasets.build_tokenizer()))
    path = str(tmp_path / "pretrain.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg}, path)
    result = run.main(_args(synthetic_root, tmp_path, "--zero_shot", "--finetune", path,
                            "--test_data_path", _ann(synthetic_root, "test.json")))
    assert result["v2t_queries"] == 8


def test_evaluation_short_side_defaults_to_the_input_size(tmp_path):
    args = run.get_args_parser().parse_args(["--input_size", "112", "--device", "cpu", "--output_dir", str(tmp_path)])
    run.setup(args)
    assert args.short_side_size == 112
