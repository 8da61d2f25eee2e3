"""The data side of SimVTP: annotation formats, frame sampling, video decoding, clip transforms, the broken-media
policy and the collate step.

Flow (one direction)::

    read_annotations(file) -> [VideoRecord(path, captions, video_id)]    (evaluation lists, tools)
    read_record_table(file) -> RecordTable: the same records as numpy columns (training lists of millions)
    VideoTextDataset[i]    -> decode only the sampled frames (decord | PyAV), one crop for the whole clip,
                              uint8 video [C, T, H, W] (+ tube mask [N], a caption)
    VideoTextCollator      -> batch: uint8 video [B, C, T, H, W], input_ids / attention_mask [B, L], MLM ids /
                              labels (through the loader workers' shared memory: 1 byte a pixel value)
    normalize_video(video) -> on the device, right before the model: ImageNet-normalised float32 video

Video QA: read_qa_annotations(file) -> [QARecord(path, question, answers, weights, question_id, answer_type)],
read_answer_list(file), VideoQADataset (the clips of VideoTextDataset + question and weighted answers),
VideoQACollator (question and answer tokens, one answer row per distinct answer; its docstring lists the keys);
for evaluation VideoQATestSet + VideoQATestCollator (each video decoded once with all its questions).

Every random choice about a sample (frames, crop, tube mask, text mask, caption, retry) comes from
``sample_rng(seed, epoch, index, stream)``: a batch split over processes, a resumed run and a re-run all see the
same samples. Global ``np.random`` / ``random`` are never used here.

Annotation formats (detected from the contents, not the file name; ``data_root`` is joined to relative paths):

- WebVid-2M/10M CSV ``videoid,contentUrl,duration,page_dir,name``: video ``<root>/<page_dir>/<videoid>.mp4``,
  caption ``name``;
- the release's JSON dict ``{video_path: caption}`` (one caption per video);
- the Singularity/SViTT JSON list ``[{"video": path or [path, ...], "caption": str or [str, ...]}]``, optional
  ``"start"`` / ``"end"`` seconds (the record's span of its video: clips sample only those frames);
- the MSR-VTT 1k-A CSV ``key,vid_key,video_id,sentence``: video ``<root>/<video_id>.mp4``.

Broken training videos (missing, empty, undecodable) never stop a run by themselves: a sample whose video is broken
falls through to the next readable video along a walk of the whole list that is a function of (seed, epoch,
index), so every process and every resume picks the same substitute. Items carry the broken files they met, so the
main process can name each once and measure the broken share (engine_for_pretraining.BrokenVideos). Files of an
exclude list (``read_exclude_list``: a ``video_tools.py check --report`` or one path per line) are never opened.

A benchmark's AnnotationFormat (``annotation_format(--data_set)``) joins a record's sentences into one paragraph
(DiDeMo, ActivityNet), cleans captions as the SViTT recipes (clean_caption) and says whether training positives
and evaluation queries go by video or by caption string (SSv2's one caption for many videos).

A video listed several times (with the same span) becomes one record with all its captions (else retrieval would
count the copies as different videos, and contrastive batches could pair a video with itself as a negative).

Memory: a list of VideoRecord objects costs about 460 bytes a WebVid record, and every forked data-loader worker
copies the pages it touches (reference counts are written into every object). The training dataset therefore keeps
a RecordTable: a few byte blobs with numpy offsets, about 140 bytes a record, read but never written by workers.
"""
from __future__ import annotations

import array
import collections.abc
import csv
import functools
import io
import json
import os
import re
import shutil
import math
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AnnotationError", "VideoDecodeError", "BrokenDataError", "VideoRecord", "read_annotations", "sample_rng",
    "RecordTable", "read_record_table",
    "resolve_backend", "open_video", "VideoFile", "pretrain_frame_indices", "test_clip_indices",
    "SAMPLE_TYPES", "default_test_sample_type", "segment_bounds", "segment_frame_indices", "segment_clip_indices",
    "train_frame_indices", "eval_clip_indices",
    "multi_scale_crop_box", "train_clip_transform", "test_views", "build_tokenizer", "VideoTextDataset",
    "VideoTextCollator", "IMAGENET_MEAN", "IMAGENET_STD", "BERT_VOCAB_SIZE", "VIDEO_EXTENSIONS", "one_line",
    "normalize_video",
    "EvalListError", "find_unusable_videos", "format_unusable", "check_eval_lists", "MAX_LISTED",
    "ExcludeList", "read_exclude_list", "excluded_indices", "exclusions_for", "fallthrough_order", "check_hint",
    "DATA_SETS", "MATCH_BY", "AnnotationFormat", "annotation_format", "clean_caption", "span_frames",
    "QARecord", "answer_weights", "read_qa_annotations", "read_answer_list", "UnlistedAnswers", "unlisted_answers",
    "top_answer", "VideoQADataset", "VideoQACollator", "VideoQATestSet", "VideoQATestCollator",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)  # GroupMultiScaleCrop scales of the release (VideoMAE)
BERT_VOCAB_SIZE = 30522
BERT_SPECIAL_IDS = {"pad_token_id": 0, "cls_token_id": 101, "sep_token_id": 102, "mask_token_id": 103}
DEFAULT_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bert-base-uncased")
VIDEO_EXTENSION = ".mp4"  # the suffix of WebVid / MSR-VTT files named by id
# file suffixes recognised as videos when a directory is scanned (lower case)
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg",
                              ".3gp", ".ts"})


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file, the record and what is wrong."""


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or decoded; the message names the file."""


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


# ----------------------------------------------------------------------------------------------- randomness


def copy_stream(stream: str, copy: int) -> str:
    """The random stream of a sample's copy-th clip (--clips_per_video): copy 0 keeps the single clip's stream."""
    return stream if copy == 0 else f"{stream}/{copy}"


def sample_rng(seed: int, epoch: int, index: int, stream: str) -> np.random.Generator:
    """The generator of one random choice about one sample: a pure function of (seed, epoch, index, stream).

    stream names the use ("frames", "crop", "video_mask", "text_mask", "caption", "retry"), so the choices are
    independent of each other and of the order in which samples are drawn, by whichever process.
    """
    values = (int(seed), int(epoch), int(index))
    if min(values) < 0:
        raise ValueError(f"sample_rng needs non-negative seed, epoch and index, got {values}")
    return np.random.default_rng(np.random.SeedSequence([*values, zlib.crc32(stream.encode("utf-8"))]))


# ----------------------------------------------------------------------------------------------- annotations


Span = tuple[float | None, float | None]  # (start, end) seconds of a record's video; None: its start / its end


@dataclass
class VideoRecord:
    """One video and its captions (several for retrieval sets, one for WebVid); span (start, end) in seconds
    restricts the clip to that part of the file (None: the whole video)."""
    path: str
    captions: list[str] = field(default_factory=list)
    video_id: str = ""
    span: Span | None = None


# ----------------------------------------------------------------------------------------------- benchmark formats

DATA_SETS = ("msrvtt", "webvid", "didemo", "charades", "anet", "ssv2_label", "ssv2_template")
MATCH_BY = ("video", "caption")
_PARAGRAPH_SETS = frozenset({"didemo", "anet"})  # the sentences of a video are one paragraph query (SViTT recipes)
_CLEANED_SETS = frozenset({"didemo", "charades", "anet", "ssv2_label", "ssv2_template"})
_CAPTION_MATCH_SETS = frozenset({"ssv2_label", "ssv2_template"})  # one caption <-> many videos


