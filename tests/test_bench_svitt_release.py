"""bench_svitt.py --release_src: the logic around the SViTT release's jobs (its variant settings, the job plan,
the same-run table, the interpreter and checkout checks), without the release itself: it needs a fetched
checkout and an environment of its own, which CI does not have."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_common  # noqa: E402
import bench_svitt  # noqa: E402


def fake_checkout(root: Path) -> Path:
    for name in bench_common.SVITT_RELEASE_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root


def test_release_encoder_args_use_its_own_names_and_dense_path():
    assert bench_svitt.release_encoder_args("dense", 8) == {"sparse_random_attn": None}
    assert bench_svitt.release_encoder_args("edge", 8) == dict(sparse_local_attn=1, sparse_random_attn=3,
                                                               attn_block_size=56)
    node = bench_svitt.release_encoder_args("edge+node", 8)
    assert node == dict(sparse_local_attn=1, sparse_random_attn=3, attn_block_size=56, token_keep_rate=0.6,
                        token_drop_loc=[3, 6, 9])
    json.dumps(node)  # it travels as JSON
    assert bench_svitt.release_encoder_args("edge+node", 16)["token_keep_rate"] == 0.5


def test_release_plan_follows_our_rows_and_interleaves(tmp_path):
    args = bench_svitt.get_args(["--frames", "4", "8", "--precision", "fp32", "--passes", "fwd", "--repeats", "1",
                                 "--no_attn_memory", "--release_src", str(fake_checkout(tmp_path))])
    tower, _ = bench_svitt.plan(args)
    release = bench_svitt.plan_release(args, tower)
    assert [bench_svitt.row_key(j) for j in release] == [bench_svitt.row_key(j) for j in tower]
    assert all(j["kind"] == "release" and j["repeats"] == 1 and j["threads"] == args.threads for j in release)
    jobs = bench_svitt.interleave(tower, release)
    assert [j["kind"] for j in jobs] == ["tower", "release"] * len(tower)
    assert bench_svitt.plan_release(bench_svitt.get_args([]), tower) == []
    assert bench_svitt.interleave(tower, []) == tower


def test_release_src_must_be_a_svitt_checkout(tmp_path):
    args = bench_svitt.get_args(["--release_src", str(tmp_path)])
    with pytest.raises(SystemExit, match="JerryYLi/svitt"):
        bench_svitt.plan_release(args, [])


def test_release_python_missing_names_how_to_build_it(tmp_path):
    with pytest.raises(SystemExit, match=r"python3\.11 -m venv .*transformers==4\.55"):
        bench_svitt.release_python(str(tmp_path / "no_python"))
    assert bench_svitt.release_python(sys.executable) == sys.executable


def test_release_rows_give_same_run_ratios_and_failures():
    def row(variant, seconds, rss=1024.0, **extra):
        return dict(frames=8, precision="fp32", passes="fwd", variant=variant, seconds=seconds, peak_rss_mib=rss,
                    **extra)
    ours = [row("dense", 4.0), row("edge", 1.0), row("edge+node", 0.5, rss=2048.0)]
    theirs = [row("dense", 3.0), row("edge", None, error="boom"), row("edge+node", 2.0), dict(row("dense", 9.0),
                                                                                              frames=16)]
    rows = bench_svitt.release_rows(ours, theirs)
    assert rows == [[8, "fp32", "fwd", "dense", "3.000", "4.000", "0.75x", "1.00", "1.00"],
                    [8, "fp32", "fwd", "edge", "failed", "1.000", "-", "-", "1.00"],
                    [8, "fp32", "fwd", "edge+node", "2.000", "0.500", "4.00x", "1.00", "2.00"]]


def test_job_runs_in_the_given_interpreter_with_extra_arguments(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import json, sys\nargv = sys.argv[1:]\njob = json.loads(argv[argv.index('--job') + 1])\n"
                      "json.dump(dict(job, argv=argv[:2], python=sys.executable), "
                      "open(argv[argv.index('--job_out') + 1], 'w'))\n")
    out = bench_common.run_job_in_subprocess(str(script), {"x": 1}, str(tmp_path / "out.json"), "test",
                                             python=sys.executable, args=("--src", "DIR"))
    assert out == {"x": 1, "argv": ["--src", "DIR"], "python": sys.executable}
