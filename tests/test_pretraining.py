"""The real pre-training entry point on the tiny synthetic set: outputs, resume equivalence (epoch boundary and
mid-epoch), non-finite losses, broken videos in the training list (fall-through, the list of broken files, resume,
the --max_broken_fraction stop, --exclude_list)."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import checkpoint
import engine_for_pretraining
import run_simvtp_pretraining
import video_tools
from conftest import mostly_broken_list, run_as_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _argv(synthetic_root, out_dir, *extra):
    return ["--data_path", os.path.join(synthetic_root, "annotations", "pretrain.json"),
            "--data_root", str(synthetic_root), "--model", "simvtp_tiny_patch16", "--num_frames", "4",
            "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--lr", "1e-3", "--num_workers", "0", "--device", "cpu", "--precision", "fp32",
            "--output_dir", str(out_dir), "--print_freq", "2", "--seed", "3", *extra]


def _args(synthetic_root, out_dir, *extra):
    return run_simvtp_pretraining.get_args_parser().parse_args(_argv(synthetic_root, out_dir, *extra))


def _run_here(capsys, synthetic_root, out_dir, *extra) -> subprocess.CompletedProcess:
    """`python run_simvtp_pretraining.py ...` as its own `__main__` block runs it, in this process: for the tests
    about what a user sees, not about the process."""
    return run_as_main(capsys, "run_simvtp_pretraining.py", *_argv(synthetic_root, out_dir, *extra))


def _val_with_broken_and_missing(synthetic_root, folder):
    """The validation list plus an unreadable video (a text file named .mp4) and one that does not exist."""
    records = json.load(open(os.path.join(synthetic_root, "annotations", "val.json")))
    broken, missing = folder / "broken_clip.mp4", folder / "missing_clip.mp4"
    broken.write_text("not a video\n" * 20)
    records += [{"video": str(broken), "caption": "a broken clip"}, {"video": str(missing), "caption": "gone"}]
    anno = folder / "val_with_bad.json"
    anno.write_text(json.dumps(records))
    return anno, broken, missing


def _weights(out_dir):
    return checkpoint.read_checkpoint_file(checkpoint.find_latest(str(out_dir)))["model"]


def _assert_same_weights(want_dir, got_dir) -> None:
    """The latest checkpoints of the two folders hold bitwise equal weights (each file read once)."""
    want, got = _weights(want_dir), _weights(got_dir)
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def eight_clips(synthetic_root, module_tmp) -> str:
    """A training list of the first 8 synthetic clips: 2 steps an epoch at batch 4, enough for every comparison
    of an interrupted run with an uninterrupted one (mid-epoch and at an epoch boundary)."""
    records = json.load(open(os.path.join(synthetic_root, "annotations", "pretrain.json")))
    anno = module_tmp.mktemp("eight_clips") / "pretrain_8.json"
    anno.write_text(json.dumps(dict(list(records.items())[:8])))
    return str(anno)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, eight_clips, module_tmp):
    out = module_tmp.mktemp("full")
    result = run_simvtp_pretraining.main(_args(synthetic_root, out, "--data_path", eight_clips))
    return out, result


@pytest.mark.slow
def test_run_writes_logs_config_tensorboard_and_checkpoints(uninterrupted):
    out, result = uninterrupted
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert [x["epoch"] for x in lines] == [0, 1]
    for term in ("loss", "loss_pixel", "loss_mlm", "loss_vtc", "loss_vtm", "vtm_acc", "lr", "grad_norm",
                 "clips_per_s"):
        assert term in result["summary"], term
    args = json.load(open(out / "args.json"))
    assert args["model"] == "simvtp_tiny_patch16" and args["text_mask_ratio"] == 0.75
    assert any(f.startswith("events") for f in os.listdir(out / "tb"))
    ckpt = checkpoint.read_checkpoint_file(str(out / "checkpoint-1.pth"))
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == -1 and isinstance(ckpt["args"], dict)
    assert {"model", "optimizer", "scaler", "rng_states", "global_step", "train_state"} <= set(ckpt)
    assert ckpt["model_cfg"]["name"] == "simvtp_tiny_patch16"
    assert ckpt["model_cfg"]["kwargs"]["img_size"] == 32 and ckpt["model_cfg"]["kwargs"]["num_frames"] == 4
    assert ckpt["train_state"]["epoch"] == 2 and ckpt["train_state"]["micro_in_epoch"] == 0


def _interrupt_then_resume(uninterrupted, synthetic_root, out_dir, stop_after: int, expected_latest: str,
                           *extra: str, start_from: str | None = None) -> None:
    """Stop after `stop_after` steps, check where the checkpoint is, resume, and compare with the uninterrupted
    run (made with the same `extra` flags): the same steps, the same per-step losses, the same final weights.
    `start_from`: one of the uninterrupted run's checkpoints, where the interrupted run starts (copied into
    out_dir): the steps after it are compared."""
    full_out, full = uninterrupted
    done = 0
    if start_from:
        os.makedirs(out_dir, exist_ok=True)
        done = checkpoint.read_checkpoint_file(shutil.copy(start_from, out_dir))["global_step"]
    first = run_simvtp_pretraining.main(_args(synthetic_root, out_dir, "--max_steps", str(stop_after), *extra))
    assert os.path.basename(checkpoint.find_latest(str(out_dir))) == expected_latest
    second = run_simvtp_pretraining.main(_args(synthetic_root, out_dir, *extra))
    assert len(first["history"]) == stop_after - done  # (from start_from: only the steps after it)
    resumed, expected = first["history"] + second["history"], full["history"][done:]
    assert [h["step"] for h in resumed] == [h["step"] for h in expected]
    assert [a["loss"] for a in resumed] == [b["loss"] for b in expected]  # bitwise on CPU
    _assert_same_weights(full_out, out_dir)


@pytest.mark.slow
def test_resume_at_epoch_boundary_reproduces_the_run(uninterrupted, eight_clips, synthetic_root, tmp_path):
    steps_per_epoch = len(uninterrupted[1]["history"]) // 2
    _interrupt_then_resume(uninterrupted, synthetic_root, tmp_path, steps_per_epoch, "checkpoint-0.pth",
                           "--data_path", eight_clips)


@pytest.mark.slow
def test_resume_mid_epoch_reproduces_the_run(uninterrupted, eight_clips, synthetic_root, tmp_path):
    """From the uninterrupted run's first epoch (its resume is the test above's), one step into the second, stop,
    resume."""
    steps_per_epoch = len(uninterrupted[1]["history"]) // 2
    _interrupt_then_resume(uninterrupted, synthetic_root, tmp_path, steps_per_epoch + 1, "checkpoint-1-step1.pth",
                           "--data_path", eight_clips, start_from=str(uninterrupted[0] / "checkpoint-0.pth"))


@pytest.mark.slow
def test_resume_mid_epoch_with_two_clips_per_video_reproduces_the_run(synthetic_root, eight_clips, tmp_path):
    """Repeated sampling: the resume position counts videos (dataset items), not the clips of the batch. (One
    epoch: a stop inside it is mid-epoch; continuing into the next epoch is test_resume_mid_epoch's.)"""
    extra = ("--clips_per_video", "2", "--data_path", eight_clips, "--epochs", "1")
    full = run_simvtp_pretraining.main(_args(synthetic_root, tmp_path / "full", *extra))
    stop = len(full["history"]) // 2
    assert stop >= 1 and len(full["history"]) > stop  # steps before and after the stop
    _interrupt_then_resume((tmp_path / "full", full), synthetic_root, tmp_path / "resumed", stop,
                           f"checkpoint-0-step{stop}.pth", *extra)


@pytest.mark.slow
def test_resume_mid_epoch_with_neighbour_batches_reproduces_the_run(synthetic_root, eight_clips, tmp_path, capsys):
    """--caption_group_size: each epoch's order comes from the weights at its start, so a run resumed inside an
    epoch must take that order from the checkpoint (its own weights would group differently)."""
    extra = ("--caption_group_size", "2", "--data_path", eight_clips)
    full = run_simvtp_pretraining.main(_args(synthetic_root, tmp_path / "full", *extra))
    assert capsys.readouterr().out.count("groups of 2 clips with the nearest text embeddings") == 2
    stop = len(full["history"]) // 2 + 1  # one step into the second epoch
    _interrupt_then_resume((tmp_path / "full", full), synthetic_root, tmp_path / "resumed", stop,
                           "checkpoint-1-step1.pth", *extra)
    assert "Batches of epoch 1: the neighbour groups saved in the checkpoint" in capsys.readouterr().out


@pytest.mark.slow
def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(uninterrupted, synthetic_root,
                                                                          eight_clips, tmp_path, capsys):
    # the last good checkpoint: the uninterrupted run's after its first epoch, where a run with the same flags
    # goes on (with its second epoch)
    good = shutil.copy(uninterrupted[0] / "checkpoint-0.pth", tmp_path)
    assert checkpoint.find_latest(str(tmp_path)) == good
    before = checkpoint.read_checkpoint_file(good)["model"]
    with pytest.raises(engine_for_pretraining.NonFiniteLossError, match="non-finite losses in a row"):
        run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--w_pixel", "nan", "--max_bad_steps", "2",
                                          "--data_path", eight_clips))
    assert "step skipped on every rank" in capsys.readouterr().out
    assert checkpoint.find_latest(str(tmp_path)) == good
    after = checkpoint.read_checkpoint_file(good)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_eval_every_runs_zero_shot_retrieval_on_the_validation_file(synthetic_root, eight_clips, tmp_path):
    val = os.path.join(synthetic_root, "annotations", "val.json")
    run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--epochs", "1", "--eval_every", "1",
                                      "--eval_data_path", val, "--data_path", eight_clips))
    record = json.loads(open(tmp_path / "log.txt").readline())
    for key in ("zs_t2v_R@1", "zs_t2v_R@5", "zs_v2t_R@1", "zs_t2v_MdR", "zs_match_acc", "zs_match_acc_hard"):
        assert key in record, key
    assert 0.0 <= record["zs_t2v_R@1"] <= record["zs_t2v_R@5"] <= 100.0
    assert 0.0 <= record["zs_match_acc"] <= 100.0 and 0.0 <= record["zs_match_acc_hard"] <= 100.0


