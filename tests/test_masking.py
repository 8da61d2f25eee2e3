"""Video tube/random masks and MLM text masking (masking_generator.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masking_generator import (DEFAULT_SPECIAL_IDS, IGNORE_INDEX, MASK_TOKEN_ID, RandomMaskingGenerator,
                               TubeMaskingGenerator, build_mask_generator, mask_text_batch, mask_text_tokens)

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
