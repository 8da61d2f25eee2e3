"""Data tools to run before a long job: find broken videos, and re-encode big ones so the loader keeps up.

    python video_tools.py check --anno ANNOTATIONS [--data_root DIR] [--num_frames 16 --sampling_rate 4]
    python video_tools.py preprocess --src DIR --dst DIR [--short_side 256 --fps 8 --out_ext mp4]

`check` decodes (it does not just stat) every video an annotation file names, with the backend the training
loader will use, and sorts problems into errors (missing, empty, undecodable, truncated) and a warning (short:
fewer frames than num_frames x sampling_rate; such clips still load, with repeated frames). `preprocess` shrinks
videos (e.g. WebVid's) to a small short side and frame rate, in the container their output name gives (H.264 in
mp4/mov/mkv/avi, VP9 in webm), atomically and resumably: a re-run redoes only outputs whose source is newer or whose
options changed (recorded in <dst>/.preprocess_manifest.jsonl).
Run `python video_tools.py <command> --help` for every option and the exit statuses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import video_io

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_WARNINGS = 0, 1, 2, 3


# ===================================================================== check

def _check_job(job: tuple[str, int, str, bool]) -> dict:
    return video_io.check_video(*job)


def parallel_map(fn: Callable, jobs: Sequence, workers: int) -> Iterator:
    """fn over jobs in order; in this process when workers <= 1 (easy to debug), else in a process pool."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(fn, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))


def annotation_folder_error(path: str) -> str | None:
    """`--anno` given a folder: one line naming it and the annotation files inside, else None."""
    if not os.path.isdir(path):
        return None
    found = sorted(f for f in os.listdir(path) if f.lower().endswith((".csv", ".json", ".jsonl")))
    inside = f"; it holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found else \
        "; it holds no .csv/.json file"
    return f"--anno {path} is a folder: give one annotation file (WebVid CSV, JSON dict/list, MSR-VTT CSV){inside}"


