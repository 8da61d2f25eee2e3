"""Retrieval evaluation for any model family: ranking metrics, embedding a test set (views averaged, ranks
gathered), zero-shot scoring, re-ranking with the matching head, and export. The model is used only through the
contract's encode_video / encode_text / match_logits (training runs through engine_for_pretraining.train).

Ranks are 1-based. Ties are broken AGAINST the ground truth: a candidate whose score equals the ground truth's
counts as ranked above it, so a constant model gets the worst rank, never a lucky R@1. A query with several ground
truths (a video's captions; the videos of one SSv2 caption) takes the rank of its best-ranked one. Model selection
uses "r1_sum" = text-to-video R@1 + video-to-text R@1 on the validation set.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import answer_ranking
import datasets
import distributed
import masking_generator
import model_registry
import utils
import video_transforms

RECALL_AT = (1, 5, 10, 50)
TIE_NOTE = "ranks 1-based; ties count against the ground truth: an equal score ranks above it"

# ----------------------------------------------------------------------------------------------- metrics


def gt_ranks(scores: torch.Tensor, gt_mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Rank of the best ground-truth candidate of each query.

    scores: [Q, C]; gt_mask: bool [Q, C], at least one True per row. Returns long [Q], 1-based:
    1 + the number of non-ground-truth candidates scoring >= the best ground truth (ties against it).
    Several ground truths (a video's captions) give the best of their ranks. Rows are done in chunks so a
    10k x 10k matrix needs no extra [Q, C] copies.
    """
    if scores.shape != gt_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and gt_mask {tuple(gt_mask.shape)} differ")
    if not bool(gt_mask.any(dim=1).all()):
        raise ValueError("every query needs at least one ground-truth candidate")
    best = best_ground_truth_scores(scores, gt_mask, chunk)
    out = []
    for s, m, b in zip(scores.split(chunk), gt_mask.split(chunk), best.split(chunk)):
        out.append(1 + ((s >= b[:, None]) & ~m).sum(dim=1))
    return torch.cat(out)


