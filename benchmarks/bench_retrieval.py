"""Retrieval cost on this machine: clips/s and captions/s embedded by the dual encoders, similarity + metrics time
for 1k and 10k items, and the cost of re-ranking one query's top K with a pre-training model's matching head.

    .venv/bin/python benchmarks/bench_retrieval.py                 # 16 frames x 224 px, bf16 autocast on CPU
    .venv/bin/python benchmarks/bench_retrieval.py --frames 8 --size 112 --precision fp32

Inputs are random tensors of the right shapes (throughput does not depend on pixel values).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# bench_common first: it puts the repository's modules on sys.path
import bench_common  # noqa: F401
import model_registry  # noqa: E402
import retrieval_eval as engine  # noqa: E402
import utils  # noqa: E402

DUAL_MODELS = ("simvtp_dual_tiny_patch16", "simvtp_dual_base_patch16")
PRETRAIN_MODELS = ("simvtp_tiny_patch16", "simvtp_base_patch16")


def timed(fn, iters: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def text_batch(batch: int, length: int, vocab: int = 30522) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, vocab, (batch, length))
    ids[:, 0], ids[:, -1] = 101, 102
    return ids, torch.ones_like(ids)


@torch.no_grad()
def bench_embedding(name: str, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    model = model_registry.create(name, img_size=args.size, num_frames=args.frames).eval()
    video = torch.randn(args.video_batch, 3, args.frames, args.size, args.size)
    ids, mask = text_batch(args.text_batch, args.text_len)
    cpu = torch.device("cpu")
    with utils.autocast(cpu, dtype):
        sv = timed(lambda: model.encode_video(video), args.iters)
        st = timed(lambda: model.encode_text(ids, mask), args.iters)
    return {"model": name, "videos/s": args.video_batch / sv, "texts/s": args.text_batch / st}


def bench_metrics(n: int, dim: int = 768) -> dict:
    """n texts against n videos: one cosine-similarity matmul, then both directions' ranks and summaries."""
    g = torch.Generator().manual_seed(0)
    video = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = F.normalize(video + 0.5 * torch.randn(n, dim, generator=g), dim=-1)
    t2v = torch.arange(n)
    t0 = time.perf_counter()
    sim = text @ video.t()
    t1 = time.perf_counter()
    engine.retrieval_metrics(sim, t2v)
    t2 = time.perf_counter()
    return {"items": n, "similarity_s": t1 - t0, "metrics_s": t2 - t1}


@torch.no_grad()
def bench_rerank(name: str, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """One query's K (video, caption) pairs through the joint pass + matching head, in one batch."""
    model = model_registry.create(name, img_size=args.size, num_frames=args.frames).eval()
    video = torch.randn(1, 3, args.frames, args.size, args.size).expand(args.k, -1, -1, -1, -1)
    ids, mask = text_batch(args.k, args.text_len)
    with utils.autocast(torch.device("cpu"), dtype):
        s = timed(lambda: model.match_logits(video, ids, mask), max(1, args.iters // 2))
    return {"model": name, "k": args.k, "s/query": s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--video_batch", type=int, default=2)
    p.add_argument("--text_batch", type=int, default=64)
    p.add_argument("--text_len", type=int, default=32)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    args = p.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision} autocast, "
          f"{args.frames} frames x {args.size} px")

    print(f"\n{'embedding':<34}{'videos/s':>10}{'texts/s':>10}")
    for name in DUAL_MODELS:
        r = bench_embedding(name, args, dtype)
        print(f"{r['model']:<34}{r['videos/s']:>10.2f}{r['texts/s']:>10.1f}", flush=True)

    print(f"\n{'similarity + metrics (fp32)':<34}{'sim s':>10}{'metrics s':>10}")
    for n in args.sizes:
        r = bench_metrics(n)
        print(f"{str(n) + ' texts x ' + str(n) + ' videos':<34}{r['similarity_s']:>10.3f}{r['metrics_s']:>10.3f}",
              flush=True)

    print(f"\n{'re-ranking (joint pass + VTM head)':<34}{'K':>10}{'s/query':>10}")
    for name in PRETRAIN_MODELS:
        r = bench_rerank(name, args, dtype)
        print(f"{r['model']:<34}{r['k']:>10d}{r['s/query']:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
