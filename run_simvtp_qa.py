"""Video question answering: fine-tuning a QA model with an answer decoder, and testing it on a closed answer list.

    # fine-tune SViTT's QA model from a SViTT checkpoint (pre-training or retrieval), select on val, test the best
    python run_simvtp_qa.py --finetune svitt.pth --data_path qa_train.json --val_data_path qa_val.json \
        --test_data_path qa_test.json --answer_list answer_list.json --output_dir output/qa
    # the same for SimVTP (its pre-training checkpoint names its QA model), selection on 5% of the training videos
    python run_simvtp_qa.py --finetune output/pretrain/checkpoint-best.pth --data_path qa_train.json \
        --val_fraction 0.05 --test_data_path qa_test.json --answer_list answer_list.json
    # test only: 16 frames as 2 clips of 8 (lse over clips), normal and frozen frames
    python run_simvtp_qa.py --only_test --finetune output/qa/checkpoint-best.pth --test_data_path qa_test.json \
        --answer_list answer_list.json --num_frames 8 --num_frames_test 16 --eval_frame_order none freeze
Annotation files: the Singularity QA layout (DATA.md, "Video question answering"). See scripts/svitt_train_qa.sh
for the paper's MSRVTT-QA, ActivityNet-QA and AGQA runs.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

import numpy as np
import torch

import checkpoint
import command_lines
import datasets
import retrieval_eval
import engine_for_finetuning
import engine_for_pretraining
import engine_for_qa as engine
import model_registry
import utils
from command_lines import DEFAULT_QA_MODEL


def get_args_parser() -> argparse.ArgumentParser:
    """This entry point's command line (command_lines.py holds every entry point's)."""
    return command_lines.qa_parser()


# ----------------------------------------------------------------------------------------------- data


def read_questions(path: str, args: argparse.Namespace) -> list[datasets.QARecord]:
    records = datasets.read_qa_annotations(path, args.data_root, args.skip_bad_records, args.clean_text)
    print(f"Data: {len(records)} questions about {len({r.path for r in records})} videos from {path}")
    return records


def split_val_by_video(records: list[datasets.QARecord], fraction: float,
                       seed: int) -> tuple[list[datasets.QARecord], list[datasets.QARecord]]:
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
    videos = {label: [datasets.VideoRecord(p, [], os.path.basename(p)) for p in dict.fromkeys(r.path for r in recs)]
              for label, recs in lists.items() if recs}
    datasets.check_eval_lists(videos, args.video_backend, skip=args.skip_eval_check)


def video_options(args: argparse.Namespace) -> dict:
    return dict(num_frames=args.num_frames, sampling_rate=args.sampling_rate, input_size=args.input_size,
                short_side_size=args.short_side_size, video_backend=args.video_backend, seed=args.seed,
                decode_threads=args.decode_threads)


def collator(args: argparse.Namespace, tokenizer) -> datasets.VideoQACollator:
    return datasets.VideoQACollator(tokenizer, max_q_len=args.max_q_len, max_a_len=args.max_a_len)


def train_dataset(records: list[datasets.QARecord], args: argparse.Namespace) -> datasets.VideoQADataset:
    return datasets.VideoQADataset(records, mode="train", sample_type=args.sample_type,
                                   excluded=datasets.exclusions_for(records, args.exclude_list, args.data_root),
                                   **video_options(args))


def build_eval_loader(records: list[datasets.QARecord], args: argparse.Namespace, tokenizer, segments: int,
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


# ----------------------------------------------------------------------------------------------- evaluation


def eval_config(args: argparse.Namespace, dtype: torch.dtype, num_clips: int = 1,
                frame_order: str = "none") -> engine.QAEvalConfig:
    return engine.QAEvalConfig(clips=engine_for_finetuning.clip_eval_config(args, dtype, num_clips, frame_order),
                               k_test=args.k_test)


class AnswerList:
    """The closed list, read once and tokenised as the batches' answers."""

    def __init__(self, path: str | None, args: argparse.Namespace, tokenizer) -> None:
        if not path:
            raise ValueError("--answer_list is required: the JSON list of answers questions are answered from")
        self.path = path
        self.answers = datasets.read_answer_list(path)
        self.ids, self.mask = collator(args, tokenizer).answer_tokens(self.answers)
        print(f"Answer list: {len(self.answers)} answers from {path}")

    def report_unlisted(self, records: list[datasets.QARecord], name: str) -> datasets.UnlistedAnswers:
        unlisted = datasets.unlisted_answers(records, self.answers)
        print(unlisted.message(name))
        return unlisted


def answer(model: torch.nn.Module, records: list[datasets.QARecord], loader, answers: AnswerList,
           cfg: engine.QAEvalConfig, header: str) -> tuple[dict, list[dict]]:
    """(metrics, prediction rows) of the model on a question list."""
    predictions = engine.answer_questions(model, loader, answers.answers, answers.ids, answers.mask, cfg, header)
    rows = engine.prediction_rows(engine.merge_ranks(predictions), records)
    return engine.qa_accuracy(rows), rows


