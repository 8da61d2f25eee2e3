"""The recipe scripts: DRY_RUN=1 prints the torchrun command; it must quote paths with spaces, carry the paper's
recipe, and every flag in it must be one the entry point's parser accepts (a renamed flag breaks a 64-GPU job
only after it has been queued)."""
import os
import shlex
import subprocess

import pytest

import run_simvtp_finetuning
import run_simvtp_pretraining

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", script), *args], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", **env}, check=True)
    return shlex.split(out.stdout)


def _script_args(cmd: list[str], entry: str) -> list[str]:
    return cmd[cmd.index(entry) + 1:]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_pretrain_webvid_is_the_papers_recipe_with_quoted_paths():
    cmd = _dry_run("pretrain_webvid.sh", "/data/web vid/results_2M_train.csv", "/data/web vid/videos", "out dir",
                   "--keep_last", "5", NODE_RANK="3", MASTER_ADDR="node0", INIT_CKPT="/ckpt/video mae.pth")
    assert cmd[0] == "torchrun"
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


def test_only_test_msrvtt_uses_15_by_3_views():
    cmd = _dry_run("only_test_msrvtt.sh", "test 1k.csv", "/videos", "best.pth", "out")
    args = run_simvtp_finetuning.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_finetuning.py"))
    assert args.only_test and args.finetune == "best.pth"
    assert (args.test_num_segment, args.test_num_crop) == (15, 3)


@pytest.mark.parametrize("script", ["pretrain_webvid.sh", "finetune_msrvtt.sh", "only_test_msrvtt.sh"])
def test_missing_arguments_print_usage_and_exit_2(script):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "DATA_ROOT")}
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", script)], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "usage" in out.stderr
