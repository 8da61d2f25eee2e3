"""Graph breaks of each pre-training and retrieval model's forward + loss under torch.compile (both families, tiny
sizes, one batch made by the real collator): what a GPU user's --compile_blocks and a whole-step compile get, and
the check of the "no host sync in a step" rule (a .item(), .tolist(), nonzero or boolean-mask index in forward
or loss breaks the graph or makes a data-dependent shape).

    .venv/bin/python benchmarks/bench_graph_breaks.py            # dynamo + inductor, every model (~10 min, 2 cores)
    .venv/bin/python benchmarks/bench_graph_breaks.py --quick    # dynamo only (eager backend), the smallest clips

For each model: torch._dynamo.explain over `model(batch)["loss"]` (fullgraph=False) counts graphs and breaks and
gives each break's reason, with static shapes (a frame resumed after a break is traced at the step's real sizes);
then torch.compile(fullgraph=True) of the same call is run once (PASS, or the first error). The break count is
the check: with fullgraph=True, torch (2.14) captures a Tensor.item() as an unbacked scalar instead of failing,
which still reads the device at run time. Target: 0 breaks and PASS for every model; exit status 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# bench_common first: it puts the repository's modules on sys.path
from bench_common import print_table
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import datasets  # noqa: E402
import engine_for_pretraining as engine  # noqa: E402
import masking_generator  # noqa: E402
import model_registry  # noqa: E402
import video_transforms  # noqa: E402

CAPTIONS = ("a man rides a bicycle along a mountain road at sunset", "waves breaking on a sandy beach",
            "hands kneading dough on a wooden table", "a dog running through tall grass")
# every SViTT option that changes the step's shapes switched on: block-sparse attention with random blocks, token
# pruning in the vision tower, text-guided selection in the fusion layers
SVITT_OPTIONS = dict(attn_block_size=4, sparse_random_attn=1, token_keep_rate=0.5, token_drop_loc=(1,),
                     fusion_keep_rate=0.5, fusion_drop_loc=(2,))
# name -> (registered model, its options, the batch's task: pre-training masks the caption (and the video))
MODELS = {
    "simvtp pre-training": ("simvtp_tiny_patch16", {}, "pretrain"),
    "simvtp retrieval": ("simvtp_dual_tiny_patch16", {}, "retrieval"),
    "svitt pre-training": ("svitt_tiny_patch16", SVITT_OPTIONS, "pretrain"),
    "svitt retrieval": ("svitt_tiny_patch16", SVITT_OPTIONS, "retrieval"),
}
CLIP = {False: dict(num_frames=4, img_size=64, batch_size=4), True: dict(num_frames=4, img_size=32, batch_size=4)}
MASK_RATIO = 0.9


def make_batch(model: torch.nn.Module, task: str, clip: dict, tokenizer) -> dict:
    """The engine's batch: dataset-like items through datasets.VideoTextCollator (the model's text masking in
    pre-training, a tube mask when the model takes one), moved by engine.move_batch."""
    t, s, b = clip["num_frames"], clip["img_size"], clip["batch_size"]
    pretrain = task == "pretrain"
    grid = model.token_grid(t, s, s)
    mask_gen = masking_generator.build_mask_generator("tube", grid, MASK_RATIO) \
        if pretrain and model.takes_video_mask else None
    items = []
    for i in range(b):
        item = dict(video=torch.randint(0, 255, (3, t, s, s), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(i)),
                    caption=CAPTIONS[i % len(CAPTIONS)], index=i // 2, epoch=0)  # rows 2i, 2i+1: one video
        if mask_gen is not None:
            item["video_mask"] = torch.from_numpy(mask_gen(video_transforms.sample_rng(0, 0, i, "video_mask")))
        items.append(item)
    ratio = model.default_text_mask_ratio if pretrain and model.text_masking else None
    collate = datasets.VideoTextCollator(tokenizer, max_text_len=16, text_mask_ratio=ratio,
                                         text_mask_mode=model.text_masking or "mask")
    return engine.move_batch(collate(items), torch.device("cpu"))


def short(reason: str, width: int = 110) -> str:
    first = " ".join(str(reason).split())
    return first if len(first) <= width else first[:width - 3] + "..."


def break_reasons(explained) -> list[str]:
    """Each distinct break (the user frame it happened in and the reason's first sentence) with its count."""
    counts: dict[str, int] = {}
    for r in explained.break_reasons:
        frame = f"{Path(r.user_stack[-1].filename).name}:{r.user_stack[-1].lineno}" if r.user_stack else "?"
        text = f"{frame} {short(str(r.reason).split('Explanation:')[0])}"
        counts[text] = counts.get(text, 0) + 1
    return [f"{text} (reported {n}x)" for text, n in counts.items()]


def check_model(name: str, quick: bool, backend: str, tokenizer) -> dict:
    """Graphs, breaks and their reasons (fullgraph=False), then whether fullgraph=True compiles and runs."""
    model_name, options, task = MODELS[name]
    clip = CLIP[quick]
    torch.manual_seed(0)
    model = model_registry.create(model_name, img_size=clip["img_size"], num_frames=clip["num_frames"],
                                  vocab_size=len(tokenizer), **options).train()
    batch = make_batch(model, task, clip, tokenizer)

    def step(b: dict) -> torch.Tensor:
        return model(b)["loss"]

    torch._dynamo.reset()
    try:  # static shapes: a resumed frame is traced with the step's real sizes, as one training step sees them
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                explained = torch._dynamo.explain(step)(batch)
        graphs, breaks, reasons = explained.graph_count, explained.graph_break_count, break_reasons(explained)
    except Exception as e:  # noqa: BLE001 (dynamo could not trace the step at all: its reason is the report)
        graphs, breaks, reasons = "-", "error", [f"explain failed: {failure(e, 300)}"]
    torch._dynamo.reset()
    try:
        torch.compile(step, fullgraph=True, backend=backend)(batch)
        fullgraph = "PASS"
    except Exception as e:  # noqa: BLE001 (the first reason a whole-graph compile fails is the report)
        fullgraph = "FAIL"
        reasons.append(f"fullgraph=True: {failure(e, 300)}")
    return dict(model=name, graphs=graphs, breaks=breaks, fullgraph=fullgraph, reasons=reasons)


def failure(e: Exception, width: int) -> str:
    """An exception's type, first line and the user frame dynamo names ("from user code:")."""
    text = str(e)
    where = text.split("from user code:", 1)[1].strip().splitlines()[0].strip() if "from user code:" in text else ""
    return short(f"{type(e).__name__}: {text.splitlines()[0] if text else ''} {where}", width)


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--backend", default=None,
                   help="torch.compile backend of the fullgraph=True run (default inductor; eager with --quick)")
    p.add_argument("--quick", action="store_true", help="32 px clips and the eager backend (dynamo's analysis only)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = get_args(argv)
    backend = args.backend or ("eager" if args.quick else "inductor")
    tokenizer = datasets.build_tokenizer()
    results = [check_model(name, args.quick, backend, tokenizer) for name in args.models.split(",")]
    print(f"\ntorch {torch.__version__}, fullgraph=True backend: {backend}")
    print_table(["model", "graphs", "breaks", "fullgraph=True"],
                [[r["model"], r["graphs"], r["breaks"], r["fullgraph"]] for r in results])
    for r in results:
        for reason in r["reasons"]:
            print(f"  {r['model']}: {reason}")
    missed = [r["model"] for r in results if r["breaks"] != 0 or r["fullgraph"] != "PASS"]
    verdict = "PASS" if not missed else f"MISS ({', '.join(missed)})"
    print(f"target 0 breaks and fullgraph=True for every model: {verdict}")
    return results


if __name__ == "__main__":
    sys.exit(1 if any(r["breaks"] != 0 or r["fullgraph"] != "PASS" for r in main()) else 0)