def run_check(args: argparse.Namespace) -> int:
    import annotations  # lazy: --help reads no annotation code

    folder_error = annotation_folder_error(args.anno)
    if folder_error:
        print(f"error: {folder_error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        records = annotations.read_annotations(args.anno, args.data_root)
        backend = video_io.resolve_backend(args.video_backend)
    except (OSError, ValueError) as e:  # AnnotationError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    ids_by_path: dict[str, list[str]] = {}
    for r in records:
        ids_by_path.setdefault(r.path, []).append(r.video_id)
    min_frames = args.num_frames * args.sampling_rate
    jobs = [(p, min_frames, backend, args.full_decode) for p in ids_by_path]
    print(f"checking {len(jobs)} videos ({len(records)} records) from {args.anno} with {backend}, "
          f"{args.workers} worker(s); clips need >= {min_frames} frames "
          f"({args.num_frames} x sampling rate {args.sampling_rate})", flush=True)
    results = list(video_io.with_progress(parallel_map(_check_job, jobs, args.workers), len(jobs), "check"))
    for r in results:
        r["video_ids"] = ids_by_path[r["path"]]
    counts = {c: sum(r["status"] == c for r in results) for c in video_io.CATEGORIES}
    problems = [r for r in results if r["status"] != "ok"]
    print_check_summary(counts, problems, args.max_listed)
    status = check_exit_status(counts, args.allow_short)
    if args.report:
        write_json(args.report, {"anno": args.anno, "data_root": args.data_root, "backend": backend,
                                 "min_frames": min_frames, "num_videos": len(results), "counts": counts,
                                 "exit_status": status, "problems": problems})
        print(f"report written to {args.report}")
    return status


def check_exit_status(counts: dict[str, int], allow_short: bool = False) -> int:
    if any(counts[c] for c in video_io.ERRORS):
        return EXIT_ERRORS
    if counts["short"] and not allow_short:
        return EXIT_WARNINGS
    return EXIT_OK


def print_check_summary(counts: dict[str, int], problems: list[dict], max_listed: int) -> None:
    print("summary:")
    for c in video_io.CATEGORIES:
        kind = "error" if c in video_io.ERRORS else "warning" if c in video_io.WARNINGS else ""
        print(f"  {c:<12}{counts[c]:>8}  {kind}")
    if problems:
        print("problems:")
    for r in problems[:max_listed]:
        print(f"  {r['status']:<12}{r['path']}: {r['message']}")
    if len(problems) > max_listed:
        print(f"  ... and {len(problems) - max_listed} more (see --report)")


def write_json(path: str, obj: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, out)


# ================================================================ preprocess

def even_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so the short side is `short_side`, aspect kept, both even (yuv420p needs it)."""
    scale = short_side / min(width, height)
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


def find_videos(src: Path, exclude: Path | None = None) -> list[Path]:
    """Video files under src (recursive, by extension), relative to src, sorted; hidden/partial files skipped."""

    found = []
    for root, dirs, files in os.walk(src):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or (root_path / d).resolve() != exclude))
        found += [(root_path / f).relative_to(src) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in video_io.VIDEO_EXTENSIONS]
    return sorted(found)


def output_path(dst: Path, rel: Path, out_ext: str) -> Path:
    """Same relative path under dst; the name is kept unless out_ext is given (so annotation files stay valid).
    The output is written in the container its extension names (OUTPUT_CONTAINERS)."""
    return dst / (rel if out_ext == "keep" else rel.with_suffix("." + out_ext.lstrip(".")))


# output extension -> (container format, video codec): H.264 where the container takes it, VP9 in WebM
OUTPUT_CONTAINERS = {".mp4": ("mp4", "libx264"), ".m4v": ("mp4", "libx264"), ".mov": ("mov", "libx264"),
                     ".mkv": ("matroska", "libx264"), ".avi": ("avi", "libx264"), ".webm": ("webm", "libvpx-vp9")}
DEFAULT_CRF = {"libx264": 23, "libvpx-vp9": 32}  # about the same quality on each codec's own scale
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# the x264 preset's speed as libvpx's (deadline, cpu-used)
VP9_SPEED = dict(zip(X264_PRESETS, [("realtime", 8), ("realtime", 7), ("realtime", 6), ("good", 5), ("good", 4),
                                    ("good", 3), ("good", 2), ("good", 1), ("good", 0)]))
MANIFEST = ".preprocess_manifest.jsonl"


def encode_options(args: argparse.Namespace, out_ext: str) -> dict:
    """Everything that decides an output's content: recorded per output, compared on a re-run."""
    container, codec = OUTPUT_CONTAINERS[out_ext.lower()]
    return {"container": container, "codec": codec, "short_side": args.short_side, "fps": args.fps,
            "crf": DEFAULT_CRF[codec] if args.crf is None else args.crf, "preset": args.preset,
            "keyframe_interval": args.keyframe_interval}


def read_manifest(dst: Path) -> dict[str, dict]:
    """Output path relative to dst -> the options it was made with (the last line for it wins; a line cut by a
    crash is ignored, its output is then redone)."""
    recorded = {}
    path = dst / MANIFEST
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                recorded[entry["output"]] = entry["options"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return recorded


def rewrite_manifest(dst: Path, recorded: dict[str, dict]) -> None:
    """One line per output that still exists (atomic), before a run appends to it."""
    lines = [json.dumps({"output": rel, "options": opts}) for rel, opts in sorted(recorded.items())
             if (dst / rel).is_file()]
    dst.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(dst / MANIFEST)
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, dst / MANIFEST)


def reason_to_convert(src: Path, dst: Path, wanted: dict, recorded: dict | None) -> str | None:
    """Why dst must be (re)made, or None when it is up to date: it exists, is not older than its source and was
    made with the same options."""
    if not dst.is_file() or dst.stat().st_size == 0:
        return "new"
    if dst.stat().st_mtime < src.stat().st_mtime:
        return "source is newer"
    if recorded is None:
        return "no record of its options"
    changed = [f"{k} {recorded.get(k)} -> {v}" for k, v in wanted.items() if recorded.get(k) != v]
    return "options changed: " + ", ".join(changed) if changed else None


def unwritable_extensions(outputs: Iterable[Path]) -> dict[str, int]:
    """Output extensions with no container here (count of files each), and the ones whose encoder this PyAV build
    lacks: refused before the run, not failed file by file."""
    import av

    missing: dict[str, int] = {}
    for out in outputs:
        ext = out.suffix.lower()
        if ext not in OUTPUT_CONTAINERS or OUTPUT_CONTAINERS[ext][1] not in av.codecs_available:
            missing[ext] = missing.get(ext, 0) + 1
    return missing


def _frame_time(frame, index: int, src_fps: float) -> float:
    return float(frame.time) if frame.time is not None else index / src_fps


def resample_frames(frames: Iterable, src_fps: float, fps: float) -> Iterator[tuple[int, object]]:
    """Yield (output index k, source frame) showing at time k/fps the latest source frame with time <= k/fps
    (drops frames when fps < source rate, repeats them when above). The last frame lasts 1/src_fps."""
    eps = 1e-6
    k, prev, t0, t = 0, None, None, 0.0
    for i, frame in enumerate(frames):
        t = _frame_time(frame, i, src_fps)
        t0 = t if t0 is None else t0
        while prev is not None and k / fps < t - t0 - eps:
            yield k, prev
            k += 1
        prev = frame
    if prev is not None:
        end = t - t0 + 1.0 / src_fps
        while k / fps < end - eps or k == 0:
            yield k, prev
            k += 1


def _codec_options(codec: str, crf: int, preset: str, threads: int) -> dict[str, str]:
    if codec == "libx264":
        return {"crf": str(crf), "preset": preset, "threads": str(threads)}
    deadline, cpu_used = VP9_SPEED[preset]  # libvpx-vp9 in constant-quality mode (b=0)
    return {"crf": str(crf), "b": "0", "deadline": deadline, "cpu-used": str(cpu_used), "row-mt": "1",
            "threads": str(threads)}


def transcode(src: Path, dst: Path, short_side: int, fps: float, crf: int = 23, preset: str = "medium",
              threads: int = 0, keyint: int = 0, container: str = "mp4", codec: str = "libx264") -> int:
    """Re-encode src's first video stream to dst (`container` with `codec`, yuv420p, no audio) at `fps` with
    short side `short_side`, a keyframe at least every `keyint` frames (0: the encoder's default, 250 for x264).
    Returns the number of frames written; raises on any decode/encode failure."""
    import av
    from av.video.frame import PictureType

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(src)) as inp:
        if not inp.streams.video:
            raise ValueError("no video stream")
        in_stream = inp.streams.video[0]
        in_stream.thread_type = "AUTO"
        src_fps = float(in_stream.average_rate or in_stream.guessed_rate or 25)
        options = {"movflags": "+faststart"} if container in ("mp4", "mov") else {}  # index first, as web videos
        with av.open(str(dst), "w", format=container, options=options) as out:
            stream = None
            written = 0
            last_src, last_scaled = None, None
            for k, frame in resample_frames(inp.decode(in_stream), src_fps, fps):
                if stream is None:
                    width, height = even_size(frame.width, frame.height, short_side)
                    stream = out.add_stream(codec, rate=rate)
                    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                    stream.options = _codec_options(codec, crf, preset, threads)
                    if keyint > 0:
                        stream.codec_context.gop_size = keyint
                if frame is not last_src:  # a repeated source frame is scaled once
                    last_src = frame
                    last_scaled = frame.reformat(width=stream.width, height=stream.height, format="yuv420p",
                                                 interpolation="AREA")
                last_scaled.pts, last_scaled.time_base = k, 1 / rate
                last_scaled.pict_type = PictureType.NONE  # the encoder places keyframes, not the source's
                for packet in stream.encode(last_scaled):
                    out.mux(packet)
                written += 1
            if stream is None:
                raise ValueError("no frame could be decoded")
            for packet in stream.encode():
                out.mux(packet)
    return written