def best_ground_truth_scores(scores: torch.Tensor, gt_mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[Q]: each query's best ground-truth score (scores, gt_mask: [Q, C]; rows in chunks, no [Q, C] copy)."""
    return torch.cat([s.masked_fill(~m, float("-inf")).amax(dim=1)
                      for s, m in zip(scores.split(chunk), gt_mask.split(chunk))])


def tied_ground_truths(scores: torch.Tensor, gt_mask: torch.Tensor) -> int:
    """How many queries' best ground truth scores exactly as another candidate (which the tie rule then ranks
    above it): scores computed in too low a precision show up here. scores, gt_mask: [Q, C] as gt_ranks."""
    best_gt = scores.masked_fill(~gt_mask, float("-inf")).amax(dim=1, keepdim=True)
    return int(((scores == best_gt) & ~gt_mask).any(dim=1).sum())


def rank_summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    """R@K in percent, median and mean rank of 1-based ranks [Q]."""
    r = ranks.double()
    out = {f"{prefix}_R@{k}": float((r <= k).double().mean() * 100) for k in RECALL_AT}
    out[f"{prefix}_MdR"] = float(np.median(r.numpy()))  # the mean of the two middle ranks when Q is even
    out[f"{prefix}_MnR"] = float(r.mean())
    out[f"{prefix}_queries"] = int(len(r))
    return out


def text_video_masks(text_to_video: torch.Tensor, num_videos: int) -> torch.Tensor:
    """bool [T, V]: True where text t describes video v."""
    return text_to_video[:, None] == torch.arange(num_videos)[None, :]


def ground_truth_mask(text_to_video: Sequence[int] | torch.Tensor, num_texts: int, num_videos: int) -> torch.Tensor:
    """The ground truth of a retrieval set as bool [T, V] (True where text t describes video v), from either form
    the engine passes around: long [T], each text's one video (several texts may share a video), or already a
    bool [T, V] (a text with several videos: SSv2's one caption for many videos)."""
    gt = torch.as_tensor(text_to_video).cpu()
    if gt.dtype == torch.bool:
        if gt.shape != (num_texts, num_videos):
            raise ValueError(f"the text_to_video mask is {tuple(gt.shape)}, the scores [{num_texts}, {num_videos}]")
        return gt
    gt = gt.long()
    if gt.shape != (num_texts,) or (num_texts and (gt.min() < 0 or gt.max() >= num_videos)):
        raise ValueError(f"text_to_video must be [{num_texts}] indices into {num_videos} videos")
    return text_video_masks(gt, num_videos)


def retrieval_metrics(sim: torch.Tensor, text_to_video: Sequence[int] | torch.Tensor) -> tuple[dict, dict]:
    """Text-to-video and video-to-text metrics of a similarity matrix.

    sim: [num_texts, num_videos]; text_to_video: the ground truth, long [num_texts] (each text's video; several
    texts may share one) or bool [num_texts, num_videos] (a text may have several videos). Each query's rank is
    the rank of its best-ranked ground truth: a video's v2t rank is the best rank of its captions, a text's t2v
    rank the best of its videos; videos without a caption are no query.
    Returns (metrics, ranks) with metrics "t2v_R@1" ... "v2t_MnR" plus "r1_sum" (= t2v R@1 + v2t R@1, the model
    selection key) and ranks {"t2v": [T], "v2t": [V'], "v2t_videos": [V'] (the video of each v2t query)}.
    """
    sim = sim.float().cpu()
    num_texts, num_videos = sim.shape
    mask = ground_truth_mask(text_to_video, num_texts, num_videos)
    queried = mask.any(dim=0).nonzero().squeeze(1)
    ranks = {"t2v": gt_ranks(sim, mask), "v2t": gt_ranks(sim.t()[queried], mask.t()[queried]),
             "v2t_videos": queried}
    metrics = {**rank_summary(ranks["t2v"], "t2v"), **rank_summary(ranks["v2t"], "v2t")}
    metrics["r1_sum"] = metrics["t2v_R@1"] + metrics["v2t_R@1"]
    return metrics, ranks


def format_table(results: dict[str, dict], title: str = "Retrieval") -> str:
    """One row per (name, direction): R@1/5/10/50, MdR, MnR, queries, and `tied` (queries whose ground truth ties
    another candidate) for the results that count them (re-ranking). `results` maps a name to metrics."""
    width = max([22] + [len(name) + 5 for name in results])
    tied = any(f"{d}_tied" in m for m in results.values() for d in ("t2v", "v2t"))
    head = (f"{'':<{width}}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'R@50':>7}{'MdR':>7}{'MnR':>8}{'queries':>9}"
            + (f"{'tied':>6}" if tied else ""))
    lines = [f"{title} -- {TIE_NOTE}" + ("; tied: queries whose best ground truth ties another candidate" if tied
                                         else ""), head, "-" * len(head)]
    for name, m in results.items():
        for d in ("t2v", "v2t"):
            if f"{d}_R@1" not in m:
                continue
            cells = "".join(f"{m[f'{d}_R@{k}']:>7.1f}" for k in RECALL_AT)
            lines.append(f"{name + ' ' + d:<{width}}{cells}{m[f'{d}_MdR']:>7.1f}{m[f'{d}_MnR']:>8.1f}"
                         f"{m[f'{d}_queries']:>9d}" + (f"{m.get(f'{d}_tied', ''):>6}" if tied else ""))
    return "\n".join(lines)


def per_query_records(sim: torch.Tensor, text_to_video: torch.Tensor, ranks: dict, video_ids: Sequence[str],
                      captions: Sequence[str], top: int = 10) -> list[dict]:
    """For error analysis: each query's top-`top` candidates with scores, its ground truths (video ids for a
    text, text indices for a video) and gt rank; text_to_video in either form of retrieval_metrics."""
    sim = sim.float().cpu()
    mask = ground_truth_mask(text_to_video, *sim.shape)
    records = []
    scores, idx = sim.topk(min(top, sim.shape[1]), dim=1)
    for t in range(sim.shape[0]):
        gt = [video_ids[v] for v in mask[t].nonzero().squeeze(1).tolist()]
        records.append({"direction": "t2v", "query": t, "text": captions[t], "gt": gt,
                        "gt_rank": int(ranks["t2v"][t]),
                        "top": [{"video_id": video_ids[int(j)], "score": round(float(s), 6)}
                                for s, j in zip(scores[t], idx[t])]})
    scores, idx = sim.t().topk(min(top, sim.shape[0]), dim=1)
    for q, v in enumerate(ranks["v2t_videos"].tolist()):
        gt = mask[:, v].nonzero().squeeze(1).tolist()
        records.append({"direction": "v2t", "query": v, "video_id": video_ids[v], "gt": gt,
                        "gt_rank": int(ranks["v2t"][q]),
                        "top": [{"text_index": int(j), "text": captions[int(j)], "score": round(float(s), 6)}
                                for s, j in zip(scores[v], idx[v])]})
    return records


def write_results(output_dir: str, prefix: str, metrics: dict, records: list[dict] | None = None) -> None:
    """<prefix>_metrics.json (+ <prefix>_per_query.jsonl) in output_dir, rank 0 only."""
    if not distributed.is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{prefix}_metrics.json"), "w") as f:
        json.dump({"note": TIE_NOTE, **metrics}, f, indent=2)
    if records is not None:
        with open(os.path.join(output_dir, f"{prefix}_per_query.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

# ----------------------------------------------------------------------------------------------- embedding


@dataclass
class EvalConfig:
    device: torch.device
    dtype: torch.dtype = torch.float32
    chunk: int = 8                  # clips per encoder forward (views of several videos share a chunk)
    max_text_len: int = 32
    video_mask_ratio: float = 0.0   # zero-shot only: a fixed tube mask per video (0 = every tube seen)
    seed: int = 0
    print_freq: int = 20
    distinct_captions: bool = False  # each distinct caption string is one query with all its videos (SSv2)
    num_clips: int = 1              # clips each view of num_frames_test frames is split into (clip ensemble)
    sparse_clips: bool = False      # clip j = frames j, j+k, ... (interleaved) instead of the j-th consecutive chunk
    ensemble: str = "lse"           # matching logits over clips: lse | mean | max | concat (one clip of all frames)
    frame_order: str = "none"       # none | reverse | shuffle | freeze: each clip's frames, for temporal tests
    offload: bool = False           # features (and similarities) on the CPU instead of the device
    match_mask_ratio: float = 0.0   # matching head: tube mask of each scored clip (0 = every tube seen)
    match_masks: int = 1            # with match_mask_ratio > 0: fixed masks per clip, log-odds averaged over them

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"eval_frame_ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.frame_order not in FRAME_ORDERS:
            raise ValueError(f"eval_frame_order must be one of {FRAME_ORDERS}, got {self.frame_order!r}")
        if self.num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {self.num_clips}")
        if not 0.0 <= self.match_mask_ratio < 1.0 or self.match_masks < 1:
            raise ValueError(f"match mask ratio must be in [0, 1) and masks >= 1, got {self.match_mask_ratio} and "
                             f"{self.match_masks}")

    @property
    def feature_device(self) -> torch.device:
        """Where features and similarity matrices live: the CPU with offload, else the encoding device."""
        return torch.device("cpu") if self.offload else self.device


ENSEMBLES = ("lse", "mean", "max", "concat")
FRAME_ORDERS = ("none", "reverse", "shuffle", "freeze")


def frame_permutation(num_frames: int, seed: int) -> torch.Tensor:
    """The shuffle order of --eval_frame_order shuffle: one permutation per (seed, clip length), never the
    identity when the clip has more than one frame (else shuffling would test nothing)."""
    rng = np.random.default_rng([seed, num_frames, 7])
    perm = rng.permutation(num_frames)
    while num_frames > 1 and (perm == np.arange(num_frames)).all():
        perm = rng.permutation(num_frames)
    return torch.from_numpy(perm)


def reorder_frames(clip: torch.Tensor, order: str, seed: int = 0) -> torch.Tensor:
    """clip [..., C, T, H, W] with its T frames reversed, shuffled (frame_permutation), or frozen (the middle frame
    repeated T times); "none" returns it unchanged."""
    t = clip.shape[-3]
    if order == "none":
        return clip
    if order == "reverse":
        return clip.flip(-3)
    if order == "shuffle":
        return clip.index_select(-3, frame_permutation(t, seed).to(clip.device))
    if order == "freeze":
        return clip.narrow(-3, t // 2, 1).expand_as(clip).contiguous()
    raise ValueError(f"unknown frame order {order!r}; one of {FRAME_ORDERS}")


def split_clips(video: torch.Tensor, num_clips: int, sparse: bool = False) -> torch.Tensor:
    """video [..., C, T, H, W] -> [..., k, C, T/k, H, W]: k consecutive chunks, or with sparse k interleaved clips
    (clip j = frames j, j+k, j+2k, ...), each spanning the whole video."""
    t = video.shape[-3]
    if t % num_clips:
        raise ValueError(f"{t} frames do not split into {num_clips} clips")
    if sparse:
        return video.unflatten(-3, (t // num_clips, num_clips)).movedim(-3, -5)
    return video.unflatten(-3, (num_clips, t // num_clips)).movedim(-4, -5)


def eval_clips(video: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """A view's frames [..., C, T', H, W] -> the clips the model sees [..., k, C, T, H, W] in cfg's frame order
    (one clip of all T' frames with the concat ensemble)."""
    k = 1 if cfg.ensemble == "concat" else cfg.num_clips
    return reorder_frames(split_clips(video, k, cfg.sparse_clips), cfg.frame_order, cfg.seed)


def aggregate_clip_scores(scores: torch.Tensor, ensemble: str) -> torch.Tensor:
    """[k, ...] matching scores of k clips -> [...]: logsumexp (SViTT's default), mean or max over clips, as QA's
    answer scores are ensembled (concat scores one clip: k = 1)."""
    return answer_ranking.ensemble_clip_scores(scores, "lse" if ensemble == "concat" else ensemble)


def require_video_mask(model: torch.nn.Module, instead: str) -> None:
    """A tube mask asked of a model that takes none (SViTT, dual encoders) is a ValueError saying what to do instead."""
    if not model.takes_video_mask:
        raise ValueError(f"{type(model).__name__} takes no video mask: {instead}")


def fixed_video_masks(indices: Sequence[int], grid: tuple[int, int, int], ratio: float, seed: int, draw: int = 0,
                      stream: str = "video_mask") -> torch.Tensor:
    """bool [B, N] tube masks that depend only on (seed, draw, video index, stream): the same for every run and
    rank (draw numbers several masks of one video)."""
    gen = masking_generator.TubeMaskingGenerator(grid, ratio)
    return torch.from_numpy(np.stack([gen(video_transforms.sample_rng(seed, draw, int(i), stream)) for i in indices]))


@torch.no_grad()
def encode_videos(model: torch.nn.Module, video: torch.Tensor, indices: Sequence[int],
                  cfg: EvalConfig) -> torch.Tensor:
    """video [B, V, C, T', H, W] (V views; uint8 pixels from the loader, normalised here chunk by chunk on the
    device) -> [B, D]. Each view is split into cfg's k clips (eval_clips); every clip is embedded and
    L2-normalised; the views of a clip are averaged and renormalised (as with one clip); the k clip features are
    then averaged WITHOUT renormalising, so text . video = the mean over clips of the cosine similarity."""
    b, v = video.shape[:2]
    clips = eval_clips(video, cfg)  # [B, V, k, C, T, H, W]
    k = clips.shape[2]
    clips = clips.flatten(0, 2)
    masks = None
    if cfg.video_mask_ratio > 0:
        require_video_mask(model, "evaluate it with video mask ratio 0")
        _, _, t, h, w = clips.shape
        masks = fixed_video_masks(indices, model.token_grid(t, h, w), cfg.video_mask_ratio, cfg.seed)
        masks = masks.repeat_interleave(v * k, dim=0)
    feats = []
    for start in range(0, len(clips), cfg.chunk):
        x = video_transforms.normalize_video(clips[start:start + cfg.chunk].to(cfg.device, non_blocking=True))
        with utils.autocast(cfg.device, cfg.dtype):
            if masks is None:
                f = model.encode_video(x)
            else:
                f = model.encode_video(x, video_mask=masks[start:start + cfg.chunk].to(cfg.device))
        feats.append(F.normalize(f.float(), dim=-1).to(cfg.feature_device))
    per_clip = F.normalize(torch.cat(feats).view(b, v, k, -1).mean(dim=1), dim=-1)
    return per_clip.mean(dim=1)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], cfg: EvalConfig,
                 batch_size: int = 64) -> torch.Tensor:
    """list of N captions -> [N, D] normalised (tokenised like the collator: pad to longest, truncate)."""
    tokenize = datasets.VideoTextCollator(tokenizer, max_text_len=cfg.max_text_len).tokenize
    feats = []
    for start in range(0, len(texts), batch_size):
        tok = tokenize(texts[start:start + batch_size])
        with utils.autocast(cfg.device, cfg.dtype):
            f = model.encode_text(tok["input_ids"].to(cfg.device), tok["attention_mask"].to(cfg.device))
        feats.append(F.normalize(f.float(), dim=-1).to(cfg.feature_device))
    if not feats:
        return torch.zeros(0, 0)
    return torch.cat(feats)


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, loader: Iterable[dict], tokenizer, cfg: EvalConfig,
                  with_text: bool = True) -> dict:
    """Embed a test-mode loader (each rank its share when its sampler is distributed) and gather the features.

    Returns {"video": [V, D], "text": [T, D], "text_to_video": long [T], "captions": [T], "indices": [V]} with
    videos in dataset-index order (duplicates a padded distributed sampler adds are dropped) and each video's
    captions in annotation order. With cfg.distinct_captions the texts are the distinct caption strings (in order
    of first appearance) and "text_to_video" is bool [T, V]: every video that carries the caption.
    """
    was_training = model.training
    model.eval()
    logger = utils.MetricLogger(cfg.print_freq)
    videos, texts, indices, captions = [], [], [], []
    total = len(loader) if hasattr(loader, "__len__") else 0
    for batch in logger.log_every(loader, total=total, header="Embed",
                                   items_per_step=getattr(loader, "batch_size", None) or 1, unit="videos"):
        idx = [int(i) for i in batch["index"]]
        videos.append(encode_videos(model, batch["video"], idx, cfg))
        caps = [list(c) if with_text else [] for c in batch["captions"]]
        texts.append(encode_texts(model, tokenizer, [c for cs in caps for c in cs], cfg))
        indices += idx
        captions += caps
    model.train(was_training)
    return _merge_ranks(_rows(videos), _rows(texts), indices, captions, cfg.distinct_captions)


def _rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Batches' features [b, D] -> one contiguous [n, D] (torch.zeros(0, 0) when there are none)."""
    parts = [p for p in parts if p.numel()]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def _merge_ranks(video: torch.Tensor, text: torch.Tensor, indices: list[int], captions: list[list[str]],
                 distinct_captions: bool = False) -> dict:
    """This rank's features -> every rank's, in dataset-index order (the first copy of an index a padded sampler
    repeats is kept). Features and indices travel as contiguous tensors (distributed.gather_rows); only the
    caption strings are pickled. distinct_captions: one text per distinct string, its ground truth every video
    that carries it (bool [T, V] "text_to_video")."""
    video = distributed.gather_rows(video)
    text = distributed.gather_rows(text)
    indices = distributed.gather_rows(torch.tensor(indices, dtype=torch.long)).tolist()
    captions = [caps for part in distributed.gather_objects(captions) for caps in part]
    starts = np.cumsum([0] + [len(c) for c in captions]).tolist()
    first = {}
    for row, i in enumerate(indices):
        first.setdefault(i, row)
    order = sorted(first)
    rows = [first[i] for i in order]
    text_rows = [r for row in rows for r in range(starts[row], starts[row + 1])]
    t2v = [pos for pos, row in enumerate(rows) for _ in captions[row]]
    texts = [c for row in rows for c in captions[row]]
    merged = {"video": video[rows] if order else torch.zeros(0, 0),
              "text": text[text_rows] if text_rows else torch.zeros(0, 0),
              "text_to_video": torch.tensor(t2v, dtype=torch.long), "captions": texts, "indices": order}
    return _by_distinct_caption(merged) if distinct_captions else merged


def _by_distinct_caption(merged: dict) -> dict:
    """One text query per distinct caption string (its first copy's features: the same string embeds alike), its
    ground truths every video carrying it: bool [T, V] "text_to_video"."""
    first: dict[str, int] = {}
    for k, caption in enumerate(merged["captions"]):
        first.setdefault(caption, k)
    position = {caption: q for q, caption in enumerate(first)}
    gt = torch.zeros(len(first), len(merged["indices"]), dtype=torch.bool)
    for caption, v in zip(merged["captions"], merged["text_to_video"].tolist()):
        gt[position[caption], v] = True
    keep = list(first.values())
    return {**merged, "text": merged["text"][keep] if keep else merged["text"], "text_to_video": gt,
            "captions": list(first)}


def evaluate(model: torch.nn.Module, loader: Iterable[dict], tokenizer, cfg: EvalConfig) -> dict:
    """Embed, score (cosine similarity [T, V]) and rank. Returns the embed_dataset dict plus "sim",
    "metrics" and "ranks"."""
    emb = embed_dataset(model, loader, tokenizer, cfg)
    sim = emb["text"].to(cfg.feature_device) @ emb["video"].to(cfg.feature_device).t()
    metrics, ranks = retrieval_metrics(sim, emb["text_to_video"])
    return {**emb, "sim": sim, "metrics": metrics, "ranks": ranks}


# ----------------------------------------------------------------------------------------------- eval loader

DEFAULT_EVAL_HOST_MEMORY_GB = 8.0  # per process: the views a test loader may hold at once (--eval_host_memory_gb)
PREFETCH_FACTORS = (2, 1)          # batches each loader worker keeps ready: torch's default first
GB = 1e9
SHARED_MEMORY_DIR = "/dev/shm"     # where loader workers put the batches they hand to the main process (Linux)


@dataclass(frozen=True)
class EvalLoaderPlan:
    """How an evaluation loader is sized, and the host memory its batches of uint8 views take at most.

    A batch holds batch_size videos of video_nbytes each. With workers, every worker keeps prefetch_factor
    batches ready in shared memory and the main process holds the one being embedded: num_workers x
    prefetch_factor + 1 batches in flight (1 without workers). Items being decoded in a worker and the encoder's
    float chunk (cfg.chunk clips) come on top; they are small next to the batches of many views.
    """
    batch_size: int
    num_workers: int
    prefetch_factor: int  # 0 without workers
    video_nbytes: int
    host_bound: int       # bytes allowed in flight per process
    shm_bound: int | None = None  # this process's share of /dev/shm (batches from workers live there)

    @property
    def batches_in_flight(self) -> int:
        return self.num_workers * self.prefetch_factor + 1

    @property
    def batch_nbytes(self) -> int:
        return self.batch_size * self.video_nbytes

    @property
    def nbytes(self) -> int:
        return eval_loader_bytes(self.video_nbytes, self.batch_size, self.num_workers, self.prefetch_factor)

    @property
    def fits(self) -> bool:
        in_shm = self.num_workers > 0 and self.shm_bound is not None
        return self.nbytes <= self.host_bound and not (in_shm and self.nbytes > self.shm_bound)

    def describe(self, asked_batch: int, asked_workers: int) -> str:
        """The start-up line: the estimate, what it counts, and what was changed to stay under the bound."""
        bound = f"--eval_host_memory_gb {self.host_bound / GB:g}"
        if self.shm_bound is not None and self.shm_bound < self.host_bound:
            bound += f", this process's share of {SHARED_MEMORY_DIR} {_size(self.shm_bound)}"
        changed = []
        if self.batch_size != asked_batch:
            changed.append(f"batch {asked_batch} -> {self.batch_size} video(s)")
        if self.num_workers != asked_workers:
            changed.append(f"workers {asked_workers} -> {self.num_workers}")
        workers = (f"{self.num_workers} workers x prefetch {self.prefetch_factor} + 1 = {self.batches_in_flight} "
                   "batches in flight" if self.num_workers else "no loader workers: 1 batch in flight")
        line = (f"Evaluation loader: {self.batch_size} video(s)/batch x {_size(self.video_nbytes)} of uint8 views "
                f"= {_size(self.batch_nbytes)} a batch; {workers}: estimated {_size(self.nbytes)} host memory per "
                f"process (bound: {bound})")
        if changed:
            line += "; to stay under it: " + ", ".join(changed)
        if not self.fits:
            line = ("WARNING: " + line + "; even one video exceeds the bound: evaluating without loader workers, "
                    "raise --eval_host_memory_gb (or the container's shared memory, e.g. docker --shm-size)")
        return line


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.1f} MB"


def eval_loader_bytes(video_nbytes: int, batch_size: int, num_workers: int, prefetch_factor: int) -> int:
    """Bytes of the batches an evaluation loader holds at once: one batch x (workers x prefetch + 1)."""
    return video_nbytes * batch_size * (num_workers * prefetch_factor + 1)


def plan_eval_loader(video_nbytes: int, batch_size: int, num_workers: int, host_bound: int,
                     shm_bound: int | None = None) -> EvalLoaderPlan:
    """The largest loader whose batches in flight stay under the bounds (see EvalLoaderPlan).

    Keeps the asked workers and prefetch 2 and lowers the videos per batch first (the encoder's chunk of clips
    per forward does not change, so neither does the speed on the device); then prefetch 1; then fewer workers,
    down to none (no shared memory at all). When not even one video fits: one video per batch, no workers, and
    the plan says it does not fit."""
    for workers in range(num_workers, -1, -1):
        for prefetch in PREFETCH_FACTORS if workers else (0,):
            per_batch = eval_loader_bytes(video_nbytes, 1, workers, prefetch)
            bound = host_bound if not workers or shm_bound is None else min(host_bound, shm_bound)
            videos = min(batch_size, bound // per_batch)
            if videos >= 1:
                return EvalLoaderPlan(int(videos), workers, prefetch, video_nbytes, host_bound, shm_bound)
    return EvalLoaderPlan(1, 0, 0, video_nbytes, host_bound, shm_bound)


def shared_memory_share() -> int | None:
    """This process's share of the machine's shared memory (/dev/shm's size / local processes), or None where
    there is no such folder. A container's /dev/shm is often 64 MB: loader workers' batches must fit in it."""
    try:
        st = os.statvfs(SHARED_MEMORY_DIR)
    except OSError:
        return None
    return st.f_frsize * st.f_blocks // distributed.local_world_size()


def build_eval_loader(dataset, tokenizer, batch_size: int, num_workers: int = 0, max_text_len: int = 32,
                      dist_eval: bool = False, host_memory_gb: float = DEFAULT_EVAL_HOST_MEMORY_GB,
                      collate_fn: Callable | None = None, device: torch.device | None = None
                      ) -> torch.utils.data.DataLoader:
    """Test-mode loader; with dist_eval each rank takes an interleaved share (padded by repeats, dropped later).
    collate_fn: the batches' collator (default: a VideoTextCollator with max_text_len; QA passes its own).
    device: where the batches go; a CUDA device gets them in pinned memory (asynchronous copies).

    Sized by plan_eval_loader so its batches of uint8 views stay under host_memory_gb per process (and this
    process's share of /dev/shm); prints the estimate. The loader's batch_size may be below the asked one."""
    if host_memory_gb <= 0:
        raise ValueError(f"--eval_host_memory_gb must be > 0, got {host_memory_gb}")
    plan = plan_eval_loader(dataset.video_nbytes(), batch_size, num_workers, int(host_memory_gb * GB),
                            shared_memory_share() if num_workers else None)
    print(plan.describe(batch_size, num_workers), flush=True)
    sampler = None
    if dist_eval and distributed.get_world_size() > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=distributed.get_world_size(),
                                                      rank=distributed.get_rank(), shuffle=False)
    collator = collate_fn or datasets.VideoTextCollator(tokenizer, max_text_len=max_text_len)
    return torch.utils.data.DataLoader(dataset, batch_size=plan.batch_size, sampler=sampler, shuffle=False,
                                       num_workers=plan.num_workers, collate_fn=collator, drop_last=False,
                                       prefetch_factor=plan.prefetch_factor or None,
                                       pin_memory=device is not None and device.type == "cuda")


# ----------------------------------------------------------------------------------------------- re-ranking


def candidate_pairs(sim: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """(text, video) pairs of every text's top-k videos and every video's top-k texts; sim [T, V]. A pair in both
    top-k lists is scored once: T x k + V x k pairs minus the overlap."""
    sim = sim.float().cpu()
    pairs = set()
    top_v = sim.topk(min(k, sim.shape[1]), dim=1).indices
    pairs.update((t, int(v)) for t in range(sim.shape[0]) for v in top_v[t])
    top_t = sim.topk(min(k, sim.shape[0]), dim=0).indices
    pairs.update((int(t), v) for v in range(sim.shape[1]) for t in top_t[:, v])
    return sorted(pairs, key=lambda p: (p[1], p[0]))


def match_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """[..., 2] matching-head logits -> log P(match) / P(no match) = logit_1 - logit_0 (the class-1 logit relative
    to the other class, so two-class heads of any offset rank alike)."""
    return logits[..., 1] - logits[..., 0]


class FirstViews(torch.utils.data.Dataset):
    """What re-ranking reads of each video: position pos -> the first view [C, T', H, W] (uint8) of the test-mode
    dataset's item rows[pos] (rows: the evaluation's dataset indices, in the order of its similarity matrix)."""

    def __init__(self, dataset: torch.utils.data.Dataset, rows: Sequence[int]) -> None:
        self.dataset, self.rows = dataset, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, pos: int) -> torch.Tensor:
        return self.dataset[self.rows[pos]]["video"][0]


@torch.no_grad()
def match_scores(match_model: torch.nn.Module, pairs: Sequence[tuple[int, int]], videos: Sequence[torch.Tensor],
                 captions: Sequence[str], tokenizer, cfg: EvalConfig, num_workers: int = 0
                 ) -> dict[tuple[int, int], float]:
    """Matching-head score of each (text, video) pair: the log-odds of match (match_log_odds) of each of the
    video's clips (eval_clips: cfg's k clips, frame order and ensemble), aggregated over clips by cfg.ensemble.

    Each video is decoded once (`videos[pos]` -> uint8 [C, T', H, W], e.g. FirstViews; read by num_workers
    loader processes as evaluation reads its clips, pinned for a CUDA device, normalised on the device) and
    paired with all its candidate texts in chunks of cfg.chunk; a model with `match_video_cache` computes its
    video-only part once per clip. Videos are dealt to ranks in turn (each scores its share, with progress and
    ETA); the scores are gathered once at the end.
    """
    was_training = match_model.training
    match_model.eval()
    by_video: dict[int, list[int]] = {}
    for t, v in pairs:
        by_video.setdefault(v, []).append(t)
    mine = sorted(by_video)[distributed.get_rank()::distributed.get_world_size()]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(videos, mine), batch_size=None,
                                         num_workers=num_workers, pin_memory=cfg.device.type == "cuda")
    tokenize = datasets.VideoTextCollator(tokenizer, max_text_len=cfg.max_text_len).tokenize
    scores: dict[tuple[int, int], float] = {}
    logger = utils.MetricLogger(cfg.print_freq)
    for video, v in zip(logger.log_every(loader, total=len(mine), header="Re-rank", unit="videos"), mine):
        clips = eval_clips(video.to(cfg.device, non_blocking=True), cfg)  # [k, C, T, H, W]
        texts = by_video[v]
        masks = matching_masks(match_model, clips.shape, v, cfg)
        per_clip = torch.stack([_score_clip(match_model, video_transforms.normalize_video(clip.unsqueeze(0)), texts,
                                            captions, tokenize, cfg, masks) for clip in clips])
        agg = aggregate_clip_scores(per_clip, cfg.ensemble).tolist()
        scores.update({(t, v): x for t, x in zip(texts, agg)})
    match_model.train(was_training)
    merged = {}
    for part in distributed.gather_objects(scores):
        merged.update(part)
    return merged


def matching_masks(match_model: torch.nn.Module, clips_shape: torch.Size, video_index: int, cfg: EvalConfig
                   ) -> list[torch.Tensor | None]:
    """The tube masks the matching head sees each clip of one video through: [None] (every tube) unless
    cfg.match_mask_ratio > 0, then cfg.match_masks fixed masks bool [1, N] that depend only on (seed, video
    index, mask number). Why: a head trained on the pre-training mask's visible tubes (SimVTP's VTM, pooled over
    about 20 tubes and the caption) sees a different mix of tokens with every tube visible."""
    if cfg.match_mask_ratio <= 0:
        return [None]
    require_video_mask(match_model, "score matches with mask ratio 0")
    grid = match_model.token_grid(*clips_shape[-3:])
    return [fixed_video_masks([video_index], grid, cfg.match_mask_ratio, cfg.seed, m, "match_mask").to(cfg.device)
            for m in range(cfg.match_masks)]


def _score_clip(match_model: torch.nn.Module, clip: torch.Tensor, texts: list[int], captions: Sequence[str],
                tokenize: Callable, cfg: EvalConfig, masks: Sequence[torch.Tensor | None] = (None,)) -> torch.Tensor:
    """Log-odds [len(texts)] of one normalised clip [1, C, T, H, W] with each text, the video part cached once;
    averaged over `masks` (matching_masks)."""
    cached = None
    if model_registry.supports(match_model, "match_video_cache"):  # optional in the contract
        with utils.autocast(cfg.device, cfg.dtype):
            cached = match_model.match_video_cache(clip)
    out = []
    for start in range(0, len(texts), cfg.chunk):
        ts = texts[start:start + cfg.chunk]
        tok = tokenize([captions[t] for t in ts])
        ids, mask = tok["input_ids"].to(cfg.device), tok["attention_mask"].to(cfg.device)
        per_mask = []
        for video_mask in masks:  # a mask only when asked for: the contract's match_logits needs no mask argument
            tubes = {} if video_mask is None else {"video_mask": video_mask.expand(len(ts), -1)}
            with utils.autocast(cfg.device, cfg.dtype):
                if cached is not None:
                    logits = match_model.match_logits(None, ids, mask, **tubes,
                                                      video_cache=cached.expand(len(ts), *cached.shape[1:]))
                else:
                    logits = match_model.match_logits(clip.expand(len(ts), *clip.shape[1:]), ids, mask, **tubes)
            per_mask.append(match_log_odds(logits.float()).cpu())
        out.append(torch.stack(per_mask).mean(dim=0))
    return torch.cat(out)


def held_out_matching_pairs(sim: torch.Tensor, text_to_video: torch.Tensor, seed: int = 0
                            ) -> dict[str, list[tuple[tuple[int, int], bool]]]:
    """Matching pairs of an evaluation set, ((text, video), is_match), as the matching losses draw them: per video
    its first caption with it, with a non-matching video and a non-matching caption with it. "random": the
    non-matching ones drawn uniformly (seeded: the same at every evaluation); "hard": the most similar by the
    contrastive scores sim [T, V]. A constant answer scores 2/3 on either."""
    gt = ground_truth_mask(text_to_video, *sim.shape)
    sim = sim.float().cpu()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {"random": [], "hard": []}
    for v in range(sim.shape[1]):
        texts = gt[:, v].nonzero().flatten()
        other_videos, other_texts = (~gt[texts[0]]).nonzero().flatten(), (~gt[:, v]).nonzero().flatten()
        if not len(texts) or not len(other_videos) or not len(other_texts):
            continue
        t = int(texts[0])
        for kind, pick in (("random", lambda c, _s: int(c[torch.randint(len(c), (1,), generator=g)])),
                           ("hard", lambda c, s: int(c[s[c].argmax()]))):
            out[kind] += [((t, v), True), ((t, pick(other_videos, sim[t])), False),
                          ((pick(other_texts, sim[:, v]), v), False)]
    return out


def held_out_matching_accuracy(match_model: torch.nn.Module, res: dict, dataset, tokenizer, cfg: EvalConfig,
                               seed: int = 0, num_workers: int = 0) -> dict[str, float]:
    """Accuracy (%) of the matching head (log-odds > 0 = match) on held_out_matching_pairs of an evaluation's
    result `res` (evaluate's dict; `dataset` its test-mode dataset, first view of each video): "match_acc" with
    random, "match_acc_hard" with hard non-matches. Every rank must call it (scores are gathered)."""
    kinds = held_out_matching_pairs(res["sim"], res["text_to_video"], seed)
    pairs = sorted({pair for labelled in kinds.values() for pair, _ in labelled}, key=lambda p: (p[1], p[0]))
    scores = match_scores(match_model, pairs, FirstViews(dataset, res["indices"]), res["captions"], tokenizer, cfg,
                          num_workers=num_workers)
    out = {}
    for kind, labelled in kinds.items():
        right = sum((scores[pair] > 0) == is_match for pair, is_match in labelled)
        out["match_acc" if kind == "random" else f"match_acc_{kind}"] = 100.0 * right / max(len(labelled), 1)
    return out


def rerank_metrics(sim: torch.Tensor, text_to_video: torch.Tensor, scores: dict[tuple[int, int], float],
                   k: int, contrastive_scale: float = 0.0) -> dict[str, float]:
    """Metrics after re-ordering each query's top-k by matching score (the rest keep their order below); with
    contrastive_scale s > 0 by matching log-odds + s x similarity (s = 1 / temperature: the contrastive logit, the
    scale the matching negatives are drawn at; BLIP adds its head's logit to the plain cosine), else by the matching
    score alone (the SViTT release).

    Re-scored candidates are lifted above every similarity (max + 1 + score - the lowest score), so a ground truth
    outside the top-k keeps its similarity rank; t2v uses the per-text top-k, v2t the per-video top-k.
    "t2v_tied" / "v2t_tied": queries whose best ground truth ties another candidate (tied_ground_truths).
    """
    sim = sim.float().cpu()
    if contrastive_scale:
        scores = {(t, v): x + contrastive_scale * float(sim[t, v]) for (t, v), x in scores.items()}
    low = min(scores.values()) if scores else 0.0
    lift = float(sim.max()) + 1.0 - low
    s_t2v, s_v2t = sim.clone(), sim.clone()
    for t, v_idx in enumerate(sim.topk(min(k, sim.shape[1]), dim=1).indices.tolist()):
        for v in v_idx:
            s_t2v[t, v] = lift + scores[(t, v)]
    top_t = sim.topk(min(k, sim.shape[0]), dim=0).indices
    for v in range(sim.shape[1]):
        for t in top_t[:, v].tolist():
            s_v2t[t, v] = lift + scores[(t, v)]
    m_t2v, _ = retrieval_metrics(s_t2v, text_to_video)
    m_v2t, _ = retrieval_metrics(s_v2t, text_to_video)
    out = {**{x: y for x, y in m_t2v.items() if x.startswith("t2v_")},
           **{x: y for x, y in m_v2t.items() if x.startswith("v2t_")}, "rerank_k": k}
    mask = ground_truth_mask(text_to_video, *sim.shape)
    queried = mask.any(dim=0)
    out["t2v_tied"] = tied_ground_truths(s_t2v, mask)
    out["v2t_tied"] = tied_ground_truths(s_v2t.t()[queried], mask.t()[queried])
    out["r1_sum"] = out["t2v_R@1"] + out["v2t_R@1"]
    return out

# ----------------------------------------------------------------------------------------------- export


def save_embeddings(out_path: str, meta: dict, video: torch.Tensor | None = None,
                    video_ids: Sequence[str] = (), text: torch.Tensor | None = None,
                    texts: Sequence[str] = ()) -> list[str]:
    """Write L2-normalised embeddings for search outside this codebase; returns the files written.

    .safetensors: tensors "video" [Nv, D] / "text" [Nt, D], ids as JSON strings in the metadata.
    .npy: one float32 array, video rows first then text rows, and a sidecar <name>.json with per-row "ids" and
    "kinds" ("video" | "text").
    """
    parts = [(kind, feats.float().contiguous(), list(ids)) for kind, feats, ids in
             (("video", video, video_ids), ("text", text, texts)) if feats is not None]
    if not parts:
        raise ValueError("nothing to export: give videos (--data_path / --video_dir) and/or --text_file")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    info = {**meta, "normalized": True, "dim": int(parts[0][1].shape[1])}
    if out_path.endswith(".safetensors"):
        from safetensors.torch import save_file

        import checkpoint  # atomic, with the umask's permissions (safetensors alone writes 0600)
        text_meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in info.items()}
        text_meta.update({f"{kind}_ids": json.dumps(ids) for kind, _, ids in parts})
        checkpoint.write_atomic(out_path, lambda tmp: save_file({kind: feats for kind, feats, _ in parts}, tmp,
                                                                 metadata=text_meta))
        return [out_path]
    if not out_path.endswith(".npy"):
        raise ValueError(f"{out_path}: export to a .npy or .safetensors file")
    np.save(out_path, torch.cat([f for _, f, _ in parts]).numpy())
    sidecar = os.path.splitext(out_path)[0] + ".json"
    with open(sidecar, "w") as f:
        json.dump({**info, "ids": [i for _, _, ids in parts for i in ids],
                   "kinds": [kind for kind, _, ids in parts for _ in ids]}, f, indent=1)
    return [out_path, sidecar]


def read_video_embeddings(path: str) -> tuple[torch.Tensor, list[str]]:
    """The video rows of a save_embeddings file and their ids (.npy with its .json sidecar, or .safetensors)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return f.get_tensor("video").float(), json.loads(f.metadata()["video_ids"])
    if not path.endswith(".npy"):
        raise ValueError(f"{path}: expected an export written by --export_embeddings (.npy or .safetensors)")
    sidecar = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(sidecar):
        raise FileNotFoundError(f"{path}: its sidecar {sidecar} (row ids) is missing")
    info = json.load(open(sidecar))
    rows = torch.from_numpy(np.load(path)).float()
    keep = [i for i, kind in enumerate(info["kinds"]) if kind == "video"]
    if not keep:
        raise ValueError(f"{path}: the export holds no video rows")
    return rows[keep], [info["ids"][i] for i in keep]
