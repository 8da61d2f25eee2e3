"""Retrieval metrics against rankings worked out by hand: ties count against the ground truth, videos with several
captions take their best caption's rank, both directions, and the files written for error analysis."""
import json

import numpy as np
import pytest
import torch

import retrieval_eval as eng

# 4 texts, 3 videos; texts 0 and 1 describe video 0, text 2 video 1, text 3 video 2.
SIM = torch.tensor([
    [0.9, 0.1, 0.2],   # t0 -> v0: rank 1
    [0.5, 0.5, 0.1],   # t1 -> v0: tie with v1 -> rank 2 (tie against the ground truth)
    [0.3, 0.2, 0.4],   # t2 -> v1: v0 and v2 above -> rank 3
    [0.6, 0.7, 0.6],   # t3 -> v2: tie with v0 and v1 above -> rank 3
])
TEXT_TO_VIDEO = [0, 0, 1, 2]


def test_text_to_video_ranks_by_hand():
    _, ranks = eng.retrieval_metrics(SIM, TEXT_TO_VIDEO)
    assert ranks["t2v"].tolist() == [1, 2, 3, 3]


def test_video_to_text_takes_the_best_caption_and_ties_against_it():
    # columns: v0 scores texts (0.9, 0.5, 0.3, 0.6): best caption t0 (0.9) -> rank 1
    # v1 (0.1, 0.5, 0.2, 0.7): its caption t2 has 0.2; t1 (0.5), t3 (0.7) above -> rank 3
    # v2 (0.2, 0.1, 0.4, 0.6): its caption t3 has 0.6, nothing above -> rank 1
    _, ranks = eng.retrieval_metrics(SIM, TEXT_TO_VIDEO)
    assert ranks["v2t"].tolist() == [1, 3, 1]
    assert ranks["v2t_videos"].tolist() == [0, 1, 2]


def test_summary_numbers():
    m, _ = eng.retrieval_metrics(SIM, TEXT_TO_VIDEO)
    assert m["t2v_R@1"] == pytest.approx(25.0) and m["t2v_R@5"] == pytest.approx(100.0)
    assert m["t2v_MdR"] == pytest.approx(2.5) and m["t2v_MnR"] == pytest.approx(9 / 4)
    assert m["v2t_R@1"] == pytest.approx(200 / 3) and m["v2t_MdR"] == 1.0 and m["v2t_MnR"] == pytest.approx(5 / 3)
    assert m["r1_sum"] == pytest.approx(25.0 + 200 / 3)
    assert m["t2v_queries"] == 4 and m["v2t_queries"] == 3


def test_second_caption_of_a_video_does_not_count_against_the_first():
    # both captions of v0 score 0.8 for v0; ties between ground truths are no penalty
    sim = torch.tensor([[0.8, 0.1], [0.8, 0.2], [0.1, 0.9]])
    _, ranks = eng.retrieval_metrics(sim, [0, 0, 1])
    assert ranks["v2t"].tolist() == [1, 1]
    assert ranks["t2v"].tolist() == [1, 1, 1]


def test_constant_scores_give_the_worst_rank():
    sim = torch.zeros(5, 5)
    m, ranks = eng.retrieval_metrics(sim, list(range(5)))
    assert ranks["t2v"].tolist() == [5] * 5 and ranks["v2t"].tolist() == [5] * 5
    assert m["t2v_R@1"] == 0.0 and m["v2t_R@1"] == 0.0 and m["t2v_R@5"] == 100.0


def test_video_without_caption_is_no_v2t_query():
    sim = torch.tensor([[0.9, 0.8, 0.1]])
    m, ranks = eng.retrieval_metrics(sim, [1])
    assert ranks["t2v"].tolist() == [2]
    assert ranks["v2t_videos"].tolist() == [1] and ranks["v2t"].tolist() == [1]
    assert m["v2t_queries"] == 1