@dataclass(frozen=True)
class AnnotationFormat:
    """How a benchmark's captions are read and matched (the layout itself is detected from the file).

    paragraphs: the captions of a record are joined, in order, into one caption (DiDeMo / ActivityNet paragraph
    retrieval). clean_text: clean_caption on every caption (the SViTT / Singularity recipes). match_by "caption":
    videos with the same caption are positives of each other in training, and in evaluation each distinct caption
    is one text query whose ground truths are all the videos carrying it (SSv2 label / template retrieval)."""
    paragraphs: bool = False
    clean_text: bool = False
    match_by: str = "video"

    def __post_init__(self) -> None:
        if self.match_by not in MATCH_BY:
            raise ValueError(f"match_by must be one of {MATCH_BY}, got {self.match_by!r}")


def annotation_format(data_set: str | None = "msrvtt", paragraphs: bool | None = None,
                      clean_text: bool | None = None, match_by: str | None = None) -> AnnotationFormat:
    """The format of a --data_set (case-insensitive), each choice overridable (None: the data set's default):
    didemo / anet join paragraphs; didemo, charades, anet and ssv2_* clean captions; ssv2_* match by caption;
    msrvtt and webvid change nothing."""
    name = (data_set or "msrvtt").lower()
    if name not in DATA_SETS:
        raise ValueError(f"unknown --data_set {data_set!r}; choose one of {', '.join(DATA_SETS)} (case-insensitive)")
    return AnnotationFormat(
        paragraphs=name in _PARAGRAPH_SETS if paragraphs is None else bool(paragraphs),
        clean_text=name in _CLEANED_SETS if clean_text is None else bool(clean_text),
        match_by=("caption" if name in _CAPTION_MATCH_SETS else "video") if match_by is None else match_by)


_DROPPED_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")


def clean_caption(text: str) -> str:
    """A caption as the SViTT / Singularity recipes feed it to the text encoder: lower case; the marks
    , . ' ! ? " ( ) * # : ; ~ removed; - and / become spaces; Charades' `<person>` becomes `person`; runs of
    white space one space, none at the ends."""
    text = _DROPPED_PUNCTUATION.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    return " ".join(text.split())


_WEBVID_REQUIRED = ("videoid", "page_dir", "name")
_MSRVTT_REQUIRED = ("video_id", "sentence")
_FORMATS_HELP = ("WebVid CSV (videoid,contentUrl,duration,page_dir,name), MSR-VTT 1k-A CSV "
                 "(key,vid_key,video_id,sentence), the release's JSON dict {video_path: caption} or the "
                 "Singularity JSON list [{\"video\": path, \"caption\": str or [str, ...]}]")


def read_annotations(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                     skip_bad_records: bool = False, fmt: AnnotationFormat | None = None) -> list[VideoRecord]:
    """Records of an annotation file in any of the four formats (see the module docstring), in file order.

    The format is detected from the contents (CSV header, JSON top-level type). Relative video paths are joined
    to data_root when given. The whole file is read before judging it, so every malformed record is reported in
    one AnnotationError (the first MAX_LISTED with record numbers, 1-based over data records, and a count); a
    2.5 M-row file is not fixed one row per attempt. skip_bad_records drops them instead, printing the count.
    A file that is not one of the formats at all (bad JSON, unknown CSV header) stops at once.
    fmt (a benchmark's AnnotationFormat) joins paragraphs and cleans captions; records of one file with the same
    video and span are merged (a video with two spans is two records).
    A list of Python objects (about 1 KB a record): for evaluation lists and tools; a training list of millions
    of videos is read with read_record_table.
    """
    root = os.fspath(data_root) if data_root else None
    merged: dict[tuple, VideoRecord] = {}

    def add(rel: str, captions: list[str], video_id: str, span: Span | None) -> None:
        full = _under_root(root, rel)
        key = (full, span)
        if key in merged:
            merged[key].captions.extend(c for c in captions if c not in merged[key].captions)
        else:
            merged[key] = VideoRecord(full, list(captions), video_id, span)

    _read_rows(os.fspath(path), skip_bad_records, add, fmt)
    return list(merged.values())


def read_record_table(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                      skip_bad_records: bool = False, fmt: AnnotationFormat | None = None) -> "RecordTable":
    """The records of read_annotations (same formats, errors, merging and order) as a compact RecordTable: rows
    are streamed into byte buffers, so no object per record is built or kept (a training list of millions)."""
    root = os.fspath(data_root) if data_root else None
    builder = _TableBuilder(merge_duplicates=True)
    _read_rows(os.fspath(path), skip_bad_records,
               lambda rel, captions, video_id, span: builder.add(_under_root(root, rel), captions, video_id, span),
               fmt)
    return builder.finish()


def _under_root(root: str | None, rel: str) -> str:
    return os.path.join(root, rel) if root and not os.path.isabs(rel) else rel


def _read_rows(path: str, skip_bad_records: bool, add: Callable[[str, list[str], str, Span | None], None],
               fmt: AnnotationFormat | None = None) -> None:
    """Every good record of an annotation file, in file order, into add(relative path, captions, video id, span),
    captions after fmt's paragraph joining and cleaning; the bad ones are judged after the whole file is read (one
    AnnotationError for all, or dropped and counted). A CSV is read line by line, never held whole."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark; \r\n read as \n
            first = _first_visible_char(f)
            if not first:
                raise AnnotationError(f"{path}: empty file; expected {_FORMATS_HELP}")
            f.seek(0)
            is_json = first in "[{\"" or path.lower().endswith(".json")
            good, bad = _consume(_read_json(path, f.read()) if is_json else _read_csv(path, f), add,
                                 fmt or AnnotationFormat())
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e}); expected {_FORMATS_HELP}") from None
    if bad and not skip_bad_records:
        raise AnnotationError(_bad_records_message(path, bad, good + len(bad)))
    if bad:
        print(f"{path}: dropped {len(bad)} bad record(s) of {good + len(bad)} (--skip_bad_records), e.g. "
              f"{bad[0]}", flush=True)
    if not good:
        raise AnnotationError(f"{path}: no records" + (f" left after dropping {len(bad)} bad ones" if bad else ""))


def _first_visible_char(f: io.TextIOBase, chunk: int = 1 << 16) -> str:
    """The first non-whitespace character of a text file ("" when there is none), read a chunk at a time."""
    while True:
        text = f.read(chunk)
        if not text:
            return ""
        stripped = text.lstrip()
        if stripped:
            return stripped[0]


MAX_LISTED = 20  # bad records / bad files named in one error; the rest are counted


def _bad_records_message(path: str, bad: Sequence[str], total: int) -> str:
    """One error for all bad records of a file: the first MAX_LISTED and how many more."""
    hint = "fix them, or pass --skip_bad_records to drop them"
    if len(bad) == 1:
        return f"{path}: {bad[0]} ({hint})"
    listed = "\n".join(f"  {b}" for b in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return f"{path}: {len(bad)} bad records of {total}:\n{listed}{more}\n{hint}"


class _BadRecord(ValueError):
    """One malformed record (its place and problem); collected, not raised to the caller."""


Row = tuple[str, list[str], str, "Span | None"]  # (relative video path, captions, video id, span)


def _caption(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _BadRecord(f"{where}: caption must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise _BadRecord(f"{where}: empty caption")
    return value.strip()


def _video_path(where: str, value: Any, name: str = "video") -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadRecord(f"{where}: '{name}' must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _id_of(rel: str) -> str:
    return os.path.splitext(rel)[0]


def _file_of_id(video_id: str) -> tuple[str, str]:
    """A CSV's video id -> (file name, id): `video7` -> `video7.mp4`; an id that already names a video file
    (`video7.mp4`) is kept as the file name, not made `video7.mp4.mp4`, and its id is `video7`."""
    stem, ext = os.path.splitext(video_id)
    if ext.lower() in VIDEO_EXTENSIONS:
        return video_id, stem
    return video_id + VIDEO_EXTENSION, video_id


def _consume(records: Iterable[Callable[[], Row | list[Row]]], add: Callable[..., None],
             fmt: AnnotationFormat) -> tuple[int, list[str]]:
    """Parse every record (a parser gives a row, or a list of rows for a record naming several videos), apply the
    format to its captions, pass the good rows to add and keep the problems of the bad ones (in file order)
    -> (good records, problems)."""
    good, bad = 0, []
    for parse in records:
        try:
            rows = parse()
            rows = [_formatted(parse.args[0], row, fmt) for row in (rows if isinstance(rows, list) else [rows])]
        except _BadRecord as e:
            bad.append(str(e))
            continue
        for row in rows:
            add(*row)
        good += 1
    return good, bad


def _formatted(where: str, row: Row, fmt: AnnotationFormat) -> Row:
    """A row's captions as the format wants them: joined into one paragraph, cleaned."""
    rel, captions, video_id, span = row
    if fmt.paragraphs:
        captions = [" ".join(captions)]
    if fmt.clean_text:
        cleaned = [clean_caption(c) for c in captions]
        empty = [k for k, c in enumerate(cleaned, 1) if not c]
        if empty:
            raise _BadRecord(f"{where}: caption {empty[0]} {captions[empty[0] - 1]!r:.60} is empty after text "
                             "cleaning (--no_clean_text keeps captions as written)")
        captions = list(dict.fromkeys(cleaned))  # two captions that clean alike are one
    return rel, captions, video_id, span


