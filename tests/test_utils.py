"""Pure logic of utils.py: schedules, lr scaling, optimizer groups, precision resolution, the resumable sampler."""
import numpy as np
import pytest
import torch

import utils


def test_cosine_schedule_warmup_then_cosine():
    sched = utils.cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=10, warmup_epochs=1, start_warmup_value=0.0)
    assert len(sched) == 40
    np.testing.assert_allclose(sched[:10], np.linspace(0.0, 1.0, 10, endpoint=False))
    assert sched[10] == pytest.approx(1.0)
    assert np.all(np.diff(sched[10:]) <= 1e-12)  # non-increasing after warm-up
    assert sched[-1] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 29 / 30)))
    assert sched[-1] > 0.1


def test_warmup_steps_override_and_constant_schedule():
    sched = utils.cosine_scheduler(2.0, 2.0, epochs=1, niter_per_ep=7, warmup_steps=3)
    assert len(sched) == 7 and sched[0] == 0.0 and np.allclose(sched[3:], 2.0)


def test_scaled_lr_linear_rule():
    assert utils.scaled_lr(1.5e-4, 16, 64, 1) == pytest.approx(1.5e-4 * 1024 / 256)
    assert utils.scaled_lr(1e-3, 8, 1, 4) == pytest.approx(1e-3 * 32 / 256)


def test_param_groups_no_decay_for_1d_and_named_tokens():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_parameter("mask_token", torch.nn.Parameter(torch.zeros(1, 1, 4)))
    groups = utils.param_groups(model, 0.05, no_decay_names=("mask_token",))
    by_name = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert by_name == {"0.weight": 0.05, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0, "mask_token": 0.0}
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    utils.apply_schedules(opt, lr=0.5, weight_decay=0.01)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_param_groups_layer_scale_multiplies_lr():
    model = torch.nn.Linear(2, 2)
    groups = utils.param_groups(model, 0.1, layer_scale={"weight": 0.25})
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    utils.apply_schedules(opt, lr=1.0, weight_decay=0.1)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.25, 1.0]


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert utils.resolve_precision("fp32", cpu) == torch.float32
    assert utils.resolve_precision("bf16", cpu) == torch.bfloat16
    assert utils.resolve_precision("auto", cpu) in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        utils.resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        utils.resolve_precision("int8", cpu)
    assert not utils.make_grad_scaler(cpu, torch.bfloat16).is_enabled()


def test_resumable_sampler_skips_exactly_the_seen_prefix():
    data = list(range(23))
    full = utils.ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=3)
    full.set_epoch(5)
    order = list(full)
    resumed = utils.ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=3)
    resumed.set_epoch(5)
    resumed.set_start(8)  # 8 samples seen over both ranks = 4 of this rank's
    assert list(resumed) == order[4:] and len(resumed) == len(order) - 4
    plain = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, seed=3, drop_last=True)
    plain.set_epoch(5)
    assert list(plain) == order  # from the start: DistributedSampler's own order
    other_epoch = utils.ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=3)
    other_epoch.set_epoch(6)
    assert list(other_epoch) != order


@pytest.mark.parametrize("drop_last", [True, False])
def test_resumable_sampler_continues_at_the_right_sample_with_another_process_count(drop_last):
    """2 processes x batch 3 stop after 2 steps (12 samples); 3 processes then see every other sample once."""
    data = list(range(29))

    def shares(world: int, start: int) -> list[list[int]]:
        out = []
        for rank in range(world):
            s = utils.ResumableDistributedSampler(data, num_replicas=world, rank=rank, seed=1, drop_last=drop_last)
            s.set_epoch(2)
            s.set_start(start)
            out.append(list(s))
            assert len(s) == len(out[-1])
        return out

    seen = [i for share in shares(2, 0) for i in share[:6]]
    rest = shares(3, 12)
    assert len({len(r) for r in rest}) == 1  # every rank the same number of samples
    after = [i for share in rest for i in share]
    assert not set(seen) & set(after)
    missed = set(data) - set(seen) - set(after)
    assert len(missed) <= 2 if drop_last else not missed  # only the tail that does not divide by 3 is dropped


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about():
    text = utils.emulated_bf16_warning("bf16", "cpu", native=False)
    assert "without AVX512-BF16 or AMX" in text and "--precision auto" in text
    assert utils.emulated_bf16_warning("bf16", "cpu", native=True) is None
    assert utils.emulated_bf16_warning("bf16", "cuda", native=False) is None  # a GPU's case is auto_precision's
    assert utils.emulated_bf16_warning("fp32", "cpu", native=False) is None


def test_auto_precision_is_native_bf16_else_fp16_on_cuda_else_fp32():
    assert utils.auto_precision("cuda", native_bf16=True) == "bf16"
    assert utils.auto_precision("cuda", native_bf16=False) == "fp16"  # emulated bf16 does not count as native
    assert utils.auto_precision("cpu", native_bf16=True) == "bf16"
    assert utils.auto_precision("cpu", native_bf16=False) == "fp32"
    assert utils.make_grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled() is False


def test_error_message_of_a_data_loader_worker_is_the_original_error_only(broken_videos):
    """A broken test video found inside a loader worker reaches the entry point wrapped with the worker's
    traceback; the user sees the original one-line message."""
    import annotations
    import datasets
    import video_io

    records = [annotations.VideoRecord(str(broken_videos["missing"]), ["x"], "gone")]
    dataset = datasets.VideoTextDataset(records, mode="test", num_frames=4, input_size=32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1)
    with pytest.raises(video_io.VideoDecodeError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)
    message = utils.error_message(info.value)
    assert message.startswith(f"{broken_videos['missing']}: file does not exist") and "\n" not in message
    assert utils.error_message(ValueError("plain")) == "plain"


@pytest.mark.parametrize("tf32, expected", [(True, "tf32"), (False, "ieee")])
def test_cuda_math_settings_follow_the_tf32_flag(tf32, expected):
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark)
    try:
        utils.configure_cuda_math(tf32)
        assert torch.backends.cuda.matmul.fp32_precision == expected
        assert torch.backends.cudnn.conv.fp32_precision == expected
        assert torch.backends.cudnn.benchmark is True
    finally:
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
         torch.backends.cudnn.benchmark) = saved


def test_device_math_is_set_for_a_cuda_device_and_left_alone_on_the_cpu():
    """What setup_run and search.py call with their device (no GPU needed: the settings are plain flags)."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark)
    try:
        utils.configure_cuda_math(False)
        torch.backends.cudnn.benchmark = False
        utils.configure_device_math(torch.device("cpu"), tf32=True)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.backends.cudnn.benchmark is False
        utils.configure_device_math(torch.device("cuda:1"))
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.backends.cudnn.benchmark is True
    finally:
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
         torch.backends.cudnn.benchmark) = saved


@pytest.mark.slow
def test_interrupted_message_names_the_checkpoint_to_resume_from():
    assert "nothing to resume" in utils.interrupted_message(None)
    text = utils.interrupted_message("out/checkpoint-3.pth")
    assert "out/checkpoint-3.pth" in text and "--auto_resume" in text
