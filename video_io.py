"""Reading video files: the decoders (PyAV, decord), `open_video`, and `check_video`, the one-file probe that
`video_tools.py check` and the start-up check of evaluation lists run.

    open_video(path) -> VideoFile: num_frames, fps, get_frames(indices) -> uint8 [T, H, W, 3] (RGB)
    check_video(path, min_frames) -> {"path", "status", "num_frames", "fps", "message"}, never raising

Every failure about a file is a VideoDecodeError whose message names the file, on one line (one_line).
Nothing here imports torch, so `video_tools.py --help` stays quick.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

# file suffixes recognised as videos when a directory is scanned (lower case)
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg",
                              ".3gp", ".ts"})


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or decoded; the message names the file."""


# ----------------------------------------------------------------------------------------------- video reading


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


BACKEND_MODULES = {"decord": "decord", "pyav": "av"}  # video backend -> the package it needs


def backend_installed(backend: str) -> bool:
    """Whether the package a video backend ("decord", "pyav") needs imports here."""
    return _importable(BACKEND_MODULES[backend])


def resolve_backend(name: str = "auto") -> str:
    """"auto" -> "pyav" when it imports, else "decord"; a named backend must import. PyAV comes first: it read
    clips 1.1-1.2x faster than decord in every row of bench_dataloader.py (same run), skips the frames it need
    not decode, and reads frame sizes decord 0.6 cannot (e.g. 48 or 72 px wide)."""
    if name == "auto":
        return "pyav" if _importable(BACKEND_MODULES["pyav"]) else "decord"
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown video backend {name!r}; choose auto, decord or pyav")
    if not _importable(BACKEND_MODULES[name]):
        raise ImportError(f"video backend {name!r} needs the '{BACKEND_MODULES[name]}' package, which does not "
                          "import")
    return name


