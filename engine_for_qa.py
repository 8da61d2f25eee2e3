"""Video question answering: the QA fine-tuning task (QATask, for engine_for_finetuning's outline) and its
evaluation: every question's answer picked from a closed list by the model's answer decoder (clips of a video
ensembled), exact-match accuracy overall and per answer type with blind baselines, one prediction per question.

Training needs nothing of its own: a QA model's forward(batch) returns the answer loss, so the shared epoch loop
(engine_for_pretraining.train), resume and checkpoints drive it unchanged. With --cache_memory the training set is
the questions with their frozen question pass's states (cache_question_memory), computed once.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

import annotations
import answer_ranking
import checkpoint
import datasets
import distributed
import engine_for_finetuning
import model_registry
import qa_annotations
import retrieval_eval
import utils
import video_transforms

QA_ENSEMBLES = answer_ranking.ENSEMBLES
DEFAULT_QA_MODEL = "svitt_qa_base_patch16_224"  # the release's QA model


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
        per_clip = [rank_clip(model, video_transforms.normalize_video(clips[:, j].to(device, non_blocking=True)), q_ids,
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


def prediction_rows(predictions: list[dict], records: Sequence[qa_annotations.QARecord]) -> list[dict]:
    """Predictions joined with their questions: the rows of predictions.jsonl, each with `correct` (exact match
    of the predicted string with the top-weighted answer)."""
    rows = []
    for p in predictions:
        r = records[p["index"]]
        truth = qa_annotations.top_answer(r)
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

# ----------------------------------------------------------------------------------------------- data


def read_questions(path: str, args: argparse.Namespace) -> list[qa_annotations.QARecord]:
    records = qa_annotations.read_qa_annotations(path, args.data_root, args.skip_bad_records, args.clean_text)
    if args.answer_types:
        records = of_answer_types(records, args.answer_types, path)
    print(f"Data: {len(records)} questions about {len({r.path for r in records})} videos from {path}"
          + (f" (answer types {', '.join(args.answer_types)})" if args.answer_types else ""))
    return records


def of_answer_types(records: list[qa_annotations.QARecord], types: Sequence[str],
                    path: str) -> list[qa_annotations.QARecord]:
    """The questions whose answer_type is one of `types` (--answer_types): e.g. a first stage on the motion
    questions alone, which a small model from scratch learns only without the others (docs/qa.md)."""
    kept = [r for r in records if r.answer_type in types]
    if not kept:
        present = sorted({str(r.answer_type) for r in records})
        raise ValueError(f"{path}: no question has answer_type {' or '.join(types)} (--answer_types); the file's "
                         f"types: {', '.join(present)}")
    return kept


def split_val_by_video(records: list[qa_annotations.QARecord], fraction: float,
                       seed: int) -> tuple[list[qa_annotations.QARecord], list[qa_annotations.QARecord]]:
    """A seeded held-out fraction of the training videos with all their questions (a question about a video
    seen in training would leak it into selection); both sides in file order."""
    videos = sorted({r.path for r in records})
    held = {videos[i] for i in np.flatnonzero(engine_for_finetuning.held_out(len(videos), fraction, seed))}
    return [r for r in records if r.path not in held], [r for r in records if r.path in held]


def check_disjoint(val: list | None, test: list | None) -> None:
    """Selection never sees a test video."""
    engine_for_finetuning.check_disjoint(val, test, QATask.disjoint_noun, QATask.disjoint_hint)


def check_eval_videos(args: argparse.Namespace, lists: dict[str, list | None]) -> None:
    """Every evaluation video opens (one check per video, not per question), all problems in one error."""
    videos = {label: [annotations.VideoRecord(p, [], os.path.basename(p)) for p in dict.fromkeys(r.path for r in recs)]
              for label, recs in lists.items() if recs}
    annotations.check_eval_lists(videos, args.video_backend, skip=args.skip_eval_check)


def video_options(args: argparse.Namespace) -> dict:
    return dict(num_frames=args.num_frames, sampling_rate=args.sampling_rate, input_size=args.input_size,
                short_side_size=args.short_side_size, video_backend=args.video_backend, seed=args.seed,
                decode_threads=args.decode_threads)


def collator(args: argparse.Namespace, tokenizer) -> datasets.VideoQACollator:
    return datasets.VideoQACollator(tokenizer, max_q_len=args.max_q_len, max_a_len=args.max_a_len)


def train_dataset(records: list[qa_annotations.QARecord], args: argparse.Namespace) -> datasets.VideoQADataset:
    return datasets.VideoQADataset(records, mode="train", sample_type=args.sample_type,
                                   excluded=annotations.exclusions_for(records, args.exclude_list, args.data_root),
                                   **video_options(args))


def build_eval_loader(records: list[qa_annotations.QARecord], args: argparse.Namespace, tokenizer, segments: int,
                      crops: int, frames: int):
    """Batches of --batch_size videos, each decoded once with all its questions (answered --batch_size at a
    time)."""
    dataset = datasets.VideoQATestSet(records, test_num_segment=segments, test_num_crop=crops,
                                      sample_type=args.sample_type_test, **{**video_options(args),
                                                                            "num_frames": frames})
    return retrieval_eval.build_eval_loader(
        dataset, tokenizer, args.batch_size, args.num_workers, dist_eval=args.dist_eval,
        host_memory_gb=args.eval_host_memory_gb, device=args.device_obj,
        collate_fn=datasets.VideoQATestCollator(tokenizer, max_q_len=args.max_q_len, max_a_len=args.max_a_len))

# ----------------------------------------------------------------------------------------------- model


def qa_model_name(args: argparse.Namespace, ckpt: dict) -> str:
    """--model, else the QA model of the checkpoint's model (itself when it is one), else the release's."""
    if args.model:
        return model_registry.canonical_name(args.model)
    name = engine_for_finetuning.checkpoint_model_name(ckpt)
    if not name:
        return DEFAULT_QA_MODEL
    spec = model_registry.model_spec(name)
    return spec.qa_model or spec.name


def check_qa_model(model: torch.nn.Module) -> torch.nn.Module:
    """A QA model answers (rank_answers) from each video's tokens encoded once (video_tokens)."""
    return model_registry.require(model, "qa", f"--model {model.model_cfg['name']} is not a QA model (it has no "
                                  "answer decoder): use a *_qa_* model, e.g. svitt_qa_tiny_patch16 or "
                                  "simvtp_qa_tiny_patch16")


