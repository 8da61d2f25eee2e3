"""Evaluation the SViTT way (issue 12): clip ensembles (--num_frames_test split into clips, sparse or consecutive,
lse/mean/max/concat), re-ranking by the matching head's log-odds (only the top k moves; k = N equals a brute force
over all pairs; two gloo processes equal one: test_distributed.py, in its one spawn of gloo ranks), frame-order
transforms (--eval_frame_order), --eval_offload, and the command line with all of them on the tiny synthetic set."""
import json
import os

import pytest
import torch

import annotations
import checkpoint
import datasets
import retrieval_eval as engine
import model_registry
import engine_for_retrieval
import run_simvtp_finetuning as run
import video_transforms

SVITT_TINY = dict(img_size=32, num_frames=4, attn_block_size=4, sparse_random_attn=1, token_keep_rate=0.5,
                  token_drop_loc=(1,), fusion_keep_rate=0.5, fusion_drop_loc=(2,))


def _frames(t: int = 8) -> torch.Tensor:
    """[2, C=1, T, 2, 2]: frame i of video b holds the value 10 b + i everywhere (frames are told apart)."""
    return (torch.arange(2)[:, None] * 10 + torch.arange(t)[None, :]).float()[:, None, :, None, None].expand(
        2, 1, t, 2, 2)


def _frame_ids(clip: torch.Tensor) -> list:
    return clip[..., 0, 0].squeeze(-2).tolist()

# --------------------------------------------------------------------------------------------- transforms


def test_reverse_shuffle_freeze_and_none_on_tensors():
    x = _frames(6)
    assert torch.equal(engine.reorder_frames(x, "none"), x)
    assert _frame_ids(engine.reorder_frames(x, "reverse"))[0] == [5, 4, 3, 2, 1, 0]
    frozen = _frame_ids(engine.reorder_frames(x, "freeze"))
    assert frozen == [[3] * 6, [13] * 6]  # the middle frame (index T // 2) repeated
    shuffled = _frame_ids(engine.reorder_frames(x, "shuffle", seed=4))
    perm = engine.frame_permutation(6, 4).tolist()
    assert shuffled[0] == perm and shuffled[1] == [10 + p for p in perm]  # one permutation for every video
    assert sorted(perm) == list(range(6)) and perm != list(range(6))
    assert engine.frame_permutation(6, 4).tolist() == perm  # the same every run
    assert any(engine.frame_permutation(6, s).tolist() != perm for s in range(5, 9))  # the seed picks it
    with pytest.raises(ValueError, match="unknown frame order"):
        engine.reorder_frames(x, "sideways")


def test_clips_are_consecutive_chunks_or_interleaved():
    x = _frames(8)
    dense = engine.split_clips(x, 2)  # [2, k=2, C, 4, H, W]
    assert dense.shape == (2, 2, 1, 4, 2, 2)
    assert _frame_ids(dense[0]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    sparse = engine.split_clips(x, 2, sparse=True)
    assert _frame_ids(sparse[0]) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="do not split into 3 clips"):
        engine.split_clips(x, 3)
    cfg = engine.EvalConfig(torch.device("cpu"), num_clips=2, frame_order="reverse")
    assert _frame_ids(engine.eval_clips(x, cfg)[0]) == [[3, 2, 1, 0], [7, 6, 5, 4]]  # each clip reversed
    concat = engine.EvalConfig(torch.device("cpu"), num_clips=2, ensemble="concat")
    assert engine.eval_clips(x, concat).shape == (2, 1, 1, 8, 2, 2)


def test_clip_scores_aggregate_by_logsumexp_mean_and_max():
    s = torch.tensor([[0.5, -2.0, 3.0], [1.5, -1.0, -4.0]])  # [k=2 clips, 3 pairs]
    torch.testing.assert_close(engine.aggregate_clip_scores(s, "lse"), s.exp().sum(0).log())
    torch.testing.assert_close(engine.aggregate_clip_scores(s, "mean"), (s[0] + s[1]) / 2)
    assert engine.aggregate_clip_scores(s, "max").tolist() == [1.5, -1.0, 3.0]
    logits = torch.tensor([[0.2, 1.2], [2.0, -1.0]])
    odds = engine.match_log_odds(logits)
    torch.testing.assert_close(odds, (logits.softmax(-1)[:, 1] / logits.softmax(-1)[:, 0]).log())
    with pytest.raises(ValueError, match="eval_frame_ensemble"):
        engine.EvalConfig(torch.device("cpu"), ensemble="median")

