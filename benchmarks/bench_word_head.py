"""The word head on the masked positions against the head on every position: the demo's pre-training step, timed.

    .venv/bin/python benchmarks/bench_word_head.py                 # both families, the demo's flags, 12 steps each
    .venv/bin/python benchmarks/bench_word_head.py --steps 4 --families svitt

The collator hands the model `max_masked_words` (the most masked words of any caption in the batch, a host int),
and the model runs its word head's vocabulary projection (30,522 words) on that many positions per caption instead
of on all of them (SViTT masks 15% of the words, SimVTP 75%). Without the int the model falls back to every
position, as the releases do: that is the "every position" row. The loss is the same either way (tests).

How it is measured: the demo's pre-training flags (scripts/demo.sh steps 2 and 4) parsed by the pre-training
command line, the model built by the pre-training engine, batches of 16 from the demo's data read once by the
real loader (--data_root, default data/synthetic_2k_64: `bash scripts/demo.sh` or `synthetic_dataset.py` builds
it). Each timed step is the engine's forward + backward (--precision: by default bf16 autocast where the machine
has native bf16, as the demo's `--precision auto`) and AdamW step. The two variants alternate step by step on the
same batches, after two untimed warm-up steps each, and the median of each is printed with their ratio, so load
from other processes falls on both.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

# bench_common first: it puts the repository's modules on sys.path
from bench_common import REPO, machine, print_table
import command_lines  # noqa: E402
import datasets  # noqa: E402
import engine_for_pretraining as engine  # noqa: E402
import utils  # noqa: E402
import video_transforms  # noqa: E402

DEMO_FLAGS = {  # scripts/demo.sh's pre-training lines (steps 2 and 4), less the output and evaluation flags
    "simvtp": ["--model", "simvtp_tiny_patch16", "--vtm_text", "full", "--vtm_negatives", "mixed",
               "--vtm_random_epochs", "3", "--match_mask_ratio", "0.9", "--lr", "5e-3", "--vtc_video", "full",
               "--w_reverse", "10", "--reverse_tubes", "all"],
    "svitt": ["--model", "svitt_tiny_patch16", "--sample_type", "rand", "--sparse_local_attn", "1",
              "--sparse_random_attn", "1", "--attn_block_size", "32", "--token_keep_rate", "0.6",
              "--token_drop_loc", "1", "2", "--lr", "1e-2", "--w_mlm", "0.1", "--vtm_negatives", "mixed",
              "--vtm_random_epochs", "3", "--w_vtm_rank", "1", "--vtm_rank_score", "sum"],
}


def demo_args(family: str, data_root: Path, precision: str) -> argparse.Namespace:
    flags = ["--data_path", str(data_root / "annotations" / "pretrain.json"), "--data_root", str(data_root),
             "--num_frames", "8", "--sampling_rate", "4", "--input_size", "64", "--device", "cpu", "--precision",
             precision, "--num_workers", "0", "--batch_size", "16", "--output_dir", tempfile.mkdtemp()]
    flags += DEMO_FLAGS[family]
    args = command_lines.pretraining_parser().parse_args(flags)
    engine.check_args(args)
    video_transforms.resolve_sample_types(args)
    return args


def bench(family: str, data_root: Path, steps: int, precision: str) -> dict:
    args = demo_args(family, data_root, precision)
    dtype = utils.setup_run(args)  # the pre-training's own start: device, precision, threads, seeds
    tokenizer = datasets.build_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    model = engine.build_model(args, len(tokenizer)).train()
    if args.text_mask_ratio is None:
        import model_registry
        args.text_mask_ratio = model_registry.capability_value(model, "default_text_mask_ratio")
    loader, _, sampler = engine.build_loader(args, tokenizer, model)
    utils.training_schedules(args, len(sampler))  # sets the absolute learning rates AdamW is built with
    batches = [engine.move_batch(b, args.device_obj) for b, _ in zip(loader, range(2))]
    optimizer = engine.build_optimizer(model, args)
    scaler = utils.make_grad_scaler(args.device_obj, dtype)
    cfg = engine.StepConfig(device=args.device_obj, dtype=dtype)
    every = [{k: v for k, v in b.items() if k != "max_masked_words"} for b in batches]

    def step(batch: dict) -> float:
        t0 = time.perf_counter()
        engine._forward_backward(model, batch, scaler, cfg)
        engine._optimizer_step(model, optimizer, scaler, cfg)
        return time.perf_counter() - t0

    n = len(batches)  # 2, or 1 from a list of fewer than 32 clips
    for i in range(2):
        step(batches[i % n]), step(every[i % n])
    masked, full = [], []
    for i in range(steps):
        masked.append(step(batches[i % n]))
        full.append(step(every[i % n]))
    widths = [b["max_masked_words"] for b in batches]
    lengths = [b["input_ids"].shape[1] for b in batches]
    return {"family": family, "masked": statistics.median(masked), "every": statistics.median(full),
            "positions": f"{'/'.join(map(str, widths))} of {'/'.join(map(str, lengths))}", "dtype": dtype}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", type=Path, default=REPO / "data" / "synthetic_2k_64",
                   help="the demo's data (annotations/pretrain.json and its clips)")
    p.add_argument("--families", nargs="+", choices=tuple(DEMO_FLAGS), default=list(DEMO_FLAGS))
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="as the pre-training's flag (auto: bf16 where the CPU has native bf16, else fp32)")
    args = p.parse_args()
    if not (args.data_root / "annotations" / "pretrain.json").is_file():
        raise SystemExit(f"{args.data_root}/annotations/pretrain.json not found: build the demo's data first "
                         f"(bash scripts/demo.sh, or synthetic_dataset.py --out {args.data_root} --num_train 1920 "
                         f"--size 64)")
    print(f"{machine()}; {torch.get_num_threads()} torch threads; batch 16, 8 frames x 64 px; median of "
          f"{args.steps} steps per variant")
    rows = []
    for family in args.families:
        r = bench(family, args.data_root, args.steps, args.precision)
        rows.append([family, str(r["dtype"]).removeprefix("torch."), r["positions"], f"{r['every']:.3f}",
                     f"{r['masked']:.3f}", f"{r['every'] / r['masked']:.2f}x"])
    print_table(["family", "precision", "masked positions of a caption's (each batch)", "every position s/step",
                 "masked positions s/step", "faster"], rows)


if __name__ == "__main__":
    main()
