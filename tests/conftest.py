"""Shared test data, built once per test session in pytest's temporary directory (nothing is written to the repo).

Fixtures (all session-scoped):
- ``synthetic_root``: Path of a tiny synthetic video-text set (24 train / 8 val / 8 test clips, 16 frames,
  64x64 @ 8 fps, seed 0) with every annotation file of synthetic_dataset.py; use it as ``--data_root``.
- ``video_files``: dict name -> Path of small real videos of different sizes, frame rates and containers; every
  frame carries its own index as a binary code (read it back with ``frame_index_of``).
- ``broken_videos``: dict kind -> Path for the broken-media policy: "missing", "empty" (0 bytes), "truncated"
  (half an mp4), "not_a_video" (a text file named .mp4).
- ``pretrained_checkpoint``: path of a tiny SimVTP pre-training checkpoint (simvtp_tiny_patch16, 4 frames of 32 px,
  one step on ``synthetic_root``) written by run_simvtp_pretraining.py itself, for end-to-end tests that start
  from pre-trained weights (built once per pytest process instead of once per test file).
``module_tmp`` is ``tmp_path_factory`` for module-scoped fixtures: what it makes is deleted when the module's tests
end (a tiny model's checkpoint with its optimizer state is ~170 MB; pytest.ini deletes a passing test's ``tmp_path``).
``mostly_broken_list`` writes a training list of good synthetic clips, missing files and those unreadable files;
``run_as_main`` runs an entry point's ``__main__`` block in the test's process (exit status, stdout, stderr).

Tiers: tests that train, start processes or take more than about a second carry ``@pytest.mark.slow``;
``bash scripts/test.sh --fast`` (``-m "not slow"``) runs the rest, the pure-logic and small-I/O tests, for the
edit-test loop. ``bash scripts/test.sh`` runs everything.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the modules live flat in the repo root (also when run as plain `pytest`)
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: one torch thread each (and in the processes
    os.environ["OMP_NUM_THREADS"] = "1"  # they start), or their OpenMP threads spin-wait on each other's cores

import synthetic_dataset  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: trains, starts processes or takes seconds; "
                                       "`bash scripts/test.sh --fast` leaves these out")

TINY_SYNTHETIC = dict(num_train=24, num_val=8, num_test=8, num_frames=16, fps=8, width=64, height=64, seed=0)

# name -> (width, height, fps, frames, codec, extension). mkv stores no frame count (exercises the fallback).
VIDEO_SPECS = {
    "small_10fps": (96, 64, 10, 30, "libx264", ".mp4"),
    "wide_25fps": (160, 90, 25, 75, "libx264", ".mp4"),
    "large_30fps": (320, 180, 30, 90, "libx264", ".mp4"),
    "tall_mpeg4": (64, 112, 15, 40, "mpeg4", ".mp4"),
    "mkv_24fps": (128, 72, 24, 50, "libx264", ".mkv"),
}

_BITS, _CELL = 7, 8  # frame index as 7 black/white cells of 8x8 px in the top-left corner



def randomised(module, seed: int, scale: float = 0.1):
    """Replace every parameter with seeded noise of std `scale` (vectors such as LayerNorm weights around 1, so
    the outputs stay in range): weights that differ from any initialisation, for loading and equality tests."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))
    return module


