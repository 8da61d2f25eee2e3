"""Benchmark annotation formats (DiDeMo / ActivityNet paragraphs, Charades scripts, SSv2 label and template
captions), their malformed variants, trimming spans, text cleaning, match-by-caption ids in a training batch, and
retrieval with several ground truths per query (metrics by hand, and SSv2's one caption -> several videos through
the real loader and the --zero_shot entry point)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import annotations
import checkpoint
import datasets
import retrieval_eval as engine
import model_registry
import engine_for_retrieval
import run_simvtp_finetuning as run
import synthetic_dataset
import video_transforms
from conftest import frame_index_of, index_frames
from annotations import AnnotationError, VideoRecord

DIDEMO = annotations.annotation_format("didemo")
SSV2 = annotations.annotation_format("ssv2_label")


def _write(tmp_path, name, obj) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def _read(path, fmt, root="/r") -> list[VideoRecord]:
    records = annotations.read_annotations(path, root, fmt=fmt)
    # the training list reads the same records (RecordTable, spans included)
    assert list(annotations.read_record_table(path, root, fmt=fmt)) == records
    return records

# ----------------------------------------------------------------------------------------------- formats


def test_format_defaults_per_data_set_and_overrides():
    assert annotations.annotation_format("MSRVTT") == annotations.AnnotationFormat()  # the scripts' value: no change
    assert annotations.annotation_format("webvid") == annotations.AnnotationFormat()
    assert DIDEMO == annotations.AnnotationFormat(paragraphs=True, clean_text=True, match_by="video")
    assert annotations.annotation_format("anet") == DIDEMO
    assert annotations.annotation_format("charades") == annotations.AnnotationFormat(clean_text=True)
    assert SSV2 == annotations.annotation_format("ssv2_template") == annotations.AnnotationFormat(clean_text=True,
                                                                                                  match_by="caption")
    assert annotations.annotation_format("didemo", paragraphs=False, clean_text=False) == annotations.AnnotationFormat()
    assert annotations.annotation_format("msrvtt", match_by="caption").match_by == "caption"
    with pytest.raises(ValueError, match="unknown --data_set 'kinetics'; choose one of msrvtt"):
        annotations.annotation_format("kinetics")


def test_clean_caption_as_the_svitt_recipes():
    # lower case; , . ' ! ? " ( ) * # : ; ~ dropped; - and / become spaces; <person> -> person; spaces squeezed
    assert annotations.clean_caption("A <person> opens the door, then (quickly) sits down.") == \
        "a person opens the door then quickly sits down"
    assert annotations.clean_caption("  Putting pen-cap onto a pen/pencil!  ") == "putting pen cap onto a pen pencil"
    assert annotations.clean_caption('It\'s "done": #1 ~ ok?; *yes*') == "its done 1 ok yes"
    assert annotations.clean_caption("Tilting [something] with 50% & more") == "tilting [something] with 50% & more"


def test_didemo_paragraph_joined_in_order_cleaned_and_trimmed(tmp_path):
    path = _write(tmp_path, "didemo_ret_test.json", [
        {"video": "v1.mp4", "caption": ["The Dog runs.", "It jumps over a fence!", "a man claps"]},
        {"video": "v2.mp4", "caption": ["Camera pans left"], "start": 5, "end": 12.5},
        {"video": "v2.mp4", "caption": "a car drives by", "start": 30},  # the same video, another span
    ])
    records = _read(path, DIDEMO)
    assert records == [VideoRecord("/r/v1.mp4", ["the dog runs it jumps over a fence a man claps"], "v1"),
                       VideoRecord("/r/v2.mp4", ["camera pans left"], "v2", (5.0, 12.5)),
                       VideoRecord("/r/v2.mp4", ["a car drives by"], "v2", (30.0, None))]
    # without paragraphs (and without cleaning) each sentence is its own caption, as written
    plain = _read(path, annotations.annotation_format("didemo", paragraphs=False, clean_text=False))
    assert plain[0].captions == ["The Dog runs.", "It jumps over a fence!", "a man claps"]


def test_activitynet_paragraphs_as_didemo(tmp_path):
    path = _write(tmp_path, "anet_ret_val_1.json", [
        {"video": "v_abc.mp4", "caption": ["A woman stands in a kitchen.", "She mixes flour, eggs and milk."],
         "duration": 80.2}])
    records = _read(path, annotations.annotation_format("anet"))
    assert records[0].captions == ["a woman stands in a kitchen she mixes flour eggs and milk"]
    assert records[0].span is None


def test_charades_script_captions_one_or_several(tmp_path):
    path = _write(tmp_path, "charades-script_test.json", [
        {"video": "ABC12.mp4", "caption": "A <person> is sitting on a chair, drinking coffee."},
        {"video": "XYZ99.mp4", "caption": ["<person> opens a closet.", "A person takes a towel-like cloth"]},
    ])
    records = _read(path, annotations.annotation_format("charades"))
    assert records == [VideoRecord("/r/ABC12.mp4", ["a person is sitting on a chair drinking coffee"], "ABC12"),
                       VideoRecord("/r/XYZ99.mp4", ["person opens a closet", "a person takes a towel like cloth"],
                                   "XYZ99")]
    # msrvtt (the default) never cleans
    assert _read(path, None)[0].captions == ["A <person> is sitting on a chair, drinking coffee."]


def test_ssv2_both_layouts_give_one_caption_for_several_videos(tmp_path):
    # training layout: one record a video; evaluation layout: one record a caption with a list of videos
    train = _write(tmp_path, "ssv2_ret_label_train.json", [
        {"video": "1.webm", "caption": "Putting pen onto table"},
        {"video": "2.webm", "caption": "Pushing cup from left to right"},
        {"video": "3.webm", "caption": "Putting pen onto table"}])
    val = _write(tmp_path, "ssv2_ret_label_val_small.json", [
        {"video": ["1.webm", "3.webm"], "caption": "Putting pen onto table"},
        {"video": "2.webm", "caption": "Pushing cup from left to right"}])
    by_train, by_val = _read(train, SSV2), _read(val, SSV2)
    assert sorted((r.path, r.captions[0]) for r in by_train) == sorted((r.path, r.captions[0]) for r in by_val) == [
        ("/r/1.webm", "putting pen onto table"), ("/r/2.webm", "pushing cup from left to right"),
        ("/r/3.webm", "putting pen onto table")]
    table = annotations.read_record_table(train, "/r", fmt=SSV2)
    assert table.caption_match_ids().tolist() == [0, 1, 0]


@pytest.mark.parametrize("items, fmt, expected", [
    ([{"video": "a.mp4", "caption": ["one sentence", 7]}], DIDEMO, ["record 1 caption 2: caption must be a string"]),
    ([{"video": "a.mp4", "caption": "ok", "start": -1}], DIDEMO, ["record 1: 'start' must be a number of seconds"]),
    ([{"video": "a.mp4", "caption": "ok"}, {"video": "b.mp4", "caption": "ok", "start": 9, "end": 3}], DIDEMO,
     ["record 2: 'end' 3 s must be after 'start' 9 s"]),
    ([{"video": "a.mp4", "caption": "ok", "end": "10s"}], DIDEMO, ["record 1: 'end' must be a number of seconds"]),
    ([{"video": "a.mp4", "caption": ["?!", "..."]}], annotations.annotation_format("charades"),
     ["record 1: caption 1 '?!' is empty after text cleaning (--no_clean_text"]),
    ([{"video": [], "caption": "Putting pen onto table"}], SSV2, ["record 1: empty video list"]),
    ([{"video": ["1.webm", 3], "caption": "Putting pen onto table"}], SSV2, ["record 1: 'video' must be a non-empty"]),
])
def test_malformed_records_name_the_file_and_record(tmp_path, items, fmt, expected):
    path = _write(tmp_path, "bad.json", items)
    for read in (annotations.read_annotations, annotations.read_record_table):
        with pytest.raises(AnnotationError) as e:
            read(path, "/r", fmt=fmt)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and len(message.splitlines()) == 1
        for part in expected:
            assert part in message


def test_cleaning_happens_only_when_asked(tmp_path):
    path = _write(tmp_path, "charades.json", [{"video": "a.mp4", "caption": "?!"}])
    assert _read(path, annotations.annotation_format("charades", clean_text=False))[0].captions == ["?!"]
    with pytest.raises(AnnotationError, match="empty after text cleaning"):
        annotations.read_annotations(path, fmt=annotations.annotation_format("charades"))

# ----------------------------------------------------------------------------------------------- spans


def test_span_frames_by_hand():
    # 10 fps, 40 frames: 1.0 s .. 2.0 s is frames 10..19; 1.05 s .. 1.91 s is frames 10 (floor) .. 19 (ceil excl.)
    assert video_transforms.span_frames(40, 10.0, (1.0, 2.0)) == (10, 10)
    assert video_transforms.span_frames(40, 10.0, (1.05, 1.91)) == (10, 10)
    assert video_transforms.span_frames(40, 10.0, (None, 0.5)) == (0, 5)
    assert video_transforms.span_frames(40, 10.0, (3.5, None)) == (35, 5)
    assert video_transforms.span_frames(40, 10.0, (3.5, 60.0)) == (35, 5)   # an end past the video stops at its end
    assert video_transforms.span_frames(40, 10.0, (9.0, 10.0)) == (39, 1)   # a span past the video keeps its last frame
    assert video_transforms.span_frames(40, 10.0, None) == (0, 40)


@pytest.fixture(scope="module")
def square_video(module_tmp):
    """A 64x64 index-coded clip, 40 frames at 10 fps (square: a test view keeps the whole frame and its code)."""
    path = module_tmp.mktemp("span") / "square.mp4"
    synthetic_dataset.write_video(path, index_frames(64, 64, 40), 10, "libx264")
    return path


def test_a_span_restricts_the_loaders_frames(square_video):
    record = VideoRecord(str(square_video), ["a clip"], "square", (1.0, 2.0))  # frames 10..19
    test = datasets.VideoTextDataset([record], mode="test", num_frames=4, input_size=64, short_side_size=64,
                                     sample_type="middle")
    view = test[0]["video"][0].permute(1, 2, 3, 0).numpy()  # [T, H, W, 3]
    # 10 frames in 4 segments (edges 0, 2, 5, 7, 10 of the span): middles 0, 3, 5, 8 -> frames 10, 13, 15, 18
    assert [frame_index_of(f) for f in view] == [10, 13, 15, 18]
    train = datasets.VideoTextDataset([record], mode="train", num_frames=4, input_size=64, sample_type="rand")
    frames, n = train._decode(record.path, lambda n: video_transforms.train_frame_indices(
        n, 4, 1, "rand", np.random.default_rng(0)), record.span)
    assert n == 10 and all(10 <= frame_index_of(f) < 20 for f in frames)

# ----------------------------------------------------------------------------------------------- match by caption


def _ssv2_files(synthetic_root, folder):
    """SSv2-style lists over three synthetic test clips: clips 0 and 2 share one caption, clip 1 has another."""
    clips = ["test/test_00000.mp4", "test/test_00001.mp4", "test/test_00002.mp4"]
    train = [{"video": clips[0], "caption": "Moving something to the right"},
             {"video": clips[1], "caption": "Something falling, like a rock"},
             {"video": clips[2], "caption": "Moving something to the right"}]
    val = [{"video": [clips[0], clips[2]], "caption": "Moving something to the right"},
           {"video": clips[1], "caption": "Something falling, like a rock"}]
    return _write(folder, "ssv2_train.json", train), _write(folder, "ssv2_val.json", val)


def test_match_by_caption_ids_in_a_training_batch(synthetic_root, tmp_path):
    train, _ = _ssv2_files(synthetic_root, tmp_path)
    records = annotations.read_record_table(train, synthetic_root, fmt=SSV2)
    collate = datasets.VideoTextCollator(datasets.build_tokenizer(), max_text_len=16)
    by_caption = datasets.VideoTextDataset(records, mode="train", num_frames=2, input_size=32, match_by="caption")
    batch = collate([by_caption[i] for i in range(3)])
    assert batch["caption"] == ["moving something to the right", "something falling like a rock",
                                "moving something to the right"]
    assert batch["match_id"].tolist() == [0, 1, 0]
    by_video = datasets.VideoTextDataset(records, mode="train", num_frames=2, input_size=32)
    assert "match_id" not in collate([by_video[i] for i in range(3)])  # the models then use "index"


def test_vtc_loss_with_match_ids_by_hand():
    from layers import vtc_loss

    # 3 pairs, videos 0 and 2 carry the same caption. Unit features, temperature 1:
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    logits = (v @ t.t()).numpy()  # rows v0: (1, 0, 0.6); v1: (0, 1, 0.8); v2: (0.8, 0.6, 0.96)
    targets = np.array([[.5, 0, .5], [0, 1, 0], [.5, 0, .5]])  # positives spread evenly over the same id

    def soft_ce(x):
        log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
        return -(targets * log_p).sum(axis=1).mean()

    expected = (soft_ce(logits) + soft_ce(logits.T)) / 2
    got = vtc_loss(v, t, 1.0, match_ids=torch.tensor([5, 7, 5]))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # distinct ids are the usual InfoNCE
    plain = vtc_loss(v, t, 1.0)
    assert float(vtc_loss(v, t, 1.0, match_ids=torch.tensor([0, 1, 2]))) == pytest.approx(float(plain), rel=1e-6)
    assert float(plain) != pytest.approx(expected, rel=1e-3)

# ----------------------------------------------------------------------------------------------- several ground truths


# 3 texts, 4 videos. Text 0 has videos 0 and 2, text 1 video 1, text 2 videos 2 and 3 (video 2 carries two texts).
SIM = torch.tensor([
    [0.2, 0.9, 0.5, 0.1],   # t0: gt v0 (0.2), v2 (0.5); best gt v2, above it v1 (0.9) -> rank 2
    [0.3, 0.4, 0.4, 0.8],   # t1: gt v1 (0.4); v3 (0.8) above, v2 ties (against the gt) -> rank 3
    [0.7, 0.1, 0.6, 0.6],   # t2: gt v2, v3 (0.6); v0 (0.7) above, the gt tie v2 = v3 is no penalty -> rank 2
])
GT = torch.tensor([[True, False, True, False], [False, True, False, False], [False, False, True, True]])


def test_several_ground_truths_by_hand():
    metrics, ranks = engine.retrieval_metrics(SIM, GT)
    assert ranks["t2v"].tolist() == [2, 3, 2]
    # v2t, columns: v0 (0.2, 0.3, 0.7): its text t0 (0.2); t1, t2 above -> rank 3
    # v1 (0.9, 0.4, 0.1): its text t1 (0.4); t0 above -> rank 2
    # v2 (0.5, 0.4, 0.6): its texts t0 (0.5), t2 (0.6); best t2, nothing above -> rank 1
    # v3 (0.1, 0.8, 0.6): its text t2 (0.6); t1 above -> rank 2
    assert ranks["v2t"].tolist() == [3, 2, 1, 2] and ranks["v2t_videos"].tolist() == [0, 1, 2, 3]
    assert metrics["t2v_R@1"] == 0.0 and metrics["t2v_MdR"] == 2.0 and metrics["t2v_MnR"] == pytest.approx(7 / 3)
    assert metrics["v2t_R@1"] == 25.0 and metrics["v2t_MdR"] == 2.0 and metrics["v2t_MnR"] == 2.0
    records = engine.per_query_records(SIM, GT, ranks, ["a", "b", "c", "d"], ["t0", "t1", "t2"], top=2)
    assert records[0]["gt"] == ["a", "c"] and records[2]["gt"] == ["c", "d"]
    assert records[3 + 2]["gt"] == [0, 2] and records[3 + 2]["gt_rank"] == 1


def test_a_mask_of_one_video_per_text_gives_the_index_form_metrics():
    t2v = torch.tensor([2, 0, 0])
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[torch.arange(3), t2v] = True
    assert engine.retrieval_metrics(SIM, mask)[0] == engine.retrieval_metrics(SIM, t2v)[0]
    with pytest.raises(ValueError, match=r"mask is \(3, 3\), the scores \[3, 4\]"):
        engine.retrieval_metrics(SIM, mask[:, :3])


def _brute_force_rank(scores: torch.Tensor, gt: torch.Tensor) -> int:
    """Worst-case order (non-ground-truth first among equal scores), 1 + the place of the first ground truth."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), bool(gt[j])))
    return 1 + min(order.index(j) for j in range(len(scores)) if gt[j])


