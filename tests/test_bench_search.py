"""benchmarks/bench_search.py at its smallest settings (--quick: the tiny model, 300 rows, 3 queries) on the synthetic
test videos: it runs, prints both tables and writes sane figures."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_search.py")


@pytest.mark.slow
def test_quick_run_prints_and_writes_its_figures(tmp_path, synthetic_root):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--videos", str(synthetic_root / "test"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for section in ("Indexing (decode + thumbnail", "Query latency, ms", "HTTP round trip", "load average after"):
        assert section in proc.stdout, section
    (result,) = json.loads(out.read_text())["results"]
    assert result["indexing"]["videos"] == 8 and result["indexing"]["videos_per_s"] > 0 and result["rows"] == 300
    timings = [result["in_process"][k] for k in ("search", "text_encoding", "ranking")] + [result["http"]]
    assert all(0 <= t["median_ms"] <= t["p90_ms"] for t in timings)
