"""Video tube/random masks and MLM text masking (masking_generator.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masking_generator import (DEFAULT_SPECIAL_IDS, IGNORE_INDEX, MASK_TOKEN_ID, TEXT_MASK_MODES,
                               RandomMaskingGenerator, TubeMaskingGenerator, build_mask_generator, mask_text_batch,
                               mask_text_tokens)

grids = st.tuples(st.integers(1, 8), st.integers(1, 14), st.integers(1, 14))
ratios = st.floats(0.0, 0.99, allow_nan=False)
seeds = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=60, deadline=None)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- video masks

@FAST
@given(grid=grids, ratio=ratios, seed=seeds)
def test_tube_mask_exact_count_per_slice_and_same_in_every_slice(grid, ratio, seed):
    t, h, w = grid
    mask = TubeMaskingGenerator(grid, ratio)(rng(seed))
    assert mask.dtype == np.bool_ and mask.shape == (t * h * w,)
    slices = mask.reshape(t, h * w)  # tokens ordered (t, h, w)
    assert (slices.sum(axis=1) == int(ratio * h * w)).all()
    assert (slices == slices[0]).all()


@FAST
@given(grid=grids, ratio=ratios, seed=seeds)
def test_random_mask_exact_total_count(grid, ratio, seed):
    n = int(np.prod(grid))
    mask = RandomMaskingGenerator(grid, ratio)(rng(seed))
    assert mask.dtype == np.bool_ and mask.shape == (n,)
    assert mask.sum() == int(ratio * n)


@pytest.mark.parametrize("mask_type", ["tube", "random"])
def test_video_mask_deterministic_for_a_seed_and_varies_across_seeds(mask_type):
    gen = build_mask_generator(mask_type, (8, 14, 14), 0.9)
    assert np.array_equal(gen(rng(7)), gen(rng(7)))
    masks = {gen(rng(s)).tobytes() for s in range(20)}
    assert len(masks) == 20


def test_paper_config_counts_and_repr():
    tube = build_mask_generator("tube", (8, 14, 14), 0.9)
    assert isinstance(tube, TubeMaskingGenerator)
    assert tube.num_masks_per_frame == 176 and tube.total_masks == 8 * 176 and tube.total_patches == 1568
    assert "176/196 per slice" in repr(tube) and "1408/1568" in repr(tube)
    rand = build_mask_generator("random", (8, 14, 14), 0.9)
    assert isinstance(rand, RandomMaskingGenerator)
    assert rand(rng(0)).sum() == 1411 and "1411/1568" in repr(rand)


def test_random_mask_is_not_a_tube_mask():
    mask = build_mask_generator("random", (8, 14, 14), 0.75)(rng(3)).reshape(8, -1)
    assert not (mask == mask[0]).all()


def test_zero_ratio_masks_nothing():
    assert not TubeMaskingGenerator((2, 2, 2), 0.0)(rng(0)).any()


def test_global_rng_untouched():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    TubeMaskingGenerator((4, 7, 7), 0.9)(rng(0))
    RandomMaskingGenerator((4, 7, 7), 0.9)(rng(0))
    assert np.random.rand() == expected


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan")])
def test_bad_video_ratio_rejected(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        build_mask_generator("tube", (8, 14, 14), ratio)


def test_unknown_mask_type_rejected():
    with pytest.raises(ValueError, match="unknown mask_type 'block'.*random.*tube"):
        build_mask_generator("block", (8, 14, 14), 0.9)


def test_bad_grid_and_missing_rng_rejected():
    with pytest.raises(ValueError, match="grid"):
        TubeMaskingGenerator((14, 14), 0.9)
    with pytest.raises(TypeError, match="Generator"):
        TubeMaskingGenerator((2, 2, 2), 0.5)(0)


# ---------------------------------------------------------------- text masks

@st.composite
def captions(draw):
    """A padded tokenised caption: [CLS] words [SEP] [PAD]...; words may include [UNK] and odd specials."""
    n_words = draw(st.integers(0, 20))
    words = draw(st.lists(st.one_of(st.integers(999, 30521), st.sampled_from([100, 101, 102, 103])),
                          min_size=n_words, max_size=n_words))
    pad = draw(st.integers(0, 6))
    ids = [101] + words + [102] + [0] * pad
    am = [1] * (len(words) + 2) + [0] * pad
    return torch.tensor(ids, dtype=torch.long), torch.tensor(am, dtype=torch.long)


def maskable_positions(ids, am, special=DEFAULT_SPECIAL_IDS):
    return {i for i, (t, a) in enumerate(zip(ids.tolist(), am.tolist())) if a == 1 and t not in special}


@FAST
@given(cap=captions(), ratio=st.floats(0.01, 1.0), seed=seeds)
def test_text_mask_properties(cap, ratio, seed):
    ids, am = cap
    before_ids, before_am = ids.clone(), am.clone()
    masked, labels = mask_text_tokens(ids, am, ratio, rng(seed))
    assert torch.equal(ids, before_ids) and torch.equal(am, before_am)  # input untouched
    assert masked.dtype == torch.long and labels.dtype == torch.long and masked.shape == ids.shape
    maskable = maskable_positions(ids, am)
    chosen = set(torch.nonzero(labels != IGNORE_INDEX).flatten().tolist())
    assert chosen <= maskable  # specials and padding never masked
    expected = min(len(maskable), max(1, round(ratio * len(maskable)))) if maskable else 0
    assert len(chosen) == expected
    for i in range(len(ids)):
        if i in chosen:
            assert masked[i] == MASK_TOKEN_ID and labels[i] == ids[i]
        else:
            assert masked[i] == ids[i] and labels[i] == IGNORE_INDEX


@FAST
@given(cap=captions(), seed=seeds)
def test_text_mask_deterministic(cap, seed):
    ids, am = cap
    a = mask_text_tokens(ids, am, 0.75, rng(seed))
    b = mask_text_tokens(ids, am, 0.75, rng(seed))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_text_mask_varies_across_seeds_and_default_ratio():
    ids = torch.tensor([101] + list(range(2000, 2020)) + [102, 0, 0])
    am = (ids != 0).long()
    outs = {tuple(mask_text_tokens(ids, am, rng=rng(s))[0].tolist()) for s in range(10)}
    assert len(outs) == 10
    _, labels = mask_text_tokens(ids, am, rng=rng(0))  # default ratio 0.75 of 20 words
    assert (labels != IGNORE_INDEX).sum() == 15


def test_short_caption_gets_at_least_one_mask_and_empty_gets_none():
    ids, am = torch.tensor([101, 2054, 102, 0]), torch.tensor([1, 1, 1, 0])
    masked, labels = mask_text_tokens(ids, am, 0.1, rng(0))
    assert masked.tolist() == [101, 103, 102, 0] and labels.tolist() == [-100, 2054, -100, -100]
    ids, am = torch.tensor([101, 102, 0]), torch.tensor([1, 1, 0])
    masked, labels = mask_text_tokens(ids, am, 0.75, rng(0))
    assert torch.equal(masked, ids) and (labels == IGNORE_INDEX).all()


def test_unk_is_maskable_by_default_and_can_be_made_special():
    ids, am = torch.tensor([101, 100, 100, 102]), torch.ones(4, dtype=torch.long)
    _, labels = mask_text_tokens(ids, am, 1.0, rng(0))
    assert labels.tolist() == [-100, 100, 100, -100]
    _, labels = mask_text_tokens(ids, am, 1.0, rng(0), special_ids=(0, 100, 101, 102, 103))
    assert (labels == IGNORE_INDEX).all()


def test_padding_with_nonzero_id_is_never_masked():
    """Padding is decided by attention_mask, not by the id."""
    ids, am = torch.tensor([101, 2000, 102, 3000, 3001]), torch.tensor([1, 1, 1, 0, 0])
    masked, _ = mask_text_tokens(ids, am, 1.0, rng(0))
    assert masked.tolist() == [101, 103, 102, 3000, 3001]


def test_batch_masking_leaves_the_contrastive_captions_intact():
    """The release masked input_ids in place, so VTC/VTM saw masked captions; ours must not."""
    input_ids = torch.tensor([[101, 2000, 2001, 2002, 102], [101, 3000, 102, 0, 0]])
    attention_mask = (input_ids != 0).long()
    keep = input_ids.clone()
    mlm_ids, mlm_labels = mask_text_batch(input_ids, attention_mask, 0.75, [rng(0), rng(1)])
    assert torch.equal(input_ids, keep)
    assert mlm_ids.data_ptr() != input_ids.data_ptr()
    assert (mlm_ids == MASK_TOKEN_ID).any(dim=1).all()
    assert not (input_ids == MASK_TOKEN_ID).any()
    assert torch.equal(torch.where(mlm_labels != IGNORE_INDEX, mlm_labels, mlm_ids), input_ids)


def test_batch_rows_match_single_calls():
    input_ids = torch.tensor([[101, 2000, 2001, 2002, 2003, 102], [101, 3000, 3001, 102, 0, 0]])
    attention_mask = (input_ids != 0).long()
    mlm_ids, mlm_labels = mask_text_batch(input_ids, attention_mask, 0.5, [rng(5), rng(6)])
    for row, seed in enumerate((5, 6)):
        ids, labels = mask_text_tokens(input_ids[row], attention_mask[row], 0.5, rng(seed))
        assert torch.equal(mlm_ids[row], ids) and torch.equal(mlm_labels[row], labels)


def test_text_mask_errors():
    ids, am = torch.tensor([101, 2000, 102]), torch.ones(3, dtype=torch.long)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            mask_text_tokens(ids, am, bad, rng(0))
    with pytest.raises(TypeError, match="Generator"):
        mask_text_tokens(ids, am, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        mask_text_tokens(ids, am[:2], 0.5, rng(0))
    with pytest.raises(ValueError, match="one rng per row"):
        mask_text_batch(ids[None], am[None], 0.5, [rng(0), rng(1)])


# ---------------------------------------------------------------- text mask modes ("mask" | "bert")

BERT_VOCAB = 105  # tiny vocabulary: allowed random ids are 1..100 and 104, all below the captions' word ids


def word_captions(n: int, words: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n captions [CLS] w_1..w_words [SEP] [PAD] [PAD] with word ids in [1000, 30000)."""
    g = np.random.default_rng(seed)
    body = g.integers(1000, 30000, size=(n, words))
    ids = np.concatenate([np.full((n, 1), 101), body, np.full((n, 1), 102), np.zeros((n, 2), dtype=int)], axis=1)
    ids = torch.from_numpy(ids).long()
    return ids, (ids != 0).long()


