"""Embedded synthetic video-text dataset: moving coloured shapes on coloured backgrounds, as real H.264 mp4s.

Why: the whole pipeline (annotation formats, decoding, sampling, pre-training, retrieval) must run end to end on
a CPU in minutes with nothing downloaded. The captions come from a small grammar; some of them can only be
matched by looking at more than one frame ("moves left" vs "moves right", "rises" vs "falls", "grows" vs
"shrinks"), so a model that ignores time cannot solve retrieval on it.

Build (only when absent; the manifest is written last, so a half-built set is rebuilt)::

    python synthetic_dataset.py --out data/synthetic            # default: 320 / 48 / 64 clips, 32 frames @ 8 fps
    python synthetic_dataset.py --out /tmp/syn --num_train 24 --num_val 8 --num_test 8 --frames 16 --size 64

or from Python: ``ensure_synthetic_dataset("data/synthetic", num_train=24, ...) -> Path``.

Layout (``<root>`` = the --out directory; give it as ``--data_root`` for every annotation file below)::

    <root>/manifest.json                  build options, counts, codec, build time; written last
    <root>/train/train_00000.mp4 ...      one mp4 per clip (H.264 yuv420p; mpeg4 if libx264 is missing)
    <root>/val/val_00000.mp4 ...
    <root>/test/test_00000.mp4 ...
    <root>/annotations/train_webvid.csv   WebVid-2M CSV (videoid,contentUrl,duration,page_dir,name) of train;
                                          video = <root>/<page_dir>/<videoid>.mp4, page_dir = "train"
    <root>/annotations/pretrain.json      the release's JSON dict {"train/train_00000.mp4": caption} (train)
    <root>/annotations/train.json         Singularity/SViTT list [{"video": path, "caption": [2-5 paraphrases]}]
    <root>/annotations/val.json           same, val split (model selection)
    <root>/annotations/test.json          same, test split
    <root>/annotations/test_1k.csv        MSR-VTT 1k-A CSV (key,vid_key,video_id,sentence), test split, one
                                          caption per video; video = <root>/<video_id>.mp4, video_id = "test/test_00000"
    <root>/annotations/metadata.json      per clip: split, colour, shape, size, motion, background, captions
    <root>/annotations/qa_train.json      Singularity QA list [{"video", "question", "answer", "question_id",
    <root>/annotations/qa_val.json        "answer_type"}]: four questions per clip (shape colour, background
    <root>/annotations/qa_test.json       colour, shape, motion) asked from its attributes
    <root>/annotations/qa_answer_list.json  the closed answer list (every colour, shape and motion word)

Every clip is a pure function of (seed, split, clip number): the same seed gives byte-identical pixels and
captions, and growing one split does not change the clips of another.
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT_VERSION = 2  # 2: the QA files (clips and the other files unchanged)
SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
MANIFEST = "manifest.json"
ANNOTATION_FILES = ("train_webvid.csv", "pretrain.json", "train.json", "val.json", "test.json", "test_1k.csv",
                    "metadata.json")
QA_ANNOTATION_FILES = ("qa_train.json", "qa_val.json", "qa_test.json", "qa_answer_list.json")  # datasets.read_qa_*

DEFAULTS: dict[str, Any] = dict(num_train=320, num_val=48, num_test=64, num_frames=32, fps=8, width=128,
                                height=128, seed=0, codec="auto")

# ----------------------------------------------------------------------------------------------- the grammar

# name -> (RGB, words used in captions; the first is the canonical one)
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((220, 40, 40), ("red",)),
    "green": ((40, 170, 60), ("green",)),
    "blue": ((40, 80, 225), ("blue",)),
    "yellow": ((240, 215, 40), ("yellow",)),
    "purple": ((145, 60, 185), ("purple", "violet")),
    "orange": ((250, 140, 30), ("orange",)),
    "white": ((240, 240, 240), ("white",)),
    "black": ((25, 25, 25), ("black",)),
    "gray": ((128, 128, 128), ("gray", "grey")),
}
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
SIZES: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
# motion -> (finite verb phrase, participle phrase) paraphrases. left/right, up/down and grow/shrink pairs are
# the captions that one frame cannot tell apart.
MOTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "left": (("moves to the left", "moving to the left"), ("slides left", "sliding left"),
             ("drifts leftward", "drifting leftward"), ("travels towards the left", "travelling towards the left")),
    "right": (("moves to the right", "moving to the right"), ("slides right", "sliding right"),
              ("drifts rightward", "drifting rightward"),
              ("travels towards the right", "travelling towards the right")),
    "up": (("moves up", "moving up"), ("rises", "rising"), ("floats upward", "floating upward"),
           ("travels towards the top", "travelling towards the top")),
    "down": (("moves down", "moving down"), ("falls", "falling"), ("sinks downward", "sinking downward"),
             ("drops towards the bottom", "dropping towards the bottom")),
    "grow": (("grows", "growing"), ("gets bigger", "getting bigger"), ("expands", "expanding"),
             ("swells", "swelling")),
    "shrink": (("shrinks", "shrinking"), ("gets smaller", "getting smaller"), ("contracts", "contracting"),
               ("dwindles", "dwindling")),
}
# answer_type -> question. The motion question names the kind of motion (a move, or a change of size) but not its
# direction: the direction needs more than one frame (a middle frame alone shows neither where the shape goes nor
# whether it grows; the first frame of a grow/shrink clip does show its start size).
QA_QUESTIONS: dict[str, str] = {
    "colour": "what colour is the shape?",
    "background": "what colour is the background?",
    "shape": "what shape is it?",
    "direction": "which way does the shape move?",
    "size_change": "does the shape grow or shrink?",
}
# Words of each motion that a single frame cannot reveal (tests check the captions carry them).
DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "leftward"), "right": ("right", "rightward"),
    "up": ("up", "rises", "rising", "upward", "top"), "down": ("down", "falls", "falling", "downward", "bottom"),
    "grow": ("grows", "growing", "bigger", "expands", "expanding", "swells", "swelling"),
    "shrink": ("shrinks", "shrinking", "smaller", "contracts", "contracting", "dwindles", "dwindling"),
}
# decord 0.6.0 misreads frames of these widths (its buffer copy fails); PyAV is fine. Refused, so that a built
# set is readable by the default backend.
DECORD_BAD_WIDTHS = (16, 24, 48, 72)
# {np}: noun phrase ("a small red circle"), {vp}/{ving}: finite/participle motion, {a_bg}: "a blue", "an orange".
TEMPLATES: tuple[str, ...] = (
    "{np} {vp} on {a_bg} background",
    "on {a_bg} background, {np} {vp}",
    "{np} {vp} against {a_bg} backdrop",
    "{np} {ving} over {a_bg} background",
    "{a_bg} background with {np} {ving}",
    "there is {np} {ving} on {a_bg} background",
    "{ving}, {np} on {a_bg} background",
)


@dataclass
class ClipSpec:
    """Everything needed to render one clip and to caption it (positions and radii in pixels)."""
    video_id: str
    split: str
    colour: str
    background: str
    shape: str
    size: str
    motion: str
    start: tuple[float, float]  # centre (x, y) at the first frame
    end: tuple[float, float]  # centre at the last frame
    radius: tuple[float, float]  # radius at the first and last frame
    captions: list[str] = field(default_factory=list)

    @property
    def rel_path(self) -> str:
        return f"{self.split}/{self.video_id}.mp4"


def word_groups() -> dict[str, list[str]]:
    """The caption words that only the video can give, by kind (colour words name the object or the background;
    motion words are those a single frame cannot reveal): what a cross-modal probe should find the video helps."""
    return {"colour": [w for _, words in COLOURS.values() for w in words],
            "shape": [w for words in SHAPES.values() for w in words],
            "size": [w for words in SIZES.values() for w in words],
            "motion": [w for words in DIRECTION_WORDS.values() for w in words]}


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one clip: a pure function of (seed, split, clip number)."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


def with_article(words: str, det: str = "a") -> str:
    """"a" -> "an" before a vowel ("an orange"); other determiners unchanged."""
    if det == "a" and words[:1] in "aeiou":
        det = "an"
    return f"{det} {words}"


def noun_phrase(spec: ClipSpec, rng: np.random.Generator, det: str | None = None) -> str:
    det = det or str(rng.choice(["a", "the", "one"]))
    colour = rng.choice(COLOURS[spec.colour][1])
    shape = rng.choice(SHAPES[spec.shape])
    # grow/shrink change the size during the clip, so a size word would contradict half of it
    size = "" if spec.motion in ("grow", "shrink") else rng.choice(SIZES[spec.size]) + " "
    return with_article(f"{size}{colour} {shape}", det)


def make_caption(spec: ClipSpec, rng: np.random.Generator) -> str:
    """One paraphrase: template, synonyms and word order drawn from rng."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    vp, ving = MOTIONS[spec.motion][int(rng.integers(len(MOTIONS[spec.motion])))]
    # "a blue background with the ..." and "there is the ..." read oddly: those templates take "a"
    np_ = noun_phrase(spec, rng, det="a" if ("background with" in template or "there is" in template) else None)
    a_bg = with_article(str(rng.choice(COLOURS[spec.background][1])))
    caption = template.format(np=np_, vp=vp, ving=ving, a_bg=a_bg)
    return caption[0].upper() + caption[1:]


