"""video_tools.py on real mp4 files: `check` finds each kind of broken/short video, `preprocess` re-encodes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import video_io
import video_tools

ROOT = Path(__file__).resolve().parents[1]


def write_mp4(path: Path, num_frames: int, width: int = 96, height: int = 64, fps: int = 30,
              faststart: bool = True) -> Path:
    """A small H.264 mp4 whose frames differ (a moving bar), written with PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": "8"}  # several keyframes, so a cut file still opens and decodes its start
        for i in range(num_frames):
            img = np.full((height, width, 3), (i * 7) % 256, dtype=np.uint8)
            img[:, (i * 3) % width] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupt(path: Path) -> Path:
    """Overwrite the second half of the coded frames: the box layout is intact, decoding fails."""
    data = bytearray(path.read_bytes())
    start = data.find(b"mdat") + 4
    data[start + (len(data) - start) // 2:] = b"\xff" * (len(data) - start - (len(data) - start) // 2)
    path.write_bytes(bytes(data))
    return path


def write_annotations(path: Path, videos: list[str]) -> Path:
    """A Singularity-style JSON list: [{"video": relative path, "caption": text}]."""
    path.write_text(json.dumps([{"video": v, "caption": f"a caption for {v}"} for v in videos]))
    return path


@pytest.fixture(scope="module")
def media(module_tmp) -> Path:
    """good (two, one in a sub-folder), short, cut in half (index first: it opens), cut in half and cut just
    before its index (index last), corrupt data (intact layout), empty, not-a-video; `missing.mp4` is named by
    the annotations but never written."""
    root = module_tmp.mktemp("media")
    write_mp4(root / "good.mp4", 72)
    write_mp4(root / "sub" / "good2.mp4", 70, width=64, height=96)
    write_mp4(root / "short.mp4", 20)
    truncate(write_mp4(root / "truncated.mp4", 72))
    truncate(write_mp4(root / "no_index.mp4", 72, faststart=False))
    corrupt(write_mp4(root / "corrupt.mp4", 72))
    no_moov = write_mp4(root / "no_moov.mp4", 72, faststart=False)  # cut exactly where its index starts
    no_moov.write_bytes(no_moov.read_bytes()[: no_moov.read_bytes().rfind(b"moov") - 4])
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    return root


GOOD = ["good.mp4", "sub/good2.mp4"]
BROKEN = {"missing.mp4": "missing", "empty.mp4": "empty", "text.mp4": "undecodable", "corrupt.mp4": "undecodable",
          "no_index.mp4": "truncated", "no_moov.mp4": "truncated", "truncated.mp4": "truncated"}


def run_check(anno: Path, root: Path, *extra: str) -> int:
    return video_tools.main(["check", "--anno", str(anno), "--data_root", str(root), "--num_frames", "16",
                             "--sampling_rate", "4", "--workers", "1", *extra])


# ------------------------------------------------------------------ check

@pytest.mark.slow
def test_check_passes_on_good_videos_as_a_real_process(media, tmp_path):
    anno = write_annotations(tmp_path / "anno.json", GOOD)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "video_tools.py"), "check", "--anno", str(anno),
                           "--data_root", str(media), "--workers", "2", "--report", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checking 2 videos" in proc.stdout
    data = json.loads(report.read_text())
    assert data["counts"]["ok"] == 2 and data["problems"] == [] and data["exit_status"] == 0


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_check_flags_each_broken_kind_and_short(media, tmp_path, capsys, backend):
    anno = write_annotations(tmp_path / "anno.json", GOOD + ["short.mp4"] + list(BROKEN))
    report = tmp_path / "out" / "report.json"
    assert run_check(anno, media, "--video_backend", backend, "--report", str(report)) == video_tools.EXIT_ERRORS
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    by_name = {Path(p["path"]).name: p for p in data["problems"]}
    assert set(by_name) == set(BROKEN) | {"short.mp4"}
    for video, kind in BROKEN.items():
        assert by_name[video]["status"] == kind, by_name[video]
        assert f"{kind:<12}{media / video}: " in out
    assert by_name["short.mp4"]["status"] == "short" and by_name["short.mp4"]["num_frames"] == 20
    assert "20 frames < 64 needed" in out
    assert data["counts"] == {"ok": 2, "short": 1, "missing": 1, "empty": 1, "undecodable": 2, "truncated": 3}
    # the corrupt file opens and reports its length: only decoding its frames exposes it
    assert by_name["corrupt.mp4"]["num_frames"] == 72 and "decoding fails" in by_name["corrupt.mp4"]["message"]
    assert "'mdat' box" in by_name["truncated.mp4"]["message"]
    assert "'mdat' box" in by_name["no_index.mp4"]["message"]
    assert "no 'moov'" in by_name["no_moov.mp4"]["message"]


