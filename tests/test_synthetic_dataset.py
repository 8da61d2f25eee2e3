"""synthetic_dataset.py: every annotation file reads back, determinism, captions that need motion, rendered
motion matching its words, build-only-when-absent, the CLI and the default build time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import annotations
import synthetic_dataset as sd
import video_io
from conftest import ROOT, TINY_SYNTHETIC

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}
SMALL = dict(num_train=4, num_val=2, num_test=2, num_frames=8, fps=8, width=32, height=32)


def test_every_annotation_file_reads_back(synthetic_root):
    ann = synthetic_root / "annotations"
    counts = {s: TINY_SYNTHETIC[f"num_{s}"] for s in sd.SPLITS}
    assert sd.read_manifest(synthetic_root)["counts"] == counts
    read = {name: annotations.read_annotations(ann / name, synthetic_root) for name in sd.ANNOTATION_FILES
            if name != "metadata.json"}
    assert [len(read[n]) for n in ("train_webvid.csv", "pretrain.json", "train.json", "val.json", "test.json",
                                   "test_1k.csv")] == [counts["train"]] * 3 + [counts["val"]] + [counts["test"]] * 2
    for recs in read.values():
        assert all(os.path.getsize(r.path) > 0 for r in recs)
    # the same videos through every format; one caption in the CSV / dict formats, 2-5 paraphrases in the lists
    assert [r.path for r in read["train_webvid.csv"]] == [r.path for r in read["pretrain.json"]] == \
        [r.path for r in read["train.json"]]
    assert [r.path for r in read["test_1k.csv"]] == [r.path for r in read["test.json"]]
    assert all(len(r.captions) == 1 for n in ("train_webvid.csv", "pretrain.json", "test_1k.csv") for r in read[n])
    assert all(2 <= len(r.captions) <= 5 and len(set(r.captions)) == len(r.captions)
               for n in ("train.json", "val.json", "test.json") for r in read[n])
    assert read["test_1k.csv"][0].captions[0] == read["test.json"][0].captions[0]
    with video_io.open_video(read["val.json"][0].path) as video:
        assert video.num_frames == TINY_SYNTHETIC["num_frames"]
        assert video.get_frames([0]).shape == (1, TINY_SYNTHETIC["height"], TINY_SYNTHETIC["width"], 3)


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = sd.ensure_synthetic_dataset(tmp_path / "a", workers=1, verbose=False, seed=5, **SMALL)
    b = sd.ensure_synthetic_dataset(tmp_path / "b", workers=1, verbose=False, seed=5, **SMALL)
    c = sd.ensure_synthetic_dataset(tmp_path / "c", workers=1, verbose=False, seed=6, **SMALL)
    caps = {root: [r.captions for r in annotations.read_annotations(root / "annotations" / "train.json")]
            for root in (a, b, c)}
    assert caps[a] == caps[b] != caps[c]
    with video_io.open_video(a / "train" / "train_00001.mp4") as va, \
            video_io.open_video(b / "train" / "train_00001.mp4") as vb:
        assert np.array_equal(va.get_frames([0]), vb.get_frames([0]))
    # growing the training split leaves the test clips as they were
    d = sd.ensure_synthetic_dataset(tmp_path / "d", workers=1, verbose=False, seed=5, **{**SMALL, "num_train": 6})
    assert (d / "test" / "test_00001.mp4").read_bytes() == (a / "test" / "test_00001.mp4").read_bytes()


def test_captions_carry_words_that_need_several_frames():
    specs = [sd.sample_spec(0, "train", i, 128, 128) for i in range(300)]
    assert {s.motion for s in specs} == set(sd.MOTIONS)
    for spec in specs:
        for caption in spec.captions:
            words = set(caption.lower().replace(",", "").split())
            assert words & set(sd.DIRECTION_WORDS[spec.motion]), caption
            assert not words & set(sd.DIRECTION_WORDS[OPPOSITE[spec.motion]]), caption
    # a left-moving and a right-moving clip can share colour, shape and background: only time tells them apart
    keys = {(s.colour, s.shape, s.background, s.motion) for s in specs}
    assert any((c, sh, bg, OPPOSITE[m]) in keys for c, sh, bg, m in keys)
    assert len({c for s in specs for c in s.captions}) > 600  # synonyms and word orders


def _blob(frame, colour):
    """centre (x, y) and area of the pixels of the shape's colour"""
    ys, xs = np.nonzero(np.abs(frame.astype(int) - np.array(colour)).sum(-1) < 30)
    return xs.mean(), ys.mean(), len(xs)


