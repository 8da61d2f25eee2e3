"""Linear probes on exported video embeddings of the synthetic set: which attributes do a model's features carry?

Retrieval, re-ranking and QA can only use what the video features hold. Given embeddings of the synthetic train
and test clips (``run_simvtp_finetuning.py --export_embeddings``, .npy or .safetensors) and the set's
metadata.json, this fits one logistic-regression probe per attribute on the train clips and reports its accuracy
on the test clips beside the majority answer of the train clips (what a probe that learned nothing scores):
object colour, background colour, shape, size, motion, direction (moving clips) and grow / shrink.

    python attribute_probe.py --train emb.train.npy --test emb.test.npy \
        --metadata data/synthetic/annotations/metadata.json
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence

import torch

import retrieval_eval

MOVES = ("left", "right", "up", "down")
ATTRIBUTES: dict[str, Callable[[dict], str | None]] = {  # name -> the clip's label (None: not asked of this clip)
    "colour": lambda m: m["colour"],
    "background": lambda m: m["background"],
    "shape": lambda m: m["shape"],
    "size": lambda m: m["size"] if m["size"] in ("small", "large") else None,
    "motion": lambda m: m["motion"],
    "direction": lambda m: m["motion"] if m["motion"] in MOVES else None,
    "grow/shrink": lambda m: m["motion"] if m["motion"] in ("grow", "shrink") else None,
}


def clip_metadata(ids: Sequence[str], metadata: dict[str, dict], path: str) -> list[dict]:
    """Each id's metadata entry; an id is matched by its file name without extension ("train/train_00003")."""
    out = []
    for vid in ids:
        key = os.path.splitext(os.path.basename(vid))[0]
        if key not in metadata:
            raise KeyError(f"{path}: video {vid!r} is not in the metadata (is it the synthetic set's export?)")
        out.append(metadata[key])
    return out


def scaled(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows times 10, so that a linear probe's logits can be confident."""
    return 10.0 * torch.nn.functional.normalize(x, dim=-1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int, seed: int) -> torch.nn.Linear:
    """Full-batch logistic regression (Adam, weight decay 1e-4)."""
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        opt.step()
    return probe


def probe_attributes(train: tuple[torch.Tensor, list[dict]], test: tuple[torch.Tensor, list[dict]],
                     steps: int = 500, seed: int = 0) -> dict[str, dict]:
    """attribute -> {"accuracy", "majority" (the train clips' most frequent answer, scored on test), "clips"}."""
    results = {}
    for name, label in ATTRIBUTES.items():
        tr = [(i, label(m)) for i, m in enumerate(train[1]) if label(m) is not None]
        te = [(i, label(m)) for i, m in enumerate(test[1]) if label(m) is not None]
        if not tr or not te:
            continue
        classes = sorted({y for _, y in tr})
        y_tr = torch.tensor([classes.index(y) for _, y in tr])
        y_te = torch.tensor([classes.index(y) if y in classes else -1 for _, y in te])
        probe = fit_probe(scaled(train[0][[i for i, _ in tr]]), y_tr, len(classes), steps, seed)
        with torch.no_grad():
            guess = probe(scaled(test[0][[i for i, _ in te]])).argmax(1)
        majority = int(torch.bincount(y_tr).argmax())
        results[name] = {"accuracy": 100.0 * float((guess == y_te).float().mean()),
                         "majority": 100.0 * float((y_te == majority).float().mean()), "clips": len(te)}
    return results


def format_probes(results: dict[str, dict]) -> str:
    lines = [f"{'attribute':<13}{'probe':>7}{'majority':>10}{'clips':>7}"]
    lines += [f"{k:<13}{r['accuracy']:>7.1f}{r['majority']:>10.1f}{r['clips']:>7}" for k, r in results.items()]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Linear probes on exported video embeddings of the synthetic set: test "
                                            "accuracy per attribute beside the majority answer.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train", required=True, help="export of the train clips (.npy or .safetensors)")
    p.add_argument("--test", required=True, help="export of the test clips")
    p.add_argument("--metadata", required=True, help="the synthetic set's annotations/metadata.json")
    p.add_argument("--steps", type=int, default=500, help="full-batch Adam steps per probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the results as JSON here")
    return p


def main(args: argparse.Namespace) -> dict[str, dict]:
    metadata = {m["video_id"]: m for m in json.load(open(args.metadata))}
    sets = []
    for path in (args.train, args.test):
        x, ids = retrieval_eval.read_video_embeddings(path)
        sets.append((x, clip_metadata(ids, metadata, path)))
    results = probe_attributes(sets[0], sets[1], args.steps, args.seed)
    print(format_probes(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