def build_for_training(args: argparse.Namespace, vocab_size: int) -> torch.nn.Module:
    ckpt = checkpoint.read_checkpoint_file(args.finetune) if args.finetune else {}
    return engine_for_finetuning.model_for_training(args, qa_model_name(args, ckpt), vocab_size, ckpt,
                                                    check=check_qa_model)


# ----------------------------------------------------------------------------------------------- cached states


def prefix_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """bool [B, width]: True at the first lengths[b] positions of row b (cached states are a prefix of real ones)."""
    return torch.arange(width)[None] < lengths.reshape(-1, 1)


class CachedMemoryCollator:
    """Batches questions that carry their question pass's states (`memory` [M_i, D]) instead of a video: the
    training collator's text fields plus memory [B, M, D] padded to the longest and memory_mask [B, M]."""

    def __init__(self, collate: datasets.VideoQACollator) -> None:
        self.collate = collate

    def __call__(self, items: Sequence[dict]) -> dict:
        batch = self.collate(items)
        memory = [it["memory"] for it in items]
        lengths = torch.tensor([len(m) for m in memory])
        batch["memory"] = torch.nn.utils.rnn.pad_sequence(memory, batch_first=True)
        batch["memory_mask"] = prefix_mask(lengths, int(lengths.max())).long()
        return batch


class CachedMemorySet(torch.utils.data.Dataset):
    """The training questions, each with its states (see cache_question_memory); fixed over epochs."""

    def __init__(self, items: list[dict], source: datasets.VideoQADataset) -> None:
        self.items = items
        self.excluded, self.broken = source.excluded, source.broken  # the run's broken-video bookkeeping

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[int(index)]

    def set_epoch(self, epoch: int) -> None:
        """The states do not change with the epoch."""


def check_question_pass_frozen(model: torch.nn.Module) -> None:
    """--cache_memory reuses the states for every epoch: nothing they depend on may learn."""
    inner = model_registry.unwrap(model)
    modules = inner.question_pass
    learning = sorted({name.split(".")[0] for name, p in inner.named_parameters()
                       if p.requires_grad and name.split(".")[0] in modules})
    if learning:
        raise ValueError(f"--cache_memory needs the whole question pass frozen, but {', '.join(learning)} would "
                         f"learn: add --freeze {' '.join(modules)}")


