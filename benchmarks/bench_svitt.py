"""Speed and memory of the SViTT vision tower (modeling_svitt.SViTTVisionTower, base config: width 768, 12 layers,
224 px, batch 2) on CPU: dense vs edge-sparse vs edge + node sparse attention, fp32 and bf16, forward and
forward + backward, and the per-token memory growth of one attention layer.

    .venv/bin/python benchmarks/bench_svitt.py                                   # everything (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_svitt.py --frames 8 --precision fp32 --passes fwd     # the target row
    .venv/bin/python benchmarks/bench_svitt.py --frames 4 --precision fp32 --passes fwd --repeats 1 --no_attn_memory
    .venv/bin/python benchmarks/bench_svitt.py --frames 8 --precision fp32 --passes fwd --no_attn_memory \
        --release_src ../svitt                             # the target row, and the release's tower in the same run

Variants: dense = sparse_local_attn 0 (full attention, the tower's reference path: one SDPA call per layer with
the [1, H, L-1, L] bias as its mask, [CLS]'s row apart); edge = a local window of 1 block plus 3 random blocks of 56
tokens (keep rate 1); edge+node = edge plus [CLS]-attention token pruning after layers 3, 6, 9 (0-based) with the
paper's keep rates 0.7 at 4 frames, 0.6 at 8, 0.5 at 16 (0.7 and 0.6 are also what the release anchor in the
project's reference notes was measured with; 0.5 at 16 is the paper's). The random blocks are
drawn from a generator seeded the same way in every run, once per forward and token count.

How each figure is obtained
- Every (frames, precision, pass, variant) runs in a fresh interpreter, so its peak RSS (getrusage ru_maxrss, read
  right after the timed runs, before the FLOP count) is its own: weights (~350 MB fp32), torch itself, the input
  and the run's activations; for forward + backward the autograd graph's saved tensors and the gradients.
- Seconds: one untimed warm-up call (oneDNN kernel creation, the allocator's first growth), then the median of
  --repeats timed calls (time.perf_counter(); CPU ops are synchronous). Forward runs in eval mode under
  torch.no_grad(); forward + backward runs in train mode (drop path 0) and back-propagates the mean square of the
  pooled feature plus the [CLS] token. bf16 = torch.autocast("cpu", bfloat16) around the forward (weights fp32).
- Ratio: our dense time over this variant's time, same frames, precision and pass, same run.
- GFLOP: torch.utils.flop_counter.FlopCounterMode over one extra call. It counts matmuls, the patch convolution and
  scaled_dot_product_attention (the CPU flash kernel, added here with torch's own SDPA formula, as torch's table
  has no entry for it). For the sparse variants the attention FLOPs are those of the gathered layout: each query
  block against its 1 + K*56 gathered keys ([CLS] + K blocks, masked keys included), not only allowed pairs.
  Element-wise work, softmax, norms and gathers are not counted.
- Dense forward + backward at 16 frames is skipped unless --dense_16_backward: the saved attention probabilities
  alone would take about 12 layers x 2 x 12 heads x 3137^2 x 4 bytes x 2 = 22.7 GB on a 23 GB machine.
- Attention memory (--attn_memory_frames): one attention layer (SViTTAttention, random bias table) forward under
  no_grad on x [2, 1 + T*196, 768], dense vs sparse (local 1 + 3 random blocks of 56), each in a fresh
  interpreter with no warm-up (a warm-up would set the peak): the process builds the layer and the input, reads
  its current RSS (/proc/self/statm), runs one forward and reads ru_maxrss; the growth is the difference, i.e. the
  call's transient working set (q, k, v, output and the cached bias rows for sparse, plus its gathered keys,
  values and bias one chunk of query blocks at a time; the [1, H, L-1, L] bias and SDPA's working set for dense)
  plus one-off buffers of the first call. Reported per token (growth / L) and per added token between successive
  frame counts: flat for sparse (memory linear in the tokens), rising for dense (quadratic). The analytic size of
  the sparse tensors that grow with L is printed next to it as a cross-check (about 25 KiB per token).

Targets (printed with PASS/MISS): base, batch 2, fp32, forward, 8 frames, edge+node (local 1, random 3, block 56,
keep 0.6 after layers 3 6 9): at most 1.35 s and at least 3x faster than our dense in the same run. Other
processes on the same cores slow every figure: the load average is printed before and after.

The release in the same run (--release_src DIR, a checkout of github:JerryYLi/svitt, commit c8806b3): every timed
row (frames, precision, pass, variant) is also run with the release's own vision tower, its
models/sparse_xbeit.BeitModel imported unchanged from DIR, right after ours, timed the same way (threads, input,
seeds, warm-up, median, no_grad / train mode, bf16 autocast, loss), and a table gives the release's seconds,
ours and the ratio. Its variants are its own settings of the same sparsity: dense = sparse_random_attn None (its
full attention), edge = local 1 + random 3 blocks of 56, edge+node adds the same keep rates after layers 3 6 9.
The release needs transformers <= 4.55, so it runs in an environment of its own outside this repository (the
interpreter --release_python, default /tmp/svitt_env/bin/python), built once with

    python3.11 -m venv /tmp/svitt_env
    /tmp/svitt_env/bin/pip install torch==2.14.1 'transformers==4.55.*' einops

How the release's tower is built, and the one in-memory adjustment it needs here: benchmarks/release_svitt.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

# bench_common first: it puts the repository's modules on sys.path
from bench_common import (SVITT_RELEASE_COMMIT, machine, print_table, require_svitt_release_checkout,
                          run_job_in_subprocess, time_calls)
import utils

KEEP_RATE = {4: 0.7, 8: 0.6, 16: 0.5}  # the paper's keep rates per frame count
DROP_LOC = (3, 6, 9)
BATCH, BLOCK, LOCAL, RANDOM = 2, 56, 1, 3
VARIANTS = ("dense", "edge", "edge+node")
PASSES = ("fwd", "fwd+bwd")
PRECISIONS = ("fp32", "bf16")
TARGET = dict(frames=8, precision="fp32", passes="fwd", variant="edge+node", max_s=1.35, min_ratio=3.0)
RELEASE_PYTHON = "/tmp/svitt_env/bin/python"
RELEASE_ENV = "python3.11 -m venv /tmp/svitt_env && /tmp/svitt_env/bin/pip install torch==2.14.1 " \
              "'transformers==4.55.*' einops"
RELEASE_SCRIPT = Path(__file__).with_name("release_svitt.py")


def variant_config(variant: str, frames: int) -> dict:
    """The tower's config overrides for one variant at one frame count."""
    if variant == "dense":
        return dict(num_frames=frames, sparse_local_attn=0)
    cfg = dict(num_frames=frames, sparse_local_attn=LOCAL, sparse_random_attn=RANDOM, attn_block_size=BLOCK)
    if variant == "edge+node":
        cfg.update(token_keep_rate=KEEP_RATE.get(frames, 0.6), token_drop_loc=DROP_LOC)
    return cfg


