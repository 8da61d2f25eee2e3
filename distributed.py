"""torch.distributed plumbing: how this process was launched (torchrun, srun, or alone) and what it runs on
(`plan`, a pure decision on the environment, tested on CPU), initialisation (NCCL on CUDA, gloo on CPU), rank
queries, rank 0's decisions shared with every rank, the check that --output_dir is shared storage, and the few
collectives the training loops need (gather with gradient, row gather of variable-length tensors, object gather,
sums)."""
from __future__ import annotations

import datetime
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
INIT_TIMEOUT = datetime.timedelta(minutes=30)  # the first NCCL set-up of 64 GPUs can take minutes
JOB_PORT_BASE, JOB_PORT_SPAN = 10000, 20000  # a job's port: below Linux's ephemeral range (32768+)


class LaunchError(ValueError):
    """A launch that cannot work (missing rendezvous address, a batch script without srun, a GPU count that does
    not fit): one line saying what to do."""


@dataclass(frozen=True)
class Plan:
    """How this process runs: who started it, its rank among how many, its device and the backend between them."""
    launcher: str                # "single", "torchrun" (RANK/WORLD_SIZE in the environment) or "srun"
    rank: int
    world_size: int
    local_rank: int
    device: str                  # "cpu", "cuda", "cuda:3"
    backend: str | None = None   # "nccl" on CUDA, "gloo" on CPU, None for a single process
    master_addr: str | None = None
    master_port: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def plan(device_arg: str, env: Mapping[str, str], cuda_count: int) -> Plan:
    """The launch decision from --device, the environment and the number of visible GPUs, with no side effect.

    torchrun (or any env:// launcher) exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under srun we
    read SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID; MASTER_ADDR is the first host of the step's node list
    and MASTER_PORT derives from the job id unless they are exported. A SLURM batch script with several tasks that
    starts python without srun is refused (only one process would run; the others would never join). The device
    is resolved first: --device auto is CUDA when a GPU is visible, and CUDA means NCCL, CPU gloo."""
    launcher, rank, world, local_rank = _processes(env)
    device = choose_device(device_arg, cuda_count, local_rank, launcher if world > 1 else "single")
    if world == 1:
        return Plan("single", 0, 1, 0, device)
    if launcher == "srun":
        addr, port = env.get("MASTER_ADDR") or _first_slurm_host(env), env.get("MASTER_PORT") or str(
            port_for_job(_slurm_job_id(env)))
    else:
        addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if not addr or not port:
            raise LaunchError("RANK and WORLD_SIZE are set but MASTER_ADDR / MASTER_PORT are not: start the run "
                              "with torchrun (python -m torch.distributed.run), or export both")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    return Plan(launcher, rank, world, local_rank, device, backend, addr, port)


def _processes(env: Mapping[str, str]) -> tuple[str, int, int, int]:
    """(launcher, rank, world size, local rank) from the environment."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if _slurm_job_id(env) is None or tasks <= 1:
        return "single", 0, 1, 0
    if not _in_slurm_step(env):
        raise LaunchError(
            f"this is the batch script of SLURM job {_slurm_job_id(env)} with {tasks} tasks, but python was started "
            f"without srun: only this process would run and wait for {tasks - 1} that never start. Launch it with "
            "`srun python ...` (see scripts/slurm_pretrain.sbatch), or `srun --ntasks 1 python ...` for one process")
    return "srun", int(env.get("SLURM_PROCID", 0)), tasks, int(env.get("SLURM_LOCALID", 0))


def _slurm_job_id(env: Mapping[str, str]) -> str | None:
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """srun's tasks carry a step id; the batch script itself has none (or, in some versions, the batch step's
    reserved id near 2**32)."""
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    return step is not None and step.strip().isdigit() and int(step) < 0xFFFFFFF0


def choose_device(device_arg: str, cuda_count: int, local_rank: int = 0, launcher: str = "single") -> str:
    """--device -> this process's device name. With several processes each takes its own GPU: the local rank
    under torchrun (which binds nothing), the local rank modulo the visible GPUs under srun (SLURM may give each
    task just its own GPU, then visible as cuda:0)."""
    name = device_arg
    if device_arg == "auto":
        name = "cuda" if cuda_count > 0 else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {device_arg}: not a device name (auto, cpu, cuda, cuda:N)") from e
    if device.type != "cuda":
        return str(device)
    if cuda_count == 0:
        raise ValueError(f"--device {device_arg}: CUDA is not available on this machine; use --device cpu (or auto)")
    if device.index is not None and device.index >= cuda_count:
        raise ValueError(f"--device {device_arg}: this machine shows {cuda_count} GPU(s) (cuda:0 .. "
                         f"cuda:{cuda_count - 1})")
    if launcher == "single":
        return str(device)
    if device.index is not None:
        raise ValueError(f"--device {device_arg}: names one GPU, but each process of a multi-process run takes its "
                         "own (its local rank's); pass --device cuda (or auto)")
    if launcher == "torchrun" and local_rank >= cuda_count:
        raise LaunchError(f"local rank {local_rank} but {cuda_count} GPU(s) visible on this node: start at most "
                          f"{cuda_count} processes per node (torchrun --nproc_per_node)")
    return f"cuda:{local_rank % cuda_count}"


def port_for_job(job_id: str | None, default: int = 29500) -> int:
    """A rendezvous port from a scheduler's job id (the same on every node, different for two jobs sharing a
    node); `default` without one. scripts/launcher.sh computes the same number."""
    digits = re.sub(r"\D", "", job_id or "")
    return JOB_PORT_BASE + int(digits) % JOB_PORT_SPAN if digits else default


def _first_slurm_host(env: Mapping[str, str]) -> str:
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(key):
            return expand_nodelist(env[key], key)[0]
    raise LaunchError("srun without MASTER_ADDR and without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: export "
                      "MASTER_ADDR=<the first node's host name>")


def expand_nodelist(nodelist: str, source: str = "node list") -> list[str]:
    """SLURM's compressed host list -> host names, without scontrol: "node[01-03,07],gpu-a1" -> node01 node02
    node03 node07 gpu-a1 (ranges keep their zero padding; several bracket groups in one name multiply)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip(), source):
        hosts += _expand_host(item, source)
    if not hosts:
        raise LaunchError(f"{source} {nodelist!r}: no host in it")
    return hosts


