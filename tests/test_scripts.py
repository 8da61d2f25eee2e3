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
import cross_modal_probe
import model_registry
import engine_for_retrieval
import run_simvtp_finetuning
import run_simvtp_pretraining
import run_simvtp_qa
import run_simvtp_vis
import search
from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env(**env: str) -> dict:
    """This environment without what would change a recipe's launch (PY, SLURM's job, a rendezvous)."""
    drop = ("PY", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "GPUS_PER_NODE", "LAUNCHER", "REPO")
    return {**{k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}, **env}


def _dry_run_commands(script: str, *args: str, cwd: str | None = None, **env: str) -> list[list[str]]:
    """Each command a script prints with DRY_RUN=1, one per line, split as the shell would."""
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", script), *args], capture_output=True, text=True,
                         env=_clean_env(DRY_RUN="1", **env), check=True, cwd=cwd)
    return [shlex.split(line) for line in out.stdout.splitlines()]


def _dry_run(script: str, *args: str, cwd: str | None = None, **env: str) -> list[str]:
    return [word for cmd in _dry_run_commands(script, *args, cwd=cwd, **env) for word in cmd]


def _script_args(cmd: list[str], entry: str) -> list[str]:
    """The entry point's flags: what follows the repository's ENTRY (launched by its absolute path)."""
    return cmd[cmd.index(os.path.join(REPO, entry)) + 1:]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _launches_with_the_projects_python(cmd: list[str], python: str = os.path.join(REPO, ".venv", "bin", "python")):
    assert cmd[:3] == [python, "-m", "torch.distributed.run"], cmd[:3]


def test_pretrain_webvid_is_the_papers_recipe_with_quoted_paths(tmp_path):
    cmd = _dry_run("pretrain_webvid.sh", "/data/web vid/results_2M_train.csv", "/data/web vid/videos", "out dir",
                   "--keep_last", "5", NODE_RANK="3", MASTER_ADDR="node0", INIT_CKPT="/ckpt/video mae.pth",
                   cwd=str(tmp_path))
    _launches_with_the_projects_python(cmd)
    assert (_flag(cmd, "--nnodes"), _flag(cmd, "--nproc_per_node"), _flag(cmd, "--node_rank")) == ("8", "8", "3")
    assert _flag(cmd, "--master_addr") == "node0"
    args = run_simvtp_pretraining.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_pretraining.py"))
    # a relative path is taken from where the recipe was started, and printed absolute
    assert args.data_path == "/data/web vid/results_2M_train.csv" and args.output_dir == str(tmp_path / "out dir")
    assert args.init_ckpt == "/ckpt/video mae.pth" and args.keep_last == 5
    assert (args.batch_size, args.epochs, args.lr, args.warmup_epochs) == (16, 200, 1.5e-4, 40)
    assert (args.mask_type, args.mask_ratio, args.text_mask_ratio) == ("tube", 0.9, 0.75)
    assert (args.num_frames, args.sampling_rate, args.input_size) == (16, 4, 224)
    assert args.model == "simvtp_base_patch16" and args.decoder_depth == 4


def test_svitt_recipe_is_the_papers_and_its_flags_build_the_sparse_model(tmp_path):
    cmd = _dry_run("svitt_pretrain_webvid.sh", "/d/webvid.csv", "/d/videos", "out", "--keep_last", "2",
                   BEIT_PATH="/w/beit dir", BERT_PATH="/w/bert", cwd=str(tmp_path))
    _launches_with_the_projects_python(cmd)
    assert (_flag(cmd, "--nnodes"), _flag(cmd, "--nproc_per_node")) == ("1", "8")
    args = run_simvtp_pretraining.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_pretraining.py"))
    assert args.model == "svitt_base_patch16_224" and args.beit_path == "/w/beit dir" and args.bert_path == "/w/bert"
    assert (args.num_frames, args.input_size, args.sample_type, args.sample_type_test) == (4, 224, "rand", "middle")
    assert (args.batch_size, args.lr, args.min_lr, args.weight_decay, args.epochs, args.warmup_epochs) == \
        (32, 3e-5, 3e-7, 0.02, 10, 1)
    kwargs = model_registry.model_kwargs(args, args.model, vocab_size=30522)
    assert kwargs["token_keep_rate"] == 0.7 and kwargs["token_drop_loc"] == [3, 6, 9]
    assert (kwargs["sparse_local_attn"], kwargs["sparse_random_attn"], kwargs["attn_block_size"]) == (1, 3, 56)
    assert args.text_mask_ratio == 0.5 and args.output_dir == str(tmp_path / "out")