def partial_path(dst: Path) -> Path:
    """Where an output is written before its rename: hidden, same folder (so os.replace is atomic)."""
    return dst.with_name(f".{dst.name}.part")


def preprocess_one(job: tuple[str, str, dict, dict | None, int, bool]) -> dict:
    """Convert one file unless its output is up to date (see reason_to_convert). Returns {"src", "dst", "status",
    "message", "reason"}; status is converted | skipped | failed. A failure never leaves a file at dst."""
    src, dst, options, recorded, threads, overwrite = job
    src_p, dst_p = Path(src), Path(dst)
    reason = "--overwrite" if overwrite else reason_to_convert(src_p, dst_p, options, recorded)
    if reason is None:
        return {"src": src, "dst": dst, "status": "skipped", "message": "up to date", "reason": None}
    fps = options["fps"]
    keyint = max(1, round(options["keyframe_interval"] * fps)) if options["keyframe_interval"] > 0 else 0
    tmp = partial_path(dst_p)
    try:
        dst_p.parent.mkdir(parents=True, exist_ok=True)
        n = transcode(src_p, tmp, options["short_side"], fps, options["crf"], options["preset"], threads, keyint,
                      options["container"], options["codec"])
        os.replace(tmp, dst_p)
        return {"src": src, "dst": dst, "status": "converted", "message": f"{n} frames", "reason": reason}
    except Exception as e:
        tmp.unlink(missing_ok=True)
        return {"src": src, "dst": dst, "status": "failed", "message": f"{type(e).__name__}: {video_io.one_line(e)}",
                "reason": reason}


