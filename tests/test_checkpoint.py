"""checkpoint.py on real files: safe reading with clear errors, atomic writes, latest pointer, pruning, resume
state, and the safetensors converter run as a real process."""
import argparse
import fractions
import hashlib
import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

import checkpoint
import model_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_training_objects():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        checkpoint.read_checkpoint_file(str(tmp_path / "missing.pth"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="empty.pth.*0 bytes"):
        checkpoint.read_checkpoint_file(str(empty))
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(checkpoint.CheckpointError, match="notes.pth.*not a readable"):
        checkpoint.read_checkpoint_file(str(text))
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(checkpoint.CheckpointError, match="list.pth.*holds a list"):
        checkpoint.read_checkpoint_file(str(listing))


def test_release_style_file_with_namespace_loads_but_other_objects_do_not(tmp_path):
    release = tmp_path / "release.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-3)}, release)
    ckpt = checkpoint.read_checkpoint_file(str(release))
    assert ckpt["args"].lr == 1e-3
    assert torch.equal(checkpoint.model_state_dict(ckpt)["w"], torch.ones(2))

    evil = tmp_path / "evil.pth"  # an unexpected pickled class must be refused, not executed
    torch.save({"model": {}, "obj": fractions.Fraction(1, 3)}, evil)
    with pytest.raises(checkpoint.CheckpointError, match="evil.pth"):
        checkpoint.read_checkpoint_file(str(evil))


def test_model_state_dict_accepts_module_key_and_flat_files():
    assert "a" in checkpoint.model_state_dict({"module": {"a": torch.zeros(1)}})
    assert "b" in checkpoint.model_state_dict({"b": torch.zeros(1), "epoch": 3})
    with pytest.raises(checkpoint.CheckpointError, match="no model tensors"):
        checkpoint.model_state_dict({"epoch": 3}, "x.pth")


def test_save_latest_prune_and_restore(tmp_path):
    model, opt = _tiny_training_objects()
    out = str(tmp_path)
    for epoch in range(4):
        checkpoint.save_training_state(out, model=model, optimizer=opt, scaler=None, epoch=epoch,
                                       step_in_epoch=None, global_step=10 * (epoch + 1), args={"lr": 0.1},
                                       keep_last=2)
    names = sorted(os.listdir(out))
    assert names == ["checkpoint-2.pth", "checkpoint-3.pth", "latest"]
    assert not any(n.startswith(".tmp-") for n in names)
    assert open(os.path.join(out, "latest")).read().strip() == "checkpoint-3.pth"
    mid = checkpoint.save_training_state(out, model=model, optimizer=opt, scaler=None, epoch=4,
                                         step_in_epoch=5, global_step=45, args={}, keep_last=0)
    assert checkpoint.find_latest(out) == mid
    ckpt = checkpoint.read_checkpoint_file(mid)
    assert isinstance(ckpt["rng_states"][0]["cpu"], torch.Tensor) and ckpt["args"] == {}

    fresh, fresh_opt = torch.nn.Linear(3, 2), torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    start = checkpoint.restore_training_state(mid, fresh, fresh_opt, None)
    # a file without train_state: its position in samples from its args (none: batch 1, one process)
    assert start == {"epoch": 4, "micro_in_epoch": 5, "global_step": 45, "samples_in_epoch": 5}
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    torch.set_rng_state(ckpt["rng_states"][0]["cpu"])
    expected_draw = torch.rand(3)
    checkpoint.restore_training_state(mid, fresh, fresh_opt, None)
    assert torch.equal(torch.rand(3), expected_draw)
    after_epoch_3 = checkpoint.restore_training_state(os.path.join(out, "checkpoint-3.pth"), fresh, None, None)
    assert (after_epoch_3["epoch"], after_epoch_3["micro_in_epoch"]) == (4, 0)


def test_find_latest_without_pointer_and_weights_only_file_refused_for_resume(tmp_path):
    assert checkpoint.find_latest(str(tmp_path)) is None
    model, opt = _tiny_training_objects()
    for name in ("checkpoint-1.pth", "checkpoint-1-step3.pth", "checkpoint-0.pth"):
        checkpoint.save_atomic({"model": model.state_dict(), "epoch": 0}, str(tmp_path / name))
    assert os.path.basename(checkpoint.find_latest(str(tmp_path))) == "checkpoint-1.pth"
    weights = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, weights)
    with pytest.raises(checkpoint.CheckpointError, match="no training state .* cannot be resumed"):
        checkpoint.restore_training_state(str(weights), model, opt, None)


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "c.pth"
    checkpoint.save_atomic({"model": {"w": torch.ones(1)}}, str(target))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(RuntimeError):
        checkpoint.save_atomic({"model": {"w": Unpicklable()}}, str(target))
    assert torch.equal(checkpoint.read_checkpoint_file(str(target))["model"]["w"], torch.ones(1))
    assert os.listdir(tmp_path) == ["c.pth"]


