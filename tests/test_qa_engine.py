"""QA evaluation logic on hand-made cases: exact-match accuracy per answer type, the baselines, the validation split
by video, answering over several clips (each clip ranked by the real model, then ensembled). (Two gloo processes
answering their shares of the questions, --dist_eval: test_distributed.py, in its one spawn of gloo ranks.)"""
import pytest
import torch

import answer_ranking
import datasets
import retrieval_eval
import engine_for_qa as engine
import model_registry
import qa_annotations
import run_simvtp_qa as run
import video_transforms
from conftest import randomised


def record(video: str, question: str, answers, qtype=None, qid=None) -> qa_annotations.QARecord:
    names, weights = qa_annotations.answer_weights(answers)
    return qa_annotations.QARecord(path=video, question=question, answers=names, weights=weights,
                                question_id=qid or f"{video}/{question}", answer_type=qtype)


def test_exact_match_accuracy_per_type_against_the_top_weighted_answer():
    records = [record("a.mp4", "what colour?", "red", "colour"),
               record("b.mp4", "what colour?", ["blue", "green", "green"], "colour"),
               record("c.mp4", "which way?", "left", "direction"),
               record("d.mp4", "which way?", "up", "direction")]
    predictions = [{"index": 0, "prediction": "red", "score": -0.1},
                   {"index": 1, "prediction": "blue", "score": -0.2},  # an annotator's answer, not the top one
                   {"index": 2, "prediction": "Left", "score": -0.3},  # exact match is case-sensitive
                   {"index": 3, "prediction": "up", "score": -0.4}]
    rows = engine.prediction_rows(predictions, records)
    assert [r["correct"] for r in rows] == [True, False, False, True]
    assert rows[1]["answer"] == "green" and rows[1]["answers"] == ["blue", "green"]
    metrics = engine.qa_accuracy(rows)
    assert metrics["accuracy"] == 50.0 and metrics["questions"] == 4
    assert metrics["per_type"] == {"colour": {"accuracy": 50.0, "questions": 2},
                                   "direction": {"accuracy": 50.0, "questions": 2}}
    assert "per_type" not in engine.qa_accuracy([{**r, "answer_type": None} for r in rows])


def test_baselines_majority_and_question_prior():
    answer, acc = engine.majority_accuracy(["red", "red", "left"], ["red", "left", "up", "red"])
    assert answer == "red" and acc == 50.0
    train = [("what colour?", "red"), ("what colour?", "red"), ("which way?", "left"), ("which way?", "up"),
             ("which way?", "left")]
    test = [("what colour?", "red"), ("which way?", "left"), ("which way?", "up"), ("how big?", "red")]
    assert engine.question_prior_accuracy(train, test) == 75.0  # the unseen question gets the overall "red"
    with pytest.raises(ValueError, match="needs"):
        engine.majority_accuracy([], ["red"])


def test_answer_kinds_show_whether_the_question_asked_was_answered():
    train = [("what colour is the shape?", "red", "colour"), ("what colour is the background?", "blue", "background"),
             ("what colour is the background?", "red", "background"), ("which way?", "left", "direction"),
             ("what colour is the shape?", "red", "colour")]
    assert engine.answer_kinds([(a, t) for _, a, t in train]) == {
        "red": "background/colour", "blue": "background", "left": "direction"}
    rows = [{"question": "what colour is the shape?", "answer": "red", "prediction": "blue", "answer_type": "colour"},
            {"question": "what colour is the shape?", "answer": "red", "prediction": "red", "answer_type": "colour"},
            {"question": "which way?", "answer": "up", "prediction": "red", "answer_type": "direction"},
            {"question": "which way?", "answer": "left", "prediction": "grow", "answer_type": "direction"}]
    report = engine.answer_kind_report(rows, train)
    # a background-only word to a colour question is the wrong kind; a word no training answer had is "other"
    assert report["colour"] == {"asked_kind": 50.0, "blind_prior": 100.0,
                                "confusion": {"background": 50.0, "background/colour": 50.0}}
    assert report["direction"] == {"asked_kind": 0.0, "blind_prior": 50.0,
                                   "confusion": {"background/colour": 50.0, "other": 50.0}}
    table = engine.format_answer_kinds(report)
    assert table.splitlines()[3].split() == ["colour", "50.0", "100.0", "50.0", "50.0", "0.0"]


def test_validation_split_keeps_all_questions_of_a_video_together():
    records = [record(f"v{i // 4}.mp4", f"q{i % 4}", "x") for i in range(40)]
    train, val = engine.split_val_by_video(records, 0.2, seed=3)
    assert len(val) == 8 and len(train) == 32
    assert not {r.path for r in train} & {r.path for r in val}
    assert engine.split_val_by_video(records, 0.2, seed=3) == (train, val)
    with pytest.raises(ValueError, match="share 2 videos"):
        engine.check_disjoint(val, val[:8])