# --------------------------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def tokenizer():
    return datasets.build_tokenizer()


@pytest.fixture(scope="module")
def svitt(tokenizer):
    torch.manual_seed(0)
    return model_registry.create("svitt_tiny_patch16", vocab_size=len(tokenizer), **SVITT_TINY).eval()


@pytest.fixture(scope="module")
def test_set(synthetic_root):
    """The synthetic test split read at 8 frames (two 4-frame clips), one centre view per video."""
    records = annotations.read_annotations(os.path.join(synthetic_root, "annotations", "test.json"), synthetic_root)
    data = datasets.VideoTextDataset(records, mode="test", num_frames=8, input_size=32, short_side_size=32,
                                     test_num_segment=1, test_num_crop=1, sample_type="middle")
    videos = torch.stack([data[i]["video"][0] for i in range(len(data))])  # uint8 [V, C, 8, H, W]
    captions = [c for r in records for c in r.captions]
    t2v = torch.tensor([v for v, r in enumerate(records) for _ in r.captions])
    return videos, captions, t2v


@pytest.mark.slow
def test_clip_ensemble_similarity_is_the_mean_over_clips_of_the_cosine(svitt, tokenizer, test_set):
    videos, captions, _ = test_set
    cfg = engine.EvalConfig(torch.device("cpu"), chunk=4, num_clips=2)
    text = engine.encode_texts(svitt, tokenizer, captions[:5], cfg)
    both = engine.encode_videos(svitt, videos[:3, None], [0, 1, 2], cfg)
    one = engine.EvalConfig(torch.device("cpu"), chunk=4)
    per_clip = [engine.encode_videos(svitt, videos[:3, None, :, 4 * j:4 * j + 4], [0, 1, 2], one) for j in (0, 1)]
    torch.testing.assert_close(text @ both.t(), ((text @ per_clip[0].t()) + (text @ per_clip[1].t())) / 2)
    sparse = engine.encode_videos(svitt, videos[:3, None], [0, 1, 2],
                                  engine.EvalConfig(torch.device("cpu"), chunk=4, num_clips=2, sparse_clips=True))
    assert not torch.allclose(sparse, both)


def _brute_force_log_odds(model, videos, captions, tokenizer, ensemble: str) -> torch.Tensor:
    """[T, V] log-odds of every pair, each pair alone through match_logits (no cache), clips aggregated."""
    tok = datasets.VideoTextCollator(tokenizer, max_text_len=32).tokenize
    out = torch.zeros(len(captions), len(videos))
    with torch.no_grad():
        for v in range(len(videos)):
            clips = engine.split_clips(videos[v], 2)
            for t, caption in enumerate(captions):
                ids = tok([caption])
                per_clip = torch.stack([engine.match_log_odds(model.match_logits(
                    video_transforms.normalize_video(c[None]), ids["input_ids"], ids["attention_mask"]))[0]
                    for c in clips])
                out[t, v] = engine.aggregate_clip_scores(per_clip, ensemble)
    return out


@pytest.mark.slow
def test_rerank_with_k_equal_to_n_is_the_brute_force_ranking_over_all_pairs(svitt, tokenizer, test_set):
    videos, captions, t2v = test_set
    videos, captions, t2v = videos[:4], captions[:6], t2v[:6].clamp(max=3)
    cfg = engine.EvalConfig(torch.device("cpu"), chunk=4, num_clips=2, ensemble="max")
    sim = engine.encode_texts(svitt, tokenizer, captions, cfg) @ engine.encode_videos(
        svitt, videos[:, None], range(4), cfg).t()
    pairs = engine.candidate_pairs(sim, max(sim.shape))
    assert len(pairs) == sim.numel()
    scores = engine.match_scores(svitt, pairs, videos, captions, tokenizer, cfg)
    brute = _brute_force_log_odds(svitt, videos, captions, tokenizer, "max")
    got = torch.tensor([[scores[(t, v)] for v in range(4)] for t in range(6)])
    torch.testing.assert_close(got, brute, rtol=1e-4, atol=1e-4)
    reranked = engine.rerank_metrics(sim, t2v, scores, k=max(sim.shape))
    expected, _ = engine.retrieval_metrics(brute, t2v)
    for key in ("t2v_R@1", "t2v_MnR", "v2t_R@1", "v2t_MnR"):
        assert reranked[key] == expected[key], key


