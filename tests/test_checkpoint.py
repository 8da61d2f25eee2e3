"""checkpoint.py on real files: safe reading with clear errors, atomic writes, latest pointer, pruning, resume
state, and the safetensors converter run as a real process."""
import argparse
import fractions
import os
import subprocess
import sys

import pytest
import torch

import checkpoint

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


def test_safetensors_converter_round_trip_as_a_process(tmp_path):
    src = tmp_path / "in.pth"
    state = {"encoder.w": torch.randn(3, 4), "b": torch.arange(5)}
    torch.save({"module": state, "args": argparse.Namespace(x=1)}, src)
    st, back = tmp_path / "w.safetensors", tmp_path / "back.pth"
    for cmd in (["to-safetensors", str(src), str(st)], ["from-safetensors", str(st), str(back)]):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "checkpoint.py"), *cmd],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        assert "wrote 2 tensors" in run.stdout
    restored = checkpoint.model_state_dict(checkpoint.read_checkpoint_file(str(back)))
    assert set(restored) == set(state) and all(torch.equal(restored[k], state[k]) for k in state)
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "checkpoint.py"), "to-safetensors",
                          str(tmp_path / "nope.pth"), str(st)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "nope.pth" in bad.stderr