def run_preprocess(args: argparse.Namespace) -> int:
    src, dst = Path(args.src).resolve(), Path(args.dst).resolve()
    if not src.is_dir():
        print(f"error: --src {args.src} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    if src == dst:
        print("error: --dst must differ from --src (outputs keep the source names)", file=sys.stderr)
        return EXIT_USAGE
    videos = find_videos(src, exclude=dst)
    outputs = {rel: output_path(dst, rel, args.out_ext) for rel in videos}
    unwritable = unwritable_extensions(outputs.values())
    if unwritable:
        listed = ", ".join(f"{ext or '(none)'} ({n} files)" for ext, n in sorted(unwritable.items()))
        print(f"error: cannot write outputs named {listed}: this tool writes {', '.join(OUTPUT_CONTAINERS)} with "
              f"the encoders this PyAV build has; pass --out_ext mp4", file=sys.stderr)
        return EXIT_USAGE
    threads = 1 if args.workers > 1 else 0  # 0 = the encoder picks; with several workers one thread each
    try:
        recorded = read_manifest(dst)
        rewrite_manifest(dst, recorded)
    except OSError as e:
        print(f"error: --dst {args.dst}: cannot write there ({e.strerror or e})", file=sys.stderr)
        return EXIT_USAGE
    jobs = []
    for rel, out in outputs.items():
        key = out.relative_to(dst).as_posix()
        jobs.append((str(src / rel), str(out), encode_options(args, out.suffix), recorded.get(key), threads,
                     args.overwrite))
    kinds = sorted({f"{o['codec']} in {o['container']} (crf {o['crf']})" for _, _, o, *_ in jobs})
    print(f"preprocessing {len(jobs)} videos from {src} to {dst}: short side {args.short_side}, {args.fps:g} fps, "
          f"keyframe every {args.keyframe_interval:g} s, {', '.join(kinds) or 'no outputs'}, preset {args.preset}, "
          f"{args.workers} worker(s)", flush=True)
    results = []
    with open(dst / MANIFEST, "a") as manifest:
        converted = video_io.with_progress(parallel_map(preprocess_one, jobs, args.workers), len(jobs), "preprocess")
        for (_, out, options, *_), r in zip(jobs, converted):
            if r["status"] == "converted":  # recorded as soon as the output is in place
                manifest.write(json.dumps({"output": Path(out).relative_to(dst).as_posix(), "options": options})
                               + "\n")
                manifest.flush()
            results.append(r)
    counts = {s: sum(r["status"] == s for r in results) for s in ("converted", "skipped", "failed")}
    for r in results:
        if r["status"] == "failed":
            print(f"  FAILED {os.path.relpath(r['src'], src)}: {r['message']}")
    redone = [r for r in results if r["status"] == "converted" and r["reason"].startswith("options changed")]
    if redone:
        print(f"  {len(redone)} output(s) redone because their options changed (e.g. "
              f"{os.path.relpath(redone[0]['dst'], dst)}: {redone[0]['reason'][len('options changed: '):]})")
    print(f"converted {counts['converted']}, skipped {counts['skipped']} (up to date), failed {counts['failed']}")
    if args.report:
        write_json(args.report, {"src": str(src), "dst": str(dst), "counts": counts, "results": results})
    return EXIT_ERRORS if counts["failed"] else EXIT_OK


# ======================================================================= CLI

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _even_int(text: str) -> int:
    value = _positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even (yuv420p needs even sizes), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    default_workers = max(1, min(8, os.cpu_count() or 1))
    parser = argparse.ArgumentParser(prog="video_tools.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,preprocess}")

    c = sub.add_parser(
        "check", help="decode every video of an annotation file and report broken or too-short ones",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Open every video an annotation file names (any format annotations.read_annotations reads), with the "
            "backend training will use, read its frame count and decode its first, middle and last frames.", 100),
        epilog="categories:\n"
               "  missing      error    the file does not exist\n"
               "  empty        error    zero bytes\n"
               "  truncated    error    an MP4/MOV cut short (a box runs past the end, or no index)\n"
               "  undecodable  error    cannot be opened, or its first/middle/last frames fail to decode\n"
               "  short        warning  fewer than num_frames x sampling_rate frames; it still loads (clip\n"
               "                        indices are clamped, so its last frame repeats)\n"
               "errors are videos the training loader skips (and evaluation refuses).\n"
               "exit status:\n"
               "  0  every video is fine\n"
               "  1  at least one error (missing / empty / undecodable / truncated)\n"
               "  2  usage error, or the annotation file cannot be read\n"
               "  3  no errors, but short videos (0 with --allow_short)")
    c.add_argument("--anno", required=True, help="annotation file (WebVid CSV, JSON dict/list, MSR-VTT CSV)")
    c.add_argument("--data_root", default=None, help="folder the annotation's video paths are relative to")
    c.add_argument("--num_frames", type=_positive_int, default=16, help="frames per clip (default 16)")
    c.add_argument("--sampling_rate", type=_positive_int, default=4, help="frame stride (default 4)")
    c.add_argument("--video_backend", default="auto", choices=["auto", "decord", "pyav"],
                   help="decoder to check with; use the one training will use (default auto)")
    c.add_argument("--workers", type=_positive_int, default=default_workers,
                   help=f"processes (default {default_workers})")
    c.add_argument("--full_decode", action="store_true",
                   help="decode every frame, not only first/middle/last (slower; finds corruption mid-file)")
    c.add_argument("--allow_short", action="store_true", help="exit 0 when short videos are the only problem")
    c.add_argument("--report", default=None, help="also write every problem to this JSON file (training takes it "
                   "as --exclude_list: its unreadable videos are never opened)")
    c.add_argument("--max_listed", type=int, default=200, help="problems printed (all go to --report; default 200)")
    c.set_defaults(func=run_check)

    p = sub.add_parser(
        "preprocess", help="re-encode a folder of videos to a small short side and frame rate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
                    "Re-encode every video under --src (recursively) to --dst, keeping relative paths: short side "
                    "--short_side (aspect kept, even sizes), --fps frames per second, yuv420p, no audio, in the "
                    "container the output's extension names: .mp4/.m4v/.mov/.mkv/.avi hold H.264, .webm holds VP9. "
                    "Each output's options are recorded in <dst>/" + MANIFEST + "; an output newer than its source "
                    "and made with the same options is skipped, any other is redone, so an interrupted run (or one "
                    "with new options) can simply be started again. Each output is written to a hidden .part file "
                    "and renamed when complete; new files get the permissions the umask gives.", 100),
        epilog="exit status: 0 all converted or up to date, 1 some videos failed (listed), 2 usage error (also: "
               "an output extension with no container or encoder here)")
    p.add_argument("--src", required=True, help="folder of source videos")
    p.add_argument("--dst", required=True, help="output folder (created)")
    p.add_argument("--short_side", type=_even_int, default=256, help="output short side in pixels (default 256)")
    p.add_argument("--fps", type=_positive_float, default=8.0, help="output frame rate (default 8)")
    p.add_argument("--crf", type=int, default=None,
                   help="quality, lower is better/larger, on the codec's own scale (default: 23 for H.264, "
                        "32 for VP9)")
    p.add_argument("--preset", default="medium", choices=X264_PRESETS,
                   help="x264 speed preset; for VP9 the same speed as libvpx deadline/cpu-used (default medium)")
    p.add_argument("--keyframe_interval", type=float, default=2.0,
                   help="seconds between keyframes; a clip is decoded from the keyframe before it, so a short "
                        "interval speeds up loading long videos for some file size (default 2; 0 = the "
                        "encoder's own interval, 250 frames for x264)")
    p.add_argument("--out_ext", default="keep",
                   help="output extension, which decides the container: mp4, m4v, mov, mkv, avi (H.264) or webm "
                        "(VP9); 'keep' (default) keeps names so annotations stay valid (a source of another type "
                        "then needs --out_ext)")
    p.add_argument("--workers", type=_positive_int, default=default_workers,
                   help=f"processes (default {default_workers})")
    p.add_argument("--overwrite", action="store_true",
                   help="convert even when the output is up to date (default: off)")
    p.add_argument("--report", default=None, help="also write every file's result to this JSON file")
    p.set_defaults(func=run_preprocess)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
