"""Text-to-video search over a folder of videos with any checkpoint of this codebase: an index, a terminal query and
a local web page.

    # embed every video under videos/ (multi-view, as in evaluation); run again to add new or changed files only
    python search.py index videos/ --ckpt output/finetune/checkpoint-best.pth --out index/
    # the top 5 on the terminal
    python search.py query index/ "a red ball rolls left" -k 5
    # a web page on http://127.0.0.1:7860 (optionally each query's top 16 re-ranked by a matching head)
    python search.py serve index/ --port 7860 [--rerank_k 16 --rerank_ckpt output/demo/pretrain/checkpoint-4.pth]

The index folder holds manifest.json (each video's path, size, duration, the model and clip settings, the files
that could not be read with their errors), embeddings.safetensors (one L2-normalised row per video, in manifest
order) and thumbs/ (one strip of frames per video).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mimetypes
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

import annotations
import checkpoint
import datasets
import retrieval_eval as engine
import model_registry
import utils
import video_io
import video_transforms

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
THUMBS = "thumbs"
INDEX_FORMAT = "simvtp-search-index"
INDEX_VERSION = 1
THUMB_FRAMES = 4
THUMB_HEIGHT = 96
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CLIP_KEYS = ("num_frames", "sampling_rate", "input_size", "short_side_size", "test_num_segment", "test_num_crop",
             "sample_type_test")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "search_page.html")

# ----------------------------------------------------------------------------------------------- the index files


def video_id(rel_path: str) -> str:
    """A stable opaque id of a video's path under the indexed folder: the web app's URLs carry ids, never paths."""
    return hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:16]


def list_videos(video_dir: str) -> dict[str, tuple[int, int]]:
    """Every video file under video_dir (recursively, by extension, hidden folders skipped) -> (size, mtime_ns),
    keyed by its path relative to video_dir with '/' separators."""
    found = {}
    for folder, subdirs, files in os.walk(video_dir):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if os.path.splitext(name)[1].lower() in video_io.VIDEO_EXTENSIONS and not name.startswith("."):
                full = os.path.join(folder, name)
                st = os.stat(full)
                found[os.path.relpath(full, video_dir).replace(os.sep, "/")] = (st.st_size, st.st_mtime_ns)
    return dict(sorted(found.items()))


def read_manifest(index_dir: str) -> dict | None:
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a search index written by search.py (format {manifest.get('format')!r})")
    if manifest.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {manifest.get('version')}, this code reads {INDEX_VERSION}; "
                         "build it again with search.py index --rebuild")
    return manifest


def read_embeddings(index_dir: str, manifest: dict) -> torch.Tensor:
    """[N, D] rows in manifest order; an embeddings file whose ids disagree with the manifest (a crash between
    the two writes) is an error that says how to mend it."""
    from safetensors import safe_open

    path = os.path.join(index_dir, EMBEDDINGS)
    ids = [v["id"] for v in manifest["videos"]]
    if not ids:
        return torch.zeros(0, manifest.get("dim") or 0)
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing: run search.py index again to rebuild it")
    with safe_open(path, framework="pt") as f:
        stored = json.loads(f.metadata().get("video_ids", "[]"))
        video = f.get_tensor("video")
    if stored != ids or len(video) != len(ids):
        raise ValueError(f"{path} does not match {MANIFEST} (an interrupted update?): run search.py index again")
    return video.float()


def write_index(index_dir: str, manifest: dict, video: torch.Tensor) -> None:
    """Embeddings first, then the manifest, each atomically: a crash in between leaves ids that disagree, which
    read_embeddings detects and the next index run repairs."""
    from safetensors.torch import save_file

    ids = json.dumps([v["id"] for v in manifest["videos"]])
    checkpoint.write_atomic(os.path.join(index_dir, EMBEDDINGS),
                            lambda tmp: save_file({"video": video.float().contiguous()}, tmp,
                                                  metadata={"video_ids": ids}))
    text = json.dumps(manifest, indent=1)

    def write_text(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    checkpoint.write_atomic(os.path.join(index_dir, MANIFEST), write_text)

# ----------------------------------------------------------------------------------------------- model and clips


def load_model(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint holds (loaded strictly, eval mode) and the checkpoint's saved args."""
    ckpt = checkpoint.read_checkpoint_file(path)
    model = checkpoint.build_model_from(ckpt, path)
    model_registry.require(model, "retrieval", f"{path}: {model.model_cfg['name']} has no encode_video / "
                           "encode_text; index with a retrieval or pre-training checkpoint")
    return model.to(device).eval(), checkpoint.saved_args(ckpt)


