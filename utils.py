"""Run-time plumbing shared by every entry point: distributed set-up, collectives, schedules, precision,
optimizer parameter groups, metric logging. Nothing here knows about models or data formats."""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections import defaultdict, deque
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------- distributed


def init_distributed(args: Any) -> None:
    """Set args.rank/world_size/gpu/distributed from torchrun (env://) or SLURM variables.

    torchrun exports RANK/WORLD_SIZE/LOCAL_RANK; under `srun` we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and
    need MASTER_ADDR/MASTER_PORT from the environment (the launch script exports them). NCCL on CUDA, gloo on CPU.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        args.rank, args.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        args.rank, args.world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        args.gpu = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise RuntimeError("SLURM run without MASTER_ADDR: export it (e.g. the first host of the job) first")
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(args.rank), str(args.world_size), str(args.gpu)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        return
    args.distributed = args.world_size > 1
    if not args.distributed:
        return
    use_cuda = str(getattr(args, "device", "cuda")).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    _silence_non_main(args.rank == 0)


def _silence_non_main(is_main: bool) -> None:
    """Only rank 0 prints; `print(..., force=True)` still prints everywhere (errors must be seen)."""
    import builtins
    builtin_print = builtins.print

    def print_main(*a: Any, **kw: Any) -> None:
        if kw.pop("force", False) or is_main:
            builtin_print(*a, **kw)

    builtins.print = print_main


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [world*b, ...] in rank order, with gradient flowing back to every rank's input."""
    if get_world_size() == 1:
        return x
    # the functional collective that torch 2.14 recommends over torch.distributed.nn.functional.all_gather;
    # its backward reduce-scatters the gradient back to the rank that owns each slice
    from torch.distributed._functional_collectives import all_gather_tensor_autograd
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def all_reduce_sum(value: float | int, device: torch.device | str = "cpu") -> float:
    """Sum a Python number over ranks (counts such as skipped videos)."""
    if get_world_size() == 1:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_across_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when any rank says True: every rank must agree to skip a step, or DDP deadlocks."""
    return all_reduce_sum(1.0 if flag else 0.0, device) > 0


# ----------------------------------------------------------------------------------------------- schedules


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: float = 0, start_warmup_value: float = 0.0,
                     warmup_steps: int = -1) -> np.ndarray:
    """Per-iteration values: linear warm-up to base_value, then cosine to final_value. Length epochs*niter."""
    total = int(epochs * niter_per_ep)
    warmup_iters = warmup_steps if warmup_steps > 0 else int(warmup_epochs * niter_per_ep)
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False)
    rest = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * rest / max(len(rest), 1)))
    return np.concatenate([warmup, cosine])


def scaled_lr(base_lr: float, batch_size: int, world_size: int, accum_iter: int = 1) -> float:
    """The MAE/VideoMAE linear scaling rule: lr = base_lr * global batch / 256."""
    return base_lr * batch_size * world_size * accum_iter / 256


def training_schedules(args: Any, samples_per_rank: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The run scripts' shared schedule set-up: sets args.abs_lr / abs_min_lr / abs_warmup_lr (scaled by the
    global batch) and returns (optimizer steps per epoch, per-step lr schedule, per-step weight-decay schedule)."""
    for name in ("lr", "min_lr", "warmup_lr"):
        setattr(args, f"abs_{name}", scaled_lr(getattr(args, name), args.batch_size, args.world_size, args.accum_iter))
    steps_per_epoch = samples_per_rank // args.batch_size // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {args.batch_size} x --accum_iter {args.accum_iter} exceeds the "
                         f"{samples_per_rank} samples each process sees per epoch")
    lr = cosine_scheduler(args.abs_lr, args.abs_min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                          args.abs_warmup_lr, args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    return steps_per_epoch, lr, cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)


# ----------------------------------------------------------------------------------------------- precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware runs it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native_bf16 else torch.float32
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; choose from auto, fp32, bf16, fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    return dtypes[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast context that is a no-op for fp32."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def make_grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; bf16/fp32 do not (a disabled scaler keeps the loop uniform)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# ----------------------------------------------------------------------------------------------- optimizer


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: Iterable[str] = (),
                 layer_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: no decay on 1-D tensors (norms, biases) and the named tokens, as the release did.

    layer_scale maps a parameter name to an lr multiplier (layer-wise decay); each group carries `lr_scale`.
    """
    no_decay = set(no_decay_names)
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in no_decay or name in no_decay
        scale = (layer_scale or {}).get(name, 1.0)
        key = (skip, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if skip else weight_decay, "lr_scale": scale,
                           "apply_wd": not skip, "names": []}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this iteration's lr (times each group's lr_scale) and weight decay (groups with decay only)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


# ----------------------------------------------------------------------------------------------- logging


class SmoothedValue:
    """A window median/average plus the global average of a scalar series."""

    def __init__(self, window: int = 20) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """Accumulates per-step scalars and prints a progress line with rate and ETA every `print_freq` steps."""

    def __init__(self, print_freq: int = 10) -> None:
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.print_freq = print_freq

    def update(self, **values: float) -> None:
        for k, v in values.items():
            if v is not None and math.isfinite(float(v)):
                self.meters[k].update(float(v))

    def summary(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def log_every(self, iterable: Iterable, total: int, header: str, start: int = 0,
                  items_per_step: int = 1, unit: str = "it") -> Iterator:
        """Yield from iterable; after every print_freq items print step/total, meters, rate and ETA.

        The rate is items_per_step x steps per second, labelled `unit`/s (pass the batch size and "clips")."""
        t0 = time.time()
        done = 0
        for i, obj in enumerate(iterable, start=start):
            yield obj
            done += 1
            if (i + 1) % self.print_freq == 0 or i + 1 == total:
                elapsed = time.time() - t0
                per_step = elapsed / done
                eta = datetime.timedelta(seconds=int(per_step * (total - i - 1)))
                meters = "  ".join(f"{k} {m.avg:.4g}" for k, m in self.meters.items())
                print(f"{header} [{i + 1}/{total}] eta {eta}  {meters}  "
                      f"{items_per_step / per_step:.2f} {unit}/s", flush=True)


class TensorboardLogger:
    """tensorboardX scalars, written by rank 0 only (None writer elsewhere)."""

    def __init__(self, log_dir: str | None) -> None:
        self.writer = None
        if log_dir and is_main_process():
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=log_dir)

    def scalars(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()


def append_json_line(path: str, record: dict) -> None:
    """log.txt: one JSON object per epoch, appended (rank 0 only)."""
    if is_main_process():
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def save_args_json(args: Any, output_dir: str) -> None:
    if is_main_process():
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(plain_args(args), f, indent=2, sort_keys=True)


def plain_args(args: Any) -> dict:
    """argparse.Namespace -> dict of plain JSON-able values (our checkpoints hold no pickled objects)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def set_cpu_threads(num_workers: int) -> int:
    """Give torch the cores the data workers leave free (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - num_workers) if num_workers > 0 else cores
    torch.set_num_threads(threads)
    return threads


class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can begin an epoch part-way, so a mid-epoch resume sees exactly the batches the
    interrupted run had not yet seen (and decodes none of the ones it had)."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_replicas: int, rank: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def set_start(self, start_index: int) -> None:
        """Skip the first `start_index` samples of this rank's share of the next epoch (then reset)."""
        self.start_index = start_index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start_index:]
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start_index
