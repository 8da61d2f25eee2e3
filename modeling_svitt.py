"""SViTT (sparse video-text transformer, Li et al., CVPR 2023), the second model family: its models and registration.

Sections: the vision tower (its block-sparse attention and token pruning live in sparse_attention.py); the BERT
text tower whose layers from `fusion_layer` on cross-attend to the video (text-guided token selection there); the
pre-training model on the model contract (model_registry.py), ITC with several captions per video and ITM
negatives never of the same video (losses in layers.py); retrieval and QA models; registration. Checkpoint
conversion (the release's files, Hugging Face BEiT / BERT, temporal expansion) is in svitt_weights.py.

A BEiT-B/16 runs jointly over the whole clip: every frame is patch-embedded on its own, the clip becomes one
sequence [CLS] + T*h*w patch tokens (frame-major), each layer adds a learned 3-D relative position bias; after
the layers in `token_drop_loc` only the patch tokens with the most [CLS] attention survive.

Parameter names follow the release's Hugging Face BEiT names: a release state dict's `vision_encoder.*` keys map
onto this module's by dropping that prefix (`relative_position_index` buffers excepted: we rebuild them).
Shapes: B batch, L tokens, D width.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from answer_ranking import qa_training_loss, rank_by_decoder, word_logits
from layers import (NEGATIVE_MODES, build_registered, build_text_embeddings, causal_key_mask, check_rank_score,
                    itc_loss, key_padding_mask, masked_word_states, matching_negatives, matching_rank_loss, mlm_loss,
                    negatives_now, reversal_loss, run_layer)
from model_registry import ModelFamily, layer_id_from_name, register_family, register_model
from sparse_attention import (BlockPattern, SViTTSelfAttention, keep_count, patch_coordinates, random_scores,
                              sample_block_pattern, select_patch_tokens)
from svitt_weights import DECODER_PREFIX, EXPAND_MODES, TEXT_PREFIX, convert_state_dict, recognise_release

MLP_CHUNK_ROWS = 1024  # tokens per MLP call on CPU: a 1024 x 3072 fp32 hidden activation is 12 MiB


@dataclass
class SViTTVisionConfig:
    """Vision tower hyper-parameters (defaults: the release's BEiT-B/16 at 4 frames, 224 px)."""
    image_size: int = 224
    patch_size: int = 16
    num_frames: int = 4
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-12
    attn_block_size: int = 56
    sparse_local_attn: int = 1  # odd width of the local block window; 0 = dense attention
    sparse_random_attn: int = 0  # random extra key blocks per query block
    token_keep_rate: float = 1.0
    token_drop_loc: tuple[int, ...] = field(default_factory=tuple)  # layers after which tokens are pruned
    token_drop_method: str = "cls_attention"  # or "random"
    release_sparse_padding: bool = False  # True: the last block's padding keys enter the softmax as the release's do

    def __post_init__(self) -> None:
        if self.sparse_local_attn < 0 or (self.sparse_local_attn and self.sparse_local_attn % 2 == 0):
            raise ValueError(f"sparse_local_attn must be 0 (dense) or odd, got {self.sparse_local_attn}")
        if self.token_drop_method not in ("cls_attention", "random"):
            raise ValueError(f"token_drop_method must be 'cls_attention' or 'random', got {self.token_drop_method}")
        if not 0.0 < self.token_keep_rate <= 1.0:
            raise ValueError(f"token_keep_rate must be in (0, 1], got {self.token_keep_rate}")

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.image_size // self.patch_size
        return self.num_frames, side, side


def svitt_base_config(**overrides) -> SViTTVisionConfig:
    """The release's BEiT-B/16 tower: width 768, 12 layers, 12 heads, 224 px."""
    return SViTTVisionConfig(**overrides)


# ------------------------------------------------------------------------------------------------- attention


class SViTTAttentionOutput(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)


class SViTTAttention(nn.Module):
    """Holds the release's `attention.attention.*` and `attention.output.dense` names."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.attention = SViTTSelfAttention(dim, num_heads, grid)
        self.output = SViTTAttentionOutput(dim)

    def forward(self, x, coords, pattern=None, mask=None, release_padding=False):
        out, cls_attn = self.attention(x, coords, pattern, mask, release_padding)
        return self.output.dense(out), cls_attn


class SViTTIntermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)


class SViTTOutput(nn.Module):
    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, dim)


class SViTTLayer(nn.Module):
    """Pre-norm BEiT layer with layer scale (`lambda_1`, `lambda_2`) and drop path."""

    def __init__(self, cfg: SViTTVisionConfig, drop_path: float) -> None:
        super().__init__()
        dim, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.attention = SViTTAttention(dim, cfg.num_heads, cfg.grid)
        self.intermediate = SViTTIntermediate(dim, hidden)
        self.output = SViTTOutput(hidden, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.lambda_1 = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
        self.lambda_2 = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, coords, pattern=None, mask=None, release_padding=False):
        a, cls_attn = self.attention(self.layernorm_before(x), coords, pattern, mask, release_padding)
        x = x + self.drop_path(self.lambda_1 * a)
        return x + self.drop_path(self.lambda_2 * self.mlp(self.layernorm_after(x))), cls_attn

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The GELU MLP, on CPU over at most MLP_CHUNK_ROWS tokens at a time: its 4x-wide hidden activations stay
        small enough for glibc's allocator to reuse (larger ones are mapped and page-faulted afresh on every call).
        Elsewhere in one call: the CUDA caching allocator reuses blocks of any size, and chunks are launches."""
        rows = h.flatten(0, -2)
        if rows.shape[0] <= MLP_CHUNK_ROWS or h.device.type != "cpu":
            return self.output.dense(F.gelu(self.intermediate.dense(h)))
        parts = [self.output.dense(F.gelu(self.intermediate.dense(r))) for r in rows.split(MLP_CHUNK_ROWS)]
        return torch.cat(parts).view_as(h)


# ---------------------------------------------------------------------------------------------------- tower


class SViTTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: SViTTVisionConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)