def test_ssv2_one_caption_several_videos_through_the_real_loader(synthetic_root, tmp_path):
    _, val = _ssv2_files(synthetic_root, tmp_path)
    records = annotations.read_annotations(val, synthetic_root, fmt=SSV2)
    dataset = datasets.VideoTextDataset(records, mode="test", num_frames=4, input_size=32, short_side_size=32,
                                        sample_type="middle")
    tokenizer = datasets.build_tokenizer()
    loader = engine.build_eval_loader(dataset, tokenizer, batch_size=2)
    torch.manual_seed(0)
    model = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4, vocab_size=len(tokenizer)).eval()
    cfg = engine.EvalConfig(device=torch.device("cpu"), distinct_captions=True)
    res = engine.evaluate(model, loader, tokenizer, cfg)
    assert res["captions"] == ["moving something to the right", "something falling like a rock"]
    # the file lists clip 0 and clip 2 under one caption, then clip 1: videos in that (dataset) order
    assert [os.path.basename(records[i].path) for i in res["indices"]] == [
        "test_00000.mp4", "test_00002.mp4", "test_00001.mp4"]
    assert res["text_to_video"].tolist() == [[True, True, False], [False, False, True]]
    assert res["metrics"]["t2v_queries"] == 2 and res["metrics"]["v2t_queries"] == 3
    for q in range(2):
        assert int(res["ranks"]["t2v"][q]) == _brute_force_rank(res["sim"][q], res["text_to_video"][q])
    for v in range(3):
        assert int(res["ranks"]["v2t"][v]) == _brute_force_rank(res["sim"][:, v], res["text_to_video"][:, v])
    # one text row per distinct caption: the same features as embedding the string alone
    alone = engine.encode_texts(model, tokenizer, res["captions"], cfg)
    torch.testing.assert_close(res["text"], alone, rtol=1e-5, atol=1e-5)
    assert torch.allclose(res["sim"], res["text"] @ res["video"].t())