@pytest.mark.slow
def test_answering_ensembles_the_clips_ranked_by_the_model():
    torch.manual_seed(0)
    model = randomised(model_registry.create("svitt_qa_tiny_patch16", img_size=32, num_frames=2, vocab_size=300),
                       4, scale=0.2).eval()
    g = torch.Generator().manual_seed(1)
    video = torch.randint(0, 256, (2, 1, 3, 4, 32, 32), generator=g, dtype=torch.uint8)  # 2 questions, 1 view
    q_ids = torch.tensor([[101, 150, 160, 102], [101, 170, 102, 0]])
    q_mask = (q_ids != 0).long()
    a_ids = torch.tensor([[101, 200, 102, 0], [101, 201, 202, 102], [101, 203, 102, 0]])
    a_mask = (a_ids != 0).long()
    batch = {"video": video, "question_input_ids": q_ids, "question_mask": q_mask, "index": torch.tensor([5, 6])}
    clips = retrieval_eval.EvalConfig(device=torch.device("cpu"), num_clips=2, ensemble="mean")
    got = engine.answer_questions(model, [batch], ["a", "b", "c"], a_ids, a_mask, engine.QAEvalConfig(clips, 3))
    per_clip = torch.stack([model.rank_answers(video_transforms.normalize_video(video[:, 0, :, 2 * c:2 * c + 2]), q_ids,
                                               q_mask, a_ids, a_mask, 3)[1] for c in range(2)])
    expected = answer_ranking.ensemble_clip_scores(per_clip, "mean")
    assert [p["index"] for p in got] == [5, 6]
    assert [p["prediction"] for p in got] == [["a", "b", "c"][i] for i in expected.argmax(1).tolist()]
    assert [p["score"] for p in got] == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="lse, mean, max"):
        engine.QAEvalConfig(retrieval_eval.EvalConfig(device=torch.device("cpu"), ensemble="concat"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["svitt_qa_tiny_patch16", "simvtp_qa_tiny_patch16"])
def test_each_video_is_decoded_and_encoded_once_for_all_its_questions(synthetic_root, name):
    tok = datasets.build_tokenizer()
    ann = synthetic_root / "annotations"
    records = qa_annotations.read_qa_annotations(ann / "qa_test.json", synthetic_root)[:12]  # 3 videos x 4 questions
    records = records[::2] + records[1::2]  # a video's questions apart in the file
    answers = qa_annotations.read_answer_list(ann / "qa_answer_list.json")
    argv = ["--num_frames", "2", "--input_size", "32", "--batch_size", "2", "--num_workers", "0",
            "--sample_type_test", "middle", "--test_num_segment", "2"]
    args = run.get_args_parser().parse_args(argv)
    args.device_obj, args.short_side_size = torch.device("cuda"), 32
    assert engine.build_eval_loader(records, args, tok, 2, 1, 2).pin_memory  # batches pinned for a GPU
    args.device_obj = torch.device("cpu")
    loader = engine.build_eval_loader(records, args, tok, 2, 1, 2)
    a_ids, a_mask = loader.collate_fn.answer_tokens(answers)
    torch.manual_seed(0)
    model = randomised(model_registry.create(name, img_size=32, num_frames=2, vocab_size=len(tok)), 4,
                       scale=0.2).eval()
    encoded = []  # pixels through the model's patch embedding (SimVTP's Conv3d, SViTT's Conv2d per frame)
    hooks = [m.register_forward_hook(lambda m, i, o: encoded.append(i[0].numel()))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    cfg = engine.QAEvalConfig(retrieval_eval.EvalConfig(device=torch.device("cpu"), chunk=3), k_test=4)
    grouped = engine.answer_questions(model, loader, answers, a_ids, a_mask, cfg)
    for h in hooks:
        h.remove()
    assert len(loader.dataset) == 3 and sum(len(b["video"]) for b in loader) == 3  # 3 decodes
    assert sum(encoded) == 3 * 2 * (3 * 2 * 32 * 32)  # each of the 3 videos' 2 views encoded once
    # the per-question path: each question's video decoded and encoded with it
    one_per_question = datasets.VideoQADataset(records, mode="test", num_frames=2, input_size=32, short_side_size=32,
                                               sample_type="middle", test_num_segment=2)
    per_question = engine.answer_questions(
        model, torch.utils.data.DataLoader(one_per_question, batch_size=4, collate_fn=datasets.VideoQACollator(tok)),
        answers, a_ids, a_mask, cfg)
    grouped, per_question = engine.merge_ranks(grouped), engine.merge_ranks(per_question)
    assert [p["prediction"] for p in grouped] == [p["prediction"] for p in per_question]
    assert [p["score"] for p in grouped] == pytest.approx([p["score"] for p in per_question], abs=1e-4)
    assert engine.qa_accuracy(engine.prediction_rows(grouped, records)) == \
        engine.qa_accuracy(engine.prediction_rows(per_question, records))