def test_text_mask_modes_exported():
    assert TEXT_MASK_MODES == ("mask", "bert")


@FAST
@given(cap=captions(), ratio=st.floats(0.01, 1.0), seed=seeds)
def test_mask_mode_matches_an_independent_replay_of_the_rng(cap, ratio, seed):
    """Default and explicit "mask" (with or without vocab_size) = choose positions with rng.choice, set them to 103."""
    ids, am = cap
    candidates = np.array(sorted(maskable_positions(ids, am)), dtype=np.int64)
    k = min(len(candidates), max(1, round(ratio * len(candidates)))) if len(candidates) else 0
    chosen = np.sort(rng(seed).choice(candidates, size=k, replace=False)).tolist() if k else []
    expected = ids.clone()
    expected[chosen] = MASK_TOKEN_ID
    for kw in ({}, {"mode": "mask"}, {"mode": "mask", "vocab_size": 30522}):
        masked, labels = mask_text_tokens(ids, am, ratio, rng(seed), **kw)
        assert torch.equal(masked, expected)
        assert torch.nonzero(labels != IGNORE_INDEX).flatten().tolist() == chosen


@FAST
@given(cap=captions(), ratio=st.floats(0.01, 1.0), seed=seeds)
def test_bert_mode_changes_only_the_chosen_positions(cap, ratio, seed):
    ids, am = cap
    before = ids.clone()
    masked, labels = mask_text_tokens(ids, am, ratio, rng(seed), mode="bert", vocab_size=BERT_VOCAB)
    _, mask_labels = mask_text_tokens(ids, am, ratio, rng(seed))
    assert torch.equal(ids, before)
    assert torch.equal(labels, mask_labels)  # same positions as "mask", originals as labels (kept ones too)
    chosen = labels != IGNORE_INDEX
    assert torch.equal(masked[~chosen], ids[~chosen])
    new = masked[chosen]
    allowed = (new == MASK_TOKEN_ID) | (new == ids[chosen]) | ((new < BERT_VOCAB) & ~torch.isin(
        new, torch.tensor(DEFAULT_SPECIAL_IDS)))
    assert allowed.all()