class SViTTEmbeddings(nn.Module):
    """Every frame patch-embedded on its own; [CLS] + frame-major patches; no absolute position embedding."""

    def __init__(self, cfg: SViTTVisionConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.patch_embeddings = SViTTPatchEmbeddings(cfg)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, T, C, H, W] -> tokens [B, 1 + T*h*w, D]."""
        B = video.shape[0]
        patches = self.patch_embeddings.projection(video.flatten(0, 1)).flatten(2).transpose(1, 2)
        patches = patches.reshape(B, -1, patches.shape[-1])
        return torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)


class SViTTEncoder(nn.Module):
    def __init__(self, cfg: SViTTVisionConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.layer = nn.ModuleList(SViTTLayer(cfg, r) for r in rates)


class SViTTPooler(nn.Module):
    def __init__(self, cfg: SViTTVisionConfig) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


@dataclass
class SViTTVisionOutput:
    tokens: torch.Tensor  # [B, L, D]: final [CLS] + surviving patch tokens (no final norm: the release has none)
    pooled: torch.Tensor | None  # [B, D]: pooler LayerNorm of the mean of the surviving patch tokens (QA: None)
    coords: torch.Tensor  # [B, N, 3]: original (t, h, w) of every surviving patch token
    patterns: list  # per layer: the BlockPattern used (None when dense)
    kept: list  # per pruning layer: indices [B, N_after] into that layer's patch tokens


class SViTTVisionTower(nn.Module):
    """The release's `vision_encoder` (BEiT names) with block-sparse attention and [CLS]-attention token pruning."""

    def __init__(self, cfg: SViTTVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = SViTTEmbeddings(cfg)
        self.encoder = SViTTEncoder(cfg)
        self.pooler = SViTTPooler(cfg)
        self.register_buffer("patch_coords", patch_coordinates(*cfg.grid), persistent=False)
        self.grad_checkpointing = False
        self.apply(init_weights)
        trunc_normal_(self.embeddings.cls_token, std=0.02)

    def pattern_for(self, num_patches: int, generator: torch.Generator | None) -> BlockPattern | None:
        cfg = self.config
        if cfg.sparse_local_attn == 0:
            return None
        nb = math.ceil(num_patches / cfg.attn_block_size)
        return sample_block_pattern(nb, cfg.sparse_local_attn, cfg.sparse_random_attn, cfg.attn_block_size, generator)

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None,
                dense_masks: list | None = None) -> SViTTVisionOutput:
        """video [B, T, C, H, W]. `generator` draws the random blocks and random pruning (global RNG when None).
        The random blocks are drawn once per forward and token count: every layer between two pruning layers
        uses the same pattern (shared by the batch and heads), so its gather indices are built once.
        `dense_masks` (per layer a bool [B or 1, L, L] or None) forces dense attention under explicit masks."""
        cfg = self.config
        x = self.embeddings(video)
        coords = self.patch_coords.expand(x.shape[0], -1, -1)
        patterns, kept, drawn = [], [], {}
        for i, layer in enumerate(self.encoder.layer):
            if dense_masks is None and coords.shape[1] not in drawn:  # one pattern per forward and token count
                drawn[coords.shape[1]] = self.pattern_for(coords.shape[1], generator)
            pattern = None if dense_masks is not None else drawn[coords.shape[1]]
            mask = dense_masks[i] if dense_masks is not None else None
            x, cls_attn = run_layer(layer, self.grad_checkpointing, x, coords, pattern, mask,
                                    cfg.release_sparse_padding)
            patterns.append(pattern)
            if i in cfg.token_drop_loc and cfg.token_keep_rate < 1.0:
                scores = cls_attn if cfg.token_drop_method == "cls_attention" else \
                    random_scores(cls_attn.shape, generator, cls_attn.device)
                x, coords, keep = select_patch_tokens(x, coords, scores.detach(), cfg.token_keep_rate)
                kept.append(keep)
        pooled = self.pooler.layernorm(x[:, 1:].mean(dim=1)) if "pooler" in self._modules else None  # QA: none
        return SViTTVisionOutput(x, pooled, coords, patterns, kept)


# ------------------------------------------------------------------------------------------- text tower (BERT)


@dataclass
class SViTTTextConfig:
    """BERT text tower: layers below `fusion_layer` read text only; from it on each layer also cross-attends to the
    video tokens (the joint encoder, sharing those layers' weights with the text encoder, ALBEF style)."""
    vocab_size: int = 30522
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    intermediate: int = 3072
    fusion_layer: int = 9
    vision_width: int = 768
    max_positions: int = 512
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if not 0 <= self.fusion_layer < self.depth:
            raise ValueError(f"fusion_layer must be in [0, {self.depth}), got {self.fusion_layer}")


