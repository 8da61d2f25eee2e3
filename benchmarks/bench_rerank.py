"""Matching-head re-ranking throughput on this machine, and what MSR-VTT 1k-A with k = 128 would cost.

    .venv/bin/python benchmarks/bench_rerank.py                      # tiny SViTT and SimVTP, 8 frames x 112 px
    .venv/bin/python benchmarks/bench_rerank.py --videos 1 --texts 16 # quick

Runs the evaluation's own re-ranking (retrieval_eval.match_scores: each video's clip cached once with
match_video_cache, its candidate texts scored in batches of --batch through match_logits) on random-initialised
tiny models, random uint8 clips and captions of random words. Pairs/s do not depend on the weights or pixels.

MSR-VTT 1k-A, k = 128: every text's top 128 videos and every video's top 128 texts, a pair in both lists scored
once (candidate_pairs). That is at most 1000 x 128 + 1000 x 128 = 256,000 pairs; the overlap depends on the scores.
We print the time for that upper bound and for the union candidate_pairs gives on a random [1000, 1000] similarity
matrix (133,915 pairs: a high score tends to be in both its row's and its column's top k, so the lists overlap
by ~95%; a trained model's lists also overlap heavily).
"""
from __future__ import annotations

import argparse
import time

import torch

# bench_common first: it puts the repository's modules on sys.path
from bench_common import print_table
import datasets  # noqa: E402
import retrieval_eval as engine  # noqa: E402
import model_registry  # noqa: E402

MODELS = ("svitt_tiny_patch16", "simvtp_tiny_patch16")
MSRVTT_ITEMS, MSRVTT_K = 1000, 128


def random_captions(n: int, tokenizer, words: int = 12, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    vocab = tokenizer.convert_ids_to_tokens(list(range(2000, 8000)))
    return [" ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (words,), generator=g)) for _ in range(n)]


def msrvtt_pairs(k: int = MSRVTT_K, n: int = MSRVTT_ITEMS) -> tuple[int, int]:
    """(upper bound T x k + V x k, the union's size on a random [n, n] similarity matrix)."""
    sim = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    return 2 * n * k, len(engine.candidate_pairs(sim, k))


def bench(name: str, args: argparse.Namespace, tokenizer) -> dict:
    torch.manual_seed(0)
    model = model_registry.create(name, img_size=args.size, num_frames=args.frames,
                                  vocab_size=len(tokenizer)).eval()
    videos = torch.randint(0, 256, (args.videos, 3, args.frames * args.clips, args.size, args.size),
                           dtype=torch.uint8)
    captions = random_captions(args.texts, tokenizer)
    pairs = [(t, v) for v in range(args.videos) for t in range(args.texts)]
    cfg = engine.EvalConfig(torch.device("cpu"), chunk=args.batch, num_clips=args.clips, print_freq=10 ** 6)
    engine.match_scores(model, pairs[:args.batch], videos, captions, tokenizer, cfg)  # warm-up
    t0 = time.perf_counter()
    engine.match_scores(model, pairs, videos, captions, tokenizer, cfg)
    seconds = time.perf_counter() - t0
    return {"model": name, "pairs": len(pairs), "seconds": seconds, "pairs/s": len(pairs) / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=8, help="frames per clip (the tiny models' default)")
    p.add_argument("--size", type=int, default=112, help="clip side in pixels (the tiny models' default)")
    p.add_argument("--clips", type=int, default=1, help="clips per video (--num_frames_test / --num_frames)")
    p.add_argument("--videos", type=int, default=4, help="videos scored")
    p.add_argument("--texts", type=int, default=128, help="candidate texts per video")
    p.add_argument("--batch", type=int, default=32, help="texts per match_logits call (evaluation: --batch_size)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = datasets.build_tokenizer()
    bound, random_union = msrvtt_pairs()
    print(f"{torch.get_num_threads()} torch threads; {args.frames} frames x {args.size} px, {args.clips} clip(s) "
          f"per video, {args.texts} texts per video in batches of {args.batch}, fp32")
    rows = []
    for name in MODELS:
        r = bench(name, args, tokenizer)
        rows.append([name, r["pairs"], f"{r['seconds']:.2f}", f"{r['pairs/s']:.1f}",
                     f"{bound / r['pairs/s'] / 60:.1f}", f"{random_union / r['pairs/s'] / 60:.1f}"])
    print_table(["model", "pairs", "seconds", "pairs/s", f"1k-A k={MSRVTT_K} min (<= {bound})",
                 f"min ({random_union}, random sim)"], rows)


if __name__ == "__main__":
    main()