def test_bert_mode_80_10_10_split_and_random_ids():
    ids, am = word_captions(2000)  # 15 of 20 words chosen per caption: 30000 chosen positions
    masked, labels = mask_text_batch(ids, am, 0.75, [rng(i) for i in range(len(ids))], mode="bert",
                                     vocab_size=BERT_VOCAB)
    chosen = labels != IGNORE_INDEX
    assert int(chosen.sum()) == 30000 and torch.equal(labels[chosen], ids[chosen])
    new, orig = masked[chosen], ids[chosen]
    is_mask, is_kept = new == MASK_TOKEN_ID, new == orig
    is_random = ~is_mask & ~is_kept
    n = float(len(new))  # binomial std of a fraction: <= 0.0023 here; tolerances are > 4 std
    assert abs(is_mask.sum() / n - 0.8) < 0.01
    assert abs(is_random.sum() / n - 0.1) < 0.008 and abs(is_kept.sum() / n - 0.1) < 0.008
    randoms = new[is_random]
    allowed = set(range(1, 101)) | {104}
    assert set(randoms.tolist()) == allowed  # never special, always < vocab_size, every allowed id reachable
    counts = torch.bincount(randoms, minlength=BERT_VOCAB)[sorted(allowed)].float()
    assert counts.max() < 2.5 * counts.mean() and counts.min() > 0.3 * counts.mean()  # roughly uniform


