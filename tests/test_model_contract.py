"""The model contract: a second model family, written here in a few lines, runs pre-training, resume, zero-shot
retrieval and re-ranking through the real entry points with no change to the engines or run scripts. Also the
engine's exact positions: gradient accumulation, partial windows, skipped non-finite steps and resume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import annotations
import checkpoint
import engine_for_pretraining as engine
import model_registry
import engine_for_retrieval
import run_simvtp_finetuning
import run_simvtp_pretraining
import search
import utils
from conftest import ROOT

# ----------------------------------------------------------------------------------------------- the toy family


class ToyVideoText(nn.Module):
    """Mean colour of the clip and a bag of words, each projected; contrastive loss; a matching head on both."""
    takes_video_mask = False
    text_masking = None
    num_layers = 1

    def __init__(self, img_size: int = 32, num_frames: int = 4, vocab_size: int = 30522, dim: int = 16,
                 temperature: float = 0.1, nan_on_sample: int = -1) -> None:
        super().__init__()
        self.video_proj = nn.Linear(3, dim)
        self.words = nn.EmbeddingBag(vocab_size, dim, mode="sum")
        self.match = nn.Linear(2 * dim, 2)
        self.temperature, self.nan_on_sample = temperature, nan_on_sample

    def layer_id(self, name: str) -> int:
        return model_registry.layer_id_from_name(name, self.num_layers)

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.video_proj(video.float().mean(dim=(2, 3, 4)))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        w = attention_mask.float()
        return self.words(input_ids, per_sample_weights=w) / w.sum(1, keepdim=True)

    def match_logits(self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.match(torch.cat([self.encode_video(video), self.encode_text(input_ids, attention_mask)], -1))

    def forward(self, batch: dict, gather=None) -> dict:
        v = F.normalize(self.encode_video(batch["video"]), dim=-1)
        t = F.normalize(self.encode_text(batch["input_ids"], batch["attention_mask"]), dim=-1)
        logits = v @ t.t() / self.temperature
        loss = F.cross_entropy(logits, torch.arange(len(v)))
        if bool((batch["index"] == self.nan_on_sample).any()):
            loss = loss * float("nan")
        return {"loss": loss, "toy_alignment": (v * t).sum(-1).mean().detach()}


model_registry.register_family(model_registry.ModelFamily(
    name="toy", add_args=lambda g: (g.add_argument("--toy_dim", type=int, default=None),
                                    g.add_argument("--toy_nan_on_sample", type=int, default=None)),
    convert_state_dict=lambda state, model: (dict(state), "toy"),
    flag_to_kwarg={"toy_dim": "dim", "toy_nan_on_sample": "nan_on_sample"}))


@model_registry.register_model("toy")
def toy_tiny(**kwargs) -> ToyVideoText:
    return ToyVideoText(**kwargs)

# ----------------------------------------------------------------------------------------------- entry points


def _pretrain_args(root, out, *extra):
    argv = ["--data_path", os.path.join(root, "annotations", "pretrain.json"), "--data_root", str(root),
            "--model", "toy_tiny", "--toy_dim", "8", "--num_frames", "4", "--input_size", "32", "--batch_size", "4",
            "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-2", "--num_workers", "0", "--device", "cpu",
            "--precision", "fp32", "--output_dir", str(out), "--print_freq", "2", "--seed", "5", *extra]
    return run_simvtp_pretraining.get_args_parser().parse_args(argv)


def _weights(out) -> dict:
    return checkpoint.read_checkpoint_file(checkpoint.find_latest(str(out)))["model"]


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def toy_run(synthetic_root, module_tmp):
    out = module_tmp.mktemp("toy_full")
    result = run_simvtp_pretraining.main(_pretrain_args(synthetic_root, out, "--accum_iter", "2",
                                                        "--toy_nan_on_sample", "7"))
    return out, result


@pytest.mark.slow
def test_a_second_family_pretrains_through_the_real_entry_point(toy_run):
    out, result = toy_run
    assert "toy_alignment" in result["summary"]  # every scalar the model returns is logged
    ckpt = checkpoint.read_checkpoint_file(str(out / "checkpoint-1.pth"))
    assert ckpt["model_cfg"] == {"name": "toy_tiny", "kwargs": {"img_size": 32, "num_frames": 4, "dim": 8,
                                                                 "nan_on_sample": 7, "vocab_size": 30522}}
    # 24 videos / batch 4 = 6 micro-batches = 3 windows an epoch; sample 7's window is skipped each epoch
    assert ckpt["train_state"]["global_step"] == 6 and ckpt["train_state"]["skipped_steps"] == 2
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert [x["epoch"] for x in lines] == [0, 1] and "train_toy_alignment" in lines[0]


@pytest.mark.slow
def test_kill_and_resume_with_accumulation_and_a_skipped_step_is_bitwise_equal(toy_run, synthetic_root, tmp_path):
    full_out, full = toy_run
    extra = ("--accum_iter", "2", "--toy_nan_on_sample", "7")
    for stop in (1, 4):  # inside epoch 0, then inside epoch 1 (each a mid-epoch checkpoint)
        run_simvtp_pretraining.main(_pretrain_args(synthetic_root, tmp_path, *extra, "--max_steps", str(stop)))
    latest = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(tmp_path)))
    assert latest["train_state"]["epoch"] == 1 and latest["train_state"]["micro_in_epoch"] == 2
    run_simvtp_pretraining.main(_pretrain_args(synthetic_root, tmp_path, *extra))
    _assert_bitwise_equal(_weights(tmp_path), _weights(full_out))


@pytest.mark.slow
def test_zero_shot_and_reranking_of_a_second_family_without_model_flag(toy_run, synthetic_root, tmp_path):
    out, _ = toy_run
    argv = ["--zero_shot", "--finetune", str(out / "checkpoint-1.pth"), "--data_root", str(synthetic_root),
            "--test_data_path", os.path.join(synthetic_root, "annotations", "test.json"), "--num_frames", "4",
            "--input_size", "32", "--test_num_segment", "1", "--test_num_crop", "1", "--rerank_k", "2",
            "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--precision", "fp32",
            "--output_dir", str(tmp_path)]
    result = run_simvtp_finetuning.main(run_simvtp_finetuning.get_args_parser().parse_args(argv))
    assert result["t2v_queries"] > 0 and 0 <= result["t2v_R@1"] <= 100
    assert result["rerank"]["rerank_k"] == 2 and "t2v_R@1" in result["rerank"]


@pytest.mark.slow
def test_only_test_reranks_with_the_tested_models_own_matching_head(toy_run, synthetic_root, tmp_path):
    """A model with match_logits (SViTT, fine-tuned or not) re-ranks its own top k under --only_test, as the
    release evaluates; the same re-ranking as --zero_shot gives on the same weights."""
    out, _ = toy_run
    argv = ["--finetune", str(out / "checkpoint-1.pth"), "--data_root", str(synthetic_root),
            "--test_data_path", os.path.join(synthetic_root, "annotations", "test.json"), "--num_frames", "4",
            "--input_size", "32", "--test_num_segment", "1", "--test_num_crop", "1", "--rerank_k", "3",
            "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--precision", "fp32"]
    parser = run_simvtp_finetuning.get_args_parser()
    tested = run_simvtp_finetuning.main(parser.parse_args(argv + ["--only_test", "--output_dir", str(tmp_path / "t")]))
    zero = run_simvtp_finetuning.main(parser.parse_args(argv + ["--zero_shot", "--output_dir", str(tmp_path / "z")]))
    assert tested["rerank"] == {**zero["rerank"], "seconds": tested["rerank"]["seconds"]}
    assert json.loads((tmp_path / "t" / "test_metrics.json").read_text())["rerank"]["rerank_k"] == 3


def test_reranking_a_model_without_matching_head_asks_for_rerank_ckpt():
    model = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4)
    args = run_simvtp_finetuning.get_args_parser().parse_args(["--rerank_k", "4"])
    assert engine_for_retrieval.own_match_model(model, args) is None
    with pytest.raises(ValueError, match="has no matching head; give --rerank_ckpt"):
        engine_for_retrieval.load_match_model(args)


FAMILY_MODULE = """
# A model family kept outside the repository: SimVTP's dual encoder, smaller, under names of its own.
import model_registry
import modeling_simvtp


