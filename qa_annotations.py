"""Video-QA annotation files -> records: the Singularity QA JSON list of MSRVTT-QA / ActivityNet-QA / AGQA (one
record per question, answers weighted by their share of the annotators) and the closed answer list a benchmark
ranks; bad records are reported (or dropped) as annotations.py does for captions.

    read_qa_annotations(file) -> [QARecord(path, question, answers, weights, question_id, answer_type)]
    read_answer_list(file) -> [answer]; unlisted_answers(records, answer_list) -> the questions it cannot answer
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import numpy as np

from annotations import (MAX_LISTED, AnnotationError, _bad_records_message, _BadRecord, _under_root, _video_path,
                         clean_caption)

_QA_FORMAT_HELP = ('the Singularity QA JSON list [{"video": path, "question": str, "answer": str or [str, ...], '
                   '"question_id": str or int, "answer_type": str (optional)}]')


@dataclass
class QARecord:
    """One question about one video: its distinct answers with their shares of the annotators (summing to 1),
    its id (str or int, as the file gives it) and answer type (None when the file gives none)."""
    path: str
    question: str
    answers: list[str]
    weights: list[float]
    question_id: str | int
    answer_type: str | None = None


def answer_weights(answers: str | Sequence[str]) -> tuple[list[str], list[float]]:
    """Distinct answers in first-seen order and each one's share of the annotators: ["a", "a", "b"] ->
    (["a", "b"], [2/3, 1/3]); a single string has weight 1."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("no answers")
    counts = collections.Counter(answers)
    distinct = list(dict.fromkeys(answers))
    return distinct, [counts[a] / len(answers) for a in distinct]


def read_qa_annotations(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                        skip_bad_records: bool = False, clean_text: bool = False) -> list[QARecord]:
    """The questions of an MSRVTT-QA / ActivityNet-QA / AGQA file in the Singularity QA layout (_QA_FORMAT_HELP),
    in file order. As read_annotations: relative videos joined to data_root; every bad record (missing field,
    empty question or answer, repeated question_id) reported in one AnnotationError naming file and record, or
    dropped and counted with skip_bad_records. clean_text: clean_caption on the questions, as the SViTT /
    Singularity QA recipes do (answers are kept as written: they must match the answer list)."""
    path = os.fspath(path)
    root = os.fspath(data_root) if data_root else None
    items = _read_json_list(path, _QA_FORMAT_HELP)
    records: list[QARecord] = []
    bad: list[str] = []
    seen: dict[str | int, int] = {}
    for n, item in enumerate(items, 1):
        try:
            record = _qa_record(f"record {n}", item, root, clean_text)
            if record.question_id in seen:
                raise _BadRecord(f"record {n}: question_id {record.question_id!r} repeats record "
                                 f"{seen[record.question_id]}")
        except _BadRecord as e:
            bad.append(str(e))
            continue
        seen[record.question_id] = n
        records.append(record)
    if bad and not skip_bad_records:
        raise AnnotationError(_bad_records_message(path, bad, len(items)))
    if bad:
        print(f"{path}: dropped {len(bad)} bad question(s) of {len(items)} (--skip_bad_records), e.g. {bad[0]}",
              flush=True)
    if not records:
        raise AnnotationError(f"{path}: no questions" + (f" left after dropping {len(bad)} bad ones" if bad else ""))
    return records


def _read_json_list(path: str, expected: str) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: bad JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e}); expected {expected}") from None
    if not isinstance(obj, list):
        raise AnnotationError(f"{path}: top-level JSON must be a list, got {type(obj).__name__}; expected {expected}")
    return obj


def _qa_text(where: str, value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadRecord(f"{where}: '{name}' must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _qa_record(where: str, item: Any, root: str | None, clean_text: bool = False) -> QARecord:
    if not isinstance(item, dict):
        raise _BadRecord(f"{where}: expected an object {{\"video\", \"question\", \"answer\", \"question_id\"}}, "
                         f"got {type(item).__name__}")
    for key in ("video", "question", "answer", "question_id"):
        if key not in item:
            raise _BadRecord(f"{where}: missing field '{key}' (has {sorted(item)})")
    rel = _video_path(where, item["video"])
    question = _qa_text(where, item["question"], "question")
    if clean_text:
        question = clean_caption(question)
        if not question:
            raise _BadRecord(f"{where}: question {item['question']!r:.60} is empty after text cleaning")
    raw = item["answer"] if isinstance(item["answer"], list) else [item["answer"]]
    if not raw:
        raise _BadRecord(f"{where}: empty answer list")
    answers, weights = answer_weights([_qa_text(f"{where} answer {k}", a, "answer") for k, a in enumerate(raw, 1)])
    qid = item["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or (isinstance(qid, str) and not qid.strip()):
        raise _BadRecord(f"{where}: 'question_id' must be a non-empty string or an integer, got {qid!r:.60}")
    answer_type = item.get("answer_type")
    if answer_type is not None:
        answer_type = _qa_text(where, answer_type, "answer_type")
    return QARecord(_under_root(root, rel), question, answers, weights, qid, answer_type)


def read_answer_list(path: str | os.PathLike) -> list[str]:
    """The closed answer list of a QA benchmark: a JSON list of distinct non-empty strings (answers are ranked
    against it at evaluation)."""
    path = os.fspath(path)
    answers = _read_json_list(path, "a JSON list of answer strings")
    for n, a in enumerate(answers, 1):
        if not isinstance(a, str) or not a.strip():
            raise AnnotationError(f"{path}: answer {n} must be a non-empty string, got {a!r:.60}")
    stripped = [a.strip() for a in answers]
    repeated = [a for a, c in collections.Counter(stripped).items() if c > 1]
    if repeated:
        raise AnnotationError(f"{path}: answer {repeated[0]!r} is listed {stripped.count(repeated[0])} times")
    if not stripped:
        raise AnnotationError(f"{path}: empty answer list")
    return stripped


@dataclass
class UnlistedAnswers:
    """Questions whose answer is not in the answer list: no ranking of the list can answer them right, so
    evaluation counts them (as wrong) and reports them; they are never dropped."""
    count: int
    total: int
    question_ids: list[str | int]  # the first MAX_LISTED
    answers: list[str]  # their (top-weighted) answers, same order

    def message(self, name: str = "questions") -> str:
        if not self.count:
            return f"{name}: every answer of the {self.total} questions is in the answer list"
        examples = ", ".join(f"{q!r} ({a!r})" for q, a in zip(self.question_ids, self.answers))
        return (f"{name}: {self.count} of {self.total} questions ({100 * self.count / self.total:.1f}%) have an "
                f"answer outside the answer list (counted as wrong), e.g. {examples}")


def unlisted_answers(records: Sequence[QARecord], answer_list: Collection[str]) -> UnlistedAnswers:
    """Which questions' top-weighted answer (the one exact-match accuracy scores against) is not in the list."""
    listed = set(answer_list)
    missing = [r for r in records if top_answer(r) not in listed]
    return UnlistedAnswers(len(missing), len(records), [r.question_id for r in missing[:MAX_LISTED]],
                           [top_answer(r) for r in missing[:MAX_LISTED]])


def top_answer(record: QARecord) -> str:
    """The answer with the largest share (the first one on a tie): the ground truth of exact-match accuracy."""
    return record.answers[int(np.argmax(record.weights))]