def test_gt_ranks_matches_a_sort_based_reference_with_ties():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 4, size=(50, 30)).astype(np.float32))  # many ties
    gt = torch.zeros(50, 30, dtype=torch.bool)
    for q in range(50):
        gt[q, rng.choice(30, size=rng.integers(1, 4), replace=False)] = True
    ranks = eng.gt_ranks(scores, gt, chunk=7)
    for q in range(50):
        # worst-case order: sort by score descending, non-ground-truth first among equal scores
        order = sorted(range(30), key=lambda j: (-float(scores[q, j]), bool(gt[q, j])))
        expected = 1 + min(order.index(j) for j in range(30) if gt[q, j])
        assert int(ranks[q]) == expected


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="text_to_video"):
        eng.retrieval_metrics(SIM, [0, 0, 3, 1])
    with pytest.raises(ValueError, match="ground-truth"):
        eng.gt_ranks(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


def test_table_and_files(tmp_path):
    m, ranks = eng.retrieval_metrics(SIM, TEXT_TO_VIDEO)
    table = eng.format_table({"similarity": m})
    assert "ties count against the ground truth" in table
    assert "similarity t2v" in table and "similarity v2t" in table
    records = eng.per_query_records(SIM, torch.tensor(TEXT_TO_VIDEO), ranks, ["a", "b", "c"],
                                    ["t0", "t1", "t2", "t3"], top=2)
    eng.write_results(str(tmp_path), "test", m, records)
    saved = json.load(open(tmp_path / "test_metrics.json"))
    assert saved["t2v_R@1"] == pytest.approx(25.0) and "ties" in saved["note"]
    lines = [json.loads(x) for x in open(tmp_path / "test_per_query.jsonl")]
    assert len(lines) == 4 + 3
    t1 = lines[1]
    assert t1["direction"] == "t2v" and t1["text"] == "t1" and t1["gt"] == ["a"] and t1["gt_rank"] == 2
    assert len(t1["top"]) == 2 and {c["video_id"] for c in t1["top"]} == {"a", "b"}
    v1 = lines[5]
    assert v1["direction"] == "v2t" and v1["video_id"] == "b" and v1["gt"] == [2] and v1["gt_rank"] == 3
    assert v1["top"][0]["text"] == "t3" and v1["top"][0]["score"] == pytest.approx(0.7)


def test_tied_ground_truths_counts_queries_whose_best_truth_ties_another_candidate():
    scores = torch.tensor([[0.5, 0.5, 0.1],    # truth 0 ties candidate 1: tied
                           [0.2, 0.9, 0.9],    # truths 1 and 2 tie each other only: not tied
                           [0.3, 0.7, 0.7],    # best truth 1 ties candidate 2: tied
                           [0.9, 0.1, 0.1]])   # candidates 1 and 2 tie below the truth: not tied
    gt = torch.tensor([[True, False, False], [False, True, True], [True, True, False], [True, False, False]])
    assert eng.tied_ground_truths(scores, gt) == 2
    assert eng.tied_ground_truths(torch.zeros(4, 3), gt) == 4  # a constant head: every query
    close = torch.tensor([[1.002, 1.0]])  # the truth ahead in fp32, level with the other in bf16
    assert eng.tied_ground_truths(close, gt[:1, :2]) == 0
    assert eng.tied_ground_truths(close.bfloat16().float(), gt[:1, :2]) == 1


def test_reranked_metrics_count_tied_ground_truths_and_the_table_shows_them():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]])  # text 0 -> video 1, text 1 -> video 0
    scores = {(0, 0): 0.4, (0, 1): 0.4, (1, 0): 0.6, (1, 1): 0.2, (0, 2): 0.1, (1, 2): 0.3}
    m = eng.rerank_metrics(sim, torch.tensor([1, 0]), scores, k=2)
    assert (m["t2v_tied"], m["v2t_tied"]) == (1, 0)  # text 0's truth ties video 0; each video's truth stands alone
    table = eng.format_table({"contrastive": eng.retrieval_metrics(sim, [1, 0])[0], "re-ranked k=2": m})
    assert "tied" in table.splitlines()[1]
    assert [line.split()[-1] for line in table.splitlines()[3:]] == ["2", "2", "1", "0"]