class MyDualEncoder(modeling_simvtp.SimVTPDualEncoder):
    pass  # the same towers, built at 32 channels and one block by its factory


model_registry.register_family(model_registry.ModelFamily(
    name="my_family", add_args=lambda g: None, convert_state_dict=lambda state, model, **kw: (dict(state), "mine")))


@model_registry.register_model("my_family")
def my_dual_micro(**kwargs) -> MyDualEncoder:
    return MyDualEncoder(**{"embed_dim": 32, "depth": 1, "num_heads": 2, **kwargs})
"""


def test_an_out_of_tree_family_is_registered_by_model_module_and_built_by_the_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_out_of_tree_family.py").write_text(FAMILY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["--model_module", "my_out_of_tree_family", "--model", "my_dual_micro", "--num_frames", "4",
            "--input_size", "32", "--device", "cpu", "--output_dir", str(tmp_path)]
    args = run_simvtp_finetuning.get_args_parser().parse_args(argv)
    assert args.model_module == ["my_out_of_tree_family"]
    run_simvtp_finetuning.setup(args)
    model = engine_for_retrieval.build_for_training(args, vocab_size=64)
    assert type(model).__name__ == "MyDualEncoder" and model_registry.family_of(model).name == "my_family"
    assert model.model_cfg["name"] == "my_dual_micro" and model.clip_shape == (4, 32)
    assert model_registry.supports(model, "retrieval") and not model_registry.supports(model, "rerank")
    video = torch.randn(2, 3, 4, 32, 32)
    assert model.encode_video(video).shape == (2, 32)


def test_capabilities_are_asked_by_name_and_unwrap_a_wrapper():
    model = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4)
    assert isinstance(model, model_registry.VideoTextModel)
    for capability in ("retrieval", "rerank", "match", "temperature", "reconstruct", "probe", "clip_shape"):
        assert model_registry.supports(model, capability), capability

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module
    assert model_registry.supports(Wrapper(model), "rerank") and model_registry.unwrap(Wrapper(model)) is model
    dual = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4)
    assert not model_registry.supports(dual, "rerank") and not model_registry.supports(dual, "qa")
    assert model_registry.capability_value(dual, "optional_keys", ()) == ()
    with pytest.raises(ValueError, match="not a QA model"):
        model_registry.require(dual, "qa", "not a QA model")
    with pytest.raises(ValueError, match="unknown capability"):
        model_registry.supports(dual, "fly")


def test_a_flag_of_another_family_is_an_error_naming_its_family(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="--decoder_depth belongs to the simvtp model family; --model toy_tiny"):
        run_simvtp_pretraining.main(_pretrain_args(synthetic_root, tmp_path, "--decoder_depth", "2"))
    args = _pretrain_args(synthetic_root, tmp_path, "--model", "simvtp_tiny_patch16")
    with pytest.raises(ValueError, match="--toy_dim belongs to the toy model family"):
        run_simvtp_pretraining.main(args)


def test_a_family_layer_ids_drive_layer_decay():
    model = model_registry.create("toy_tiny", dim=4, vocab_size=10)
    assert model.layer_id("words.weight") == 2 and model.layer_id("video_proj.weight") == 2


# ----------------------------------------------------------------------------------------------- engine positions


class MeanSquare(nn.Module):
    """A loss that is a mean over samples: accumulation must reproduce the large batch's gradient exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 3, dtype=torch.float64))

    def forward(self, batch: dict, gather=None) -> dict:
        return {"loss": ((batch["x"] @ self.w - batch["y"]) ** 2).mean()}


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)


