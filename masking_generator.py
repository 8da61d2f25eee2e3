"""Video tube/random masks and MLM text masking for SimVTP pre-training.

Every function here takes its randomness from an explicit ``np.random.Generator`` (the caller builds it with
``video_transforms.sample_rng(seed, epoch, index, stream)``), never from global RNG state: a sample's masks are then a
pure function of (seed, epoch, index), identical across ranks, resumed runs and re-runs.

Video masks are bool numpy ``[N]`` over the token grid ``(T', H', W') = (T//2, H//16, W//16)``, tokens ordered
(t, h, w), True = masked. Text masks work on torch tensors and always return new tensors.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "TubeMaskingGenerator",
    "RandomMaskingGenerator",
    "build_mask_generator",
    "mask_text_tokens",
    "mask_text_batch",
    "MASK_TOKEN_ID",
    "DEFAULT_SPECIAL_IDS",
    "IGNORE_INDEX",
    "TEXT_MASK_MODES",
]

MASK_TOKEN_ID = 103
# [PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103 of bert-base-uncased. [UNK]=100 is deliberately absent: see
# mask_text_tokens.
DEFAULT_SPECIAL_IDS: tuple[int, ...] = (0, 101, 102, 103)
IGNORE_INDEX = -100  # label value that torch's cross_entropy ignores
# "mask": every chosen word becomes [MASK] (the release); "bert": 80% [MASK], 10% a random word, 10% kept (BERT)
TEXT_MASK_MODES = ("mask", "bert")
_BERT_MASK_P, _BERT_RANDOM_P = 0.8, 0.1  # the rest (10%) keeps its original id


def _check_video_ratio(mask_ratio: float) -> float:
    ratio = float(mask_ratio)
    if not 0.0 <= ratio < 1.0:  # also rejects NaN
        raise ValueError(f"video mask_ratio must be in [0, 1) (at least one tube must stay visible), "
                         f"got {mask_ratio!r}")
    return ratio


def _check_grid(input_size: Sequence[int]) -> tuple[int, int, int]:
    if len(input_size) != 3:
        raise ValueError(f"input_size must be the token grid (T', H', W'), got {tuple(input_size)!r}")
    grid = tuple(int(s) for s in input_size)
    if min(grid) < 1:
        raise ValueError(f"token grid sizes must be >= 1, got {grid!r}")
    return grid  # type: ignore[return-value]


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError("expected an np.random.Generator (e.g. video_transforms.sample_rng(...)), got "
                        f"{type(rng).__name__}; global RNG is not used so that masks are reproducible per sample")
    return rng


class TubeMaskingGenerator:
    """One random spatial mask per clip, repeated in every temporal slice (the tube masking of VideoMAE/SimVTP).

    input_size: token grid (T', H', W'); exactly ``int(mask_ratio * H' * W')`` tokens are masked per slice.
    ``__call__(rng) -> bool [T'*H'*W']``, tokens ordered (t, h, w).
    """

    def __init__(self, input_size: Sequence[int], mask_ratio: float) -> None:
        self.frames, self.height, self.width = _check_grid(input_size)
        self.mask_ratio = _check_video_ratio(mask_ratio)
        self.num_patches_per_frame = self.height * self.width
        self.num_masks_per_frame = int(self.mask_ratio * self.num_patches_per_frame)
        self.total_patches = self.frames * self.num_patches_per_frame
        self.total_masks = self.frames * self.num_masks_per_frame

    def __repr__(self) -> str:
        return (f"TubeMaskingGenerator(grid={self.frames}x{self.height}x{self.width}, ratio={self.mask_ratio}, "
                f"masked {self.num_masks_per_frame}/{self.num_patches_per_frame} per slice, "
                f"{self.total_masks}/{self.total_patches} in total)")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        rng = _check_rng(rng)
        spatial = np.zeros(self.num_patches_per_frame, dtype=bool)
        spatial[rng.permutation(self.num_patches_per_frame)[: self.num_masks_per_frame]] = True
        return np.tile(spatial, self.frames)  # (t, h, w) order: slice t is spatial again


class RandomMaskingGenerator:
    """Independent random masking over all space-time tokens (the release's crashing ``random`` mode, fixed).

    Exactly ``int(mask_ratio * N)`` tokens masked, N = T'*H'*W'. ``__call__(rng) -> bool [N]``.
    """

    def __init__(self, input_size: Sequence[int], mask_ratio: float) -> None:
        self.frames, self.height, self.width = _check_grid(input_size)
        self.mask_ratio = _check_video_ratio(mask_ratio)
        self.total_patches = self.frames * self.height * self.width
        self.total_masks = int(self.mask_ratio * self.total_patches)

    def __repr__(self) -> str:
        return (f"RandomMaskingGenerator(grid={self.frames}x{self.height}x{self.width}, ratio={self.mask_ratio}, "
                f"masked {self.total_masks}/{self.total_patches})")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        rng = _check_rng(rng)
        mask = np.zeros(self.total_patches, dtype=bool)
        mask[rng.permutation(self.total_patches)[: self.total_masks]] = True
        return mask


_GENERATORS = {"tube": TubeMaskingGenerator, "random": RandomMaskingGenerator}


def build_mask_generator(mask_type: str, input_size: Sequence[int],
                         mask_ratio: float) -> TubeMaskingGenerator | RandomMaskingGenerator:
    """Video mask generator by name ("tube" | "random") for token grid input_size = (T', H', W')."""
    if mask_type not in _GENERATORS:
        raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {sorted(_GENERATORS)}")
    return _GENERATORS[mask_type](input_size, mask_ratio)


def _num_text_masks(n_maskable: int, ratio: float) -> int:
    """max(1, round(ratio * n)) for n > 0 (Python round: half to even), never more than n."""
    if n_maskable <= 0:
        return 0
    return min(n_maskable, max(1, round(ratio * n_maskable)))


def _check_text_mode(mode: str, vocab_size: int | None, excluded: Sequence[int]) -> None:
    """Fail before any masking: a wrong mode or vocabulary would otherwise surface as silent bad labels."""
    if mode not in TEXT_MASK_MODES:
        raise ValueError(f"unknown text mask mode {mode!r}; choose one of {TEXT_MASK_MODES}")
    if mode == "bert" and vocab_size is None:
        raise ValueError('text mask mode "bert" needs vocab_size (random replacement words are drawn from it)')
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
        if vocab_size <= sum(1 for s in set(excluded) if 0 <= s < vocab_size):
            raise ValueError(f"vocab_size {vocab_size} leaves no non-special id to draw random words from")


def _random_token_ids(rng: np.random.Generator, n: int, vocab_size: int, excluded: Sequence[int]) -> np.ndarray:
    """n ids uniform over [0, vocab_size) minus excluded, without building the whole vocabulary per caption."""
    skip = sorted(s for s in set(int(e) for e in excluded) if 0 <= s < vocab_size)
    ids = rng.integers(0, vocab_size - len(skip), size=n)
    for s in skip:  # ascending: the r-th allowed id is r plus the number of excluded ids at or below it
        ids = ids + (ids >= s)
    return ids


def _bert_replacements(original: torch.Tensor, rng: np.random.Generator, mask_token_id: int, vocab_size: int,
                       excluded: Sequence[int]) -> torch.Tensor:
    """BERT's 80/10/10 rule over the chosen positions' original ids: [MASK], a random non-special word, or kept."""
    u = rng.random(len(original))
    out = original.clone()
    out[torch.from_numpy(u < _BERT_MASK_P)] = mask_token_id
    to_random = (u >= _BERT_MASK_P) & (u < _BERT_MASK_P + _BERT_RANDOM_P)
    random_ids = _random_token_ids(rng, int(to_random.sum()), vocab_size, excluded)
    out[torch.from_numpy(to_random)] = torch.from_numpy(random_ids).to(out.dtype)
    return out


def mask_text_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, ratio: float = 0.75,
                     rng: np.random.Generator | None = None, mask_token_id: int = MASK_TOKEN_ID,
                     special_ids: Sequence[int] = DEFAULT_SPECIAL_IDS, *, mode: str = "mask",
                     vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM masking of one caption: input_ids, attention_mask long [L] -> (masked_ids [L], labels [L]).

    - Maskable positions: attention_mask == 1 and id not in special_ids. Padding and [CLS]/[SEP]/[PAD]/[MASK]
      are never masked. [UNK] (100) is *not* special by default: it stands in a real word's slot (the caption
      has a word there), so it counts as a word and may be masked, as in BERT's own pre-training data. Pass
      ``special_ids=(0, 100, 101, 102, 103)`` to keep it visible instead.
    - Exactly ``max(1, round(ratio * n_maskable))`` positions are masked when n_maskable > 0 (none otherwise),
      chosen uniformly without replacement with ``rng``.
    - mode "mask" (default): chosen positions become ``mask_token_id``, pure [MASK] replacement as in the
      release. mode "bert": of the chosen positions 80% become [MASK], 10% a random id uniform over
      [0, vocab_size) minus special_ids and mask_token_id, 10% keep their id (BERT's rule, so the word head also
      learns from visible words); vocab_size is required. "bert" draws more from ``rng`` after the positions,
      so "mask" results for a given rng are unchanged.
    - labels hold the original id at every chosen position (whatever it became) and -100 elsewhere.
    - Returns new tensors; the inputs are never modified (the release masked in place, so its contrastive and
      matching losses saw masked captions).
    """
    rng = _check_rng(rng)
    excluded = (*special_ids, mask_token_id)
    _check_text_mode(mode, vocab_size, excluded)
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"text mask ratio must be in (0, 1], got {ratio!r} (use text_mask_ratio=None to turn MLM off)")
    if input_ids.dim() != 1 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"expected input_ids and attention_mask of the same shape [L], got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    ids = input_ids.detach().cpu()
    special = torch.tensor(sorted(set(int(s) for s in special_ids)), dtype=ids.dtype)
    maskable = (attention_mask.detach().cpu() != 0) & ~torch.isin(ids, special)
    candidates = torch.nonzero(maskable, as_tuple=False).flatten().numpy()
    k = _num_text_masks(len(candidates), ratio)
    chosen = torch.from_numpy(np.sort(rng.choice(candidates, size=k, replace=False))) if k else \
        torch.zeros(0, dtype=torch.long)
    masked_ids = ids.clone()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[chosen] = ids[chosen]
    if mode == "bert":
        masked_ids[chosen] = _bert_replacements(ids[chosen], rng, mask_token_id, vocab_size, excluded)
    else:
        masked_ids[chosen] = mask_token_id
    return masked_ids.to(input_ids.device), labels.to(input_ids.device)


def mask_text_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, ratio: float,
                    rngs: Sequence[np.random.Generator], mask_token_id: int = MASK_TOKEN_ID,
                    special_ids: Sequence[int] = DEFAULT_SPECIAL_IDS, *, mode: str = "mask",
                    vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise mask_text_tokens: input_ids, attention_mask long [B, L], one rng per row -> (masked [B, L],
    labels [B, L]). One generator per row keeps each caption's mask a function of its own sample only.
    mode / vocab_size as in mask_text_tokens (checked here too, so an empty batch cannot hide a bad setting)."""
    _check_text_mode(mode, vocab_size, (*special_ids, mask_token_id))
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"expected input_ids and attention_mask of the same shape [B, L], got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if len(rngs) != input_ids.shape[0]:
        raise ValueError(f"need one rng per row: {input_ids.shape[0]} rows, {len(rngs)} rngs")
    rows = [mask_text_tokens(ids, am, ratio, rng, mask_token_id, special_ids, mode=mode, vocab_size=vocab_size)
            for ids, am, rng in zip(input_ids, attention_mask, rngs)]
    if not rows:
        return input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