@pytest.mark.slow
def test_safetensors_converter_round_trip_as_a_process(tmp_path):
    src = tmp_path / "in.pth"
    state = {"encoder.w": torch.randn(3, 4), "b": torch.arange(5)}
    torch.save({"module": state, "args": argparse.Namespace(x=1)}, src)
    st, back = tmp_path / "w.safetensors", tmp_path / "back.pth"
    for cmd in (["to-safetensors", str(src), str(st)], ["from-safetensors", str(st), str(back)]):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "checkpoint.py"), *cmd],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        assert f"wrote {cmd[2]}: 2 model tensors and args" in run.stdout
    restored = checkpoint.model_state_dict(checkpoint.read_checkpoint_file(str(back)))
    assert set(restored) == set(state) and all(torch.equal(restored[k], state[k]) for k in state)
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "checkpoint.py"), "to-safetensors",
                          str(tmp_path / "nope.pth"), str(st)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "nope.pth" in bad.stderr  # main's exit status is the process's


def _convert(capsys, *argv: str) -> subprocess.CompletedProcess:
    """The converter's command line (checkpoint.main: its exit status and what it prints) in this process, run from
    the repository folder; test_safetensors_converter_round_trip_as_a_process runs it as its own process."""
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        status = checkpoint.main(list(argv))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, status, out.out, out.err)


def _tiny_model_checkpoint(out_dir) -> tuple[str, dict]:
    """A real training checkpoint of a tiny registered model, written by the training save path."""
    torch.manual_seed(0)
    model = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4, decoder_depth=1, vocab_size=64)
    opt = torch.optim.AdamW(model.parameters())
    path = checkpoint.save_training_state(str(out_dir), model=model, optimizer=opt, scaler=None, epoch=0,
                                          step_in_epoch=None, global_step=3, args={"model": "simvtp_tiny_patch16"})
    return path, model.state_dict()


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask, expected):
    """Before: every checkpoint, `latest` and converter output was 0600 (tempfile.mkstemp), whatever the umask."""
    old = os.umask(umask)
    try:
        model, opt = _tiny_training_objects()
        path = checkpoint.save_training_state(str(tmp_path / "run"), model=model, optimizer=opt, scaler=None,
                                              epoch=0, step_in_epoch=None, global_step=1, args={})
        checkpoint.write_eval_state(str(tmp_path / "run"), {"epoch": 0})
        st, back = tmp_path / "conv" / "w.safetensors", tmp_path / "conv" / "back.pth"
        checkpoint.to_safetensors(path, str(st))
        checkpoint.from_safetensors(str(st), str(back))
    finally:
        os.umask(old)
    for written in (path, tmp_path / "run" / "latest", tmp_path / "run" / "eval_state.json", st, back):
        assert _mode(written) == expected, (written, oct(_mode(written)))


