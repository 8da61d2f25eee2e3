"""Video QA evaluation: every question's answer picked from a closed list by the model's answer decoder (clips of a
video ensembled), exact-match accuracy overall and per answer type, one prediction per question.

Training needs nothing of its own: a QA model's forward(batch) returns the answer loss, so the pre-training
engine's epoch loop, resume and checkpoints drive it unchanged (run_simvtp_qa.py).
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

import answer_ranking
import datasets
import distributed
import retrieval_eval
import utils

QA_ENSEMBLES = answer_ranking.ENSEMBLES


@dataclass
class QAEvalConfig:
    """How questions are answered: clips as retrieval's EvalConfig cuts them (num_clips, sparse_clips,
    frame_order, seed; `ensemble` is lse|mean|max over every clip and view), and the closed-list search."""
    clips: retrieval_eval.EvalConfig
    k_test: int = 128  # answers kept by the first-token distribution, then re-scored by full log-likelihood

    def __post_init__(self) -> None:
        if self.clips.ensemble not in QA_ENSEMBLES:
            raise ValueError(f"QA ensembles clips by one of {', '.join(QA_ENSEMBLES)}, got {self.clips.ensemble!r}")
        if self.k_test < 1:
            raise ValueError(f"--k_test must be >= 1, got {self.k_test}")


@torch.no_grad()
def answer_questions(model: torch.nn.Module, loader: Iterable[dict], answer_list: Sequence[str],
                     answer_ids: torch.Tensor, answer_mask: torch.Tensor, cfg: QAEvalConfig,
                     header: str = "QA") -> list[dict]:
    """Every question of the loader (this rank's share) -> {"index", "prediction", "score"}: the answer of the
    list with the best ensembled log-likelihood over the V views x k clips of its video. A batch holds videos
    [B, V, C, T', H, W] and the questions about them ("question_video" [Q]: each one's video row; without it
    question i is about video i): each clip of a video is encoded once for all its questions."""
    model.eval()
    device = cfg.clips.device
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    meters = utils.MetricLogger(print_freq=cfg.clips.print_freq)
    out = []
    total = len(loader) if hasattr(loader, "__len__") else 0
    for batch in meters.log_every(loader, total=total, header=header, unit="videos",
                                  items_per_step=getattr(loader, "batch_size", None) or 1):
        clips = retrieval_eval.eval_clips(batch["video"], cfg.clips).flatten(1, 2)  # [B, V*k, C, T, H, W]
        q_ids, q_mask = batch["question_input_ids"].to(device), batch["question_mask"].to(device)
        q_video = batch.get("question_video", torch.arange(len(q_ids))).to(device)
        per_clip = [rank_clip(model, datasets.normalize_video(clips[:, j].to(device, non_blocking=True)), q_ids,
                              q_mask, q_video, answer_ids, answer_mask, cfg) for j in range(clips.shape[1])]
        scores = answer_ranking.ensemble_clip_scores(torch.stack(per_clip), cfg.clips.ensemble)
        best = scores.max(dim=1)
        for i, a, s in zip(batch["index"].tolist(), best.indices.tolist(), best.values.tolist()):
            out.append({"index": i, "prediction": answer_list[a], "score": s})
    return out


def rank_clip(model: torch.nn.Module, video: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor,
              q_video: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
              cfg: QAEvalConfig) -> torch.Tensor:
    """Answer scores [Q, A] (fp32) of every question about one normalised clip of its video (video [B, C, T, H, W],
    q_video [Q] its row): the model's video_tokens once per video, the questions ranked cfg.clips.chunk at a time."""
    with utils.autocast(cfg.clips.device, cfg.clips.dtype):
        tokens = model.video_tokens(video)
        scores = []
        for start in range(0, len(q_ids), cfg.clips.chunk):
            rows = slice(start, start + cfg.clips.chunk)
            _, s = model.rank_answers(None, q_ids[rows], q_mask[rows], answer_ids, answer_mask, cfg.k_test,
                                      video_tokens=tokens[q_video[rows]])
            scores.append(s.float())
    return torch.cat(scores)


def merge_ranks(predictions: list[dict]) -> list[dict]:
    """Every rank's predictions, one per question in dataset order (a padded sampler's repeats dropped)."""
    merged = {}
    for part in distributed.gather_objects(predictions):
        for p in part:
            merged.setdefault(p["index"], p)
    return [merged[i] for i in sorted(merged)]


def prediction_rows(predictions: list[dict], records: Sequence[datasets.QARecord]) -> list[dict]:
    """Predictions joined with their questions: the rows of predictions.jsonl, each with `correct` (exact match
    of the predicted string with the top-weighted answer)."""
    rows = []
    for p in predictions:
        r = records[p["index"]]
        truth = datasets.top_answer(r)
        rows.append({"question_id": r.question_id, "video": r.path, "question": r.question,
                     "prediction": p["prediction"], "answer": truth, "answers": list(r.answers),
                     "answer_type": r.answer_type, "correct": p["prediction"] == truth,
                     "score": round(p["score"], 4)})
    return rows


def qa_accuracy(rows: Sequence[dict]) -> dict:
    """Exact-match accuracy (%) overall and per answer type (when the file gives types), with counts."""
    if not rows:
        raise ValueError("no predictions to score")
    metrics = {"accuracy": 100.0 * sum(r["correct"] for r in rows) / len(rows), "questions": len(rows)}
    by_type = collections.defaultdict(list)
    for r in rows:
        if r["answer_type"] is not None:
            by_type[r["answer_type"]].append(r["correct"])
    if by_type:
        metrics["per_type"] = {t: {"accuracy": 100.0 * sum(c) / len(c), "questions": len(c)}
                               for t, c in sorted(by_type.items())}
    return metrics


def majority_accuracy(answers: Sequence[str], truths: Sequence[str]) -> tuple[str, float]:
    """The chance baseline: always answering the most frequent of `answers` -> (that answer, accuracy % on
    `truths`)."""
    if not answers or not truths:
        raise ValueError("the majority baseline needs answers to count and questions to score")
    common = collections.Counter(answers).most_common(1)[0][0]
    return common, 100.0 * sum(t == common for t in truths) / len(truths)


def question_prior_accuracy(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]]) -> float:
    """A blind baseline: each test question answered with the most frequent training answer of the same question
    text (the overall most frequent for a question never seen), never looking at the video. (question, answer)
    pairs -> accuracy % on test."""
    if not train or not test:
        raise ValueError("the question-prior baseline needs training and test questions")
    by_question = collections.defaultdict(collections.Counter)
    for q, a in train:
        by_question[q][a] += 1
    overall = collections.Counter(a for _, a in train).most_common(1)[0][0]
    guess = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    return 100.0 * sum(guess.get(q, overall) == a for q, a in test) / len(test)