def test_svitt_expand_starts_the_next_stage_from_the_checkpoint(tmp_path):
    cmd = _dry_run("svitt_expand.sh", "stage1/ck.pth", "8", "0.6", "/d/webvid.csv", "/d/videos", "/out8",
                   "--epochs", "5", cwd=str(tmp_path))
    args = run_simvtp_pretraining.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_pretraining.py"))
    assert args.init_ckpt == str(tmp_path / "stage1" / "ck.pth")
    assert (args.num_frames, args.token_keep_rate, args.epochs) == (8, 0.6, 5)
    run = subprocess.run(["bash", os.path.join(REPO, "scripts", "svitt_expand.sh"), "/no/such.pth", "8", "0.6",
                          "/d/a.csv", "/d/v", "/out"], capture_output=True, text=True, env=_clean_env())
    assert run.returncode == 2 and run.stderr.strip() == "error: checkpoint not found: /no/such.pth"


SVITT_RET = {  # dataset -> (max text length, paragraphs, match by caption, test file, has a val file)
    "msrvtt": (64, False, False, "msrvtt_ret_test1k.json", False),
    "didemo": (64, True, False, "didemo_ret_test.json", True),
    "charades": (48, False, False, "charades-script_test.json", False),
    "ssv2_label": (25, False, True, "ssv2_ret_label_val_small.json", False),
    "ssv2_template": (25, False, True, "ssv2_ret_template_val_small.json", False),
    "anet": (150, True, False, "anet_ret_val_1.json", False)}


@pytest.mark.parametrize("dataset", SVITT_RET)
def test_svitt_retrieval_recipes_parse_and_carry_the_release_settings(dataset, tmp_path):
    """Both recipes for every dataset: the flags parse, the family's flags build the sparse model, the dataset's
    own settings apply, and fine-tuning selects on a validation split, never on the test file."""
    max_len, paragraphs, by_caption, test_file, has_val = SVITT_RET[dataset]
    parser = run_simvtp_finetuning.get_args_parser()
    for script in ("svitt_train_ret.sh", "svitt_eval_ret.sh"):
        cmd = _dry_run(script, dataset, "ck.pth", "out", "--seed", "3", cwd=str(tmp_path), DATA_DIR="sl data")
        _launches_with_the_projects_python(cmd)
        args = parser.parse_args(_script_args(cmd, "run_simvtp_finetuning.py"))
        assert args.test_data_path == str(tmp_path / "sl data" / "anno_downstream" / test_file)
        assert args.finetune == str(tmp_path / "ck.pth") and args.seed == 3
        assert (args.model, args.num_frames, args.num_frames_test, args.eval_frame_ensemble) == \
            ("svitt_retrieval_base_patch16_224", 4, 12, "lse")
        assert (args.sample_type, args.sample_type_test, args.rerank_k, args.max_text_len) == \
            ("rand", "middle", 128, max_len)
        fmt = engine_for_retrieval.annotation_format(args)
        assert (fmt.paragraphs, fmt.match_by == "caption") == (paragraphs, by_caption)
        kwargs = model_registry.model_kwargs(args, args.model, vocab_size=30522)
        assert (kwargs["sparse_local_attn"], kwargs["sparse_random_attn"], kwargs["token_keep_rate"]) == (1, 3, 0.7)
        if script == "svitt_train_ret.sh":
            assert (args.lr, args.min_lr, args.warmup_epochs, args.epochs, args.weight_decay, args.batch_size) == \
                (1e-5, 1e-6, 0, 10, 0.02, 32)
            assert (args.val_data_path is not None) == has_val and (has_val or args.val_fraction > 0)
            assert args.val_data_path != args.test_data_path
        else:
            assert args.only_test and not args.zero_shot