def test_short_videos_alone_are_a_warning_status(media, tmp_path, capsys):
    anno = write_annotations(tmp_path / "anno.json", GOOD + ["short.mp4"])
    assert run_check(anno, media) == video_tools.EXIT_WARNINGS != 0
    assert run_check(anno, media, "--allow_short") == 0
    # with a shorter clip the same video is long enough
    assert video_tools.main(["check", "--anno", str(anno), "--data_root", str(media), "--num_frames", "4",
                             "--sampling_rate", "4", "--workers", "1"]) == 0
    assert "short.mp4" in capsys.readouterr().out


def test_full_decode_and_workers_agree(media, tmp_path):
    anno = write_annotations(tmp_path / "anno.json", GOOD + list(BROKEN))
    r1, r2 = tmp_path / "r1.json", tmp_path / "r2.json"
    assert run_check(anno, media, "--report", str(r1)) == 1
    assert video_tools.main(["check", "--anno", str(anno), "--data_root", str(media), "--workers", "2",
                             "--full_decode", "--report", str(r2)]) == 1
    assert json.loads(r1.read_text())["counts"] == json.loads(r2.read_text())["counts"]


def test_check_on_shared_fixture_videos(video_files, broken_videos, tmp_path, capsys):
    """Every container/codec of conftest's videos passes (mkv has no stored frame count); conftest's broken
    files land in their categories."""
    expected = {"missing": "missing", "empty": "empty", "truncated": "truncated", "not_a_video": "undecodable"}
    anno = write_annotations(tmp_path / "anno.json", [str(p) for p in [*video_files.values(),
                                                                        *broken_videos.values()]])
    report = tmp_path / "report.json"
    assert video_tools.main(["check", "--anno", str(anno), "--num_frames", "4", "--sampling_rate", "4",
                             "--workers", "1", "--report", str(report)]) == video_tools.EXIT_ERRORS
    data = json.loads(report.read_text())
    assert data["counts"]["ok"] == len(video_files)
    assert {p["path"]: p["status"] for p in data["problems"]} == {str(broken_videos[k]): v
                                                                  for k, v in expected.items()}


def test_check_synthetic_webvid_csv(synthetic_root, capsys):
    """The synthetic set through its WebVid CSV: 16-frame clips are too short for 16 x 4, fine for 8 x 2."""
    anno = synthetic_root / "annotations" / "train_webvid.csv"
    assert video_tools.main(["check", "--anno", str(anno), "--data_root", str(synthetic_root), "--num_frames", "8",
                             "--sampling_rate", "2", "--workers", "2"]) == 0
    assert video_tools.main(["check", "--anno", str(anno), "--data_root", str(synthetic_root),
                             "--workers", "1", "--max_listed", "3"]) == video_tools.EXIT_WARNINGS
    out = capsys.readouterr().out
    assert "short" in out and "... and 21 more" in out


def test_check_unreadable_annotation_file_is_a_usage_error(tmp_path, capsys):
    assert video_tools.main(["check", "--anno", str(tmp_path / "nope.json")]) == video_tools.EXIT_USAGE
    assert "nope.json" in capsys.readouterr().err


