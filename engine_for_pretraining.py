"""The training loop every run uses (pre-training, retrieval and QA fine-tuning, any model family), and pre-training's
set-up: the optimizer, epochs with save, evaluation and logging; inside an epoch, autocast forward/backward, gradient
accumulation, agreed skipping of non-finite steps, clipping, per-step lr/wd schedules, progress lines and mid-epoch
checkpoints; the run's view of broken training videos (BrokenVideos: each named once, listed in broken_videos.txt,
the stop rule); pre-training's model, masked training data, validation set and zero-shot evaluation.

The model is seen only through the model contract (model_registry.py): `model(batch, gather=...)` returns
{"loss", other scalars}; every tensor of the batch goes to the device and every scalar returned is logged.
Scalars stay on the device until a progress line is printed: one host sync per optimizer step (the agreed
non-finite check), not several per micro-batch.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch

import annotations
import batch_grouping
import checkpoint
import datasets
import distributed
import masking_generator
import model_registry
import retrieval_eval
import utils
import video_transforms


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops, its last good checkpoint stays in place."""


@dataclass
class TrainState:
    """What the loop carries across steps and epochs. Saved in every checkpoint and restored on resume (all fields
    but `history`, this process's per-step scalars, which the tests and callers read)."""
    epoch: int = 0                  # the epoch being trained (or next to train)
    micro_in_epoch: int = 0         # micro-batches of it already consumed (in this run's batch size)
    samples_in_epoch: int = 0       # samples of it consumed by all ranks: the resume position (any batch size)
    dataset_size: int = 0           # the training list's length (a mid-epoch position is only valid for it)
    global_step: int = 0            # optimizer steps taken or skipped since the start (tensorboard's x-axis)
    bad_streak: int = 0
    skipped_steps: int = 0
    scaler_skipped_steps: int = 0   # fp16: steps the loss scaler skipped (inf/nan gradients; the scale backs off)
    videos_read: int = 0            # training samples (all ranks) whose own video was opened (not excluded) ...
    videos_broken: int = 0          # ... and found broken (the sample used the next readable video)
    broken_window: list = field(default_factory=list)  # [read, broken] of the latest steps (BrokenVideos' window)
    stop: bool = False              # --max_steps reached
    eval_pending: int | None = None  # epoch saved whose evaluation has not finished (run first on resume)
    pending_record: dict = field(default_factory=dict)  # that epoch's log.txt record so far
    batch_order: torch.Tensor | None = None  # the epoch's sample order when it is not the sampler's own (neighbours)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("history", "stop")}

    def restore(self, saved: dict) -> None:
        for f in fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


@dataclass
class StepConfig:
    device: torch.device
    dtype: torch.dtype
    accum_iter: int = 1
    clip_grad: float | None = None
    max_bad_steps: int = 5
    max_steps: int = 0
    print_freq: int = 10
    save_every_steps: int = 0

    @classmethod
    def from_args(cls, args, dtype: torch.dtype) -> "StepConfig":
        """From the run scripts' flags of the same names (args.device_obj is the resolved device)."""
        return cls(device=args.device_obj, dtype=dtype, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
                   max_bad_steps=args.max_bad_steps, max_steps=args.max_steps, print_freq=args.print_freq,
                   save_every_steps=args.save_every_steps)


def batch_items(batch: dict) -> int:
    """Clips in a batch (its question count when it carries cached question-pass states instead of video)."""
    return len(batch["video"]) if "video" in batch else len(batch["question_input_ids"])


def move_batch(batch: dict, device: torch.device) -> dict:
    """Every tensor of the batch on the device (non_blocking pairs with pin_memory on CUDA); the rest as is. The
    loader's uint8 video becomes the model's normalised float video there (video_transforms.normalize_video)."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(moved.get("video"), torch.Tensor):
        moved["video"] = video_transforms.normalize_video(moved["video"])
    return moved


def build_optimizer(model: torch.nn.Module, args: Any, layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the model's parameters (no weight decay on what its optional no_weight_decay() names); with
    layer_decay (fine-tuning) lr x decay^(depth from top) by the model's own layer ids (model.layer_id,
    model.num_layers), the groups' lr scales printed."""
    scale = None
    if layer_decay is not None and layer_decay < 1:
        scale = {n: layer_decay ** (model.num_layers + 1 - model.layer_id(n)) for n, _ in model.named_parameters()}
    no_decay = model.no_weight_decay() if model_registry.supports(model, "no_weight_decay") else set()
    groups = utils.param_groups(model, args.weight_decay, no_decay_names=no_decay, layer_scale=scale)
    if layer_decay is not None:
        scales = sorted({round(g["lr_scale"], 6) for g in groups})
        print(f"Optimizer: {len(groups)} parameter groups; lr scales {scales[0]:.4g} .. {scales[-1]:.4g} "
              f"(layer decay {layer_decay} over {model.num_layers} layers)")
    for g in groups:
        g.pop("names")
    return utils.make_adamw(groups, args.abs_lr, args.opt_betas, args.opt_eps, next(model.parameters()).device)