def _read_json(path: str, text: str) -> Iterator[Callable[[], Row]]:
    """The parsers of a JSON file's records (the whole file is parsed first: JSON has no records to stream)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: bad JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(obj, dict):  # the release: {video_path: caption}
        return (functools.partial(_dict_row, f"record {n} ({video!r:.80})", video, caption)
                for n, (video, caption) in enumerate(obj.items(), 1))
    if isinstance(obj, list):  # Singularity / SViTT: [{"video": path, "caption": str | [str]}]
        return (functools.partial(_list_row, f"record {n}", item) for n, item in enumerate(obj, 1))
    raise AnnotationError(f"{path}: top-level JSON must be a dict or a list, got {type(obj).__name__}; "
                          f"expected {_FORMATS_HELP}")


def _dict_row(where: str, video: Any, caption: Any) -> Row:
    rel = _video_path(where, video, "video path (key)")
    if isinstance(caption, list):
        raise _BadRecord(f"{where}: the JSON dict format has one caption string per video, got a list (use the "
                         f"list format [{{\"video\", \"caption\": [...]}}])")
    return rel, [_caption(where, caption)], _id_of(rel), None


def _list_row(where: str, item: Any) -> list[Row]:
    """A Singularity / SViTT record -> one row per video: "video" a path or a list of paths (SSv2's evaluation
    layout: one caption, several videos), "caption" a string or a list, optional "start" / "end" seconds."""
    if not isinstance(item, dict):
        raise _BadRecord(f"{where}: expected an object {{\"video\", \"caption\"}}, got {type(item).__name__}")
    for key in ("video", "caption"):
        if key not in item:
            raise _BadRecord(f"{where}: missing field '{key}' (has {sorted(item)})")
    videos = item["video"] if isinstance(item["video"], list) else [item["video"]]
    if not videos:
        raise _BadRecord(f"{where}: empty video list")
    rels = [_video_path(where, v) for v in videos]
    caps = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
    if not caps:
        raise _BadRecord(f"{where}: empty caption list")
    captions = [_caption(f"{where} caption {k}", c) for k, c in enumerate(caps, 1)]
    span = _span(where, item)
    return [(rel, captions, _id_of(rel), span) for rel in rels]


def _seconds(where: str, item: dict, key: str) -> float | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _BadRecord(f"{where}: '{key}' must be a number of seconds >= 0, got {value!r:.60}")
    return float(value)


def _span(where: str, item: dict) -> Span | None:
    """Optional "start" / "end" seconds of a record -> (start, end) with None for a missing side, or None."""
    start, end = _seconds(where, item, "start"), _seconds(where, item, "end")
    if start is None and end is None:
        return None
    if start is not None and end is not None and end <= start:
        raise _BadRecord(f"{where}: 'end' {end:g} s must be after 'start' {start:g} s")
    return start, end


def _read_csv(path: str, lines: Iterable[str]) -> Iterator[Callable[[], Row]]:
    """The parsers of a CSV file's records, read lazily from lines (a text file)."""
    reader = csv.reader(lines)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise AnnotationError(f"{path}: empty CSV") from None
    except csv.Error as e:
        raise AnnotationError(f"{path}: bad CSV near line {reader.line_num}: {e}") from None
    if {"videoid", "page_dir", "name"} <= set(header):
        parse_row = _webvid_row
    elif {"video_id", "sentence"} <= set(header):
        parse_row = _msrvtt_row
    else:
        raise AnnotationError(f"{path}: unknown CSV header {','.join(header)!r:.200}; expected {_FORMATS_HELP}")

    def records() -> Iterator[Callable[[], Row]]:
        n = 0
        try:
            for row in reader:
                if not row or not "".join(row).strip():
                    continue  # blank line
                n += 1
                where = f"record {n} (line {reader.line_num})"
                yield functools.partial(_csv_row, where, header, row, parse_row)
        except csv.Error as e:
            raise AnnotationError(f"{path}: bad CSV near line {reader.line_num}: {e}") from None

    return records()


def _csv_row(where: str, header: list[str], row: list[str], parse_row: Callable[[str, dict], Row]) -> Row:
    if len(row) != len(header):
        raise _BadRecord(f"{where}: {len(row)} columns, the header has {len(header)} ({','.join(header)})")
    return parse_row(where, dict(zip(header, row)))


def _webvid_row(where: str, rec: dict) -> Row:
    vid = _video_path(where, rec["videoid"], "videoid")
    page = _video_path(where, rec["page_dir"], "page_dir")
    caption = _caption(where, rec["name"])
    file, video_id = _file_of_id(vid)
    return os.path.join(page, file), [caption], video_id, None


def _msrvtt_row(where: str, rec: dict) -> Row:
    vid = _video_path(where, rec["video_id"], "video_id")
    caption = _caption(where, rec["sentence"])
    file, video_id = _file_of_id(vid)
    return file, [caption], video_id, None


# ----------------------------------------------------------------------------------------------- record table