def index_frames(width: int, height: int, num_frames: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a drifting colour gradient, with frame t's index t written as a binary code."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = (xx * 255 // max(1, width - 1) + 3 * t) % 256
        frames[t, ..., 1] = (yy * 255 // max(1, height - 1)) % 256
        frames[t, ..., 2] = 128
        for b in range(_BITS):
            frames[t, :_CELL, b * _CELL:(b + 1) * _CELL] = 255 if (t >> b) & 1 else 0
    return frames


def frame_index_of(frame: np.ndarray) -> int:
    """Read back the index written by index_frames (robust to compression)."""
    cells = [frame[2:_CELL - 2, b * _CELL + 2:(b + 1) * _CELL - 2].mean() for b in range(_BITS)]
    return sum(1 << b for b, v in enumerate(cells) if v > 127)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, so parallel distributed tests do not collide on a fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_as_main(capsys, script: str, *argv: str) -> subprocess.CompletedProcess:
    """`python <script> argv...` as the script's own `__main__` block runs it (argument parsing, one-line errors,
    exit status), in this process, run from the repository folder: for the tests about what a user sees, not about
    the process (which saves the ~4 s of importing torch and timm in a new one)."""
    import runpy
    import signal
    script = str(ROOT / script)
    sigint = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    status = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [script, *argv])
        patch.chdir(ROOT)
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            status = stop.code or 0
        finally:
            signal.signal(signal.SIGINT, sigint)  # entry points install their Ctrl-C handler
    out = capsys.readouterr()
    return subprocess.CompletedProcess([script, *argv], status, out.out, out.err)


def _write(path: Path, width: int, height: int, fps: int, n: int, codec: str, faststart: bool = False) -> Path:
    synthetic_dataset.write_video(path, index_frames(width, height, n), fps, codec, faststart=faststart)
    return path


def mostly_broken_list(synthetic_root: Path, broken_videos: dict[str, Path], folder: Path, good: int,
                       missing: int) -> tuple[str, set[str]]:
    """A release JSON dict: `good` synthetic clips and `missing` absent files (relative to --data_root), plus the
    three unreadable files of the broken_videos fixture (absolute paths) -> (annotation path, broken full paths)."""
    records = json.load(open(os.path.join(synthetic_root, "annotations", "pretrain.json")))
    entries = dict(list(records.items())[:good])
    entries.update({f"train/gone_{i:02d}.mp4": f"a clip that was never downloaded {i}" for i in range(missing)})
    unreadable = [str(p) for k, p in broken_videos.items() if k != "missing"]
    entries.update({p: f"an unreadable clip {os.path.basename(p)}" for p in unreadable})
    anno = folder / "mostly_broken.json"
    anno.write_text(json.dumps(entries))
    broken = {os.path.join(str(synthetic_root), f"train/gone_{i:02d}.mp4") for i in range(missing)} | set(unreadable)
    return str(anno), broken


class ModuleTmp:
    """mktemp like tmp_path_factory's; every folder made is removed by the fixture's teardown."""

    def __init__(self, factory: pytest.TempPathFactory):
        self.factory, self.made = factory, []

    def mktemp(self, name: str) -> Path:
        self.made.append(self.factory.mktemp(name))
        return self.made[-1]


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """Folders for one test module's shared runs, deleted when its tests are done, so the suite's peak disk use
    stays near one module's runs instead of every checkpoint it ever wrote."""
    folders = ModuleTmp(tmp_path_factory)
    yield folders
    for folder in folders.made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Path of the tiny synthetic dataset (see TINY_SYNTHETIC); annotations under <root>/annotations."""
    root = tmp_path_factory.mktemp("synthetic")
    return synthetic_dataset.ensure_synthetic_dataset(root, workers=1, verbose=False, **TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def video_files(tmp_path_factory) -> dict[str, Path]:
    """name -> Path of small index-coded videos (VIDEO_SPECS): different sizes, frame rates, codecs, containers.
    Also "faststart": an mp4 with its index first (as web videos), 160x90 @ 25 fps, 60 frames."""
    folder = tmp_path_factory.mktemp("videos")
    files = {name: _write(folder / f"{name}{ext}", w, h, fps, n, codec)
             for name, (w, h, fps, n, codec, ext) in VIDEO_SPECS.items()}
    files["faststart"] = _write(folder / "faststart.mp4", 160, 90, 25, 60, "libx264", faststart=True)
    return files


@pytest.fixture(scope="session")
def broken_videos(tmp_path_factory) -> dict[str, Path]:
    """kind -> Path of a video file no decoder can read: missing, empty, truncated, not_a_video."""
    folder = tmp_path_factory.mktemp("broken")
    good = _write(folder / "good.mp4", 96, 64, 10, 30, "libx264")
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])  # an interrupted download: no index (moov)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "not_a_video.mp4").write_text("this is a caption file, not a video\n" * 20)
    return {"missing": folder / "missing.mp4", "empty": folder / "empty.mp4",
            "truncated": folder / "truncated.mp4", "not_a_video": folder / "not_a_video.mp4"}


@pytest.fixture(scope="session")
def pretrained_checkpoint(synthetic_root, tmp_path_factory) -> str:
    """One pre-training step of the tiny SimVTP through the real entry point: weights, model_cfg and the args that
    drive what is built from it (clip shape, tokenizer)."""
    import run_simvtp_pretraining  # lazy: only the end-to-end tests pay for the model stack

    out = tmp_path_factory.mktemp("pretrained")
    argv = ["--data_path", os.path.join(synthetic_root, "annotations", "pretrain.json"),
            "--data_root", str(synthetic_root), "--model", "simvtp_tiny_patch16", "--num_frames", "4",
            "--sampling_rate", "2", "--input_size", "32", "--batch_size", "4", "--epochs", "1", "--max_steps", "1",
            "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--output_dir", str(out)]
    run_simvtp_pretraining.main(run_simvtp_pretraining.get_args_parser().parse_args(argv))
    return str(out / (out / "latest").read_text().strip())