@pytest.mark.slow
def test_a_model_checkpoint_round_trips_through_safetensors_and_rebuilds(tmp_path, capsys):
    """Before: from-safetensors wrote {"model": <the whole file>} for a .pth input, and a .safetensors held no
    model description, so neither rebuilt the model."""
    src, state = _tiny_model_checkpoint(tmp_path / "run")
    st, back = tmp_path / "w.safetensors", tmp_path / "back.pth"
    to = _convert(capsys, "to-safetensors", src, str(st))
    assert to.returncode == 0, to.stderr
    assert f"wrote {st}: {len(state)} model tensors and model_cfg + args" in to.stdout
    assert "left out (training state, not weights): optimizer" in to.stdout
    fro = _convert(capsys, "from-safetensors", str(st), str(back))
    assert fro.returncode == 0, fro.stderr
    assert f"wrote {back}: {len(state)} model tensors and model_cfg + args" in fro.stdout

    from safetensors import safe_open
    with safe_open(str(st), "pt") as f:
        assert json.loads(f.metadata()["model_cfg"])["name"] == "simvtp_tiny_patch16"
    saved = checkpoint.read_checkpoint_file(str(back))
    assert set(saved) == {"model", "model_cfg", "args"}
    assert saved["model_cfg"] == checkpoint.read_checkpoint_file(src)["model_cfg"]
    for path in (str(st), str(back)):  # both outputs rebuild the same model, without naming it
        rebuilt = checkpoint.build_model_from(checkpoint.read_checkpoint_file(path), path)
        assert type(rebuilt).__name__ == "SimVTPPretrain"
        got = rebuilt.state_dict()
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    fresh = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4, decoder_depth=1, vocab_size=64)
    report = checkpoint.load_pretrained(fresh, str(st), strict=True, verbose=False)
    assert len(report.loaded) == len(state)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_converter_refuses_to_overwrite_its_input_however_spelled(tmp_path, capsys):
    """Before: `to-safetensors X X` replaced the checkpoint with its safetensors copy."""
    src, _ = _tiny_model_checkpoint(tmp_path / "run")
    os.symlink(src, tmp_path / "link.pth")
    os.link(src, tmp_path / "hard.pth")
    before = _digest(src)
    spellings = [src, os.path.join(os.path.dirname(src), ".", "..", "run", os.path.basename(src)),
                 str(tmp_path / "link.pth"), str(tmp_path / "hard.pth")]
    for dst in spellings:
        assert checkpoint.main(["to-safetensors", src, dst]) == 2, dst
    run = _convert(capsys, "to-safetensors", src, os.path.relpath(src, ROOT))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "is the input file" in run.stderr and "Traceback" not in run.stderr
    assert _digest(src) == before
    st = tmp_path / "w.safetensors"
    assert checkpoint.main(["to-safetensors", src, str(st)]) == 0
    st_before = _digest(st)
    assert checkpoint.main(["from-safetensors", str(st), str(st)]) == 2
    assert _digest(st) == st_before


def test_converter_user_mistakes_are_one_line_errors(tmp_path, capsys):
    """Before: a missing output folder was a raw safetensors error, a .pth given to from-safetensors was wrapped
    into a nested file (and reported as written)."""
    src, state = _tiny_model_checkpoint(tmp_path / "run")
    nested = tmp_path / "new" / "deeper" / "w.safetensors"  # a missing output folder is created
    assert checkpoint.main(["to-safetensors", src, str(nested)]) == 0
    assert f"{len(state)} model tensors" in capsys.readouterr().out
    cases = {
        ("from-safetensors", src, str(tmp_path / "x.pth")): r"not a safetensors file \(use to-safetensors",
        ("to-safetensors", src, str(tmp_path)): "is a directory",
        ("to-safetensors", str(tmp_path / "nope.pth"), str(tmp_path / "y.safetensors")): "not found: .*nope.pth",
        ("from-safetensors", src + ".missing", str(tmp_path / "z.pth")): "not found",
    }
    for argv, expected in cases.items():
        assert checkpoint.main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(expected, err), (argv, err)
    assert not (tmp_path / "x.pth").exists() and not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))
    os.chmod(tmp_path / "new", 0o500)  # a folder that cannot take the output (skipped for root, who may write)
    try:
        if not os.access(tmp_path / "new", os.W_OK):
            assert checkpoint.main(["to-safetensors", src, str(tmp_path / "new" / "w.safetensors")]) == 2
            assert "new/w.safetensors: cannot create a file in" in capsys.readouterr().err
    finally:
        os.chmod(tmp_path / "new", 0o700)


def test_plain_args_holds_only_plain_values():
    ns = argparse.Namespace(a=1, b="x", c=[1, 2], d=torch.device("cpu"), e=None)
    assert checkpoint.plain_args(ns) == {"a": 1, "b": "x", "c": [1, 2], "d": "cpu", "e": None}
