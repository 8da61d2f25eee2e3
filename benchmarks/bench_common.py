"""What the benchmarks share: the repository's modules on sys.path (every benchmark imports this module first), a
job in a fresh interpreter (so its peak RSS is its own), a plain-text table, timing and the machine's name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent  # the repository: its flat modules are what the benchmarks measure
if str(REPO) not in sys.path:  # first, ahead of site-packages: our datasets.py, not Hugging Face's `datasets`
    sys.path.insert(0, str(REPO))

RELEASE_COMMIT = "4b54321"  # github:wufeim/SimVTP, "release code"
SVITT_RELEASE_COMMIT = "c8806b3"  # github:JerryYLi/svitt, "Initial commit"
SVITT_RELEASE_FILES = ("models/sparse_xbeit.py", "models/sparse_config.py",
                       "configs/beit-base-patch16-224-pt22k-ft22k.json")


def release_first_path(src: str) -> list[str]:
    """sys.path for running a release's own code: its checkout first, without this folder or the repository (our
    modules must not shadow the release's)."""
    ours = {str(HERE), str(REPO)}
    return [os.path.abspath(src)] + [p for p in sys.path if os.path.abspath(p or ".") not in ours]


def run_job_in_subprocess(script: str, job: dict, out_path: str, name: str, env: dict | None = None,
                          python: str | None = None, args: tuple[str, ...] = ()) -> dict:
    """Run `script [args] --job JSON --job_out out_path` in a new interpreter (ours, or `python`: a release's own
    environment; its progress lines go straight to our stdout) and return the JSON it wrote; a failed job is a
    RuntimeError naming it."""
    sys.stdout.flush()
    proc = subprocess.run([python or sys.executable, script, *args, "--job", json.dumps(job), "--job_out", out_path],
                          env=env)
    try:
        with open(out_path) as f:
            result = json.load(f) if proc.returncode == 0 else None
    except FileNotFoundError:
        result = None
    if result is None:
        raise RuntimeError(f"benchmark job {name} failed (exit {proc.returncode})")
    return result


def print_table(header: list[str], rows: list[list[str]], left: int = 1) -> None:
    """Rows under a header; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(header))
    print("-" * len(line(header)))
    for r in rows:
        print(line(r))


def require_release_checkout(src: str) -> None:
    """A --release_src that is not a checkout of the SimVTP release stops the benchmark with a one-line reason."""
    if not os.path.exists(os.path.join(src, "modeling_pretrain.py")):
        raise SystemExit(f"--release_src {src}: no modeling_pretrain.py there; point it to a checkout of "
                         f"github:wufeim/SimVTP (commit {RELEASE_COMMIT})")


def require_svitt_release_checkout(src: str) -> None:
    """A --release_src that is not a checkout of the SViTT release stops the benchmark with a one-line reason."""
    missing = [f for f in SVITT_RELEASE_FILES if not os.path.exists(os.path.join(src, f))]
    if missing:
        raise SystemExit(f"--release_src {src}: no {', '.join(missing)} there; point it to a checkout of "
                         f"github:JerryYLi/svitt (commit {SVITT_RELEASE_COMMIT})")


def machine() -> str:
    """The CPU's model name and core count, as every speed figure must name its machine."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def time_calls(call: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """One warm-up call (kernel creation, the allocator's first growth), then `repeats` timed calls: their seconds
    by time.perf_counter (CPU ops are synchronous). Both SViTT towers are timed by this one function."""
    def timed() -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0
    warmup = timed()
    return warmup, [timed() for _ in range(repeats)]