def run_test(model: torch.nn.Module, records: list[datasets.QARecord], answers: AnswerList,
             args: argparse.Namespace, tokenizer, dtype: torch.dtype, train_records: list | None = None,
             prefix: str = "test") -> dict:
    """The test once per --eval_frame_order (the first order's results are the main ones): accuracy per answer
    type, the majority baselines, unlisted answers; <prefix>_metrics.json, <prefix>_predictions.jsonl and
    tensorboard scalars."""
    frames, clips = engine_for_finetuning.eval_frames(args, clips_are_views=False)
    unlisted = answers.report_unlisted(records, f"{prefix} questions")
    loader = build_eval_loader(records, args, tokenizer, args.test_num_segment, args.test_num_crop, frames)
    truths = [datasets.top_answer(r) for r in records]
    runs = {}
    for order in dict.fromkeys(args.eval_frame_order):
        label = "" if order == "none" else f", frames {order}"
        runs[order] = answer(model, records, loader, answers, eval_config(args, dtype, clips, order),
                             f"{prefix} QA{label}")
    metrics, rows = next(iter(runs.values()))
    out = {**metrics, "unlisted": unlisted.count, "ceiling": 100.0 * (1 - unlisted.count / len(records)),
           "views": f"{args.test_num_segment}x{args.test_num_crop}", "num_frames_test": frames, "clips": clips,
           "frame_ensemble": args.eval_frame_ensemble, "k_test": args.k_test, "frame_order": next(iter(runs))}
    common, acc = engine.majority_accuracy(truths, truths)
    out["majority_test"] = {"answer": common, "accuracy": acc}
    if train_records:
        common, acc = engine.majority_accuracy([datasets.top_answer(r) for r in train_records], truths)
        out["majority_train"] = {"answer": common, "accuracy": acc}
        out["question_prior_train"] = engine.question_prior_accuracy(
            [(r.question, datasets.top_answer(r)) for r in train_records],
            [(r.question, t) for r, t in zip(records, truths)])
        if any(r.answer_type is not None for r in records):
            out["answer_kinds"] = engine.answer_kind_report(
                rows, [(r.question, datasets.top_answer(r), r.answer_type) for r in train_records])
    if len(runs) > 1:
        out["frame_orders"] = {o: {"accuracy": m["accuracy"], **({"per_type": {t: v["accuracy"] for t, v in
                                                                               m["per_type"].items()}}
                                                                 if "per_type" in m else {})}
                               for o, (m, _) in runs.items()}
        print(format_frame_orders(out["frame_orders"]), flush=True)
    print(engine.format_qa_table(out, f"{prefix} QA on {len(records)} questions"), flush=True)
    if "answer_kinds" in out:
        print(engine.format_answer_kinds(out["answer_kinds"]), flush=True)
    engine.write_predictions(args.output_dir, prefix, out, rows)
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

    def prepare(self) -> None:
        self.answers = AnswerList(self.args.answer_list, self.args, self.tokenizer)

    def read(self, path: str, train: bool = False) -> list[datasets.QARecord]:
        return read_questions(path, self.args)

    def split_val(self, records: list[datasets.QARecord]) -> tuple:
        train, val = split_val_by_video(records, self.args.val_fraction, self.args.seed)
        print(f"Validation: {len(val)} questions about videos held out of the training list (seed {self.args.seed})")
        return train, val

    def val_label(self) -> str:
        return "validation questions"

    def check_eval_lists(self, lists: dict) -> None:
        check_eval_videos(self.args, lists)

    def train_dataset(self, records: list[datasets.QARecord]) -> datasets.VideoQADataset:
        return train_dataset(records, self.args)

    def collator(self) -> datasets.VideoQACollator:
        return collator(self.args, self.tokenizer)

    def model_for_training(self) -> torch.nn.Module:
        return build_for_training(self.args, len(self.tokenizer))

    def validator(self, model: torch.nn.Module, records: list[datasets.QARecord]) -> Callable[[int], dict]:
        args, answers = self.args, self.answers  # one view, one clip: per-epoch selection stays cheap
        answers.report_unlisted(records, "validation questions")
        val_loader = build_eval_loader(records, args, self.tokenizer, 1, 1, args.num_frames)

        def validate_epoch(epoch: int) -> dict:
            metrics, _ = answer(model, records, val_loader, answers, eval_config(args, self.dtype),
                                f"val QA epoch {epoch}")
            print(engine.format_qa_table(metrics, f"Validation, epoch {epoch}"), flush=True)
            per_type = {f"accuracy_{t}": m["accuracy"] for t, m in metrics.pop("per_type", {}).items()}
            return {**metrics, **per_type}  # scalars only: log.txt and tensorboard
        return validate_epoch

    def test(self, model: torch.nn.Module, records: list[datasets.QARecord], train_records: list) -> dict:
        return run_test(model, records, self.answers, self.args, self.tokenizer, self.dtype,
                        train_records=train_records)


def main(args: argparse.Namespace) -> dict:
    """Dispatch: --only_test, else fine-tuning. Returns the test metrics."""
    dtype = utils.setup_run(args)
    engine_for_finetuning.eval_frames(args, clips_are_views=False)  # an inconsistent clip set-up stops here
    tokenizer = datasets.build_tokenizer(args.tokenizer)
    if args.only_test:
        return only_test(args, dtype, tokenizer)
    return engine_for_finetuning.finetune(QATask(args, tokenizer, dtype))


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser(), engine_for_pretraining.NonFiniteLossError,
                          datasets.VideoDecodeError, datasets.BrokenDataError)