def cached_items(memory: torch.Tensor, memory_mask: torch.Tensor, items: Sequence[dict]) -> list[dict]:
    """One cached question per loader item: its text fields and its states up to its last real one (the masks are
    a prefix of ones: video tokens then the question's, or the question's alone)."""
    lengths = memory_mask.sum(1, keepdim=True)
    if not torch.equal(memory_mask, prefix_mask(lengths, memory_mask.shape[1]).to(memory_mask)):
        raise ValueError("--cache_memory: the question pass's memory_mask is not a prefix of real states")
    keep = ("index", "question", "answers", "weights", "question_id", "answer_type")
    return [{**{k: it[k] for k in keep}, "memory": memory[row, :n].clone()}
            for row, (it, n) in enumerate(zip(items, lengths.flatten().tolist()))]


def with_items(collate: Callable, items: Sequence[dict]) -> tuple[dict, Sequence[dict]]:
    """The collated batch and its items (the cache keeps each item's text fields)."""
    return collate(items), items


def cache_question_memory(model: torch.nn.Module, dataset: datasets.VideoQADataset, collate: datasets.VideoQACollator,
                          args: argparse.Namespace, dtype: torch.dtype) -> CachedMemorySet:
    """Every training question's question-pass states, computed once in eval mode (no drop path) from one
    training clip of its video and stored in the run's precision (bf16 under bf16 autocast). A broken video is
    skipped as in training: its item falls through to another question, whose states it then holds; the file goes
    into the dataset's `broken`, where the run's BrokenVideos names it (broken_videos.txt)."""
    if args.world_size > 1:
        raise ValueError("--cache_memory runs in one process (each would need every question's states); "
                         "drop it for a distributed run")
    check_question_pass_frozen(model)
    inner = model_registry.unwrap(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers, collate_fn=functools.partial(with_items, collate))
    dataset.set_epoch(0)
    logger = utils.MetricLogger(print_freq=args.print_freq)
    was_training, cached, nbytes, known_before = inner.training, [], 0, len(dataset.broken)
    inner.eval()
    with torch.no_grad(), utils.autocast(args.device_obj, dtype):
        for batch, items in logger.log_every(loader, total=len(loader), header="Caching the question pass",
                                             items_per_step=args.batch_size, unit="questions"):
            video = video_transforms.normalize_video(batch["video"].to(args.device_obj))
            memory, memory_mask = inner.answer_memory(video, batch["question_input_ids"].to(args.device_obj),
                                                      batch["question_mask"].to(args.device_obj))
            if not cached:
                estimate = memory.shape[1] * memory.shape[2] * dtype.itemsize * len(dataset) / 1e9
                if estimate > args.cache_memory_gb:
                    raise ValueError(f"--cache_memory: {len(dataset)} questions x {memory.shape[1]} states x "
                                     f"{memory.shape[2]} would take about {estimate:.1f} GB of host memory, above "
                                     f"--cache_memory_gb {args.cache_memory_gb:g}")
            for path, error in (p for it in items for p in it.get("broken_videos", ())):
                dataset.broken.setdefault(path, error)
            rows = cached_items(memory.to("cpu", dtype), memory_mask.cpu(), items)
            cached += rows
            nbytes += sum(row["memory"].nbytes for row in rows)
    inner.train(was_training)
    print(f"Cached the question pass of {len(cached)} training questions: {nbytes / 1e6:.0f} MB ({dtype}); every "
          f"epoch trains on them ({len(dataset.broken) - known_before} broken videos skipped)", flush=True)
    return CachedMemorySet(cached, dataset)

# ----------------------------------------------------------------------------------------------- evaluation


def eval_config(args: argparse.Namespace, dtype: torch.dtype, num_clips: int = 1,
                frame_order: str = "none") -> QAEvalConfig:
    """The QA evaluation's settings: the shared clip set-up plus the closed-list search (--k_test)."""
    return QAEvalConfig(clips=engine_for_finetuning.clip_eval_config(args, dtype, num_clips, frame_order),
                               k_test=args.k_test)