def release_encoder_args(variant: str, frames: int) -> dict:
    """The release's `vision_encoder_args` for one variant: its own names, with dense = no random blocks (its
    BeitSelfAttention then takes its full-attention path)."""
    if variant == "dense":
        return dict(sparse_random_attn=None)
    cfg = variant_config(variant, frames)
    del cfg["num_frames"]
    if "token_drop_loc" in cfg:
        cfg["token_drop_loc"] = list(cfg["token_drop_loc"])
    return cfg


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# ----------------------------------------------------------------------------------------------- jobs


def tower_job(job: dict) -> dict:
    """Time one (frames, precision, pass, variant) of the tower; then its peak RSS and FLOPs."""
    import torch
    from torch.utils import flop_counter

    import modeling_svitt as S
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = S.SViTTVisionTower(S.svitt_base_config(**variant_config(job["variant"], job["frames"])))
    video = torch.randn(BATCH, job["frames"], 3, 224, 224, generator=torch.Generator().manual_seed(1))
    dtype = torch.bfloat16 if job["precision"] == "bf16" else torch.float32
    backward = job["passes"] == "fwd+bwd"
    model.train(backward)

    def call() -> None:
        generator = torch.Generator().manual_seed(0)
        if backward:
            model.zero_grad(set_to_none=True)
            with utils.autocast(torch.device("cpu"), dtype):
                out = model(video, generator=generator)
            (out.pooled.float().square().mean() + out.tokens[:, 0].float().square().mean()).backward()
        else:
            with torch.no_grad(), utils.autocast(torch.device("cpu"), dtype):
                model(video, generator=generator)

    warmup, times = time_calls(call, job["repeats"])
    rss = peak_rss_mib()
    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        call()
    by_op = {str(op): n / 1e9 for op, n in counter.get_flop_counts().get("Global", {}).items()}
    attention = sum(v for k, v in by_op.items() if "attention" in k)
    return dict(job, warmup_s=warmup, times_s=times, seconds=statistics.median(times), peak_rss_mib=rss,
                gflop=counter.get_total_flops() / 1e9, attention_gflop=attention, gflop_by_op=by_op,
                torch=torch.__version__, threads=torch.get_num_threads())