@pytest.mark.slow
def test_zero_shot_entry_point_on_ssv2(synthetic_root, tmp_path):
    _, val = _ssv2_files(synthetic_root, tmp_path)
    tokenizer = datasets.build_tokenizer()
    torch.manual_seed(0)
    model = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4, vocab_size=len(tokenizer))
    ckpt = str(tmp_path / "pretrain.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "epoch": 0, "args": {"model": "simvtp_tiny_patch16"}}, ckpt)
    out = tmp_path / "out"
    args = run.get_args_parser().parse_args([
        "--zero_shot", "--finetune", ckpt, "--test_data_path", val, "--data_set", "ssv2_label",
        "--data_root", str(synthetic_root), "--output_dir", str(out), "--num_frames", "4", "--input_size", "32",
        "--short_side_size", "32", "--batch_size", "2", "--num_workers", "0", "--device", "cpu",
        "--precision", "fp32", "--test_num_segment", "1", "--test_num_crop", "1"])
    metrics = run.main(args)
    assert metrics["t2v_queries"] == 2 and metrics["v2t_queries"] == 3
    lines = [json.loads(x) for x in open(out / "zero_shot_per_query.jsonl")]
    t2v = [r for r in lines if r["direction"] == "t2v"]
    assert [r["text"] for r in t2v] == ["moving something to the right", "something falling like a rock"]
    assert t2v[0]["gt"] == ["test/test_00000", "test/test_00002"] and t2v[1]["gt"] == ["test/test_00001"]


@pytest.mark.slow
def test_svitt_takes_the_batch_match_id_as_its_positives():
    import model_registry

    torch.manual_seed(0)
    model = model_registry.create("svitt_tiny_patch16", img_size=32, num_frames=4, vocab_size=64,
                                  attn_block_size=4, sparse_random_attn=1).eval()  # eval: fixed random blocks
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 64, (4, 5), generator=g)
    base = dict(video=torch.randn(4, 3, 4, 32, 32, generator=g), input_ids=ids,
                attention_mask=torch.ones_like(ids), index=torch.arange(4))

    def itc(**extra) -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            return float(model({**base, **extra})["loss_itc"])

    same_caption = itc(match_id=torch.tensor([0, 0, 1, 2]))  # rows 0 and 1: one caption, two videos
    assert same_caption == pytest.approx(itc(index=torch.tensor([0, 0, 1, 2])), rel=1e-6)
    assert same_caption != pytest.approx(itc(), rel=1e-4)


