"""annotations.RecordTable / read_record_table: the training list as numpy columns. Every field of every annotation
format round-trips, the readers' errors, merging and --skip_bad_records are the same as read_annotations', exclude
lists and the training dataset give the same samples as with a list of records, and a forked worker that touches
every record of a table gains far less private memory than one that touches a list of records."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import annotations
import datasets
import engine_for_retrieval
import synthetic_dataset
import video_transforms
from conftest import ROOT
from annotations import AnnotationError, RecordTable, VideoRecord

FORMATS = ("train_webvid.csv", "pretrain.json", "train.json", "val.json", "test.json", "test_1k.csv")


def _fields(records) -> list[tuple[str, list[str], str]]:
    return [(r.path, r.captions, r.video_id) for r in records]


def _table_fields(table: RecordTable) -> list[tuple[str, list[str], str]]:
    return [(table.path(i), table.captions(i), table.video_id(i)) for i in range(len(table))]


@pytest.mark.parametrize("name", FORMATS)
def test_every_field_of_every_format_round_trips(synthetic_root, name):
    path = synthetic_root / "annotations" / name
    records = annotations.read_annotations(path, synthetic_root)
    table = annotations.read_record_table(path, synthetic_root)
    assert isinstance(table, RecordTable) and len(table) == len(records)
    assert _table_fields(table) == _fields(records)
    assert list(table) == records and [table[i] for i in range(-len(table), 0)] == records
    assert table.caption_counts().tolist() == [len(r.captions) for r in records]
    assert table.num_captions == sum(len(r.captions) for r in records)
    assert list(table.iter_paths()) == [r.path for r in records]
    assert list(RecordTable.from_records(records)) == records
    assert list(pickle.loads(pickle.dumps(table))) == records  # what a spawned loader worker receives
    if name == "train.json":  # the Singularity list: several captions per video
        assert table.caption_counts().max() > 1


def test_unicode_repeated_videos_and_several_captions(tmp_path):
    items = [{"video": "clips/ünï 中文.mp4", "caption": ["Ein Hund läuft 🐕", "犬が走る", "a dog runs"]},
             {"video": "b.mp4", "caption": "a \ud800 lone surrogate, kept as it is"},
             {"video": "clips/ünï 中文.mp4", "caption": ["a dog runs", "one more 🐶", "one more 🐶"]},
             {"video": "c.mp4", "caption": ["twice", "twice"]}]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(items))  # \ud800 is written as an escape: valid JSON, not encodable as UTF-8
    expected = [("/r/clips/ünï 中文.mp4", ["Ein Hund läuft 🐕", "犬が走る", "a dog runs", "one more 🐶"],
                 "clips/ünï 中文"),
                ("/r/b.mp4", ["a \ud800 lone surrogate, kept as it is"], "b"),
                ("/r/c.mp4", ["twice", "twice"], "c")]  # a video's first captions are kept as listed
    assert _fields(annotations.read_annotations(path, "/r")) == expected
    table = annotations.read_record_table(path, "/r")
    assert _table_fields(table) == expected and table.caption_counts().tolist() == [4, 1, 2]
    csv_path = tmp_path / "webvid.csv"
    csv_path.write_text("videoid,contentUrl,duration,page_dir,name\n"
                        '7,u,PT1S,p1,"Café ""au lait"", 2 × 3 = ⑥"\n'
                        '8,u,PT1S,p1,"a caption\nover two lines"\n'
                        "7,u,PT1S,p1,Café again\n", encoding="utf-8")
    table = annotations.read_record_table(csv_path, "/w")
    assert _table_fields(table) == _fields(annotations.read_annotations(csv_path, "/w")) == [
        ("/w/p1/7.mp4", ['Café "au lait", 2 × 3 = ⑥', "Café again"], "7"),
        ("/w/p1/8.mp4", ["a caption\nover two lines"], "8")]


def test_a_byte_order_mark_and_windows_line_ends_are_read_alike(tmp_path):
    """The reader peeks at the first character, then reads from the start again: the mark must stay skipped."""
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("\ufeffvideoid,contentUrl,duration,page_dir,name\r\n1,u,PT1S,p,Crème brûlée\r\n\r\n"
                         "2,u,PT1S,p,\"two\r\nlines\"\r\n".encode("utf-8"))
    json_path = tmp_path / "dict.json"
    json_path.write_bytes("\ufeff\r\n  {\"a.mp4\": \"Ünïcode\"}\r\n".encode("utf-8"))
    for path, expected in [(csv_path, [("p/1.mp4", ["Crème brûlée"], "1"), ("p/2.mp4", ["two\nlines"], "2")]),
                           (json_path, [("a.mp4", ["Ünïcode"], "a")])]:
        assert _fields(annotations.read_annotations(path)) == expected
        assert _table_fields(annotations.read_record_table(path)) == expected


def test_many_repeats_merge_like_the_list_reader(tmp_path):
    rng = np.random.default_rng(0)
    items = [{"video": f"v{int(v)}.mp4", "caption": [f"caption {int(c)}" for c in rng.integers(0, 6, size=2)]}
             for v in rng.integers(0, 40, size=300)]
    path = tmp_path / "repeats.json"
    path.write_text(json.dumps(items))
    records = annotations.read_annotations(path)
    assert len(records) == len({item["video"] for item in items}) < len(items)
    assert list(annotations.read_record_table(path)) == records


def test_empty_tables_and_files_with_no_good_record(tmp_path):
    empty = RecordTable.from_records([])
    assert len(empty) == 0 and list(empty) == [] and empty.num_captions == 0 and not empty
    assert empty.caption_counts().tolist() == [] and len(empty[0:5]) == 0
    with pytest.raises(IndexError, match="record 0 out of range for a table of 0"):
        empty.path(0)
    with pytest.raises(ValueError, match="no records"):
        datasets.VideoTextDataset(empty)
    with pytest.raises(ValueError, match="1 training records have no caption, e.g. b.mp4"):
        datasets.VideoTextDataset(RecordTable.from_records([VideoRecord("a.mp4", ["x"]), VideoRecord("b.mp4")]))
    table = RecordTable.from_records([VideoRecord("a.mp4", ["x"], "a")])
    with pytest.raises(IndexError):
        table[1]
    for name, text in [("empty.csv", "  \n"), ("list.json", "[]"), ("header.csv", "key,vid_key,video_id,sentence\n")]:
        path = tmp_path / name
        path.write_text(text)
        errors = []
        for read in (annotations.read_annotations, annotations.read_record_table):
            with pytest.raises(AnnotationError) as e:
                read(path)
            errors.append(str(e.value))
        assert errors[0] == errors[1] and str(path) in errors[0]


def test_bad_records_are_reported_or_skipped_alike(tmp_path, capsys):
    rows = "".join(f"{i},u,PT1S,p,caption {i}\n" if i % 3 else f"{i},u,PT1S,p,\n" for i in range(30))
    path = tmp_path / "bad.csv"
    path.write_text("videoid,contentUrl,duration,page_dir,name\n" + rows + "99,too,few\n")
    errors = []
    for read in (annotations.read_annotations, annotations.read_record_table):
        with pytest.raises(AnnotationError) as e:
            read(path)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "11 bad records of 31" in errors[0] and "3 columns" in errors[0]
    records = annotations.read_annotations(path, skip_bad_records=True)
    table = annotations.read_record_table(path, skip_bad_records=True)
    assert list(table) == records and len(table) == 20 and table.video_id(0) == "1"
    out = capsys.readouterr().out
    assert out.count("dropped 11 bad record(s) of 31 (--skip_bad_records)") == 2


def test_exclude_lists_match_the_same_records_of_a_table(synthetic_root, tmp_path):
    anno = synthetic_root / "annotations" / "train_webvid.csv"
    records = annotations.read_annotations(anno, synthetic_root)
    table = annotations.read_record_table(anno, synthetic_root)
    listed = tmp_path / "broken_videos.txt"
    listed.write_text(f"# dead\n{records[2].path}\tmissing\ntrain/{os.path.basename(records[5].path)}\n"
                      f"{os.path.relpath(records[7].path)}\nnot/a/listed/video.mp4\n")
    exclude = annotations.read_exclude_list(listed)
    assert annotations.excluded_indices(table, exclude, synthetic_root) == ({2, 5, 7}, 1)
    assert annotations.excluded_indices(records, exclude, synthetic_root) == ({2, 5, 7}, 1)
    assert annotations.exclusions_for(table, str(listed), synthetic_root) == {2, 5, 7}


def _expected_caption(records, seed, epoch, index):
    """The caption rule of the training dataset: one of the record's captions, drawn by the sample's own stream."""
    captions = records[index].captions
    return captions[int(video_transforms.sample_rng(seed, epoch, index, "caption").integers(len(captions)))]


@pytest.mark.parametrize("name", ["train.json", "train_webvid.csv"])
def test_the_training_dataset_gives_the_same_items_from_a_table(synthetic_root, name, tmp_path):
    anno = synthetic_root / "annotations" / name
    records = annotations.read_annotations(anno, synthetic_root)
    table = annotations.read_record_table(anno, synthetic_root)
    kw = dict(num_frames=4, sampling_rate=2, input_size=32, seed=5, video_backend="pyav")
    from_table, from_list = datasets.VideoTextDataset(table, **kw), datasets.VideoTextDataset(records, **kw)
    assert from_table.records is table and isinstance(from_list.records, RecordTable)
    for epoch in (0, 1):
        from_table.set_epoch(epoch)
        from_list.set_epoch(epoch)
        for i in (0, 3, len(records) - 1):
            a, b = from_table[i], from_list[i]
            assert a["caption"] == b["caption"] == _expected_caption(records, 5, epoch, i)
            assert torch.equal(a["video"], b["video"]) and (a["read"], a["broken"]) == (1, 0)
    # an excluded video falls through to the same substitute (its caption) from a table as from a list
    excluded = {1, 2}
    ex_table = datasets.VideoTextDataset(table, excluded=excluded, **kw)
    ex_list = datasets.VideoTextDataset(records, excluded=excluded, **kw)
    a, b = ex_table[1], ex_list[1]
    assert a["caption"] == b["caption"] and torch.equal(a["video"], b["video"]) and a["read"] == 0
    test_set = datasets.VideoTextDataset(table, mode="test", num_frames=4, sampling_rate=2, input_size=32,
                                         short_side_size=32)
    assert test_set[2]["captions"] == records[2].captions


def test_split_val_of_a_table_holds_out_the_same_videos(synthetic_root):
    anno = synthetic_root / "annotations" / "train.json"
    records = annotations.read_annotations(anno, synthetic_root)
    table = annotations.read_record_table(anno, synthetic_root)
    train, val = engine_for_retrieval.split_val(table, 0.25, seed=3)
    list_train, list_val = engine_for_retrieval.split_val(records, 0.25, seed=3)
    assert isinstance(train, RecordTable) and isinstance(val, RecordTable)
    assert list(train) == list_train and list(val) == list_val and len(val) == 6
    assert list(table[2:9:3]) == records[2:9:3]


# ------------------------------------------------------------------------------------ memory of forked workers


def _private_bytes() -> int:
    """This process's private (unshared) memory: the Private_* fields of /proc/self/smaps_rollup."""
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Private_"))


