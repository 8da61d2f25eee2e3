"""Text-to-video search: indexing throughput and query latency over a large index, on this machine.

    python benchmarks/bench_search.py                       # tiny and base, 64 synthetic test videos, 10k rows
    python benchmarks/bench_search.py --videos DIR --models base --rows 100000
    python benchmarks/bench_search.py --quick --videos DIR  # smallest settings (the test runs this)

Per model (randomly initialised weights: speed does not depend on training):
- indexing: `search.py index`'s own code on the folder (decode, thumbnail strip, every view embedded), videos/s;
- a large index: the folder's entries repeated to --rows rows (each row its video's embedding plus noise,
  renormalised), written in the index format;
- query latency over it: Searcher.search in this process (text encoding, then similarity and top-k, timed apart),
  and the HTTP round trip to a real `search.py serve` process. Medians and 90th percentiles over --queries
  distinct captions, after two warm-up queries.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

# bench_common first: it puts the repository's modules on sys.path
import bench_common

import torch  # noqa: E402

import checkpoint  # noqa: E402
import model_registry  # noqa: E402
import search  # noqa: E402

MODELS = {"tiny": ("simvtp_dual_tiny_patch16", 8, 112), "base": ("simvtp_dual_base_patch16", 16, 224)}
SUBJECTS = ["a red ball", "a small gray box", "a large blue triangle", "a green square", "a tiny yellow circle"]
MOTIONS = ["slides left", "moves up", "grows", "shrinks", "travels to the right", "falls down"]


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", default=os.path.join(bench_common.REPO, "data", "synthetic", "test"),
                   help="folder of videos to index (default: the synthetic test split; build it with "
                   "synthetic_dataset.py)")
    p.add_argument("--models", nargs="+", default=["tiny", "base"], choices=sorted(MODELS), help="models to time")
    p.add_argument("--rows", type=int, default=10_000, help="rows of the large index queries are timed on")
    p.add_argument("--queries", type=int, default=20, help="timed queries per model")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="autocast precision")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny only, 300 rows, 3 queries")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rows, args.queries = ["tiny"], 300, 3
    return args


def queries(n: int) -> list[str]:
    return [f"{s} {m}" for m in MOTIONS for s in SUBJECTS][:n]


def random_checkpoint(folder: str, key: str) -> str:
    name, frames, side = MODELS[key]
    model = model_registry.create(name, num_frames=frames, img_size=side)
    path = os.path.join(folder, f"{key}.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg}, path)
    return path


def time_indexing(video_dir: str, ckpt: str, out: str, precision: str) -> dict:
    args = search.get_args_parser().parse_args(["index", video_dir, "--ckpt", ckpt, "--out", out, "--precision",
                                                precision, "--print_freq", "1000"])
    counts = search.main(args)
    views = counts["manifest"]["clip"]["test_num_segment"] * counts["manifest"]["clip"]["test_num_crop"]
    return {"videos": counts["embedded"], "seconds": counts["seconds"], "views": views,
            "videos_per_s": counts["embedded"] / counts["seconds"]}


def scaled_index(src: str, dst: str, rows: int, seed: int = 0) -> None:
    """The index at src repeated to `rows` entries (new ids, each row its video's embedding plus noise)."""
    manifest = search.read_manifest(src)
    video = search.read_embeddings(src, manifest)
    g = torch.Generator().manual_seed(seed)
    picks = [i % len(video) for i in range(rows)]
    noisy = video[picks] + 0.05 * torch.randn(rows, video.shape[1], generator=g)
    entries = [{**manifest["videos"][i], "id": f"{n:016x}"} for n, i in enumerate(picks)]
    shutil.copytree(os.path.join(src, search.THUMBS), os.path.join(dst, search.THUMBS), dirs_exist_ok=True)
    search.write_index(dst, {**manifest, "videos": entries}, torch.nn.functional.normalize(noisy, dim=-1))


def percentiles(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"median_ms": statistics.median(ordered), "p90_ms": ordered[min(len(ordered) - 1,
                                                                           int(0.9 * len(ordered)))]}


def time_in_process(index_dir: str, texts: list[str]) -> dict:
    searcher = search.Searcher(index_dir)
    for text in texts[:2]:
        searcher.search(text, 12)
    total, encode, rank = [], [], []
    for text in texts:
        t0 = time.perf_counter()
        with searcher.lock:
            query = search.engine.encode_texts(searcher.model, searcher.tokenizer, [text], searcher.cfg)[0]
        t1 = time.perf_counter()
        (searcher.video @ query).topk(12)
        t2 = time.perf_counter()
        searcher.search(text, 12)
        t3 = time.perf_counter()
        encode.append(1000 * (t1 - t0))
        rank.append(1000 * (t2 - t1))
        total.append(1000 * (t3 - t2))
    return {"search": percentiles(total), "text_encoding": percentiles(encode), "ranking": percentiles(rank)}


def time_http(index_dir: str, texts: list[str]) -> dict:
    """Round trips to a real `search.py serve` process on a free port."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, os.path.join(bench_common.REPO, "search.py"), "serve", index_dir, "--port",
                               str(port)], cwd=bench_common.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(base + "/api/info", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("search.py serve did not start")
                time.sleep(0.3)
        ms = []
        for n, text in enumerate(texts[:2] + texts):
            t0 = time.perf_counter()
            body = urllib.request.urlopen(f"{base}/api/search?{urllib.parse.urlencode({'q': text, 'k': 12})}",
                                          timeout=60).read()
            if n >= 2:
                ms.append(1000 * (time.perf_counter() - t0))
            assert len(json.loads(body)["results"]) == 12
        return percentiles(ms)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_model(key: str, args: argparse.Namespace, work: str) -> dict:
    ckpt = random_checkpoint(work, key)
    small, large = os.path.join(work, f"{key}_index"), os.path.join(work, f"{key}_index_{args.rows}")
    indexing = time_indexing(args.videos, ckpt, small, args.precision)
    scaled_index(small, large, args.rows)
    texts = queries(args.queries)
    return {"model": MODELS[key][0], "clip": f"{MODELS[key][1]} x {MODELS[key][2]}", "indexing": indexing,
            "rows": args.rows, "in_process": time_in_process(large, texts), "http": time_http(large, texts)}


def print_results(results: list[dict]) -> None:
    print("\nIndexing (decode + thumbnail + every view embedded):")
    bench_common.print_table(["model", "clip", "views", "videos", "seconds", "videos/s"],
                             [[r["model"], r["clip"], r["indexing"]["views"], r["indexing"]["videos"],
                               f"{r['indexing']['seconds']:.1f}", f"{r['indexing']['videos_per_s']:.1f}"]
                              for r in results])
    print("\nQuery latency, ms, median / p90 (k = 12):")
    bench_common.print_table(["model", "rows", "search (in process)", "text encoding", "similarity + top-k",
                              "HTTP round trip"],
                             [[r["model"], r["rows"]] + [f"{p['median_ms']:.1f} / {p['p90_ms']:.1f}" for p in
                                                         (r["in_process"]["search"], r["in_process"]["text_encoding"],
                                                          r["in_process"]["ranking"], r["http"])]
                              for r in results])


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.videos):
        raise SystemExit(f"--videos {args.videos}: no such folder (build the synthetic set with "
                         "`python synthetic_dataset.py --out data/synthetic`, or point to yours)")
    model_registry.load_family_modules()
    print(f"bench_search: {bench_common.machine()}, {torch.get_num_threads()} torch threads, precision "
          f"{args.precision}, load average {os.getloadavg()[0]:.2f}; videos from {args.videos}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as work:
        results = [run_model(key, args, work) for key in args.models]
    print_results(results)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bench_common.machine(), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