def steps_in_epoch(batches: int, accum_iter: int) -> int:
    """Optimizer steps of an epoch of `batches` micro-batches: a last partial window is a step too."""
    return math.ceil(batches / accum_iter)

# ----------------------------------------------------------------------------------------------- one epoch


def train_one_epoch(model: torch.nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, batches_per_epoch: int, lr_schedule: np.ndarray,
                    wd_schedule: np.ndarray, cfg: StepConfig, state: TrainState,
                    tb: utils.TensorboardLogger | None = None,
                    save_mid_epoch: Callable[[int, int], None] | None = None,
                    broken: "BrokenVideos | None" = None) -> dict[str, float]:
    """Train epoch `state.epoch` from micro-batch `state.micro_in_epoch` (the loader starts there) to its end, or
    to cfg.max_steps overall. Returns the epoch's averaged scalars.

    Micro-batches form windows of cfg.accum_iter (the epoch's last window may be shorter: it is stepped, each
    loss divided by the window's real size). A non-finite loss on any rank skips that window's step on every
    rank; cfg.max_bad_steps in a row raise NonFiniteLossError. The batches' broken-video counts ride on the
    step's one collective; `broken` names the files and may stop the run (datasets.BrokenDataError).
    """
    model.train()
    log = _StepLog(cfg, state, tb)
    epoch = state.epoch
    window: list[torch.Tensor] = []  # per micro-batch: [non-finite flag, videos read, videos broken]
    optimizer.zero_grad(set_to_none=True)
    iterator = log.metrics.log_every(loader, total=batches_per_epoch, header=f"Epoch [{epoch}]",
                                     start=state.micro_in_epoch, before_print=log.flush)
    for batch in iterator:
        utils.raise_if_interrupted()
        window_start = state.micro_in_epoch - len(window)
        size = min(cfg.accum_iter, batches_per_epoch - window_start)
        if not window:  # the schedules' index is the position in training (= global_step unless settings changed)
            it = min(epoch * steps_in_epoch(batches_per_epoch, cfg.accum_iter) + window_start // cfg.accum_iter,
                     len(lr_schedule) - 1)
            utils.apply_schedules(optimizer, float(lr_schedule[it]), float(wd_schedule[it]))
        moved = move_batch(batch, cfg.device)  # once, non-blocking: the counts below read the moved copies
        out, bad = _forward_backward(model, moved, scaler, cfg, scale=1.0 / size, sync=len(window) == size - 1)
        counts = [moved[k].float() if k in moved else bad.new_zeros((), dtype=torch.float)
                  for k in ("videos_read", "videos_broken")]
        window.append(torch.stack([bad.float(), *counts]))
        if broken is not None:
            broken.note(batch.get("broken_videos", ()))
        state.micro_in_epoch += 1
        state.samples_in_epoch += batch.get("num_items", batch_items(batch)) * distributed.get_world_size()
        if len(window) < size:
            continue
        bad_ranks, read, n_broken = distributed.sum_across_ranks(torch.stack(window).sum(0)).tolist()  # the one sync
        window = []
        state.videos_read += int(read)
        state.videos_broken += int(n_broken)
        state.global_step += 1
        if broken is not None:
            broken.check(state, int(read), int(n_broken))
        if bad_ranks:
            _skip_step(optimizer, state, cfg, epoch)
        else:
            state.bad_streak = 0
            norm, scaler_scalars = _optimizer_step(model, optimizer, scaler, cfg)
            log.step({**out, **scaler_scalars}, optimizer, norm, batch_items(batch) * size)
        step_in_epoch = steps_in_epoch(state.micro_in_epoch, cfg.accum_iter)
        stopping = bool(cfg.max_steps) and state.global_step >= cfg.max_steps  # train() saves this position
        if save_mid_epoch is not None and cfg.save_every_steps > 0 and state.micro_in_epoch < batches_per_epoch \
                and state.global_step % cfg.save_every_steps == 0 and not stopping:
            log.flush()
            if broken is not None:
                broken.sync()
            save_mid_epoch(epoch, step_in_epoch)
        if stopping:
            state.stop = True
            break
    log.flush()
    summary = log.metrics.summary()
    summary["videos_read_total"] = state.videos_read
    summary["videos_broken_total"] = state.videos_broken
    summary["skipped_steps_total"] = state.skipped_steps
    if scaler.is_enabled():
        summary["scaler_skipped_steps_total"] = state.scaler_skipped_steps
    return summary


