"""The data modules: annotation formats and their errors (annotations), both video backends on real files
(video_io), frame sampling and clip transforms (video_transforms), per-sample determinism, the broken-media
policy, collate and the tokenizer (datasets)."""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import annotations
import datasets
import masking_generator
import video_io
import video_transforms
from conftest import VIDEO_SPECS, frame_index_of
from annotations import AnnotationError, VideoRecord
from video_io import VideoDecodeError


# ----------------------------------------------------------------------------------------------- annotations


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_webvid_csv(tmp_path):
    path = _write(tmp_path, "results_2M_train.csv",
                  "videoid,contentUrl,duration,page_dir,name\n"
                  "1001,https://x/1001.mp4,PT00H00M10S,000001_000050,\"A dog, running on grass\"\n"
                  "1002,https://x/1002.mp4,PT00H00M21S,000051_000100, Sunset over the sea \n")
    recs = annotations.read_annotations(path, "/data/webvid")
    assert recs == [VideoRecord("/data/webvid/000001_000050/1001.mp4", ["A dog, running on grass"], "1001"),
                    VideoRecord("/data/webvid/000051_000100/1002.mp4", ["Sunset over the sea"], "1002")]


def test_release_json_dict(tmp_path):
    path = _write(tmp_path, "webvid.json", json.dumps({"a/1.mp4": "a cat", "/abs/2.mp4": "a dog"}))
    recs = annotations.read_annotations(path, "/root")
    assert [(r.path, r.captions, r.video_id) for r in recs] == [("/root/a/1.mp4", ["a cat"], "a/1"),
                                                               ("/abs/2.mp4", ["a dog"], "/abs/2")]


def test_singularity_list_with_string_and_list_captions(tmp_path):
    path = _write(tmp_path, "msrvtt_train.json", json.dumps([
        {"video": "video1.mp4", "caption": ["a man cooks", "someone is cooking"], "duration": 12.0},
        {"video": "video2.mp4", "caption": "a car drives"}]))
    recs = annotations.read_annotations(path)  # no data_root: paths kept as written
    assert [(r.path, r.captions, r.video_id) for r in recs] == [
        ("video1.mp4", ["a man cooks", "someone is cooking"], "video1"), ("video2.mp4", ["a car drives"], "video2")]


def test_msrvtt_1k_csv(tmp_path):
    path = _write(tmp_path, "MSRVTT_JSFUSION_test.csv",
                  "key,vid_key,video_id,sentence\nret0,msr9770,video9770,a person is connecting something\n"
                  "ret1,msr7606,video7606,a little girl does gymnastics\n")
    recs = annotations.read_annotations(path, "/msrvtt/videos")
    assert [(r.path, r.captions, r.video_id) for r in recs] == [
        ("/msrvtt/videos/video9770.mp4", ["a person is connecting something"], "video9770"),
        ("/msrvtt/videos/video7606.mp4", ["a little girl does gymnastics"], "video7606")]


def test_format_comes_from_the_contents_and_repeated_videos_merge(tmp_path):
    path = _write(tmp_path, "oddly_named.txt", json.dumps([{"video": "v.mp4", "caption": "one"},
                                                           {"video": "w.mp4", "caption": "two"},
                                                           {"video": "v.mp4", "caption": ["three", "one"]}]))
    recs = annotations.read_annotations(path)
    assert [(r.path, r.captions) for r in recs] == [("v.mp4", ["one", "three"]), ("w.mp4", ["two"])]
    csv_with_index = _write(tmp_path, "pandas.csv", ",key,vid_key,video_id,sentence\n0,ret0,msr1,video1,hi\n")
    assert annotations.read_annotations(csv_with_index)[0].path == "video1.mp4"


WEBVID_HEADER = "videoid,contentUrl,duration,page_dir,name\n"
MALFORMED = [
    ("bad.json", '{"a.mp4": "x",}', ["bad JSON at line 1"]),
    ("top.json", "42", ["top-level JSON must be a dict or a list", "int"]),
    ("dict_int.json", '{"a.mp4": "ok", "b.mp4": 3}', ["record 2", "'b.mp4'", "caption must be a string"]),
    ("dict_empty.json", '{"a.mp4": "   "}', ["record 1", "empty caption"]),
    ("dict_list.json", '{"a.mp4": ["x", "y"]}', ["record 1", "one caption string per video"]),
    ("list_item.json", '[{"video": "a.mp4", "caption": "x"}, 7]', ["record 2", "expected an object"]),
    ("no_caption.json", '[{"video": "a.mp4"}]', ["record 1", "missing field 'caption'"]),
    ("no_video.json", '[{"video": "a.mp4", "caption": "x"}, {"caption": "y"}]', ["record 2", "missing field 'video'"]),
    ("caption_type.json", '[{"video": "a.mp4", "caption": ["ok", 5]}]', ["record 1 caption 2", "must be a string"]),
    ("caption_list_empty.json", '[{"video": "a.mp4", "caption": []}]', ["record 1", "empty caption list"]),
    ("video_empty.json", '[{"video": "", "caption": "x"}]', ["record 1", "'video' must be a non-empty string"]),
    ("empty_list.json", "[]", ["no records"]),
    ("empty.csv", "\n  \n", ["empty file"]),
    ("header_only.csv", WEBVID_HEADER, ["no records"]),
    ("unknown.csv", "id,url,text\n1,x,y\n", ["unknown CSV header", "videoid,contentUrl"]),
    ("columns.csv", WEBVID_HEADER + "1,u,d,p,a cat\n2,u,d,p\n", ["record 2 (line 3)", "4 columns", "header has 5"]),
    ("webvid_caption.csv", WEBVID_HEADER + "1,u,d,p,\n", ["record 1 (line 2)", "empty caption"]),
    ("webvid_id.csv", WEBVID_HEADER + ",u,d,p,a cat\n", ["record 1", "'videoid' must be a non-empty string"]),
    ("msrvtt.csv", "key,vid_key,video_id,sentence\nret0,m,video1,ok\nret1,m,video2, \n", ["record 2", "empty caption"]),
]