def one_line(e: BaseException, limit: int = 300) -> str:
    """An error as one bounded line, so a decoder's multi-line message cannot flood a log or a report."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class VideoFile:
    """An open video: ``num_frames``, ``fps`` and ``get_frames(indices) -> uint8 [T, H, W, 3]`` (RGB).

    Only the asked frames are converted to RGB; indices may repeat and come in any order. Use as a context
    manager (or call close()) to release the decoder.
    """
    backend = "base"

    def __init__(self, path: str, threads: int = 1) -> None:
        self.path = path
        self.threads = int(threads)
        self.num_frames = 0
        self.fps = 0.0

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("get_frames needs at least one index")
        bad = [i for i in idx if not 0 <= i < self.num_frames]
        if bad:
            raise IndexError(f"{self.path}: frame indices {bad[:5]} outside [0, {self.num_frames})")
        unique = sorted(set(idx))
        try:
            frames = self._read(unique)
        except VideoDecodeError:
            raise
        except Exception as e:  # any decoder error is about this file
            raise VideoDecodeError(f"{self.path}: decoding frames {unique[0]}..{unique[-1]} with {self.backend} "
                                   f"failed: {type(e).__name__}: {one_line(e)}") from e
        if frames.ndim != 4 or frames.shape[0] != len(unique) or frames.shape[-1] != 3:
            raise VideoDecodeError(f"{self.path}: {self.backend} returned frames of shape {tuple(frames.shape)} for "
                                   f"{len(unique)} indices")
        if unique == idx:
            return frames
        pos = {i: k for k, i in enumerate(unique)}
        return frames[[pos[i] for i in idx]]

    def _read(self, indices: list[int]) -> np.ndarray:  # sorted, unique, in range
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "VideoFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.num_frames} frames @ {self.fps:.2f} fps)"


class _DecordVideo(VideoFile):
    backend = "decord"

    def __init__(self, path: str, threads: int = 1) -> None:
        super().__init__(path, threads)
        import decord
        # one thread by default: data-loader workers already use the cores
        self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=self.threads)
        self.num_frames = len(self._reader)
        self.fps = float(self._reader.get_avg_fps())
        self._frame_at = self._time_index()

    def _time_index(self) -> np.ndarray | None:
        """For a variable-frame-rate file, wanted index i -> the stored frame the PyAV reader returns for it: the
        first whose timestamp x fps rounds to i, else the one on screen at that time. None on a constant-rate
        file (every frame at its own index: nothing to map)."""
        if self.num_frames < 2 or self.fps <= 0:
            return None
        starts = np.asarray(self._reader.get_frame_timestamp(list(range(self.num_frames))))[:, 0]
        at = np.round((starts - starts[0]) * self.fps).astype(np.int64)
        if np.array_equal(at, np.arange(self.num_frames)):
            return None
        wanted = np.arange(self.num_frames)
        first = np.searchsorted(at, wanted, side="left")
        hit = (first < self.num_frames) & (at[np.minimum(first, self.num_frames - 1)] == wanted)
        return np.clip(np.where(hit, first, first - 1), 0, self.num_frames - 1)

    def _read(self, indices: list[int]) -> np.ndarray:
        if self._frame_at is not None:  # distinct wanted times may fall on one stored frame
            stored = self._frame_at[indices]
            unique, pos = np.unique(stored, return_inverse=True)
            return self._get_batch(unique.tolist())[pos]
        return self._get_batch(indices)

    def _get_batch(self, indices: list[int]) -> np.ndarray:
        batch = self._reader.get_batch(indices)
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # any decord bridge

    def close(self) -> None:
        self._reader = None


class _PyAVVideo(VideoFile):
    """PyAV reader: seeks to the keyframe before the first wanted frame, decodes forward, converts only wanted
    frames and stops after the last one. Frame i is the first frame whose timestamp x fps (the stream's average
    rate) rounds to i, else the frame on screen at time i / fps; the decord reader maps its indices the same way
    on variable-frame-rate files, so both backends return the same frames."""
    backend = "pyav"
    RESEEK_GAP = 250  # wanted frames farther apart than this: seek again rather than decode everything between

    def __init__(self, path: str, threads: int = 1) -> None:
        super().__init__(path, threads)
        import av
        self._container = av.open(path, metadata_errors="ignore")
        try:
            if not self._container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = self.threads
            if self.threads > 1:  # frame threads decode successive frames at once; slice threads split a frame
                self._stream.thread_type = "AUTO"
            # one colour converter per video: frame.to_ndarray() builds a new swscale context for every frame
            from av.video.reformatter import VideoReformatter
            self._to_rgb = VideoReformatter()
            rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
            if not rate:
                raise VideoDecodeError(f"{path}: unknown frame rate")
            self.fps = float(rate)
            self._time_base = self._stream.time_base
            self._start = self._stream.start_time or 0
            # mkv / webm / ts carry no frame count (0): count the packets, which costs reading, not decoding
            self.num_frames = int(self._stream.frames) or self._count_packets()
        except BaseException:
            self._container.close()
            raise

    frames_decoded = 0  # frames the decoder produced (skipped ones are not): how much work the reads took

    def _count_packets(self) -> int:
        n = sum(1 for packet in self._container.demux(self._stream) if packet.size)
        self._container.seek(0)
        return n

    def _pts_of(self, index: int) -> int:
        return self._start + int(index / self.fps / self._time_base)

    def _index_of(self, pts: int) -> int:
        return int(round(float((pts - self._start) * self._time_base) * self.fps))

    def _read(self, indices: list[int]) -> np.ndarray:
        out: dict[int, np.ndarray] = {}
        run = [indices[0]]
        for i in indices[1:]:
            if i - run[-1] > self.RESEEK_GAP:
                self._decode_run(run, out)
                run = []
            run.append(i)
        self._decode_run(run, out)
        return np.stack([out[i] for i in indices])

    def _decode_run(self, run: list[int], out: dict[int, np.ndarray]) -> None:
        try:
            self._decode_run_with(run, out, skip_unwanted=True)
        except _SkippedOnScreenFrame:  # a gap in the timestamps: read this run again decoding every frame
            self._decode_run_with(run, out, skip_unwanted=False)

    def _decode_run_with(self, run: list[int], out: dict[int, np.ndarray], skip_unwanted: bool) -> None:
        if run[0] > 0 and self._decode_from(self._pts_of(run[0]), run, out, skip_unwanted):
            return
        self._decode_from(None, run, out, skip_unwanted)  # from the first frame (also when a seek landed past run[0])

    def _decode_from(self, target_pts: int | None, run: list[int], out: dict[int, np.ndarray],
                     skip_unwanted: bool) -> bool:
        """Fill out[i] for i in run; False when the seek landed after run[0] (caller decodes from the start)."""
        if target_pts is None:
            self._container.seek(0)
        else:
            self._container.seek(target_pts, stream=self._stream, backward=True, any_frame=False)
        try:
            return self._collect(run, out, may_overshoot=target_pts is not None, skip_unwanted=skip_unwanted)
        finally:
            self._stream.codec_context.skip_frame = "DEFAULT"

    def _frames(self, wanted: set[int] | None):
        """Decoded frames from the current position. With `wanted`, a packet whose own frame is not wanted is
        decoded with skip_frame NONREF: the decoder drops it when no other frame refers to it (x264's default
        stream: about half the frames), which by definition leaves every other frame bit-identical. Wanted are
        the asked indices and each one's predecessor (the frame on screen when an index has no frame of its
        own; _collect starts again without skipping when a wider gap makes an earlier frame the one on screen)."""
        codec = self._stream.codec_context
        for packet in self._container.demux(self._stream):
            keep = wanted is None or packet.pts is None or self._index_of(packet.pts) in wanted
            codec.skip_frame = "DEFAULT" if keep else "NONREF"
            for frame in packet.decode():
                self.frames_decoded += 1
                yield frame

    def _collect(self, run: list[int], out: dict[int, np.ndarray], may_overshoot: bool, skip_unwanted: bool) -> bool:
        """Decode forward, converting only wanted frames, until run[-1]. A wanted index with no frame of its own
        (timestamp rounding) takes the frame on screen at that time."""
        p, prev, prev_index, prev_rgb = 0, None, -1, None
        for frame in self._frames(set(run) | {i - 1 for i in run} if skip_unwanted else None):
            index = prev_index + 1 if frame.pts is None else self._index_of(frame.pts)
            if prev is None and may_overshoot and (frame.pts is None or index > run[0]):
                return False
            while p < len(run) and run[p] < index:  # passed: hold the frame on screen at that time
                if skip_unwanted and prev is not None and prev_index < run[p] - 1:
                    raise _SkippedOnScreenFrame  # the frame on screen may be one the decoder skipped
                if prev_rgb is None:
                    prev_rgb = self._rgb(prev if prev is not None else frame)
                out[run[p]] = prev_rgb
                p += 1
            if p < len(run) and run[p] == index:
                out[index] = self._rgb(frame)
                p += 1
            if p == len(run):
                return True
            prev, prev_index, prev_rgb = frame, index, None
        if prev is None:
            if may_overshoot:  # e.g. MPEG-TS: the seek landed after the last keyframe; decode from the start
                return False
            raise VideoDecodeError(f"{self.path}: no frame decoded at or after frame {run[0]}")
        # The stream ended before the container's frame count. A few frames short is a count off by rounding:
        # hold the last frame. Far short is a truncated file.
        if run[-1] - prev_index > max(4, self.num_frames // 10):
            raise VideoDecodeError(f"{self.path}: stream ended at frame {prev_index} but frame {run[-1]} was asked "
                                   f"(the container claims {self.num_frames}); truncated file?")
        last = self._rgb(prev)
        for i in run[p:]:
            out[i] = last
        return True

    def _rgb(self, frame) -> np.ndarray:
        return self._to_rgb.reformat(frame, format="rgb24").to_ndarray()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class _SkippedOnScreenFrame(Exception):
    """A wanted index has no frame of its own and the frames before it were not all decoded."""


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(f"{path}: file does not exist")
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")


def open_video(path: str | os.PathLike, backend: str = "auto", threads: int = 1) -> VideoFile:
    """Open a video with decord or PyAV (see resolve_backend), its decoder using `threads` threads (1 when
    several loader processes already share the cores; more helps a single loading process). Missing, empty,
    non-video or unreadable files raise VideoDecodeError naming the file."""
    if threads < 1:
        raise ValueError(f"decoder threads must be >= 1, got {threads}")
    path = os.fspath(path)
    backend = resolve_backend(backend)
    _check_file(path)
    cls = _DecordVideo if backend == "decord" else _PyAVVideo
    try:
        video = cls(path, threads)
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(f"{path}: cannot open with {backend}: {type(e).__name__}: {one_line(e)}") from e
    if video.num_frames <= 0:
        video.close()
        raise VideoDecodeError(f"{path}: no video frames")
    return video


# ----------------------------------------------------------------------------------------------- one-file check

# check_video's statuses: errors (the loader cannot use the file) and a warning (the file loads, frames repeat)
ERRORS = ("missing", "empty", "undecodable", "truncated")
WARNINGS = ("short",)
CATEGORIES = ("ok",) + WARNINGS + ERRORS


def probe_indices(num_frames: int) -> list[int]:
    """First, middle and the last two frames: a truncated mp4 often opens and decodes its start, then fails."""
    return sorted({0, num_frames // 2, max(0, num_frames - 2), num_frames - 1})


def _result(path: str, status: str, message: str = "", num_frames: int | None = None,
            fps: float | None = None) -> dict:
    return {"path": path, "status": status, "num_frames": num_frames, "fps": fps, "message": message}


def _decode_all(video, num_frames: int, chunk: int = 32) -> None:
    """Decode every frame in chunks (memory stays at one chunk), raising where decoding fails."""
    for start in range(0, num_frames, chunk):
        idx = list(range(start, min(start + chunk, num_frames)))
        frames = video.get_frames(idx)
        if len(frames) != len(idx):
            raise RuntimeError(f"asked frames {idx[0]}..{idx[-1]}, got {len(frames)}")


_ISO_BOX_TYPES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin", b"styp", b"uuid"})


def mp4_cut_reason(path: str) -> str | None:
    """Why an MP4/MOV file is cut short, from its top-level box layout, else None (intact, or not an MP4).

    A download that stopped early leaves a box running past the end of the file, or no 'moov' index at all
    (encoders without faststart write it last). Reads a few box headers only."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(8)[4:8] not in _ISO_BOX_TYPES:
            return None
        pos, seen = 0, set()
        while pos < size:
            f.seek(pos)
            header = f.read(8)
            if len(header) < 8:
                return f"file ends inside a box header at byte {pos}"
            box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
            if box_size == 1:
                large = f.read(8)
                if len(large) < 8:
                    return f"file ends inside a box header at byte {pos}"
                box_size = int.from_bytes(large, "big")
            elif box_size == 0:  # "to the end of the file"
                box_size = size - pos
            if box_size < 8:
                return None  # not a box layout we understand: let the decoder judge
            if pos + box_size > size:
                name = box_type.decode("latin-1")
                return f"'{name}' box at byte {pos} needs {box_size} bytes but the file ends {size - pos} bytes later"
            seen.add(box_type)
            pos += box_size
    return None if b"moov" in seen else "no 'moov' index box (the download stopped before the index)"


