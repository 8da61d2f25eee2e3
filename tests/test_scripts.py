"""The recipe scripts: DRY_RUN=1 prints the launch command; it must quote paths with spaces, carry the paper's
recipe, and every flag in it must be one the entry point's parser accepts (a renamed flag breaks a 64-GPU job
only after it has been queued). They launch with the project's python (`-m torch.distributed.run`), so they run
with no activated environment and no torchrun on PATH: one really runs that way."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import checkpoint
import model_registry
import run_simvtp_finetuning
import run_simvtp_pretraining
from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", script), *args], capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if k != "PY"}, "DRY_RUN": "1", **env},
                         check=True)
    return shlex.split(out.stdout)


def _script_args(cmd: list[str], entry: str) -> list[str]:
    return cmd[cmd.index(entry) + 1:]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _launches_with_the_projects_python(cmd: list[str], python: str = os.path.join(REPO, ".venv", "bin", "python")):
    assert cmd[:3] == [python, "-m", "torch.distributed.run"], cmd[:3]


def test_pretrain_webvid_is_the_papers_recipe_with_quoted_paths():
    cmd = _dry_run("pretrain_webvid.sh", "/data/web vid/results_2M_train.csv", "/data/web vid/videos", "out dir",
                   "--keep_last", "5", NODE_RANK="3", MASTER_ADDR="node0", INIT_CKPT="/ckpt/video mae.pth")
    _launches_with_the_projects_python(cmd)
    assert (_flag(cmd, "--nnodes"), _flag(cmd, "--nproc_per_node"), _flag(cmd, "--node_rank")) == ("8", "8", "3")
    assert _flag(cmd, "--master_addr") == "node0"
    args = run_simvtp_pretraining.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_pretraining.py"))
    assert args.data_path == "/data/web vid/results_2M_train.csv" and args.output_dir == "out dir"
    assert args.init_ckpt == "/ckpt/video mae.pth" and args.keep_last == 5
    assert (args.batch_size, args.epochs, args.lr, args.warmup_epochs) == (16, 200, 1.5e-4, 40)
    assert (args.mask_type, args.mask_ratio, args.text_mask_ratio) == ("tube", 0.9, 0.75)
    assert (args.num_frames, args.sampling_rate, args.input_size) == (16, 4, 224)
    assert args.model == "simvtp_base_patch16" and args.decoder_depth == 4


def test_finetune_msrvtt_flags_parse_and_select_on_validation_not_test():
    cmd = _dry_run("finetune_msrvtt.sh", "train 9k.json", "test 1k.csv", "/videos", "pre.pth", "out")
    args = run_simvtp_finetuning.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_finetuning.py"))
    assert args.data_path == "train 9k.json" and args.test_data_path == "test 1k.csv"
    assert args.val_fraction > 0 and args.val_data_path is None
    assert (args.batch_size, args.epochs, args.lr, args.test_num_segment, args.test_num_crop) == (8, 100, 3e-4, 3, 3)
    assert _flag(cmd, "--nproc_per_node") == "8"
    _launches_with_the_projects_python(cmd)


def test_only_test_msrvtt_uses_15_by_3_views():
    cmd = _dry_run("only_test_msrvtt.sh", "test 1k.csv", "/videos", "best.pth", "out")
    args = run_simvtp_finetuning.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_finetuning.py"))
    assert args.only_test and args.finetune == "best.pth"
    assert (args.test_num_segment, args.test_num_crop) == (15, 3)
    _launches_with_the_projects_python(cmd)
    given = _dry_run("only_test_msrvtt.sh", "t.csv", "/v", "b.pth", "o", PY="/opt/conda env/bin/python")
    _launches_with_the_projects_python(given, "/opt/conda env/bin/python")  # PY= chooses another environment


@pytest.mark.parametrize("script", ["pretrain_webvid.sh", "finetune_msrvtt.sh", "only_test_msrvtt.sh"])
def test_missing_arguments_print_usage_and_exit_2(script):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "DATA_ROOT")}
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", script)], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "usage" in out.stderr
    assert "runs in .venv via scripts/setup_env.sh; PY=/path/to/python" in out.stderr


def _path_without_torchrun() -> str:
    """PATH minus every folder holding torchrun or this interpreter (a venv's bin): as in a fresh login shell."""
    here = os.path.dirname(sys.executable)
    kept = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and os.path.realpath(d) != os.path.realpath(here) and not shutil.which("torchrun", path=d)]
    path = os.pathsep.join(kept)
    assert shutil.which("torchrun", path=path) is None and shutil.which("bash", path=path)
    return path


def test_only_test_recipe_runs_without_an_activated_environment(synthetic_root, tmp_path):
    """Before: the recipes called a bare `torchrun`: "torchrun: command not found" unless .venv was activated.
    Here the real script runs one process on the synthetic test split (tiny model flags appended), with no
    torchrun on PATH, the environment given as PY (the .venv a fresh checkout would get from setup_env.sh)."""
    model = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4)
    ckpt = str(tmp_path / "finetuned.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg}, ckpt)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DRY_RUN", "PYTHONPATH")}
    env.update(PATH=_path_without_torchrun(), PY=sys.executable, GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    out = tmp_path / "test out"
    run = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "only_test_msrvtt.sh"),
         str(synthetic_root / "annotations" / "test_1k.csv"), str(synthetic_root), ckpt, str(out),
         "--model", "simvtp_dual_tiny_patch16", "--device", "cpu", "--precision", "fp32", "--input_size", "32",
         "--short_side_size", "32", "--num_frames", "4", "--sampling_rate", "2", "--test_num_segment", "1",
         "--test_num_crop", "1", "--num_workers", "0", "--batch_size", "8"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["v2t_queries"] == 8