def _forward_backward(model: torch.nn.Module, batch: dict, scaler: torch.amp.GradScaler, cfg: StepConfig,
                      scale: float = 1.0, sync: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward + backward of one micro-batch (loss x `scale`) -> (the model's scalars, detached; a bool tensor:
    the loss is non-finite). Nothing is read on the host here. Gradients of a non-finite micro-batch are
    dropped with its window. Inside an accumulation window (sync=False) both passes run under DDP's no_sync():
    DDP decides at forward time whether the backward all-reduces."""
    accumulate = isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync
    with model.no_sync() if accumulate else contextlib.nullcontext():
        with utils.autocast(cfg.device, cfg.dtype):
            out = model(batch, gather=distributed.gather_with_grad)
        loss = out["loss"]
        scaler.scale(loss * scale).backward()
    scalars = {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    return scalars, ~torch.isfinite(loss.detach())


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    cfg: StepConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unscale, clip (or measure) the gradient norm, step, clear -> (the norm, the loss scaler's scalars: its scale
    and whether it skipped this step (fp16 only)); tensors, not read here."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.clip_grad:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    else:
        norm = utils.grad_norm(params)
    before = _loss_scale(scaler)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if before is None:
        return norm, {}
    after = _loss_scale(scaler)
    return norm, {"loss_scale": after, "scaler_skipped": (after < before).float()}  # a skip backs the scale off


def _loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The scaler's current scale as a device tensor (a copy: update() changes it in place); None when disabled."""
    if not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale.detach().clone().reshape(()) if scale is not None else torch.tensor(scaler.get_scale())


def _skip_step(optimizer: torch.optim.Optimizer, state: TrainState, cfg: StepConfig, epoch: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    state.bad_streak += 1
    state.skipped_steps += 1
    print(f"WARNING: non-finite loss at epoch {epoch} step {state.global_step}; step skipped on every rank "
          f"({state.bad_streak} in a row)", flush=True)
    if state.bad_streak >= cfg.max_bad_steps:
        raise NonFiniteLossError(
            f"{state.bad_streak} non-finite losses in a row (epoch {epoch}, step {state.global_step}); stopping. "
            "The last good checkpoint is kept; lower --lr, set --clip_grad, or try --precision fp32, then resume.")


class _StepLog:
    """Per-step scalars kept as device tensors and read in one go when a progress line is due (and at the end of
    the epoch): then the meters, tensorboard and state.history get them, with the clips/s of the interval."""

    def __init__(self, cfg: StepConfig, state: TrainState, tb: utils.TensorboardLogger | None) -> None:
        self.metrics = utils.MetricLogger(cfg.print_freq)
        self.state, self.tb = state, tb
        self.pending: list[tuple[int, dict[str, torch.Tensor], dict[str, float]]] = []
        self.clips, self.t_last = 0, time.time()

    def step(self, out: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, norm: torch.Tensor,
             clips: int) -> None:
        host = {"lr": optimizer.param_groups[0]["lr"],
                "weight_decay": max(g["weight_decay"] for g in optimizer.param_groups)}
        self.pending.append((self.state.global_step, {**out, "grad_norm": norm.detach().float()}, host))
        self.clips += clips * distributed.get_world_size()

    def flush(self) -> None:
        if not self.pending:
            return
        names = [list(dev) for _, dev, _ in self.pending]
        values = torch.stack([v.float().reshape(()) for _, dev, _ in self.pending for v in dev.values()]).tolist()
        now = time.time()
        rate = self.clips / max(now - self.t_last, 1e-9)
        self.clips, self.t_last = 0, now
        pos = 0
        for (step, _, host), keys in zip(self.pending, names):
            scalars = {**dict(zip(keys, values[pos:pos + len(keys)])), **host, "clips_per_s": rate}
            pos += len(keys)
            self.state.scaler_skipped_steps += int(scalars.pop("scaler_skipped", 0))
            self.metrics.update(**scalars)
            self.state.history.append({"step": step, **scalars})
            if self.tb is not None:
                self.tb.scalars(step, "train", scalars)
        self.pending = []

# ----------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the epoch loop drives: the model (unwrapped, for saving and evaluation) and its wrapper for
    training (DDP or itself), data, optimisation, logging and where the outputs go."""
    model: torch.nn.Module
    train_model: torch.nn.Module
    loader: Any
    sampler: utils.ResumableDistributedSampler
    dataset: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    cfg: StepConfig
    state: TrainState
    batch_size: int                 # dataset items per micro-batch (the loader's: with --clips_per_video, clips / C)
    epochs: int
    output_dir: str
    save: Callable[[int, int | None], None]
    tb: utils.TensorboardLogger | None = None
    save_ckpt_freq: int = 0
    broken: "BrokenVideos | None" = None
    # (epoch, the order saved for it or None) -> the epoch's sample order to save (neighbour batches)
    before_epoch: Callable[[int, torch.Tensor | None], torch.Tensor] | None = None


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP for training: gradients all-reduced straight from their buckets (gradient_as_bucket_view: no second copy
    of the gradients), and no buffer broadcast before every forward (forward_sync_buffers=False, torch 2.14's name):
    our buffers are constant tables (sin-cos positions, id buffers) that the start-up sync already made equal."""
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
        forward_sync_buffers=False)


def start_run(args: Any, model: torch.nn.Module, loader: Any, sampler: utils.ResumableDistributedSampler,
              dataset: Any, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, lr_schedule: np.ndarray,
              wd_schedule: np.ndarray, dtype: torch.dtype) -> Run:
    """The run scripts' common start: resume (reporting or refusing changed settings), args.json with the history
    of resumes, the broken-video tracker, the DDP wrapper, and the Run the epoch loop drives."""
    if args.batch_size * args.world_size < 2:
        print("WARNING: the global batch holds 1 clip: the contrastive and matching losses compare the clips of a "
              "batch and are 0 here; they need at least 2 (raise --batch_size or the number of processes)")
    state = TrainState(dataset_size=len(dataset))
    resumed = checkpoint.resume_if_any(args, model, optimizer, scaler, dataset_size=len(dataset))
    if resumed is not None:
        state.restore(resumed[0])
        state.dataset_size = len(dataset)
    checkpoint.save_args_json(args, args.output_dir, resumed[1] if resumed is not None else None)
    broken = BrokenVideos(dataset, args.output_dir, args.max_broken_fraction, resumed=resumed is not None,
                          hint=datasets.check_hint(args.data_path, args.data_root,
                                                   os.path.join(args.output_dir, "check.json")))
    train_model = model
    if args.distributed:
        train_model = wrap_ddp(model, args.device_obj)
    return Run(model=model, train_model=train_model, loader=loader, sampler=sampler, dataset=dataset,
               optimizer=optimizer, scaler=scaler, lr_schedule=lr_schedule, wd_schedule=wd_schedule,
               cfg=StepConfig.from_args(args, dtype), state=state, batch_size=loader.batch_size, epochs=args.epochs,
               output_dir=args.output_dir, tb=utils.TensorboardLogger(args.log_dir),
               save=checkpoint.training_saver(args, model, optimizer, scaler, state),
               save_ckpt_freq=args.save_ckpt_freq, broken=broken)


EpochHook = Callable[[int], dict[str, float]]  # epoch -> evaluation metrics (may save a best checkpoint)


def train(run: Run, evaluate: EpochHook | None = None, eval_due: Callable[[int], bool] = lambda e: True,
          eval_name: str = "eval", select_on: str | None = None,
          on_best: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """The epoch loop of every run: train an epoch, save it (marking its evaluation pending), evaluate, record,
    keep a periodic copy. A run resumed between an epoch's save and the end of its evaluation evaluates first.
    A run stopped inside an epoch by --max_steps saves its position and evaluates its last weights.

    `evaluate(epoch)` runs on every rank when `eval_due(epoch)`; its metrics go to log.txt as `<eval_name>_<k>`
    and to tensorboard under `eval_name`, at the same global step as the training scalars. With `select_on` (a metric name, higher is better)
    `on_best(epoch, metrics)` is called when that metric beats the best so far (kept in eval_state.json).
    Returns the last epoch's training summary.
    """
    state = run.state
    finish = _EpochFinisher(run, evaluate, eval_name, select_on, on_best)
    if state.eval_pending is not None:
        print(f"Resuming: epoch {state.eval_pending} was saved but its evaluation did not finish; evaluating now")
        finish(state.eval_pending, state.pending_record, evaluate_now=True)
    batches = run.sampler.num_samples // run.batch_size
    summary: dict[str, float] = {}
    print(f"Training {run.epochs} epochs x {steps_in_epoch(batches, run.cfg.accum_iter)} steps from epoch "
          f"{state.epoch} micro-batch {state.micro_in_epoch}")
    while state.epoch < run.epochs and not state.stop:
        epoch = state.epoch
        run.sampler.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        if run.before_epoch is not None:  # a saved order is for this epoch only when resuming inside it
            state.batch_order = run.before_epoch(epoch, state.batch_order if state.samples_in_epoch else None)
        run.sampler.set_start(state.samples_in_epoch)
        state.micro_in_epoch = batches - len(run.sampler) // run.batch_size  # the same unless settings changed
        summary = train_one_epoch(run.train_model, run.loader, run.optimizer, run.scaler, batches, run.lr_schedule,
                                  run.wd_schedule, run.cfg, state, run.tb, save_mid_epoch=run.save,
                                  broken=run.broken)
        run.sampler.set_start(0)
        record = {"epoch": epoch, "global_step": state.global_step, **{f"train_{k}": v for k, v in summary.items()}}
        if run.broken is not None:
            run.broken.sync()
            record.update(run.broken.summary(state))
        if state.micro_in_epoch < batches:  # --max_steps inside the epoch: save where we are, evaluate the end
            run.save(epoch, steps_in_epoch(state.micro_in_epoch, run.cfg.accum_iter))
            finish(epoch, {**record, "partial_epoch": True}, evaluate_now=evaluate is not None)
            break
        due = evaluate is not None and eval_due(epoch)
        state.epoch, state.micro_in_epoch, state.samples_in_epoch = epoch + 1, 0, 0
        state.batch_order = None
        state.eval_pending, state.pending_record = (epoch if due else None), record
        run.save(epoch, None)
        finish(epoch, record, evaluate_now=due)
    if run.broken is not None:
        run.broken.report(state)
    return summary


class _EpochFinisher:
    """The part of an epoch after its checkpoint: evaluation and model selection, log.txt, tensorboard, the
    periodic copy; then the pending mark is cleared (in eval_state.json: no checkpoint is rewritten)."""

    def __init__(self, run: Run, evaluate: EpochHook | None, name: str, select_on: str | None,
                 on_best: Callable[[int, dict], None] | None) -> None:
        self.run, self.evaluate, self.name, self.select_on, self.on_best = run, evaluate, name, select_on, on_best

    def __call__(self, epoch: int, record: dict, evaluate_now: bool) -> None:
        run, state = self.run, self.run.state
        done = distributed.main_value(lambda: checkpoint.read_eval_state(run.output_dir))  # rank 0's view decides
        if evaluate_now and self.evaluate is not None and done.get("global_step", -1) < record["global_step"]:
            metrics = self.evaluate(epoch)
            record = {**record, **{f"{self.name}_{k}": v for k, v in metrics.items()}}
            if run.tb is not None:
                run.tb.scalars(record["global_step"], self.name, metrics)
            done = {**done, "epoch": epoch, "global_step": record["global_step"]}
            score = metrics.get(self.select_on) if self.select_on else None
            if distributed.main_value(lambda: score is not None and score > done.get("best", float("-inf"))):
                done.update(best=score, best_epoch=epoch, metric=self.select_on)
                if self.on_best is not None:
                    self.on_best(epoch, metrics)
            checkpoint.write_eval_state(run.output_dir, done)
        utils.append_json_line(os.path.join(run.output_dir, "log.txt"), record)
        if run.tb is not None:
            run.tb.flush()
        checkpoint.keep_periodic(run.output_dir, epoch, run.save_ckpt_freq, run.epochs - 1)
        state.eval_pending, state.pending_record = None, {}
        distributed.barrier()

# ----------------------------------------------------------------------------------------------- broken videos

BROKEN_LIST = "broken_videos.txt"  # in the output folder: one "<path>\t<error>" line per broken training video
BROKEN_WINDOW = 1000  # videos drawn that the stop rule judges (a shorter list: its length)
NAMED_IN_LOG = 20     # broken files printed one by one; every one goes to broken_videos.txt


class BrokenVideos:
    """The run's view of its broken training videos, kept by the main process of each rank.

    Data-loader workers are separate processes, so the batches carry the broken files they met. Each file is
    named once per run: rank 0 prints it (the first NAMED_IN_LOG) and appends it to <output_dir>/broken_videos.txt;
    other ranks' files reach rank 0 at sync() (every epoch end and checkpoint: one small object gather, never per
    step). Known files go into the dataset, so the next epoch's workers skip them unopened. A resumed run reads the
    list back. The stop rule: when more than `max_fraction` of the videos drawn in the latest steps (at least
    `window` of them, counted on every rank and summed in the step's one collective) were broken, every rank stops
    together with datasets.BrokenDataError.
    """

    def __init__(self, dataset: Any, output_dir: str, max_fraction: float, resumed: bool,
                 window: int | None = None, hint: str | None = None) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"--max_broken_fraction must be in [0, 1], got {max_fraction}")
        self.dataset, self.max_fraction = dataset, float(max_fraction)
        self.hint = hint or datasets.check_hint()  # how to find them all (the stop message)
        self.window = window or min(BROKEN_WINDOW, len(dataset) - len(dataset.excluded))
        self.path = os.path.join(output_dir, BROKEN_LIST)
        self.log_path = os.path.join(output_dir, "log.txt")
        self.known: dict[str, str] = distributed.main_value(lambda: read_broken_list(self.path)) if resumed else {}
        self.pending: dict[str, str] = {}  # found on this rank, not yet sent to rank 0
        if not resumed and distributed.is_main_process():
            open(self.path, "w").close()  # a fresh run starts a fresh list
        # files a pass before the loop met (QA's --cache_memory) are named as the loop names its own
        self.note([(path, error) for path, error in dataset.broken.items() if path not in self.known])
        dataset.broken.update(self.known)

    def note(self, found: Iterable[tuple[str, str]]) -> None:
        """A batch's broken files: new ones are named (rank 0) or kept for the next sync (other ranks)."""
        for path, error in found:
            if path in self.known:
                continue
            self.known[path] = self.dataset.broken[path] = error
            if distributed.is_main_process():
                self._name(path, error)
            else:
                self.pending[path] = error

    def sync(self) -> None:
        """Every rank calls this at the same points: rank 0 names the other ranks' new files, all learn them."""
        if distributed.get_world_size() == 1:
            return
        parts = distributed.gather_objects(self.pending)
        self.pending = {}
        for part in parts:
            for path, error in part.items():
                if path not in self.known:
                    self.known[path] = self.dataset.broken[path] = error
                    if distributed.is_main_process():
                        self._name(path, error)

    def _name(self, path: str, error: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{path}\t{error}\n")
        n = len(self.known)
        if n <= NAMED_IN_LOG:
            shown = error if error.startswith(path) else f"{path}: {error}"
            print(f"WARNING: broken training video {n}, replaced by the next readable one: {shown}", flush=True)
        if n == NAMED_IN_LOG:
            print(f"WARNING: further broken training videos are listed in {self.path} only", flush=True)

    def check(self, state: TrainState, read: int, broken: int) -> None:
        """One step's counts (summed over ranks) into the window; stop when its broken share is too high."""
        window = state.broken_window
        window.append([read, broken])
        while len(window) > 1 and sum(r for r, _ in window) - window[0][0] >= self.window:
            window.pop(0)
        total, bad = sum(r for r, _ in window), sum(b for _, b in window)
        if total >= self.window and bad > self.max_fraction * total:
            self._stop(state, bad / total, total)

    def _stop(self, state: TrainState, fraction: float, drawn: int) -> None:
        self.sync()
        utils.append_json_line(self.log_path, {
            "epoch": state.epoch, "global_step": state.global_step, "stopped": "too many broken training videos",
            "broken_fraction": fraction, "broken_video_files": len(self.known), "broken_list": BROKEN_LIST})
        examples = ", ".join(list(self.known)[:3])
        raise datasets.BrokenDataError(
            f"stopped at epoch {state.epoch}, step {state.global_step}: {fraction:.0%} of the last {drawn} training "
            f"videos drawn were broken (more than --max_broken_fraction {self.max_fraction:g}); "
            f"{len(self.known)} broken files so far, e.g. {examples}; all are listed in {self.path}. To go on, "
            f"{self.hint} (or pass --exclude_list {self.path}), or raise --max_broken_fraction; "
            "the run resumes from its last checkpoint")

    def summary(self, state: TrainState) -> dict[str, float]:
        """log.txt's broken-video fields: files so far (not reads), and their share of the videos drawn."""
        return {"broken_video_files": len(self.known),
                "broken_fraction": state.videos_broken / state.videos_read if state.videos_read else 0.0}

    def report(self, state: TrainState) -> None:
        if self.known or state.videos_broken:
            share = self.summary(state)["broken_fraction"]
            print(f"Broken training videos: {len(self.known)} files ({share:.1%} of the {state.videos_read} videos "
                  f"drawn), each replaced by the next readable one; listed in {self.path}")


def read_broken_list(path: str) -> dict[str, str]:
    """A run's broken_videos.txt -> {path: error} ({} when there is none yet)."""
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            name, _, error = line.rstrip("\n").partition("\t")
            if name:
                out[name] = error
    return out

# ----------------------------------------------------------------------------------------------- pre-training's set-up


def build_model(args: argparse.Namespace, vocab_size: int) -> torch.nn.Module:
    """The model named by --model with its family's flags; --init_ckpt / --bert_path weights on top."""
    model = model_registry.create(args.model, **model_registry.model_kwargs(args, args.model, vocab_size=vocab_size))
    for path in (args.init_ckpt, args.beit_path, args.bert_path):
        if path:
            checkpoint.load_pretrained(model, path, strict=False)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.compile_blocks:
        backend = args.compile_backend or utils.DEFAULT_COMPILE_BACKEND
        count = utils.compile_blocks(model, backend)
        print(f"torch.compile ({backend}): {count} transformer blocks compiled in place")
    return model


def build_loader(args: argparse.Namespace, tokenizer, model: torch.nn.Module) -> tuple[
        torch.utils.data.DataLoader, datasets.VideoTextDataset, utils.ResumableDistributedSampler]:
    """Training data shaped by what the model asks for: a video mask on its token grid, MLM captions."""
    # numpy columns, not a list of objects: forked loader workers share them instead of copying them
    records = annotations.read_record_table(args.data_path, args.data_root, args.skip_bad_records)
    mask_gen = None
    if model.takes_video_mask:
        grid = model.token_grid(args.num_frames, args.input_size, args.input_size)
        mask_gen = masking_generator.build_mask_generator(args.mask_type, grid, args.mask_ratio)
    dataset = datasets.VideoTextDataset(records, mode="train", num_frames=args.num_frames,
                                        sampling_rate=args.sampling_rate, input_size=args.input_size,
                                        video_backend=args.video_backend, seed=args.seed,
                                        decode_threads=args.decode_threads, mask_generator=mask_gen,
                                        sample_type=args.sample_type, clips_per_video=args.clips_per_video,
                                        excluded=annotations.exclusions_for(records, args.exclude_list, args.data_root))
    collator = datasets.VideoTextCollator(tokenizer, max_text_len=args.max_text_len,
                                          text_mask_ratio=args.text_mask_ratio if model.text_masking else None,
                                          text_mask_mode=model.text_masking or "mask", seed=args.seed)
    videos_per_batch = args.batch_size // args.clips_per_video
    sampler = build_sampler(args, dataset, videos_per_batch)
    if len(dataset) < videos_per_batch * args.world_size:
        raise ValueError(f"{args.data_path}: {len(dataset)} videos per epoch, fewer than one global batch "
                         f"({videos_per_batch} x {args.world_size} processes)")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=videos_per_batch, sampler=sampler, num_workers=args.num_workers,
        collate_fn=collator, drop_last=True, pin_memory=args.device_obj.type == "cuda",
        # a private generator: creating worker seeds must not consume the global RNG (resume equivalence)
        generator=torch.Generator().manual_seed(args.seed))
    text = f"{model.text_masking} text masking {args.text_mask_ratio}" if model.text_masking else "no text masking"
    repeated = (f"; {args.clips_per_video} clips per video read ({len(dataset)} videos an epoch, "
                f"{videos_per_batch} a step)" if args.clips_per_video > 1 else "")
    print(f"Data: {len(records)} videos from {args.data_path}; video mask {mask_gen}; {text}{repeated}")
    return loader, dataset, sampler


def build_sampler(args: argparse.Namespace, dataset: datasets.VideoTextDataset,
                  videos_per_batch: int) -> utils.ResumableDistributedSampler:
    """Uniformly shuffled batches, or caption-neighbour groups (--caption_group_size > 1)."""
    size = args.caption_group_size
    if size <= 1:
        return utils.ResumableDistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                                 seed=args.seed, shuffle=True, drop_last=True)
    if args.clips_per_video != 1:
        raise ValueError("--caption_group_size groups whole videos; it cannot be combined with --clips_per_video")
    if videos_per_batch % size:
        raise ValueError(f"--caption_group_size {size} does not divide the batch size {videos_per_batch}: a group "
                         "would be split between two steps")
    print(f"Batches: groups of {size} clips whose captions the model embeds nearest ({videos_per_batch // size} "
          f"groups a step, regrouped every epoch)")
    return batch_grouping.NeighbourBatchSampler(dataset, size, num_replicas=args.world_size, rank=args.rank,
                                                seed=args.seed, pool=args.caption_group_pool)