class AnswerList:
    """The closed list, read once and tokenised as the batches' answers."""

    def __init__(self, path: str | None, args: argparse.Namespace, tokenizer) -> None:
        if not path:
            raise ValueError("--answer_list is required: the JSON list of answers questions are answered from")
        self.path = path
        self.answers = qa_annotations.read_answer_list(path)
        self.ids, self.mask = collator(args, tokenizer).answer_tokens(self.answers)
        print(f"Answer list: {len(self.answers)} answers from {path}")

    def report_unlisted(self, records: list[qa_annotations.QARecord], name: str) -> qa_annotations.UnlistedAnswers:
        unlisted = qa_annotations.unlisted_answers(records, self.answers)
        print(unlisted.message(name))
        return unlisted


def answer(model: torch.nn.Module, records: list[qa_annotations.QARecord], loader, answers: AnswerList,
           cfg: QAEvalConfig, header: str) -> tuple[dict, list[dict]]:
    """(metrics, prediction rows) of the model on a question list."""
    predictions = answer_questions(model, loader, answers.answers, answers.ids, answers.mask, cfg, header)
    rows = prediction_rows(merge_ranks(predictions), records)
    return qa_accuracy(rows), rows


def run_test(model: torch.nn.Module, records: list[qa_annotations.QARecord], answers: AnswerList,
             args: argparse.Namespace, tokenizer, dtype: torch.dtype, train_records: list | None = None,
             prefix: str = "test") -> dict:
    """The test once per --eval_frame_order (the first order's results are the main ones): accuracy per answer
    type, the majority baselines, unlisted answers; <prefix>_metrics.json, <prefix>_predictions.jsonl and
    tensorboard scalars."""
    frames, clips = engine_for_finetuning.eval_frames(args, clips_are_views=False)
    unlisted = answers.report_unlisted(records, f"{prefix} questions")
    loader = build_eval_loader(records, args, tokenizer, args.test_num_segment, args.test_num_crop, frames)
    truths = [qa_annotations.top_answer(r) for r in records]
    runs = {}
    for order in dict.fromkeys(args.eval_frame_order):
        label = "" if order == "none" else f", frames {order}"
        runs[order] = answer(model, records, loader, answers, eval_config(args, dtype, clips, order),
                             f"{prefix} QA{label}")
    metrics, rows = next(iter(runs.values()))
    out = {**metrics, "unlisted": unlisted.count, "ceiling": 100.0 * (1 - unlisted.count / len(records)),
           "views": f"{args.test_num_segment}x{args.test_num_crop}", "num_frames_test": frames, "clips": clips,
           "frame_ensemble": args.eval_frame_ensemble, "k_test": args.k_test, "frame_order": next(iter(runs))}
    common, acc = majority_accuracy(truths, truths)
    out["majority_test"] = {"answer": common, "accuracy": acc}
    if train_records:
        common, acc = majority_accuracy([qa_annotations.top_answer(r) for r in train_records], truths)
        out["majority_train"] = {"answer": common, "accuracy": acc}
        out["question_prior_train"] = question_prior_accuracy(
            [(r.question, qa_annotations.top_answer(r)) for r in train_records],
            [(r.question, t) for r, t in zip(records, truths)])
        if any(r.answer_type is not None for r in records):
            out["answer_kinds"] = answer_kind_report(
                rows, [(r.question, qa_annotations.top_answer(r), r.answer_type) for r in train_records])
    if len(runs) > 1:
        out["frame_orders"] = {o: {"accuracy": m["accuracy"], **({"per_type": {t: v["accuracy"] for t, v in
                                                                               m["per_type"].items()}}
                                                                 if "per_type" in m else {})}
                               for o, (m, _) in runs.items()}
        print(format_frame_orders(out["frame_orders"]), flush=True)
    print(format_qa_table(out, f"{prefix} QA on {len(records)} questions"), flush=True)
    if "answer_kinds" in out:
        print(format_answer_kinds(out["answer_kinds"]), flush=True)
    write_predictions(args.output_dir, prefix, out, rows)
    write_tensorboard(args, prefix, out)
    return out


def format_frame_orders(rows: dict[str, dict]) -> str:
    """frame order -> accuracy, and per answer type when given."""
    types = sorted({t for r in rows.values() for t in r.get("per_type", {})})
    columns = [("accuracy", "accuracy", 9, ".1f")] + [(t[:11], t, 12, ".1f") for t in types]
    flat = {order: {"accuracy": r["accuracy"], **r.get("per_type", {})} for order, r in rows.items()}
    return engine_for_finetuning.format_frame_orders("Temporal sensitivity (QA accuracy)", flat, columns)