class _Strings:
    """Many strings as one UTF-8 bytes blob and a numpy array of their end offsets: two objects, however many
    strings, so forked data-loader workers read these pages without writing to them and they stay shared. Strings
    round-trip exactly, lone surrogates included ("surrogatepass")."""

    def __init__(self, data: bytes, ends: np.ndarray) -> None:
        self.data, self.ends = data, ends  # string i is data[ends[i - 1]:ends[i]] (from 0 for i = 0)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        return self.data[self.ends[i - 1] if i else 0:self.ends[i]].decode("utf-8", "surrogatepass")

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.ends.nbytes


def _offsets(ends: array.array) -> np.ndarray:
    """Offsets as a numpy array: 4 bytes each while they fit."""
    return np.array(ends, dtype=np.uint32 if not ends or ends[-1] < 2 ** 32 else np.int64)


class RecordTable(collections.abc.Sequence):
    """The records of a training list as columns: paths, video ids and captions each one UTF-8 bytes blob with
    numpy offsets, and each record's range of captions. About 140 bytes a WebVid record instead of about 460 of
    Python objects, and nothing per record that Python's reference counting writes to, so forked data-loader
    workers share it instead of copying it page by page (benchmarks/bench_records.py).

    path(i), video_id(i), captions(i) and span(i) decode one field; table[i] is a VideoRecord built on the spot (so
    code written for a list of records works), table[a:b] and take(indices) are smaller tables. Spans are a float
    [n, 2] column (NaN: no bound) only when some record has one.
    """

    def __init__(self, paths: _Strings, video_ids: _Strings, captions: _Strings, caption_ends: np.ndarray,
                 spans: np.ndarray | None = None) -> None:
        if not len(paths) == len(video_ids) == len(caption_ends):
            raise ValueError("RecordTable columns differ in length")
        if spans is not None and spans.shape != (len(paths), 2):
            raise ValueError("RecordTable spans must be [records, 2]")
        self._paths, self._video_ids, self._captions, self._caption_ends = paths, video_ids, captions, caption_ends
        self._spans = spans

    @classmethod
    def from_records(cls, records: Iterable[VideoRecord]) -> "RecordTable":
        """A table of the records as given (in order, repeated videos kept as separate records)."""
        builder = _TableBuilder(merge_duplicates=False)
        for r in records:
            builder.add(r.path, r.captions, r.video_id, r.span)
        return builder.finish()

    def __len__(self) -> int:
        return len(self._caption_ends)

    def _index(self, i: int) -> int:
        n = len(self._caption_ends)
        if 0 <= i < n:
            return int(i)
        if not -n <= i < 0:
            raise IndexError(f"record {i} out of range for a table of {n}")
        return int(i) + n

    def path(self, i: int) -> str:
        return self._paths[self._index(i)]

    def video_id(self, i: int) -> str:
        return self._video_ids[self._index(i)]

    def caption_range(self, i: int) -> tuple[int, int]:
        """Record i's captions are captions k in [start, end) of the whole table (caption_match_ids' order)."""
        i = self._index(i)
        return (int(self._caption_ends[i - 1]) if i > 0 else 0), int(self._caption_ends[i])

    def captions(self, i: int) -> list[str]:
        start, end = self.caption_range(i)
        return [self._captions[k] for k in range(start, end)]

    def span(self, i: int) -> Span | None:
        if self._spans is None:
            return None
        start, end = self._spans[self._index(i)].tolist()
        if math.isnan(start) and math.isnan(end):
            return None
        return (None if math.isnan(start) else start), (None if math.isnan(end) else end)

    def caption_match_ids(self) -> np.ndarray:
        """int64 [num_captions]: one id per distinct caption string (numbered in order of first appearance), so
        videos carrying the same caption share its id (training's match by caption)."""
        ids: dict[str, int] = {}
        return np.array([ids.setdefault(self._captions[k], len(ids)) for k in range(self.num_captions)],
                        dtype=np.int64)

    def caption_counts(self) -> np.ndarray:
        """int64 [len]: how many captions each record has."""
        return np.diff(self._caption_ends.astype(np.int64), prepend=0)

    @property
    def num_captions(self) -> int:
        return int(self._caption_ends[-1]) if len(self) else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the blobs and offsets (what the table holds, apart from a few small objects)."""
        spans = 0 if self._spans is None else self._spans.nbytes
        strings = sum(c.nbytes for c in (self._paths, self._video_ids, self._captions))
        return strings + self._caption_ends.nbytes + spans

    def iter_paths(self) -> Iterator[str]:
        return (self._paths[i] for i in range(len(self)))

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        i = self._index(i)
        return VideoRecord(self._paths[i], self.captions(i), self._video_ids[i], self.span(i))

    def __iter__(self) -> Iterator[VideoRecord]:
        return (self[i] for i in range(len(self)))

    def take(self, indices: Iterable[int]) -> "RecordTable":
        """A new table of these records, in the order given."""
        builder = _TableBuilder(merge_duplicates=False)
        for i in indices:
            builder.add(self.path(i), self.captions(i), self.video_id(i), self.span(i))
        return builder.finish()

    def __repr__(self) -> str:
        return f"RecordTable({len(self)} records, {self.num_captions} captions, {self.nbytes / 2 ** 20:.1f} MiB)"


class _TableBuilder:
    """Appends records to growing byte buffers; finish() freezes them into a RecordTable. With merge_duplicates,
    records of the same path and span become one (as read_annotations merges them), found after the fact from a
    hash of each, so no dictionary of every path is built."""

    def __init__(self, merge_duplicates: bool) -> None:
        self.merge_duplicates = merge_duplicates
        self._columns = [(bytearray(), array.array("q")) for _ in range(3)]  # path, video id, caption: data, ends
        self._caption_ends = array.array("q")
        self._path_hashes = array.array("q")
        self._spans: array.array | None = None  # start, end per record (NaN: none), once a record has a span

    def add(self, path: str, captions: Sequence[str], video_id: str, span: Span | None = None) -> None:
        (paths, path_ends), (ids, id_ends), (texts, text_ends) = self._columns
        paths += path.encode("utf-8", "surrogatepass")
        path_ends.append(len(paths))
        ids += video_id.encode("utf-8", "surrogatepass")
        id_ends.append(len(ids))
        for caption in captions:
            texts += caption.encode("utf-8", "surrogatepass")
            text_ends.append(len(texts))
        self._caption_ends.append(len(text_ends))
        if span is not None and self._spans is None:
            self._spans = array.array("d", [math.nan] * (2 * (len(self._caption_ends) - 1)))
        if self._spans is not None:
            self._spans.extend(math.nan if t is None else float(t) for t in (span or (None, None)))
        if self.merge_duplicates:
            self._path_hashes.append(hash((path, span)))

    def finish(self) -> RecordTable:
        columns = []
        while self._columns:  # one column's buffers copied at a time, then dropped
            data, ends = self._columns.pop(0)
            columns.append(_Strings(bytes(data), _offsets(ends)))
            del data, ends
        spans = None if self._spans is None else np.frombuffer(self._spans, dtype=np.float64).reshape(-1, 2).copy()
        table = RecordTable(*columns, _offsets(self._caption_ends), spans)
        hashes = np.frombuffer(self._path_hashes, dtype=np.int64)
        if self.merge_duplicates and len(np.unique(hashes)) < len(hashes):
            return _merge_repeated_paths(table, hashes)
        return table


def _merge_repeated_paths(table: RecordTable, hashes: np.ndarray) -> RecordTable:
    """One record per (path, span), at its first place, with the captions of every repeat added in order (a
    caption it has already is not added again), as read_annotations merges them. Only the rows whose hash repeats
    are compared by path and span."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    first_row: dict[tuple, int] = {}
    merged_captions: dict[int, list[str]] = {}
    repeats: set[int] = set()
    for row in np.flatnonzero(counts[inverse] > 1).tolist():
        owner = first_row.setdefault((table.path(row), table.span(row)), row)
        if owner != row:
            repeats.add(row)
            captions = merged_captions.setdefault(owner, table.captions(owner))
            captions.extend(c for c in table.captions(row) if c not in captions)
    builder = _TableBuilder(merge_duplicates=False)
    for row in range(len(table)):
        if row not in repeats:
            captions = merged_captions[row] if row in merged_captions else table.captions(row)
            builder.add(table.path(row), captions, table.video_id(row), table.span(row))
    return builder.finish()


