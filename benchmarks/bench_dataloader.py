"""Throughput of the pre-training data loader: clips/s for decord vs PyAV, 0 and 2 worker processes.

    .venv/bin/python benchmarks/bench_dataloader.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_dataloader.py --quick    # a short run (its own 24-video synthetic set)
    .venv/bin/python benchmarks/bench_dataloader.py --profile  # also time each stage of one sample
    .venv/bin/python benchmarks/bench_dataloader.py --quick --sets 640x360 --compare_readers

What is timed is the real training path: VideoTextDataset("train") with the tube mask generator ->
VideoTextCollator (tokenizer + 75% text masking) -> torch DataLoader, after a warm-up, for a fixed number of
batches. Two data sets:
  synthetic  data/synthetic (synthetic_dataset.py defaults: 128x128, 32 frames @ 8 fps), the demo's clips:
             8 frames x rate 4 at 112 px;
  640x360    longer videos like WebVid's (10 s @ 30 fps, H.264 640x360 ~1 Mbit/s, x264's default keyframe
             interval of 250 frames; written once to data/bench_cache): 16 frames x rate 4 at 224 px, the
             paper's clips. Target: >= 14 clips/s per loading process (the release's loader: about 7 on a
             640x272 file).
  640x360-pre  the same files after `video_tools.py preprocess --short_side 256 --fps 8 --keyframe_interval 2`
             (data/bench_cache/pre_256_8fps), 16 frames x rate 1 at 224 px: the same 2 s of video per clip.
With --release_src DIR (a checkout of the public SimVTP release, github:wufeim/SimVTP at 4b54321) the release's own
pre-training dataset (decord, its multi-scale crop and tube mask; benchmarks/release_simvtp.py) reads the same files
with the same clip settings in one process, in the same run, and the ratios to our 0-worker rows are printed
(target: ours >= 2x). Its items are timed without collate (it tokenises in the training step), ours with it.
Every loading process gets one torch thread (torch.set_num_threads(1), as data-loader workers have), so "per
process" is clips/s / max(1, workers). Rows with --decode_threads above 1 (tried with 0 workers only) let the video
decoder use that many threads, i.e. that many cores for one process: the single-process case (a laptop, the demo).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# bench_common first: it puts the repository's modules on sys.path
from bench_common import REPO
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import annotations  # noqa: E402
import datasets  # noqa: E402
import masking_generator  # noqa: E402
import video_io  # noqa: E402
import video_transforms  # noqa: E402

TARGET_CLIPS_PER_S = 14.0
SETS = ("synthetic", "640x360", "640x360-pre")  # -pre: the 640x360 files after `video_tools.py preprocess`
PREPROCESS = ["--short_side", "256", "--fps", "8", "--keyframe_interval", "2"]
BENCH_VIDEOS = dict(version=2, num_videos=8, seconds=10, fps=30, width=640, height=360, crf=23, preset="medium")


# ------------------------------------------------------------------------------------ bench videos (640x360)

def render_frames(seed: int, num_frames: int, width: int, height: int):
    """Yield uint8 RGB [H, W, 3] frames with web-video-like content: a textured scene under a camera pan, three
    moving objects and a lighting drift (so H.264 has real texture and motion to code)."""
    import cv2

    rng = np.random.default_rng(seed)
    big_h, big_w = height + 160, width + 480
    coarse = rng.integers(0, 256, (big_h // 4, big_w // 4, 3), dtype=np.uint8)
    coarse = cv2.resize(cv2.GaussianBlur(coarse, (0, 0), 1.5), (big_w, big_h), interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.integers(0, 256, (big_h, big_w, 3), dtype=np.uint8), (0, 0), 0.8)
    scene = cv2.addWeighted(coarse, 0.4, fine, 0.6, 0)  # about 1 Mbit/s at crf 23, like web videos of this size
    speed = rng.uniform(0.8, 2.5, size=2)
    for t in range(num_frames):
        x0 = int(t * speed[0]) % (big_w - width)
        y0 = int(40 + 40 * np.sin(t / 40.0))
        frame = scene[y0:y0 + height, x0:x0 + width].copy()
        for k in range(3):
            cx = int((width * (0.2 + 0.3 * k) + t * speed[1] * (3 if k else -2)) % width)
            cy = int(height / 2 + height / 4 * np.sin(t / (15.0 + 10 * k)))
            cv2.circle(frame, (cx, cy), 30 + 10 * k, (255 - 80 * k, 60 * k, 200), -1)
        yield cv2.convertScaleAbs(frame, alpha=0.85 + 0.15 * np.sin(t / 50.0))


def write_bench_video(job: tuple[str, int, dict]) -> str:
    """Encode one bench video with PyAV/libx264 to a .part file, then rename (never a half-written mp4)."""
    import av

    path, seed, opts = job
    tmp = Path(path).with_name(f".{Path(path).name}.part")
    with av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=opts["fps"])
        stream.width, stream.height, stream.pix_fmt = opts["width"], opts["height"], "yuv420p"
        stream.options = {"crf": str(opts["crf"]), "preset": opts["preset"]}
        for img in render_frames(seed, opts["seconds"] * opts["fps"], opts["width"], opts["height"]):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)
    return path


def ensure_bench_videos(root: Path, workers: int = 2) -> Path:
    """Write the 640x360 bench videos and their annotation file once (reused when the manifest matches);
    returns the annotation file (Singularity JSON list, paths relative to root)."""
    manifest, anno = root / "manifest.json", root / "annotations.json"
    if manifest.is_file() and anno.is_file() and json.loads(manifest.read_text()) == BENCH_VIDEOS:
        return anno
    root.mkdir(parents=True, exist_ok=True)
    names = [f"video_{i:02d}.mp4" for i in range(BENCH_VIDEOS["num_videos"])]
    print(f"writing {len(names)} bench videos ({BENCH_VIDEOS['seconds']} s, {BENCH_VIDEOS['width']}x"
          f"{BENCH_VIDEOS['height']} @ {BENCH_VIDEOS['fps']} fps) to {root} ...", flush=True)
    t0 = time.time()
    jobs = [(str(root / n), i, BENCH_VIDEOS) for i, n in enumerate(names)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write_bench_video, jobs))
    anno.write_text(json.dumps([{"video": n, "caption": f"a camera pans over a textured scene, clip {i}"}
                                for i, n in enumerate(names)], indent=1))
    manifest.write_text(json.dumps(BENCH_VIDEOS))  # last: a half-built cache is rebuilt
    print(f"  done in {time.time() - t0:.0f} s", flush=True)
    return anno


# ------------------------------------------------------------------------------------------------- timing

def build_loader(records, backend: str, workers: int, batch_size: int, num_batches: int, clip: dict,
                 tokenizer, decode_threads: int = 1, clips_per_video: int = 1) -> torch.utils.data.DataLoader:
    """The training loader (as run_simvtp_pretraining.py builds it), drawing num_batches batches with
    replacement so that a small set still gives one long epoch (no worker restarts inside the timing). A batch
    holds batch_size clips: batch_size / clips_per_video videos read once each."""
    grid = (clip["num_frames"] // 2, clip["input_size"] // 16, clip["input_size"] // 16)
    dataset = datasets.VideoTextDataset(
        records, mode="train", num_frames=clip["num_frames"], sampling_rate=clip["sampling_rate"],
        input_size=clip["input_size"], video_backend=backend, seed=0, decode_threads=decode_threads,
        clips_per_video=clips_per_video, mask_generator=masking_generator.build_mask_generator("tube", grid, 0.9))
    collator = datasets.VideoTextCollator(tokenizer, max_text_len=32, text_mask_ratio=0.75, seed=0)
    videos = batch_size // clips_per_video
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=num_batches * videos,
                                             generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(dataset, batch_size=videos, sampler=sampler, num_workers=workers,
                                       collate_fn=collator, drop_last=True)


def time_loader(loader, warmup: int, timed: int, batch_size: int) -> tuple[float, float]:
    """(clips/s, seconds) over `timed` batches after `warmup` untimed ones (worker start-up, first opens)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(timed):
        batch = next(it)
        assert batch["video"].shape[0] == batch_size
    seconds = time.perf_counter() - t0
    del it
    return timed * batch_size / seconds, seconds