def check_video(path: str, min_frames: int, backend: str = "auto", full_decode: bool = False,
                open_only: bool = False) -> dict:
    """Classify one video as ok / short / missing / empty / undecodable / truncated (see CATEGORIES).

    truncated: an MP4/MOV whose box layout shows it is cut short (whatever the decoder makes of it);
    undecodable: any other file that cannot be opened or whose probed frames fail to decode.
    open_only: stop once the container opens with video frames (no frame decoded, no short check): the cheap
    start-up check of evaluation lists (annotations.check_eval_lists).
    Returns {"path", "status", "num_frames", "fps", "message"}; never raises for a bad file."""
    if not os.path.exists(path):
        return _result(path, "missing", "file does not exist")
    if not os.path.isfile(path):
        return _result(path, "undecodable", "not a regular file")
    if os.path.getsize(path) == 0:
        return _result(path, "empty", "zero-byte file")
    try:
        cut = mp4_cut_reason(path)
    except OSError as e:
        return _result(path, "undecodable", f"cannot read: {one_line(e)}")
    try:
        video = open_video(path, backend=backend)
    except Exception as e:  # VideoDecodeError, or anything a decoder throws at a weird file
        if cut:
            return _result(path, "truncated", f"{cut}; cannot open: {one_line(e, 150)}")
        return _result(path, "undecodable", f"cannot open: {one_line(e)}")
    with video:
        num_frames, fps = int(video.num_frames), float(video.fps)
        if num_frames <= 0:
            return _result(path, "undecodable", "no video frames", num_frames, fps)
        if open_only:
            return _result(path, "truncated", cut, num_frames, fps) if cut else _result(path, "ok", "", num_frames,
                                                                                        fps)
        indices = probe_indices(num_frames)
        try:
            frames = video.get_frames(indices)
            if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
                raise RuntimeError(f"decoder returned shape {tuple(frames.shape)} for {len(indices)} frames")
            if full_decode:
                _decode_all(video, num_frames)
        except Exception as e:
            message = f"opens ({num_frames} frames) but decoding fails: {one_line(e)}"
            return _result(path, "truncated" if cut else "undecodable", f"{cut}; {message}" if cut else message,
                           num_frames, fps)
    if cut:
        return _result(path, "truncated", f"{cut} (its probed frames decode)", num_frames, fps)
    if num_frames < min_frames:
        return _result(path, "short", f"{num_frames} frames < {min_frames} needed (clip frames will repeat)",
                       num_frames, fps)
    return _result(path, "ok", "", num_frames, fps)


def with_progress(results: Iterable[dict], total: int, label: str, every_s: float = 10.0) -> Iterator[dict]:
    """Pass results through, printing a progress line to stderr at most every `every_s` seconds."""
    start = last = time.monotonic()
    for i, r in enumerate(results, 1):
        now = time.monotonic()
        if now - last >= every_s and i < total:
            print(f"[{label}] {i}/{total} ({i / (now - start):.1f}/s)", file=sys.stderr, flush=True)
            last = now
        yield r