# ----------------------------------------------------------------------------------------------- exclude lists

# the statuses of a `video_tools.py check` report that mean "cannot be read" (a "short" video still loads)
_UNREADABLE_STATUSES = frozenset({"missing", "empty", "undecodable", "truncated"})


@dataclass
class ExcludeList:
    """Known-broken video paths, and the data root a check report resolved them against (None for a text list)."""
    source: str
    paths: list[str]
    root: str | None = None


def read_exclude_list(path: str | os.PathLike) -> ExcludeList:
    """Videos training must never open: a `video_tools.py check --report` JSON (its missing, empty, undecodable and
    truncated videos; "short" ones still load) or a text file with one path per line (blank lines and lines
    starting with # are skipped; a tab ends the path, so a run's broken_videos.txt works as is)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"exclude list {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"exclude list {path}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("{"):
        return _read_check_report(path, text)
    paths = [line.split("\t", 1)[0].strip() for line in text.splitlines()]
    return ExcludeList(path, [p for p in paths if p and not p.startswith("#")])


def _read_check_report(path: str, text: str) -> ExcludeList:
    try:
        report = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"exclude list {path}: bad JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    problems = report.get("problems")
    if not isinstance(problems, list) or not all(isinstance(p, dict) and "path" in p for p in problems):
        raise ValueError(f"exclude list {path}: a JSON exclude list must be a `video_tools.py check --report` file "
                         "(a \"problems\" list of {\"path\", \"status\"}); or give a text file, one path a line")
    return ExcludeList(path, [p["path"] for p in problems if p.get("status") in _UNREADABLE_STATUSES],
                       report.get("data_root") or None)


def _same_file_key(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def excluded_indices(records: Sequence[VideoRecord] | RecordTable, exclude: ExcludeList,
                     data_root: str | os.PathLike | None) -> tuple[set[int], int]:
    """Indices of the records an exclude list names -> (indices, entries matching no record).

    An entry matches a record's path as given (absolute, or relative to the working directory as the annotation
    reader leaves it) or relative to data_root, like an annotation path. A check report's paths also match by their
    place under the report's own data root, so a report of the original videos excludes their re-encoded copies
    under another --data_root. The records are scanned once against the list's keys (no map of every path)."""
    root = os.fspath(data_root) if data_root else None
    entries_of: dict[str, list[int]] = {}  # a path key -> the entries that name it
    for n, entry in enumerate(exclude.paths):
        keys = {_same_file_key(entry)}
        if root and not os.path.isabs(entry):
            keys.add(_same_file_key(os.path.join(root, entry)))
        if root and exclude.root:
            rel = os.path.relpath(_same_file_key(entry), _same_file_key(exclude.root))
            if not rel.startswith(os.pardir):
                keys.add(_same_file_key(os.path.join(root, rel)))
        for key in keys:
            entries_of.setdefault(key, []).append(n)
    found, matched = set(), set()
    for i, path in enumerate(_paths_of(records)):
        hit = entries_of.get(_same_file_key(path))
        if hit:
            found.add(i)
            matched.update(hit)
    return found, len(exclude.paths) - len(matched)


def _paths_of(records: Sequence[VideoRecord] | RecordTable) -> Iterator[str]:
    return records.iter_paths() if isinstance(records, RecordTable) else (r.path for r in records)


def exclusions_for(records: Sequence[VideoRecord] | RecordTable, exclude_list: str | None,
                   data_root: str | os.PathLike | None) -> set[int]:
    """--exclude_list applied to a training list: the record indices never to open (one line says how many)."""
    if not exclude_list:
        return set()
    exclude = read_exclude_list(exclude_list)
    found, unmatched = excluded_indices(records, exclude, data_root)
    print(f"Exclude list {exclude_list}: {len(found)} of the {len(records)} training videos are never opened"
          + (f"; {unmatched} of its {len(exclude.paths)} paths name no video of this list" if unmatched else ""))
    if exclude.paths and not found:
        print(f"WARNING: no path of {exclude_list} names a video of the training list; its paths must be absolute, "
              "relative to --data_root, or (a check report) under the report's data_root", flush=True)
    return found


# ----------------------------------------------------------------------------------------------- video reading


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


BACKEND_MODULES = {"decord": "decord", "pyav": "av"}  # video backend -> the package it needs


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


# ----------------------------------------------------------------------------------------------- evaluation lists


class EvalListError(ValueError):
    """Evaluation videos that cannot be used, found at start-up; the message lists every one (up to MAX_LISTED
    per list, then a count)."""


def find_unusable_videos(records: Sequence[VideoRecord], backend: str = "auto", threads: int = 8,
                         label: str = "check") -> list[dict]:
    """The cheap start-up check of a video list: each file exists, is not empty, is not an MP4 cut short (its box
    layout) and opens with video frames; nothing is decoded. Returns video_tools.check_video's dict of each bad
    file ("path", "status", "message"), in list order.

    Files are probed in `threads` threads (opening a container mostly waits on the disk); with several processes
    each rank probes an interleaved share and every rank gets all results, so all ranks decide alike. Under
    "auto" a file is probed with PyAV, the loader's first choice.
    """
    from concurrent.futures import ThreadPoolExecutor

    import distributed
    import video_tools

    probe_backend = "decord" if backend == "decord" or not _importable(BACKEND_MODULES["pyav"]) else "pyav"
    paths = list(dict.fromkeys(r.path for r in records))
    mine = paths[distributed.get_rank()::distributed.get_world_size()]

    def probe(path: str) -> dict:
        return video_tools.check_video(path, 1, probe_backend, open_only=True)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(video_tools._with_progress(pool.map(probe, mine), len(mine), label))
    bad = {r["path"]: r for part in distributed.gather_objects([r for r in results if r["status"] != "ok"])
           for r in part}
    return [bad[p] for p in paths if p in bad]


