"""The fine-tuning outline shared by retrieval and video QA: train loader, model for training, optimizer, epochs with
per-epoch validation and the best checkpoint, then the best weights on the test set; and the pieces both tasks'
evaluations share (test clip set-up, held-out validation, weights under test, the test's tensorboard scalars).

What differs between the tasks (their records, datasets, model choice, validation and test) is a FinetuneTask:
engine_for_retrieval.RetrievalTask and engine_for_qa.QATask; the epoch loop itself is engine_for_pretraining.train,
the same for every run.
"""
from __future__ import annotations

import abc
import argparse
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

import checkpoint
import distributed
import engine_for_pretraining
import model_registry
import retrieval_eval
import utils

BEST_CHECKPOINT = "checkpoint-best.pth"  # in --output_dir: the weights best on validation, tested at the end


class FinetuneTask(abc.ABC):
    """What one fine-tuning task adds to the outline of `finetune`. A subclass sets the class attributes and
    defines every abstract method; `args`, `tokenizer` and `dtype` are the run's."""
    items = "videos"                  # what one training record is, in messages ("questions" for QA)
    train_description = "the training annotations"  # what --data_path holds, in its error message
    select_on = "r1_sum"              # the validation metric selected on (higher is better)
    select_label = "val R@1 t2v+v2t"  # ... as the best-checkpoint line names it
    disjoint_noun = "sets"            # "the validation and test <noun> share N videos"
    disjoint_hint = ""                # appended to that error
    skip_test_label = "the test evaluation"
    best_shown_as_path = True         # "Testing <output_dir>/checkpoint-best.pth ..." (QA: the file name only)

    def __init__(self, args: argparse.Namespace, tokenizer, dtype: torch.dtype) -> None:
        self.args, self.tokenizer, self.dtype = args, tokenizer, dtype

    def prepare(self) -> None:
        """Anything read before the records (QA: the answer list)."""

    @abc.abstractmethod
    def read(self, path: str, train: bool = False) -> Any:
        """An annotation file's records (train: the training list, in the form its loader workers share)."""

    @abc.abstractmethod
    def split_val(self, records: Any) -> tuple[Any, Any]:
        """(training, validation) records: a seeded fraction (--val_fraction) of the videos held out."""

    @abc.abstractmethod
    def val_label(self) -> str:
        """How the start-up video check names the validation list."""

    @abc.abstractmethod
    def check_eval_lists(self, lists: dict[str, Any]) -> None:
        """Every video of the evaluation lists (label -> records or None) opens; all problems in one error."""

    @abc.abstractmethod
    def train_dataset(self, records: Any) -> torch.utils.data.Dataset:
        """The training set (the run's clip flags and exclude list applied)."""

    @abc.abstractmethod
    def collator(self) -> Callable:
        """The training batches' collate function."""

    @abc.abstractmethod
    def model_for_training(self) -> torch.nn.Module:
        """The task's model with --finetune's weights mapped onto it."""

    def training_data(self, model: torch.nn.Module, dataset: torch.utils.data.Dataset, collate: Callable
                      ) -> tuple[torch.utils.data.Dataset, Callable]:
        """The training set and its collate function once the model is built and frozen (QA with --cache_memory:
        each question's question-pass states computed once)."""
        return dataset, collate

    @abc.abstractmethod
    def validator(self, model: torch.nn.Module, records: Any) -> engine_for_pretraining.EpochHook:
        """epoch -> validation metrics (scalars; task.select_on among them)."""

    @abc.abstractmethod
    def test(self, model: torch.nn.Module, records: Any, train_records: Any) -> dict:
        """The test of the best weights: its metrics, written to the output folder."""


def finetune(task: FinetuneTask) -> dict:
    """Train on --data_path, select on validation (task.select_on), then test the best weights."""
    args = task.args
    if not args.data_path:
        raise ValueError(f"fine-tuning needs --data_path ({task.train_description})")
    task.prepare()
    train_records = task.read(args.data_path, train=True)
    val_records = task.read(args.val_data_path) if args.val_data_path else None
    if val_records is None and args.val_fraction > 0:
        train_records, val_records = task.split_val(train_records)
    test_records = task.read(args.test_data_path) if args.test_data_path else None
    check_disjoint(val_records, test_records, task.disjoint_noun, task.disjoint_hint)
    task.check_eval_lists({task.val_label(): val_records, f"--test_data_path {args.test_data_path}": test_records})
    model = task.model_for_training().to(args.device_obj)
    if args.freeze:
        tensors, elements = utils.freeze_parameters(model, args.freeze)
        print(f"Frozen at their initial weights: {tensors} tensors ({elements / 1e6:.2f} M parameters) under "
              f"{', '.join(args.freeze)}")
    loader, dataset, sampler = build_train_loader(*task.training_data(model, task.train_dataset(train_records),
                                                                      task.collator()), args, task.items)
    _, lr_schedule, wd_schedule = utils.training_schedules(args, len(sampler))
    optimizer = engine_for_pretraining.build_optimizer(model, args, layer_decay=args.layer_decay)
    scaler = utils.make_grad_scaler(args.device_obj, task.dtype)
    run = engine_for_pretraining.start_run(args, model, loader, sampler, dataset, optimizer, scaler, lr_schedule,
                                           wd_schedule, task.dtype)
    validate = task.validator(model, val_records) if val_records is not None else None
    engine_for_pretraining.train(run, evaluate=validate, eval_name="val", select_on=task.select_on,
                                 on_best=lambda epoch, val: save_best(args, model, epoch, val, task.select_on,
                                                                      task.select_label))
    load_best(model, args.output_dir, task.best_shown_as_path)
    if test_records is None:
        print(f"No --test_data_path: skipping {task.skip_test_label}")
        return {}
    return task.test(model, test_records, train_records)

