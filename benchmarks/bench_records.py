"""Memory of a training list at WebVid scale: a list of VideoRecord objects (annotations.read_annotations) vs the
RecordTable the training dataset keeps (annotations.read_record_table).

    .venv/bin/python benchmarks/bench_records.py                  # 500k rows (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_records.py --rows 2500000   # WebVid-2.5M (about 10 minutes, 2.5 GiB)
    .venv/bin/python benchmarks/bench_records.py --anno results_2M_train.csv   # a real annotation file

The CSV is synthetic_dataset.write_webvid_scale_csv (WebVid's columns and row shape, no videos), written to a
temporary folder (--dir) and removed afterwards. Each representation is measured in fresh forked processes, so
neither sees the other's memory:
  build s            reading the file into it (without tracemalloc, which slows allocation)
  held MiB           what it holds once built: tracemalloc's count of every Python and numpy allocation still
                     alive after a second build (so one-off imports and caches are not counted), B/record that
                     divided by the records
  peak MiB           the most tracemalloc saw alive during that build
  worker copies MiB  the private memory (the Private_* fields of /proc/self/smaps_rollup) a forked child gains
                     by reading every record (path, video id, captions) once, as a data-loader worker does over
                     an epoch: pages it writes to (Python writes reference counts into every object it touches)
                     stop being shared with the parent and are copied
  access us          the time per record of that read, in the child
Then the per-record figures are scaled to WebVid-2.5M: held by each rank, copied by each worker, and per 8-GPU
node (8 ranks, each with --workers data-loader workers). A table's worker copies are mostly a fixed few hundred
KB that does not grow with the list, so their scaled figure is an upper bound at small --rows. Figures only:
nothing is asserted.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

# bench_common first: it puts the repository's modules on sys.path
import bench_common  # noqa: F401

import numpy as np  # noqa: E402

import annotations  # noqa: E402
import synthetic_dataset  # noqa: E402
import utils  # noqa: E402

WEBVID_RECORDS = 2_500_000
RANKS_PER_NODE = 8
MIB, GIB = 2 ** 20, 2 ** 30
REPRESENTATIONS = {"list of VideoRecord": annotations.read_annotations, "RecordTable": annotations.read_record_table}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def private_bytes() -> int:
    """This process's unshared memory: the Private_* fields (clean, dirty, huge pages) of smaps_rollup."""
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Private_"))


def in_forked_child(work: Callable[[], dict]) -> dict:
    """work() run in a forked child; its dict comes back as JSON through a pipe (an error is raised here)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            answer: dict[str, Any] = work()
        except BaseException as e:  # noqa: BLE001 - handed to the parent
            answer = {"error": f"{type(e).__name__}: {e}"}
        with os.fdopen(write_end, "w") as f:
            json.dump(answer, f)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    os.waitpid(pid, 0)
    answer = json.loads(text) if text else {"error": "the child died without an answer"}
    if "error" in answer:
        raise RuntimeError(f"forked measurement failed: {answer['error']}")
    return answer


def read_every_record(records: Any) -> None:
    """What a loader worker does with the list over an epoch: every record's path, video id and captions."""
    if isinstance(records, annotations.RecordTable):
        for i in range(len(records)):
            (records.path(i), records.video_id(i), *records.captions(i))
    else:
        for r in records:
            (r.path, r.video_id, *r.captions)


def worker_copies(records: Any) -> dict:
    before = private_bytes()
    start = time.perf_counter()
    read_every_record(records)
    seconds = time.perf_counter() - start
    return {"copied": private_bytes() - before, "access_s": seconds}


def measure(build: Callable, anno: str, data_root: str) -> dict:
    """In one forked child: the build time, a forked worker's copies, then held / peak bytes of a second build
    under tracemalloc (after the first, so one-off imports and caches are not counted as the list's)."""
    def work() -> dict:
        gc.collect()
        start = time.perf_counter()
        records = build(anno, data_root)
        figures = {"records": len(records), "build_s": time.perf_counter() - start,
                   **in_forked_child(lambda: worker_copies(records))}
        del records
        gc.collect()
        tracemalloc.start()
        records = build(anno, data_root)
        figures["held"], figures["peak"] = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return figures

    return in_forked_child(work)


def print_figures(results: dict[str, dict], workers: int) -> None:
    header = (f"{'representation':<22}{'records':>10}{'build s':>9}{'held MiB':>10}{'B/record':>9}{'peak MiB':>10}"
              f"{'worker copies MiB':>19}{'B/record':>9}{'access us':>11}")
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        n = r["records"]
        print(f"{name:<22}{n:>10,}{r['build_s']:>9.1f}{r['held'] / MIB:>10.1f}{r['held'] / n:>9.0f}"
              f"{r['peak'] / MIB:>10.1f}{r['copied'] / MIB:>19.1f}{r['copied'] / n:>9.0f}"
              f"{r['access_s'] / n * 1e6:>11.2f}")
    print(f"\nAt WebVid-2.5M ({WEBVID_RECORDS:,} records; the per-record figures above scaled):")
    node = f"per 8-GPU node ({RANKS_PER_NODE} ranks x (1 + {workers} workers))"
    header = f"{'representation':<22}{'held per rank GiB':>19}{'copied per worker GiB':>23}  {node}"
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        held = r["held"] / r["records"] * WEBVID_RECORDS
        copied = r["copied"] / r["records"] * WEBVID_RECORDS
        print(f"{name:<22}{held / GIB:>19.2f}{copied / GIB:>23.2f}  "
              f"{RANKS_PER_NODE * (held + workers * copied) / GIB:.1f} GiB")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--rows", type=int, default=500_000, help="rows of the synthetic WebVid-style CSV")
    p.add_argument("--anno", default=None, help="measure this annotation file instead of a synthetic CSV (default: a synthetic CSV of --rows rows)")
    p.add_argument("--data_root", default="/data/webvid/videos",
                   help="joined to the video paths (nothing is opened; it only sets the paths' length)")
    p.add_argument("--workers", type=int, default=4,
                   help="data-loader workers per rank for the per-node figure (--num_workers of the run scripts)")
    p.add_argument("--dir", default=None, help="folder for the temporary CSV (default: the system's temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic CSV (default: 0)")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, dict]:
    args = get_args(argv)
    if not os.path.exists("/proc/self/smaps_rollup"):
        sys.exit("bench_records.py needs Linux's /proc/self/smaps_rollup to measure a forked worker's copies")
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} before the run: "
          f"other processes slow the timings), Python {platform.python_version()}, numpy {np.__version__}")
    folder = None
    try:
        if args.anno:
            anno = args.anno
        else:
            folder = tempfile.mkdtemp(prefix="bench_records_", dir=args.dir)
            start = time.perf_counter()
            anno = str(synthetic_dataset.write_webvid_scale_csv(Path(folder) / "webvid.csv", args.rows, args.seed))
            print(f"{args.rows:,} rows of a WebVid-style CSV ({os.path.getsize(anno) / MIB:.0f} MiB), written in "
                  f"{time.perf_counter() - start:.1f} s")
        print(f"annotation file {anno}, data root {args.data_root}\n", flush=True)
        results = {name: measure(build, anno, args.data_root) for name, build in REPRESENTATIONS.items()}
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    print_figures(results, args.workers)
    return results


if __name__ == "__main__":
    main()