def write_tensorboard(args: argparse.Namespace, prefix: str, out: dict) -> None:
    groups = {prefix: {"accuracy": out["accuracy"], **{f"accuracy_{t}": v["accuracy"]
                                                       for t, v in out.get("per_type", {}).items()}}}
    groups.update({f"{prefix}_order_{order}": {"accuracy": row["accuracy"]}
                   for order, row in out.get("frame_orders", {}).items()})
    engine_for_finetuning.write_test_scalars(args.log_dir, groups)


# ----------------------------------------------------------------------------------------------- modes


def only_test(args: argparse.Namespace, dtype: torch.dtype, tokenizer) -> dict:
    """The given weights, once, on the test questions; auto-resume never replaces them."""
    weights = engine_for_finetuning.weights_under_test(args)
    path = args.test_data_path or args.data_path
    if not path:
        raise ValueError("--only_test needs the test questions: --test_data_path FILE")
    answers = AnswerList(args.answer_list, args, tokenizer)
    records = read_questions(path, args)
    check_eval_videos(args, {f"test questions {path}": records})
    model = check_qa_model(engine_for_finetuning.build_from_file(weights, args.model, args))
    return run_test(model, records, answers, args, tokenizer, dtype)


class QATask(engine_for_finetuning.FinetuneTask):
    """QA fine-tuning: questions about videos answered from a closed list, selection on validation accuracy, the
    best weights tested with the majority and question-prior baselines of the training answers."""
    items = "questions"
    train_description = "the training questions"
    select_on, select_label = "accuracy", "val accuracy"
    disjoint_noun = "questions"
    disjoint_hint = " (--val_fraction holds out training videos)"
    skip_test_label = "the test"
    best_shown_as_path = False

    def prepare(self) -> None:
        self.answers = AnswerList(self.args.answer_list, self.args, self.tokenizer)

    def read(self, path: str, train: bool = False) -> list[qa_annotations.QARecord]:
        return read_questions(path, self.args)

    def split_val(self, records: list[qa_annotations.QARecord]) -> tuple:
        train, val = split_val_by_video(records, self.args.val_fraction, self.args.seed)
        print(f"Validation: {len(val)} questions about videos held out of the training list (seed {self.args.seed})")
        return train, val

    def val_label(self) -> str:
        return "validation questions"

    def check_eval_lists(self, lists: dict) -> None:
        check_eval_videos(self.args, lists)

    def train_dataset(self, records: list[qa_annotations.QARecord]) -> datasets.VideoQADataset:
        return train_dataset(records, self.args)

    def collator(self) -> datasets.VideoQACollator:
        return collator(self.args, self.tokenizer)

    def model_for_training(self) -> torch.nn.Module:
        return build_for_training(self.args, len(self.tokenizer))

    def training_data(self, model: torch.nn.Module, dataset: datasets.VideoQADataset,
                      collate: datasets.VideoQACollator) -> tuple[torch.utils.data.Dataset, Callable]:
        if not self.args.cache_memory:
            return dataset, collate
        return cache_question_memory(model, dataset, collate, self.args, self.dtype), CachedMemoryCollator(collate)

    def validator(self, model: torch.nn.Module, records: list[qa_annotations.QARecord]) -> Callable[[int], dict]:
        args, answers = self.args, self.answers  # one view, one clip: per-epoch selection stays cheap
        answers.report_unlisted(records, "validation questions")
        val_loader = build_eval_loader(records, args, self.tokenizer, 1, 1, args.num_frames)

        def validate_epoch(epoch: int) -> dict:
            metrics, _ = answer(model, records, val_loader, answers, eval_config(args, self.dtype),
                                f"val QA epoch {epoch}")
            print(format_qa_table(metrics, f"Validation, epoch {epoch}"), flush=True)
            per_type = {f"accuracy_{t}": m["accuracy"] for t, m in metrics.pop("per_type", {}).items()}
            return {**metrics, **per_type}  # scalars only: log.txt and tensorboard
        return validate_epoch

    def test(self, model: torch.nn.Module, records: list[qa_annotations.QARecord], train_records: list) -> dict:
        return run_test(model, records, self.answers, self.args, self.tokenizer, self.dtype,
                        train_records=train_records)