def test_svitt_retrieval_recipes_refuse_an_unknown_dataset_and_a_missing_checkpoint(tmp_path):
    for script in ("svitt_train_ret.sh", "svitt_eval_ret.sh"):
        run = subprocess.run(["bash", os.path.join(REPO, "scripts", script), "kinetics", "ck.pth", "out"],
                             capture_output=True, text=True, env=_clean_env(DRY_RUN="1"))
        assert run.returncode == 2 and "unknown DATASET 'kinetics'" in run.stderr and "msrvtt didemo" in run.stderr
        run = subprocess.run(["bash", os.path.join(REPO, "scripts", script), "msrvtt", str(tmp_path / "no.pth"),
                              "out"], capture_output=True, text=True, env=_clean_env())
        assert run.returncode == 2 and run.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'no.pth'}"


# dataset -> (training file, test file, video folder, epochs, warm-up, selection on a val file)
SVITT_QA = {"msrvtt": ("msrvtt_qa_train.json", "msrvtt_qa_test.json", "msrvtt_videos", 10, 0.5, True),
            "anet": ("anet_qa_train.json", "anet_qa_test.json", "anet_videos", 10, 0.5, True),
            "agqa": ("agqa_train_balanced.json", "agqa_test_balanced.json", "charades_videos", 5, 0.25, False)}


@pytest.mark.parametrize("dataset", SVITT_QA)
def test_svitt_qa_recipe_parses_and_carries_the_release_settings(dataset, tmp_path):
    """The release's qa_<dataset>.yaml in our flags; AGQA (whose val file is its test file) selects on held-out
    training videos."""
    train, test, videos, epochs, warmup, has_val = SVITT_QA[dataset]
    cmd = _dry_run("svitt_train_qa.sh", dataset, "ck.pth", "out", "--seed", "3", cwd=str(tmp_path), DATA_DIR="sl d")
    _launches_with_the_projects_python(cmd)
    args = run_simvtp_qa.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_qa.py"))
    anno = tmp_path / "sl d" / "anno_downstream"
    assert (args.data_path, args.test_data_path, args.data_root) == (str(anno / train), str(anno / test),
                                                                     str(tmp_path / "sl d" / videos))
    assert args.answer_list.startswith(str(anno)) and args.answer_list.endswith("answer_list.json")
    assert (args.val_data_path is not None) == has_val and (has_val or args.val_fraction > 0)
    assert args.val_data_path != args.test_data_path and args.seed == 3
    assert (args.model, args.num_frames, args.num_frames_test, args.eval_frame_ensemble, args.k_test) == \
        ("svitt_qa_base_patch16_224", 8, 24, "lse", 128)
    assert (args.lr, args.min_lr, args.epochs, args.warmup_epochs, args.batch_size, args.max_q_len,
            args.max_a_len) == (1e-5, 1e-6, epochs, warmup, 32, 25, 5)
    kwargs = model_registry.model_kwargs(args, args.model, vocab_size=30522)
    assert (kwargs["token_keep_rate"], kwargs["sparse_random_attn"], kwargs["fusion_keep_rate"]) == (0.6, 3, 0.5)


