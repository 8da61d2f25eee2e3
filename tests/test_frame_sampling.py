"""Segment frame sampling (--sample_type rand / middle, --sample_type_test): the index functions, the loader on a
real mp4 whose frames carry their own index, the flags' defaults and how a changed sample type shows on resume."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import annotations
import checkpoint
import datasets
import model_registry
import engine_for_pretraining
import engine_for_retrieval
import run_simvtp_finetuning
import run_simvtp_pretraining
import synthetic_dataset
import video_transforms
from annotations import VideoRecord

# ----------------------------------------------------------------------------------------------- index functions


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 500), t=st.integers(1, 40))
def test_segments_tile_the_video(n, t):
    bounds = video_transforms.segment_bounds(n, t)
    assert len(bounds) == t and bounds[0][0] == 0 and all(0 <= a < b <= n for a, b in bounds)
    if n >= t:  # contiguous, the whole video, lengths within one frame of each other
        assert all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:])) and bounds[-1][1] == n
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    else:  # one frame each, in order, every frame used
        assert all(b - a == 1 for a, b in bounds) and [a for a, _ in bounds] == sorted(a for a, _ in bounds)
        assert {a for a, _ in bounds} == set(range(n))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 500), t=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_rand_takes_one_frame_inside_each_segment_from_the_generator(n, t, seed):
    idx = video_transforms.segment_frame_indices(n, t, "rand", np.random.default_rng(seed))
    assert len(idx) == t and all(isinstance(i, int) for i in idx)
    assert all(a <= i < b for i, (a, b) in zip(idx, video_transforms.segment_bounds(n, t)))
    assert idx == video_transforms.segment_frame_indices(n, t, "rand", np.random.default_rng(seed))
    if n >= t:
        assert all(j > i for i, j in zip(idx, idx[1:]))  # one frame per segment: never the same frame twice


def test_rand_reaches_every_frame_of_every_segment():
    draws = np.array([video_transforms.segment_frame_indices(10, 4, "rand", np.random.default_rng(s))
                      for s in range(400)])
    assert [set(draws[:, i].tolist()) for i in range(4)] == [{0, 1}, {2, 3, 4}, {5, 6}, {7, 8, 9}]
    with pytest.raises(ValueError, match="needs the sample's generator"):
        video_transforms.segment_frame_indices(10, 4, "rand")


def test_middle_examples_and_short_videos():
    assert video_transforms.segment_frame_indices(10, 4, "middle") == [0, 3, 5, 8]  # segments 0-1, 2-4, 5-6, 7-9
    assert video_transforms.segment_frame_indices(16, 4, "middle") == [1, 5, 9, 13]  # the earlier of two middles
    assert video_transforms.segment_frame_indices(100, 1, "middle") == [49]
    assert video_transforms.segment_frame_indices(3, 6, "middle") == [0, 0, 1, 1, 2, 2]  # short: each frame repeated
    assert video_transforms.segment_frame_indices(3, 6, "rand", np.random.default_rng(0)) == [0, 0, 1, 1, 2, 2]
    assert video_transforms.segment_frame_indices(1, 4, "middle") == [0, 0, 0, 0]
    assert video_transforms.segment_frame_indices(7, 3, "middle") == \
        video_transforms.segment_frame_indices(7, 3, "middle")
    with pytest.raises(ValueError, match="no frames"):
        video_transforms.segment_frame_indices(0, 4, "middle")


def test_k_middle_views_take_positions_j_plus_half_over_k_of_each_segment():
    assert video_transforms.segment_clip_indices(30, 3, 3, "middle") == [[1, 11, 21], [4, 14, 24], [8, 18, 28]]
    assert video_transforms.segment_clip_indices(30, 3, 1, "middle") == \
        [video_transforms.segment_frame_indices(30, 3, "middle")]
    assert video_transforms.segment_clip_indices(8, 4, 2, "middle") == [[0, 2, 4, 6], [1, 3, 5, 7]]  # every frame once


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 500), t=st.integers(1, 32), k=st.integers(1, 8))
def test_middle_views_properties(n, t, k):
    views = video_transforms.segment_clip_indices(n, t, k, "middle")
    bounds = video_transforms.segment_bounds(n, t)
    assert len(views) == k and all(len(v) == t for v in views)
    for s, (a, b) in enumerate(bounds):
        column = [v[s] for v in views]
        assert all(a <= i < b for i in column) and column == sorted(column)  # view j before view j + 1
        if b - a >= k:
            assert len(set(column)) == k  # enough frames: every view its own frame
        # view j is the frame holding position (j + 0.5) / k of the segment (a boundary: the earlier frame), in
        # exact integers: i - a < (2j + 1)(b - a) / 2k <= i - a + 1
        assert all(2 * k * (i - a) < (2 * j + 1) * (b - a) <= 2 * k * (i - a + 1) for j, i in enumerate(column))


def test_rand_evaluation_views_are_drawn_from_the_generator():
    views = video_transforms.segment_clip_indices(60, 4, 3, "rand", np.random.default_rng(5))
    assert views == video_transforms.segment_clip_indices(60, 4, 3, "rand", np.random.default_rng(5))
    assert len({tuple(v) for v in views}) == 3
    assert all(a <= v[s] < b for v in views for s, (a, b) in enumerate(video_transforms.segment_bounds(60, 4)))


def test_stride_is_todays_sampling_and_bad_types_are_refused():
    for seed in range(20):
        assert video_transforms.train_frame_indices(100, 8, 4, "stride", np.random.default_rng(seed)) == \
            video_transforms.stride_frame_indices(100, 8, 4, np.random.default_rng(seed))
    assert video_transforms.eval_clip_indices(100, 4, 2, 3, "stride") == \
        video_transforms.stride_clip_indices(100, 4, 2, 3)
    assert video_transforms.train_frame_indices(100, 4, 9, "middle", np.random.default_rng(0)) == [12, 37, 62, 87]
    with pytest.raises(ValueError, match="unknown sample type 'uniform'"):
        video_transforms.train_frame_indices(100, 4, 2, "uniform", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown sample type"):
        datasets.VideoTextDataset([VideoRecord("a.mp4", ["a"], "a")], sample_type="segments")


# ----------------------------------------------------------------------------------------------- through the loader

GRAY_STEP = 8  # frame t of the gray video is all t * GRAY_STEP: any crop or resize keeps its index readable


@pytest.fixture(scope="module")
def gray_video(module_tmp):
    """A 30-frame 64 x 48 H.264 mp4 whose frame t is uniformly t * GRAY_STEP."""
    frames = np.repeat((np.arange(30, dtype=np.uint8) * GRAY_STEP)[:, None, None, None], 64 * 48 * 3, axis=1)
    path = module_tmp.mktemp("gray") / "gray.mp4"
    synthetic_dataset.write_video(path, frames.reshape(30, 48, 64, 3), fps=10, codec="libx264")
    return path


def _frames_of(clip) -> list[int]:
    """uint8 [3, T, S, S] -> the frame index each of its T frames shows."""
    return [int(round(float(clip[:, t].float().mean()) / GRAY_STEP)) for t in range(clip.shape[1])]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_training_clips_show_the_frames_sample_type_asks_for(gray_video, backend):
    recs = [VideoRecord(str(gray_video), ["gray"], "gray")] * 3
    for sample_type in ("rand", "middle", "stride"):
        ds = datasets.VideoTextDataset(recs, mode="train", num_frames=6, sampling_rate=3, input_size=32, seed=4,
                                       video_backend=backend, sample_type=sample_type)
        ds.set_epoch(2)
        for index in range(3):
            rng = video_transforms.sample_rng(4, 2, index, "frames")
            want = video_transforms.train_frame_indices(30, 6, 3, sample_type, rng)
            assert _frames_of(ds[index]["video"]) == want, (sample_type, index)
    rand = datasets.VideoTextDataset(recs, mode="train", num_frames=6, input_size=32, seed=4, sample_type="rand")
    epochs = [_frames_of(rand[0]["video"])]
    rand.set_epoch(1)
    epochs.append(_frames_of(rand[0]["video"]))
    assert epochs[0] != epochs[1] and epochs[1] == _frames_of(rand[0]["video"])  # per (seed, epoch, index)
    assert _frames_of(datasets.VideoTextDataset(recs, mode="train", num_frames=6, input_size=32,
                                                sample_type="middle")[0]["video"]) == [2, 7, 12, 17, 22, 27]


def test_evaluation_views_show_their_segment_positions(gray_video):
    recs = [VideoRecord(str(gray_video), ["gray"], "gray")]
    middle = datasets.VideoTextDataset(recs, mode="test", num_frames=5, input_size=32, short_side_size=32,
                                       test_num_segment=3, test_num_crop=2, sample_type="middle")
    video = middle[0]["video"]  # [views = 3 segments x 2 crops, 3, T, S, S], clip-major
    assert [_frames_of(v) for v in video] == [[0, 6, 12, 18, 24]] * 2 + [[2, 8, 14, 20, 26]] * 2 \
        + [[4, 10, 16, 22, 28]] * 2
    rand = datasets.VideoTextDataset(recs, mode="test", num_frames=5, input_size=32, short_side_size=32,
                                     test_num_segment=2, seed=9, sample_type="rand")
    got = [_frames_of(v) for v in rand[0]["video"]]
    assert got == video_transforms.eval_clip_indices(30, 5, 4, 2, "rand",
                                                     video_transforms.sample_rng(9, 0, 0, "frames"))
    rand.set_epoch(3)
    assert [_frames_of(v) for v in rand[0]["video"]] == got  # evaluation: fixed by the seed alone
    assert "rand of equal segments" in repr(rand)


# ----------------------------------------------------------------------------------------------- flags, resume


def _parsed(parser: argparse.ArgumentParser, *argv: str) -> argparse.Namespace:
    args = parser.parse_args(list(argv))
    video_transforms.resolve_sample_types(args)  # what the entry points do before anything is saved or compared
    return args


@pytest.mark.parametrize("make_parser, required", [
    (run_simvtp_pretraining.get_args_parser, ["--data_path", "x.json"]),
    (run_simvtp_finetuning.get_args_parser, [])])
def test_both_entry_points_take_the_flags_and_evaluation_follows_training(make_parser, required):
    p = make_parser()
    assert (lambda a: (a.sample_type, a.sample_type_test))(_parsed(p, *required)) == ("stride", "stride")
    assert _parsed(p, *required, "--sample_type", "rand").sample_type_test == "middle"
    assert _parsed(p, *required, "--sample_type", "middle").sample_type_test == "middle"
    assert _parsed(p, *required, "--sample_type", "rand", "--sample_type_test", "rand").sample_type_test == "rand"
    assert _parsed(p, *required, "--sample_type_test", "middle").sample_type == "stride"
    text = " ".join(p.format_help().split())  # the wrapping depends on the terminal's width
    assert "--sample_type {stride,rand,middle}" in text and "(default: stride)" in text
    assert "default: middle when" in text and "rand and middle ignore it" in text
    with pytest.raises(SystemExit):
        p.parse_args([*required, "--sample_type", "uniform"])


def test_a_changed_sample_type_is_a_reported_setting_change_also_against_older_checkpoints():
    p = run_simvtp_pretraining.get_args_parser()
    saved = checkpoint.plain_args(_parsed(p, "--data_path", "x.json"))
    now = _parsed(p, "--data_path", "x.json", "--sample_type", "rand")
    assert checkpoint.setting_changes(saved, now) == {"sample_type": ("stride", "rand"),
                                                      "sample_type_test": ("stride", "middle")}
    assert checkpoint.describe_changes(checkpoint.setting_changes(saved, now)) == \
        "--sample_type stride -> rand, --sample_type_test stride -> middle"
    older = {k: v for k, v in saved.items() if not k.startswith("sample_type")}  # written before the flags existed
    assert checkpoint.setting_changes(older, now) == checkpoint.setting_changes(saved, now)
    assert checkpoint.setting_changes(older, _parsed(p, "--data_path", "x.json")) == {}
    assert checkpoint.setting_changes({}, now) == {}  # a bare weights file has no settings to compare


def test_the_evaluation_flag_reaches_the_test_clips_of_a_real_run(synthetic_root, tmp_path):
    """Embedding export (the --only_test / --zero_shot data path) of the synthetic test set: --sample_type rand makes
    its clips segment middles, which embed differently from stride windows, and the metadata says which."""
    model = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4, depth=1, embed_dim=64,
                                  num_heads=2, vocab_size=len(datasets.build_tokenizer()))
    ckpt = tmp_path / "dual.pth"
    torch.save({"model": model.state_dict(), "model_cfg": model.model_cfg}, ckpt)
    exported = {}
    for flags in ([], ["--sample_type", "rand"]):
        out = tmp_path / f"emb{len(flags)}.npy"
        run_simvtp_finetuning.main(run_simvtp_finetuning.get_args_parser().parse_args([
            "--export_embeddings", str(out), "--finetune", str(ckpt), "--data_root", str(synthetic_root),
            "--data_path", str(synthetic_root / "annotations" / "test.json"), "--output_dir", str(tmp_path),
            "--num_frames", "4", "--sampling_rate", "2", "--input_size", "32", "--test_num_segment", "2",
            "--test_num_crop", "1", "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--precision",
            "fp32", "--skip_eval_check", *flags]))
        exported[json.load(open(out.with_suffix(".json")))["sample_type_test"]] = np.load(out)
    assert set(exported) == {"stride", "middle"}
    assert exported["stride"].shape == exported["middle"].shape == (8, 64)
    assert not np.allclose(exported["stride"], exported["middle"], atol=1e-4)


def _as_after_setup_run(args: argparse.Namespace) -> None:
    """The values utils.setup_run gives a one-process CPU run (without its output folder and process group)."""
    args.device_obj, args.world_size, args.rank = torch.device("cpu"), 1, 0
    args.short_side_size = args.short_side_size or args.input_size


def test_both_training_loaders_sample_by_the_flag(synthetic_root):
    tokenizer = datasets.build_tokenizer()
    common = ["--data_root", str(synthetic_root), "--num_frames", "4", "--input_size", "32", "--batch_size", "2",
              "--num_workers", "0", "--sample_type", "rand"]
    args = _parsed(run_simvtp_pretraining.get_args_parser(), "--data_path",
                   str(synthetic_root / "annotations" / "pretrain.json"), *common)
    _as_after_setup_run(args)
    model = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4, depth=1, embed_dim=64,
                                  num_heads=2, decoder_depth=1, vocab_size=len(tokenizer))
    _, pretrain_set, _ = engine_for_pretraining.build_loader(args, tokenizer, model)
    args = _parsed(run_simvtp_finetuning.get_args_parser(), *common)
    _as_after_setup_run(args)
    records = annotations.read_annotations(synthetic_root / "annotations" / "train.json", synthetic_root)
    _, finetune_set, _ = engine_for_retrieval.build_train_loader(records, args, tokenizer)
    for ds in (pretrain_set, finetune_set):
        assert ds.sample_type == "rand" and "rand of equal segments" in repr(ds)