# ----------------------------------------------------------------------------------------------- training


def build_train_loader(dataset: torch.utils.data.Dataset, collate_fn: Callable, args: argparse.Namespace,
                       items: str = "videos") -> tuple[torch.utils.data.DataLoader, Any,
                                                       utils.ResumableDistributedSampler]:
    """(loader, dataset, sampler) of a fine-tuning's training set: shuffled, resumable, whole global batches."""
    if len(dataset) < args.batch_size * args.world_size:
        raise ValueError(f"{args.data_path}: {len(dataset)} training {items}, fewer than one global batch "
                         f"({args.batch_size} x {args.world_size} processes)")
    sampler = utils.ResumableDistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                                seed=args.seed, shuffle=True, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers, collate_fn=collate_fn,
        drop_last=True, pin_memory=args.device_obj.type == "cuda",
        # a private generator: creating worker seeds must not consume the global RNG (resume equivalence)
        generator=torch.Generator().manual_seed(args.seed))
    return loader, dataset, sampler


def checkpoint_model_name(ckpt: dict) -> str | None:
    """The model a checkpoint names: its model_cfg, else its saved --model (older files)."""
    cfg = ckpt.get("model_cfg") or {}
    return cfg.get("name") or checkpoint.saved_args(ckpt).get("model")


def model_for_training(args: argparse.Namespace, name: str, vocab_size: int, ckpt: dict,
                       check: Callable[[torch.nn.Module], Any] | None = None) -> torch.nn.Module:
    """Model `name` built from the run flags (`check` may refuse it before any weights are mapped), --finetune's
    weights (already read: `ckpt`) mapped onto it non-strictly with a report, gradient checkpointing as
    --grad_checkpointing says."""
    model = model_registry.create(name, **model_registry.model_kwargs(args, name, vocab_size=vocab_size))
    if check is not None:
        check(model)
    if args.finetune:
        checkpoint.load_pretrained(model, args.finetune, strict=False, ckpt=ckpt)
    model.set_grad_checkpointing(args.grad_checkpointing)
    return model


def save_best(args: argparse.Namespace, model: torch.nn.Module, epoch: int, metrics: dict,
              metric: str = "r1_sum", label: str = "val R@1 t2v+v2t") -> None:
    """checkpoint-best.pth: the weights, the model they fit (model_cfg) and the validation metrics; `metric` (a
    key of metrics) is the one selected on, recorded as val_<metric>."""
    if distributed.is_main_process():
        checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg, "epoch": epoch,
                                "metric_name": f"val_{metric}", "metric": metrics[metric], "val_metrics": metrics,
                                "args": checkpoint.plain_args(args)}, os.path.join(args.output_dir, BEST_CHECKPOINT))
        print(f"Saved {BEST_CHECKPOINT} (epoch {epoch}, {label} = {metrics[metric]:.2f})")
    distributed.barrier()


def load_if_present(model: torch.nn.Module, path: str) -> bool:
    """Load `path`'s weights strictly into `model` if the file exists; whether it did."""
    if not os.path.isfile(path):
        return False
    model.load_state_dict(checkpoint.read_checkpoint_file(path)["model"], strict=True)
    return True


def load_if_present_everywhere(model: torch.nn.Module, path: str) -> bool:
    """load_if_present on rank 0, its weights broadcast to every rank; whether the file was there."""
    if distributed.main_value(lambda: load_if_present(model, path)):  # rank 0 decides and reads ...
        distributed.broadcast_module(model)  # ... every rank gets its weights
        return True
    return False


def load_best(model: torch.nn.Module, output_dir: str, show_path: bool = True) -> None:
    """The best-val weights into `model` (kept as they are when there was no validation set)."""
    best_path = os.path.join(output_dir, BEST_CHECKPOINT)
    if load_if_present_everywhere(model, best_path):
        print(f"Testing {best_path if show_path else BEST_CHECKPOINT} (best on validation)")
    else:
        print("No validation set: testing the last weights")

# ----------------------------------------------------------------------------------------------- validation


def held_out(count: int, fraction: float, seed: int) -> np.ndarray:
    """Which of `count` units (videos) a seeded `fraction` holds out for validation (at least one): a bool mask."""
    order = np.random.default_rng(seed).permutation(count)
    is_val = np.zeros(count, dtype=bool)
    is_val[order[:max(1, int(round(fraction * count)))]] = True
    return is_val