def test_svitt_qa_recipe_refuses_an_unknown_dataset_and_runs_the_synthetic_set_on_cpu(tmp_path):
    run = subprocess.run(["bash", os.path.join(REPO, "scripts", "svitt_train_qa.sh"), "vqa", "ck.pth", "out"],
                         capture_output=True, text=True, env=_clean_env(DRY_RUN="1"))
    assert run.returncode == 2 and "unknown DATASET 'vqa'" in run.stderr and "msrvtt anet agqa" in run.stderr
    cmd = _dry_run("svitt_train_qa.sh", "synthetic", "ck.pth", "out", cwd=str(tmp_path))
    args = run_simvtp_qa.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_qa.py"))
    assert (args.model, args.device, args.data_root) == ("svitt_qa_tiny_patch16", "cpu",
                                                         str(tmp_path / "data" / "synthetic_2k_64"))
    assert (args.input_size, args.attn_block_size) == (64, 32)
    assert _flag(cmd, "--nproc_per_node") == "1"


def test_finetune_msrvtt_flags_parse_and_select_on_validation_not_test(tmp_path):
    cmd = _dry_run("finetune_msrvtt.sh", "train 9k.json", "./test 1k.csv", "/videos", "pre.pth", "out",
                   cwd=str(tmp_path))
    args = run_simvtp_finetuning.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_finetuning.py"))
    assert args.data_path == str(tmp_path / "train 9k.json") and args.test_data_path == str(tmp_path / "test 1k.csv")
    assert (args.finetune, args.output_dir, args.log_dir) == (str(tmp_path / "pre.pth"), str(tmp_path / "out"),
                                                              str(tmp_path / "out" / "tb"))
    assert args.val_fraction > 0 and args.val_data_path is None
    assert (args.batch_size, args.epochs, args.lr, args.test_num_segment, args.test_num_crop) == (8, 100, 3e-4, 3, 3)
    assert _flag(cmd, "--nproc_per_node") == "8"
    _launches_with_the_projects_python(cmd)


def test_only_test_msrvtt_uses_15_by_3_views(tmp_path):
    cmd = _dry_run("only_test_msrvtt.sh", "test 1k.csv", "/videos", "best.pth", "out", cwd=str(tmp_path))
    args = run_simvtp_finetuning.get_args_parser().parse_args(_script_args(cmd, "run_simvtp_finetuning.py"))
    assert args.only_test and args.finetune == str(tmp_path / "best.pth")
    assert (args.test_num_segment, args.test_num_crop) == (15, 3)
    _launches_with_the_projects_python(cmd)
    given = _dry_run("only_test_msrvtt.sh", "t.csv", "/v", "b.pth", "o", PY="/opt/conda env/bin/python")
    _launches_with_the_projects_python(given, "/opt/conda env/bin/python")  # PY= chooses another environment


@pytest.mark.parametrize("script", ["pretrain_webvid.sh", "finetune_msrvtt.sh", "only_test_msrvtt.sh",
                                    "svitt_pretrain_webvid.sh", "svitt_expand.sh", "svitt_train_ret.sh",
                                    "svitt_eval_ret.sh", "svitt_train_qa.sh"])
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


@pytest.mark.slow
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


def test_demo_time_is_the_documented_time_recipe_and_each_step_uses_the_previous_ones_output(tmp_path):
    """scripts/demo_time.sh: DRY_RUN prints its six commands; each parses with its entry point, the pre-training
    carries the time-order recipe (weight 10, every tube), zero-shot and the first QA stage start from its last
    checkpoint, and each later QA stage from the previous stage's best weights, on more question types."""
    data, pre, zero_shot, *qa_stages = _dry_run_commands("demo_time.sh", DEMO_OUT=str(tmp_path / "demo out"),
                                                         DEMO_TIME_EPOCHS="3")
    assert data[1:] == ["synthetic_dataset.py", "--out", "data/synthetic_2k_64", "--num_train", "1920", "--size", "64"]
    pre = run_simvtp_pretraining.get_args_parser().parse_args(pre[2:])
    assert (pre.w_reverse, pre.reverse_tubes, pre.epochs, pre.input_size) == (10.0, "all", 3, 64)
    assert pre.output_dir == str(tmp_path / "demo out" / "pretrain")
    zero_shot = run_simvtp_finetuning.get_args_parser().parse_args(zero_shot[2:])
    assert zero_shot.zero_shot and zero_shot.finetune == os.path.join(pre.output_dir, "checkpoint-2.pth")
    assert zero_shot.eval_frame_order == ["none", "reverse", "shuffle", "freeze"] and zero_shot.input_size == 64
    size, motion, every = (run_simvtp_qa.get_args_parser().parse_args(cmd[2:]) for cmd in qa_stages)
    assert [size.answer_types, motion.answer_types, every.answer_types] == [
        ["size_change"], ["direction", "size_change"], None]
    assert size.finetune == zero_shot.finetune
    assert motion.finetune == os.path.join(size.output_dir, "checkpoint-best.pth")
    assert every.finetune == os.path.join(motion.output_dir, "checkpoint-best.pth")
    assert every.eval_frame_order == ["none", "reverse", "freeze"] and every.data_root == pre.data_root