def _sgd_epoch(batch_size: int, accum: int, n: int) -> tuple[torch.Tensor, engine.TrainState]:
    """One epoch of plain SGD (lr 1) through the engine: the weight change is minus the summed step gradients."""
    x, y = _data(n)
    loader = [{"x": x[i:i + batch_size], "y": y[i:i + batch_size], "video": x[i:i + batch_size]}
              for i in range(0, n, batch_size)]
    model = MeanSquare()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    state = engine.TrainState()
    cfg = engine.StepConfig(device=torch.device("cpu"), dtype=torch.float32, accum_iter=accum, print_freq=100)
    steps = engine.steps_in_epoch(len(loader), accum)
    engine.train_one_epoch(model, loader, optimizer, utils.make_grad_scaler(torch.device("cpu"), torch.float32),
                           len(loader), np.ones(steps), np.zeros(steps), cfg, state)
    return model.w.detach(), state


def test_accumulating_two_batches_of_two_equals_one_batch_of_four():
    w_accum, state = _sgd_epoch(batch_size=2, accum=2, n=4)
    w_large, _ = _sgd_epoch(batch_size=4, accum=1, n=4)
    torch.testing.assert_close(w_accum, w_large, rtol=0, atol=1e-15)
    assert state.global_step == 1 and state.micro_in_epoch == 2