def test_eval_every_without_a_validation_file_is_a_clear_error(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="--eval_data_path"):
        run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--eval_every", "1"))


@pytest.mark.slow
def test_sigkill_at_the_first_checkpoint_then_resume_is_bitwise_equal(uninterrupted, eight_clips, synthetic_root,
                                                                      tmp_path):
    """A real crash: the process is killed (SIGKILL) once its first mid-epoch checkpoint exists; a new run (here, in
    this process: the crash is the killed process's, the restart reads only its files) resumes from it and ends
    on exactly the uninterrupted run's weights."""
    full_out, _ = uninterrupted
    args = vars(_args(synthetic_root, tmp_path, "--data_path", eight_clips))
    argv = [sys.executable, os.path.join(ROOT, "run_simvtp_pretraining.py"), "--save_every_steps", "1"]
    for flag in ("data_path", "data_root", "model", "num_frames", "input_size", "batch_size", "epochs",
                 "warmup_epochs", "lr", "num_workers", "device", "precision", "output_dir", "print_freq", "seed"):
        argv += [f"--{flag}", str(args[flag])]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.list_checkpoints(str(tmp_path)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.list_checkpoints(str(tmp_path)), "no checkpoint was written before the kill"
    run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--data_path", eight_clips))
    _assert_same_weights(full_out, tmp_path)


@pytest.mark.slow
def test_resume_with_another_batch_size_continues_at_the_right_sample(synthetic_root, eight_clips, tmp_path,
                                                                      capsys):
    """4 clips seen at batch 4; at batch 2 the epoch's other 4 clips are 2 steps (not 3: 2 clips twice)."""
    run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--epochs", "1", "--max_steps", "1",
                                      "--data_path", eight_clips))
    capsys.readouterr()
    second = run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--epochs", "1", "--batch_size", "2",
                                               "--data_path", eight_clips))
    assert len(second["history"]) == 2
    out = capsys.readouterr().out
    assert "Resuming with changed settings: --batch_size 4 -> 2" in out and "global batch changed" in out
    history = json.load(open(tmp_path / "args.json"))["resume_history"]
    assert history[-1]["changed"]["batch_size"] == [4, 2] and history[-1]["samples_in_epoch"] == 4
    assert json.load(open(tmp_path / "args.json"))["batch_size"] == 2