@pytest.mark.parametrize("name,text,fragments", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_annotation_names_file_record_and_problem(tmp_path, name, text, fragments):
    path = _write(tmp_path, name, text)
    with pytest.raises(AnnotationError) as info:
        annotations.read_annotations(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_every_bad_record_of_a_file_is_reported_in_one_error_first_20_and_a_count(tmp_path, capsys):
    good = "".join(f"{i},u,d,p,clip {i}\n" for i in range(5))
    bad = ([f"{100 + i},u,d,p,  \n" for i in range(20)]  # empty captions
           + [",u,d,p,no id\n", "7,u,d\n", "8,u,d,,no page\n", "9,u,d,p,\n", "10,u,d,p,x,extra\n"])
    path = _write(tmp_path, "webvid.csv", WEBVID_HEADER + good + "".join(bad))
    with pytest.raises(AnnotationError) as info:
        annotations.read_annotations(path)
    message = str(info.value)
    assert f"{path}: 25 bad records of 30" in message and "... and 5 more" in message
    assert message.count("empty caption") == 20 and "record 6 (line 7)" in message  # the first bad record
    assert "record 25 (line 26)" in message and "record 26" not in message and "--skip_bad_records" in message
    recs = annotations.read_annotations(path, skip_bad_records=True)
    assert [r.video_id for r in recs] == ["0", "1", "2", "3", "4"]
    assert "dropped 25 bad record(s) of 30" in capsys.readouterr().out


def test_skipping_bad_records_of_a_json_list_keeps_the_good_ones(tmp_path, capsys):
    path = _write(tmp_path, "list.json", json.dumps([
        {"video": "a.mp4", "caption": ["ok", ""]}, {"video": "b.mp4", "caption": "fine"}, {"caption": "x"}, 7]))
    with pytest.raises(AnnotationError, match="3 bad records of 4") as info:
        annotations.read_annotations(path)
    for fragment in ("record 1 caption 2: empty caption", "record 3: missing field 'video'",
                     "record 4: expected an object"):
        assert fragment in str(info.value)
    assert [r.path for r in annotations.read_annotations(path, skip_bad_records=True)] == ["b.mp4"]
    assert "dropped 3 bad record(s) of 4" in capsys.readouterr().out
    only_bad = _write(tmp_path, "bad.json", json.dumps({"a.mp4": ""}))
    with pytest.raises(AnnotationError, match="no records left after dropping 1 bad"):
        annotations.read_annotations(only_bad, skip_bad_records=True)


def test_msrvtt_video_id_that_already_names_the_file_is_not_suffixed_again(tmp_path):
    path = _write(tmp_path, "test_1k.csv", "key,vid_key,video_id,sentence\nret0,msr7,video7.mp4,a dog\n"
                  "ret1,msr7,video7,a dog runs\nret2,msr8,video8,a cat\n")
    recs = annotations.read_annotations(path, "/msrvtt")
    assert [(r.path, r.captions, r.video_id) for r in recs] == [
        ("/msrvtt/video7.mp4", ["a dog", "a dog runs"], "video7"), ("/msrvtt/video8.mp4", ["a cat"], "video8")]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json does not exist"):
        annotations.read_annotations(tmp_path / "nothing.json")


# ----------------------------------------------------------------------------------------------- video backends


def test_resolve_backend():
    assert video_io.resolve_backend("auto") == "pyav"  # both are installed here: PyAV first
    assert video_io.resolve_backend("pyav") == "pyav"
    with pytest.raises(ValueError, match="unknown video backend"):
        video_io.resolve_backend("opencv")


@pytest.mark.parametrize("name", [*VIDEO_SPECS, "faststart"])
def test_backends_agree_on_count_shape_and_pixels(video_files, name):
    w, h, fps, n, _, _ = VIDEO_SPECS.get(name, (160, 90, 25, 60, None, None))
    with video_io.open_video(video_files[name], "decord") as a, video_io.open_video(video_files[name], "pyav") as b:
        assert a.num_frames == b.num_frames == n
        assert a.fps == pytest.approx(fps) and b.fps == pytest.approx(fps)
        indices = [n - 1, 0, 3, 3, n // 2, n - 2, 1]  # any order, repeats, both ends
        fa, fb = a.get_frames(indices), b.get_frames(indices)
    assert fa.shape == fb.shape == (len(indices), h, w, 3) and fa.dtype == fb.dtype == np.uint8
    assert [frame_index_of(f) for f in fa] == indices == [frame_index_of(f) for f in fb]
    assert np.abs(fa.astype(int) - fb.astype(int)).mean() < 1.0


def test_pyav_seeks_again_for_far_apart_frames(video_files, monkeypatch):
    monkeypatch.setattr(video_io._PyAVVideo, "RESEEK_GAP", 8)  # force several seeks on a 90-frame file
    indices = [0, 1, 30, 31, 60, 89]
    with video_io.open_video(video_files["large_30fps"], "pyav") as video:
        assert [frame_index_of(f) for f in video.get_frames(indices)] == indices
        assert [frame_index_of(f) for f in video.get_frames([5])] == [5]  # a second call on the same reader


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_every_frame_read_alone_is_the_right_one(video_files, backend):
    """Single-frame reads seek to the keyframe and (PyAV) skip non-reference frames up to the wanted one."""
    with video_io.open_video(video_files["large_30fps"], backend) as video:
        assert [frame_index_of(video.get_frames([k])[0]) for k in range(video.num_frames)] == list(range(90))


@pytest.mark.parametrize("threads", [1, 2])
def test_pyav_skips_unwanted_non_reference_frames_and_returns_the_same_pixels(video_files, threads):
    """A stride-4 clip decodes fewer frames than it spans (x264's non-reference B-frames in between are dropped),
    and its frames are bit-identical to those of a plain decode of every frame."""
    import av
    from av.video.reformatter import VideoReformatter
    path = video_files["large_30fps"]
    with av.open(str(path)) as container:
        to_rgb = VideoReformatter()
        every = [to_rgb.reformat(f, format="rgb24").to_ndarray() for f in container.decode(video=0)]
    indices = list(range(10, 74, 4))
    with video_io.open_video(path, "pyav", threads=threads) as video:
        frames = video.get_frames(indices)
        assert video.frames_decoded < indices[-1] - indices[0]
    assert np.array_equal(frames, np.stack([every[i] for i in indices]))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_threaded_decoder_returns_the_same_frames(video_files, backend):
    """Frame and slice threads change how fast, never what: bit-identical frames, seeks and skips included."""
    indices = [0, 1, 29, 30, 31, 60, 89, 45, 2]
    with video_io.open_video(video_files["large_30fps"], backend) as one, \
            video_io.open_video(video_files["large_30fps"], backend, threads=2) as two:
        assert np.array_equal(one.get_frames(indices), two.get_frames(indices))
        assert [frame_index_of(two.get_frames([k])[0]) for k in (88, 3, 47)] == [88, 3, 47]
    with pytest.raises(ValueError, match="decoder threads must be >= 1"):
        video_io.open_video(video_files["large_30fps"], backend, threads=0)


def test_pyav_reads_mpeg_ts(tmp_path):
    """No frame count in the container, a non-zero start time, seeks that land past the only keyframe.
    (decord 0.6 returns wrong frames for this file, so only PyAV is checked.)"""
    import synthetic_dataset
    from conftest import index_frames
    path = tmp_path / "clip.ts"
    synthetic_dataset.write_video(path, index_frames(96, 64, 40), 25)
    with video_io.open_video(path, "pyav") as video:
        assert video.num_frames == 40
        assert [frame_index_of(video.get_frames([k])[0]) for k in (0, 17, 39)] == [0, 17, 39]
        assert [frame_index_of(f) for f in video.get_frames(range(0, 40, 3))] == list(range(0, 40, 3))


def _write_variable_rate(path, times_ms: list[int]) -> None:
    """An index-coded H.264 mp4 whose frame k is shown from times_ms[k] (a millisecond time base)."""
    import av
    from fractions import Fraction
    from conftest import index_frames
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
    stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
    stream.options = {"preset": "veryfast", "crf": "18", "threads": "1"}
    for frame, t in zip(index_frames(96, 64, len(times_ms)), times_ms):
        picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
        picture.pts, picture.time_base = t, Fraction(1, 1000)
        for packet in stream.encode(picture):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def test_backends_sample_the_same_times_of_a_variable_frame_rate_video(tmp_path):
    """2 s at 10 fps then 1 s at 40 fps: index i means time i / (average fps) in both backends (decord alone
    would count stored frames, and the dense second part would come out twice as fast as the first)."""
    times = [i * 100 for i in range(20)] + [2000 + i * 25 for i in range(40)]
    path = tmp_path / "vfr.mp4"
    _write_variable_rate(path, times)
    with video_io.open_video(path, "decord") as a, video_io.open_video(path, "pyav") as b:
        assert a.num_frames == b.num_frames == 60 and a.fps == pytest.approx(b.fps)
        wanted = list(range(a.num_frames))
        got_a = [frame_index_of(f) for f in a.get_frames(wanted)]
        got_b = [frame_index_of(f) for f in b.get_frames(wanted)]
    at = [round(t / 1000 * a.fps) for t in times]  # each stored frame's time in index units
    expected = [at.index(i) if i in at else max(k for k, x in enumerate(at) if x < i) for i in wanted]
    assert got_a == got_b == expected
    assert len(set(range(20, 60)) - set(got_a)) >= 15  # the dense part is thinned out, not played fast


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_out_of_range_index_is_refused(video_files, backend):
    with video_io.open_video(video_files["small_10fps"], backend) as video:
        with pytest.raises(IndexError, match="outside"):
            video.get_frames([0, 30])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not_a_video"])
def test_broken_files_raise_naming_the_file(broken_videos, kind, backend):
    with pytest.raises(VideoDecodeError) as info:
        video_io.open_video(broken_videos[kind], backend).get_frames([0])
    assert str(broken_videos[kind]) in str(info.value)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_truncated_download_with_index_first_fails_on_the_lost_frames(video_files, tmp_path, backend):
    data = video_files["faststart"].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        with video_io.open_video(path, backend) as video:
            video.get_frames([video.num_frames - 1])


# ----------------------------------------------------------------------------------------------- sampling


def test_stride_frame_indices_examples():
    rng = np.random.default_rng(0)
    idx = video_transforms.stride_frame_indices(100, 16, 4, rng)
    assert len(idx) == 16 and np.all(np.diff(idx) == 4) and 0 <= idx[0] <= 100 - 64
    assert video_transforms.stride_frame_indices(64, 16, 4, rng) == list(range(0, 64, 4))  # exactly one window
    assert video_transforms.stride_frame_indices(10, 6, 4, rng) == [0, 4, 8, 9, 9, 9]  # short: clamped, from 0
    assert video_transforms.stride_frame_indices(1, 3, 2, rng) == [0, 0, 0]
    starts = {video_transforms.stride_frame_indices(70, 16, 4, np.random.default_rng(s))[0] for s in range(300)}
    assert starts == set(range(7))  # every start of [0, n - window] is reachable
    with pytest.raises(ValueError):
        video_transforms.stride_frame_indices(0, 16, 4, rng)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 600), t=st.integers(1, 32), rate=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_stride_frame_indices_properties(n, t, rate, seed):
    idx = video_transforms.stride_frame_indices(n, t, rate, np.random.default_rng(seed))
    assert len(idx) == t and all(0 <= i < n for i in idx) and all(isinstance(i, int) for i in idx)
    assert all(b >= a for a, b in zip(idx, idx[1:]))
    if n >= t * rate:
        assert all(b - a == rate for a, b in zip(idx, idx[1:])) and idx[0] <= n - t * rate
    else:
        assert idx[0] == 0


def test_stride_clip_indices_examples():
    assert video_transforms.stride_clip_indices(100, 4, 2, 1) == [[46, 48, 50, 52]]  # the middle clip
    assert video_transforms.stride_clip_indices(100, 4, 2, 3) == [[0, 2, 4, 6], [46, 48, 50, 52], [92, 94, 96, 98]]
    assert video_transforms.stride_clip_indices(5, 4, 2, 2) == [[0, 2, 4, 4], [0, 2, 4, 4]]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 600), t=st.integers(1, 32), rate=st.integers(1, 8), segments=st.integers(1, 10))
