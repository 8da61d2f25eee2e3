"""Layers and losses both model families share: text embeddings, attention masks, gradient checkpointing of one
layer, the masked-word loss, the two contrastive losses, matching negatives, and building a registered size.

Neither family module imports the other: each takes what they share from here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings

# ----------------------------------------------------------------------------------------------- layers

def run_layer(layer: nn.Module, recompute: bool, *args, **kwargs):
    """layer(*args, **kwargs); with `recompute` (gradient checkpointing) and gradients on, its activations are
    not kept but recomputed in the backward pass, under the forward's RNG state (drop path draws the same)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


def build_text_embeddings(vocab_size: int, dim: int, max_text_positions: int = 512) -> BertEmbeddings:
    """BERT's embedding layer (word + absolute position + token type, LayerNorm eps 1e-12, no dropout).
    Its position_ids / token_type_ids buffers are non-persistent: the state_dict holds only the 5 weights."""
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=dim, max_position_embeddings=max_text_positions,
                     type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout_prob=0.0)
    return BertEmbeddings(cfg)


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, L] (1 = token) -> bool [B, 1, 1, L]: True on the keys that may be attended to."""
    return (attention_mask != 0)[:, None, None]


def causal_key_mask(keep: torch.Tensor) -> torch.Tensor:
    """keep: bool/0-1 [N, L] (real tokens) -> bool [N, 1, L, L]: query i may attend to the real keys j <= i."""
    length = keep.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
    return (causal[None] & keep.bool()[:, None, :])[:, None]


# timm's own factory arguments, accepted from timm.create_model and dropped
TIMM_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build_registered(cls: type, defaults: dict, kwargs: dict, how_to_load: str) -> nn.Module:
    """A registered size: `cls` from the size's defaults overridden by the caller's kwargs (timm's own arguments
    dropped). Nothing is downloaded: pretrained=True is a ValueError that says `how_to_load` weights instead."""
    if kwargs.pop("pretrained", False):
        raise ValueError(f"pretrained=True: load weights with {how_to_load}, nothing is downloaded")
    return cls(**{**defaults, **{k: v for k, v in kwargs.items() if k not in TIMM_ARGS}})


# ----------------------------------------------------------------------------------------------- losses
# Two contrastive losses, as the two releases compute them (the parity tests hold each to its release):
# vtc_loss (SimVTP) scores the global batch against itself, every rank the same loss; itc_loss (SViTT) scores the
# local rows against the global batch, the mean over ranks being the global loss.


def vtc_loss(video_feat: torch.Tensor, text_feat: torch.Tensor, temperature: float | torch.Tensor,
             gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
             match_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features [b, D] (pair i matches), over the global batch when `gather`
    ([b, D] -> [world*b, D], with gradient) is given: every rank computes the same global x global loss.
    match_ids long [b] (e.g. SSv2's caption ids): pairs i, j with the same id are positives too, the target
    spread evenly over a row's positives."""
    v = F.normalize(video_feat.float(), dim=-1)
    t = F.normalize(text_feat.float(), dim=-1)
    if gather is not None:
        v, t = gather(v), gather(t)
        match_ids = gather(match_ids) if match_ids is not None else None
    logits = v @ t.t() / temperature
    if match_ids is None:
        labels = torch.arange(len(v), device=v.device)
    else:
        positives = (match_ids[:, None] == match_ids[None, :]).float()
        labels = positives / positives.sum(dim=1, keepdim=True)  # symmetric: one target for both directions
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def itc_loss(video_feat: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor | float,
             video_ids: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Contrastive loss with every pair of the same video counted as a positive (targets spread evenly over
    them). With `gather` ([b, ...] -> [world*b, ...], with gradient) the local rows are scored against the
    global batch (ALBEF/Singularity's form; the mean over ranks is the global loss)."""
    v = F.normalize(video_feat.float(), dim=-1)
    t = F.normalize(text_feat.float(), dim=-1)
    v_all, t_all, ids_all = (gather(v), gather(t), gather(video_ids)) if gather is not None else (v, t, video_ids)
    positives = (video_ids[:, None] == ids_all[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    v2t = (v @ t_all.t() / temperature).log_softmax(dim=1)
    t2v = (t @ v_all.t() / temperature).log_softmax(dim=1)
    return -((v2t * targets).sum(1).mean() + (t2v * targets).sum(1).mean()) / 2


def reversal_loss(text_feat: torch.Tensor, video_feat: torch.Tensor, reversed_feat: torch.Tensor,
                  temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Time-order loss: each caption [b, D] against its own clip [b, D] and the same clip played backwards
    [b, D], the forward one the target (cross-entropy over the two similarities / temperature). The reversed clip
    shows the same colours, shape and background, so only the motion tells them apart: a hard negative that a
    model matching by appearance alone cannot refuse (captions that name a motion: "slides left" reversed is
    "slides right"). Returns (loss, accuracy: the share of captions that prefer the forward clip)."""
    t = F.normalize(text_feat.float(), dim=-1)
    pair = torch.stack([F.normalize(video_feat.float(), dim=-1), F.normalize(reversed_feat.float(), dim=-1)], 1)
    logits = torch.einsum("bd,bkd->bk", t, pair) / temperature
    target = torch.zeros(len(t), dtype=torch.long, device=t.device)
    return F.cross_entropy(logits, target), (logits[:, 0] > logits[:, 1]).float().mean()


RANK_SCORES = ("head", "sum")


def check_rank_score(score: str) -> str:
    """vtm_rank_score: what the rank loss orders, the head's log-odds ("head") or log-odds + contrastive logit
    ("sum", the score re-ranking with the contrastive logit reads)."""
    if score not in RANK_SCORES:
        raise ValueError(f"vtm_rank_score must be one of {RANK_SCORES}, got {score!r}")
    return score


def matching_rank_loss(logits: torch.Tensor, num_matches: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Matching head as a ranker: each non-match's score against that of the match it was drawn for,
    softplus(s_non - s_match) (a two-way cross-entropy). logits [M + N, 2]: M matches, then N non-matches, non-match
    k made from match k mod M (a negative video for its caption or a negative caption for its video). The score is
    the head's log-odds, plus `offsets` [M + N] when given (each pair's contrastive logit, no gradient): a head
    trained on negatives drawn by that logit learns what to add to it, and re-ranking reads the sum. Re-ranking
    compares the scores of one query's candidates; the binary loss asks each pair's absolute answer, so a part of
    the log-odds that depends on the caption or the video alone costs it nothing, and with pairs it cannot tell
    apart its best answer is the same for both. This loss scores only the order within each pair."""
    if len(logits) <= num_matches:
        return logits.sum() * 0.0  # no non-match: nothing to rank, still connected to the graph
    score = logits[:, 1].float() - logits[:, 0].float()
    if offsets is not None:
        score = score + offsets.detach().float()
    matches, non_matches = score[:num_matches], score[num_matches:]
    partner = torch.arange(len(non_matches), device=logits.device) % num_matches
    return F.softplus(non_matches - matches[partner]).mean()


def positions_first(keep: torch.Tensor, count: int) -> torch.Tensor:
    """keep bool [B, N] -> long [B, count]: each row's True positions first, in order, then its False ones. A gather
    by it has a static width however many each row keeps."""
    return (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :count]


def masked_word_states(states: torch.Tensor, labels: torch.Tensor, count: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions the word head has to score: states [B, L, D], labels [B, L] (-100 where not masked) ->
    [B, count, D] and [B, count], each caption's masked positions first (in order), then unmasked ones (label
    -100) to fill the row. count is the collator's host count (max_masked_words: the most masked words of any
    caption), so the head's vocabulary projection runs on count positions instead of L without a host sync or a
    data-dependent shape; None keeps every position."""
    if count is None or count >= labels.shape[1]:
        return states, labels
    order = positions_first(labels != -100, max(int(count), 1))
    return torch.gather(states, 1, order[..., None].expand(-1, -1, states.shape[-1])), labels.gather(1, order)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's captions of each caption's mean CE over its masked tokens.

    logits: [B, L, V] (every position, or those masked_word_states keeps), labels: [B, L], -100 where a token is
    not masked. A caption without masked tokens contributes 0 and still counts in the mean, so the loss is an
    exact mean of per-rank losses."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    counts = (labels != -100).sum(dim=1).clamp(min=1)
    return (ce.view(labels.shape).sum(dim=1) / counts).sum() / len(labels)


# ----------------------------------------------------------------------------------------------- matching negatives


def sample_negatives(sim: torch.Tensor, hard: bool = True, match_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One negative column per row of sim [B, B] (B >= 2), never the diagonal (the positive) nor, given match_ids
    [B], a column of the row's id (another clip of the same video) unless the row has no other: drawn with
    probability softmax(sim) (hard, ALBEF style) or uniformly (the release), from torch's global RNG."""
    logits = torch.nan_to_num(sim.detach().float(), nan=0.0) if hard else torch.zeros_like(sim, dtype=torch.float)
    exclude = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    if match_ids is not None:
        same = match_ids[:, None] == match_ids[None, :]
        exclude |= same & ~same.all(dim=1, keepdim=True)
    probs = logits.masked_fill(exclude, float("-inf")).softmax(dim=1)
    # torch.multinomial(probs, 1)'s own draw (argmax of p / E, E ~ Exp(1): the same picks from the same RNG state)
    # without its two validity checks, which read the device from the host on CUDA
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=1)


NEGATIVE_MODES = ("hard", "random", "mixed")


def negatives_now(mode: str, random_epochs: int, batch: dict) -> str:
    """This step's matching negatives: `mode` once the batch's data epoch (the collator's plain int
    "train_epoch": nothing read from the device) is past the `random_epochs` warm-up, "random" before. From
    random weights a matching head given only hard negatives (which differ from the positive in one attribute)
    stays on the constant answer; uniform ones teach it the coarse differences first."""
    return mode if int(batch.get("train_epoch", random_epochs)) >= random_epochs else "random"


def matching_negatives(sim: torch.Tensor, mode: str, match_ids: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """sim [B videos, B texts] -> (a negative video for each caption, a negative caption for each video), each
    [B]: both by similarity ("hard", ALBEF), both uniform ("random", SimVTP's release), or the video by
    similarity and the caption uniformly ("mixed": every positive meets one hard and one easy negative, so the
    head keeps a signal it can learn while it learns the hard one)."""
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"vtm_negatives must be one of {NEGATIVE_MODES}, got {mode!r}")
    neg_video = sample_negatives(sim.t(), mode != "random", match_ids)
    neg_text = sample_negatives(sim, mode == "hard", match_ids)
    return neg_video, neg_text