@pytest.mark.slow
def test_resume_refuses_a_change_that_loses_the_position(synthetic_root, tmp_path):
    run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--epochs", "1", "--max_steps", "1"))
    with pytest.raises(checkpoint.CheckpointError, match="pass --seed 3 to continue"):
        run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--epochs", "1", "--seed", "4"))
    with pytest.raises(checkpoint.CheckpointError, match=r"--input_size 32 \(this run: 64\); pass --input_size 32"):
        run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--epochs", "1", "--input_size", "64"))


@pytest.mark.slow
def test_resume_from_a_file_of_another_model_says_what_it_holds_in_one_line(synthetic_root, tmp_path):
    import model_registry
    dual = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4)
    optimizer = torch.optim.AdamW(dual.parameters())
    saved = checkpoint.save_training_state(str(tmp_path / "ft"), model=dual, optimizer=optimizer, scaler=None,
                                           epoch=0, step_in_epoch=None, global_step=1, args={})
    weights = tmp_path / "weights.pth"
    torch.save({"model": dual.state_dict()}, weights)
    cases = {saved: "training checkpoint of simvtp_dual_tiny_patch16, this run trains simvtp_tiny_patch16",
             str(weights): "no training state .* pass it as --init_ckpt",
             str(tmp_path / "ft"): "is a folder; give a checkpoint file in it"}
    for path, message in cases.items():
        with pytest.raises(checkpoint.CheckpointError, match=message) as err:
            run_simvtp_pretraining.main(_args(synthetic_root, tmp_path / "run", "--resume", path))
        assert "\n" not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.slow