def neighbour_grouping(args: argparse.Namespace, model: torch.nn.Module, sampler: utils.ResumableDistributedSampler,
                       dataset: datasets.VideoTextDataset, tokenizer,
                       dtype: torch.dtype) -> batch_grouping.TextNeighbourGrouping | None:
    """The per-epoch regrouping a neighbour sampler needs (None for uniform batches)."""
    if not isinstance(sampler, batch_grouping.NeighbourBatchSampler):
        return None
    cfg = retrieval_eval.EvalConfig(device=args.device_obj, dtype=dtype, max_text_len=args.max_text_len)
    return batch_grouping.TextNeighbourGrouping(sampler, model, dataset.records.captions, tokenizer, cfg)


def build_eval_dataset(args: argparse.Namespace) -> datasets.VideoTextDataset | None:
    """The validation set of --eval_every: one centre clip per video (frames by --sample_type_test), read strictly
    (a broken video is an error), so every video of it is checked now, before any training (unless
    --skip_eval_check)."""
    if args.eval_every <= 0:
        return None
    if not args.eval_data_path:
        raise ValueError("--eval_every needs --eval_data_path (a validation annotation file)")
    records = annotations.read_annotations(args.eval_data_path, args.data_root, args.skip_bad_records)
    annotations.check_eval_lists({f"--eval_data_path {args.eval_data_path}": records}, args.video_backend,
                              skip=args.skip_eval_check)
    return datasets.VideoTextDataset(records, mode="test", num_frames=args.num_frames,
                                     sampling_rate=args.sampling_rate, input_size=args.input_size,
                                     short_side_size=args.short_side_size, test_num_segment=1,
                                     test_num_crop=1, video_backend=args.video_backend, seed=args.seed,
                                     sample_type=args.sample_type_test, decode_threads=args.decode_threads)