def test_demo_trains_both_families_on_the_same_clips_and_each_step_uses_the_previous_ones_output(tmp_path):
    """scripts/demo.sh: DRY_RUN prints its 16 commands and each parses with its entry point; SimVTP and SViTT
    pre-train on the same clips for the same steps (the demo compares them), both re-rank their top 16, SimVTP
    learns the time order and QA keeps its encoder, and each later step reads the checkpoint the step before it
    writes."""
    out = tmp_path / "demo out"
    cmds = _dry_run_commands("demo.sh", DEMO_OUT=str(out), DEMO_PRETRAIN_EPOCHS="3", DEMO_SVITT_EPOCHS="3")
    assert len(cmds) == 16
    data, simvtp, *rest = cmds
    zs_rerank, zs_orders, zs_masked, svitt, svitt_rerank, svitt_orders, ft, ft_random, only_test, qa, vis, probe, \
        index, query = rest
    assert data[1:] == ["synthetic_dataset.py", "--out", "data/synthetic_2k_64", "--num_train", "1920", "--size", "64"]
    pre_parser = run_simvtp_pretraining.get_args_parser()
    simvtp, svitt = (pre_parser.parse_args(cmd[2:]) for cmd in (simvtp, svitt))
    assert (simvtp.model, svitt.model) == ("simvtp_tiny_patch16", "svitt_tiny_patch16")
    for key in ("data_path", "data_root", "epochs", "batch_size", "input_size", "num_frames", "warmup_steps"):
        assert getattr(simvtp, key) == getattr(svitt, key), key
    assert simvtp.epochs == 3 and simvtp.input_size == 64 and simvtp.eval_data_path and svitt.eval_data_path
    assert (simvtp.w_reverse, simvtp.reverse_tubes, simvtp.vtc_video) == (10.0, "all", "full")  # time, learnt
    assert (svitt.w_vtm_rank, svitt.vtm_rank_score) == (1.0, "sum")  # SViTT's re-ranker learns what to add
    last = {m: os.path.join(str(out / d), "checkpoint-2.pth") for m, d in (("simvtp", "pretrain"),
                                                                           ("svitt", "svitt_pretrain"))}
    ret = run_simvtp_finetuning.get_args_parser()
    zs_rerank, zs_orders, zs_masked, svitt_rerank, svitt_orders, ft, ft_random, only_test = (
        ret.parse_args(cmd[2:]) for cmd in (zs_rerank, zs_orders, zs_masked, svitt_rerank, svitt_orders, ft,
                                            ft_random, only_test))
    assert all(a.zero_shot and a.finetune == last["simvtp"] for a in (zs_rerank, zs_orders, zs_masked))
    assert all(a.zero_shot and a.finetune == last["svitt"] for a in (svitt_rerank, svitt_orders))
    assert zs_rerank.rerank_k == svitt_rerank.rerank_k == 16
    assert zs_orders.eval_frame_order == svitt_orders.eval_frame_order == ["none", "reverse", "shuffle", "freeze"]
    assert ft.finetune == last["simvtp"] and not ft_random.finetune and ft.epochs == ft_random.epochs
    assert only_test.only_test and only_test.finetune == os.path.join(ft.output_dir, "checkpoint-best.pth")
    qa = run_simvtp_qa.get_args_parser().parse_args(qa[2:])
    assert qa.finetune == last["simvtp"] and qa.eval_frame_order == ["none", "reverse", "freeze"]
    assert qa.freeze == ["encoder", "text_embeddings"]  # QA reads the pre-trained motion rather than erasing it
    assert qa.cache_memory and qa.epochs == 3  # the frozen question pass computed once, several decoder epochs
    vis = run_simvtp_vis.get_args_parser().parse_args(vis[2:])
    assert vis.ckpt == last["simvtp"] and vis.save_path == str(out / "reconstruction.png")
    probe = cross_modal_probe.get_args_parser().parse_args(probe[2:])
    assert probe.ckpt == last["simvtp"] and probe.word_groups == "synthetic"
    assert probe.data_path == zs_rerank.test_data_path
    index, query = (search.get_args_parser().parse_args(cmd[2:]) for cmd in (index, query))
    assert index.ckpt == only_test.finetune and query.index_dir == index.out


