"""One epoch of SimVTP pre-training: forward under autocast, agreed skipping of non-finite steps, gradient
accumulation, clipping, per-iteration lr/wd schedules, logging and mid-epoch checkpoints."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

import distributed
import utils

BATCH_TENSORS = ("video", "video_mask", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")
LOSS_TERMS = ("loss", "loss_pixel", "loss_mlm", "loss_vtc", "loss_vtm")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops, its last good checkpoint stays in place."""


@dataclass
class TrainState:
    """What the loop carries across steps and epochs (and what resume restores)."""
    global_step: int = 0
    bad_streak: int = 0
    skipped_steps: int = 0
    skipped_videos: float = 0.0
    stop: bool = False
    history: list[dict] = field(default_factory=list)


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


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors the model needs, on the device (non_blocking pairs with pin_memory on CUDA)."""
    return {k: batch[k].to(device, non_blocking=True) for k in BATCH_TENSORS if k in batch}


def train_one_epoch(model: torch.nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, start_step: int, steps_per_epoch: int,
                    lr_schedule: np.ndarray, wd_schedule: np.ndarray, cfg: StepConfig, state: TrainState,
                    tb: utils.TensorboardLogger | None = None,
                    save_mid_epoch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Train from optimizer step `start_step` of `epoch` to its end (or to cfg.max_steps overall).

    Returns the epoch's averaged scalars. A non-finite loss on any rank skips that optimizer step on every rank;
    `cfg.max_bad_steps` in a row raise NonFiniteLossError.
    """
    model.train()
    metrics = utils.MetricLogger(cfg.print_freq)
    batch_size = None
    optimizer.zero_grad(set_to_none=True)
    micro = 0
    step_in_epoch = start_step
    t_last = time.time()
    iterator = metrics.log_every(loader, total=steps_per_epoch * cfg.accum_iter, header=f"Epoch [{epoch}]",
                                 start=start_step * cfg.accum_iter)
    for batch in iterator:
        if micro == 0:
            it = min(state.global_step, len(lr_schedule) - 1)
            utils.apply_schedules(optimizer, float(lr_schedule[it]), float(wd_schedule[it]))
        batch_size = batch["video"].shape[0]
        state.skipped_videos += distributed.all_reduce_sum(int(batch.get("skipped", torch.tensor(0)).sum()),
                                                     cfg.device)
        losses = _forward_backward(model, move_batch(batch, cfg.device), scaler, cfg,
                                   sync=micro == cfg.accum_iter - 1)
        if losses is None:  # non-finite somewhere: drop this accumulation window on every rank
            _skip_step(optimizer, state, cfg, epoch, step_in_epoch)
            micro = 0
            step_in_epoch += 1
            continue
        micro += 1
        if micro < cfg.accum_iter:
            continue
        micro = 0
        norm = _optimizer_step(model, optimizer, scaler, cfg)
        state.bad_streak = 0
        state.global_step += 1
        step_in_epoch += 1
        now = time.time()
        clips_per_s = batch_size * cfg.accum_iter * distributed.get_world_size() / max(now - t_last, 1e-9)
        t_last = now
        scalars = {**losses, "lr": optimizer.param_groups[0]["lr"], "grad_norm": norm,
                   "weight_decay": max(g["weight_decay"] for g in optimizer.param_groups),
                   "clips_per_s": clips_per_s}
        metrics.update(**scalars)
        state.history.append({"step": state.global_step, **losses})
        if tb is not None:
            tb.scalars(state.global_step, "train", scalars)
        if save_mid_epoch is not None and cfg.save_every_steps > 0 and step_in_epoch < steps_per_epoch \
                and state.global_step % cfg.save_every_steps == 0:
            save_mid_epoch(epoch, step_in_epoch)
        if cfg.max_steps and state.global_step >= cfg.max_steps:
            state.stop = True
            break
    summary = metrics.summary()
    summary["skipped_videos_total"] = state.skipped_videos
    summary["skipped_steps_total"] = state.skipped_steps
    return summary


def _forward_backward(model: torch.nn.Module, batch: dict, scaler: torch.amp.GradScaler, cfg: StepConfig,
                      sync: bool) -> dict[str, float] | None:
    """Forward + backward of one micro-batch; None when the loss is non-finite on any rank."""
    no_sync = getattr(model, "no_sync", None)
    with utils.autocast(cfg.device, cfg.dtype):
        out = model(**batch, gather=distributed.gather_with_grad)
    loss = out["loss"]
    if distributed.any_across_ranks(not bool(torch.isfinite(loss.detach())), cfg.device):
        return None
    if no_sync is not None and not sync:
        with no_sync():
            scaler.scale(loss / cfg.accum_iter).backward()
    else:
        scaler.scale(loss / cfg.accum_iter).backward()
    return {k: float(out[k].detach()) for k in LOSS_TERMS if k in out}


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    cfg: StepConfig) -> float:
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.clip_grad:
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
    else:
        norm = utils.grad_norm(params)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _skip_step(optimizer: torch.optim.Optimizer, state: TrainState, cfg: StepConfig, epoch: int,
               step: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    state.bad_streak += 1
    state.skipped_steps += 1
    print(f"WARNING: non-finite loss at epoch {epoch} step {step}; step skipped on every rank "
          f"({state.bad_streak} in a row)", flush=True)
    if state.bad_streak >= cfg.max_bad_steps:
        raise NonFiniteLossError(
            f"{state.bad_streak} non-finite losses in a row (epoch {epoch}, step {step}); stopping. The last "
            "good checkpoint is kept; lower --lr, set --clip_grad, or try --precision fp32, then --resume it.")


def is_finite_summary(summary: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in summary.values())