def test_a_global_batch_of_one_clip_is_warned_about(synthetic_root, tmp_path, capsys):
    run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--epochs", "1", "--batch_size", "1",
                                      "--max_steps", "1"))
    assert "the global batch holds 1 clip" in capsys.readouterr().out


def _entry_argv(synthetic_root, out_dir, *extra) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "run_simvtp_pretraining.py"), *_argv(synthetic_root, out_dir, *extra)]


@pytest.mark.slow
@pytest.mark.parametrize("flags, message, own_process", [
    # one case as its own process: nothing else (an import's warning, say) reaches its stderr either
    (("--device", "cuda"), "--device cuda: CUDA is not available on this machine; use --device cpu", True),
    (("--device", "gpu"), "--device gpu: not a device name", False),
    (("--output_dir", "{file}"), "is a file, not a folder", False),
])
def test_wrong_device_or_output_dir_is_one_line(synthetic_root, tmp_path, capsys, flags, message, own_process):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    flags = [f.replace("{file}", str(a_file)) for f in flags]
    if own_process:
        run = subprocess.run(_entry_argv(synthetic_root, tmp_path / "out", *flags), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    else:
        run = _run_here(capsys, synthetic_root, tmp_path / "out", *flags)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_native_crash_in_an_entry_point_prints_the_python_stack_of_where_it_happened(tmp_path):
    """A heap corruption aborts inside native code with one line of glibc's; run_entry_point's fault handler adds
    the Python stack, so a crashed rank's log says what it was doing (here a deliberate SIGABRT)."""
    script = tmp_path / "run_crash.py"
    script.write_text(textwrap.dedent(f"""\
        import argparse, os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import utils

        def decode_the_next_clip(args):
            os.kill(os.getpid(), signal.SIGABRT)

        utils.run_entry_point(decode_the_next_clip, argparse.ArgumentParser())
        """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in run.stderr and "decode_the_next_clip" in run.stderr, run.stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(synthetic_root, tmp_path):
    argv = _entry_argv(synthetic_root, tmp_path, "--save_every_steps", "1", "--epochs", "50")  # still running
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not checkpoint.list_checkpoints(str(tmp_path)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    latest = checkpoint.find_latest(str(tmp_path))
    assert f"The last checkpoint is {latest}" in err and "run_simvtp_pretraining.py" in err


def test_a_broken_and_a_missing_validation_video_stop_the_run_at_start_up_naming_both(synthetic_root, tmp_path,
                                                                                       capsys):
    """Before: the first zero-shot evaluation crashed on the broken video after a whole epoch of training."""
    anno, broken, missing = _val_with_broken_and_missing(synthetic_root, tmp_path)
    out = tmp_path / "out"
    proc = _run_here(capsys, synthetic_root, out, "--eval_every", "1", "--eval_data_path", str(anno))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"--eval_data_path {anno}: 2 of 10 videos cannot be used" in proc.stderr
    assert f"undecodable  {broken}" in proc.stderr and f"missing      {missing}: file does not exist" in proc.stderr
    assert "Training" not in proc.stdout and not checkpoint.list_checkpoints(str(out))


@pytest.mark.slow
def test_skip_eval_check_trains_and_saves_then_a_resume_evaluates_the_pending_epoch_without_retraining(
        synthetic_root, eight_clips, tmp_path, capsys):
    """--skip_eval_check: the epoch is trained and saved before its evaluation fails on the missing video (one line,
    no traceback); once the list is repaired, the resumed run evaluates that epoch first and trains nothing again."""
    anno, broken, missing = _val_with_broken_and_missing(synthetic_root, tmp_path)
    out = tmp_path / "out"
    flags = ("--epochs", "1", "--eval_every", "1", "--eval_data_path", str(anno), "--data_path", eight_clips)
    first = _run_here(capsys, synthetic_root, out, *flags, "--skip_eval_check")
    assert first.returncode == 1 and "not checked (--skip_eval_check)" in first.stdout
    error = first.stderr.strip().splitlines()[-1]  # (decoders log to stderr too)
    assert "Traceback" not in first.stderr and error.startswith("error: ") and str(broken) in error
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["checkpoint-0.pth"]
    saved = checkpoint.read_checkpoint_file(str(out / "checkpoint-0.pth"))
    assert saved["train_state"]["eval_pending"] == 0 and not (out / "log.txt").exists()

    for path in (broken, missing):  # the user repairs the two videos
        shutil.copyfile(os.path.join(synthetic_root, "val", "val_00000.mp4"), path)
    second = _run_here(capsys, synthetic_root, out, *flags)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "epoch 0 was saved but its evaluation did not finish; evaluating now" in second.stdout
    assert "Epoch [0]" not in second.stdout  # no training step was repeated
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert [x["epoch"] for x in lines] == [0] and lines[0]["zs_t2v_queries"] > 0
    assert lines[0]["global_step"] == saved["global_step"]
    after = checkpoint.read_checkpoint_file(str(out / "checkpoint-0.pth"))["model"]
    assert all(torch.equal(after[k], v) for k, v in saved["model"].items())
    assert json.load(open(out / "eval_state.json"))["global_step"] == saved["global_step"]


@pytest.mark.slow
def test_bad_records_of_a_webvid_csv_are_all_listed_or_dropped_with_skip_bad_records(synthetic_root, tmp_path,
                                                                                      capsys):
    text = open(os.path.join(synthetic_root, "annotations", "train_webvid.csv")).read()
    anno = tmp_path / "train_with_bad_rows.csv"
    anno.write_text(text + "9001,u,d,train,\n,u,d,train,no id\n9003,u,d\n")
    out = tmp_path / "out"
    refused = _run_here(capsys, synthetic_root, out, "--data_path", str(anno), "--max_steps", "1")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{anno}: 3 bad records of 27" in refused.stderr
    for fragment in ("record 25 (line 26): empty caption", "record 26 (line 27): 'videoid' must be a non-empty",
                     "record 27 (line 28): 3 columns"):
        assert fragment in refused.stderr, fragment
    ran = _run_here(capsys, synthetic_root, out, "--data_path", str(anno), "--max_steps", "1", "--skip_bad_records")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "dropped 3 bad record(s) of 27 (--skip_bad_records)" in ran.stdout
    assert "Data: 24 videos" in ran.stdout


# ----------------------------------------------------------------------------------------------- broken videos


def _train_on_list(synthetic_root, out, anno, *extra):
    """The real entry point on a list of our own (2 data-loader workers); -> (result, stdout)."""
    args = _args(synthetic_root, out, "--data_path", anno, "--num_workers", "2", *extra)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = run_simvtp_pretraining.main(args)
    return result, stdout.getvalue()


def _broken_list(out):
    return [line.split("\t")[0] for line in (out / engine_for_pretraining.BROKEN_LIST).read_text().splitlines()]


@pytest.fixture(scope="module")
def mostly_broken(synthetic_root, broken_videos, module_tmp):
    """60% of the list broken (10 good, 12 missing, 3 unreadable), 2 epochs with 2 loader workers, not stopped."""
    folder = module_tmp.mktemp("mostly_broken")
    anno, broken = mostly_broken_list(synthetic_root, broken_videos, folder, good=10, missing=12)
    result, stdout = _train_on_list(synthetic_root, folder / "out", anno, "--max_broken_fraction", "0.9")
    return anno, broken, folder / "out", result, stdout


@pytest.mark.slow
def test_a_list_60_percent_broken_trains_and_names_each_broken_file_once(mostly_broken):
    """Before: `N videos in a row failed to decode` stopped the run, at the same sample on every restart."""
    _, broken, out, result, stdout = mostly_broken
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert [x["epoch"] for x in lines] == [0, 1] and os.path.isfile(out / "checkpoint-1.pth")
    listed = _broken_list(out)  # 2 workers x 2 epochs met them: each file once, every broken file
    assert sorted(listed) == sorted(broken)
    named = [line for line in stdout.splitlines() if line.startswith("WARNING: broken training video")]
    for path in broken:
        assert sum(f"one: {path}:" in line for line in named) == 1, path  # named once in the log too
    assert len(named) == len(broken)
    for record in lines:  # log.txt: files, not reads; and their share of the videos drawn
        assert record["broken_video_files"] == len(broken)
        assert record["broken_fraction"] == record["train_videos_broken_total"] / record["train_videos_read_total"]
    assert lines[1]["train_videos_broken_total"] > len(broken)  # read again in epoch 1, still 15 files
    assert 0.5 < lines[1]["broken_fraction"] < 0.7
    assert f"Broken training videos: {len(broken)} files" in stdout


@pytest.mark.slow
def test_resuming_a_mostly_broken_run_reaches_the_same_samples(mostly_broken, synthetic_root, tmp_path):
    anno, broken, full_out, full, _ = mostly_broken
    extra = ("--max_broken_fraction", "0.9")
    first, _ = _train_on_list(synthetic_root, tmp_path, anno, *extra, "--max_steps", "8")  # inside epoch 1
    assert os.path.basename(checkpoint.find_latest(str(tmp_path))) == "checkpoint-1-step2.pth"
    second, stdout = _train_on_list(synthetic_root, tmp_path, anno, *extra)
    resumed = first["history"] + second["history"]
    assert [h["step"] for h in resumed] == [h["step"] for h in full["history"]]
    assert [a["loss"] for a in resumed] == [b["loss"] for b in full["history"]]  # the same samples, bitwise
    _assert_same_weights(full_out, tmp_path)
    assert sorted(_broken_list(tmp_path)) == sorted(broken)  # the resumed run read the list back
    assert "WARNING: broken training video" not in stdout  # and named none of them again


@pytest.mark.slow
def test_a_check_report_as_exclude_list_means_its_files_are_never_opened(mostly_broken, synthetic_root, tmp_path):
    anno, broken, full_out, full, _ = mostly_broken
    report = tmp_path / "check.json"
    status = video_tools.main(["check", "--anno", anno, "--data_root", str(synthetic_root), "--num_frames", "4",
                               "--sampling_rate", "4", "--workers", "1", "--report", str(report)])
    assert status == video_tools.EXIT_ERRORS
    # the default --max_broken_fraction 0.5 would stop this list; excluded files are not drawn, not counted
    result, stdout = _train_on_list(synthetic_root, tmp_path / "out", anno, "--exclude_list", str(report))
    assert f"{len(broken)} of the 25 training videos are never opened" in stdout
    assert _broken_list(tmp_path / "out") == [] and "WARNING: broken" not in stdout
    lines = [json.loads(x) for x in open(tmp_path / "out" / "log.txt")]
    assert [(x["epoch"], x["broken_video_files"], x["train_videos_broken_total"]) for x in lines] == [(0, 0, 0),
                                                                                                     (1, 0, 0)]
    # never opened, yet the same samples as the run that found them broken: excluding changes no sample
    assert [a["loss"] for a in result["history"]] == [b["loss"] for b in full["history"]]


@pytest.mark.slow
def test_too_many_broken_videos_stop_the_run_with_the_share_the_files_and_the_checker(
        synthetic_root, broken_videos, tmp_path, capsys):
    anno, broken = mostly_broken_list(synthetic_root, broken_videos, tmp_path, good=2, missing=15)  # 90%
    run = _run_here(capsys, synthetic_root, tmp_path / "out", "--data_path", anno, "--max_broken_fraction", "0.5")
    assert run.returncode == 1, run.stderr[-2000:]
    error = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    message = error[0]
    share = int(message.split("% of the last")[0].rsplit(" ", 1)[1])
    assert share > 50 and "(more than --max_broken_fraction 0.5)" in message
    assert f"video_tools.py check --anno {anno} --data_root {synthetic_root}" in message
    listed = _broken_list(tmp_path / "out")
    assert len(listed) == len(set(listed)) and set(listed) <= broken
    assert all(p in listed for p in message.split("e.g. ")[1].split("; all are")[0].split(", "))
    stop = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[-1])
    assert stop["stopped"] == "too many broken training videos" and stop["broken_video_files"] == len(listed)
    assert stop["broken_fraction"] > 0.5
