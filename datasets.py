"""The datasets and collators the loaders run: video-caption pairs (pre-training, fine-tuning, retrieval
evaluation) and video QA, the BERT tokenizer they use, and the broken-media policy of training.

Flow (one direction)::

    annotations.read_record_table(file) -> RecordTable        (annotations.read_annotations for evaluation lists)
    VideoTextDataset[i]    -> decode only the sampled frames (video_io, decord | PyAV), one crop for the whole clip
                              (video_transforms), uint8 video [C, T, H, W] (+ tube mask [N], a caption)
    VideoTextCollator      -> batch: uint8 video [B, C, T, H, W], input_ids / attention_mask [B, L], MLM ids /
                              labels (through the loader workers' shared memory: 1 byte a pixel value)
    video_transforms.normalize_video(video) -> on the device, right before the model: normalised float32 video

Video QA: VideoQADataset (the clips of VideoTextDataset + question and weighted answers of qa_annotations.QARecord),
VideoQACollator (question and answer tokens, one answer row per distinct answer; its docstring lists the keys);
for evaluation VideoQATestSet + VideoQATestCollator (each video decoded once with all its questions).

Broken training videos (missing, empty, undecodable) never stop a run by themselves: a sample whose video is broken
falls through to the next readable video along a walk of the whole list that is a function of (seed, epoch,
index), so every process and every resume picks the same substitute. Items carry the broken files they met, so the
main process can name each once and measure the broken share (engine_for_pretraining.BrokenVideos). Files of an
exclude list (annotations.read_exclude_list) are never opened.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
import torch

from annotations import MATCH_BY, RecordTable, Span, VideoRecord, video_id_of
from qa_annotations import QARecord
from video_io import VideoDecodeError, backend_installed, one_line, open_video, resolve_backend
from video_transforms import (check_sample_type, copy_stream, equal_row_count, eval_clip_indices, eval_views,
                              sample_rng, span_frames, train_clip_transform, train_frame_indices)

BERT_VOCAB_SIZE = 30522
BERT_SPECIAL_IDS = {"pad_token_id": 0, "cls_token_id": 101, "sep_token_id": 102, "mask_token_id": 103}
DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bert-base-uncased")


class BrokenDataError(RuntimeError):
    """Too much of the training list is broken to go on; the message gives the share, some files and the fix."""

    def __init__(self, message: str) -> None:
        # a data-loader worker's error is re-raised in the main process as this type with the worker's traceback
        # in front: keep the message a user needs, not the traceback
        if "Original Traceback" in message and f"{type(self).__name__}: " in message:
            message = message.rsplit(f"{type(self).__name__}: ", 1)[1].strip()
        super().__init__(message)


def check_hint(anno: str = "<annotation file>", data_root: str | None = "<root>", report: str = "check.json") -> str:
    """How to find every broken video of a list before training, and skip them unopened."""
    root = f" --data_root {data_root}" if data_root else ""
    return (f"find every broken file with `python video_tools.py check --anno {anno}{root} --report {report}`, then "
            f"train with --exclude_list {report}")


# ----------------------------------------------------------------------------------------------- tokenizer


def checkpoint_tokenizer(given: str | None, saved_args: dict):
    """The tokenizer for a checkpoint: `given` (a flag), else the one its training run used (when that path exists
    here), else the shipped vocabulary."""
    path = given or saved_args.get("tokenizer")
    if path and not given and not os.path.exists(path):
        print(f"note: the checkpoint's tokenizer {path} is not here; using the shipped vocabulary")
        path = None
    return build_tokenizer(path)


def build_tokenizer(path: str | os.PathLike | None = None):
    """BERT WordPiece tokenizer (transformers' BertTokenizerFast), from local files only.

    path: a directory with vocab.txt (or tokenizer files), or a vocab.txt file; default the shipped
    assets/bert-base-uncased. Loaded with from_pretrained on a directory because in transformers 5
    BertTokenizerFast(vocab_file=...) silently builds a 5-entry vocabulary. Checks the size (30522) and the
    special ids the masking and the model rely on ([PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103).
    """
    from transformers import BertTokenizerFast

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork after the parent tokenised
    source = os.fspath(path) if path is not None else DEFAULT_TOKENIZER_DIR
    if not os.path.exists(source):
        raise FileNotFoundError(f"tokenizer path {source} does not exist; give a directory holding vocab.txt or a "
                                "vocab.txt file (nothing is downloaded)")
    tmp = None
    try:
        if os.path.isfile(source):
            if os.path.basename(source) == "vocab.txt":
                folder = os.path.dirname(os.path.abspath(source))
            else:  # from_pretrained wants a directory with a file named vocab.txt
                tmp = folder = tempfile.mkdtemp(prefix="simvtp_vocab_")
                shutil.copyfile(source, os.path.join(tmp, "vocab.txt"))
        else:
            folder = source
            if not any(os.path.exists(os.path.join(folder, f)) for f in ("vocab.txt", "tokenizer.json")):
                raise FileNotFoundError(f"{folder} holds neither vocab.txt nor tokenizer.json")
        tokenizer = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if len(tokenizer) != BERT_VOCAB_SIZE:
        raise ValueError(f"tokenizer from {source} has {len(tokenizer)} entries, expected the bert-base-uncased "
                         f"vocabulary of {BERT_VOCAB_SIZE}")
    wrong = {k: getattr(tokenizer, k) for k, v in BERT_SPECIAL_IDS.items() if getattr(tokenizer, k) != v}
    if wrong:
        raise ValueError(f"tokenizer from {source} has special ids {wrong}, expected {BERT_SPECIAL_IDS}")
    return tokenizer


# ----------------------------------------------------------------------------------------------- dataset

def fallthrough_order(index: int, num_records: int, rng: np.random.Generator) -> Iterator[int]:
    """The records a training sample tries, in order: its own, then every record once along a stride walk from a
    random start (stride coprime with the list length), both drawn from the sample's own generator. A pure function
    of the generator, so every process and every resume picks the same substitute; it ends after the whole list,
    so no run of broken files can make it give up early."""
    yield index
    if num_records < 2:
        yield from range(num_records)
        return
    start = int(rng.integers(num_records))
    stride = int(rng.integers(1, num_records))
    while math.gcd(stride, num_records) != 1:
        stride = int(rng.integers(1, num_records))
    for k in range(num_records):
        yield (start + k * stride) % num_records


class VideoTextDataset(torch.utils.data.Dataset):
    """Video-caption pairs for pre-training / fine-tuning ("train") and retrieval evaluation ("test").

    train item: {"video": uint8 [3, T, S, S], "caption": str, "index": i, "epoch": e,
                 "read": 1 if the sample's own video was opened (0 when excluded), "broken": 1 if it was broken,
                 "broken_videos": [(path, error)] every broken file this sample met,
                 "video_mask": bool [N] (with mask_generator)} — frames by sample_type, multi-scale crop.
    clips_per_video C > 1 (repeated sampling, as in MAE-ST and VideoMAE V2): an item reads its video once and
    gives C clips, each with its own frames, crop and mask ("video" [C, 3, T, S, S], "video_mask" [C, N],
    "match_id" = i so the clips are each other's positives); the dataset then has ceil(videos / C) items per
    epoch, a different share of the videos each epoch (every video once per C epochs), so an epoch keeps its
    number of clips and steps while reading C times fewer videos. Item k of an epoch is video record_of(k); "index"
    is always the record's index.
    test item:  {"video": uint8 [V, 3, T, S, S] (V = test_num_segment x test_num_crop), "captions": [str],
                 "index": i}.
    sample_type (SAMPLE_TYPES) is how this dataset's clips take their frames: stride (VideoMAE: a random window at
    sampling_rate in training, test_num_segment windows spread over the video in evaluation), rand (one random
    frame of each of num_frames equal segments of the whole video) or middle (each segment's middle frame; with
    test_num_segment = k views, view j the frame at (j + 0.5) / k of each segment). Random frames come from
    sample_rng: (seed, epoch, index) in training, (seed, 0, index) in evaluation (the same at every evaluation).
    In training a broken video is replaced by the next readable one along fallthrough_order (its caption goes with
    it; crop and frame draws stay the sample's). Files in `self.broken` (known broken: found by this process, or
    told by the main process) are not opened again; records in `excluded` are never opened. A BrokenDataError is
    raised only when no record of the list can be read. In test mode a broken video is an error: the test set is
    never silently changed.

    records: a RecordTable (read_record_table) or a list of VideoRecord, which is turned into one. A record's span
    restricts every frame plan (train and test) to that part of its video (span_frames).
    match_by "caption" (training): items carry "match_id", the id of the drawn caption's string, so videos with the
    same caption are positives of each other in the contrastive loss (AnnotationFormat).
    Call set_epoch(e) before each epoch (data-loader workers copy the dataset when an epoch's iterator starts,
    so do not use persistent_workers; that copy also carries the broken files the main process knows by then).
    """

    def __init__(self, records: Sequence[VideoRecord] | RecordTable, mode: str = "train", num_frames: int = 16,
                 sampling_rate: int = 4, input_size: int = 224, short_side_size: int = 224,
                 test_num_segment: int = 1, test_num_crop: int = 1, video_backend: str = "auto", seed: int = 0,
                 mask_generator=None, excluded: Collection[int] = (), sample_type: str = "stride",
                 match_by: str = "video", decode_threads: int = 1, clips_per_video: int = 1) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if match_by not in MATCH_BY:
            raise ValueError(f"match_by must be one of {MATCH_BY}, got {match_by!r}")
        check_sample_type(sample_type)
        if not isinstance(records, RecordTable):
            records = RecordTable.from_records(records)
        if not records:
            raise ValueError("no records: the annotation file listed no videos")
        if mode == "train":
            empty = np.flatnonzero(records.caption_counts() == 0)
            if len(empty):
                raise ValueError(f"{len(empty)} training records have no caption, e.g. {records.path(empty[0])}")
        if mode == "test" and short_side_size < input_size:
            raise ValueError(f"short_side_size {short_side_size} must be >= input_size {input_size}")
        if min(num_frames, sampling_rate, input_size, test_num_segment, test_num_crop, decode_threads) < 1:
            raise ValueError("num_frames, sampling_rate, input_size, test_num_segment, test_num_crop and "
                             "decode_threads must be >= 1")
        if clips_per_video < 1 or (mode == "test" and clips_per_video != 1):
            raise ValueError(f"clips_per_video must be >= 1 (and 1 in test mode), got {clips_per_video}")
        self.excluded = frozenset(int(i) for i in excluded)
        if mode == "test" and self.excluded:
            raise ValueError("an exclude list applies to training only (the test set is never silently changed)")
        if len(self.excluded) >= len(records):
            raise ValueError(f"the exclude list names all {len(records)} videos of the training list")
        self.records = records  # columns, not objects: forked loader workers share them, not copy them
        self.mode = mode
        self.num_frames, self.sampling_rate = int(num_frames), int(sampling_rate)
        self.sample_type = sample_type
        self.input_size, self.short_side_size = int(input_size), int(short_side_size)
        self.test_num_segment, self.test_num_crop = int(test_num_segment), int(test_num_crop)
        self.backend = resolve_backend(video_backend)
        self.decode_threads = int(decode_threads)
        # "auto" also means: when the first backend fails on a file, try the other one (when it imports) before
        # calling the file broken (decord 0.6 cannot read some frame widths, e.g. 48 or 72 px, that PyAV decodes)
        other = "decord" if self.backend == "pyav" else "pyav"
        self.fallback_backend = other if video_backend == "auto" and backend_installed(other) else None
        self.seed = int(seed)
        self.mask_generator = mask_generator
        self.clips_per_video = int(clips_per_video)
        self.epoch = 0
        self._video_order: np.ndarray | None = None  # with clips_per_video > 1: this block of epochs' permutation
        self.broken: dict[str, str] = {}  # path -> error of files known broken (not opened again)
        # one id per caption string of the table (numpy: shared by forked workers, not copied)
        self.caption_ids = records.caption_match_ids() if match_by == "caption" and mode == "train" else None

    def __len__(self) -> int:
        return -(-len(self.records) // self.clips_per_video)

    def __repr__(self) -> str:
        views = "" if self.mode == "train" else f", views {self.test_num_segment}x{self.test_num_crop}"
        if self.clips_per_video > 1:
            views = f", {self.clips_per_video} clips per video read"
        frames = (f"{self.num_frames} frames x rate {self.sampling_rate}" if self.sample_type == "stride"
                  else f"{self.num_frames} frames ({self.sample_type} of equal segments)")
        return (f"VideoTextDataset({len(self)} videos, {self.mode}, {frames}, {self.input_size} px{views}, "
                f"{self.backend})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.clips_per_video > 1:  # computed here, once, so loader workers copy it rather than redraw it
            self._video_order = self._order_of_block(self.epoch // self.clips_per_video)

    def _order_of_block(self, block: int) -> np.ndarray:
        """A permutation of the records shared by epochs block*C .. block*C + C-1, each taking its own slice."""
        return sample_rng(self.seed, block, 0, "video_order").permutation(len(self.records))

    def record_of(self, item: int) -> int:
        """The record item `item` of the current epoch reads (itself unless clips_per_video > 1)."""
        if self.clips_per_video == 1:
            return item
        if self._video_order is None:
            self.set_epoch(self.epoch)
        part = self.epoch % self.clips_per_video
        return int(self._video_order[(part * len(self) + item) % len(self.records)])

    def video_nbytes(self) -> int:
        """Bytes of one item's video (uint8): what one sample puts in a loader worker's shared memory."""
        views = self.clips_per_video if self.mode == "train" else self.test_num_segment * self.test_num_crop
        return views * 3 * self.num_frames * self.input_size * self.input_size

    def rng(self, index: int, stream: str) -> np.random.Generator:
        return sample_rng(self.seed, self.epoch, index, stream)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return self._train_item(self.record_of(index)) if self.mode == "train" else self._test_item(index)

    # -- training

    def _train_item(self, index: int) -> dict[str, Any]:
        met: dict[str, str] = {}  # broken files this sample tried (or knew), in order
        for record_index in fallthrough_order(index, len(self.records), self.rng(index, "retry")):
            if record_index in self.excluded:
                continue
            path = self.records.path(record_index)
            try:
                clips = self._train_clips(path, index, self.records.span(record_index))
                break
            except VideoDecodeError as e:
                met[path] = self.broken.setdefault(path, one_line(e))
        else:
            raise BrokenDataError(self._all_broken_message())
        read = index not in self.excluded
        captions = self.records.captions(record_index)
        k = int(self.rng(index, "caption").integers(len(captions)))
        repeated = self.clips_per_video > 1
        item = {"video": torch.stack(clips) if repeated else clips[0], "caption": captions[k], "index": index,
                "epoch": self.epoch, "read": int(read), "broken": int(read and self.records.path(index) in met),
                "broken_videos": list(met.items())}
        if self.caption_ids is not None:
            item["match_id"] = int(self.caption_ids[self.records.caption_range(record_index)[0] + k])
        elif repeated:
            item["match_id"] = index
        if self.mask_generator is not None:
            masks = [torch.from_numpy(np.asarray(self.mask_generator(self.rng(index, copy_stream("video_mask", c))),
                                                 dtype=bool)) for c in range(self.clips_per_video)]
            item["video_mask"] = torch.stack(masks) if repeated else masks[0]
        return item

    def _all_broken_message(self) -> str:
        examples = "; ".join(list(self.broken.values())[:3])
        left = " left after the exclude list" if self.excluded else ""
        return (f"none of the {len(self.records) - len(self.excluded)} training videos{left} can be read (100% "
                f"broken; is --data_root right?), e.g. {examples}. To see why, {check_hint()}")

    def _decode(self, path: str, plan: Callable[[int], list[int]],
                span: Span | None = None) -> tuple[np.ndarray, int]:
        """Frames plan(n) of a video (or of its span: n its frames, plan's indices counted from its first) ->
        (uint8 [T, H, W, 3], n); under "auto" the other backend retries a failure (both backends number frames
        alike, so the sample is the same)."""
        try:
            return _decode_planned(path, self.backend, plan, span, self.decode_threads)
        except VideoDecodeError as first:
            if self.fallback_backend is None or not os.path.isfile(path) or os.path.getsize(path) == 0:
                raise
            try:
                return _decode_planned(path, self.fallback_backend, plan, span, self.decode_threads)
            except VideoDecodeError as second:
                raise VideoDecodeError(f"{first} ({self.fallback_backend} failed too: {one_line(second)})") from second

    def _train_clips(self, path: str, index: int, span: Span | None = None) -> list[torch.Tensor]:
        """clips_per_video clips from one decode of the union of their frames. Randomness is keyed on the
        requested index, so a substitute video still gets this sample's draws; clip 0 draws what a single-clip
        dataset draws."""
        if path in self.broken:  # decoding it again would fail again
            raise VideoDecodeError(self.broken[path])

        def plans(n: int) -> list[np.ndarray]:  # fresh generators per call: the same draws on a retry
            return [train_frame_indices(n, self.num_frames, self.sampling_rate, self.sample_type,
                                        self.rng(index, copy_stream("frames", c))) for c in range(self.clips_per_video)]

        frames, n = self._decode(path, lambda n: frame_union(plans(n)), span)
        clips = plans(n)
        row = {i: r for r, i in enumerate(frame_union(clips))}
        return [train_clip_transform(frames[[row[int(i)] for i in p]], self.input_size,
                                     self.rng(index, copy_stream("crop", c))) for c, p in enumerate(clips)]

    # -- evaluation

    def _test_clips(self, num_video_frames: int, index: int) -> list[list[int]]:
        """A fresh generator per call (epoch 0: every evaluation draws the same rand frames), so the decode plan
        and the views agree."""
        return eval_clip_indices(num_video_frames, self.num_frames, self.sampling_rate, self.test_num_segment,
                                 self.sample_type, sample_rng(self.seed, 0, index, "frames"))

    def _test_item(self, index: int) -> dict[str, Any]:
        path = self.records.path(index)
        try:
            frames, n = self._decode(path, lambda n: frame_union(self._test_clips(n, index)), self.records.span(index))
        except VideoDecodeError as e:
            raise VideoDecodeError(f"{e} [evaluation: broken videos are not skipped, so the test set never changes "
                                   f"silently; repair or remove this video from the annotation file]") from e
        clips = self._test_clips(n, index)
        pos = {i: k for k, i in enumerate(frame_union(clips))}
        views = eval_views(frames, [[pos[i] for i in clip] for clip in clips], self.input_size,
                           self.short_side_size, self.test_num_crop)
        return {"video": views, "captions": self.records.captions(index), "index": index}


def frame_union(clips: Iterable[Sequence[int]]) -> list[int]:
    """The sorted distinct frame indices of several clips: what one decode of a video reads for all of them."""
    return sorted({int(i) for clip in clips for i in clip})


def _decode_planned(path: str, backend: str, plan: Callable[[int], list[int]],
                    span: Span | None = None, threads: int = 1) -> tuple[np.ndarray, int]:
    with open_video(path, backend, threads) as video:
        first, count = span_frames(video.num_frames, video.fps, span)
        return video.get_frames([first + i for i in plan(count)]), count


# ----------------------------------------------------------------------------------------------- collate


class VideoTextCollator:
    """Stacks dataset items and tokenises captions in one batched call of the fast tokenizer.

    train batch: video [B, 3, T, H, W], video_mask bool [B, N] (if given), index / epoch long [B], match_id long
    [B] (when the items carry one: the contrastive positives' id, see VideoTextDataset), num_visible_tubes (int,
    with video_mask: each clip's unmasked tubes, equal over the batch), videos_read /
    videos_broken (the items' read / broken summed, long scalars), broken_videos (the items' [(path, error)],
    each file once), caption (list of str), input_ids / attention_mask long [B, L] (padded to the longest caption,
    truncated to max_text_len) and, when text_mask_ratio is set, mlm_input_ids / mlm_labels [B, L] from
    masking_generator.mask_text_batch with one sample_rng(seed, epoch, index, "text_mask") per row, and
    max_masked_words (int, counted here on the host: the most masked words of any caption, the number of positions
    per caption the word head scores).
    text_mask_mode: "mask" (the release: every chosen word becomes [MASK]) or "bert" (80% [MASK], 10% a random
    word of the tokenizer's vocabulary, 10% kept), for model families trained with BERT's rule.
    Items with C clips each (VideoTextDataset's clips_per_video) give C rows each, in order: B = items x C;
    num_items (int) is the number of dataset items (the sampler's position advances by it).
    test batch: video [B, V, 3, T, H, W], captions (list of lists), index long [B].
    """

    def __init__(self, tokenizer, max_text_len: int = 32, text_mask_ratio: float | None = None,
                 seed: int = 0, text_mask_mode: str = "mask") -> None:
        from masking_generator import TEXT_MASK_MODES

        if max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2 ([CLS] and [SEP]), got {max_text_len}")
        if text_mask_mode not in TEXT_MASK_MODES:
            raise ValueError(f"unknown text_mask_mode {text_mask_mode!r}; choose one of {TEXT_MASK_MODES}")
        self.tokenizer = tokenizer
        self.max_text_len = int(max_text_len)
        self.text_mask_ratio = text_mask_ratio
        self.seed = int(seed)
        self.text_mask_mode = text_mask_mode

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": tok["input_ids"].long(), "attention_mask": tok["attention_mask"].long()}

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        if "captions" in items[0]:
            return {"video": torch.stack([it["video"] for it in items]),
                    "captions": [list(it["captions"]) for it in items],
                    "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long)}
        num_items = len(items)
        items, copies = _one_clip_per_row(items)
        batch: dict[str, Any] = {"video": torch.stack([it["video"] for it in items]), "num_items": num_items}
        if "video_mask" in items[0]:
            batch["video_mask"] = torch.stack([torch.as_tensor(it["video_mask"]) for it in items]).bool()
            batch["num_visible_tubes"] = equal_row_count(~batch["video_mask"])
        batch["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
        if "match_id" in items[0]:
            batch["match_id"] = torch.tensor([int(it["match_id"]) for it in items], dtype=torch.long)
        batch["epoch"] = torch.tensor([int(it.get("epoch", 0)) for it in items], dtype=torch.long)
        batch["train_epoch"] = int(items[0].get("epoch", 0))  # a plain int: the model reads it without a sync
        batch["videos_read"] = torch.tensor(sum(int(it.get("read", 1)) for it in items), dtype=torch.long)
        batch["videos_broken"] = torch.tensor(sum(int(it.get("broken", 0)) for it in items), dtype=torch.long)
        batch["broken_videos"] = list(dict(pair for it in items for pair in it.get("broken_videos", ())).items())
        batch["caption"] = [it["caption"] for it in items]
        batch.update(self.tokenize(batch["caption"]))
        if self.text_mask_ratio:
            from masking_generator import IGNORE_INDEX, mask_text_batch
            rngs = [sample_rng(self.seed, int(e), int(i), copy_stream("text_mask", c))
                    for e, i, c in zip(batch["epoch"], batch["index"], copies)]
            batch["mlm_input_ids"], batch["mlm_labels"] = mask_text_batch(
                batch["input_ids"], batch["attention_mask"], self.text_mask_ratio, rngs,
                mask_token_id=self.tokenizer.mask_token_id, mode=self.text_mask_mode,
                vocab_size=len(self.tokenizer))
            batch["max_masked_words"] = int((batch["mlm_labels"] != IGNORE_INDEX).sum(dim=1).max())
        return batch


def _one_clip_per_row(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """Items of several clips (clips_per_video: video [C, 3, T, H, W]) -> one item per clip, and each row's clip
    number (its text mask's stream). A video's read / broken counts stay on its first clip's row."""
    rows, copies = [], []
    for it in items:
        if it["video"].dim() == 4:
            rows.append(it)
            copies.append(0)
            continue
        for c, clip in enumerate(it["video"]):
            row = dict(it, video=clip)
            if "video_mask" in it:
                row["video_mask"] = it["video_mask"][c]
            if c:
                row.update(read=0, broken=0, broken_videos=())
            rows.append(row)
            copies.append(c)
    return rows, copies


# ----------------------------------------------------------------------------------------------- question answering


class VideoQADataset(torch.utils.data.Dataset):
    """A question about a clip: the clip exactly as VideoTextDataset decodes and transforms it (train: one random
    crop of num_frames frames; test: views [V, 3, T, H, W]; same sample_type, seed and backend arguments, passed
    through) plus the question, its answers and their weights.

    Each question is one record of the underlying VideoTextDataset whose only "caption" is the question's index,
    so a broken training video falls through to another question together with its own question and answers
    (never a clip with someone else's question).
    """

    def __init__(self, records: Sequence[QARecord], mode: str = "train", **video_options: Any) -> None:
        if not records:
            raise ValueError("no questions: the QA annotation file listed none")
        self.records = list(records)
        video_records = [VideoRecord(r.path, [str(k)], video_id_of(os.path.basename(r.path)))
                         for k, r in enumerate(self.records)]
        self.videos = VideoTextDataset(video_records, mode=mode, **video_options)
        self.mode = mode

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"VideoQADataset({len(self)} questions; clips: {self.videos!r})"

    def set_epoch(self, epoch: int) -> None:
        self.videos.set_epoch(epoch)

    def video_nbytes(self) -> int:
        return self.videos.video_nbytes()

    @property
    def excluded(self) -> set[int]:
        """Questions whose video is never opened (--exclude_list), as VideoTextDataset.excluded."""
        return self.videos.excluded

    @property
    def broken(self) -> dict[str, str]:
        """Broken videos known so far (path -> error), shared with the training engine as VideoTextDataset's."""
        return self.videos.broken

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.videos[int(index)]
        k = int(item["caption"]) if self.mode == "train" else int(index)
        record = self.records[k]
        out = {"video": item["video"], "index": int(index), "question": record.question,
               "answers": list(record.answers), "weights": list(record.weights),
               "question_id": record.question_id, "answer_type": record.answer_type}
        for key in ("epoch", "read", "broken", "broken_videos", "video_mask"):
            if key in item:
                out[key] = item[key]
        return out


class VideoQACollator:
    """Batches VideoQADataset items for an answer decoder trained by teacher forcing.

    Batch keys (B questions, R = their distinct answers in all, R >= B):
    - video uint8 [B, 3, T, H, W] (train) or [B, V, 3, T, H, W] (test: V views); video_mask bool [B, N] if given
    - question_input_ids, question_mask long [B, Lq]: [CLS] question [SEP], padded to the longest, Lq <=
      max_q_len (default 25)
    - answer_ids, answer_mask long [R, La]: [CLS] answer [SEP] (the [CLS] is the decoder's start token), padded to
      the longest, La <= max_a_len (default 5; longer answers are cut, keeping the final [SEP])
    - answer_labels long [R, La]: answer_ids with -100 on padding and on the start token: the decoder predicts
      answer_labels[:, 1:] from its outputs at [:, :-1]
    - answer_weights float [R]: each answer's share of its question's annotators (sum 1 per question)
    - answer_to_question long [R]: the row of the answer's question in the batch; the loss is
      sum_r weight_r * NLL_r / B
    - question_id (list of B, str or int, as in the file), answer_type (list of B, str or None), answers (list of
      B lists of str: the distinct answers in first-seen order, as the rows), index long [B]
    - epoch long [B], videos_read / videos_broken long scalars, broken_videos [(path, error)] (training items,
      as VideoTextCollator)
    """

    def __init__(self, tokenizer, max_q_len: int = 25, max_a_len: int = 5) -> None:
        if max_q_len < 2 or max_a_len < 3:
            raise ValueError(f"need max_q_len >= 2 and max_a_len >= 3 ([CLS], a token, [SEP]), got {max_q_len} "
                             f"and {max_a_len}")
        self.tokenizer = tokenizer
        self.max_q_len, self.max_a_len = int(max_q_len), int(max_a_len)

    def answer_tokens(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A closed answer list tokenised as the batches' answers: (answer_ids, answer_mask) [A, La]."""
        return self._tokens(answers, self.max_a_len)

    def _tokens(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len,
                             return_tensors="pt", return_token_type_ids=False)
        return tok["input_ids"].long(), tok["attention_mask"].long()

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, Any] = {}
        if "video" in items[0]:  # absent when the items carry their question pass's states instead (--cache_memory)
            batch["video"] = torch.stack([it["video"] for it in items])
        if "video_mask" in items[0]:
            batch["video_mask"] = torch.stack([torch.as_tensor(it["video_mask"]) for it in items]).bool()
        batch["question_input_ids"], batch["question_mask"] = self._tokens([it["question"] for it in items],
                                                                           self.max_q_len)
        answers = [a for it in items for a in it["answers"]]
        batch["answer_ids"], batch["answer_mask"] = self._tokens(answers, self.max_a_len)
        labels = batch["answer_ids"].masked_fill(batch["answer_mask"] == 0, -100)
        labels[:, 0] = -100
        batch["answer_labels"] = labels
        batch["answer_weights"] = torch.tensor([w for it in items for w in it["weights"]], dtype=torch.float32)
        batch["answer_to_question"] = torch.tensor([q for q, it in enumerate(items) for _ in it["answers"]],
                                                   dtype=torch.long)
        batch["question_id"] = [it["question_id"] for it in items]
        batch["answer_type"] = [it.get("answer_type") for it in items]
        batch["answers"] = [list(it["answers"]) for it in items]
        batch["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
        if "epoch" in items[0]:
            batch["epoch"] = torch.tensor([int(it["epoch"]) for it in items], dtype=torch.long)
            batch["videos_read"] = torch.tensor(sum(int(it.get("read", 1)) for it in items), dtype=torch.long)
            batch["videos_broken"] = torch.tensor(sum(int(it.get("broken", 0)) for it in items), dtype=torch.long)
            batch["broken_videos"] = list(dict(p for it in items for p in it.get("broken_videos", ())).items())
        return batch


class VideoQATestSet(torch.utils.data.Dataset):
    """Test questions grouped by video: item i is the i-th distinct video of the records (first-seen order), its
    views [V, 3, T, H, W] decoded once as VideoTextDataset's test mode does (same video options), with all its
    questions: "index" (their positions in `records`) and "question" (their texts), in file order. Evaluation
    then decodes and encodes each video once, however many questions it has."""

    def __init__(self, records: Sequence[QARecord], **video_options: Any) -> None:
        if not records:
            raise ValueError("no questions: the QA annotation file listed none")
        self.records = list(records)
        by_video: dict[str, list[int]] = {}
        for k, r in enumerate(self.records):
            by_video.setdefault(r.path, []).append(k)
        self.questions = list(by_video.values())
        self.videos = VideoTextDataset([VideoRecord(path, [str(k) for k in ks], video_id_of(os.path.basename(path)))
                                        for path, ks in by_video.items()], mode="test", **video_options)

    def __len__(self) -> int:
        return len(self.questions)

    def __repr__(self) -> str:
        return f"VideoQATestSet({len(self.records)} questions about {len(self)} videos; clips: {self.videos!r})"

    def video_nbytes(self) -> int:
        return self.videos.video_nbytes()

    def __getitem__(self, index: int) -> dict[str, Any]:
        ks = self.questions[int(index)]
        return {"video": self.videos[int(index)]["video"], "index": list(ks),
                "question": [self.records[k].question for k in ks]}


class VideoQATestCollator(VideoQACollator):
    """Batches VideoQATestSet items (B videos, Q questions about them in all):
    - video uint8 [B, V, 3, T, H, W]
    - question_input_ids, question_mask long [Q, Lq] as VideoQACollator's, video by video
    - question_video long [Q]: the row of each question's video in the batch
    - index long [Q]: each question's position in the records
    """

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, Any] = {"video": torch.stack([it["video"] for it in items])}
        batch["question_input_ids"], batch["question_mask"] = self._tokens(
            [q for it in items for q in it["question"]], self.max_q_len)
        batch["question_video"] = torch.tensor([v for v, it in enumerate(items) for _ in it["index"]],
                                               dtype=torch.long)
        batch["index"] = torch.tensor([k for it in items for k in it["index"]], dtype=torch.long)
        return batch
