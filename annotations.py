"""Annotation files -> records: the four training/retrieval formats, the compact record table of training lists,
benchmark formats, exclude lists of broken videos and the start-up check of evaluation lists (video-QA records:
qa_annotations.py).

    read_annotations(file) -> [VideoRecord(path, captions, video_id, span)]   (evaluation lists, tools)
    read_record_table(file) -> RecordTable: the same records as numpy columns (training lists of millions)

Annotation formats (detected from the contents, not the file name; ``data_root`` is joined to relative paths):

- WebVid-2M/10M CSV ``videoid,contentUrl,duration,page_dir,name``: video ``<root>/<page_dir>/<videoid>.mp4``,
  caption ``name``;
- the release's JSON dict ``{video_path: caption}`` (one caption per video);
- the Singularity/SViTT JSON list ``[{"video": path or [path, ...], "caption": str or [str, ...]}]``, optional
  ``"start"`` / ``"end"`` seconds (the record's span of its video: clips sample only those frames);
- the MSR-VTT 1k-A CSV ``key,vid_key,video_id,sentence``: video ``<root>/<video_id>.mp4``.

A benchmark's AnnotationFormat (``annotation_format(--data_set)``) joins a record's sentences into one paragraph
(DiDeMo, ActivityNet), cleans captions as the SViTT recipes (clean_caption) and says whether training positives
and evaluation queries go by video or by caption string (SSv2's one caption for many videos).

A video listed several times (with the same span) becomes one record with all its captions (else retrieval would
count the copies as different videos, and contrastive batches could pair a video with itself as a negative).
Files of an exclude list (``read_exclude_list``: a ``video_tools.py check --report`` or one path per line) are
never opened by training. Training lists are kept as a RecordTable (its docstring says why: memory per worker).
"""
from __future__ import annotations

import array
import collections.abc
import csv
import functools
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from video_io import VIDEO_EXTENSIONS, backend_installed, check_video, with_progress

VIDEO_EXTENSION = ".mp4"  # the suffix of WebVid / MSR-VTT files named by id


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file, the record and what is wrong."""


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


def video_id_of(rel: str) -> str:
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
    return rel, [_caption(where, caption)], video_id_of(rel), None


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
    return [(rel, captions, video_id_of(rel), span) for rel in rels]


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


# ----------------------------------------------------------------------------------------------- evaluation lists


class EvalListError(ValueError):
    """Evaluation videos that cannot be used, found at start-up; the message lists every one (up to MAX_LISTED
    per list, then a count)."""


def find_unusable_videos(records: Sequence[VideoRecord], backend: str = "auto", threads: int = 8,
                         label: str = "check") -> list[dict]:
    """The cheap start-up check of a video list: each file exists, is not empty, is not an MP4 cut short (its box
    layout) and opens with video frames; nothing is decoded. Returns video_io.check_video's dict of each bad
    file ("path", "status", "message"), in list order.

    Files are probed in `threads` threads (opening a container mostly waits on the disk); with several processes
    each rank probes an interleaved share and every rank gets all results, so all ranks decide alike. Under
    "auto" a file is probed with PyAV, the loader's first choice.
    """
    from concurrent.futures import ThreadPoolExecutor

    import distributed

    probe_backend = "decord" if backend == "decord" or not backend_installed("pyav") else "pyav"
    paths = list(dict.fromkeys(r.path for r in records))
    mine = paths[distributed.get_rank()::distributed.get_world_size()]

    def probe(path: str) -> dict:
        return check_video(path, 1, probe_backend, open_only=True)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(with_progress(pool.map(probe, mine), len(mine), label))
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
