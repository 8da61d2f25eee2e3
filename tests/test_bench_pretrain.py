"""benchmarks/bench_pretrain.py end to end at its smallest settings (--quick: the tiny model at 4 x 32 px, batch 2,
one step per precision, each in its own process): it runs, prints every section and writes sane figures; the
--speed_options jobs, run in the test's process, do less work than the plain step."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_pretrain.py")


@pytest.mark.slow
def test_quick_run_prints_and_writes_its_figures(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout
    for section in ("Step = engine forward", "MFU", "peak RSS GiB", "Breakdown: quick fp32", "Breakdown: quick bf16",
                    "fp32 vs bf16", "encoder alone, quick bf16", "Targets: base", "load average"):
        assert section in text, section
    results = json.loads(out.read_text())["results"]
    assert [(r["config"], r["precision"]) for r in results] == [("quick", "fp32"), ("quick", "bf16")]
    for r in results:
        assert r["s_per_step"] > 0 and r["clips_per_s"] > 0 and r["peak_rss_gib"] > 0.1
        assert r["step_flops"] > r["forward_flops"] > 0  # backward adds FLOPs
        assert all(v > 0 for v in r["peak_flops"].values()) and all(v > 0 for v in r["mfu"].values())
        parts = r["parts"]
        assert parts["joint encoder pass (a)"]["forward_flops"] > 0 and parts["pixel decoder"]["backward_s"] > 0
        rows = sum(v for p in parts.values() for k, v in p.items() if k.endswith("_s"))
        assert abs(rows - r["s_per_step"]) < 0.02 * r["s_per_step"] + 1e-3  # the breakdown adds up to the step
    encoder = results[1]["encoder"]
    assert encoder["0.9"]["tokens"] < encoder["0.0"]["tokens"] and encoder["speedup"] > 0


@pytest.mark.slow
def test_speed_options_are_timed_beside_the_plain_step(capsys):
    """--speed_options adds one job per option at the same config and precision; each does less work. (In fp32:
    CPUs without native bf16 emulate it, several times slower.) The jobs run in this process (run_job, what each
    job process runs; the test above starts the job processes): the plan and the report are the script's."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import bench_pretrain
    import torch

    jobs = bench_pretrain.plan_jobs(bench_pretrain.get_args(["--quick", "--threads", "1", "--precision", "fp32",
                                                             "--speed_options"]))
    threads = torch.get_num_threads()
    try:
        results = [bench_pretrain.run_job(job) for job in jobs]
    finally:
        torch.set_num_threads(threads)  # run_job sets its job's thread count
    capsys.readouterr()
    bench_pretrain.print_report(results)
    assert "Method options (off by default) and allocators against the paper's method" in capsys.readouterr().out
    flops = {r["config"]: r["step_flops"] for r in results}
    assert list(flops) == ["quick", "quick + decode 50%", "quick + 1 negative", "quick + both"]
    assert flops["quick + both"] < min(flops["quick + decode 50%"], flops["quick + 1 negative"])
    assert max(flops["quick + decode 50%"], flops["quick + 1 negative"]) < flops["quick"]


def test_cpu_attention_is_counted():
    """torch's FlopCounterMode has no formula for the CPU attention kernel; the benchmark adds it."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_pretrain

    bench_pretrain.import_training_stack()
    import torch

    class Attend(torch.nn.Module):
        def forward(self, batch):
            q = batch["q"]
            return {"loss": torch.nn.functional.scaled_dot_product_attention(q, q, q).sum()}

    clock = bench_pretrain.PartClock()
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    forward, total = bench_pretrain.count_flops(Attend(), {"q": q}, torch.float32, clock)
    assert forward == 4 * 2 * 3 * 10 * 10 * 8  # QK^T and AV, 2 FLOPs per multiply-add
    assert total > 2 * forward


def test_an_allocator_is_preloaded_from_its_library_file_or_named_with_its_package(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_pretrain
    import pytest

    assert bench_pretrain.allocator_library("glibc") is None  # the default malloc: nothing preloaded
    with pytest.raises(SystemExit, match="apt-get install libtcmalloc-minimal4"):
        bench_pretrain.allocator_library("tcmalloc", dirs=(str(tmp_path),))
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert bench_pretrain.allocator_library("tcmalloc", dirs=("/nonexistent", str(tmp_path))) == \
        str(tmp_path / "libtcmalloc_minimal.so.4")
    with pytest.raises(SystemExit, match="unknown allocator 'mimalloc'"):
        bench_pretrain.allocator_library("mimalloc")


def test_attention_table_times_both_paths_and_prints_the_models_table(capsys):
    """--attention_table --quick: SDPA and explicit attention timed per precision and key count, the bf16 rows in
    modeling_simvtp.CPU_BF16_ATTENTION_MS's format with the threshold they give."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import bench_pretrain

    table = bench_pretrain.print_attention_table(bench_pretrain.get_args(["--attention_table", "--quick",
                                                                          "--threads", "1"]))
    assert list(table) == ["fp32", "bf16"] and list(table["bf16"]) == [16, 64]
    assert all(f > 0 and e > 0 for rows in table.values() for _, f, e in rows.values())
    out = capsys.readouterr().out
    assert "modeling_simvtp.CPU_BF16_ATTENTION_MS = {16: ((2, 2, 16, 8)," in out and "explicit attention on CPU" in out