def clip_settings(args: argparse.Namespace, model: torch.nn.Module, saved: dict) -> dict:
    """How videos become clips: each flag given, else the checkpoint's training args, else the model's clip_shape
    (the contract's frames and side), else the evaluation defaults (16 frames of 224 px at stride 4, 2 clips x 1
    crop)."""
    frames, side = model_registry.capability_value(model, "clip_shape", (None, None))

    def pick(key: str, *fallbacks: Any) -> Any:
        given = getattr(args, key, None)
        return given if given is not None else next((v for v in (saved.get(key), *fallbacks) if v is not None))

    clip = {"num_frames": pick("num_frames", frames, 16), "sampling_rate": pick("sampling_rate", 4),
            "input_size": pick("input_size", side, 224)}
    clip["short_side_size"] = pick("short_side_size", clip["input_size"])
    clip["test_num_segment"] = pick("test_num_segment", 2)
    clip["test_num_crop"] = pick("test_num_crop", 1)
    clip["sample_type_test"] = pick("sample_type_test",
                                    video_transforms.default_test_sample_type(saved.get("sample_type") or "stride"))
    return {k: int(v) if k != "sample_type_test" else v for k, v in clip.items()}


def clip_dataset(paths: Sequence[str], clip: dict, backend: str, views: tuple[int, int] | None = None
                 ) -> datasets.VideoTextDataset:
    """Test-mode clips of the given files (views = (segments, crops), default the index's), as evaluation reads."""
    segments, crops = views or (clip["test_num_segment"], clip["test_num_crop"])
    records = [annotations.VideoRecord(path=p, captions=[], video_id=p) for p in paths]
    return datasets.VideoTextDataset(records, mode="test", num_frames=clip["num_frames"],
                                     sampling_rate=clip["sampling_rate"], input_size=clip["input_size"],
                                     short_side_size=clip["short_side_size"], test_num_segment=segments,
                                     test_num_crop=crops, video_backend=backend,
                                     sample_type=clip["sample_type_test"])


def eval_config(device: torch.device, dtype: torch.dtype, batch_size: int = 8) -> engine.EvalConfig:
    return engine.EvalConfig(device=device, dtype=dtype, chunk=batch_size, print_freq=10)

# ----------------------------------------------------------------------------------------------- indexing


def probe_video(path: str, backend: str) -> dict:
    """Open a file and read the frames of its thumbnail strip: its facts and the strip (uint8 [h, w, 3]).
    Raises on any file that does not decode, with the file named."""
    with video_io.open_video(path, backend) as video:
        if video.num_frames < 1:
            raise video_io.VideoDecodeError(f"{path}: no frames")
        picks = sorted({min(video.num_frames - 1, int((j + 0.5) * video.num_frames / THUMB_FRAMES))
                        for j in range(THUMB_FRAMES)})
        frames = video.get_frames(picks)
        fps = float(video.fps)
        count = int(video.num_frames)
    height, width = frames.shape[1:3]
    return {"frames": count, "fps": round(fps, 3), "duration": round(count / fps, 3) if fps > 0 else None,
            "width": int(width), "height": int(height), "strip": thumbnail_strip(frames)}


def thumbnail_strip(frames: np.ndarray, height: int = THUMB_HEIGHT) -> np.ndarray:
    """[n, H, W, 3] frames -> one [height, n * w, 3] strip, each frame resized to `height` keeping its aspect."""
    import cv2

    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    return np.concatenate([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames], axis=1)


