"""attribute_probe.py: linear probes on exported embeddings, read from real export files (both formats)."""
from __future__ import annotations

import json

import pytest
import torch

import attribute_probe
import retrieval_eval
import synthetic_dataset

COLOURS = list(synthetic_dataset.COLOURS)[:4]
SHAPES = list(synthetic_dataset.SHAPES)
MOTIONS = list(synthetic_dataset.MOTIONS)


def _clips(split: str, count: int) -> list[dict]:
    return [{"video_id": f"{split}_{i:05d}", "colour": COLOURS[i % 4], "background": "black",
             "shape": SHAPES[(i // 4) % 4], "size": "small" if i % 3 else "large", "motion": MOTIONS[i % 6]}
            for i in range(count)]


def _export(path: str, clips: list[dict], seed: int) -> None:
    """Features = the object colour one-hot beside noise (no shape, size or motion in them), written by the
    export code itself."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.nn.functional.one_hot(torch.tensor([COLOURS.index(c["colour"]) for c in clips]), 4).float()
    feats = torch.cat([3 * colour, 0.1 * torch.randn(len(clips), 12, generator=g)], dim=1)
    retrieval_eval.save_embeddings(path, {"model": "test"}, feats, [f"{c['video_id'].split('_')[0]}/{c['video_id']}"
                                                                     for c in clips])


@pytest.mark.parametrize("ext", [".npy", ".safetensors"])
def test_probes_find_what_the_features_carry_and_only_that(tmp_path, ext):
    train, test = _clips("train", 96), _clips("test", 48)
    (tmp_path / "metadata.json").write_text(json.dumps(train + test))
    _export(str(tmp_path / f"a.train{ext}"), train, 0)
    _export(str(tmp_path / f"a.test{ext}"), test, 1)
    out = tmp_path / "probe.json"
    results = attribute_probe.main(attribute_probe.get_args_parser().parse_args([
        "--train", str(tmp_path / f"a.train{ext}"), "--test", str(tmp_path / f"a.test{ext}"),
        "--metadata", str(tmp_path / "metadata.json"), "--out", str(out)]))
    assert results["colour"]["accuracy"] == 100.0 and results["colour"]["majority"] == 25.0
    assert results["shape"]["accuracy"] < 50.0  # not in the features: near the 25% of a guess
    assert results["direction"]["clips"] == 32 and results["grow/shrink"]["clips"] == 16
    assert results["background"]["majority"] == 100.0  # one answer only
    assert json.loads(out.read_text()) == results


def test_a_bad_export_or_an_unknown_clip_is_named(tmp_path):
    clips = _clips("train", 8)
    _export(str(tmp_path / "e.npy"), clips, 0)
    (tmp_path / "e.json").unlink()
    with pytest.raises(FileNotFoundError, match="e.json"):
        retrieval_eval.read_video_embeddings(str(tmp_path / "e.npy"))
    with pytest.raises(ValueError, match="e.csv"):
        retrieval_eval.read_video_embeddings(str(tmp_path / "e.csv"))
    with pytest.raises(KeyError, match="train_00009"):
        attribute_probe.clip_metadata(["train/train_00009"], {c["video_id"]: c for c in clips}, "x.npy")