def _split_top_level(text: str, source: str) -> list[str]:
    """Split on the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise LaunchError(f"{source} {text!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"{source} {text!r}: unbalanced brackets")
    return [p for p in parts + [text[start:]] if p]


def _expand_host(pattern: str, source: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", pattern)
    if m is None:
        return [pattern]
    head, ranges, tail = m.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise LaunchError(f"{source} {pattern!r}: {part!r} is not a number or a range a-b")
        for n in range(int(lo), int(hi or lo) + 1):
            out += [f"{head}{n:0{len(lo)}d}{rest}" for rest in _expand_host(tail, source)]
    return out


def init_distributed(args: Any) -> Plan:
    """Set args.rank/world_size/gpu/distributed/device_obj from the launch plan and join the process group.

    The device is resolved before anything else: under CUDA each process sets its own GPU first and names it as
    `device_id`, so NCCL (never gloo) carries the gradient all-reduce and the feature gathers, and no process
    opens a context on another's GPU."""
    p = plan(str(getattr(args, "device", "auto")), os.environ, torch.cuda.device_count())
    device = torch.device(p.device)
    args.rank, args.world_size, args.distributed, args.device_obj = p.rank, p.world_size, p.distributed, device
    args.gpu = device.index if device.type == "cuda" and device.index is not None else p.local_rank
    if not p.distributed:
        return p
    os.environ.update(RANK=str(p.rank), WORLD_SIZE=str(p.world_size), LOCAL_RANK=str(p.local_rank),
                      MASTER_ADDR=str(p.master_addr), MASTER_PORT=str(p.master_port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=p.backend, init_method="env://", world_size=p.world_size, rank=p.rank,
                            timeout=INIT_TIMEOUT, device_id=device if device.type == "cuda" else None)
    dist.barrier()
    _silence_non_main(p.rank == 0)
    print(f"Distributed: {p.world_size} processes started by {p.launcher}, backend {p.backend}, rank 0 on "
          f"{p.device}, rendezvous {p.master_addr}:{p.master_port}")
    return p


def shutdown() -> None:
    """Leave the process group at exit (also after an error), so NCCL's communicators are released."""
    if is_dist():
        dist.destroy_process_group()


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


def main_value(compute: Callable[[], T]) -> T:
    """`compute()` as rank 0 sees it, on every rank. Decisions read from the file system (which checkpoint to
    resume, the best score so far, whether a file exists) must be the same everywhere, or the ranks' collectives
    stop matching and the run hangs; another node's view may lag behind (NFS attribute caching). An error raised
    by `compute` on rank 0 is raised on every rank."""
    if get_world_size() == 1:
        return compute()
    box: list = [None]
    if is_main_process():
        try:
            box = [(True, compute())]
        except Exception as err:  # every rank raises it, instead of waiting for rank 0 forever
            box = [(False, err)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


SHARED_CHECK = ".shared-check-"  # prefix of the token file rank 0 writes into --output_dir at start-up


def check_shared_dir(path: str, flag: str = "--output_dir") -> None:
    """Every rank must see what rank 0 writes in `path` (checkpoints, `latest`, eval_state.json): rank 0 writes a
    file of a new name there, every rank looks for it. A folder local to each node is a ValueError on every rank,
    naming the folder and the ranks (and hosts) that do not see the file."""
    if get_world_size() == 1:
        return
    name = main_value(lambda: f"{SHARED_CHECK}{secrets.token_hex(8)}")
    token = os.path.join(path, name)
    if is_main_process():
        with open(token, "w") as f:
            f.write(name + "\n")
    barrier()
    seen = os.path.isfile(token)  # a new name: no negative lookup cache can hide it
    if not seen:
        time.sleep(2.0)
        seen = name in os.listdir(path)
    views = gather_objects((seen, socket.gethostname(), os.path.abspath(path)))
    if is_main_process():
        os.remove(token)
    if all(ok for ok, _, _ in views):
        return
    blind = [f"rank {r} on {host}" + (f" (its {flag} {folder})" if folder != views[0][2] else "")
             for r, (ok, host, folder) in enumerate(views) if not ok]
    raise ValueError(f"{flag} {views[0][2]}: not shared by all processes: {', '.join(blind[:4])}"
                     f"{f' and {len(blind) - 4} more' if len(blind) > 4 else ''} cannot see the file rank 0 "
                     f"({views[0][1]}) wrote there; {flag} must be one folder every node sees (shared storage such "
                     "as NFS or Lustre), since rank 0 writes the checkpoints every rank resumes from")


def broadcast_module(module: torch.nn.Module) -> None:
    """Every rank's `module` takes rank 0's parameters and buffers (e.g. the best weights only rank 0 read)."""
    if get_world_size() == 1:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


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