@pytest.mark.slow
def test_check_given_a_folder_says_so_in_one_line(synthetic_root):
    """Before: `error: [Errno 21] Is a directory: '...'`."""
    folder = synthetic_root / "annotations"
    proc = subprocess.run([sys.executable, str(ROOT / "video_tools.py"), "check", "--anno", str(folder)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == video_tools.EXIT_USAGE and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"--anno {folder} is a folder: give one annotation file" in proc.stderr
    assert "metadata.json" in proc.stderr  # names what it holds


def test_help_lists_commands_and_exit_statuses(capsys):
    with pytest.raises(SystemExit) as e:
        video_tools.main(["--help"])
    assert e.value.code == 0 and "check" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        video_tools.main(["check", "--help"])
    assert "exit status" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        video_tools.main(["preprocess", "--help"])
    assert "--short_side" in capsys.readouterr().out


# ------------------------------------------------------------- preprocess

@pytest.fixture
def source_tree(tmp_path) -> Path:
    src = tmp_path / "src"
    write_mp4(src / "a.mp4", 60, width=160, height=90, fps=30)      # landscape, 2 s
    write_mp4(src / "deep" / "b.mp4", 24, width=90, height=160, fps=12)  # portrait, 2 s
    return src


def read_back(path: Path) -> tuple[int, int, float, np.ndarray]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        return s.width, s.height, float(s.average_rate), frames


def test_preprocess_resizes_resamples_and_skips_second_run(source_tree, tmp_path, capsys):
    dst = tmp_path / "dst"
    argv = ["preprocess", "--src", str(source_tree), "--dst", str(dst), "--short_side", "64", "--fps", "8",
            "--workers", "1", "--preset", "ultrafast"]
    assert video_tools.main(argv) == 0
    assert "converted 2, skipped 0" in capsys.readouterr().out
    w, h, fps, frames = read_back(dst / "a.mp4")
    assert (w, h) == (114, 64) and fps == pytest.approx(8) and abs(len(frames) - 16) <= 1
    assert frames.shape[1:] == (64, 114, 3) and frames.std(axis=0).mean() > 1  # real, changing content
    w, h, fps, frames = read_back(dst / "deep" / "b.mp4")
    assert (w, h) == (64, 114) and fps == pytest.approx(8) and abs(len(frames) - 16) <= 1
    mtime = (dst / "a.mp4").stat().st_mtime_ns
    assert video_tools.main(argv) == 0
    assert "converted 0, skipped 2" in capsys.readouterr().out
    assert (dst / "a.mp4").stat().st_mtime_ns == mtime
    assert not list(dst.rglob("*.part"))


def test_preprocess_reconverts_a_newer_source(source_tree, tmp_path, capsys):
    dst = tmp_path / "dst"
    argv = ["preprocess", "--src", str(source_tree), "--dst", str(dst), "--short_side", "32", "--fps", "4",
            "--workers", "1", "--preset", "ultrafast"]
    assert video_tools.main(argv) == 0
    later = (dst / "a.mp4").stat().st_mtime + 10
    os.utime(source_tree / "a.mp4", (later, later))
    assert video_tools.main(argv) == 0
    assert "converted 1, skipped 1" in capsys.readouterr().out.splitlines()[-1]


def test_preprocess_reports_broken_sources_and_converts_the_rest(source_tree, tmp_path, capsys):
    truncate(write_mp4(source_tree / "bad" / "cut.mp4", 60, faststart=False))
    (source_tree / "bad" / "junk.mp4").write_text("junk")
    (source_tree / "notes.txt").write_text("not a video, ignored")
    dst = tmp_path / "dst"
    report = tmp_path / "pre.json"
    code = video_tools.main(["preprocess", "--src", str(source_tree), "--dst", str(dst), "--short_side", "32",
                             "--fps", "4", "--workers", "2", "--preset", "ultrafast", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == video_tools.EXIT_ERRORS
    assert "FAILED bad/cut.mp4" in out and "FAILED bad/junk.mp4" in out
    assert "converted 2, skipped 0 (up to date), failed 2" in out
    assert (dst / "a.mp4").is_file() and (dst / "deep" / "b.mp4").is_file()
    assert not (dst / "bad" / "cut.mp4").exists() and not list(dst.rglob("*.part"))
    assert json.loads(report.read_text())["counts"] == {"converted": 2, "skipped": 0, "failed": 2}


def test_preprocess_output_loads_with_the_training_decoder(source_tree, tmp_path):
    dst = tmp_path / "dst"
    assert video_tools.main(["preprocess", "--src", str(source_tree), "--dst", str(dst), "--short_side", "32",
                             "--fps", "8", "--workers", "1", "--out_ext", "mp4", "--preset", "ultrafast"]) == 0
    video = video_io.open_video(str(dst / "a.mp4"))
    assert abs(video.num_frames - 16) <= 1 and video.fps == pytest.approx(8)
    frames = video.get_frames([0, video.num_frames - 1])
    assert frames.shape == (2, 32, 56, 3) and frames.dtype == np.uint8


def test_preprocess_shared_fixture_videos(video_files, tmp_path, capsys):
    """Sources of several codecs and containers (mpeg4, mkv) all convert; names are kept, content is mp4.
    (Short side 64: decord 0.6 misreads frames 16/24/48/72 px wide as 4-6 channels, whoever wrote them.)"""
    src = tmp_path / "src"
    src.mkdir()
    for path in video_files.values():
        (src / path.name).symlink_to(path)
    dst = tmp_path / "dst"
    assert video_tools.main(["preprocess", "--src", str(src), "--dst", str(dst), "--short_side", "64", "--fps", "5",
                             "--workers", "2", "--preset", "ultrafast"]) == 0
    assert f"converted {len(video_files)}, skipped 0" in capsys.readouterr().out
    for path in video_files.values():
        with video_io.open_video(str(dst / path.name)) as video:
            frames = video.get_frames([0, video.num_frames - 1])
            assert min(frames.shape[1:3]) == 64 and video.fps == pytest.approx(5)


def test_preprocess_keyframe_interval_and_dst_inside_src(source_tree, capsys):
    """Keyframes every 0.5 s at 8 fps = every 4 frames; an output folder inside --src is not re-read."""
    dst = source_tree / "converted"
    argv = ["preprocess", "--src", str(source_tree), "--dst", str(dst), "--short_side", "32", "--fps", "8",
            "--keyframe_interval", "0.5", "--workers", "1", "--preset", "ultrafast"]
    assert video_tools.main(argv) == 0
    with av.open(str(dst / "a.mp4")) as c:
        keyframes = [i for i, packet in enumerate(c.demux(video=0)) if packet.is_keyframe]
    assert keyframes == [0, 4, 8, 12]
    assert video_tools.main(argv) == 0
    assert "preprocessing 2 videos" in capsys.readouterr().out


def container_and_codec(path: Path) -> tuple[str, str]:
    """("webm" / "matroska" / the PyAV format name, codec name) as a reader finds them in the file's bytes."""
    with av.open(str(path)) as c:
        codec = c.streams.video[0].codec_context.name
        name = c.format.name
    if name == "matroska,webm":  # one demuxer for both: the EBML header's DocType tells them apart
        head = path.read_bytes()[:64]
        name = "webm" if b"webm" in head else "matroska" if b"matroska" in head else name
    return name, codec


def test_preprocess_writes_the_container_its_extension_names(source_tree, tmp_path, capsys):
    """Before: every output was H.264 in mp4, also under .webm and .mkv names."""
    (source_tree / "web.webm").write_bytes((source_tree / "a.mp4").read_bytes())  # mp4 content, webm name
    (source_tree / "deep" / "mat.mkv").write_bytes((source_tree / "a.mp4").read_bytes())
    dst = tmp_path / "dst"
    assert video_tools.main(["preprocess", "--src", str(source_tree), "--dst", str(dst), "--short_side", "64",
                             "--fps", "8", "--workers", "2", "--preset", "ultrafast"]) == 0
    assert "h264 in mp4" not in capsys.readouterr().out  # the header names the encoders: libx264, libvpx-vp9
    assert container_and_codec(dst / "a.mp4") == ("mov,mp4,m4a,3gp,3g2,mj2", "h264")
    assert container_and_codec(dst / "web.webm") == ("webm", "vp9")
    assert container_and_codec(dst / "deep" / "mat.mkv") == ("matroska", "h264")
    for name in ("web.webm", "deep/mat.mkv"):
        for backend in ("decord", "pyav"):  # the training loader reads them
            with video_io.open_video(str(dst / name), backend=backend) as video:
                assert abs(video.num_frames - 16) <= 1 and video.fps == pytest.approx(8)
                assert video.get_frames([0, video.num_frames - 1]).shape == (2, 64, 114, 3)
    webm = tmp_path / "webm"
    assert video_tools.main(["preprocess", "--src", str(source_tree), "--dst", str(webm), "--short_side", "32",
                             "--fps", "4", "--workers", "1", "--out_ext", "webm", "--preset", "ultrafast"]) == 0
    assert {p.relative_to(webm).as_posix() for p in webm.rglob("*.webm")} == {
        "a.webm", "web.webm", "deep/b.webm", "deep/mat.webm"}
    assert all(container_and_codec(p) == ("webm", "vp9") for p in webm.rglob("*.webm"))


def test_preprocess_redoes_outputs_whose_options_changed(source_tree, tmp_path, capsys):
    """Before: a re-run with --short_side 128 after 64 skipped every file as "up to date"."""
    dst = tmp_path / "dst"
    argv = ["preprocess", "--src", str(source_tree), "--dst", str(dst), "--fps", "8", "--workers", "1",
            "--preset", "ultrafast"]
    assert video_tools.main(argv + ["--short_side", "64"]) == 0
    assert read_back(dst / "a.mp4")[:2] == (114, 64)
    capsys.readouterr()
    assert video_tools.main(argv + ["--short_side", "128"]) == 0
    out = capsys.readouterr().out
    assert "converted 2, skipped 0" in out
    assert "2 output(s) redone because their options changed (e.g. a.mp4: short_side 64 -> 128)" in out
    assert read_back(dst / "a.mp4")[:2] == (228, 128) and read_back(dst / "deep" / "b.mp4")[:2] == (128, 228)
    assert video_tools.main(argv + ["--short_side", "128"]) == 0
    assert "converted 0, skipped 2" in capsys.readouterr().out
    assert video_tools.main(argv + ["--short_side", "128", "--crf", "30"]) == 0  # any recorded option counts
    assert "converted 2, skipped 0" in capsys.readouterr().out
    recorded = video_tools.read_manifest(dst)
    assert set(recorded) == {"a.mp4", "deep/b.mp4"}
    assert recorded["a.mp4"] == {"container": "mp4", "codec": "libx264", "short_side": 128, "fps": 8.0, "crf": 30,
                                 "preset": "ultrafast", "keyframe_interval": 2.0}
    # an output with no record (an older version's, or a crash before its line was written) is redone once
    manifest = dst / video_tools.MANIFEST
    a_line, b_line = (json.dumps({"output": k, "options": recorded[k]}) for k in ("a.mp4", "deep/b.mp4"))
    manifest.write_text(a_line + "\n" + b_line[: len(b_line) // 2])  # b's line cut by a crash
    assert video_tools.main(argv + ["--short_side", "128", "--crf", "30"]) == 0
    assert "converted 1, skipped 1" in capsys.readouterr().out
    assert video_tools.main(argv + ["--short_side", "128", "--crf", "30"]) == 0
    assert "converted 0, skipped 2" in capsys.readouterr().out


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_preprocess_outputs_get_the_permissions_the_umask_gives(source_tree, tmp_path, umask, expected):
    dst, report = tmp_path / "dst", tmp_path / "reports" / "pre.json"
    old = os.umask(umask)
    try:
        assert video_tools.main(["preprocess", "--src", str(source_tree), "--dst", str(dst), "--short_side", "32",
                                 "--fps", "4", "--workers", "1", "--preset", "ultrafast", "--report",
                                 str(report)]) == 0
    finally:
        os.umask(old)
    for path in (dst / "a.mp4", dst / "deep" / "b.mp4", dst / video_tools.MANIFEST, report):
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode & 0o777))


def test_preprocess_refuses_an_output_name_it_cannot_write(source_tree, tmp_path, capsys):
    (source_tree / "cam.ts").write_bytes((source_tree / "a.mp4").read_bytes())
    dst = tmp_path / "dst"
    argv = ["preprocess", "--src", str(source_tree), "--dst", str(dst), "--short_side", "32", "--fps", "4",
            "--workers", "1", "--preset", "ultrafast"]
    assert video_tools.main(argv) == video_tools.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write outputs named .ts (1 files)" in err and "--out_ext mp4" in err
    assert not dst.exists() or not list(dst.rglob("*.mp4"))  # refused before converting anything
    assert video_tools.main(argv + ["--out_ext", "mp4"]) == 0
    assert container_and_codec(dst / "cam.mp4") == ("mov,mp4,m4a,3gp,3g2,mj2", "h264")


def test_preprocess_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        video_tools.main(["preprocess", "--src", str(tmp_path), "--dst", str(tmp_path / "o"), "--short_side", "63"])
    assert "even" in capsys.readouterr().err
    assert video_tools.main(["preprocess", "--src", str(tmp_path / "none"), "--dst", str(tmp_path)]) == 2
    assert video_tools.main(["preprocess", "--src", str(tmp_path), "--dst", str(tmp_path)]) == 2


# ------------------------------------------------------------------- units

def test_even_size_keeps_aspect_and_short_side():
    assert video_tools.even_size(640, 360, 256) == (456, 256)
    assert video_tools.even_size(360, 640, 256) == (256, 456)
    assert video_tools.even_size(1920, 1080, 224) == (398, 224)
    assert all(v % 2 == 0 for v in video_tools.even_size(641, 359, 128))


class _Frame:
    def __init__(self, time):
        self.time = time


@pytest.mark.parametrize("src_fps,n,fps,expected", [(30, 90, 8, 24), (30, 60, 30, 60), (4, 8, 8, 16),
                                                    (25, 1, 8, 1), (24, 10, 8, 4)])
def test_resample_frames_count_and_order(src_fps, n, fps, expected):
    frames = [_Frame(i / src_fps) for i in range(n)]
    out = list(video_tools.resample_frames(frames, src_fps, fps))
    assert [k for k, _ in out] == list(range(expected))
    for k, f in out:  # each output shows the latest source frame not after its time
        assert f.time <= k / fps + 1e-6
    assert [f.time for _, f in out] == sorted(f.time for _, f in out)


def test_mp4_cut_reason(media):
    assert video_io.mp4_cut_reason(str(media / "good.mp4")) is None
    assert video_io.mp4_cut_reason(str(media / "corrupt.mp4")) is None  # layout intact
    assert video_io.mp4_cut_reason(str(media / "text.mp4")) is None  # not an MP4: the decoder judges
    assert "ends" in video_io.mp4_cut_reason(str(media / "truncated.mp4"))


def test_probe_indices_cover_the_end():
    assert video_io.probe_indices(1) == [0]
    assert video_io.probe_indices(100) == [0, 50, 98, 99]