def matmul_peak_job(job: dict) -> dict:
    """Best fp32 GFLOP/s of the tower's MLP matmul ([3136, 768] x [768, 3072], batch 2 x 8 frames of tokens)."""
    import torch
    torch.set_num_threads(job["threads"])
    a, w = torch.randn(3136, 768), torch.randn(3072, 768)
    torch.nn.functional.linear(a, w)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
    return dict(job, gflops=2 * 3136 * 768 * 3072 / best / 1e9)


def attention_memory_job(job: dict) -> dict:
    """Peak RSS growth of one attention layer's forward (see the module docstring)."""
    import torch

    import modeling_svitt as S
    import sparse_attention
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    grid = (job["frames"], 14, 14)
    layer = S.SViTTAttention(768, 12, grid).eval()
    torch.nn.init.normal_(layer.attention.relative_position_bias.relative_position_bias_table)
    n = job["frames"] * 196
    x = torch.randn(BATCH, 1 + n, 768)
    coords = sparse_attention.patch_coordinates(*grid).expand(BATCH, -1, -1)
    pattern = None
    if job["variant"] == "sparse":
        pattern = sparse_attention.sample_block_pattern(-(-n // BLOCK), LOCAL, RANDOM, BLOCK,
                                                       torch.Generator().manual_seed(0))
    before_current, before_peak = current_rss_mib(), peak_rss_mib()
    with torch.no_grad():
        layer(x, coords, pattern)
    growth = peak_rss_mib() - max(before_current, 0.0)
    return dict(job, tokens=1 + n, growth_mib=growth, peak_before_mib=before_peak, rss_before_mib=before_current)


def sparse_layout_mib(frames: int) -> float:
    """Analytic size of what grows with the tokens in one sparse layer's forward at batch 2 (fp32): q, k, v and
    the output [2, L, 768], and the cached bias rows [1, nb, 56, 1 + K*56 rounded up to 8] (int32, nb = L / 56).
    The gathered keys, values and bias exist one chunk of query blocks at a time (at most SPARSE_CHUNK_BYTES per
    sample each): constant."""
    tokens, nb, keys = 1 + frames * 196, -(-frames * 196 // BLOCK), -(-(1 + (LOCAL + RANDOM) * BLOCK) // 8) * 8
    return (4 * BATCH * tokens * 768 * 4 + nb * BLOCK * keys * 4) / 2 ** 20


def run_in_subprocess(job: dict, folder: str, index: int) -> dict:
    return run_job_in_subprocess(os.path.abspath(__file__), job, os.path.join(folder, f"job{index}.json"), str(job))


def run_release_job(job: dict, folder: str, index: int, src: str, python: str) -> dict:
    """One row of the release's tower in its own interpreter; a failure is kept as the row's error, not raised,
    so that our figures are still printed."""
    try:
        return run_job_in_subprocess(str(RELEASE_SCRIPT), job, os.path.join(folder, f"job{index}.json"),
                                     f"the release {job}", python=python, args=("--src", src))
    except RuntimeError as e:
        return dict(job, seconds=None, error=str(e))


# ----------------------------------------------------------------------------------------------- report


def print_tower_table(results: list[dict], repeats: int) -> None:
    dense = {(r["frames"], r["precision"], r["passes"]): r["seconds"] for r in results if r["variant"] == "dense"}
    rows = []
    for r in results:
        key = (r["frames"], r["precision"], r["passes"])
        ratio = f"{dense[key] / r['seconds']:.2f}x" if key in dense else "-"
        keep = f"{KEEP_RATE.get(r['frames'], 0.6)}" if r["variant"] == "edge+node" else "1"
        rows.append([r["frames"], r["precision"], r["passes"], r["variant"], keep, f"{r['seconds']:.3f}", ratio,
                     f"{r['gflop']:.0f}", f"{r['gflop'] / r['seconds']:.0f}", f"{r['peak_rss_mib'] / 1024:.2f}"])
    print(f"\nSViTT vision tower, base (768 wide, 12 layers, 224 px), batch {BATCH}: median of {repeats} timed calls "
          f"after one warm-up; ratio = our dense s / this s (same run)")
    print_table(["frames", "prec", "pass", "variant", "keep", "s", "vs dense", "GFLOP", "GFLOP/s", "peak RSS GiB"],
                rows, left=4)


def print_attention_memory(results: list[dict]) -> None:
    print("\nOne attention layer's forward (no_grad, batch 2, fp32): peak RSS growth in a fresh process "
          "(ru_maxrss after the call - RSS before it)")
    rows, by = [], {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    for variant, rs in by.items():
        rs.sort(key=lambda r: r["tokens"])
        for i, r in enumerate(rs):
            step = "-"
            if i:
                p = rs[i - 1]
                step = f"{(r['growth_mib'] - p['growth_mib']) * 1024 / (r['tokens'] - p['tokens']):.1f}"
            layout = f"{sparse_layout_mib(r['frames']):.0f}" if variant == "sparse" else "-"
            rows.append([variant, r["frames"], r["tokens"], f"{r['growth_mib']:.0f}",
                         f"{r['growth_mib'] * 1024 / r['tokens']:.1f}", step, layout])
    print_table(["attention", "frames", "tokens L", "peak growth MiB", "KiB / token", "KiB per added token",
           "sparse, growing with L: MiB (analytic)"], rows, left=1)
    print("flat KiB per added token = memory linear in tokens; rising = super-linear (dense: its [1, H, L-1, L] bias)")


def row_key(r: dict) -> tuple:
    return r["frames"], r["precision"], r["passes"], r["variant"]


def release_rows(results: list[dict], release: list[dict]) -> list[list[str]]:
    """One table row per row timed by both codes: the release's seconds, ours, the ratio, and both peak RSS."""
    ours = {row_key(r): r for r in results}
    rows = []
    for theirs in release:
        mine = ours.get(row_key(theirs))
        if mine is None:
            continue
        ok = theirs.get("seconds") is not None
        rows.append([*row_key(theirs), f"{theirs['seconds']:.3f}" if ok else "failed", f"{mine['seconds']:.3f}",
                     f"{theirs['seconds'] / mine['seconds']:.2f}x" if ok else "-",
                     f"{theirs['peak_rss_mib'] / 1024:.2f}" if ok else "-", f"{mine['peak_rss_mib'] / 1024:.2f}"])
    return rows


def print_release_comparison(results: list[dict], release: list[dict], src: str) -> None:
    versions = next((f"torch {r['torch']}, transformers {r['transformers']}" for r in release if r.get("seconds")),
                    "every job failed")
    print(f"\nThe release's vision tower vs ours, measured in this run (github:JerryYLi/svitt {SVITT_RELEASE_COMMIT} "
          f"from {src}: models.sparse_xbeit.BeitModel, random weights, its own interpreter with {versions}; "
          f"bf16 = autocast added to it; same batch, input, threads and timing)")
    print_table(["frames", "prec", "pass", "variant", "the release s", "ours s", "ours faster", "release GiB",
                 "ours GiB"], release_rows(results, release), left=4)
    for r in release:
        if r.get("error"):
            print(f"  {' '.join(map(str, row_key(r)))}: the release's job failed ({r['error']})")


def print_target(results: list[dict], peak: float | None) -> None:
    t = TARGET
    pick = {r["variant"]: r for r in results
            if (r["frames"], r["precision"], r["passes"]) == (t["frames"], t["precision"], t["passes"])}
    print(f"\nTarget: {t['frames']} frames, {t['precision']}, {t['passes']}, {t['variant']} (local {LOCAL}, random "
          f"{RANDOM}, block {BLOCK}, keep {KEEP_RATE[t['frames']]} after layers {' '.join(map(str, DROP_LOC))})")
    if t["variant"] not in pick:
        print("  not measured in this run")
        return
    r = pick[t["variant"]]
    s = r["seconds"]
    print(f"  time   {s:.3f} s  (target <= {t['max_s']} s)  {'PASS' if s <= t['max_s'] else 'MISS'}")
    if peak:
        floor = (r["gflop"] - r["attention_gflop"]) / peak
        print(f"  its {r['gflop'] - r['attention_gflop']:.0f} GFLOP of projections, MLP and patch convolution alone "
              f"take {floor:.2f} s at the fp32 matmul peak measured in this run ({peak:.0f} GFLOP/s); attention "
              f"({r['attention_gflop']:.0f} GFLOP), gathers, GELU, norms and residuals get the other "
              f"{s - floor:.2f} s")
    if "dense" in pick:
        ratio = pick["dense"]["seconds"] / s
        print(f"  vs dense {ratio:.2f}x  (target >= {t['min_ratio']:.0f}x)  "
              f"{'PASS' if ratio >= t['min_ratio'] else 'MISS'}")


# ----------------------------------------------------------------------------------------------- command line


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16], help="frame counts to run")
    p.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                   help="fp32 and/or bf16 (autocast)")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES,
                   help="forward and/or forward + backward")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="attention variants")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (median reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--dense_16_backward", action="store_true",
                   help="also run dense forward + backward at 16 frames (needs about 23 GB)")
    p.add_argument("--attn_memory_frames", type=int, nargs="*", default=[4, 8, 16],
                   help="frame counts of the one-attention-layer memory measurement (none: skip it)")
    p.add_argument("--no_attn_memory", action="store_true", help="skip the attention memory measurement")
    p.add_argument("--release_src", default=None,
                   help="a checkout of the SViTT release (github:JerryYLi/svitt, commit "
                        f"{SVITT_RELEASE_COMMIT}): also time its vision tower at every row, in this run, and print "
                        "the ratios; see benchmarks/release_svitt.py")
    p.add_argument("--release_python", default=None,
                   help=f"the interpreter of the release's own environment (default {RELEASE_PYTHON}); build it "
                        f"with: {RELEASE_ENV}")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: one job in this process
    p.add_argument("--job_out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    tower, memory = [], []
    for frames in args.frames:
        for precision in args.precision:
            for passes in args.passes:
                for variant in args.variants:
                    if variant == "dense" and passes == "fwd+bwd" and frames >= 16 and not args.dense_16_backward:
                        continue
                    tower.append(dict(kind="tower", frames=frames, precision=precision, passes=passes,
                                      variant=variant, repeats=args.repeats, threads=args.threads))
    if any((j["frames"], j["precision"], j["passes"]) == (TARGET["frames"], TARGET["precision"], TARGET["passes"])
           for j in tower):
        memory.append(dict(kind="matmul_peak", threads=args.threads))
    if not args.no_attn_memory:
        for variant in ("dense", "sparse"):
            for frames in args.attn_memory_frames:
                memory.append(dict(kind="attn_memory", frames=frames, variant=variant, threads=args.threads))
    return tower, memory


def release_python(given: str | None) -> str:
    """The release's interpreter: --release_python, else the default environment; missing, a one-line reason."""
    path = given or RELEASE_PYTHON
    if not os.path.exists(path):
        raise SystemExit(f"--release_python {path}: no such interpreter; the release needs an environment of its "
                         f"own (transformers <= 4.55), build it with: {RELEASE_ENV}")
    return path


def plan_release(args: argparse.Namespace, tower: list[dict]) -> list[dict]:
    """The release's job for each of our tower rows (none without --release_src)."""
    if not args.release_src:
        return []
    require_svitt_release_checkout(args.release_src)
    return [dict(kind="release", frames=j["frames"], precision=j["precision"], passes=j["passes"],
                 variant=j["variant"], encoder_args=release_encoder_args(j["variant"], j["frames"]),
                 repeats=j["repeats"], threads=j["threads"]) for j in tower]


def interleave(tower: list[dict], release: list[dict]) -> list[dict]:
    """Each release row right after ours, so that both see the same load."""
    if not release:
        return list(tower)
    return [job for pair in zip(tower, release) for job in pair]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> dict:
    args = get_args(argv)
    if args.job:
        job = json.loads(args.job)
        result = dict(tower=tower_job, attn_memory=attention_memory_job, matmul_peak=matmul_peak_job)[job["kind"]](job)
        with open(args.job_out, "w") as f:
            json.dump(result, f)
        return result
    tower, memory = plan(args)
    release = plan_release(args, tower)
    python = release_python(args.release_python) if release else None
    jobs = interleave(tower, release) + memory
    load_before = load_average()
    print(f"bench_svitt: {machine()}, {args.threads} torch threads, load average {load_before} (1/5/15 min) "
          f"before the run; {len(jobs)} jobs, each in a fresh process"
          + (f" ({len(release)} of the release's, with {python})" if release else ""), flush=True)
    start, results, rel_results, mem_results, peak = time.perf_counter(), [], [], [], None
    with tempfile.TemporaryDirectory(prefix="bench_svitt_") as folder:
        for i, job in enumerate(jobs):
            head = f"[{i + 1}/{len(jobs)}]"
            if job["kind"] == "release":
                r = run_release_job(job, folder, i, args.release_src, python)
                rel_results.append(r)
                print(f"{head} the release: {' '.join(map(str, row_key(r)))}: " + (
                      f"{r['seconds']:.3f} s (runs {' '.join(f'{t:.2f}' for t in r['times_s'])}; warm-up "
                      f"{r['warmup_s']:.2f})" if r.get("seconds") is not None else "FAILED")
                      + f", {time.perf_counter() - start:.0f} s so far", flush=True)
                continue
            r = run_in_subprocess(job, folder, i)
            if job["kind"] == "tower":
                results.append(r)
                print(f"{head} {r['frames']} frames {r['precision']} {r['passes']} "
                      f"{r['variant']}: {r['seconds']:.3f} s (runs {' '.join(f'{t:.2f}' for t in r['times_s'])}; "
                      f"warm-up {r['warmup_s']:.2f}), {time.perf_counter() - start:.0f} s so far", flush=True)
            elif job["kind"] == "matmul_peak":
                peak = r["gflops"]
                print(f"{head} fp32 matmul peak {peak:.0f} GFLOP/s", flush=True)
            else:
                mem_results.append(r)
                print(f"{head} attention memory {r['variant']} {r['frames']} frames: "
                      f"+{r['growth_mib']:.0f} MiB", flush=True)
    load_after = load_average()
    if results:
        print_tower_table(results, args.repeats)
        print_target(results, peak)
    if rel_results:
        print_release_comparison(results, rel_results, args.release_src)
    if mem_results:
        print_attention_memory(mem_results)
    torch_version = results[0]["torch"] if results else "?"
    print(f"\ntorch {torch_version}; {machine()}; load average {load_before} before, {load_after} after "
          f"(1/5/15 min); whole run {time.perf_counter() - start:.0f} s")
    report = dict(machine=machine(), load_before=load_before, load_after=load_after, tower=results,
                  attention_memory=mem_results, fp32_matmul_peak_gflops=peak, release=rel_results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"figures written to {args.json}")
    return report


if __name__ == "__main__":
    main()