def write_jpeg(path: str, rgb: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError(f"could not encode the thumbnail {path}")

    def write_bytes(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
    checkpoint.write_atomic(path, write_bytes)


@dataclass
class UpdatePlan:
    keep: list[dict]          # manifest entries whose file is unchanged (embedding row reused)
    keep_broken: list[dict]   # unreadable files, unchanged since they failed (not tried again)
    todo: list[str]           # relative paths to probe and embed
    removed: list[str]        # relative paths in the old index but no longer on disk
    reason: str = ""          # why everything is embedded again, if it is


def plan_update(files: dict[str, tuple[int, int]], old: dict | None, settings: dict, rebuild: bool) -> UpdatePlan:
    """Which files to embed: new or changed ones (size or modification time differ); all of them when the model,
    its checkpoint file, the clip settings or the indexed folder changed, or with --rebuild."""
    reason = ("--rebuild" if rebuild else "no index yet" if old is None else
              next((f"the {k} changed ({old.get(k)!r} -> {v!r})" for k, v in settings.items() if old.get(k) != v),
                   ""))
    if reason:
        return UpdatePlan([], [], list(files), sorted({v["path"] for v in (old or {}).get("videos", [])} -
                                                      set(files)), reason)
    known = {v["path"]: v for v in old["videos"] + old["broken"]}
    keep, keep_broken, todo = [], [], []
    for rel, (size, mtime) in files.items():
        entry = known.get(rel)
        if entry is None or (entry["size"], entry["mtime_ns"]) != (size, mtime):
            todo.append(rel)
        else:
            (keep_broken if "error" in entry else keep).append(entry)
    removed = sorted(set(known) - set(files))
    return UpdatePlan(keep, keep_broken, todo, removed)


def checkpoint_identity(path: str) -> dict:
    """The checkpoint as the index records it: a different file (or the same file rewritten) re-embeds all."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class SafeClips(torch.utils.data.Dataset):
    """A clip dataset whose unreadable items come back as their error instead of stopping the whole index."""

    def __init__(self, dataset: datasets.VideoTextDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.dataset[i]["video"], ""
        except Exception as e:  # any decoder error belongs to this one file
            return i, None, f"{type(e).__name__}: {video_io.one_line(e)}"


def embed_files(model: torch.nn.Module, paths: list[str], clip: dict, backend: str, cfg: engine.EvalConfig,
                num_workers: int) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Each file's embedding (engine.encode_videos: every view embedded and averaged, as evaluation does), with
    progress and ETA; returns ({position: [D]}, {position: error}) over positions in `paths`."""
    if not paths:
        return {}, {}
    loader = torch.utils.data.DataLoader(SafeClips(clip_dataset(paths, clip, backend)), batch_size=cfg.chunk,
                                         num_workers=num_workers, collate_fn=list,
                                         pin_memory=cfg.device.type == "cuda")
    rows, errors = {}, {}
    logger = utils.MetricLogger(cfg.print_freq)
    for batch in logger.log_every(loader, total=len(loader), header="Embed", items_per_step=cfg.chunk,
                                  unit="videos"):
        good = [(i, v) for i, v, _ in batch if v is not None]
        errors.update({i: err for i, v, err in batch if v is None})
        if good:
            feats = engine.encode_videos(model, torch.stack([v for _, v in good]), [i for i, _ in good], cfg)
            rows.update({i: f.cpu() for (i, _), f in zip(good, feats)})
    return rows, errors


def probe_files(video_dir: str, index_dir: str, todo: list[str], backend: str, print_freq: int
                ) -> tuple[dict[str, dict], dict[str, str]]:
    """Facts and a thumbnail (written to thumbs/<id>.jpg) of each file to index, or its error."""
    facts, errors = {}, {}
    logger = utils.MetricLogger(print_freq)
    for rel in logger.log_every(todo, total=len(todo), header="Read", unit="videos"):
        try:
            info = probe_video(os.path.join(video_dir, rel), backend)
        except Exception as e:  # a file that does not open or decode is listed, never fatal
            errors[rel] = f"{type(e).__name__}: {video_io.one_line(e)}"
            continue
        thumb = f"{THUMBS}/{video_id(rel)}.jpg"
        write_jpeg(os.path.join(index_dir, thumb), info.pop("strip"))
        facts[rel] = {**info, "thumbnail": thumb}
    return facts, errors


def build_index(args: argparse.Namespace) -> dict:
    """Create or update the index of args.video_dir in args.out; returns the counts (embedded, kept, removed,
    broken, seconds) and the manifest. The index is written after every --save_every new videos, so an
    interrupted run keeps what it embedded and the next run goes on from there."""
    video_dir = os.path.abspath(args.video_dir)
    if not os.path.isdir(video_dir):
        raise FileNotFoundError(f"{args.video_dir}: not a folder of videos")
    device = utils.resolve_device(args.device)
    utils.configure_device_math(device, args.tf32)
    dtype = utils.resolve_precision(args.precision, device)
    model, saved = load_model(args.ckpt, device)
    clip = clip_settings(args, model, saved)
    backend = video_io.resolve_backend(args.video_backend)
    settings = {"model": model.model_cfg, "checkpoint": checkpoint_identity(args.ckpt), "clip": clip,
                "video_dir": video_dir, "backend": backend, "precision": PRECISION_NAMES[dtype]}
    files = list_videos(video_dir)
    old = read_manifest(args.out)
    plan = plan_update(files, old, settings, args.rebuild)
    state = IndexState(settings, files)
    state.keep(plan.keep, _old_rows(args.out, old, plan), plan.keep_broken)
    print(f"Index {args.out}: {len(files)} video files under {video_dir}; {len(plan.todo)} to embed"
          + (f" ({plan.reason})" if plan.reason else f", {len(plan.keep)} unchanged, {len(plan.removed)} removed")
          + f"; model {model.model_cfg['name']}, {clip['num_frames']} frames x {clip['input_size']} px, "
          f"{clip['test_num_segment']} clip(s) x {clip['test_num_crop']} crop(s) per video", flush=True)
    cfg = eval_config(device, dtype, args.batch_size)
    t0 = time.time()
    manifest = state.write(args.out)  # removed files leave the index even when nothing is new
    for start in range(0, len(plan.todo), args.save_every):
        chunk = plan.todo[start:start + args.save_every]
        facts, errors = probe_files(video_dir, args.out, chunk, backend, args.print_freq)
        readable = [rel for rel in chunk if rel in facts]
        rows, embed_errors = embed_files(model, [os.path.join(video_dir, r) for r in readable], clip, backend, cfg,
                                         args.num_workers)
        errors.update({readable[i]: err for i, err in embed_errors.items()})
        state.add({readable[i]: (facts[readable[i]], row) for i, row in rows.items()}, errors)
        manifest = state.write(args.out)
        print_progress(start + len(chunk), len(plan.todo), time.time() - t0)
    _remove_stale_thumbnails(args.out, manifest)
    seconds = time.time() - t0
    counts = {"embedded": state.embedded, "kept": len(plan.keep), "removed": len(plan.removed),
              "broken": len(manifest["broken"]), "new_broken": state.new_broken, "seconds": round(seconds, 2)}
    print(f"Indexed {state.embedded} videos in {seconds:.1f} s"
          + (f" ({state.embedded / seconds:.2f} videos/s)" if state.embedded and seconds > 0 else "")
          + f"; the index holds {len(manifest['videos'])} videos, {len(plan.keep)} of them unchanged; "
          f"{len(plan.removed)} removed", flush=True)
    if manifest["broken"]:
        print(f"{len(manifest['broken'])} file(s) could not be read and are listed in {MANIFEST} under "
              "\"broken\":\n" + "\n".join(f"  {b['path']}: {b['error']}" for b in manifest["broken"][:10])
              + ("\n  ..." if len(manifest["broken"]) > 10 else ""), flush=True)
    return {**counts, "manifest": manifest}


class IndexState:
    """The index being built: entries with their rows, the unreadable files, and the manifest they make."""

    def __init__(self, settings: dict, files: dict[str, tuple[int, int]]) -> None:
        self.settings = settings
        self.files = files
        self.entries: dict[str, tuple[dict, torch.Tensor]] = {}
        self.broken: dict[str, dict] = {}
        self.embedded = self.new_broken = 0

    def keep(self, entries: list[dict], rows: dict[str, torch.Tensor], broken: list[dict]) -> None:
        self.entries.update({e["path"]: (e, rows[e["id"]]) for e in entries})
        self.broken.update({b["path"]: b for b in broken})

    def add(self, new: dict[str, tuple[dict, torch.Tensor]], errors: dict[str, str]) -> None:
        for rel, (facts, row) in new.items():
            size, mtime = self.files[rel]
            self.entries[rel] = ({"id": video_id(rel), "path": rel, "size": size, "mtime_ns": mtime, **facts}, row)
        for rel, err in errors.items():
            size, mtime = self.files[rel]
            self.broken[rel] = {"path": rel, "size": size, "mtime_ns": mtime, "error": err}
        self.embedded += len(new)
        self.new_broken += len(errors)

    def write(self, index_dir: str) -> dict:
        ordered = [self.entries[rel] for rel in self.files if rel in self.entries]
        dim = len(ordered[0][1]) if ordered else 0
        manifest = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **self.settings, "dim": dim,
                    "videos": [e for e, _ in ordered], "broken": [self.broken[r] for r in sorted(self.broken)],
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_index(index_dir, manifest, torch.stack([r for _, r in ordered]) if ordered else torch.zeros(0, dim))
        return manifest


def print_progress(done: int, total: int, seconds: float) -> None:
    rate = done / seconds if seconds > 0 else 0.0
    eta = time.strftime("%H:%M:%S", time.gmtime((total - done) / rate)) if rate > 0 else "?"
    print(f"Index: {done}/{total} new videos done and saved ({rate:.2f} videos/s, ETA {eta})", flush=True)


def _old_rows(index_dir: str, old: dict | None, plan: UpdatePlan) -> dict[str, torch.Tensor]:
    """The previous embeddings by id; when they cannot be read, every kept file is embedded again."""
    if old is None or not plan.keep:
        return {}
    try:
        video = read_embeddings(index_dir, old)
    except ValueError as e:
        print(f"note: {e}; embedding the unchanged files again")
        plan.todo = sorted(plan.todo + [v["path"] for v in plan.keep])
        plan.keep = []
        return {}
    return {v["id"]: row for v, row in zip(old["videos"], video)}


def _remove_stale_thumbnails(index_dir: str, manifest: dict) -> None:
    folder = os.path.join(index_dir, THUMBS)
    if not os.path.isdir(folder):
        return
    wanted = {os.path.basename(v["thumbnail"]) for v in manifest["videos"]}
    for name in os.listdir(folder):
        if name not in wanted:
            os.remove(os.path.join(folder, name))

# ----------------------------------------------------------------------------------------------- searching


@dataclass
class Hit:
    rank: int
    id: str
    path: str
    score: float                  # cosine similarity of the query and the video embedding
    match: float | None = None    # matching-head log-odds, when re-ranked


class Searcher:
    """A loaded index and the model that embeds queries (and optionally one that re-ranks): the one code path the
    terminal query and the web app share. Thread-safe: model calls are serialised."""

    def __init__(self, index_dir: str, ckpt: str | None = None, device: str = "cpu", precision: str | None = None,
                 tokenizer: str | None = None, rerank_k: int = 0, rerank_ckpt: str | None = None,
                 tf32: bool = True) -> None:
        manifest = read_manifest(index_dir)
        if manifest is None:
            raise FileNotFoundError(f"{index_dir}: no {MANIFEST}; build the index with search.py index")
        self.index_dir = os.path.abspath(index_dir)
        self.manifest = manifest
        self.video = read_embeddings(index_dir, manifest)
        self.videos = manifest["videos"]
        self.by_id = {v["id"]: v for v in self.videos}
        self.device = utils.resolve_device(device)
        utils.configure_device_math(self.device, tf32)
        self.dtype = utils.resolve_precision(precision or manifest.get("precision", "fp32"), self.device)
        path = ckpt or manifest["checkpoint"]["path"]
        if not os.path.exists(path):
            raise FileNotFoundError(f"the index was built with {path}, which is not here: pass --ckpt with that "
                                    "checkpoint (or rebuild the index)")
        self.model, saved = load_model(path, self.device)
        if self.model.model_cfg["name"] != manifest["model"]["name"]:
            raise ValueError(f"{path} holds {self.model.model_cfg['name']} but the index was built with "
                             f"{manifest['model']['name']}: queries must use the model that embedded the videos")
        self.tokenizer = datasets.checkpoint_tokenizer(tokenizer, saved)
        self.cfg = eval_config(self.device, self.dtype)
        self.rerank_k = rerank_k
        self.match_model = self._match_model(rerank_ckpt) if rerank_k > 0 else None
        self.lock = threading.Lock()

    def _match_model(self, rerank_ckpt: str | None) -> torch.nn.Module:
        model = load_model(rerank_ckpt, self.device)[0] if rerank_ckpt else self.model
        return model_registry.require(model, "rerank", f"--rerank_k {self.rerank_k}: {model.model_cfg['name']} has "
                                      "no matching head; give --rerank_ckpt a pre-training checkpoint (SimVTP or "
                                      "SViTT)")

    def video_path(self, vid: str) -> str | None:
        """The file of an indexed video id (None for an id that is not in the index)."""
        entry = self.by_id.get(vid)
        return None if entry is None else os.path.join(self.manifest["video_dir"], entry["path"])

    def thumbnail_path(self, vid: str) -> str | None:
        entry = self.by_id.get(vid)
        return None if entry is None else os.path.join(self.index_dir, entry["thumbnail"])

    def scores(self, text: str) -> torch.Tensor:
        """Cosine similarity [N] of the query with every indexed video (the retrieval evaluation's text . video)."""
        with self.lock:
            query = engine.encode_texts(self.model, self.tokenizer, [text], self.cfg)[0]
        return self.video @ query.float().cpu()

    def search(self, text: str, k: int = 10, rerank: bool = True) -> list[Hit]:
        """The top k videos for a text, best first; with a matching model, the top rerank_k are re-ordered by its
        log-odds of match (those below keep their similarity order)."""
        if not text.strip():
            raise ValueError("the query is empty")
        if not self.videos:
            return []
        sim = self.scores(text)
        depth = max(k, self.rerank_k if rerank and self.match_model is not None else 0)
        top = sim.topk(min(depth, len(sim))).indices.tolist()
        hits = [Hit(0, self.videos[i]["id"], self.videos[i]["path"], float(sim[i])) for i in top]
        if rerank and self.match_model is not None:
            hits = self._rerank(text, hits[:self.rerank_k]) + hits[self.rerank_k:]
        for rank, hit in enumerate(hits[:k], 1):
            hit.rank = rank
        return hits[:k]

    def _rerank(self, text: str, hits: list[Hit]) -> list[Hit]:
        """The hits ordered by the matching head's log-odds for the text (each video decoded once, one clip)."""
        clip = match_clip(self.manifest["clip"], self.match_model)
        one_view = clip_dataset([self.video_path(h.id) for h in hits], clip, self.manifest["backend"], (1, 1))
        with self.lock:
            scores = engine.match_scores(self.match_model, [(0, pos) for pos in range(len(hits))],
                                         engine.FirstViews(one_view, range(len(hits))), [text], self.tokenizer,
                                         self.cfg)
        for pos, hit in enumerate(hits):
            hit.match = scores[(0, pos)]
        return sorted(hits, key=lambda h: -h.match)


def match_clip(clip: dict, match_model: torch.nn.Module) -> dict:
    """The index's clip settings at the matching model's own frames and side (another checkpoint may differ)."""
    frames, side = model_registry.capability_value(match_model, "clip_shape",
                                                   (clip["num_frames"], clip["input_size"]))
    return {**clip, "num_frames": frames, "input_size": side, "short_side_size": max(clip["short_side_size"], side)}


def hit_record(hit: Hit, entry: dict) -> dict:
    """A hit as the web API returns it: no file-system path, only the index's relative path and the app's URLs."""
    return {"rank": hit.rank, "id": hit.id, "path": hit.path, "score": round(hit.score, 4),
            "match": None if hit.match is None else round(hit.match, 4), "duration": entry.get("duration"),
            "thumbnail": f"/thumb/{hit.id}", "video": f"/video/{hit.id}"}

# ----------------------------------------------------------------------------------------------- web app


def make_app(searcher: Searcher, max_k: int = 100):
    """The Starlette app: the page, /api/search, /api/info, and each indexed video and thumbnail by id.

    A request's id is only ever looked up in the index; no part of a URL is joined to a path, and no route lists
    a folder, so only indexed files can be served."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    def not_found(what: str) -> PlainTextResponse:
        return PlainTextResponse(f"{what} is not in the index", status_code=404)

    async def home(request) -> HTMLResponse:
        return HTMLResponse(page)

    def search_api(request) -> JSONResponse:
        query = request.query_params.get("q", "")
        try:
            k = min(max_k, max(1, int(request.query_params.get("k", "12"))))
        except ValueError:
            return JSONResponse({"error": "k must be a whole number"}, status_code=400)
        rerank = request.query_params.get("rerank", "1") != "0"
        t0 = time.perf_counter()
        try:
            hits = searcher.search(query, k, rerank=rerank)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"query": query, "took_ms": round(1000 * (time.perf_counter() - t0), 1),
                             "reranked": rerank and searcher.match_model is not None,
                             "results": [hit_record(h, searcher.by_id[h.id]) for h in hits]})

    async def info(request) -> JSONResponse:
        m = searcher.manifest
        return JSONResponse({"videos": len(m["videos"]), "broken": len(m["broken"]), "model": m["model"]["name"],
                             "clip": m["clip"], "rerank_k": searcher.rerank_k if searcher.match_model else 0})

    def indexed_file(kind: str, lookup: Callable[[str], str | None], media_type: Callable[[str], str]):
        async def serve(request):
            path = lookup(request.path_params["vid"])
            if path is None:
                return not_found(f"{kind} {request.path_params['vid']!r}")
            if not os.path.isfile(path):
                return PlainTextResponse(f"the {kind} was indexed but its file is gone; run search.py index again",
                                         status_code=404)
            return FileResponse(path, media_type=media_type(path))
        return serve

    routes = [Route("/", home), Route("/api/search", search_api), Route("/api/info", info),
              Route("/video/{vid}", indexed_file("video", searcher.video_path, video_media_type)),
              Route("/thumb/{vid}", indexed_file("thumbnail", searcher.thumbnail_path, lambda p: "image/jpeg"))]
    return Starlette(routes=routes)


def video_media_type(path: str) -> str:
    known = {".mkv": "video/x-matroska", ".webm": "video/webm", ".mp4": "video/mp4", ".m4v": "video/mp4"}
    ext = os.path.splitext(path)[1].lower()
    return known.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"

# ----------------------------------------------------------------------------------------------- command line


def format_hits(hits: Sequence[Hit], searcher: Searcher) -> str:
    if not hits:
        return "(the index holds no videos)"
    lines = [f"{'rank':>4}  {'score':>7}  {'match':>7}  {'seconds':>7}  path"]
    for h in hits:
        entry = searcher.by_id[h.id]
        match = "" if h.match is None else f"{h.match:7.3f}"
        duration = "" if entry.get("duration") is None else f"{entry['duration']:7.1f}"
        lines.append(f"{h.rank:>4}  {h.score:7.4f}  {match:>7}  {duration:>7}  {h.path}")
    return "\n".join(lines)


def add_runtime_args(p: argparse.ArgumentParser, precision: str | None, precision_help: str) -> None:
    model_registry.add_model_module_arg(p)
    p.add_argument("--device", default="auto", help="auto (CUDA when a GPU is visible, else CPU, as the run scripts), "
                   "cpu, cuda, cuda:N")
    p.add_argument("--precision", default=precision, choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision of the model " + precision_help)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: fp32 matmuls and convolutions in TF32, cuDNN's autotuner on (as the run scripts)")


def add_searcher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("index_dir", help="a folder written by search.py index")
    p.add_argument("--ckpt", default=None, help="the checkpoint the index was built with, if it has moved")
    p.add_argument("--tokenizer", default=None, help="BERT directory or vocab.txt (default: the checkpoint's, else "
                   "the shipped bert-base-uncased vocabulary)")
    p.add_argument("--rerank_k", type=int, default=0, help="re-order each query's top K by a matching head's "
                   "log-odds (0: off); decodes K videos per query")
    p.add_argument("--rerank_ckpt", default=None, help="the matching model (a pre-training checkpoint); default: "
                   "the index's model, when it has a matching head")
    add_runtime_args(p, None, "(default: the one the index was built with)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("search.py", description="Text-to-video search: index a folder of videos with a "
                                "checkpoint, then query it on the terminal or in a local web page.",
                                formatter_class=utils.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="embed new or changed videos of a folder into an index",
                        formatter_class=utils.HelpFormatter)
    ix.add_argument("video_dir", help="folder searched recursively for video files (" +
                    ", ".join(sorted(video_io.VIDEO_EXTENSIONS)) + ")")
    ix.add_argument("--ckpt", required=True, help="any checkpoint of either family (pre-training or fine-tuned)")
    ix.add_argument("--out", required=True, help="the index folder (created; updated in place when it exists)")
    ix.add_argument("--rebuild", action="store_true", help="embed every video again")
    clip = ix.add_argument_group("clips (default: the checkpoint's training args, else its model's clip shape)")
    clip.add_argument("--num_frames", type=int, default=None, help="frames per clip")
    clip.add_argument("--sampling_rate", type=int, default=None, help="frame stride (stride sampling)")
    clip.add_argument("--input_size", type=int, default=None, help="clip side in pixels")
    clip.add_argument("--short_side_size", type=int, default=None, help="short side before cropping")
    clip.add_argument("--test_num_segment", type=int, default=None, help="clips per video (default 2)")
    clip.add_argument("--test_num_crop", type=int, default=None, help="crops per clip (default 1)")
    clip.add_argument("--sample_type_test", default=None, choices=["stride", "middle", "rand"],
                      help="how a clip's frames are picked")
    clip.add_argument("--video_backend", default="auto", choices=["auto", "decord", "pyav"], help="decoder")
    ix.add_argument("--batch_size", type=int, default=8, help="clips per encoder forward")
    ix.add_argument("--num_workers", type=int, default=0, help="decoding processes (0: in this process)")
    ix.add_argument("--save_every", type=int, default=256, help="write the index after every this many new "
                    "videos (an interrupted run keeps them)")
    ix.add_argument("--print_freq", type=int, default=10, help="progress line every this many batches/videos")
    add_runtime_args(ix, "auto", "(auto, the run scripts' default: bf16 where the device runs it natively, else "
                     "fp32 (fp16 on older GPUs); another precision than the index's embeds every video again)")
    q = sub.add_parser("query", help="print the top videos for a text",
                       formatter_class=utils.HelpFormatter)
    add_searcher_args(q)
    q.add_argument("text", help="the query, e.g. \"a red ball rolls left\"")
    q.add_argument("-k", type=int, default=5, help="how many videos")
    q.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    s = sub.add_parser("serve", help="a local web page to search the index",
                       formatter_class=utils.HelpFormatter)
    add_searcher_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the page and the "
                   "indexed videos to the network)")
    s.add_argument("--port", type=int, default=7860, help="port")
    return p


def searcher_from(args: argparse.Namespace) -> Searcher:
    return Searcher(args.index_dir, args.ckpt, args.device, args.precision, args.tokenizer, args.rerank_k,
                    args.rerank_ckpt, args.tf32)


def run_query(args: argparse.Namespace) -> list[Hit]:
    searcher = searcher_from(args)
    hits = searcher.search(args.text, args.k)
    if args.json:
        for h in hits:
            print(json.dumps(hit_record(h, searcher.by_id[h.id])))
    else:
        print(format_hits(hits, searcher))
    return hits


def run_server(args: argparse.Namespace) -> None:
    import uvicorn

    searcher = searcher_from(args)
    m = searcher.manifest
    print(f"Serving {len(m['videos'])} videos of {m['video_dir']} ({m['model']['name']}) on "
          f"http://{args.host}:{args.port}/ - Ctrl+C stops", flush=True)
    uvicorn.run(make_app(searcher), host=args.host, port=args.port, log_level="warning")


def main(args: argparse.Namespace) -> Any:
    """Run one command; gradients stay as they were (every model call here is under no_grad already)."""
    model_registry.load_family_modules()
    if args.command == "index":
        try:
            return build_index(args)
        except KeyboardInterrupt:
            print(f"Interrupted: {args.out} keeps the videos saved so far; run the same command to go on",
                  file=sys.stderr, flush=True)
            sys.exit(130)
    if args.command == "query":
        return run_query(args)
    return run_server(args)


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser(), checkpoint.CheckpointError)
