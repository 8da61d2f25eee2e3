"""Speed and memory of one SimVTP pre-training step: clips/s, peak RSS, FLOPs, MFU, and where the time goes.

    .venv/bin/python benchmarks/bench_pretrain.py                 # tiny and base, fp32 and bf16 (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_pretrain.py --configs tiny  # a minute
    .venv/bin/python benchmarks/bench_pretrain.py --quick         # smallest run, for the test suite

What is timed is the real training step: the model's forward (all passes and losses) under autocast, backward,
and an AdamW step (fused, as the run scripts), on a batch shaped exactly as the collate makes it (random pixels, a 90% tube mask, real
captions through the shipped BERT tokenizer with 75% MLM masking). Each (config, precision) runs in its own
process, so "peak RSS" is that run's own maximum resident memory.

FLOPs come from torch.utils.flop_counter.FlopCounterMode over one forward + backward (matmuls, convolutions and
attention; element-wise work is not counted, so MFU is a lower bound on how busy the matmul units are). MFU =
FLOPs per step / seconds per step / the peak measured in the same process with a large square matmul in that
precision.

Breakdown: forward hooks time every call of the unified encoder, telling its passes apart by their inputs (the
first joint pass = visible tubes + masked caption; video-only and text-only = the VTC passes; the second joint
pass = the VTM negatives), and every call of the pixel decoder (with encoder_to_decoder) and of the heads (word
head, VTM head). On CPU every op is synchronous, so these wall times add up to the forward; "other forward" is
the rest (embeddings, losses, negative sampling). Backward and the optimizer step are timed as a whole.

Targets on this 2-core machine: base config, batch 4, 16 x 224, bf16: peak RSS under 12 GiB and at most 5.5 s per
step (the release takes about 22 s here in its fp32); the encoder alone at 90% masking at least 5x faster than at
0% (forward + backward on the video tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timm.models import create_model  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import datasets  # noqa: E402
import masking_generator  # noqa: E402
import modeling_simvtp  # noqa: E402,F401  (registers the models)
import utils  # noqa: E402

CONFIGS = {
    "tiny": dict(model="simvtp_tiny_patch16", num_frames=8, input_size=112, batch_size=16),
    "base": dict(model="pretrain_simvtp_base_patch16_224", num_frames=16, input_size=224, batch_size=4),
}
QUICK = dict(model="simvtp_tiny_patch16", num_frames=4, input_size=32, batch_size=4)
TARGET_BASE_SECONDS, TARGET_BASE_GIB, TARGET_MASK_SPEEDUP = 5.5, 12.0, 5.0
CAPTIONS = ["a small red disc slides to the left on a blue background",
            "one large green square grows against a yellow backdrop",
            "the tiny white triangle sinks downward",
            "a grey ball rises on an orange background while it shrinks"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ("joint encoder (a)", "unimodal VTC passes (b)", "VTM negatives joint (c)", "pixel decoder",
         "heads (word, VTM)", "other forward", "backward", "optimizer")


# ----------------------------------------------------------------------------------------------- inputs


def make_batch(cfg: dict, tokenizer, mask_ratio: float = 0.9, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch shaped as datasets.VideoTextCollator makes it, with random pixels."""
    b, t, s = cfg["batch_size"], cfg["num_frames"], cfg["input_size"]
    rng = np.random.default_rng(seed)
    gen = masking_generator.build_mask_generator("tube", (t // 2, s // 16, s // 16), mask_ratio)
    video_mask = torch.from_numpy(np.stack([gen(rng) for _ in range(b)]))
    tok = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(b)], padding=True, truncation=True,
                    max_length=32, return_tensors="pt")
    ids, att = tok["input_ids"].long(), tok["attention_mask"].long()
    mlm_ids, labels = masking_generator.mask_text_batch(ids, att, 0.75, [np.random.default_rng(i) for i in range(b)])
    video = torch.randn(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed))
    return dict(video=video, video_mask=video_mask, input_ids=ids, attention_mask=att, mlm_input_ids=mlm_ids,
                mlm_labels=labels)