@pytest.mark.parametrize("motion", list(sd.MOTIONS))
def test_rendered_motion_matches_the_words(motion):
    spec = next(s for i in range(200) for s in [sd.sample_spec(1, "val", i, 96, 64)] if s.motion == motion)
    frames = sd.render_clip(spec, 12, 96, 64)
    assert frames.shape == (12, 64, 96, 3)
    (x0, y0, a0), (x1, y1, a1) = (_blob(frames[t], sd.COLOURS[spec.colour][0]) for t in (0, -1))
    moved = {"left": x1 < x0 - 10, "right": x1 > x0 + 10, "up": y1 < y0 - 8, "down": y1 > y0 + 8,
             "grow": a1 > 2 * a0, "shrink": a0 > 2 * a1}
    assert moved[motion], (motion, x0, y0, a0, x1, y1, a1)


def test_built_only_when_absent_and_rebuilt_when_half_done(tmp_path):
    root = sd.ensure_synthetic_dataset(tmp_path / "s", workers=1, verbose=False, **SMALL)
    manifest = root / sd.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    sd.ensure_synthetic_dataset(root, workers=1, verbose=False, **SMALL)
    assert manifest.stat().st_mtime_ns == stamp  # finished build reused
    manifest.unlink()  # as if the build had died before its last step
    (root / "train" / "leftover.mp4").write_bytes(b"partial")
    (root / "notes.txt").write_text("not ours")
    sd.ensure_synthetic_dataset(root, workers=1, verbose=False, **SMALL)
    assert manifest.exists() and not (root / "train" / "leftover.mp4").exists() and (root / "notes.txt").exists()
    sd.ensure_synthetic_dataset(root, workers=1, verbose=False, **{**SMALL, "num_val": 3})  # other options
    assert sd.read_manifest(root)["counts"]["val"] == 3 and (root / "val" / "val_00002.mp4").exists()


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        sd.ensure_synthetic_dataset(tmp_path, width=33)
    with pytest.raises(ValueError, match="decord cannot read"):
        sd.ensure_synthetic_dataset(tmp_path, width=48)
    with pytest.raises(TypeError, match="unknown synthetic dataset options"):
        sd.ensure_synthetic_dataset(tmp_path, clips=3)


def test_mpeg4_fallback_codec_decodes(tmp_path):
    root = sd.ensure_synthetic_dataset(tmp_path, workers=1, verbose=False, codec="mpeg4",
                                       **{**SMALL, "num_train": 1, "num_val": 0, "num_test": 0})
    for backend in ("decord", "pyav"):
        with video_io.open_video(root / "train" / "train_00000.mp4", backend) as video:
            assert video.num_frames == SMALL["num_frames"] and video.get_frames([7]).shape == (1, 32, 32, 3)


def test_cli_help_and_build(tmp_path, capsys):
    help_text = subprocess.run([sys.executable, str(ROOT / "synthetic_dataset.py"), "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--out" in help_text and "--num_train" in help_text and "--seed" in help_text
    argv = ["--out", str(tmp_path), "--num_train", "2", "--num_val", "1", "--num_test", "1", "--frames", "6",
            "--size", "64x32", "--workers", "1"]
    sd.main(argv)
    assert "synthetic dataset: 4 clips" in capsys.readouterr().out
    sd.main(argv)
    assert "already built" in capsys.readouterr().out
    sd.main([*argv, "--force"])
    assert "synthetic dataset: 4 clips" in capsys.readouterr().out
    with video_io.open_video(tmp_path / "test" / "test_00000.mp4") as video:
        assert video.get_frames([0]).shape == (1, 32, 64, 3)


@pytest.mark.slow
def test_default_build_is_fast(tmp_path):
    start = time.perf_counter()
    root = sd.ensure_synthetic_dataset(tmp_path, verbose=False)  # the defaults: 320 / 48 / 64 clips, 2 processes
    seconds = time.perf_counter() - start
    assert json.loads((root / sd.MANIFEST).read_text())["counts"] == {"train": 320, "val": 48, "test": 64}
    assert seconds < 60, seconds