def format_unusable(problems: Sequence[dict], limit: int = MAX_LISTED) -> str:
    """Lines naming bad files (status, path, why): the first `limit`, then how many more."""
    lines = [f"  {p['status']:<12} {p['path']}: {p['message'].replace(p['path'] + ': ', '')}"
             for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def check_eval_lists(lists: dict[str, Sequence[VideoRecord]], backend: str = "auto", skip: bool = False) -> None:
    """Stop a run at start-up, not after an epoch of training, when an evaluation list names a video evaluation
    would refuse. lists: a label (e.g. "--val_data_path val.json") -> its records. Every list is checked and every
    bad file of every list is reported in one EvalListError; `skip` (--skip_eval_check) skips the check."""
    lists = {label: records for label, records in lists.items() if records}
    if not lists:
        return
    total = len({r.path for records in lists.values() for r in records})
    if skip:
        print(f"Evaluation lists not checked (--skip_eval_check): {total} videos", flush=True)
        return
    t0 = time.monotonic()
    print(f"Checking the {total} videos of {len(lists)} evaluation list(s) (each opens; --skip_eval_check skips "
          "this)", flush=True)
    found = {label: find_unusable_videos(records, backend, label="eval check") for label, records in lists.items()}
    found = {label: problems for label, problems in found.items() if problems}
    if not found:
        print(f"Evaluation videos checked in {time.monotonic() - t0:.1f} s: all open", flush=True)
        return
    parts = [f"{label}: {len(problems)} of {len({r.path for r in lists[label]})} videos cannot be used\n"
             f"{format_unusable(problems)}" for label, problems in found.items()]
    raise EvalListError(
        "evaluation list(s) name videos that cannot be used; evaluation refuses broken videos (the set would "
        "change silently), so the run stops now rather than after training:\n" + "\n".join(parts) +
        "\nrepair them or remove them from the list (`python video_tools.py check --anno LIST` decodes frames "
        "too), or pass --skip_eval_check to start without this check")


# ----------------------------------------------------------------------------------------------- frame sampling


def _check_sampling(num_video_frames: int, num_frames: int, sampling_rate: int) -> None:
    if num_video_frames < 1:
        raise ValueError(f"the video has no frames ({num_video_frames})")
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(f"need num_frames >= 1 and sampling_rate >= 1, got {num_frames} and {sampling_rate}")


def pretrain_frame_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                           rng: np.random.Generator) -> list[int]:
    """VideoMAE pre-training sampling: a random start in [0, n - num_frames * rate], then every rate-th frame.

    Videos shorter than the window start at 0 and repeat their last frame (indices clamped, never out of range).
    """
    _check_sampling(num_video_frames, num_frames, sampling_rate)
    window = num_frames * sampling_rate
    start = int(rng.integers(0, num_video_frames - window + 1)) if num_video_frames >= window else 0
    return [min(start + i * sampling_rate, num_video_frames - 1) for i in range(num_frames)]


def test_clip_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                      num_segments: int) -> list[list[int]]:
    """num_segments clips of num_frames (stride sampling_rate) with starts spread evenly over the video (one
    segment: the middle clip). Deterministic; indices clamped to the video."""
    _check_sampling(num_video_frames, num_frames, sampling_rate)
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    last_start = max(0, num_video_frames - num_frames * sampling_rate)
    if num_segments == 1:
        starts = [last_start // 2]
    else:
        starts = [int(round(k * last_start / (num_segments - 1))) for k in range(num_segments)]
    return [[min(s + i * sampling_rate, num_video_frames - 1) for i in range(num_frames)] for s in starts]


test_clip_indices.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported by name

# How a clip's frames are chosen (--sample_type / --sample_type_test):
# stride: VideoMAE's num_frames at stride --sampling_rate (training: a random window; evaluation: windows spread
#         over the video); rand / middle: the whole video cut into num_frames equal segments (Singularity / ALBEF /
#         SViTT), one frame of each: a uniformly random one (rand) or the middle one (middle).
SAMPLE_TYPES = ("stride", "rand", "middle")


def default_test_sample_type(sample_type: str) -> str:
    """Evaluation clips follow the training family: segment-middle after segment training, else stride."""
    return "middle" if sample_type in ("rand", "middle") else "stride"


def _check_sample_type(sample_type: str) -> None:
    if sample_type not in SAMPLE_TYPES:
        raise ValueError(f"unknown sample type {sample_type!r}; choose one of {', '.join(SAMPLE_TYPES)}")


def segment_bounds(num_video_frames: int, num_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of num_frames equal segments of the whole video: edges i * n // num_frames (the
    integer linspace of Singularity / ALBEF), so the segments tile [0, n) with lengths differing by at most one.

    A video shorter than num_frames has segments narrower than a frame; each then holds the one frame its start
    falls in, so frames repeat in order, evenly (3 frames, 6 segments: 0 0 1 1 2 2; Singularity instead pads the
    end with the last frame: 0 1 2 2 2 2)."""
    _check_sampling(num_video_frames, num_frames, 1)
    edges = [i * num_video_frames // num_frames for i in range(num_frames + 1)]
    return [(a, max(b, a + 1)) for a, b in zip(edges, edges[1:])]


def segment_frame_indices(num_video_frames: int, num_frames: int, sample_type: str,
                          rng: np.random.Generator | None = None, view: int = 0, num_views: int = 1) -> list[int]:
    """One frame of each of num_frames equal segments: uniformly random over the segment (rand, drawn from rng;
    Singularity's never drew a segment's last frame) or, for middle, the frame at relative position
    (view + 0.5) / num_views of its segment, a position on a frame boundary taking the earlier frame (one view:
    the middle frame, the earlier of two middles, as Singularity / SViTT evaluate). Integer arithmetic."""
    bounds = segment_bounds(num_video_frames, num_frames)
    if sample_type == "rand":
        if rng is None:
            raise ValueError("rand sampling needs the sample's generator (rng)")
        starts, ends = np.array(bounds).T
        return [int(i) for i in rng.integers(starts, ends)]
    if sample_type != "middle":
        raise ValueError(f"segment sampling is rand or middle, got {sample_type!r}")
    if not 0 <= view < num_views:
        raise ValueError(f"need 0 <= view < num_views, got view {view} of {num_views}")
    return [a + ((2 * view + 1) * (b - a) - 1) // (2 * num_views) for a, b in bounds]


def segment_clip_indices(num_video_frames: int, num_frames: int, num_views: int, sample_type: str,
                         rng: np.random.Generator | None = None) -> list[list[int]]:
    """num_views evaluation clips of segment sampling. middle: view j takes, in every segment, the frame at
    relative position (j + 0.5) / num_views (one view: the middle), so the views spread through each segment;
    rand: each view one independent random frame per segment, drawn from rng in view order."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if sample_type == "rand":
        return [segment_frame_indices(num_video_frames, num_frames, "rand", rng) for _ in range(num_views)]
    return [segment_frame_indices(num_video_frames, num_frames, sample_type, view=j, num_views=num_views)
            for j in range(num_views)]


def train_frame_indices(num_video_frames: int, num_frames: int, sampling_rate: int, sample_type: str,
                        rng: np.random.Generator) -> list[int]:
    """A training clip's frames under --sample_type (sampling_rate is used by stride only)."""
    _check_sample_type(sample_type)
    if sample_type == "stride":
        return pretrain_frame_indices(num_video_frames, num_frames, sampling_rate, rng)
    return segment_frame_indices(num_video_frames, num_frames, sample_type, rng)


def eval_clip_indices(num_video_frames: int, num_frames: int, sampling_rate: int, num_views: int,
                      sample_type: str, rng: np.random.Generator | None = None) -> list[list[int]]:
    """An evaluation video's num_views clips under --sample_type_test (sampling_rate is used by stride only; rng
    by rand only)."""
    _check_sample_type(sample_type)
    if sample_type == "stride":
        return test_clip_indices(num_video_frames, num_frames, sampling_rate, num_views)
    return segment_clip_indices(num_video_frames, num_frames, num_views, sample_type, rng)


# ----------------------------------------------------------------------------------------------- clip transforms

_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) * 255
_INV_STD_255 = 1.0 / (torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255)
_SHIFT = -_MEAN_255 * _INV_STD_255


