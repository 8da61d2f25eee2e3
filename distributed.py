"""torch.distributed plumbing: initialisation from torchrun / SLURM variables (NCCL on CUDA, gloo on CPU), rank
queries, and the few collectives the training loops need (gather with gradient, row gather of variable-length
tensors, object gather, sums)."""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


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


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node), else 1: they
    share the machine's memory and /dev/shm."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]  # SLURM may write "8(x2)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [world*b, ...] in rank order, with gradient flowing back to every rank's input."""
    if get_world_size() == 1:
        return x
    # torch 2.14's functional collective (its older names, torch.distributed.nn.functional.all_gather and
    # all_gather_tensor_autograd, warn that they are deprecated); the backward reduce-scatters each slice's
    # gradient back to the rank that owns it
    from torch.distributed._functional_collectives import all_gather_single_autograd
    return all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[n_r, ...] on each rank (n_r may differ, 0 too) -> [sum n_r, ...] in rank order, with tensor collectives.

    Unlike gather_objects, nothing is pickled: a view (a row of a larger batch) would pickle its whole storage.
    One all_gather of the ranks' shapes, then one all_gather of each rank's rows copied into a contiguous buffer
    padded to the largest rank's row count, trimmed after. The dtype must agree on all ranks; a rank with no rows
    may give any trailing shape (e.g. torch.zeros(0, 0)). Runs on CUDA under NCCL, else on the CPU; the result
    is on x's device.
    """
    if get_world_size() == 1:
        return x
    comm = _collective_device()
    shapes = _gather_shapes(x, comm)
    rows = [int(s[0]) for s in shapes]
    filled = [tuple(int(d) for d in s[1:]) for s, n in zip(shapes, rows) if n > 0]
    if not filled:
        return x[:0]
    trailing = filled[0]
    if any(t != trailing for t in filled):
        raise ValueError(f"gather_rows: ranks hold rows of different shapes {sorted(set(filled))}")
    buffer = torch.zeros((max(rows), *trailing), dtype=x.dtype, device=comm)
    if x.shape[0]:
        buffer[:x.shape[0]] = x
    parts = [torch.empty_like(buffer) for _ in rows]
    dist.all_gather(parts, buffer)
    return torch.cat([part[:n] for part, n in zip(parts, rows)]).to(x.device)


def _gather_shapes(x: torch.Tensor, comm: torch.device) -> list[torch.Tensor]:
    """Every rank's x.shape (all ranks must give tensors of the same number of dimensions)."""
    shape = torch.tensor(x.shape, dtype=torch.long, device=comm)
    shapes = [torch.empty_like(shape) for _ in range(get_world_size())]
    dist.all_gather(shapes, shape)
    return [s.cpu() for s in shapes]


def _collective_device() -> torch.device:
    """Where tensor collectives run: NCCL needs the rank's CUDA device, gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: object) -> list:
    """Every rank's picklable object, in rank order (small things: scores, file names, generator states).

    Tensors go through gather_rows: a pickled tensor view carries its whole underlying storage."""
    if get_world_size() == 1:
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """A small tensor of counts/flags summed over ranks in one collective (the loop's one sync per step)."""
    if get_world_size() > 1:
        dist.all_reduce(values)
    return values