# ----------------------------------------------------------------------------------------------- the shared launcher

RECIPES = {"pretrain_webvid.sh": ("/d/train.csv", "/d/videos", "/out"),
           "svitt_pretrain_webvid.sh": ("/d/train.csv", "/d/videos", "/out"),
           "finetune_msrvtt.sh": ("/d/train.json", "/d/test.csv", "/d/videos", "/pre.pth", "/out"),
           "only_test_msrvtt.sh": ("/d/test.csv", "/d/videos", "/best.pth", "/out")}


@pytest.mark.parametrize("script", RECIPES)
def test_several_nodes_without_master_addr_are_refused(script):
    """Before: MASTER_ADDR defaulted to 127.0.0.1, so nodes 1-7 each waited out the rendezvous on themselves."""
    run = subprocess.run(["bash", os.path.join(REPO, "scripts", script), *RECIPES[script]], capture_output=True,
                         text=True, env=_clean_env(DRY_RUN="1", NNODES="2"))
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr.startswith("error: NNODES=2 needs MASTER_ADDR") and len(run.stderr.splitlines()) == 1
    assert f"bash scripts/{script}" in run.stderr
    cmd = _dry_run(script, *RECIPES[script], NNODES="2", MASTER_ADDR="node0", NODE_RANK="1")
    assert (_flag(cmd, "--nnodes"), _flag(cmd, "--master_addr"), _flag(cmd, "--node_rank")) == ("2", "node0", "1")


def test_pretraining_needs_master_addr_by_default():
    """The paper's recipe is 8 nodes: run with no environment it says what is missing instead of hanging."""
    run = subprocess.run(["bash", os.path.join(REPO, "scripts", "pretrain_webvid.sh"), "/a.csv", "/v"],
                         capture_output=True, text=True, env=_clean_env(DRY_RUN="1"))
    assert run.returncode == 2 and "NNODES=8 needs MASTER_ADDR" in run.stderr


@pytest.mark.parametrize("script", RECIPES)
def test_the_port_derives_from_the_job_id(script):
    """Two jobs sharing a node no longer collide on the recipe's fixed port; the number is the one python
    derives under srun (distributed.port_for_job), and MASTER_PORT still wins."""
    import distributed
    cmd = _dry_run(script, *RECIPES[script], SLURM_JOB_ID="7654321", MASTER_ADDR="n0")
    assert _flag(cmd, "--master_port") == str(distributed.port_for_job("7654321")) == "24321"
    assert _flag(_dry_run(script, *RECIPES[script], SLURM_JOB_ID="7654321", MASTER_PORT="29999", MASTER_ADDR="n0"),
                 "--master_port") == "29999"
    default = {"pretrain_webvid.sh": "29500", "finetune_msrvtt.sh": "29501", "only_test_msrvtt.sh": "29502",
               "svitt_pretrain_webvid.sh": "29503"}
    assert _flag(_dry_run(script, *RECIPES[script], MASTER_ADDR="n0"), "--master_port") == default[script]