def _private_growth_of_forked_child(touch) -> int:
    """Fork (as a data-loader worker is forked), run touch() in the child, return the child's private growth."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            before = _private_bytes()
            touch()
            os.write(write_end, str(_private_bytes() - before).encode())
        except BaseException as e:  # noqa: BLE001 - reported to the parent, never raised in a forked pytest
            os.write(write_end, f"error {e!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    assert not answer.startswith("error"), answer
    return int(answer)


def _touch_list(records) -> None:
    for r in records:
        (r.path, r.video_id, *r.captions)


def _touch_table(table) -> None:
    for i in range(len(table)):
        (table.path(i), table.video_id(i), *table.captions(i))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc/self/smaps_rollup")
def test_a_forked_worker_touching_every_record_copies_far_less_of_a_table(tmp_path):
    anno = synthetic_dataset.write_webvid_scale_csv(tmp_path / "webvid.csv", 100_000, seed=1)
    records = annotations.read_annotations(anno, "/data/webvid")
    table = annotations.read_record_table(anno, "/data/webvid")
    assert len(table) == len(records) == 100_000
    list_growth = _private_growth_of_forked_child(lambda: _touch_list(records))
    table_growth = _private_growth_of_forked_child(lambda: _touch_table(table))
    # each record object's reference count is written when it is touched, so the child copies their pages
    assert list_growth > 100_000 * 100, list_growth
    assert table_growth < 0.25 * list_growth, (table_growth, list_growth)


@pytest.mark.slow
def test_bench_records_prints_its_figures(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_records.py"), "--rows", "3000",
                           "--workers", "2", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for text in ("CPU:", "list of VideoRecord", "RecordTable", "build s", "held MiB", "worker copies MiB",
                 "WebVid-2.5M", "per 8-GPU node"):
        assert text in proc.stdout, text
    assert not list(tmp_path.iterdir())  # its CSV is removed