def zero_shot_eval(model: torch.nn.Module, dataset: datasets.VideoTextDataset, tokenizer, args: argparse.Namespace,
                   dtype: torch.dtype) -> dict[str, float]:
    """Zero-shot retrieval on the validation set; every rank embeds its share (features are gathered)."""
    cfg = retrieval_eval.EvalConfig(device=args.device_obj, dtype=dtype, chunk=args.batch_size,
                                           max_text_len=args.max_text_len, video_mask_ratio=args.eval_mask_ratio,
                                           seed=args.seed, match_mask_ratio=args.match_mask_ratio,
                                           match_masks=args.match_masks)
    workers = min(args.num_workers, 2)
    loader = retrieval_eval.build_eval_loader(dataset, tokenizer, args.batch_size, workers, args.max_text_len,
                                                     args.distributed, args.eval_host_memory_gb, device=cfg.device)
    res = retrieval_eval.evaluate(model, loader, tokenizer, cfg)
    metrics = dict(res["metrics"])
    print(f"Zero-shot on {args.eval_data_path}: t2v R@1 {metrics['t2v_R@1']:.1f} R@5 {metrics['t2v_R@5']:.1f} "
          f"| v2t R@1 {metrics['v2t_R@1']:.1f} R@5 {metrics['v2t_R@5']:.1f} "
          f"(chance R@1 {100.0 / len(dataset):.1f})")
    if model_registry.supports(model, "rerank"):  # the matching head on held-out pairs
        metrics.update(retrieval_eval.held_out_matching_accuracy(
            model, res, dataset, tokenizer, replace(cfg, print_freq=10**9), seed=args.seed, num_workers=workers))
        print(f"Matching head on {args.eval_data_path}: accuracy {metrics['match_acc']:.1f} with random and "
              f"{metrics['match_acc_hard']:.1f} with hard non-matches (1 match : 2 non-matches; a constant answer "
              f"scores 66.7)")
    return metrics