def test_every_recipe_has_its_own_default_port():
    """Two recipes started side by side on one node (e.g. SViTT's retrieval evaluation beside its QA training)
    must not meet at the same rendezvous port: each script's default is its own."""
    ports = {}
    for name in sorted(os.listdir(os.path.join(REPO, "scripts"))):
        for line in open(os.path.join(REPO, "scripts", name)):
            if line.startswith("launcher_command "):
                ports[name] = line.split()[3]
    assert len(ports) >= 7 and len(set(ports.values())) == len(ports), ports


def test_the_recipes_share_one_launcher():
    for script in RECIPES:
        text = open(os.path.join(REPO, "scripts", script)).read()
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"' in text
        assert "torch.distributed.run" not in text and "\ncd " not in text, script


# ----------------------------------------------------------------------------------------------- SLURM batch files

SBATCH = {"slurm_pretrain.sbatch": ("pretrain_webvid.sh", run_simvtp_pretraining, 8,
                                    dict(DATA_PATH="webvid.csv", DATA_ROOT="/d/videos", OUTPUT_DIR="/shared/out")),
          "slurm_finetune.sbatch": ("finetune_msrvtt.sh", run_simvtp_finetuning, 1,
                                    dict(TRAIN_ANNO="/d/train.json", TEST_ANNO="/d/test.csv", DATA_ROOT="/d/videos",
                                         PRETRAIN_CKPT="/shared/pre.pth", OUTPUT_DIR="/shared/ft"))}


def _directives(path: str) -> dict[str, str]:
    """The #SBATCH options of a batch file (those sbatch reads: before the first command)."""
    out = {}
    for line in open(path):
        if not line.startswith("#"):
            break
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].strip().partition("=")
            out[key] = value
    return out


@pytest.mark.parametrize("name", SBATCH)
def test_sbatch_files_start_one_task_per_gpu_with_srun(name, tmp_path):
    recipe, entry, nodes, paths = SBATCH[name]
    path = os.path.join(REPO, "scripts", name)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    opts = _directives(path)
    assert int(opts["nodes"]) == nodes and opts["ntasks-per-node"] == opts["gpus-per-node"] == "8"
    assert opts["partition"] and opts["time"] and int(opts["cpus-per-task"]) > 10  # 10 loader workers + the task
    cmd = _dry_run(name, "--seed", "1", cwd=str(tmp_path), SLURM_CPUS_PER_TASK="12", **paths)
    # srun starts python itself: each task is a rank of the SLURM branch (no torchrun, nothing exported)
    assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=12"]
    assert cmd[3] == os.path.join(REPO, ".venv", "bin", "python") and "torch.distributed.run" not in cmd
    args = entry.get_args_parser().parse_args(_script_args(cmd, entry.__name__ + ".py"))
    assert args.output_dir == paths["OUTPUT_DIR"] and args.seed == 1 and args.device == "cuda"
    if "DATA_PATH" in paths:  # relative: from the folder sbatch ran it in
        assert args.data_path == str(tmp_path / "webvid.csv")


@pytest.mark.parametrize("name", SBATCH)
def test_sbatch_files_refuse_their_placeholders_and_a_foreign_folder(name, tmp_path):
    path = os.path.join(REPO, "scripts", name)
    paths = SBATCH[name][3]
    unedited = subprocess.run(["bash", path], capture_output=True, text=True, env=_clean_env(DRY_RUN="1"))
    assert unedited.returncode == 2 and "is still the placeholder /path/to/" in unedited.stderr
    assert name in unedited.stderr and len(unedited.stderr.splitlines()) == 1
    elsewhere = subprocess.run(["bash", path], capture_output=True, text=True,
                               env=_clean_env(DRY_RUN="1", SLURM_SUBMIT_DIR=str(tmp_path), **paths))
    assert elsewhere.returncode == 2 and f"{tmp_path} is not the SimVTP repository" in elsewhere.stderr
    submitted = subprocess.run(["bash", path], capture_output=True, text=True, check=True,
                               env=_clean_env(DRY_RUN="1", SLURM_SUBMIT_DIR=REPO, **paths))
    assert submitted.stdout.startswith("srun ")