def test_a_last_partial_window_is_stepped_with_its_own_mean():
    w, state = _sgd_epoch(batch_size=2, accum=2, n=6)  # windows of 2 and then 1 micro-batches
    assert state.global_step == 2 and state.micro_in_epoch == 3
    x, y = _data(6)
    expected = torch.linspace(-1, 1, 3, dtype=torch.float64)
    for lo, hi in ((0, 4), (4, 6)):
        expected = expected - 2 * x[lo:hi].t() @ (x[lo:hi] @ expected - y[lo:hi]) / (hi - lo)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)


class Quadratic32(nn.Module):
    """A float32 loss that overflows once multiplied by a huge loss scale (as fp16 gradients overflow on GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 3))

    def forward(self, batch: dict, gather=None) -> dict:
        return {"loss": 1e6 * ((batch["x"].float() @ self.w - batch["y"].float()) ** 2).mean()}


def test_steps_the_loss_scaler_skips_are_counted_and_its_scale_is_logged():
    x, y = _data(8)
    loader = [{"x": x[i:i + 2], "y": y[i:i + 2], "video": x[i:i + 2]} for i in range(0, 8, 2)]
    model, state = Quadratic32(), engine.TrainState()
    start = model.w.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=1000)  # x gradients ~1e6: inf
    cfg = engine.StepConfig(device=torch.device("cpu"), dtype=torch.float32, print_freq=100)
    summary = engine.train_one_epoch(model, loader, optimizer, scaler, 4, np.ones(4), np.zeros(4), cfg, state)
    scales = [h["loss_scale"] for h in state.history]
    assert scales == [2.0 ** 126, 2.0 ** 125, 2.0 ** 124, 2.0 ** 123]  # each overflow halves the scale ...
    assert state.scaler_skipped_steps == 4 and summary["scaler_skipped_steps_total"] == 4  # ... and is counted
    assert torch.equal(model.w.detach(), start)  # no skipped step changed the weights
    assert "scaler_skipped" not in state.history[0]  # counted, not logged as a per-step scalar


@pytest.mark.slow
def test_search_reads_a_checkpoint_of_an_out_of_tree_family_given_its_module(tmp_path, monkeypatch, synthetic_root):
    """search.py (like the figure and the probe) takes --model_module: without it the checkpoint's model is unknown,
    with it the videos are embedded by the family's own model."""
    source = FAMILY_MODULE.replace("my_family", "my_search_family").replace("my_dual_micro", "my_search_micro")
    (tmp_path / "my_search_family.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = tmp_path / "mine.pth"
    writer = ("import sys; sys.path[:0] = sys.argv[1:3]; import checkpoint, model_registry, my_search_family; "
              "m = model_registry.create('my_search_micro', img_size=32, num_frames=4); "
              "checkpoint.save_atomic({'model': m.state_dict(), 'model_cfg': m.model_cfg, 'epoch': 0}, sys.argv[3])")
    subprocess.run([sys.executable, "-c", writer, str(tmp_path), str(ROOT), str(ckpt)], check=True)
    videos = tmp_path / "videos"
    videos.mkdir()
    for record in annotations.read_annotations(synthetic_root / "annotations" / "test.json", synthetic_root)[:3]:
        shutil.copy(record.path, videos)

    def index(*extra):
        return search.main(search.get_args_parser().parse_args(
            ["index", str(videos), "--ckpt", str(ckpt), "--out", str(tmp_path / "index"), "--precision", "fp32",
             "--num_frames", "4", "--input_size", "32", "--sampling_rate", "2", "--print_freq", "100", *extra]))

    with pytest.raises(Exception, match="my_search_micro"):
        index()
    index("--model_module", "my_search_family")
    manifest = search.read_manifest(str(tmp_path / "index"))
    rows = search.read_embeddings(str(tmp_path / "index"), manifest)
    assert len(manifest["videos"]) == 3 and rows.shape == (3, 32)