def test_bert_mode_is_a_pure_function_of_the_rng():
    ids, am = word_captions(4)
    rngs = lambda base: [rng(base + i) for i in range(4)]  # noqa: E731
    a = mask_text_batch(ids, am, 0.75, rngs(0), mode="bert", vocab_size=30522)
    b = mask_text_batch(ids, am, 0.75, rngs(0), mode="bert", vocab_size=30522)
    c = mask_text_batch(ids, am, 0.75, rngs(100), mode="bert", vocab_size=30522)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    for row in range(4):
        single = mask_text_tokens(ids[row], am[row], 0.75, rng(row), mode="bert", vocab_size=30522)
        assert torch.equal(a[0][row], single[0]) and torch.equal(a[1][row], single[1])


def test_bert_mode_never_draws_the_mask_token_as_a_random_word():
    """mask_token_id is excluded from random words even when it is not listed in special_ids."""
    ids, am = word_captions(500)
    masked, labels = mask_text_batch(ids, am, 1.0, [rng(i) for i in range(500)], mask_token_id=50,
                                     special_ids=(0, 101, 102), mode="bert", vocab_size=BERT_VOCAB)
    new = masked[labels != IGNORE_INDEX]
    randoms = new[(new != 50) & (new != ids[labels != IGNORE_INDEX])]
    assert len(randoms) > 500 and not torch.isin(randoms, torch.tensor([0, 50, 101, 102])).any()


def test_text_mask_mode_errors():
    ids, am = torch.tensor([101, 2000, 102]), torch.ones(3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown text mask mode 'Bert'"):
        mask_text_tokens(ids, am, 0.5, rng(0), mode="Bert")
    with pytest.raises(ValueError, match="needs vocab_size"):
        mask_text_tokens(ids, am, 0.5, rng(0), mode="bert")
    with pytest.raises(ValueError, match="no non-special id"):
        mask_text_tokens(ids, am, 0.5, rng(0), mode="bert", vocab_size=1)  # only [PAD]
    with pytest.raises(ValueError, match="must be an int"):
        mask_text_tokens(ids, am, 0.5, rng(0), mode="bert", vocab_size=30522.0)
    empty = torch.zeros(0, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown text mask mode"):
        mask_text_batch(empty, empty, 0.5, [], mode="random")
    with pytest.raises(ValueError, match="needs vocab_size"):
        mask_text_batch(ids[None], am[None], 0.5, [rng(0)], mode="bert")