def check_disjoint(val: Sequence | None, test: Sequence | None, noun: str = "sets", hint: str = "") -> None:
    """Model selection must never see a test video (the release selected on test)."""
    shared = {r.path for r in val or ()} & {r.path for r in test or ()}
    if shared:
        raise ValueError(f"the validation and test {noun} share {len(shared)} videos (e.g. {sorted(shared)[0]}); "
                         f"select on a validation set that is not the test set{hint}")

# ----------------------------------------------------------------------------------------------- testing


def eval_frames(args: argparse.Namespace, clips_are_views: bool = True) -> tuple[int, int]:
    """(frames read per test view, clips k they are split into) from --num_frames_test; a combination that
    cannot work is one clear error. clips_are_views (retrieval): k > 1 clips are the temporal views, so
    --test_num_segment must be 1, and the concat ensemble takes them as one clip."""
    frames = args.num_frames_test or args.num_frames
    if frames < args.num_frames or frames % args.num_frames:
        raise ValueError(f"--num_frames_test {frames} must be a multiple of --num_frames {args.num_frames}")
    clips = frames // args.num_frames
    if clips_are_views and clips > 1 and args.test_num_segment != 1:
        raise ValueError(f"--num_frames_test {frames} makes {clips} clips per video, which are the temporal views: "
                         f"use --test_num_segment 1, not {args.test_num_segment} (crops are still averaged)")
    if args.eval_sparse_sampling and (clips == 1 or args.eval_frame_ensemble == "concat"):
        raise ValueError("--eval_sparse_sampling interleaves k > 1 clips: give --num_frames_test > --num_frames"
                         + (" and an --eval_frame_ensemble other than concat" if clips_are_views else ""))
    return frames, clips


def clip_eval_config(args: argparse.Namespace, dtype: torch.dtype, num_clips: int = 1, frame_order: str = "none",
                     **extra: Any) -> retrieval_eval.EvalConfig:
    """How test clips are cut, ordered and ensembled, from the shared evaluation flags (extra: task settings)."""
    return retrieval_eval.EvalConfig(device=args.device_obj, dtype=dtype, chunk=args.batch_size, seed=args.seed,
                                     print_freq=args.print_freq, num_clips=num_clips,
                                     sparse_clips=args.eval_sparse_sampling, ensemble=args.eval_frame_ensemble,
                                     frame_order=frame_order, **extra)


def weights_under_test(args: argparse.Namespace, report_latest: bool = False) -> str:
    """--only_test's weights (--finetune, else --resume); auto-resume never replaces them."""
    weights = args.finetune or args.resume
    if not weights:
        raise ValueError("--only_test needs the weights to test: --finetune CKPT or --resume CKPT")
    latest = checkpoint.find_latest(args.output_dir) if report_latest else None
    if latest and os.path.abspath(latest) != os.path.abspath(weights):
        print(f"--only_test: testing {weights}; not resuming from {latest}")
    return weights


def build_from_file(path: str, name: str | None, args: argparse.Namespace) -> torch.nn.Module:
    """The model a checkpoint names (or `name`), with the model settings the command line gives (printed where
    they change the file's), loaded strictly, on the device, in eval mode."""
    if not path:
        raise ValueError("this mode needs the weights: --finetune CKPT")
    model = checkpoint.build_model_from(checkpoint.read_checkpoint_file(path), path, name=name,
                                        flags=lambda chosen: command_line_model_args(args, chosen))
    return model.to(args.device_obj).eval()


def command_line_model_args(args: argparse.Namespace, name: str) -> dict:
    """Constructor arguments of model `name` the command line sets for evaluation: the family flags given, and
    the clip shape (--num_frames, --input_size: the loader reads clips of that shape, the model must take
    them). Stochastic depth is left out: it does nothing at evaluation and its flag has a default."""
    given = model_registry.model_kwargs(args, name)
    given.pop("drop_path_rate", None)
    return given


FrameOrderColumn = tuple[str, str, int, str]  # (header, key of a row, width, number format)


def format_frame_orders(title: str, rows: dict[str, dict], columns: Sequence[FrameOrderColumn]) -> str:
    """The temporal-sensitivity table: one line per frame order, one column per (header, key, width, format);
    a key a row lacks prints nan."""
    head = f"{'frame order':<12}" + "".join(f"{h:>{w}}" for h, _, w, _ in columns)
    lines = [title, head, "-" * len(head)]
    for order, r in rows.items():
        lines.append(f"{order:<12}" + "".join(f"{r.get(k, float('nan')):>{w}{f}}" for _, k, w, f in columns))
    return "\n".join(lines)


def write_test_scalars(log_dir: str | None, groups: dict[str, dict]) -> None:
    """The test's scalars next to training's (log_dir): tag prefix -> its numbers."""
    tb = utils.TensorboardLogger(log_dir)
    for prefix, numbers in groups.items():
        tb.scalars(0, prefix, numbers)
    tb.flush()
