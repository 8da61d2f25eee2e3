"""benchmarks/bench_dataloader.py at its smallest settings (--quick on its own small synthetic set, PyAV, one
process): it runs, prints a row per setting and times repeated sampling beside one clip per read."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_dataloader.py")


@pytest.mark.slow
def test_quick_run_times_one_and_two_clips_per_read(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--sets", "synthetic", "--backends", "pyav",
                           "--workers", "0", "--decode_threads", "1", "--clips_per_video", "1", "2",
                           "--batch_size", "4", "--batches", "2", "--warmup", "1", "--data_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("synthetic ")]
    assert [(r[5], r[6], r[7]) for r in rows] == [("0", "1", "1"), ("0", "1", "2")]  # workers, threads, per read
    assert all(float(r[8]) > 0 for r in rows)  # clips/s


@pytest.mark.slow
def test_clips_per_read_must_divide_the_batch(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--clips_per_video", "3", "--batch_size", "4",
                           "--data_dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "every --clips_per_video must divide --batch_size 4" in proc.stderr