def make_captions(spec: ClipSpec, rng: np.random.Generator, low: int = 2, high: int = 5) -> list[str]:
    """low..high distinct paraphrases of the same clip (the retrieval sets list several per video)."""
    want = int(rng.integers(low, high + 1))
    captions: list[str] = []
    for _ in range(50 * want):
        c = make_caption(spec, rng)
        if c not in captions:
            captions.append(c)
        if len(captions) == want:
            break
    return captions


def sample_spec(seed: int, split: str, index: int, width: int, height: int) -> ClipSpec:
    """Draw the attributes, the trajectory and the captions of clip `index` of `split`."""
    rng = clip_rng(seed, split, index)
    names = list(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    background = [n for n in names if n != colour][int(rng.integers(len(names) - 1))]
    shape = list(SHAPES)[int(rng.integers(len(SHAPES)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
    side = min(width, height)
    small, large = rng.uniform(0.08, 0.11) * side, rng.uniform(0.17, 0.22) * side
    if motion in ("grow", "shrink"):
        size = "changing"
        r0, r1 = (small, large) if motion == "grow" else (large, small)
        margin = large + 1
        c = (rng.uniform(margin, width - margin), rng.uniform(margin, height - margin))
        start, end = c, c
    else:
        r0 = r1 = small if size == "small" else large
        margin = r0 + 1
        horizontal = motion in ("left", "right")
        extent = width if horizontal else height
        travel = rng.uniform(0.35, 0.5) * extent
        lo = rng.uniform(margin, max(margin, extent - margin - travel))
        a, b = (lo, lo + travel) if motion in ("right", "down") else (lo + travel, lo)
        other = rng.uniform(margin, (height if horizontal else width) - margin)
        start, end = ((a, other), (b, other)) if horizontal else ((other, a), (other, b))
    spec = ClipSpec(f"{split}_{index:05d}", split, colour, background, shape, size, motion,
                    (float(start[0]), float(start[1])), (float(end[0]), float(end[1])), (float(r0), float(r1)))
    spec.captions = make_captions(spec, rng)
    return spec


# ----------------------------------------------------------------------------------------------- rendering

_SHIFT = 4  # cv2 fractional bits: sub-pixel positions keep slow motion smooth


def _polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "square":
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":
        pts = [(0, -r), (0.866 * r, 0.5 * r), (-0.866 * r, 0.5 * r)]
    else:  # diamond
        pts = [(0, -r), (0.75 * r, 0), (0, r), (-0.75 * r, 0)]
    return np.array([[(cx + x) * (1 << _SHIFT), (cy + y) * (1 << _SHIFT)] for x, y in pts], dtype=np.int32)


def render_clip(spec: ClipSpec, num_frames: int, width: int, height: int) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3]: a vertical-gradient background and the shape at its interpolated place."""
    import cv2

    bg = np.array(COLOURS[spec.background][0], dtype=np.float32)
    shade = np.linspace(1.08, 0.92, height, dtype=np.float32)[:, None, None]
    background = np.clip(bg[None, None, :] * shade, 0, 255).astype(np.uint8)
    background = np.ascontiguousarray(np.broadcast_to(background, (height, width, 3)))
    colour = tuple(int(c) for c in COLOURS[spec.colour][0])
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        a = t / max(1, num_frames - 1)
        cx = spec.start[0] + a * (spec.end[0] - spec.start[0])
        cy = spec.start[1] + a * (spec.end[1] - spec.start[1])
        r = spec.radius[0] + a * (spec.radius[1] - spec.radius[0])
        img = background.copy()
        if spec.shape == "circle":
            s = 1 << _SHIFT
            cv2.circle(img, (int(round(cx * s)), int(round(cy * s))), int(round(r * s)), colour, -1, cv2.LINE_AA,
                       _SHIFT)
        else:
            cv2.fillPoly(img, [_polygon(spec.shape, cx, cy, r)], colour, cv2.LINE_AA, _SHIFT)
        frames[t] = img
    return frames


def resolve_codec(codec: str = "auto") -> str:
    """"auto" -> libx264 when PyAV has it, else mpeg4 (both decode with decord and PyAV)."""
    import av

    if codec != "auto":
        if codec not in av.codecs_available:
            raise ValueError(f"codec {codec!r} is not available in this PyAV build")
        return codec
    for name in ("libx264", "mpeg4"):
        if name in av.codecs_available:
            return name
    raise RuntimeError("PyAV has neither libx264 nor mpeg4 encoders; cannot write mp4 files")


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int, codec: str = "auto",
                faststart: bool = False) -> None:
    """Write uint8 RGB frames [T, H, W, 3] (H, W even) as an mp4. Single-threaded x264, so the bytes are
    reproducible. faststart puts the index (moov) first, as web videos have it."""
    import av

    codec = resolve_codec(codec)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
    options = {"movflags": "faststart"} if faststart else {}
    container = av.open(str(path), mode="w", options=options)
    try:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            # mbtree=0: with macroblock-tree rate control, x264 (even single-threaded) gave different bytes for
            # the same frames now and then when the machine was busy; without it the output is reproducible.
            stream.options = {"preset": "veryfast", "crf": "18", "threads": "1", "x264-params": "mbtree=0"}
        else:
            stream.bit_rate = max(200_000, 12 * w * h)
            stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


def _build_clip(job: tuple[ClipSpec, str, int, int, int, int, str]) -> str:
    spec, root, num_frames, fps, width, height, codec = job
    write_video(os.path.join(root, spec.rel_path), render_clip(spec, num_frames, width, height), fps, codec)
    return spec.video_id


def _init_worker() -> None:
    import cv2
    cv2.setNumThreads(1)


# ----------------------------------------------------------------------------------------------- annotations


def _duration_iso(seconds: float) -> str:
    s = int(round(seconds))
    return f"PT{s // 3600:02d}H{s % 3600 // 60:02d}M{s % 60:02d}S"  # WebVid's duration column


def write_annotations(root: Path, specs: dict[str, list[ClipSpec]], seconds: float) -> None:
    """The same clips in every annotation format read by annotations.read_annotations (see the module docstring)."""
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    with open(ann / "train_webvid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for s in specs["train"]:
            w.writerow([s.video_id, f"synthetic://{s.rel_path}", _duration_iso(seconds), s.split, s.captions[0]])
    _write_json(ann / "pretrain.json", {s.rel_path: s.captions[0] for s in specs["train"]})
    for split in SPLITS:
        _write_json(ann / f"{split}.json", [{"video": s.rel_path, "caption": s.captions} for s in specs[split]])
    with open(ann / "test_1k.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        for i, s in enumerate(specs["test"]):
            w.writerow([f"ret{i}", f"syn{i}", f"{s.split}/{s.video_id}", s.captions[0]])
    _write_json(ann / "metadata.json", [asdict(s) for split in SPLITS for s in specs[split]])
    write_qa_annotations(ann, specs)


def qa_records(spec: ClipSpec) -> list[dict[str, str]]:
    """The questions about one clip (Singularity QA layout), answered from its recorded attributes."""
    motion_type = "size_change" if spec.motion in ("grow", "shrink") else "direction"
    answers = {"colour": spec.colour, "background": spec.background, "shape": spec.shape, motion_type: spec.motion}
    return [{"video": spec.rel_path, "question": QA_QUESTIONS[kind], "answer": answer,
             "question_id": f"{spec.video_id}/{kind}", "answer_type": kind} for kind, answer in answers.items()]


def qa_answer_list() -> list[str]:
    """Every answer a synthetic question can have (a fixed list: the same for every build and split)."""
    return list(dict.fromkeys([*COLOURS, *SHAPES, *MOTIONS]))


def write_qa_annotations(ann: Path, specs: dict[str, list[ClipSpec]]) -> None:
    """qa_<split>.json for every split and qa_answer_list.json (see the module docstring)."""
    for split in SPLITS:
        _write_json(ann / f"qa_{split}.json", [q for s in specs[split] for q in qa_records(s)])
    _write_json(ann / "qa_answer_list.json", qa_answer_list())


# words of the scale CSV's captions (a few with accents: real captions are not all ASCII)
_SCALE_WORDS = tuple("""aerial view of a young woman man child dog cat walking running sitting on the beach at sunset
in slow motion close up shot city street traffic night timelapse forest river mountain snow winter summer
happy smiling business people working office laptop cooking kitchen fresh vegetables water waves ocean sky
clouds flying drone footage over green field autumn leaves falling rain background abstract light bokeh
café niño façade crème""".split())


def write_webvid_scale_csv(path: str | os.PathLike, num_rows: int, seed: int = 0) -> Path:
    """A WebVid-2M CSV of num_rows records with no videos behind it, shaped like the real file (unique 9-10 digit
    ids, a preview URL that repeats the caption, page_dir folders of 50, captions of 4-18 words, some with
    commas): for measuring annotation reading and record memory at scale (benchmarks/bench_records.py)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(num_rows) + 1_000_000_000 - num_rows // 2
    lengths = rng.integers(4, 19, size=num_rows)
    words = rng.integers(len(_SCALE_WORDS), size=int(lengths.sum()))
    commas = rng.random(num_rows) < 0.2
    seconds = rng.integers(5, 60, size=num_rows)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        start = 0
        for row in range(num_rows):
            caption_words = [_SCALE_WORDS[k] for k in words[start:start + lengths[row]]]
            start += lengths[row]
            slug = "-".join(caption_words)
            if commas[row]:
                caption_words[1] += ","
            caption = " ".join(caption_words)
            page = row // 50 * 50
            w.writerow([int(ids[row]), f"https://example.com/videos/{ids[row]}/preview/stock-footage-{slug}.mp4",
                        f"PT00H00M{seconds[row]:02d}S", f"{page + 1:06d}_{page + 50:06d}",
                        caption[0].upper() + caption[1:]])
    return path


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- build


def _options(**options: Any) -> dict[str, Any]:
    unknown = set(options) - set(DEFAULTS) - {"workers", "verbose"}
    if unknown:
        raise TypeError(f"unknown synthetic dataset options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if k in DEFAULTS}}
    for k in ("num_train", "num_val", "num_test"):
        if int(opts[k]) < 0:
            raise ValueError(f"{k} must be >= 0, got {opts[k]}")
    if int(opts["num_frames"]) < 2 or int(opts["fps"]) < 1:
        raise ValueError(f"need num_frames >= 2 and fps >= 1, got {opts['num_frames']} and {opts['fps']}")
    if int(opts["width"]) < 16 or int(opts["height"]) < 16 or int(opts["width"]) % 2 or int(opts["height"]) % 2:
        raise ValueError(f"width and height must be even and >= 16, got {opts['width']}x{opts['height']}")
    if int(opts["width"]) in DECORD_BAD_WIDTHS:
        raise ValueError(f"width {opts['width']}: decord cannot read videos of widths {DECORD_BAD_WIDTHS}; "
                         "pick another (e.g. 32, 64, 96)")
    opts["codec"] = resolve_codec(opts["codec"])
    return {k: (v if k == "codec" else int(v)) for k, v in opts.items()}


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a finished build, or None (absent or unreadable: the build did not finish)."""
    try:
        with open(Path(root) / MANIFEST) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_synthetic_dataset(out_dir: str | os.PathLike, workers: int = 2, verbose: bool = True,
                            **options: Any) -> dict[str, Any]:
    """Build (or rebuild) the dataset in out_dir, unconditionally; returns the manifest. Prefer
    ensure_synthetic_dataset, which skips finished builds and serialises concurrent builders."""
    opts = _options(**options)
    root = Path(out_dir)
    t0 = time.perf_counter()
    _remove_own_files(root)
    specs = {split: [sample_spec(opts["seed"], split, i, opts["width"], opts["height"])
                     for i in range(opts[f"num_{split}"])] for split in SPLITS}
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    jobs = [(s, str(root), opts["num_frames"], opts["fps"], opts["width"], opts["height"], opts["codec"])
            for split in SPLITS for s in specs[split]]
    workers = max(1, min(int(workers), os.cpu_count() or 1))
    if workers > 1 and len(jobs) >= 64:  # below that, starting processes costs more than it saves
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for _ in pool.imap_unordered(_build_clip, jobs, chunksize=8):
                pass
    else:
        _init_worker()
        for job in jobs:
            _build_clip(job)
    write_annotations(root, specs, opts["num_frames"] / opts["fps"])
    seconds = time.perf_counter() - t0
    manifest = {"format_version": FORMAT_VERSION, "options": opts,
                "counts": {split: len(specs[split]) for split in SPLITS},
                "annotations": [f"annotations/{name}" for name in (*ANNOTATION_FILES, *QA_ANNOTATION_FILES)],
                "build_seconds": round(seconds, 2), "workers": workers}
    _write_json(root / MANIFEST, manifest)  # last: its presence means the build finished
    if verbose:
        print(f"synthetic dataset: {len(jobs)} clips ({opts['num_frames']} frames, {opts['width']}x{opts['height']} "
              f"@ {opts['fps']} fps, {opts['codec']}) -> {root} in {seconds:.1f} s with {workers} process(es)")
    return manifest


def _remove_own_files(root: Path) -> None:
    """Clear what an earlier (maybe half-finished) build wrote, and nothing else."""
    (root / MANIFEST).unlink(missing_ok=True)
    for name in (*SPLITS, "annotations"):
        shutil.rmtree(root / name, ignore_errors=True)


def ensure_synthetic_dataset(out_dir: str | os.PathLike, force: bool = False, **options: Any) -> Path:
    """Build the dataset in out_dir unless a finished build with the same options is there (or force); returns
    out_dir as a Path.

    options: num_train, num_val, num_test, num_frames, fps, width, height, seed, codec (content), workers,
    verbose (not content). A directory lock makes concurrent callers (test workers, ranks) wait for one build.
    """
    root = Path(out_dir)
    wanted = _options(**options)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = read_manifest(root)
            same = manifest and manifest.get("format_version") == FORMAT_VERSION and manifest.get("options") == wanted
            if same and not force:
                return root
            if manifest and not same and options.get("verbose", True):
                print(f"synthetic dataset in {root} was built with other options; rebuilding")
            build_synthetic_dataset(root, **options)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


# ----------------------------------------------------------------------------------------------- CLI


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH (e.g. 128 or 160x96), got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Build the synthetic video-text dataset (moving coloured shapes, captions that need motion to "
                    "match) as H.264 mp4s with annotations in the WebVid CSV, release JSON, Singularity JSON and "
                    "MSR-VTT 1k-A CSV formats, plus video QA files (qa_*.json). Skips the build when a finished "
                    "one with the same options exists.",
        epilog="Layout and formats: see the docstring of synthetic_dataset.py. Example: python synthetic_dataset.py "
               "--out data/synthetic && python run_simvtp_pretraining.py --data_path "
               "data/synthetic/annotations/pretrain.json --data_root data/synthetic ...")
    p.add_argument("--out", required=True, help="output directory (also the --data_root of every annotation file)")
    p.add_argument("--num_train", type=int, default=DEFAULTS["num_train"], help="training clips")
    p.add_argument("--num_val", type=int, default=DEFAULTS["num_val"], help="validation clips")
    p.add_argument("--num_test", type=int, default=DEFAULTS["num_test"], help="test clips")
    p.add_argument("--frames", type=int, default=DEFAULTS["num_frames"], help="frames per clip")
    p.add_argument("--fps", type=int, default=DEFAULTS["fps"], help="frame rate of the mp4s")
    p.add_argument("--size", type=_size, default=f"{DEFAULTS['width']}x{DEFAULTS['height']}",
                   help="frame size, N or WxH, even numbers (widths 16, 24, 48, 72 are refused: decord cannot "
                        "read them)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="same seed -> same pixels and captions")
    p.add_argument("--codec", default="auto", choices=["auto", "libx264", "mpeg4"],
                   help="auto = libx264 when available, else mpeg4")
    p.add_argument("--workers", type=int, default=2, help="encoding processes")
    p.add_argument("--force", action="store_true", help="rebuild even if a finished build exists")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = get_args_parser().parse_args(argv)
    opts = dict(num_train=args.num_train, num_val=args.num_val, num_test=args.num_test, num_frames=args.frames,
                fps=args.fps, width=args.size[0], height=args.size[1], seed=args.seed, codec=args.codec,
                workers=args.workers)
    try:
        manifest_before = read_manifest(args.out)
        root = ensure_synthetic_dataset(args.out, force=args.force, **opts)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    manifest = read_manifest(root)
    if manifest_before == manifest:
        print(f"synthetic dataset already built in {root} ({manifest['counts']}, built in "
              f"{manifest['build_seconds']} s); use --force to rebuild")
    return root


if __name__ == "__main__":
    main()