# ----------------------------------------------------------------------------------------------- the allocator


def _fast_malloc(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """Source scripts/fast_malloc.sh, call fast_malloc, then print LD_PRELOAD as the runs after it would see it."""
    script = f'source "{REPO}/scripts/fast_malloc.sh" && fast_malloc && echo "LD_PRELOAD=${{LD_PRELOAD:-}}"'
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SIMVTP_MALLOC")}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={**base, **env}, cwd=tmp_path)


def test_fast_malloc_preloads_the_chosen_library_once_or_keeps_glibc(tmp_path):
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"")
    chosen = _fast_malloc(tmp_path, SIMVTP_MALLOC=str(lib), LD_PRELOAD=f"{lib}:/other.so")
    assert chosen.returncode == 0 and chosen.stdout.splitlines()[-1] == f"LD_PRELOAD={lib}:/other.so"
    kept = _fast_malloc(tmp_path, SIMVTP_MALLOC="glibc")
    assert kept.returncode == 0 and kept.stdout.splitlines()[-1] == "LD_PRELOAD="
    missing = _fast_malloc(tmp_path, SIMVTP_MALLOC=str(tmp_path / "absent.so"))
    assert missing.returncode == 1 and "absent.so: no such library file" in missing.stderr


def test_fast_malloc_puts_tcmalloc_under_a_real_process_when_installed(tmp_path):
    """Where libtcmalloc-minimal4 is installed (CI installs it) a process started after fast_malloc maps it;
    elsewhere fast_malloc keeps glibc and names the package."""
    found = _fast_malloc(tmp_path)
    assert found.returncode == 0
    preload = found.stdout.splitlines()[-1].removeprefix("LD_PRELOAD=")
    if not preload:
        assert "sudo apt-get install libtcmalloc-minimal4" in found.stdout
        return
    assert preload.endswith("libtcmalloc_minimal.so.4")
    probe = "import torch; torch.randn(512, 512) @ torch.randn(512, 512); print(open('/proc/self/maps').read())"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "LD_PRELOAD": preload}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "libtcmalloc_minimal.so.4" in run.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(REPO, ".venv")),
                    reason="scripts/test.sh sets up the project's .venv; these tests run outside it")
def test_the_test_script_runs_only_the_tests_it_is_given_and_refuses_a_bad_worker_count_or_a_full_disk(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    one = "tests/test_masking.py::test_short_caption_gets_at_least_one_mask_and_empty_gets_none"
    run = subprocess.run(["bash", "scripts/test.sh", one, "--basetemp", str(tmp_path / "t")], cwd=REPO, text=True,
                         capture_output=True, env={**env, "SIMVTP_TEST_WORKERS": "1"}, timeout=300)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    bad = subprocess.run(["bash", "scripts/test.sh"], cwd=REPO, text=True, capture_output=True,
                         env={**env, "SIMVTP_TEST_WORKERS": "0"}, timeout=300)
    assert bad.returncode == 2 and "SIMVTP_TEST_WORKERS must be a whole number >= 1, got '0'" in bad.stderr
    full = subprocess.run(["bash", "scripts/test.sh"], cwd=REPO, text=True, capture_output=True,
                          env={**env, "SIMVTP_TEST_MIN_FREE_GB": "1000000"}, timeout=300)
    assert full.returncode == 2 and "GB free in" in full.stderr and "needs 1000000 GB there" in full.stderr