@pytest.mark.slow
def test_rerank_moves_only_each_querys_top_k(svitt, tokenizer, test_set):
    videos, captions, t2v = test_set
    cfg = engine.EvalConfig(torch.device("cpu"), chunk=8, num_clips=2)
    sim = engine.encode_texts(svitt, tokenizer, captions, cfg) @ engine.encode_videos(
        svitt, videos[:, None], range(len(videos)), cfg).t()
    k = 3
    scores = engine.match_scores(svitt, engine.candidate_pairs(sim, k), videos, captions, tokenizer, cfg)
    before, ranks = engine.retrieval_metrics(sim, t2v)
    after = engine.rerank_metrics(sim, t2v, scores, k)
    for d in ("t2v", "v2t"):
        for r in (5, 10, 50):  # a ground truth inside the top 3 stays inside, one outside keeps its rank
            assert after[f"{d}_R@{r}"] == before[f"{d}_R@{r}"]
    outside = ranks["t2v"] > k
    assert int(outside.sum()) > 0  # the tiny random model leaves ground truths outside the top k
    assert after["t2v_R@1"] != before["t2v_R@1"] or after["v2t_R@1"] != before["v2t_R@1"] or \
        after["t2v_MnR"] != before["t2v_MnR"]


def test_matching_logits_are_fp32_under_bf16_autocast_in_both_families(svitt, tokenizer, test_set):
    """Re-ranking compares these scores: computed in bf16 many would tie (and a tie ranks above the truth)."""
    videos, captions, _ = test_set
    simvtp = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4, vocab_size=len(tokenizer))
    tok = datasets.VideoTextCollator(tokenizer).tokenize(captions[:3])
    video = video_transforms.normalize_video(videos[:3, :, :4])
    for model in (svitt, simvtp.eval()):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.match_logits(video, tok["input_ids"], tok["attention_mask"])
        assert logits.dtype == torch.float32, type(model).__name__
        assert not torch.equal(logits, logits.bfloat16().float()), type(model).__name__  # fp32's low bits are used


class _OnlyInWorkers(torch.utils.data.Dataset):
    """Videos that refuse to be read in the main process."""

    def __init__(self, videos: torch.Tensor) -> None:
        self.videos = videos

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, pos: int) -> torch.Tensor:
        assert torch.utils.data.get_worker_info() is not None, "a video read in the main process"
        return self.videos[pos]


def test_reranking_reads_its_videos_in_loader_workers(svitt, tokenizer, test_set):
    videos, captions, _ = test_set
    pairs = [(0, 0), (1, 0), (0, 1)]
    cfg = engine.EvalConfig(torch.device("cpu"), chunk=4)
    here = engine.match_scores(svitt, pairs, videos[:2, :, :4], captions, tokenizer, cfg)
    in_workers = engine.match_scores(svitt, pairs, _OnlyInWorkers(videos[:2, :, :4]), captions, tokenizer, cfg,
                                     num_workers=1)
    assert in_workers == pytest.approx(here, abs=1e-6)


def test_offload_keeps_features_on_the_cpu_and_changes_no_score(svitt, tokenizer, test_set):
    videos, captions, _ = test_set
    cfg = engine.EvalConfig(torch.device("cpu"), chunk=4, num_clips=2, offload=True)
    assert engine.EvalConfig(torch.device("meta")).feature_device == torch.device("meta")
    assert engine.EvalConfig(torch.device("meta"), offload=True).feature_device == torch.device("cpu")
    kept = engine.EvalConfig(torch.device("cpu"), chunk=4, num_clips=2)
    a = engine.encode_videos(svitt, videos[:2, None], [0, 1], cfg)
    b = engine.encode_videos(svitt, videos[:2, None], [0, 1], kept)
    assert a.device.type == "cpu" and torch.equal(a, b)

# --------------------------------------------------------------------------------------------- command line