def check_masks(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """Pre-training learns from masked inputs: masking no word (or no tube, for a model that takes a video mask)
    leaves the word head (or the pixel decoder) without gradient, and DDP stops at the second step."""
    name = model.model_cfg["name"]
    if model.text_masking and not args.text_mask_ratio:
        raise ValueError(f"--text_mask_ratio {args.text_mask_ratio}: {name} learns masked words, so some must be "
                         f"masked (its default: {model.default_text_mask_ratio}); --w_mlm 0 turns that loss off")
    if model.takes_video_mask:
        grid = model.token_grid(args.num_frames, args.input_size, args.input_size)
        mask_gen = masking_generator.build_mask_generator(args.mask_type, grid, args.mask_ratio)
        if not mask_gen(np.random.default_rng(0)).any():
            raise ValueError(f"--mask_ratio {args.mask_ratio} masks no tube of {name}'s {'x'.join(map(str, grid))} "
                             "token grid: its pixel decoder would have nothing to reconstruct")


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is built, a combination of flags that cannot do what it says."""
    if args.compile_backend is not None and not args.compile_blocks:
        raise ValueError(f"--compile_backend {args.compile_backend} only applies with --compile_blocks; add "
                         "--compile_blocks or drop --compile_backend")
    if args.clips_per_video < 1 or args.batch_size % args.clips_per_video:
        raise ValueError(f"--clips_per_video {args.clips_per_video} must be >= 1 and divide --batch_size "
                         f"{args.batch_size} (a step's clips come from batch_size / clips_per_video videos)")