def build(cfg: dict, vocab_size: int, grad_ckpt: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = create_model(cfg["model"], img_size=cfg["input_size"], num_frames=cfg["num_frames"],
                         vocab_size=vocab_size)
    model.set_grad_checkpointing(grad_ckpt)
    groups = utils.param_groups(model, 0.05, no_decay_names=("mask_token", "temp"))
    for g in groups:
        g.pop("names")
    return model.train(), utils.make_adamw(groups, 1e-4, (0.9, 0.95), 1e-8, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- measurements


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Achieved FLOP/s of an n x n x n matmul in this precision (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, dtype: torch.dtype,
               clock: dict | None = None) -> None:
    """One real step; with `clock`, adds forward / backward / optimizer seconds to it."""
    t0 = time.perf_counter()
    with utils.autocast(torch.device("cpu"), dtype):
        loss = model(**batch)["loss"]
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if clock is not None:
        for k, v in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
            clock[k] = clock.get(k, 0.0) + v


class PartTimer:
    """Forward hooks that add each call's wall time to the part it belongs to (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = {}
        self._joint_calls = 0
        self._start: dict[int, float] = {}
        self._handles = []
        self._watch(model.encoder, self._encoder_part)
        for module in (model.decoder, model.encoder_to_decoder):
            self._watch(module, lambda args, kwargs: "pixel decoder")
        for module in (model.text_cls, model.vtm_head):
            self._watch(module, lambda args, kwargs: "heads (word, VTM)")

    def _encoder_part(self, args: tuple, kwargs: dict) -> str:
        inputs = list(args) + [kwargs.get("video_tokens"), kwargs.get("text_tokens")]
        if sum(x is not None and torch.is_tensor(x) for x in inputs[:2]) < 2:
            return "unimodal VTC passes (b)"
        self._joint_calls += 1
        return "joint encoder (a)" if self._joint_calls % 2 == 1 else "VTM negatives joint (c)"

    def _watch(self, module: torch.nn.Module, name_of) -> None:
        def pre(mod, args, kwargs):
            self._start[id(mod)] = (name_of(args, kwargs), time.perf_counter())

        def post(mod, args, kwargs, out):
            name, t0 = self._start.pop(id(mod))
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self._handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                          module.register_forward_hook(post, with_kwargs=True)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def count_flops(model: torch.nn.Module, batch: dict, dtype: torch.dtype) -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of one step."""
    with FlopCounterMode(display=False) as counter:
        with utils.autocast(torch.device("cpu"), dtype):
            loss = model(**batch)["loss"]
        forward = counter.get_total_flops()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(forward), float(counter.get_total_flops())


def encoder_seconds(model: torch.nn.Module, batch: dict, dtype: torch.dtype, reps: int) -> float:
    """Seconds of forward + backward of the unified encoder on the batch's visible video tokens."""
    def once() -> None:
        with utils.autocast(torch.device("cpu"), dtype):
            out = model.encoder(model.encoder.embed_video(batch["video"], batch["video_mask"]))
        out.float().mean().backward()
    once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / reps


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


# ----------------------------------------------------------------------------------------------- one job


def run_job(job: dict) -> dict:
    """One (config, precision) in this process: step time, parts, FLOPs, MFU, memory; optionally the encoder."""
    torch.manual_seed(0)
    cfg, dtype = job["cfg"], DTYPES[job["precision"]]
    torch.set_num_threads(job["threads"])
    tokenizer = datasets.build_tokenizer()
    model, optimizer = build(cfg, len(tokenizer), job["grad_checkpointing"])
    batch = make_batch(cfg, tokenizer)
    out = {"config": job["name"], "precision": job["precision"], **cfg,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    for i in range(job["warmup"]):
        train_step(model, optimizer, batch, dtype)
        print(f"  [{job['name']} {job['precision']}] warm-up step {i + 1}/{job['warmup']}", flush=True)
    clock: dict[str, float] = {}
    timer = PartTimer(model)
    t0 = time.perf_counter()
    for i in range(job["steps"]):
        train_step(model, optimizer, batch, dtype, clock)
        done = time.perf_counter() - t0
        print(f"  [{job['name']} {job['precision']}] step {i + 1}/{job['steps']}  {done / (i + 1):.2f} s/step  "
              f"eta {done / (i + 1) * (job['steps'] - i - 1):.0f} s", flush=True)
    timer.remove()
    steps = job["steps"]
    out["s_per_step"] = (time.perf_counter() - t0) / steps
    out["clips_per_s"] = cfg["batch_size"] / out["s_per_step"]
    parts = {k: v / steps for k, v in timer.seconds.items()}
    parts["other forward"] = clock["forward"] / steps - sum(parts.values())
    parts["backward"], parts["optimizer"] = clock["backward"] / steps, clock["optimizer"] / steps
    out["parts_s"] = parts
    out["forward_flops"], out["step_flops"] = count_flops(model, batch, dtype)
    out["peak_flops"] = matmul_peak(dtype)
    out["mfu"] = out["step_flops"] / out["s_per_step"] / out["peak_flops"]
    if job["encoder"]:
        dense = make_batch(cfg, tokenizer, mask_ratio=0.0)
        out["encoder_s_mask0.9"] = encoder_seconds(model, batch, dtype, job["encoder_reps"])
        out["encoder_s_mask0.0"] = encoder_seconds(model, dense, dtype, job["encoder_reps"])
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def run_in_subprocess(job: dict) -> dict:
    """A fresh process per job: its peak RSS is its own."""
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.splitlines()
    for line in lines[:-1]:
        print(line, flush=True)
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark job {job['name']} {job['precision']} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------- report


def print_report(results: list[dict]) -> None:
    print("\nstep = forward (all passes and losses) + backward + AdamW; FLOPs from FlopCounterMode (fwd + bwd)")
    head = (f"{'config':<6}{'prec':>6}{'batch':>6}{'clip':>9}{'s/step':>8}{'clips/s':>9}{'GFLOP':>9}"
            f"{'peak TF/s':>10}{'MFU':>7}{'RSS GiB':>9}")
    print(head + "\n" + "-" * len(head))
    for r in results:
        clip = f"{r['num_frames']}x{r['input_size']}"
        print(f"{r['config']:<6}{r['precision']:>6}{r['batch_size']:>6}{clip:>9}{r['s_per_step']:>8.2f}"
              f"{r['clips_per_s']:>9.1f}{r['step_flops'] / 1e9:>9.0f}{r['peak_flops'] / 1e12:>10.2f}"
              f"{100 * r['mfu']:>6.1f}%{r['peak_rss_gib']:>9.2f}")
    for r in results:
        total = sum(r["parts_s"].values())
        cells = "  ".join(f"{k} {r['parts_s'][k]:.2f}s ({100 * r['parts_s'][k] / total:.0f}%)" for k in PARTS
                          if k in r["parts_s"])
        print(f"breakdown {r['config']} {r['precision']}: {cells}")
    by_key = {(r["config"], r["precision"]): r for r in results}
    for name in sorted({r["config"] for r in results}):
        if (name, "fp32") in by_key and (name, "bf16") in by_key:
            ratio = by_key[(name, "fp32")]["s_per_step"] / by_key[(name, "bf16")]["s_per_step"]
            print(f"{name}: bf16 step is {ratio:.2f}x faster than fp32")
    for r in results:
        if "encoder_s_mask0.9" in r:
            speedup = r["encoder_s_mask0.0"] / r["encoder_s_mask0.9"]
            print(f"{r['config']} {r['precision']} encoder fwd+bwd: mask 0.9 {r['encoder_s_mask0.9']:.2f} s, mask 0.0 "
                  f"{r['encoder_s_mask0.0']:.2f} s -> {speedup:.1f}x (target >= {TARGET_MASK_SPEEDUP:.0f}x: "
                  f"{'PASS' if speedup >= TARGET_MASK_SPEEDUP else 'MISS'})")
    base = by_key.get(("base", "bf16"))
    if base and base["batch_size"] == 4:
        print(f"base bf16 batch 4: {base['s_per_step']:.2f} s/step (target <= {TARGET_BASE_SECONDS} s: "
              f"{'PASS' if base['s_per_step'] <= TARGET_BASE_SECONDS else 'MISS'}), peak RSS "
              f"{base['peak_rss_gib']:.2f} GiB (target < {TARGET_BASE_GIB:.0f} GiB: "
              f"{'PASS' if base['peak_rss_gib'] < TARGET_BASE_GIB else 'MISS'})")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default="tiny,base", help="comma-separated: tiny, base")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--batch_size", type=int, default=None, help="override every config's batch size")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--encoder_reps", type=int, default=2, help="timed encoder-only passes per mask ratio")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="one tiny 4x32 run per precision, one step (for tests)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job, print its JSON
    return p.parse_args(argv)


def jobs_of(args: argparse.Namespace) -> list[dict]:
    configs = {"quick": QUICK} if args.quick else {n: CONFIGS[n] for n in args.configs.split(",")}
    jobs = []
    for name, cfg in configs.items():
        cfg = dict(cfg, batch_size=args.batch_size or cfg["batch_size"])
        for precision in args.precisions.split(","):
            jobs.append(dict(name=name, cfg=cfg, precision=precision, threads=args.threads,
                             warmup=0 if args.quick else args.warmup, steps=1 if args.quick else args.steps,
                             grad_checkpointing=args.grad_checkpointing, encoder=precision == "bf16",
                             encoder_reps=1 if args.quick else args.encoder_reps))
    return jobs


def main(argv=None) -> list[dict]:
    args = get_args(argv)
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return []
    print(f"bench_pretrain: {os.cpu_count()} CPU cores, {args.threads} torch threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} before the run (other processes slow the figures)", flush=True)
    results = [run_in_subprocess(job) for job in jobs_of(args)]
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"figures written to {args.json}")
    return results


if __name__ == "__main__":
    main()
