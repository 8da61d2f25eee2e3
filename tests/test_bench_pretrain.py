"""benchmarks/bench_pretrain.py runs end to end (smallest settings, its own subprocesses) and reports sane figures."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_prints_and_writes_its_figures(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_pretrain.py"), "--quick",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MFU" in proc.stdout and "breakdown quick bf16" in proc.stdout and "encoder fwd+bwd" in proc.stdout
    results = json.loads(out.read_text())
    assert {r["precision"] for r in results} == {"fp32", "bf16"}
    for r in results:
        assert r["s_per_step"] > 0 and r["peak_rss_gib"] > 0
        assert r["forward_flops"] > 0 and r["step_flops"] > r["forward_flops"]  # backward adds FLOPs
        assert 0 < r["mfu"] < 1
        assert set(r["parts_s"]) >= {"joint encoder (a)", "unimodal VTC passes (b)", "VTM negatives joint (c)",
                                     "pixel decoder", "backward", "optimizer"}