def _pretrain_ckpt(tmp_path, tokenizer) -> str:
    torch.manual_seed(0)
    model = model_registry.create("simvtp_tiny_patch16", img_size=32, num_frames=4, vocab_size=len(tokenizer))
    path = str(tmp_path / "pretrain.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg, "epoch": 0}, path)
    return path


def _argv(root, out, ckpt, *extra):
    return run.get_args_parser().parse_args(
        ["--data_root", str(root), "--output_dir", str(out), "--num_frames", "4", "--input_size", "32",
         "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--print_freq", "50",
         "--seed", "1", "--zero_shot", "--finetune", ckpt, "--test_num_crop", "1", "--sample_type_test", "middle",
         "--test_data_path", os.path.join(root, "annotations", "test.json"), *extra])


@pytest.mark.slow
def test_zero_shot_with_clips_frame_orders_and_reranking_writes_both_rankings(synthetic_root, tokenizer, tmp_path,
                                                                              capsys):
    ckpt = _pretrain_ckpt(tmp_path, tokenizer)
    out = tmp_path / "out"
    result = run.main(_argv(synthetic_root, out, ckpt, "--num_frames_test", "8", "--test_num_segment", "1",
                            "--eval_sparse_sampling", "--rerank_k", "2", "--eval_frame_order", "none", "freeze"))
    printed = capsys.readouterr().out
    assert "contrastive t2v" in printed and "re-ranked k=2 v2t" in printed and "Temporal sensitivity" in printed
    saved = json.load(open(out / "zero_shot_metrics.json"))
    assert saved["clips"] == 2 and saved["clip_sampling"] == "sparse" and saved["frame_ensemble"] == "lse"
    assert set(saved["frame_orders"]) == {"none", "freeze"}
    assert saved["frame_orders"]["none"]["rerank_t2v_R@1"] == result["rerank"]["t2v_R@1"]
    assert "in_order_preferred" not in saved["frame_orders"]["none"]
    assert 0.0 <= saved["frame_orders"]["freeze"]["in_order_preferred"] <= 100.0 and "in order preferred" in printed
    assert saved["rerank"]["pairs"] <= 2 * result["t2v_queries"] + 2 * 8  # T x k + V x k minus the overlap
    assert any(f.startswith("events") for f in os.listdir(out / "tb"))


def test_inconsistent_clip_flags_are_one_clear_error(synthetic_root, tokenizer, tmp_path):
    ckpt = _pretrain_ckpt(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="multiple of --num_frames 4"):
        run.main(_argv(synthetic_root, tmp_path, ckpt, "--num_frames_test", "6"))
    with pytest.raises(ValueError, match="use --test_num_segment 1, not 2"):
        run.main(_argv(synthetic_root, tmp_path, ckpt, "--num_frames_test", "8", "--test_num_segment", "2"))
    with pytest.raises(ValueError, match="--eval_sparse_sampling interleaves"):
        run.main(_argv(synthetic_root, tmp_path, ckpt, "--eval_sparse_sampling", "--test_num_segment", "1"))


@pytest.mark.slow
def test_concat_rebuilds_the_model_at_the_test_frames(synthetic_root, tokenizer, tmp_path, capsys):
    ckpt = _pretrain_ckpt(tmp_path, tokenizer)
    result = run.main(_argv(synthetic_root, tmp_path, ckpt, "--num_frames_test", "8", "--test_num_segment", "1",
                            "--eval_frame_ensemble", "concat"))
    assert "rebuilt for 8-frame clips" in capsys.readouterr().out and result["clips"] == 2


@pytest.mark.slow
def test_concat_rebuilds_svitt_with_its_relative_tables_expanded(svitt, test_set):
    args = run.get_args_parser().parse_args(["--device", "cpu"])
    args.device_obj = torch.device("cpu")
    wide = engine_for_retrieval.at_frames(svitt, 8, args)
    assert wide.model_cfg["kwargs"]["num_frames"] == 8 and engine_for_retrieval.at_frames(svitt, 4, args) is svitt
    with torch.no_grad():
        assert wide.encode_video(video_transforms.normalize_video(test_set[0][:1])).shape == (1, 64)


@pytest.mark.slow
def test_svitt_retrieval_fine_tuning_selects_on_val_and_tests_with_its_own_matching_head(synthetic_root, tokenizer,
                                                                                       tmp_path):
    """SViTT fine-tunes through the same entry point (ITC + ITM, no MLM in a fine-tuning batch), is selected on the
    validation split and tested in clips with its own matching head re-ranking, as the recipes run it."""
    torch.manual_seed(0)
    model = model_registry.create("svitt_tiny_patch16", vocab_size=len(tokenizer), **SVITT_TINY)
    ckpt = str(tmp_path / "svitt.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg, "epoch": 0}, ckpt)
    out = tmp_path / "ft"
    ann = os.path.join(synthetic_root, "annotations")
    argv = ["--model", "svitt_tiny_patch16", "--finetune", ckpt, "--data_root", str(synthetic_root),
            "--data_path", os.path.join(ann, "train.json"), "--val_data_path", os.path.join(ann, "val.json"),
            "--test_data_path", os.path.join(ann, "test.json"), "--output_dir", str(out), "--num_frames", "4",
            "--input_size", "32", "--short_side_size", "32", "--sample_type", "rand", "--num_frames_test", "8",
            "--test_num_segment", "1", "--test_num_crop", "1", "--rerank_k", "2", "--batch_size", "8",
            "--epochs", "1", "--warmup_epochs", "0", "--lr", "1e-4", "--num_workers", "0", "--device", "cpu",
            "--precision", "fp32", "--print_freq", "50", "--attn_block_size", "4", "--sparse_random_attn", "1",
            "--token_keep_rate", "0.5", "--token_drop_loc", "1"]
    result = run.main(run.get_args_parser().parse_args(argv))
    assert (out / "checkpoint-best.pth").exists()
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["clips"] == 2 and saved["rerank"]["rerank_k"] == 2 and result["t2v_queries"] == saved["t2v_queries"]
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert "train_loss_itm" in lines[0] and "train_loss_mlm" not in lines[0]


@pytest.mark.slow
def test_masked_matching_averages_the_log_odds_over_fixed_masks_per_video(tokenizer, test_set):
    videos, captions, _ = test_set
    videos, captions = videos[:2], captions[:3]
    torch.manual_seed(0)
    model = model_registry.create("simvtp_tiny_patch16", vocab_size=len(tokenizer), img_size=32,
                                  num_frames=8).eval()
    pairs = [(t, v) for v in range(2) for t in range(3)]
    cfg = engine.EvalConfig(torch.device("cpu"), chunk=2, match_mask_ratio=0.5, match_masks=3)
    scores = engine.match_scores(model, pairs, videos, captions, tokenizer, cfg)
    assert engine.match_scores(model, pairs, videos, captions, tokenizer, cfg) == scores  # fixed masks
    every_tube = engine.match_scores(model, pairs, videos, captions, tokenizer,
                                     engine.EvalConfig(torch.device("cpu"), chunk=2))
    assert all(abs(scores[p] - every_tube[p]) > 1e-6 for p in pairs)
    tok = datasets.VideoTextCollator(tokenizer, max_text_len=cfg.max_text_len).tokenize(list(captions))
    for v in range(2):
        clip = video_transforms.normalize_video(engine.eval_clips(videos[v], cfg)[0][None])
        masks = engine.matching_masks(model, clip.shape, v, cfg)
        assert len(masks) == 3 and all(int((~m).sum()) == 8 for m in masks)  # 4 x 2 x 2 tubes, half visible
        assert len({tuple(m.flatten().tolist()) for m in masks}) > 1  # three masks, not one three times
        with torch.no_grad():
            by_hand = torch.stack([engine.match_log_odds(model.match_logits(
                clip.expand(3, -1, -1, -1, -1), tok["input_ids"], tok["attention_mask"],
                video_mask=m.expand(3, -1))) for m in masks]).mean(0)
        torch.testing.assert_close(torch.tensor([scores[(t, v)] for t in range(3)]), by_hand, rtol=1e-4, atol=1e-4)


def test_masked_matching_is_refused_for_a_model_that_takes_no_video_mask(svitt, tokenizer, test_set):
    videos, captions, _ = test_set
    cfg = engine.EvalConfig(torch.device("cpu"), match_mask_ratio=0.9)
    with pytest.raises(ValueError, match="takes no video mask"):
        engine.match_scores(svitt, [(0, 0)], videos[:1], captions[:1], tokenizer, cfg)
    with pytest.raises(ValueError, match="match mask ratio"):
        engine.EvalConfig(torch.device("cpu"), match_mask_ratio=1.0)