def multi_scale_crop_box(height: int, width: int, input_size: int, rng: np.random.Generator,
                         scales: Sequence[float] = MULTI_SCALES, max_distort: int = 1) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of VideoMAE's GroupMultiScaleCrop with fix_crop and more_fix_crop=False.

    Crop sides are scales of the short side (sides within 2 px of input_size snap to it), height and width at
    most max_distort scale steps apart; the box sits at one of 5 fixed places (4 corners, centre).
    """
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [input_size if abs(s - input_size) < 3 else s for s in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    crop_w, crop_h = max(1, min(crop_w, width)), max(1, min(crop_h, height))  # snapping may exceed a small frame
    w_step, h_step = (width - crop_w) // 4, (height - crop_h) // 4
    offsets = [(0, 0), (0, 4 * w_step), (4 * h_step, 0), (4 * h_step, 4 * w_step), (2 * h_step, 2 * w_step)]
    top, left = offsets[int(rng.integers(len(offsets)))]
    return top, left, crop_h, crop_w


def _resize(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, h, w], one bilinear antialiased resize of the whole clip (PIL-like)."""
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # channels-last memory: fast path
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False, antialias=True)


def _channels_first(clip: torch.Tensor) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> uint8 [3, T, H, W], contiguous (the layout the models take, still 1 byte a value)."""
    return clip.permute(1, 0, 2, 3).contiguous()


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, T, H, W] (what the loader yields) -> float32 ImageNet-normalised, on video's device.

    Clips stay uint8 through the data-loader workers' shared memory (4x fewer bytes than float32) and are
    normalised here, on the device, right before the model (whose contract takes normalised float video). One
    fused multiply-add with the same constants on every device. A floating tensor is taken as normalised already
    (batches built by hand, e.g. the benchmarks) and returned unchanged."""
    if video.is_floating_point():
        return video
    if video.dtype != torch.uint8:
        raise TypeError(f"video must be uint8 pixels or normalised float, got {video.dtype}")
    scale, shift = on_device(video.device, inv_std_255=_INV_STD_255, shift=_SHIFT)
    return torch.addcmul(shift, video.float(), scale)


