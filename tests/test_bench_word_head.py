"""benchmarks/bench_word_head.py on the tiny synthetic set, one timed step a variant: it runs both families through
the pre-training's own parser, engine and loader and prints a row of figures each."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_word_head.py")


@pytest.mark.slow
def test_one_step_each_prints_both_families_with_their_masked_widths(synthetic_root):
    proc = subprocess.run([sys.executable, SCRIPT, "--data_root", str(synthetic_root), "--steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith(("simvtp", "svitt"))}
    assert set(rows) == {"simvtp", "svitt"}
    for family, row in rows.items():
        masked, _, lengths = row[2:5]  # "7/7 of 16/16": each batch's max_masked_words, then its caption length
        assert all(0 < int(m) <= int(n) for m, n in zip(masked.split("/"), lengths.split("/"))), row
        every, gathered, ratio = float(row[5]), float(row[6]), row[7]
        assert every > 0 and gathered > 0 and ratio.endswith("x")
        assert float(ratio[:-1]) == pytest.approx(every / gathered, rel=0.02, abs=0.01)  # from the unrounded times


def test_a_missing_data_root_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--data_root", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "annotations/pretrain.json not found" in proc.stderr