class BertSelfAttentionParams(nn.Module):
    """query / key / value of BERT's attention (all with bias); keys and values may read another width."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)


class BertAddNorm(nn.Module):
    """BERT's post-norm residual: LayerNorm(x + dense(h))."""

    def __init__(self, in_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(h))


class BertAttentionBlock(nn.Module):
    """`attention.*` or `crossattention.*` of a BERT layer: `self` holds q/k/v, `output` the add & norm."""

    def __init__(self, cfg: SViTTTextConfig, kv_dim: int) -> None:
        super().__init__()
        self.self = BertSelfAttentionParams(cfg.width, kv_dim, cfg.num_heads)
        self.output = BertAddNorm(cfg.width, cfg.width, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None,
                want_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, Lq, D] attends to context [B, Lk, Dk]; key_mask bool [B, 1, 1 or Lq, Lk] (True = may attend), None
        where no key is padded (an unmasked SDPA call can take CUDA's flash kernel, a boolean mask the
        memory-efficient one). Returns (x after add & norm, head-mean attention [B, Lq, Lk] when want_probs)."""
        p = self.self
        q, k, v = (t.unflatten(-1, (p.num_heads, -1)).transpose(1, 2)
                   for t in (p.query(x), p.key(context), p.value(context)))
        probs = None
        if want_probs:  # the explicit form: token selection needs the attention weights
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask, float("-inf"))
            weights = logits.softmax(dim=-1)
            out, probs = weights @ v, weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.output(out.transpose(1, 2).flatten(2), x), probs


class BertIntermediate(nn.Module):
    def __init__(self, cfg: SViTTTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.intermediate)


class BertLayer(nn.Module):
    """Post-norm BERT layer; with `cross` a cross-attention block to the video tokens after self-attention."""

    def __init__(self, cfg: SViTTTextConfig, cross: bool) -> None:
        super().__init__()
        self.attention = BertAttentionBlock(cfg, cfg.width)
        if cross:
            self.crossattention = BertAttentionBlock(cfg, cfg.vision_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertAddNorm(cfg.intermediate, cfg.width, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor | None = None,
                video_mask: torch.Tensor | None = None, want_probs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """text_mask / video_mask: BertAttentionBlock's key_mask of the self- and the cross-attention."""
        x, _ = self.attention(x, x, text_mask)
        probs = None
        if video is not None:  # video may have fewer rows: each serves len(x) / len(video) consecutive rows of x
            if len(x) % len(video):
                raise ValueError(f"{len(video)} rows of video tokens cannot serve {len(x)} rows of text")
            shared, probs = self.crossattention(x.reshape(len(video), -1, x.shape[-1]), video, video_mask, want_probs)
            x = shared.reshape(x.shape)
        return self.output(F.gelu(self.intermediate.dense(x)), x), probs


class BertEncoder(nn.Module):
    def __init__(self, cfg: SViTTTextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, cross=i >= cfg.fusion_layer) for i in range(cfg.depth))


class TextBert(nn.Module):
    """`text_encoder.bert`: BERT embeddings (transformers' BertEmbeddings) and the layers."""

    def __init__(self, cfg: SViTTTextConfig) -> None:
        super().__init__()
        self.embeddings = build_text_embeddings(cfg.vocab_size, cfg.width, cfg.max_positions)
        self.encoder = BertEncoder(cfg)