def test_reranking_by_match_plus_contrastive_logit_breaks_a_matching_tie_by_similarity():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]])  # text 0 -> video 1, text 1 -> video 0
    scores = {(0, 0): 0.4, (0, 1): 0.5, (1, 0): 0.2, (1, 1): 0.2, (0, 2): 0.1, (1, 2): 0.3}
    alone = eng.rerank_metrics(sim, torch.tensor([1, 0]), scores, k=2)
    assert alone["t2v_R@1"] == 50.0  # text 1's truth (video 0) ties video 1 on the matching score alone
    both = eng.rerank_metrics(sim, torch.tensor([1, 0]), scores, k=2, contrastive_scale=10.0)
    # text 0: 0.4 + 9 vs 0.5 + 8 -> video 0 (wrong); text 1: 0.2 + 7 vs 0.2 + 6 -> video 0 (right)
    assert both["t2v_R@1"] == 50.0 and both["t2v_tied"] == 0 and alone["t2v_tied"] == 1


def test_held_out_matching_pairs_are_one_match_and_two_non_matches_per_video_hard_by_similarity():
    # 3 videos, 4 texts (video 1 has two captions); text t's most similar other video / video v's other text
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.8, 0.7], [0.2, 0.6, 0.4], [0.4, 0.1, 0.95]])
    t2v = torch.tensor([0, 1, 1, 2])
    kinds = eng.held_out_matching_pairs(sim, t2v, seed=3)
    assert kinds["hard"] == [((0, 0), True), ((0, 1), False), ((3, 0), False),
                             ((1, 1), True), ((1, 2), False), ((0, 1), False),
                             ((3, 2), True), ((3, 0), False), ((1, 2), False)]
    gt = eng.ground_truth_mask(t2v, 4, 3)
    for kind in ("random", "hard"):
        pairs = kinds[kind]
        assert [m for _, m in pairs] == [True, False, False] * 3
        assert all(bool(gt[t, v]) == m for (t, v), m in pairs)
    assert eng.held_out_matching_pairs(sim, t2v, seed=3) == kinds  # seeded: the same at every evaluation


def test_in_order_preference_counts_captions_whose_own_clip_scores_higher_in_the_first_order():
    import engine_for_retrieval
    rows = {"none": {"t2v_R@1": 50.0}, "reverse": {"t2v_R@1": 50.0}, "freeze": {"t2v_R@1": 40.0}}
    own = {"none": torch.tensor([0.9, 0.5, 0.7, 0.2]), "reverse": torch.tensor([0.8, 0.6, 0.7, 0.1]),
           "freeze": torch.tensor([1.0, 0.6, 0.8, 0.3])}
    engine_for_retrieval.add_in_order_preference(rows, own)
    assert "in_order_preferred" not in rows["none"]
    assert rows["reverse"]["in_order_preferred"] == 50.0  # captions 0 and 3; caption 2 ties: counted against
    assert rows["freeze"]["in_order_preferred"] == 0.0
    table = engine_for_retrieval.format_frame_orders(rows)
    assert "in order preferred" in table and table.splitlines()[-2].split()[-1] == "50.0"


def test_best_ground_truth_scores_take_each_querys_own_video_or_its_best_of_several():
    sim = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.4], [0.7, 0.6, 0.8]])
    one = eng.ground_truth_mask(torch.tensor([2, 0, 1]), 3, 3)
    assert eng.best_ground_truth_scores(sim, one, chunk=2).tolist() == pytest.approx([0.3, 0.5, 0.6])
    several = torch.tensor([[True, False, True], [False, True, False], [True, True, False]])  # SSv2-like
    assert eng.best_ground_truth_scores(sim, several, chunk=2).tolist() == pytest.approx([0.3, 0.2, 0.7])