# ------------------------------------------------------------------------------------------------ profile

def profile_stages(records, backend: str, clip: dict, samples: int, tokenizer) -> dict[str, float]:
    """Milliseconds per clip of each stage of one training sample, in this process, one thread: open, decode
    the sampled frames (to RGB), crop + resize, to channels-first uint8 (normalising happens on the device, after
    the loader), tube mask, and collate per clip."""
    from video_transforms import _channels_first, _resize  # internal steps of train_clip_transform, timed separately

    stages = dict.fromkeys(("open", "decode", "crop+resize", "channels-first", "video mask", "collate"), 0.0)
    grid = (clip["num_frames"] // 2, clip["input_size"] // 16, clip["input_size"] // 16)
    masker = masking_generator.build_mask_generator("tube", grid, 0.9)
    collator = datasets.VideoTextCollator(tokenizer, max_text_len=32, text_mask_ratio=0.75)
    size = clip["input_size"]
    items = []

    def tick(name: str, t0: float) -> float:
        now = time.perf_counter()
        stages[name] += now - t0
        return now

    for i in range(samples):
        record = records[i % len(records)]
        t = time.perf_counter()
        video = video_io.open_video(record.path, backend)
        t = tick("open", t)
        idx = video_transforms.stride_frame_indices(video.num_frames, clip["num_frames"], clip["sampling_rate"],
                                                    video_transforms.sample_rng(0, 0, i, "frames"))
        frames = video.get_frames(idx)
        video.close()
        t = tick("decode", t)
        top, left, h, w = video_transforms.multi_scale_crop_box(frames.shape[1], frames.shape[2], size,
                                                                video_transforms.sample_rng(0, 0, i, "crop"))
        resized = _resize(frames[:, top:top + h, left:left + w], (size, size))
        t = tick("crop+resize", t)
        out = _channels_first(resized)
        t = tick("channels-first", t)
        mask = torch.from_numpy(masker(video_transforms.sample_rng(0, 0, i, "video_mask")))
        t = tick("video mask", t)
        items.append({"video": out, "caption": record.captions[0], "index": i, "epoch": 0,
                      "video_mask": mask})
    for start in range(0, len(items), 8):
        t = time.perf_counter()
        collator(items[start:start + 8])
        tick("collate", t)
    return {k: 1000 * v / samples for k, v in stages.items()}


def print_profile(name: str, backend: str, clip: dict, stages: dict[str, float], frame_hw: tuple[int, int]) -> None:
    total = sum(stages.values())
    print(f"\nprofile: {name}, {backend}, {clip['num_frames']} frames x rate {clip['sampling_rate']} -> "
          f"{clip['input_size']} px (source {frame_hw[1]}x{frame_hw[0]}), ms per clip, 1 thread")
    for k, v in stages.items():
        print(f"  {k:<12}{v:8.1f} ms  {100 * v / total:5.1f}%")
    print(f"  {'total':<12}{total:8.1f} ms  -> {1000 / total:.1f} clips/s per process")


# ------------------------------------------------------------------------- reader comparison (a proposal)

def proposed_pyav_frames(path: str, indices: list[int]) -> np.ndarray:
    """A faster PyAV clip reader, proposed for video_io._PyAVVideo (not used by training): uint8 [T, H, W, 3].

    Same seek as datasets (keyframe before the first wanted frame), plus two changes:
    1. skip_frame is set per packet: "NONREF" for frames not wanted (the decoder then drops non-reference
       B-frames, which nothing else needs), "DEFAULT" for wanted ones; reference frames are always decoded,
       so the pictures are bit-identical;
    2. one VideoReformatter per video: frame.to_ndarray() builds a new swscale context for every frame
       (~1-3 ms at 640x360), a shared reformatter reuses it (~0.1 ms).
    (The sketch leaves out datasets' handling of frames without a timestamp and of short streams.)"""
    import av
    from av.video.reformatter import VideoReformatter

    with av.open(path) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        codec.thread_count = 1
        fps, tb, start = float(stream.average_rate), stream.time_base, stream.start_time or 0
        wanted = set(indices)
        if min(wanted) > 0:
            container.seek(start + int(min(wanted) / fps / tb), stream=stream, backward=True, any_frame=False)
        to_rgb, out = VideoReformatter(), {}
        for packet in container.demux(stream):
            if packet.pts is not None:
                codec.skip_frame = "DEFAULT" if round(float((packet.pts - start) * tb) * fps) in wanted else "NONREF"
            for frame in codec.decode(packet if packet.size else None):
                i = round(float((frame.pts - start) * tb) * fps)
                if i in wanted and i not in out:
                    out[i] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
            if len(out) == len(wanted):
                break
        return np.stack([out[i] for i in indices])


def compare_readers(name: str, records, clip: dict, samples: int) -> None:
    """ms per clip of datasets' decord and PyAV readers vs proposed_pyav_frames, on the same sampled clips;
    checks that the proposal returns the same pixels as datasets' PyAV reader."""
    jobs = []
    for i in range(samples):
        path = records[i % len(records)].path
        with video_io.open_video(path, "pyav") as v:
            n = v.num_frames
        jobs.append((path, video_transforms.stride_frame_indices(n, clip["num_frames"], clip["sampling_rate"],
                                                                 video_transforms.sample_rng(0, 0, i, "frames"))))

    def via_datasets(backend):
        def read(path, idx):
            with video_io.open_video(path, backend) as v:
                return v.get_frames(idx)
        return read

    for path, idx in jobs[:4]:
        assert np.array_equal(proposed_pyav_frames(path, idx), via_datasets("pyav")(path, idx)), path
    print(f"\nreaders: {name}, {clip['num_frames']} frames x rate {clip['sampling_rate']}, open + decode to RGB, "
          f"ms per clip, 1 thread ({samples} clips)")
    for label, read in [("datasets decord", via_datasets("decord")), ("datasets pyav", via_datasets("pyav")),
                        ("proposed pyav", proposed_pyav_frames)]:
        t0 = time.perf_counter()
        for path, idx in jobs:
            read(path, idx)
        print(f"  {label:<16}{1000 * (time.perf_counter() - t0) / len(jobs):8.1f} ms")


# --------------------------------------------------------------------------------------------------- main

def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer batches (about a minute)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 20, quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 3, quick 2)")
    p.add_argument("--backends", nargs="+", default=["decord", "pyav"], choices=["decord", "pyav"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader num_workers to try")
    p.add_argument("--decode_threads", nargs="+", type=int, default=[1, 2],
                   help="decoder threads per video to try (rows with more than 1 use that many cores per process)")
    p.add_argument("--clips_per_video", nargs="+", type=int, default=[1],
                   help="repeated sampling (run_simvtp_pretraining.py --clips_per_video) to try, with 0 workers "
                   "and 1 decoder thread: clips from one read of a video; each must divide --batch_size")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--data_dir", default=str(REPO / "data"), help="holds synthetic/ and bench_cache/")
    p.add_argument("--profile", action="store_true",
                   help="time each stage of a sample (always done for 640x360 below target)")
    p.add_argument("--profile_samples", type=int, default=24)
    p.add_argument("--release_src", default=None,
                   help="a checkout of the SimVTP release: also time its loader on the same files (same run)")
    p.add_argument("--compare_readers", action="store_true",
                   help="time datasets' readers against the proposed faster PyAV reader (see proposed_pyav_frames)")
    args = p.parse_args(argv)
    args.batches = args.batches or (6 if args.quick else 20)
    args.warmup = args.warmup or (2 if args.quick else 3)
    if any(c < 1 or args.batch_size % c for c in args.clips_per_video):
        p.error(f"every --clips_per_video must divide --batch_size {args.batch_size}")
    return args


def bench_sets(args: argparse.Namespace) -> dict[str, tuple[list, dict]]:
    """name -> (records, clip settings)."""
    import synthetic_dataset

    data = Path(args.data_dir)
    sets = {}
    if "synthetic" in args.sets:  # --quick: a small set of its own (the demo's has hundreds of videos to build)
        root = (synthetic_dataset.ensure_synthetic_dataset(data / "synthetic_quick", num_train=16, num_val=4,
                                                           num_test=4, verbose=False)
                if args.quick else synthetic_dataset.ensure_synthetic_dataset(data / "synthetic"))
        sets["synthetic"] = (annotations.read_annotations(root / "annotations" / "pretrain.json", root),
                             dict(num_frames=8, sampling_rate=4, input_size=112))
    if "640x360" in args.sets or "640x360-pre" in args.sets:
        cache = data / "bench_cache"
        anno = ensure_bench_videos(cache)
        if "640x360" in args.sets:
            # 8 files listed 32 times: every sample index draws its own clip start, as in a large set
            records = annotations.read_annotations(anno, cache)
            sets["640x360"] = ([r for _ in range(32) for r in records],
                               dict(num_frames=16, sampling_rate=4, input_size=224))
        if "640x360-pre" in args.sets:
            # 30 fps with stride 4 ~ 8 fps with stride 1: the same 2 s of video per clip
            import video_tools
            pre = cache / "pre_256_8fps"
            if video_tools.main(["preprocess", "--src", str(cache), "--dst", str(pre), "--workers", "2",
                                 *PREPROCESS]) != 0:
                raise RuntimeError("video_tools.py preprocess failed on the bench videos")
            records = annotations.read_annotations(anno, pre)
            sets["640x360-pre"] = ([r for _ in range(32) for r in records],
                                   dict(num_frames=16, sampling_rate=1, input_size=224))
    return sets


def main(argv=None) -> list[dict]:
    args = get_args(argv)
    torch.set_num_threads(1)  # one core per loading process, like DataLoader workers (see the docstring)
    tokenizer = datasets.build_tokenizer()
    sets = bench_sets(args)
    print(f"\nbatch {args.batch_size}, {args.warmup} warm-up + {args.batches} timed batches per row, "
          f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} before the run: other processes "
          f"slow the figures), torch {torch.__version__}\n")
    header = (f"{'set':<12} {'clip':<16} {'backend':<7} {'workers':>7} {'threads':>7} {'per read':>8} {'clips/s':>8} "
              f"{'per proc':>9}  target")
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for name, (records, clip) in sets.items():
        for backend, workers, threads, per_read in [
                (b, w, t, c) for b in args.backends for w in args.workers for t in args.decode_threads
                for c in args.clips_per_video if (w == 0 or t == 1) and (c == 1 or (w == 0 and t == 1))]:
                loader = build_loader(records, backend, workers, args.batch_size, args.warmup + args.batches,
                                      clip, tokenizer, threads, per_read)
                rate, _ = time_loader(loader, args.warmup, args.batches, args.batch_size)
                per_process = rate / max(1, workers)
                target = ""
                if name.startswith("640x360"):
                    target = f">= {TARGET_CLIPS_PER_S:.0f} {'ok' if per_process >= TARGET_CLIPS_PER_S else 'BELOW'}"
                clip_txt = f"{clip['num_frames']}x{clip['sampling_rate']} @ {clip['input_size']}"
                print(f"{name:<12} {clip_txt:<16} {backend:<7} {workers:>7} {threads:>7} {per_read:>8} {rate:8.1f} "
                      f"{per_process:9.1f}  {target}", flush=True)
                rows.append(dict(set=name, backend=backend, workers=workers, decode_threads=threads,
                                 clips_per_video=per_read, clips_per_s=rate, per_process=per_process, **clip))
    for name, (records, clip) in sets.items():
        below = name.startswith("640x360") and any(r["per_process"] < TARGET_CLIPS_PER_S
                                                   for r in rows if r["set"] == name)
        if args.profile or below:
            with video_io.open_video(records[0].path) as v:
                hw = v.get_frames([0]).shape[1:3]
            for backend in args.backends:
                print_profile(name, backend, clip, profile_stages(records, backend, clip, args.profile_samples,
                                                                  tokenizer), hw)
        if args.compare_readers and name != "synthetic":
            compare_readers(name, records, clip, args.profile_samples)
    if args.release_src:
        compare_with_release(args, sets, rows)
    return rows


RELEASE_TARGET = 2.0  # ours (one process) over the release's clips/s on the same files


def compare_with_release(args: argparse.Namespace, sets: dict, rows: list[dict]) -> None:
    """The release's loader on each set's files in its own interpreter, then ours / theirs per backend."""
    import tempfile

    from bench_common import print_table, require_release_checkout, run_job_in_subprocess

    script = str(Path(__file__).with_name("release_simvtp.py"))
    require_release_checkout(args.release_src)
    table = []
    with tempfile.TemporaryDirectory(prefix="bench_release_loader_") as folder:
        for name, (records, clip) in sets.items():
            anno = os.path.join(folder, f"{name}.json")
            with open(anno, "w") as f:  # the release's format: {video path: caption}
                json.dump({str(r.path): r.captions[0] for r in records}, f)
            job = dict(kind="loader", src=args.release_src, vocab_dir=str(REPO / "assets" / "bert-base-uncased"),
                       annotation=anno, num_frames=clip["num_frames"], sampling_rate=clip["sampling_rate"],
                       input_size=clip["input_size"], warmup=args.warmup * args.batch_size,
                       clips=args.batches * args.batch_size)
            print(f"\nthe release's loader on {name} ...", flush=True)
            theirs = run_job_in_subprocess(script, job, os.path.join(folder, f"{name}.out.json"),
                                           f"release loader {name}")["clips_per_s"]
            for r in rows:
                if r["set"] == name and r["workers"] == 0:
                    ratio = r["clips_per_s"] / theirs
                    table.append([name, r["backend"], str(r["decode_threads"]), str(r["clips_per_video"]),
                                  f"{theirs:.1f}",
                                  f"{r['clips_per_s']:.1f}", f"{ratio:.2f}x", "PASS" if ratio >= RELEASE_TARGET
                                  else "MISS"])
    print(f"\nThe release's loader vs ours, one process, same files and clips, this run (target >= "
          f"{RELEASE_TARGET:.0f}x)")
    print("(the release decodes with one thread; a row with 2 decoder threads uses 2 cores; a row with 2 clips per "
          "read is repeated sampling, --clips_per_video 2, a method option, not the paper's default)")
    print_table(["set", "ours with", "threads", "clips per read", "release clips/s", "ours clips/s", "ours faster",
                 "target"], table, left=2)


if __name__ == "__main__":
    main()