class BertPredictionTransform(nn.Module):
    def __init__(self, cfg: SViTTTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPrediction(nn.Module):
    """BERT's MLM head; the decoder's weight is the word embedding matrix and its bias is `bias` (tied: the
    release stores each pair under both names, and so do we)."""

    def __init__(self, cfg: SViTTTextConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.width, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertMLMHead(nn.Module):
    def __init__(self, cfg: SViTTTextConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPrediction(cfg, word_embeddings)


class SViTTTextTower(nn.Module):
    """The release's `text_encoder` (pre-training names: `bert.*` and the MLM head `cls.*`)."""

    def __init__(self, cfg: SViTTTextConfig, mlm_head: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.bert = TextBert(cfg)
        self.grad_checkpointing = False
        if mlm_head:
            self.cls = BertMLMHead(cfg, self.bert.embeddings.word_embeddings)

    def text_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings + the text-only layers -> [B, L, D] (its [CLS] is the text embedding)."""
        x = self.bert.embeddings(input_ids=input_ids)
        keys = key_padding_mask(attention_mask)
        for layer in self.bert.encoder.layer[:self.config.fusion_layer]:
            x, _ = run_layer(layer, self.grad_checkpointing, x, keys)
        return x

    def fusion_layers(self, x: torch.Tensor, attention_mask: torch.Tensor, video: torch.Tensor,
                      selection: "FusionTokenSelection | None" = None) -> torch.Tensor:
        """Text states [B, L, D] from text_layers + video tokens [B, Lv, Dv] -> fused states [B, L, D]. With a
        `selection`, after each of its layers only the video tokens the text attends to most stay for the next.
        The cross-attention gets no mask: every video token is real."""
        text_keys = key_padding_mask(attention_mask)
        first = self.config.fusion_layer
        for i, layer in enumerate(self.bert.encoder.layer[first:], start=first):
            prune = selection is not None and selection.after(i)
            x, probs = run_layer(layer, self.grad_checkpointing, x, text_keys, video, None,
                                 want_probs=prune and selection.needs_attention)
            if prune:
                video = selection.select(video, probs, attention_mask)
        return x


@dataclass
class FusionTokenSelection:
    """Text-guided video token selection in the fusion layers: after each layer in `drop_loc` (text-tower layer
    indices) keep the video [CLS] and ceil(keep_rate * N) other video tokens by the attention the text [CLS]
    (cls_attn) or every real text token on average (avg_attn) gives them, or at random."""
    keep_rate: float
    drop_loc: tuple[int, ...]
    strategy: str = "cls_attn"
    generator: torch.Generator | None = None

    STRATEGIES = ("cls_attn", "avg_attn", "random")

    @property
    def needs_attention(self) -> bool:
        return self.strategy != "random"

    def after(self, layer: int) -> bool:
        return self.keep_rate < 1.0 and layer in self.drop_loc

    def select(self, video: torch.Tensor, probs: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
        """video [B, 1 + N, D], probs [B, L, 1 + N] (head mean) -> [B, 1 + keep, D] in the original order."""
        if self.strategy == "random":
            scores = random_scores(video.shape[:2], self.generator, video.device)[:, 1:]
        elif self.strategy == "cls_attn":
            scores = probs[:, 0, 1:]
        else:
            w = attention_mask.to(probs.dtype)[..., None]
            scores = ((probs * w).sum(1) / w.sum(1))[:, 1:]
        keep = scores.detach().topk(keep_count(scores.shape[1], self.keep_rate), dim=1).indices.sort(dim=1).values
        kept = torch.gather(video[:, 1:], 1, keep[..., None].expand(-1, -1, video.shape[-1]))
        return torch.cat([video[:, :1], kept], dim=1)


# ------------------------------------------------------------------------------------------------- the model


class SViTTTowers(nn.Module):
    """What SViTT's pre-training, retrieval and QA models share (the release's names): vision tower, text tower
    with fusion layers, projections, matching head, temperature (the QA model drops the last three), the model
    contract's data and lr-decay parts, and the vision / fusion passes. The retrieval passes are SViTTPretrain's
    only, so a QA model has none to be probed."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_frames: int = 4, vision_width: int = 768,
                 vision_depth: int = 12, vision_heads: int = 12, text_width: int = 768, text_depth: int = 12,
                 text_heads: int = 12, text_intermediate: int = 3072, fusion_layer: int = 9,
                 vocab_size: int = 30522, embed_dim: int = 256, drop_path_rate: float = 0.1,
                 attn_block_size: int = 56, sparse_local_attn: int | None = None, sparse_random_attn: int = 0,
                 token_keep_rate: float = 1.0, token_drop_loc: tuple[int, ...] = (),
                 token_keep_strategy: str = "cls_attn", fusion_keep_rate: float = 1.0,
                 fusion_drop_loc: tuple[int, ...] = (), fusion_keep_strategy: str = "cls_attn",
                 release_sparse_padding: bool = False, temp: float = 0.07, w_itc: float = 1.0, w_itm: float = 1.0,
                 w_mlm: float = 1.0, itc_local: bool = False, vtm_negatives: str = "hard", eval_seed: int = 0,
                 vtm_random_epochs: int = 0, w_reverse: float = 0.0,
                 temporal_expand_mode: str = "release", w_vtm_rank: float = 0.0,
                 vtm_rank_score: str = "head") -> None:
        super().__init__()
        self.clip_shape = (num_frames, img_size)  # the contract: frames and side it was built for
        if token_keep_strategy not in ("cls_attn", "random"):
            raise ValueError(f"token_keep_strategy must be cls_attn or random, got {token_keep_strategy!r}")
        if fusion_keep_strategy not in FusionTokenSelection.STRATEGIES:
            raise ValueError(f"fusion_keep_strategy must be one of {FusionTokenSelection.STRATEGIES}, got "
                             f"{fusion_keep_strategy!r}")
        if vtm_negatives not in NEGATIVE_MODES:
            raise ValueError(f"vtm_negatives must be one of {NEGATIVE_MODES}, got {vtm_negatives!r}")
        if sparse_local_attn is None:  # --sparse_random_attn alone turns block-sparse attention on, local width 1
            sparse_local_attn = 1 if sparse_random_attn else 0
        self.vision_encoder = SViTTVisionTower(SViTTVisionConfig(
            image_size=img_size, patch_size=patch_size, num_frames=num_frames, width=vision_width,
            depth=vision_depth, num_heads=vision_heads, drop_path_rate=drop_path_rate,
            attn_block_size=attn_block_size, sparse_local_attn=sparse_local_attn,
            sparse_random_attn=sparse_random_attn, token_keep_rate=token_keep_rate,
            token_drop_loc=tuple(token_drop_loc),
            token_drop_method="cls_attention" if token_keep_strategy == "cls_attn" else "random",
            release_sparse_padding=release_sparse_padding))
        self.vision_layernorm = nn.LayerNorm(vision_width, eps=1e-12)
        text_cfg = SViTTTextConfig(vocab_size=vocab_size, width=text_width, depth=text_depth, num_heads=text_heads,
                                   intermediate=text_intermediate, fusion_layer=fusion_layer, vision_width=vision_width)
        self.text_encoder = SViTTTextTower(text_cfg)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.fusion_selection = FusionTokenSelection(fusion_keep_rate, tuple(fusion_drop_loc), fusion_keep_strategy)
        self.loss_weights = dict(itc=w_itc, itm=w_itm, mlm=w_mlm, reverse=w_reverse, itm_rank=w_vtm_rank)
        if temporal_expand_mode not in EXPAND_MODES:
            raise ValueError(f"temporal_expand_mode must be one of {EXPAND_MODES}, got {temporal_expand_mode!r}")
        self.itc_local, self.vtm_negatives, self.eval_seed = itc_local, vtm_negatives, eval_seed
        self.vtm_random_epochs = vtm_random_epochs
        self.vtm_rank_score = check_rank_score(vtm_rank_score)
        self.temporal_expand_mode = temporal_expand_mode  # read by convert_state_dict when a file has other frames
        self.patch_size = patch_size
        for module in (self.vision_layernorm, self.text_encoder, self.vision_proj, self.text_proj, self.itm_head):
            module.apply(init_bert_weights)

    # -- the model contract
    takes_video_mask = False
    text_masking = "bert"
    default_text_mask_ratio = 0.5

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return num_frames, height // self.patch_size, width // self.patch_size

    @property
    def num_layers(self) -> int:
        return max(len(self.vision_encoder.encoder.layer), len(self.text_encoder.bert.encoder.layer))

    def layer_id(self, name: str) -> int:
        return layer_id_from_name(name, self.num_layers)

    def no_weight_decay(self) -> set[str]:
        return {"temp", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every vision and BERT layer (text, fusion, answer decoder) in the backward pass: less memory."""
        for tower in self.modules():
            if isinstance(tower, (SViTTVisionTower, SViTTTextTower)):
                tower.grad_checkpointing = enable

    # -- passes
    def _generator(self) -> torch.Generator | None:
        """Random blocks and random pruning: the run's global RNG in training (seeded, saved with checkpoints);
        at evaluation a generator seeded with `eval_seed` at every call, so a test number never changes."""
        return None if self.training else torch.Generator().manual_seed(self.eval_seed)

    def vision(self, video: torch.Tensor) -> SViTTVisionOutput:
        """video [B, 3, T, H, W] (the loaders' layout) -> the tower's output."""
        return self.vision_encoder(video.transpose(1, 2), generator=self._generator())

    def fused_cls(self, text_states: torch.Tensor, attention_mask: torch.Tensor, video_tokens: torch.Tensor
                  ) -> torch.Tensor:
        """Fusion layers over text states and (vision_layernorm'ed) video tokens -> fused [CLS] [B, D]."""
        return self.text_encoder.fusion_layers(text_states, attention_mask, video_tokens, self._selection())[:, 0]

    def _selection(self) -> FusionTokenSelection:
        s = self.fusion_selection
        return FusionTokenSelection(s.keep_rate, s.drop_loc, s.strategy, self._generator())


class SViTTPretrain(SViTTTowers):
    """SViTT pre-training model: the towers with the losses ITC + ITM (hard negatives) + MLM, weights `w_itc`,
    `w_itm`, `w_mlm`, and the retrieval passes (encoders, matching head for re-ranking)."""

    def current_temperature(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)

    def matching_loss(self, video_tokens, text_states, attention_mask, video_feat, text_feat, video_ids,
                      negatives: str | None = None):
        """ITM over 3B pairs: positives, a negative video per caption, a negative caption per video; negatives by
        similarity (or uniformly) among other videos of the local batch. Returns (loss, accuracy, rank term: the
        --w_vtm_rank loss over the same pairs, None when unweighted)."""
        b = len(video_tokens)
        with torch.no_grad():
            sim = F.normalize(video_feat.float(), dim=-1) @ F.normalize(text_feat.float(), dim=-1).t()
            sim = sim / self.current_temperature()
            # never another clip of the same video
            neg_video, neg_text = matching_negatives(sim, negatives or self.vtm_negatives, video_ids)
        videos = torch.cat([video_tokens, video_tokens[neg_video], video_tokens])
        texts = torch.cat([text_states, text_states, text_states[neg_text]])
        masks = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
        logits = self.itm_head(self.fused_cls(texts, masks, videos)).float()
        labels = (torch.arange(3 * b, device=logits.device) < b).long()  # built on the device: no copy
        rank = None
        if self.loss_weights["itm_rank"] > 0:
            own = torch.arange(b, device=sim.device)
            rank = self.rank_term(logits, texts, masks, videos, torch.cat([sim[own, own], sim[neg_video, own],
                                                                           sim[own, neg_text]]))
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean(), rank

    def rank_term(self, logits, texts, masks, videos, pair_logits) -> torch.Tensor:
        """--w_vtm_rank's loss over the ITM pairs (logits [3B, 2], positives first; pair_logits their contrastive
        logits). Ordering the sum (vtm_rank_score "sum") it reads the pairs again with the towers' outputs
        detached: a loss on the re-ranker (fusion layers and head) alone. Reaching the towers, it lowered the
        contrastive order in three runs of four (docs/matching_heads.md, "The head as a ranker")."""
        b = len(logits) // 3
        if self.vtm_rank_score == "head":
            return matching_rank_loss(logits, b)
        fused = self.itm_head(self.fused_cls(texts.detach(), masks, videos.detach())).float()
        return matching_rank_loss(fused, b, pair_logits)

    def masked_word_loss(self, video_tokens, mlm_input_ids, attention_mask, mlm_labels,
                         max_masked_words: int | None = None) -> torch.Tensor:
        """MLM through the text layers and the fusion layers (with the video), BERT's head on the masked
        positions (the release scores every one; at 15% masking most of the head's vocabulary projection was
        wasted), the loss over the masked ones (labels != -100)."""
        states = self.text_encoder.text_layers(mlm_input_ids, attention_mask)
        states = self.text_encoder.fusion_layers(states, attention_mask, video_tokens, self._selection())
        states, mlm_labels = masked_word_states(states, mlm_labels, max_masked_words)
        return mlm_loss(self.text_encoder.cls.predictions(states), mlm_labels)

    def forward(self, batch: dict, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """The model contract's training step: video [B, 3, T, H, W], input_ids / attention_mask [B, L], index [B]
        (the record's position in the training list, whose records are merged per video: same index = same video)
        or match_id [B] when the loader gives one (--match_by caption: same caption = positives), mlm_input_ids /
        mlm_labels [B, L] when the loader masks captions -> losses."""
        video_ids = batch.get("match_id", batch["index"]).to(batch["input_ids"].device)
        attention_mask = batch["attention_mask"]
        vis = self.vision(batch["video"])
        video_tokens = self.vision_layernorm(vis.tokens)
        text_states = self.text_encoder.text_layers(batch["input_ids"], attention_mask)
        video_feat, text_feat = self.vision_proj(vis.pooled), self.text_proj(text_states[:, 0])
        loss_itc = itc_loss(video_feat, text_feat, self.current_temperature(), video_ids,
                            None if self.itc_local else gather)
        loss_itm, itm_acc, loss_rank = self.matching_loss(
            video_tokens, text_states, attention_mask, video_feat, text_feat, video_ids,
            negatives_now(self.vtm_negatives, self.vtm_random_epochs, batch))
        terms = dict(itc=loss_itc, itm=loss_itm)
        if loss_rank is not None:
            terms["itm_rank"] = loss_rank
        if self.loss_weights["reverse"] > 0:  # one more vision pass: the same clips played backwards
            terms["reverse"], reverse_acc = reversal_loss(
                text_feat, video_feat, self.vision_proj(self.vision(batch["video"].flip(2)).pooled),
                self.current_temperature())
        if "mlm_input_ids" in batch:  # a retrieval fine-tuning batch has no MLM captions: ITC + ITM, as the release
            terms["mlm"] = self.masked_word_loss(video_tokens, batch["mlm_input_ids"], attention_mask,
                                                 batch["mlm_labels"], batch.get("max_masked_words"))
        out = {"loss": sum(self.loss_weights[k] * v for k, v in terms.items())}
        out.update({f"loss_{k}": v.detach() for k, v in terms.items()})
        out["itm_acc"] = itm_acc.detach()
        if "reverse" in terms:
            out["reverse_acc"] = reverse_acc.detach()
        out["temp"] = self.current_temperature().detach()
        return out

    # -- inference
    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, T, H, W] -> projected pooled video [B, embed_dim] (zero-shot retrieval)."""
        return self.vision_proj(self.vision(video).pooled)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] -> projected text [CLS] after the text-only layers [B, embed_dim]."""
        return self.text_proj(self.text_encoder.text_layers(input_ids, attention_mask)[:, 0])

    def match_video_cache(self, video: torch.Tensor) -> torch.Tensor:
        """The video side of matching, computed once per video in re-ranking: its normalised tokens [B, Lv, D]."""
        return self.vision_layernorm(self.vision(video).tokens)

    def match_logits(self, video: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     video_mask: torch.Tensor | None = None, video_cache: torch.Tensor | None = None) -> torch.Tensor:
        """Fused [CLS] -> itm_head -> fp32 [B, 2] (class 1 = match; the head outside autocast: bf16 logits tie)."""
        tokens = video_cache if video_cache is not None else self.match_video_cache(video)
        states = self.text_encoder.text_layers(input_ids, attention_mask)
        cls = self.fused_cls(states, attention_mask, tokens)
        with torch.autocast(cls.device.type, enabled=False):
            return self.itm_head(cls.float())


class SViTTRetrieval(SViTTPretrain):
    """SViTT for retrieval fine-tuning (the release's `retrieval` model): the pre-training model without the MLM
    head. Its batches mask no words (ITC + ITM only), so the head would get no gradient and DDP, which waits for
    every trainable parameter, would stop at the second step. A pre-training file's head is dropped on loading
    (convert_state_dict names it in the load report)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        del self.text_encoder.cls

    text_masking = None  # the contract: no MLM captions (a pre-training run with this model trains ITC + ITM)


# ------------------------------------------------------------------------------------------------- video QA


class SViTTQA(SViTTTowers):
    """SViTT for video QA (the release's `qa` names, ALBEF's VQA design): the question goes through the text
    tower with cross-attention to the (pruned, vision_layernorm'ed) video tokens in its fusion layers; an answer
    decoder `text_decoder` (BERT layers with causal self-attention and cross-attention to the question states,
    plus BERT's LM head tied to its word embeddings) generates the answer. No projections, matching head,
    temperature nor vision pooler. `decoder_depth` defaults to the number of fusion layers (3 at base), which
    it is initialised from."""

    def __init__(self, decoder_depth: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("vision_proj", "text_proj", "itm_head", "temp"):
            delattr(self, name)
        del self.vision_encoder.pooler
        del self.text_encoder.cls  # the release's QA text encoder has no MLM head
        enc = self.text_encoder.config
        depth = decoder_depth if decoder_depth is not None else enc.depth - enc.fusion_layer
        dec_cfg = SViTTTextConfig(vocab_size=enc.vocab_size, width=enc.width, depth=depth, num_heads=enc.num_heads,
                                  intermediate=enc.intermediate, fusion_layer=0, vision_width=enc.width)
        self.text_decoder = SViTTTextTower(dec_cfg)
        self.text_decoder.apply(init_bert_weights)

    # the modules answer_memory runs (--cache_memory: all frozen)
    question_pass = ("vision_encoder", "vision_layernorm", "text_encoder")

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay: decoder layer i sits at the depth of the fusion layer it starts from."""
        prefix = DECODER_PREFIX + "bert.encoder.layer."
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            fusion = self.text_encoder.config.fusion_layer
            name = f"{TEXT_PREFIX}bert.encoder.layer.{fusion + int(index)}.{rest}"
        return super().layer_id(name)

    # -- passes
    def video_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """The question pass's video-only part, the (pruned) normalised video tokens [B, Lv, D]: evaluation
        computes it once per video and answers all the video's questions from it."""
        return self.vision_layernorm(self.vision(video).tokens)

    def encode_question(self, video: torch.Tensor | None, question_ids: torch.Tensor, question_mask: torch.Tensor,
                        video_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] (or its video_tokens), question [B, Lq] -> question states fused with the video
        [B, Lq, D]."""
        if video_tokens is None:
            video_tokens = self.video_tokens(video)
        states = self.text_encoder.text_layers(question_ids, question_mask)
        return self.text_encoder.fusion_layers(states, question_mask, video_tokens, self._selection())

    def answer_memory(self, video: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the answer decoder reads (the contract's QA training step): the fused question states and their
        mask."""
        return self.encode_question(video, question_ids, question_mask), question_mask

    def decode(self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, question_states: torch.Tensor,
               question_mask: torch.Tensor, fp32_logits: bool = False) -> torch.Tensor:
        """Teacher-forced decoder: answers [N, La] (starting with [CLS]) over their questions' states
        [N, Lq, D], or [Q, Lq, D] when each question's N / Q answers are consecutive rows (its keys and values
        computed once) -> next-token logits [N, La, vocab] (fp32_logits: the LM head outside autocast, for
        ranking)."""
        x = self.text_decoder.bert.embeddings(input_ids=answer_ids)
        self_keys = causal_key_mask(answer_mask)  # bool [N, 1, La, La]: itself, earlier tokens, no padding
        question_keys = key_padding_mask(question_mask)
        for layer in self.text_decoder.bert.encoder.layer:
            x, _ = run_layer(layer, self.text_decoder.grad_checkpointing, x, self_keys, question_states, question_keys)
        return word_logits(self.text_decoder.cls.predictions, x, fp32_logits)

    def forward(self, batch: dict, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """The model contract's training step (datasets.VideoQACollator's batch): video [B, 3, T, H, W],
        question_input_ids / question_mask [B, Lq],
        answer_ids / answer_mask [N, La] ([CLS] answer [SEP], padded), answer_weights [N] (each distinct answer's
        share of its question's annotators), answer_to_question [N] -> loss = sum_n w_n NLL_n / B."""
        return {"loss": qa_training_loss(self, batch)}

    @torch.no_grad()
    def rank_answers(self, video: torch.Tensor | None, question_ids: torch.Tensor, question_mask: torch.Tensor,
                     answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int = 128,
                     video_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-list answering (ALBEF): the decoder's first-token distribution after [CLS] picks each question's
        top k answers of the list answer_ids [A, La], which are re-scored by their full log-likelihood.
        `video_tokens` (video_tokens() of each question's video) stands in for `video`.
        -> (best answer index [Q], scores [Q, A]: log-likelihood, -inf outside the top k)."""
        states = self.encode_question(video, question_ids, question_mask, video_tokens)
        return rank_by_decoder(self, states, question_mask, answer_ids, answer_mask, k)


def init_bert_weights(m: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) for Linear and Embedding weights, zero biases, unit LayerNorms."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight.data[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_weights(m: nn.Module) -> None:
    """BEiT's initialisation: truncated normal 0.02 for Linear/Conv weights, zero biases, unit LayerNorms."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------- registry

TINY = dict(img_size=112, num_frames=8, vision_width=192, vision_depth=4, vision_heads=3, text_width=192,
            text_depth=4, text_heads=3, text_intermediate=768, fusion_layer=2, embed_dim=64, drop_path_rate=0.0)
BASE: dict = {}  # the constructor's defaults are the paper's BEiT-B/16 + BERT-base


def _build(defaults: dict, kwargs: dict, cls: type = None) -> SViTTPretrain:
    """A registered size: `cls` (SViTTPretrain, SViTTRetrieval or SViTTQA; see layers.build_registered)."""
    return build_registered(cls or SViTTPretrain, defaults, kwargs, "--beit_path / --bert_path / --init_ckpt")


@register_model("svitt", retrieval_model="svitt_retrieval_tiny_patch16", qa_model="svitt_qa_tiny_patch16")
def svitt_tiny_patch16(**kwargs) -> SViTTPretrain:
    """CPU-sized SViTT: 4 vision layers of width 192, 4 text layers (fusion from layer 2), 8 frames of 112 px."""
    return _build(TINY, kwargs)


@register_model("svitt", aliases=("svitt_base",), retrieval_model="svitt_retrieval_base_patch16_224",
                qa_model="svitt_qa_base_patch16_224")
def svitt_base_patch16_224(**kwargs) -> SViTTPretrain:
    """The paper's SViTT: BEiT-B/16 over the clip, BERT-base with fusion from layer 9, 4 frames of 224 px."""
    return _build(BASE, kwargs)


@register_model("svitt", qa_model="svitt_qa_tiny_patch16")
def svitt_retrieval_tiny_patch16(**kwargs) -> SViTTRetrieval:
    """svitt_tiny_patch16 for retrieval fine-tuning: no MLM head."""
    return _build(TINY, kwargs, SViTTRetrieval)


@register_model("svitt", aliases=("svitt_retrieval_base",), qa_model="svitt_qa_base_patch16_224")
def svitt_retrieval_base_patch16_224(**kwargs) -> SViTTRetrieval:
    """The release's retrieval model: svitt_base_patch16_224 without the MLM head."""
    return _build(BASE, kwargs, SViTTRetrieval)


@register_model("svitt")
def svitt_qa_tiny_patch16(**kwargs) -> SViTTQA:
    """CPU-sized SViTT QA model: svitt_tiny_patch16's towers and a 2-layer answer decoder (its fusion layers)."""
    return _build(TINY, kwargs, SViTTQA)


@register_model("svitt", aliases=("svitt_qa_base",))
def svitt_qa_base_patch16_224(**kwargs) -> SViTTQA:
    """The release's QA model: SViTT-base towers and a 3-layer answer decoder (the release's `qa` names)."""
    return _build(BASE, kwargs, SViTTQA)


def add_model_args(g: argparse._ArgumentGroup) -> None:
    """SViTT's own flags; unset (None) means the model's default."""
    g.add_argument("--sparse_local_attn", type=int, default=None, help="edge sparsity: odd width of each query "
                   "block's local window of key blocks (default: 1 when --sparse_random_attn is set, else 0 = dense)")
    g.add_argument("--sparse_random_attn", type=int, default=None, help="edge sparsity: random key blocks per query "
                   "block (paper: 3; default 0: dense attention unless --sparse_local_attn is set)")
    g.add_argument("--attn_block_size", type=int, default=None, help="tokens per attention block (default 56)")
    g.add_argument("--token_keep_rate", type=float, default=None, help="node sparsity: share of video tokens kept "
                   "after each --token_drop_loc layer (paper: 0.7 at 4 frames, 0.6 at 8; default 1 = keep all)")
    g.add_argument("--token_drop_loc", type=int, nargs="+", default=None,
                   help="vision layers after which tokens are pruned (paper: 3 6 9)")
    g.add_argument("--token_keep_strategy", default=None, choices=["cls_attn", "random"],
                   help="which video tokens survive: most [CLS] attention (default) or random")
    g.add_argument("--fusion_layer", type=int, default=None, help="first text layer with cross-attention to the "
                   "video (default 9 base, 2 tiny)")
    g.add_argument("--fusion_keep_rate", type=float, default=None, help="text-guided selection: share of video "
                   "tokens kept after each --fusion_drop_loc layer (default 1 = off)")
    g.add_argument("--fusion_drop_loc", type=int, nargs="+", default=None,
                   help="text layers (fusion layers) after whose cross-attention video tokens are selected")
    g.add_argument("--fusion_keep_strategy", default=None, choices=list(FusionTokenSelection.STRATEGIES),
                   help="selection by the text [CLS]'s attention (default), every text token's mean, or random")
    g.add_argument("--release_sparse_padding", action="store_true", default=None,
                   help="let zero-padded keys of the last block into the softmax, as the release does (its "
                   "checkpoints are tuned to it)")
    g.add_argument("--itc_local", action="store_true", default=None,
                   help="contrastive negatives from this process's batch only (the release), not the global batch")
    g.add_argument("--eval_seed", type=int, default=None, help="seed of the random attention blocks at evaluation "
                   "(fixed, so a test number does not change between runs; default 0)")
    g.add_argument("--temporal_expand_mode", default=None, choices=list(EXPAND_MODES), help="how the relative "
                   "position tables of a checkpoint with another frame count are resized on loading: release "
                   "(nearest neighbour as the release, default) or symmetric (offset 0 from offset 0, +-dt mirrored)")
    for term in ("itc", "itm"):
        g.add_argument(f"--w_{term}", type=float, default=None, help=f"weight of the {term} loss (default 1)")


register_family(ModelFamily(name="svitt", add_args=add_model_args, convert_state_dict=convert_state_dict,
                            recognise=recognise_release))