_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def on_device(device: torch.device, **constants: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Module constants (CPU tensors, by name) on `device`, copied there once: a copy from pageable memory in every
    step would make the host wait for the GPU."""
    for name, value in constants.items():
        if (name, device) not in _ON_DEVICE:
            _ON_DEVICE[(name, device)] = value.to(device)
    return tuple(_ON_DEVICE[(name, device)] for name in constants)


def train_clip_transform(frames: np.ndarray, input_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Pre-training augmentation: one multi-scale corner/centre crop for every frame (on uint8), one resize to
    input_size, no flip. frames uint8 [T, H, W, 3] -> uint8 [3, T, input_size, input_size] (normalize_video makes
    the model's input on the device)."""
    top, left, h, w = multi_scale_crop_box(frames.shape[1], frames.shape[2], input_size, rng)
    return _channels_first(_resize(frames[:, top:top + h, left:left + w], (input_size, input_size)))


def _short_side_resize(frames: np.ndarray, short_side: int) -> torch.Tensor:
    h, w = frames.shape[1:3]
    size = (short_side, max(1, int(w * short_side / h))) if h <= w else (max(1, int(h * short_side / w)), short_side)
    return _resize(frames, size)


def test_views(frames: np.ndarray, clips: Sequence[Sequence[int]], input_size: int, short_side_size: int,
               num_crops: int) -> torch.Tensor:
    """Evaluation views: frames uint8 [U, H, W, 3] (the decoded frames), clips = rows of positions into them.

    The short side is resized to short_side_size once; each clip gives num_crops input_size squares spaced
    along the long side (centred on the short side). -> uint8 [V, 3, T, input_size, input_size], V = clips x
    crops, clip-major (normalize_video makes the model's input on the device)."""
    if short_side_size < input_size:
        raise ValueError(f"short_side_size {short_side_size} < input_size {input_size}")
    resized = _short_side_resize(frames, short_side_size)  # [U, 3, h, w]
    h, w = resized.shape[-2:]
    long_is_w = w >= h
    long_side, short = (w, h) if long_is_w else (h, w)
    across = (short - input_size) // 2
    if num_crops == 1:
        along = [(long_side - input_size) // 2]
    else:
        along = [int(round(k * (long_side - input_size) / (num_crops - 1))) for k in range(num_crops)]
    views = []
    for rows in clips:
        clip = resized[list(rows)]
        for a in along:
            top, left = (across, a) if long_is_w else (a, across)
            views.append(_channels_first(clip[:, :, top:top + input_size, left:left + input_size]))
    return torch.stack(views)


test_views.__test__ = False  # type: ignore[attr-defined]

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
        _check_sample_type(sample_type)
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
        self.fallback_backend = other if video_backend == "auto" and _importable(BACKEND_MODULES[other]) else None
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
        views = test_views(frames, [[pos[i] for i in clip] for clip in clips], self.input_size,
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


def span_frames(num_video_frames: int, fps: float, span: Span | None) -> tuple[int, int]:
    """A span (start, end) in seconds -> (first frame, frame count) of the video's frames in it: from frame
    floor(start x fps) to ceil(end x fps) (exclusive), None meaning the video's start / end. A span beyond the
    video keeps at least its last frame, so a record never has no frames."""
    if span is None or fps <= 0:
        return 0, num_video_frames
    start, end = span
    first = min(int(math.floor((start or 0.0) * fps)), num_video_frames - 1)
    stop = num_video_frames if end is None else min(int(math.ceil(end * fps)), num_video_frames)
    return first, max(1, stop - first)


# ----------------------------------------------------------------------------------------------- collate


class VideoTextCollator:
    """Stacks dataset items and tokenises captions in one batched call of the fast tokenizer.

    train batch: video [B, 3, T, H, W], video_mask bool [B, N] (if given), index / epoch long [B], match_id long
    [B] (when the items carry one: the contrastive positives' id, see VideoTextDataset), num_visible_tubes (int,
    with video_mask: each clip's unmasked tubes, equal over the batch), videos_read /
    videos_broken (the items' read / broken summed, long scalars), broken_videos (the items' [(path, error)],
    each file once), caption (list of str), input_ids / attention_mask long [B, L] (padded to the longest caption,
    truncated to max_text_len) and, when text_mask_ratio is set, mlm_input_ids / mlm_labels [B, L] from
    masking_generator.mask_text_batch with one sample_rng(seed, epoch, index, "text_mask") per row.
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
            from masking_generator import mask_text_batch
            rngs = [sample_rng(self.seed, int(e), int(i), copy_stream("text_mask", c))
                    for e, i, c in zip(batch["epoch"], batch["index"], copies)]
            batch["mlm_input_ids"], batch["mlm_labels"] = mask_text_batch(
                batch["input_ids"], batch["attention_mask"], self.text_mask_ratio, rngs,
                mask_token_id=self.tokenizer.mask_token_id, mode=self.text_mask_mode,
                vocab_size=len(self.tokenizer))
        return batch



def equal_row_count(mask: torch.Tensor) -> int:
    """The number of True per row of a bool [B, N] mask, checked equal over the rows on the host (a tube mask's
    visible count: the model selects the tubes with shapes known before the step, no sync on the device)."""
    counts = mask.sum(dim=1).tolist()
    if len(set(counts)) > 1:
        raise ValueError(f"every clip of a batch needs the same number of masked tubes, got {counts}")
    return counts[0]


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

_QA_FORMAT_HELP = ('the Singularity QA JSON list [{"video": path, "question": str, "answer": str or [str, ...], '
                   '"question_id": str or int, "answer_type": str (optional)}]')


@dataclass
class QARecord:
    """One question about one video: its distinct answers with their shares of the annotators (summing to 1),
    its id (str or int, as the file gives it) and answer type (None when the file gives none)."""
    path: str
    question: str
    answers: list[str]
    weights: list[float]
    question_id: str | int
    answer_type: str | None = None


def answer_weights(answers: str | Sequence[str]) -> tuple[list[str], list[float]]:
    """Distinct answers in first-seen order and each one's share of the annotators: ["a", "a", "b"] ->
    (["a", "b"], [2/3, 1/3]); a single string has weight 1."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("no answers")
    counts = collections.Counter(answers)
    distinct = list(dict.fromkeys(answers))
    return distinct, [counts[a] / len(answers) for a in distinct]


def read_qa_annotations(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                        skip_bad_records: bool = False, clean_text: bool = False) -> list[QARecord]:
    """The questions of an MSRVTT-QA / ActivityNet-QA / AGQA file in the Singularity QA layout (_QA_FORMAT_HELP),
    in file order. As read_annotations: relative videos joined to data_root; every bad record (missing field,
    empty question or answer, repeated question_id) reported in one AnnotationError naming file and record, or
    dropped and counted with skip_bad_records. clean_text: clean_caption on the questions, as the SViTT /
    Singularity QA recipes do (answers are kept as written: they must match the answer list)."""
    path = os.fspath(path)
    root = os.fspath(data_root) if data_root else None
    items = _read_json_list(path, _QA_FORMAT_HELP)
    records: list[QARecord] = []
    bad: list[str] = []
    seen: dict[str | int, int] = {}
    for n, item in enumerate(items, 1):
        try:
            record = _qa_record(f"record {n}", item, root, clean_text)
            if record.question_id in seen:
                raise _BadRecord(f"record {n}: question_id {record.question_id!r} repeats record "
                                 f"{seen[record.question_id]}")
        except _BadRecord as e:
            bad.append(str(e))
            continue
        seen[record.question_id] = n
        records.append(record)
    if bad and not skip_bad_records:
        raise AnnotationError(_bad_records_message(path, bad, len(items)))
    if bad:
        print(f"{path}: dropped {len(bad)} bad question(s) of {len(items)} (--skip_bad_records), e.g. {bad[0]}",
              flush=True)
    if not records:
        raise AnnotationError(f"{path}: no questions" + (f" left after dropping {len(bad)} bad ones" if bad else ""))
    return records


def _read_json_list(path: str, expected: str) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: bad JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e}); expected {expected}") from None
    if not isinstance(obj, list):
        raise AnnotationError(f"{path}: top-level JSON must be a list, got {type(obj).__name__}; expected {expected}")
    return obj


def _qa_text(where: str, value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadRecord(f"{where}: '{name}' must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _qa_record(where: str, item: Any, root: str | None, clean_text: bool = False) -> QARecord:
    if not isinstance(item, dict):
        raise _BadRecord(f"{where}: expected an object {{\"video\", \"question\", \"answer\", \"question_id\"}}, "
                         f"got {type(item).__name__}")
    for key in ("video", "question", "answer", "question_id"):
        if key not in item:
            raise _BadRecord(f"{where}: missing field '{key}' (has {sorted(item)})")
    rel = _video_path(where, item["video"])
    question = _qa_text(where, item["question"], "question")
    if clean_text:
        question = clean_caption(question)
        if not question:
            raise _BadRecord(f"{where}: question {item['question']!r:.60} is empty after text cleaning")
    raw = item["answer"] if isinstance(item["answer"], list) else [item["answer"]]
    if not raw:
        raise _BadRecord(f"{where}: empty answer list")
    answers, weights = answer_weights([_qa_text(f"{where} answer {k}", a, "answer") for k, a in enumerate(raw, 1)])
    qid = item["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or (isinstance(qid, str) and not qid.strip()):
        raise _BadRecord(f"{where}: 'question_id' must be a non-empty string or an integer, got {qid!r:.60}")
    answer_type = item.get("answer_type")
    if answer_type is not None:
        answer_type = _qa_text(where, answer_type, "answer_type")
    return QARecord(_under_root(root, rel), question, answers, weights, qid, answer_type)


def read_answer_list(path: str | os.PathLike) -> list[str]:
    """The closed answer list of a QA benchmark: a JSON list of distinct non-empty strings (answers are ranked
    against it at evaluation)."""
    path = os.fspath(path)
    answers = _read_json_list(path, "a JSON list of answer strings")
    for n, a in enumerate(answers, 1):
        if not isinstance(a, str) or not a.strip():
            raise AnnotationError(f"{path}: answer {n} must be a non-empty string, got {a!r:.60}")
    stripped = [a.strip() for a in answers]
    repeated = [a for a, c in collections.Counter(stripped).items() if c > 1]
    if repeated:
        raise AnnotationError(f"{path}: answer {repeated[0]!r} is listed {stripped.count(repeated[0])} times")
    if not stripped:
        raise AnnotationError(f"{path}: empty answer list")
    return stripped


@dataclass
class UnlistedAnswers:
    """Questions whose answer is not in the answer list: no ranking of the list can answer them right, so
    evaluation counts them (as wrong) and reports them; they are never dropped."""
    count: int
    total: int
    question_ids: list[str | int]  # the first MAX_LISTED
    answers: list[str]  # their (top-weighted) answers, same order

    def message(self, name: str = "questions") -> str:
        if not self.count:
            return f"{name}: every answer of the {self.total} questions is in the answer list"
        examples = ", ".join(f"{q!r} ({a!r})" for q, a in zip(self.question_ids, self.answers))
        return (f"{name}: {self.count} of {self.total} questions ({100 * self.count / self.total:.1f}%) have an "
                f"answer outside the answer list (counted as wrong), e.g. {examples}")


def unlisted_answers(records: Sequence[QARecord], answer_list: Collection[str]) -> UnlistedAnswers:
    """Which questions' top-weighted answer (the one exact-match accuracy scores against) is not in the list."""
    listed = set(answer_list)
    missing = [r for r in records if top_answer(r) not in listed]
    return UnlistedAnswers(len(missing), len(records), [r.question_id for r in missing[:MAX_LISTED]],
                           [top_answer(r) for r in missing[:MAX_LISTED]])


def top_answer(record: QARecord) -> str:
    """The answer with the largest share (the first one on a tie): the ground truth of exact-match accuracy."""
    return record.answers[int(np.argmax(record.weights))]


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
        video_records = [VideoRecord(r.path, [str(k)], _id_of(os.path.basename(r.path)))
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
        batch: dict[str, Any] = {"video": torch.stack([it["video"] for it in items])}
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
        self.videos = VideoTextDataset([VideoRecord(path, [str(k) for k in ks], _id_of(os.path.basename(path)))
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
