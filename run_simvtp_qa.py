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
import datasets
import retrieval_eval
import engine_for_finetuning
import engine_for_pretraining
import engine_for_qa as engine
import model_registry
import utils

DEFAULT_QA_MODEL = "svitt_qa_base_patch16_224"  # the release's QA model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Video question answering: fine-tuning and testing", formatter_class=utils.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="training questions (a QA annotation file); in --only_test "
                   "the test questions when --test_data_path is not given")
    g.add_argument("--val_data_path", default=None, help="validation questions for model selection (accuracy)")
    g.add_argument("--val_fraction", type=float, default=0.0, help="without --val_data_path: hold out this seeded "
                   "fraction of the training VIDEOS (all their questions) for model selection, e.g. for AGQA whose "
                   "val file is its test file (0: no selection, the last epoch is tested)")
    g.add_argument("--test_data_path", default=None, help="test questions")
    g.add_argument("--answer_list", default=None, help="the closed answer list (a JSON list of strings) every "
                   "question is answered from; required")
    g.add_argument("--clean_text", action="store_true", help="clean the questions as the SViTT / Singularity QA "
                   "recipes do: lower case, no punctuation (answers are kept as written)")
    utils.add_clip_args(g)
    g.add_argument("--max_q_len", type=int, default=25, help="question tokens kept, with [CLS] and [SEP] "
                   "(QA uses this, not --max_text_len)")
    g.add_argument("--max_a_len", type=int, default=5, help="answer tokens kept, with [CLS] and [SEP] (longer "
                   "answers are cut, keeping [SEP])")
    g.add_argument("--test_num_segment", type=int, default=1, help="views per test video (positions over the "
                   "video, see --sample_type_test); their answer scores are ensembled with the clips'")
    g.add_argument("--test_num_crop", type=int, default=1, help="crops per test view")
    g.add_argument("--num_frames_test", type=int, default=None, help="frames read per test view (a multiple of "
                   "--num_frames; default: --num_frames), split into k = num_frames_test / num_frames clips, each "
                   "answered alone; scores ensembled by --eval_frame_ensemble")
    g.add_argument("--eval_sparse_sampling", action="store_true", help="with k > 1 clips: clip j takes frames j, "
                   "j+k, ... (each clip spans the whole video) instead of the j-th consecutive chunk")
    g.add_argument("--eval_frame_ensemble", default="lse", choices=list(engine.QA_ENSEMBLES), help="answer "
                   "log-likelihoods over the clips and views of a video: lse = logsumexp (SViTT's), mean or max")
    g.add_argument("--eval_frame_order", nargs="+", default=["none"],
                   choices=list(retrieval_eval.FRAME_ORDERS), help="temporal sensitivity: each clip's "
                   "frames as read (none), reversed, shuffled (fixed by --seed) or frozen (the middle frame "
                   "repeated); several orders repeat the test (model loaded once) and print accuracy per order")
    g = model_registry.add_model_args(
        p, model=None, drop_path=0.1,
        model_help="registered QA model (model_registry.py); default: the QA model of the --finetune checkpoint's "
        f"family and size (a QA checkpoint: its own model), else {DEFAULT_QA_MODEL}; --only_test builds the model "
        "its file names with the model flags given here (printed)")
    g.add_argument("--finetune", default="", help="fine-tuning: the initial weights (pre-training, retrieval or QA "
                   "checkpoint of the family, mapped onto the QA model non-strictly with a report: the answer "
                   "decoder starts from the text tower's fusion layers, SViTT, or the encoder's top blocks, "
                   "SimVTP); --only_test: the weights under test (loaded strictly)")
    g = utils.add_optimisation_args(p, batch_size=32, epochs=10, betas=(0.9, 0.999), lr=1e-5, min_lr=1e-6,
                                    warmup_epochs=0.5)
    g.add_argument("--layer_decay", type=float, default=1.0, help="lr x decay^(depth from top) (1: off, as the "
                   "SViTT recipes)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--k_test", type=int, default=128, help="answers of the list kept per question by the "
                   "decoder's first-token distribution, then re-scored by their full log-likelihood")
    g.add_argument("--dist_eval", action="store_true", help="each process answers its share of the questions")
    g.add_argument("--eval_host_memory_gb", type=float, default=retrieval_eval.DEFAULT_EVAL_HOST_MEMORY_GB,
                   help="bound on the host memory (GB, per process) of the evaluation loader's batches in flight "
                   "(as in run_simvtp_finetuning.py)")
    g.add_argument("--only_test", action="store_true", help="test --finetune / --resume weights once")
    utils.add_run_args(p, output_dir="output/qa", save_ckpt_freq=10, keep_last=2)
    return p


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
