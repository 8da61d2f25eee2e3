"""Video QA data: the synthetic QA files, the QA readers (MSRVTT-QA / ActivityNet-QA / AGQA layout, answer list),
answer weights, unlisted answers, and VideoQADataset + VideoQACollator on real synthetic clips."""
from __future__ import annotations

import json
import os

import pytest

import annotations
import datasets
import qa_annotations
import synthetic_dataset as sd
from conftest import TINY_SYNTHETIC

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}


def _write(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_synthetic_qa_files_match_the_clips(synthetic_root):
    ann = synthetic_root / "annotations"
    meta = {m["split"] + "/" + m["video_id"] + ".mp4": m for m in json.loads((ann / "metadata.json").read_text())}
    answer_list = qa_annotations.read_answer_list(ann / "qa_answer_list.json")
    assert set(answer_list) == set(sd.COLOURS) | set(sd.SHAPES) | set(sd.MOTIONS)
    assert {f"annotations/{n}" for n in sd.QA_ANNOTATION_FILES} <= set(sd.read_manifest(synthetic_root)["annotations"])
    for split in sd.SPLITS:
        records = qa_annotations.read_qa_annotations(ann / f"qa_{split}.json", synthetic_root)
        assert len(records) == 4 * TINY_SYNTHETIC[f"num_{split}"]
        assert qa_annotations.unlisted_answers(records, answer_list).count == 0
        for r in records:
            m = meta[os.path.relpath(r.path, synthetic_root)]
            want = {"colour": m["colour"], "background": m["background"], "shape": m["shape"],
                    "direction": m["motion"], "size_change": m["motion"]}[r.answer_type]
            assert r.answers == [want] and r.weights == [1.0] and os.path.getsize(r.path) > 0
            assert r.question == sd.QA_QUESTIONS[r.answer_type]  # one text per type: it gives no answer away
        kinds = [r.answer_type for r in records]
        assert kinds.count("direction") + kinds.count("size_change") == TINY_SYNTHETIC[f"num_{split}"]


def test_motion_questions_need_more_than_one_frame():
    """One question text for both directions, answered by the motion alone; the middle frame (what frozen-frame
    evaluation repeats) is placed alike for opposite motions, so it cannot tell them apart."""
    specs = [sd.sample_spec(0, "train", i, 128, 128) for i in range(400)]
    asked = {}
    for s in specs:
        (q,) = [q for q in sd.qa_records(s) if q["answer_type"] in ("direction", "size_change")]
        assert q["answer"] == s.motion
        asked.setdefault(q["question"], set()).add(q["answer"])
    assert asked == {sd.QA_QUESTIONS["direction"]: {"left", "right", "up", "down"},
                     sd.QA_QUESTIONS["size_change"]: {"grow", "shrink"}}

    def middle(s):  # centre x, centre y, radius half-way through the clip
        return [(a + b) / 2 for a, b in zip((*s.start, s.radius[0]), (*s.end, s.radius[1]))]

    for motion, coord in (("left", 0), ("up", 1), ("grow", 2)):
        mine = [middle(s)[coord] for s in specs if s.motion == motion]
        other = [middle(s)[coord] for s in specs if s.motion == OPPOSITE[motion]]
        overlap = min(max(mine), max(other)) - max(min(mine), min(other))
        union = max(max(mine), max(other)) - min(min(mine), min(other))
        assert overlap > 0.6 * union, (motion, overlap, union)


def test_synthetic_qa_is_deterministic_and_leaves_the_other_files_alone(synthetic_root, tmp_path):
    small = dict(num_train=2, num_val=1, num_test=1, num_frames=4, fps=8, width=32, height=32)
    a = sd.ensure_synthetic_dataset(tmp_path / "a", workers=1, verbose=False, **small)
    b = sd.ensure_synthetic_dataset(tmp_path / "b", workers=1, verbose=False, **small)
    for name in sd.QA_ANNOTATION_FILES:
        assert (a / "annotations" / name).read_bytes() == (b / "annotations" / name).read_bytes()
    # the video-text files carry no QA: their records read as before
    for name in ("train.json", "val.json", "test.json"):
        assert all(set(r) == {"video", "caption"} for r in json.loads((a / "annotations" / name).read_text()))


def test_answer_weights():
    assert qa_annotations.answer_weights(["a", "a", "b"]) == (["a", "b"], [pytest.approx(2 / 3), pytest.approx(1 / 3)])
    assert qa_annotations.answer_weights("yes") == (["yes"], [1.0])
    answers, weights = qa_annotations.answer_weights(["x", "y", "z", "y"])
    assert answers == ["x", "y", "z"] and weights == [0.25, 0.5, 0.25]
    with pytest.raises(ValueError):
        qa_annotations.answer_weights([])


def test_qa_reader_layouts(tmp_path):
    msrvtt = _write(tmp_path / "msrvtt_qa.json", [
        {"video": "video7010.mp4", "question": "what is a man doing?", "answer": "sing", "question_id": 0,
         "answer_type": "what"},
        {"video": "/abs/video7011.mp4", "question": " who talks? ", "answer": "man", "question_id": 1}])
    anet = _write(tmp_path / "anet_qa.json", [
        {"video": "v_1.mp4", "question": "is it indoors", "answer": ["yes", "yes", "no"], "question_id": "v_1_0"}])
    recs = qa_annotations.read_qa_annotations(msrvtt, "/data/msrvtt")
    assert [(r.path, r.question, r.answers, r.weights, r.question_id, r.answer_type) for r in recs] == [
        ("/data/msrvtt/video7010.mp4", "what is a man doing?", ["sing"], [1.0], 0, "what"),
        ("/abs/video7011.mp4", "who talks?", ["man"], [1.0], 1, None)]
    (r,) = qa_annotations.read_qa_annotations(anet)
    assert r.path == "v_1.mp4" and r.answers == ["yes", "no"] and r.weights == [pytest.approx(2 / 3),
                                                                                 pytest.approx(1 / 3)]
    assert qa_annotations.top_answer(r) == "yes"
    cleaned = qa_annotations.read_qa_annotations(msrvtt, clean_text=True)
    assert [r.question for r in cleaned] == ["what is a man doing", "who talks"]


GOOD = {"video": "a.mp4", "question": "what?", "answer": "x", "question_id": 1}


@pytest.mark.parametrize("bad, problem", [
    ({k: v for k, v in GOOD.items() if k != "answer"}, "missing field 'answer'"),
    ({**GOOD, "question": "  "}, "'question' must be a non-empty string"),
    ({**GOOD, "answer": []}, "empty answer list"),
    ({**GOOD, "answer": ["x", 3]}, "record 2 answer 2: 'answer' must be a non-empty string"),
    ({**GOOD, "question_id": True}, "'question_id' must be a non-empty string or an integer"),
    ({**GOOD, "question_id": 0}, "question_id 0 repeats record 1"),
    ({**GOOD, "video": ""}, "'video' must be a non-empty string"),
    ("a string", "expected an object"),
])
def test_malformed_qa_records_are_named(tmp_path, bad, problem):
    path = _write(tmp_path / "qa.json", [{**GOOD, "question_id": 0}, bad, {**GOOD, "question_id": 2}])
    with pytest.raises(annotations.AnnotationError) as e:
        qa_annotations.read_qa_annotations(path)
    assert str(e.value).startswith(f"{path}: record 2") and problem in str(e.value) and "\n" not in str(e.value)
    kept = qa_annotations.read_qa_annotations(path, skip_bad_records=True)
    assert [r.question_id for r in kept] == [0, 2]


@pytest.mark.parametrize("text, problem", [
    ('[{"video": ', "bad JSON at line 1"),
    ('{"video": "a.mp4"}', "top-level JSON must be a list, got dict"),
    ("[]", "no questions"),
])
def test_malformed_qa_files(tmp_path, text, problem):
    path = _write(tmp_path / "qa.json", text)
    with pytest.raises(annotations.AnnotationError, match=problem) as e:
        qa_annotations.read_qa_annotations(path)
    assert str(e.value).startswith(path)


@pytest.mark.parametrize("answers, problem", [
    (["yes", "no", "yes"], "answer 'yes' is listed 2 times"),
    (["yes", ""], "answer 2 must be a non-empty string"),
    ({"yes": 1}, "top-level JSON must be a list"),
    ([], "empty answer list"),
])
def test_malformed_answer_lists(tmp_path, answers, problem):
    path = _write(tmp_path / "answers.json", answers)
    with pytest.raises(annotations.AnnotationError, match=problem) as e:
        qa_annotations.read_answer_list(path)
    assert str(e.value).startswith(path)


def test_unlisted_answers_are_counted_not_dropped(tmp_path):
    path = _write(tmp_path / "qa.json", [{**GOOD, "question_id": i, "answer": a}
                                         for i, a in enumerate(["x", "y", ["z", "z", "x"], ["x", "x", "z"]])])
    records = qa_annotations.read_qa_annotations(path)
    report = qa_annotations.unlisted_answers(records, ["x", "y"])
    assert (report.count, report.total, report.question_ids, report.answers) == (1, 4, [2], ["z"])
    assert "1 of 4 questions (25.0%)" in report.message("msrvtt val") and "2 ('z')" in report.message()
    assert qa_annotations.unlisted_answers(records, ["x", "y", "z"]).count == 0


def _clip_options(**extra):
    return dict(num_frames=4, sampling_rate=2, input_size=32, sample_type="rand", video_backend="auto", **extra)


def test_collator_batches_questions_and_weighted_answers(synthetic_root, tmp_path):
    tok = datasets.build_tokenizer()
    records = qa_annotations.read_qa_annotations(synthetic_root / "annotations" / "qa_train.json", synthetic_root)[:3]
    answers, weights = qa_annotations.answer_weights(["red", "very very very dark red", "red"])
    records.append(qa_annotations.QARecord(records[0].path, "what " * 40 + "?", answers, weights, "long", None))
    data = datasets.VideoQADataset(records, mode="train", **_clip_options())
    batch = datasets.VideoQACollator(tok, max_q_len=25, max_a_len=5)([data[i] for i in range(4)])
    B, R = 4, 5
    assert batch["video"].shape == (B, 3, 4, 32, 32) and batch["video"].dtype == datasets.torch.uint8
    assert batch["question_input_ids"].shape == batch["question_mask"].shape == (B, 25)  # the long one is cut
    assert batch["question_input_ids"][3, -1] == tok.sep_token_id
    assert batch["answer_ids"].shape == batch["answer_mask"].shape == batch["answer_labels"].shape
    assert batch["answer_ids"].shape[0] == R and batch["answer_ids"].shape[1] == 5
    assert batch["answer_to_question"].tolist() == [0, 1, 2, 3, 3]
    assert batch["answer_weights"].tolist() == pytest.approx([1, 1, 1, 2 / 3, 1 / 3])
    # per question the weights sum to 1, so sum(weight * nll) / B weighs every question alike
    sums = datasets.torch.zeros(B).index_add_(0, batch["answer_to_question"], batch["answer_weights"])
    assert sums.tolist() == pytest.approx([1.0] * B)
    ids, mask, labels = batch["answer_ids"], batch["answer_mask"], batch["answer_labels"]
    assert (ids[:, 0] == tok.cls_token_id).all() and (labels[:, 0] == -100).all()
    assert ((labels == -100) == ((mask == 0) | (datasets.torch.arange(5) == 0))).all()
    for row, answer in enumerate([r.answers[0] for r in records[:3]] + ["red"]):
        assert tok.decode(ids[row][mask[row] == 1], skip_special_tokens=True) == answer
    long_row = ids[4][mask[4] == 1]
    assert len(long_row) == 5 and long_row[-1] == tok.sep_token_id  # cut to max_a_len, [SEP] kept
    assert batch["question_id"] == [r.question_id for r in records]
    assert batch["answers"][3] == ["red", "very very very dark red"]
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["videos_read"].item() == 4


def test_test_mode_views_and_broken_training_video_keeps_its_own_question(synthetic_root):
    tok = datasets.build_tokenizer()
    records = qa_annotations.read_qa_annotations(synthetic_root / "annotations" / "qa_val.json", synthetic_root)[:2]
    data = datasets.VideoQADataset(records, mode="test", **_clip_options(short_side_size=32, test_num_segment=2))
    batch = datasets.VideoQACollator(tok)([data[0], data[1]])
    assert batch["video"].shape == (2, 2, 3, 4, 32, 32) and batch["question_id"] == [r.question_id for r in records]
    gone = qa_annotations.QARecord(str(synthetic_root / "val" / "gone.mp4"), "what colour is the shape?", ["red"],
                                   [1.0], "gone", "colour")
    train = datasets.VideoQADataset([gone, *records], mode="train", **_clip_options())
    item = train[0]
    assert item["broken"] == 1 and item["question_id"] in {r.question_id for r in records}
    sub = next(r for r in records if r.question_id == item["question_id"])
    assert (item["question"], item["answers"]) == (sub.question, sub.answers)
    assert item["broken_videos"][0][0] == gone.path