def test_the_fine_tuning_flags_choose_the_format_and_reach_the_training_batch(synthetic_root, tmp_path):
    parse = run.get_args_parser().parse_args
    assert engine_for_retrieval.annotation_format(parse(["--data_set", "didemo", "--no_clean_text"])) == \
        annotations.AnnotationFormat(paragraphs=True)
    assert engine_for_retrieval.annotation_format(parse(["--paragraph_retrieval", "--clean_text"])) == DIDEMO  # msrvtt + flags
    assert engine_for_retrieval.annotation_format(parse(["--data_set", "SSv2_Template", "--match_by", "video"])) == \
        annotations.AnnotationFormat(clean_text=True)
    with pytest.raises(ValueError, match="unknown --data_set 'hmdb'"):
        engine_for_retrieval.annotation_format(parse(["--data_set", "hmdb"]))
    train, _ = _ssv2_files(synthetic_root, tmp_path)
    args = parse(["--data_set", "ssv2_label", "--data_path", train, "--data_root", str(synthetic_root),
                  "--num_frames", "2", "--input_size", "32", "--short_side_size", "32", "--batch_size", "3",
                  "--num_workers", "0"])
    args.world_size, args.rank, args.device_obj = 1, 0, torch.device("cpu")
    records = engine_for_retrieval.read_records(train, args, table=True)
    loader, _, _ = engine_for_retrieval.build_train_loader(records, args, datasets.build_tokenizer())
    batch = next(iter(loader))
    by_caption = {c: int(m) for c, m in zip(batch["caption"], batch["match_id"])}
    assert by_caption == {"moving something to the right": 0, "something falling like a rock": 1}
    assert sorted(batch["match_id"].tolist()) == [0, 0, 1]