def answer_kinds(train: Sequence[tuple[str, str | None]]) -> dict[str, str]:
    """(answer, answer_type) pairs of the training questions -> each answer's kind: the types it answers, joined
    by "/" (a colour word that answers both colour and background questions is "background/colour")."""
    types = collections.defaultdict(set)
    for a, t in train:
        if t is not None:
            types[a].add(str(t))
    return {a: "/".join(sorted(ts)) for a, ts in types.items()}


def answer_kind_report(rows: Sequence[dict], train: Sequence[tuple[str, str, str | None]]) -> dict:
    """Does the model answer the question asked? Per answer type of the test questions: "asked_kind" (% of its
    predictions that answer a training question of that type), "blind_prior" (accuracy of each question's most
    frequent training answer, no video, on that type) and "confusion" (% of its predictions of each answer kind,
    answer_kinds; "other" for an answer no training question had). train: (question, answer, answer_type)."""
    kinds = answer_kinds([(a, t) for _, a, t in train])
    pairs = [(q, a) for q, a, _ in train]
    by_type = collections.defaultdict(list)
    for r in rows:
        if r["answer_type"] is not None:
            by_type[str(r["answer_type"])].append(r)
    report = {}
    for t, rs in sorted(by_type.items()):
        predicted = collections.Counter(kinds.get(r["prediction"], "other") for r in rs)
        report[t] = {"asked_kind": 100.0 * sum(t in k.split("/") for k in (kinds.get(r["prediction"], "other")
                                                                          for r in rs)) / len(rs),
                     "blind_prior": question_prior_accuracy(pairs, [(r["question"], r["answer"]) for r in rs]),
                     "confusion": {k: 100.0 * n / len(rs) for k, n in sorted(predicted.items())}}
    return report


def format_answer_kinds(report: dict) -> str:
    """answer_kind_report as a table: one row per asked type, one column per predicted answer kind."""
    columns = sorted({k for r in report.values() for k in r["confusion"]})
    width = max([10] + [len(c) + 2 for c in columns])
    lines = ["Answer kinds: % of each question type's predictions of each kind (rows: the type asked)",
             f"{'asked':<14}{'right kind':>11}{'blind':>7}" + "".join(f"{c:>{width}}" for c in columns)]
    lines.append("-" * len(lines[1]))
    for t, r in report.items():
        lines.append(f"{t:<14}{r['asked_kind']:>11.1f}{r['blind_prior']:>7.1f}"
                     + "".join(f"{r['confusion'].get(c, 0.0):>{width}.1f}" for c in columns))
    return "\n".join(lines)


def format_qa_table(metrics: dict, title: str) -> str:
    """Accuracy, the per-type breakdown and the baselines as a small table."""
    lines = [title, f"{'':<24}{'accuracy':>9}{'questions':>11}", "-" * 44,
             f"{'all':<24}{metrics['accuracy']:>9.1f}{metrics['questions']:>11}"]
    for t, m in metrics.get("per_type", {}).items():
        lines.append(f"{'  ' + str(t):<24}{m['accuracy']:>9.1f}{m['questions']:>11}")
    for key, label in (("majority_train", "majority (train)"), ("majority_test", "majority (this set)")):
        if key in metrics:
            lines.append(f"{label:<24}{metrics[key]['accuracy']:>9.1f}   always {metrics[key]['answer']!r}")
    if "question_prior_train" in metrics:
        lines.append(f"{'question prior (train)':<24}{metrics['question_prior_train']:>9.1f}   each question's most "
                     "frequent training answer, no video")
    if metrics.get("unlisted"):
        lines.append(f"{metrics['unlisted']} question(s) have an answer outside the list (never right): ceiling "
                     f"{metrics['ceiling']:.1f}")
    return "\n".join(lines)


def write_predictions(output_dir: str, prefix: str, metrics: dict, rows: Sequence[dict]) -> None:
    """<prefix>_metrics.json and <prefix>_predictions.jsonl (one line per question, with its question_id), rank 0."""
    if not distributed.is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{prefix}_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(output_dir, f"{prefix}_predictions.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