def test_stride_clip_indices_properties(n, t, rate, segments):
    clips = video_transforms.stride_clip_indices(n, t, rate, segments)
    assert len(clips) == segments and all(len(c) == t for c in clips)
    assert all(0 <= i < n for c in clips for i in c)
    starts = [c[0] for c in clips]
    assert starts == sorted(starts)
    if n >= t * rate:
        assert all(b - a == rate for c in clips for a, b in zip(c, c[1:]))
        if segments > 1:
            assert starts[0] == 0 and starts[-1] == n - t * rate  # spread over the whole video


# ----------------------------------------------------------------------------------------------- transforms


def test_multi_scale_crop_sizes_and_places_match_the_release():
    sizes = {(h, w) for s in range(400) for _, _, h, w in [video_transforms.multi_scale_crop_box(
        360, 640, 224, np.random.default_rng(s))]}
    side = [360, 315, 270, 237]  # int(360 * (1, .875, .75, .66))
    assert sizes == {(side[i], side[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    places = {video_transforms.multi_scale_crop_box(360, 640, 224, np.random.default_rng(s))[:2]
              for s in range(400) if video_transforms.multi_scale_crop_box(360, 640, 224, np.random.default_rng(s))[2:]
              == (360, 360)}
    assert places == {(0, 0), (0, 4 * 70), (0, 2 * 70)}  # corners collapse in height for full-height crops


@settings(max_examples=200, deadline=None)
@given(h=st.integers(8, 400), w=st.integers(8, 400), size=st.integers(8, 256), seed=st.integers(0, 2**32 - 1))
def test_multi_scale_crop_box_stays_inside(h, w, size, seed):
    top, left, ch, cw = video_transforms.multi_scale_crop_box(h, w, size, np.random.default_rng(seed))
    assert 0 <= top and 0 <= left and 1 <= ch and 1 <= cw and top + ch <= h and left + cw <= w


def test_train_transform_uses_one_crop_for_every_frame():
    frame = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    clip = video_transforms.train_clip_transform(np.stack([frame] * 6), 48, np.random.default_rng(1))
    assert clip.shape == (3, 6, 48, 48) and clip.dtype == torch.uint8  # normalised on the device, not here
    assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(6))
    mean, std = torch.tensor(video_transforms.IMAGENET_MEAN), torch.tensor(video_transforms.IMAGENET_STD)
    pixels = video_transforms.normalize_video(clip) * std.view(3, 1, 1, 1) + mean.view(3, 1, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_constants_reach_a_device_once():
    """normalize_video's constants are copied to a device on first use only (no host-blocking copy per step)."""
    meta = torch.device("meta")
    first = video_transforms.on_device(meta, x=torch.ones(3), y=torch.zeros(2))
    again = video_transforms.on_device(meta, x=torch.ones(3), y=torch.zeros(2))
    assert first[0].device == meta and first[0] is again[0] and first[1] is again[1]
    assert video_transforms.normalize_video(torch.zeros(1, 3, 1, 2, 2, dtype=torch.uint8, device=meta)).device == meta


def test_eval_views_are_clip_major_crops_along_the_long_side():
    frames = np.zeros((4, 60, 120, 3), dtype=np.uint8)
    frames[:, :, 60:] = 200  # right half bright
    frames[2:] += 50  # clip 1 (frames 2, 3) brighter than clip 0
    views = video_transforms.eval_views(frames, [[0, 1], [2, 3]], 48, 60, 3)
    assert views.shape == (6, 3, 2, 48, 48)
    assert views.dtype == torch.uint8
    means = views.float().mean(dim=(1, 2, 3, 4))
    assert means[0] < means[1] < means[2] and means[3] < means[4] < means[5]  # left, centre, right
    assert all(means[3 + k] > means[k] for k in range(3))


# ----------------------------------------------------------------------------------------------- the dataset


def _train_set(synthetic_root, **kw):
    recs = annotations.read_annotations(synthetic_root / "annotations" / "train.json", synthetic_root)
    grid = (kw.get("num_frames", 4) // 2, 2, 2)
    kw = {"num_frames": 4, "sampling_rate": 2, "input_size": 32, "seed": 7,
          "mask_generator": masking_generator.build_mask_generator("tube", grid, 0.5), **kw}
    return datasets.VideoTextDataset(recs, mode="train", **kw)


def _same(a, b):
    return (torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
            and torch.equal(a["video_mask"], b["video_mask"]))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_train_item_is_a_pure_function_of_seed_epoch_index(synthetic_root, backend):
    ds, other = _train_set(synthetic_root, video_backend=backend), _train_set(synthetic_root, video_backend=backend)
    item = ds[3]
    assert item["video"].shape == (3, 4, 32, 32) and item["video"].dtype == torch.uint8
    assert item["video_mask"].shape == (8,) and item["video_mask"].dtype == torch.bool
    assert item["caption"] in ds.records[3].captions and item["index"] == 3
    assert (item["read"], item["broken"], item["broken_videos"]) == (1, 0, [])
    np_state, py_state = np.random.get_state(), random.getstate()
    assert _same(item, other[3]) and _same(item, ds[3])
    assert np.random.get_state()[1].tolist() == np_state[1].tolist() and random.getstate() == py_state
    other.set_epoch(1)
    later = other[3]
    assert later["epoch"] == 1 and not _same(item, later)
    assert not _same(item, _train_set(synthetic_root, video_backend=backend, seed=8)[3])


def test_decode_threads_keep_the_training_item(synthetic_root):
    assert _same(_train_set(synthetic_root, video_backend="pyav")[4],
                 _train_set(synthetic_root, video_backend="pyav", decode_threads=2)[4])


def test_backends_give_the_same_training_clip(synthetic_root):
    a, b = _train_set(synthetic_root, video_backend="decord")[5], _train_set(synthetic_root, video_backend="pyav")[5]
    assert a["caption"] == b["caption"] and torch.equal(a["video_mask"], b["video_mask"])
    normalize = video_transforms.normalize_video
    assert (normalize(a["video"]) - normalize(b["video"])).abs().mean() < 0.02


def test_sample_rng_streams():
    draw = lambda *a: video_transforms.sample_rng(*a).integers(1 << 30)  # noqa: E731
    assert draw(0, 1, 2, "crop") == draw(0, 1, 2, "crop")
    assert len({draw(0, 1, 2, "crop"), draw(0, 1, 2, "frames"), draw(0, 2, 2, "crop"), draw(0, 1, 3, "crop"),
                draw(1, 1, 2, "crop")}) == 5
    with pytest.raises(ValueError, match="non-negative"):
        video_transforms.sample_rng(0, -1, 0, "crop")


def test_test_mode_views(synthetic_root, video_files):
    recs = [VideoRecord(str(video_files["large_30fps"]), ["a", "b"], "large"),
            VideoRecord(str(video_files["tall_mpeg4"]), [], "tall")]
    ds = datasets.VideoTextDataset(recs, mode="test", num_frames=4, sampling_rate=3, input_size=48,
                                   short_side_size=56, test_num_segment=2, test_num_crop=3)
    first, second = ds[0], ds[1]
    assert first["video"].shape == second["video"].shape == (6, 3, 4, 48, 48)
    assert first["captions"] == ["a", "b"] and second["captions"] == [] and first["index"] == 0
    assert not torch.equal(first["video"][0], first["video"][2])  # crops differ
    assert torch.equal(first["video"], ds[0]["video"])  # no randomness in evaluation


# ----------------------------------------------------------------------------------------------- broken media


def _fresh_broken(broken_videos, tmp_path):
    """Copies under new names: the warn-once memory is per process and other tests warn about the originals."""
    out = {}
    for kind, path in broken_videos.items():
        out[kind] = tmp_path / f"{kind}_{tmp_path.name}.mp4"
        if path.exists():
            shutil.copyfile(path, out[kind])
    return out


def test_broken_training_videos_fall_through_to_the_same_readable_video_in_every_process(
        synthetic_root, broken_videos, tmp_path):
    good = annotations.read_annotations(synthetic_root / "annotations" / "pretrain.json", synthetic_root)[:6]
    recs = good + [VideoRecord(str(p), [f"broken {k}"], k) for k, p in broken_videos.items()]
    broken_paths = {str(p) for p in broken_videos.values()}

    def make():
        return datasets.VideoTextDataset(recs, num_frames=4, sampling_rate=2, input_size=32, seed=3)

    ds = make()
    items = [ds[i] for i in range(len(recs))]
    assert all(it["read"] == 1 and it["broken"] == 0 and it["broken_videos"] == [] for it in items[:6])
    for it in items[6:]:  # the sample's own broken video is reported first, then any met on the walk
        assert it["broken"] == 1 and it["broken_videos"][0][0] == recs[it["index"]].path
        assert {p for p, _ in it["broken_videos"]} <= broken_paths and it["video"].shape == (3, 4, 32, 32)
        assert not it["caption"].startswith("broken")  # a good video's caption
    assert "file does not exist" in dict(items[6]["broken_videos"])[str(broken_videos["missing"])]
    assert set(ds.broken) == broken_paths  # every broken file was met (there are only 6 good ones)
    # a process that starts fresh and one that already knows every broken file pick the same substitute
    knows = make()
    knows.broken.update(ds.broken)
    for other in (make(), knows):
        for it in items[6:]:
            again = other[it["index"]]
            assert torch.equal(again["video"], it["video"]) and again["caption"] == it["caption"]
            assert again["broken_videos"] == it["broken_videos"]


def test_fallthrough_order_visits_every_record_once_after_its_own():
    for n in (1, 2, 12, 13, 97, 360):
        for index in (0, n - 1, n // 2):
            rng = video_transforms.sample_rng(1, 2, index, "retry")
            order = list(datasets.fallthrough_order(index, n, rng))
            assert order[0] == index and sorted(order[1:]) == list(range(n)), (n, index)
            again = video_transforms.sample_rng(1, 2, index, "retry")
            assert order == list(datasets.fallthrough_order(index, n, again))
    starts = {tuple(datasets.fallthrough_order(0, 97, video_transforms.sample_rng(0, e, 0, "retry")))[1:3]
              for e in range(5)}
    assert len(starts) == 5  # the walk is the sample's own (seed, epoch, index) draw


def test_one_readable_video_among_many_broken_is_found_by_every_sample(synthetic_root, tmp_path):
    """The old rule gave up after max_retries broken videos in a row, at the same sample on every restart."""
    good = annotations.read_annotations(synthetic_root / "annotations" / "pretrain.json", synthetic_root)[0]
    recs = [VideoRecord(str(tmp_path / f"gone_{i}.mp4"), [f"gone {i}"], str(i)) for i in range(40)]
    recs.insert(17, good)
    ds = datasets.VideoTextDataset(recs, num_frames=4, sampling_rate=2, input_size=32, seed=0)
    for index in range(len(recs)):
        item = ds[index]
        assert item["caption"] in good.captions and item["broken"] == int(index != 17)
    assert len(ds.broken) == 40


def test_an_entirely_broken_list_raises_with_the_checker_hint_also_through_a_worker(broken_videos):
    recs = [VideoRecord(str(p), ["x"], k) for k, p in broken_videos.items()]
    ds = datasets.VideoTextDataset(recs, num_frames=4, sampling_rate=2, input_size=32)
    all_broken = r"none of the 4 training videos can be read \(100% broken"
    with pytest.raises(datasets.BrokenDataError, match=all_broken) as info:
        ds[0]
    assert "file does not exist" in str(info.value) and "video_tools.py check" in str(info.value)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=lambda items: items)
    with pytest.raises(datasets.BrokenDataError) as info:
        next(iter(loader))
    assert str(info.value).startswith("none of the 4 training videos") and "Traceback" not in str(info.value)


# ----------------------------------------------------------------------------------------------- exclude lists


def _check_report(anno, data_root, report):
    import video_tools
    video_tools.main(["check", "--anno", str(anno), "--data_root", str(data_root), "--num_frames", "4",
                      "--sampling_rate", "2", "--workers", "1", "--report", str(report)])
    return report


@pytest.fixture()
def list_with_broken(synthetic_root, broken_videos, tmp_path):
    """A copy of 6 synthetic clips and the broken files under one root; annotations with relative paths."""
    root = tmp_path / "root"
    (root / "clips").mkdir(parents=True)
    good = annotations.read_annotations(synthetic_root / "annotations" / "pretrain.json", synthetic_root)[:6]
    entries = {}
    for rec in good:
        shutil.copyfile(rec.path, root / "clips" / (rec.video_id.split("/")[-1] + ".mp4"))
        entries[f"clips/{rec.video_id.split('/')[-1]}.mp4"] = rec.captions[0]
    for kind, path in broken_videos.items():
        if path.exists():
            shutil.copyfile(path, root / "clips" / path.name)
        entries[f"clips/{path.name}"] = f"broken {kind}"
    anno = tmp_path / "anno.json"
    anno.write_text(json.dumps(entries))
    return anno, root


@pytest.mark.slow
def test_a_check_report_excludes_exactly_its_unreadable_videos_also_under_another_data_root(
        list_with_broken, tmp_path):
    anno, root = list_with_broken
    report = _check_report(anno, root, tmp_path / "check.json")
    exclude = annotations.read_exclude_list(report)
    assert sorted(os.path.basename(p) for p in exclude.paths) == ["empty.mp4", "missing.mp4", "not_a_video.mp4",
                                                                  "truncated.mp4"]
    recs = annotations.read_annotations(anno, root)
    broken_idx = {i for i, r in enumerate(recs) if r.captions[0].startswith("broken")}
    assert annotations.excluded_indices(recs, exclude, root) == (broken_idx, 0)
    copy = tmp_path / "copy"  # e.g. the re-encoded videos of `video_tools.py preprocess`
    shutil.copytree(root, copy)
    copy_recs = annotations.read_annotations(anno, copy)
    assert annotations.excluded_indices(copy_recs, exclude, copy) == (broken_idx, 0)
    assert annotations.excluded_indices(copy_recs, annotations.ExcludeList("x", exclude.paths), copy) == (set(), 4)


@pytest.mark.slow
def test_a_text_exclude_list_matches_absolute_and_data_root_relative_paths(list_with_broken, tmp_path):
    anno, root = list_with_broken
    recs = annotations.read_annotations(anno, root)
    text = tmp_path / "broken_videos.txt"
    text.write_text(f"# known dead\n{root}/clips/empty.mp4\tempty file (0 bytes)\n\nclips/missing.mp4\n"
                    "clips/not_listed.mp4\n")
    exclude = annotations.read_exclude_list(text)
    assert exclude.paths == [f"{root}/clips/empty.mp4", "clips/missing.mp4", "clips/not_listed.mp4"]
    found, unmatched = annotations.excluded_indices(recs, exclude, root)
    assert {os.path.basename(recs[i].path) for i in found} == {"empty.mp4", "missing.mp4"} and unmatched == 1


def test_excluded_videos_are_never_opened_and_excluding_broken_ones_changes_no_sample(list_with_broken, tmp_path):
    anno, root = list_with_broken
    recs = annotations.read_annotations(anno, root)
    excluded = annotations.exclusions_for(recs, str(_check_report(anno, root, tmp_path / "check.json")), root)
    kw = dict(num_frames=4, sampling_rate=2, input_size=32, seed=2)
    plain, ds = datasets.VideoTextDataset(recs, **kw), datasets.VideoTextDataset(recs, excluded=excluded, **kw)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        ds.set_epoch(epoch)
        for i in range(len(recs)):
            item, found = ds[i], plain[i]
            assert item["broken_videos"] == [] and item["broken"] == 0 and item["read"] == int(i not in excluded)
            assert found["broken"] == int(i in excluded)
            assert torch.equal(item["video"], found["video"]) and item["caption"] == found["caption"]
    assert ds.broken == {} and len(plain.broken) == 4  # the excluded files were never opened
    first_good = min(set(range(len(recs))) - excluded)
    no_good = datasets.VideoTextDataset(recs, excluded=excluded | {first_good}, **kw)
    assert all(no_good[i]["caption"] != recs[first_good].captions[0] for i in range(len(recs)))


def test_bad_exclude_lists_are_clear_errors(tmp_path, list_with_broken):
    anno, root = list_with_broken
    recs = annotations.read_annotations(anno, root)
    with pytest.raises(FileNotFoundError, match="exclude list .*nowhere.json does not exist"):
        annotations.read_exclude_list(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="bad.json: bad JSON at line 1"):
        annotations.read_exclude_list(_write(tmp_path, "bad.json", "{\"problems\": [}"))
    with pytest.raises(ValueError, match="other.json: a JSON exclude list must be a `video_tools.py check --report`"):
        annotations.read_exclude_list(_write(tmp_path, "other.json", "{\"a\": 1}"))
    everything = _write(tmp_path, "all.txt", "\n".join(r.path for r in recs))
    with pytest.raises(ValueError, match=f"names all {len(recs)} videos"):
        datasets.VideoTextDataset(recs, excluded=annotations.exclusions_for(recs, str(everything), root))


def test_broken_video_in_evaluation_is_an_error_naming_the_file(synthetic_root, broken_videos):
    recs = annotations.read_annotations(synthetic_root / "annotations" / "test.json", synthetic_root)[:1]
    recs.append(VideoRecord(str(broken_videos["truncated"]), ["x"], "bad"))
    ds = datasets.VideoTextDataset(recs, mode="test", num_frames=4, sampling_rate=2, input_size=32,
                                   short_side_size=32)
    assert ds[0]["video"].shape == (1, 3, 4, 32, 32)
    with pytest.raises(VideoDecodeError, match="truncated.mp4.*test set never changes silently"):
        ds[1]


def test_start_up_check_reports_every_bad_file_of_every_evaluation_list_at_once(synthetic_root, broken_videos,
                                                                                video_files, tmp_path, capsys):
    good = annotations.read_annotations(synthetic_root / "annotations" / "val.json", synthetic_root)
    val = good[:3] + [VideoRecord(str(broken_videos[k]), ["x"], k) for k in ("missing", "empty")]
    test = good[3:] + [VideoRecord(str(broken_videos[k]), ["x"], k) for k in ("truncated", "not_a_video")]
    cut = tmp_path / "cut_after_index.mp4"  # opens (its index comes first) but its data box is cut short
    data = video_files["faststart"].read_bytes()
    cut.write_bytes(data[: len(data) - 200])
    with video_io.open_video(cut, "pyav") as opened:
        assert opened.num_frames > 0
    test.append(VideoRecord(str(cut), ["x"], "cut"))
    with pytest.raises(annotations.EvalListError) as info:
        annotations.check_eval_lists({"--val_data_path v.json": val, "--test_data_path t.json": test})
    message = str(info.value)
    assert "--val_data_path v.json: 2 of 5 videos" in message and "--test_data_path t.json: 3 of 8 videos" in message
    for kind, status in (("missing", "missing"), ("empty", "empty"), ("truncated", "truncated"),
                         ("not_a_video", "undecodable")):
        assert f"{status:<12} {broken_videos[kind]}" in message, kind
    assert f"truncated    {cut}" in message and "--skip_eval_check" in message
    annotations.check_eval_lists({"--val_data_path v.json": val}, skip=True)
    assert "not checked (--skip_eval_check)" in capsys.readouterr().out
    annotations.check_eval_lists({"--val_data_path v.json": good})
    assert "all open" in capsys.readouterr().out


def test_start_up_check_names_the_first_20_bad_files_and_counts_the_rest(tmp_path):
    records = [VideoRecord(str(tmp_path / f"gone_{i:02d}.mp4"), ["x"], str(i)) for i in range(23)]
    with pytest.raises(annotations.EvalListError) as info:
        annotations.check_eval_lists({"test list": records})
    message = str(info.value)
    assert "23 of 23 videos" in message and "gone_19.mp4" in message and "gone_20.mp4" not in message
    assert "... and 3 more" in message


# ----------------------------------------------------------------------------------------------- tokenizer, collate


@pytest.fixture(scope="module")
def tokenizer():
    return datasets.build_tokenizer()


def test_tokenizer_ids(tokenizer):
    assert len(tokenizer) == 30522
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id) == (101, 102, 103)
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert tokenizer("Hello World")["input_ids"] == [101, 7592, 2088, 102]  # uncased


def test_tokenizer_paths(tmp_path):
    vocab = datasets.DEFAULT_TOKENIZER_DIR + "/vocab.txt"
    renamed = tmp_path / "my_vocab.txt"
    shutil.copyfile(vocab, renamed)
    for path in (datasets.DEFAULT_TOKENIZER_DIR, vocab, renamed):
        assert datasets.build_tokenizer(path)("hello world")["input_ids"] == [101, 7592, 2088, 102]
    small = tmp_path / "small" / "vocab.txt"
    small.parent.mkdir()
    small.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    with pytest.raises(ValueError, match="6 entries, expected .* 30522"):
        datasets.build_tokenizer(small)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.build_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither vocab.txt"):
        datasets.build_tokenizer(tmp_path)


def _item(index, caption, epoch=0, broken=()):
    return {"video": torch.full((3, 4, 8, 8), float(index)), "caption": caption, "index": index, "epoch": epoch,
            "read": 1, "broken": int(bool(broken)), "broken_videos": [(p, "gone") for p in broken],
            "video_mask": torch.tensor([True, False] * 4)}


def test_collate_pads_truncates_and_masks_per_sample(tokenizer):
    collate = datasets.VideoTextCollator(tokenizer, max_text_len=8, text_mask_ratio=0.5, seed=1)
    items = [_item(0, "a red circle"), _item(1, "a very long caption " * 10, broken=["a", "b"]),
             _item(2, "hi", epoch=0, broken=["a"])]
    batch = collate(items)
    assert batch["video"].shape == (3, 3, 4, 8, 8) and batch["video_mask"].shape == (3, 8)
    assert batch["num_visible_tubes"] == 4  # a host int: the model selects the tubes without reading the device
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 8)  # truncated to max_text_len
    assert batch["input_ids"][1, -1] == 102 and batch["attention_mask"][2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["index"].tolist() == [0, 1, 2]
    assert (int(batch["videos_read"]), int(batch["videos_broken"])) == (3, 2)
    assert batch["broken_videos"] == [("a", "gone"), ("b", "gone")]  # each file once per batch
    assert batch["caption"][0] == "a red circle"
    masked = batch["mlm_labels"] != -100
    assert masked.any(dim=1).all() and (batch["mlm_input_ids"][masked] == 103).all()
    assert torch.equal(batch["mlm_labels"][masked], batch["input_ids"][masked])
    assert not torch.equal(batch["mlm_input_ids"], batch["input_ids"])  # the originals stay unmasked
    assert batch["max_masked_words"] == int(masked.sum(dim=1).max()) == 3  # a host int: the word head's width

    short = datasets.VideoTextCollator(tokenizer, max_text_len=32)(items[:1])
    assert short["input_ids"].shape == (1, 5) and "mlm_labels" not in short  # padded to the longest only
    # a row's text mask depends on its (seed, epoch, index), not on the batch it lands in
    alone = collate([items[2], items[0]])
    n = int(alone["attention_mask"][1].sum())
    assert torch.equal(alone["mlm_input_ids"][1, :n], batch["mlm_input_ids"][0, :n])


def test_collate_bert_text_mask_mode_mixes_random_and_kept_words(tokenizer):
    """BERT's rule: some chosen words are not [MASK]; the default mode masks every chosen word with [MASK], at the
    same positions (the positions come first from the same per-sample rng)."""
    words = "red green blue yellow circle square triangle moves left right up down on a black background".split()
    items = [_item(i, " ".join(words[(i + j) % len(words)] for j in range(10))) for i in range(40)]
    bert = datasets.VideoTextCollator(tokenizer, text_mask_ratio=0.75, seed=3, text_mask_mode="bert")(items)
    plain = datasets.VideoTextCollator(tokenizer, text_mask_ratio=0.75, seed=3)(items)
    chosen = bert["mlm_labels"] != -100
    assert torch.equal(chosen, plain["mlm_labels"] != -100)
    assert torch.equal(bert["mlm_labels"][chosen], bert["input_ids"][chosen])
    assert (plain["mlm_input_ids"][chosen] == 103).all()
    new, orig = bert["mlm_input_ids"][chosen], bert["input_ids"][chosen]
    assert (new == 103).any() and (new == orig).any()
    randoms = new[(new != 103) & (new != orig)]
    assert len(randoms) > 0 and (randoms < len(tokenizer)).all()
    assert not torch.isin(randoms, torch.tensor([0, 101, 102, 103])).any()
    assert torch.equal(bert["mlm_input_ids"][~chosen], bert["input_ids"][~chosen])
    with pytest.raises(ValueError, match="text_mask_mode"):
        datasets.VideoTextCollator(tokenizer, text_mask_ratio=0.75, text_mask_mode="random")


def test_collate_test_items(synthetic_root, tokenizer):
    recs = annotations.read_annotations(synthetic_root / "annotations" / "test.json", synthetic_root)
    ds = datasets.VideoTextDataset(recs, mode="test", num_frames=4, sampling_rate=2, input_size=32,
                                   short_side_size=32, test_num_segment=2)
    batch = datasets.VideoTextCollator(tokenizer)([ds[0], ds[1]])
    assert batch["video"].shape == (2, 2, 3, 4, 32, 32)
    assert batch["captions"] == [recs[0].captions, recs[1].captions] and batch["index"].tolist() == [0, 1]


def test_loader_workers_see_the_same_batches_as_the_main_process(synthetic_root, tokenizer):
    ds = _train_set(synthetic_root)
    ds.set_epoch(2)
    collate = datasets.VideoTextCollator(tokenizer, text_mask_ratio=0.5, seed=7)
    order = [5, 1, 9, 4, 0, 7]

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=order, num_workers=workers,
                                             collate_fn=collate)
        return list(loader)

    for a, b in zip(batches(0), batches(1)):
        for key in ("video", "video_mask", "input_ids", "mlm_input_ids", "mlm_labels", "index", "epoch"):
            assert torch.equal(a[key], b[key]), key
        assert a["epoch"].tolist() == [2, 2, 2]


def test_auto_backend_reads_what_decord_cannot(tmp_path):
    import synthetic_dataset
    from conftest import index_frames
    path = tmp_path / "w48.mp4"  # decord 0.6 fails on 48-px-wide frames; PyAV reads them
    synthetic_dataset.write_video(path, index_frames(48, 32, 12), 8)
    with pytest.raises(VideoDecodeError, match="w48.mp4"):
        video_io.open_video(path, "decord").get_frames([0])
    recs = [VideoRecord(str(path), ["narrow"], "w48")]
    item = datasets.VideoTextDataset(recs, num_frames=4, sampling_rate=2, input_size=32)[0]
    assert item["broken"] == 0 and item["video"].shape == (3, 4, 32, 32)
    views = datasets.VideoTextDataset(recs, mode="test", num_frames=4, sampling_rate=2, input_size=32,
                                      short_side_size=32)[0]["video"]
    assert views.shape == (1, 3, 4, 32, 32)
    with pytest.raises(VideoDecodeError, match="w48.mp4"):  # an explicit backend gets no fallback
        datasets.VideoTextDataset(recs, mode="test", num_frames=4, input_size=32, short_side_size=32,
                                  video_backend="decord")[0]
