"""SViTT (sparse video-text transformer, Li et al., CVPR 2023): the second model family.

Sections: the vision tower and its two sparsities; the BERT text tower whose layers from `fusion_layer` on
cross-attend to the video (text-guided token selection there); the losses (ITC with several captions per video,
ITM negatives never of the same video); the pre-training model on the model contract (model_registry.py);
checkpoint conversion (the release's files, Hugging Face BEiT / BERT, temporal expansion); registration.

A BEiT-B/16 runs jointly over the whole clip: every frame is patch-embedded on its own, the clip becomes one
sequence [CLS] + T*h*w patch tokens (frame-major), each layer adds a learned 3-D relative position bias.
Edge sparsity: patch tokens attend block-sparsely (a local window of blocks plus random blocks), [CLS] attends to
and is attended by every token. The random blocks are drawn once per forward and token count (shared by the batch,
the heads and the layers between two pruning layers; the release redraws them on every forward), so the gather
indices of a pattern are built once and reused by those layers. Node sparsity: after the layers in
`token_drop_loc` only the patch tokens with the most [CLS] attention survive; each keeps its original (t, h, w) so
the relative bias stays right.

Parameter names follow the release's Hugging Face BEiT names: a release state dict's `vision_encoder.*` keys map
onto this module's by dropping that prefix (`relative_position_index` buffers excepted: we rebuild them).
Shapes: B batch, H heads, N patch tokens (after pruning: the kept ones), L = 1 + N, D width, d head width,
nb blocks, K key blocks per query block, bs block size.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch.utils.checkpoint import checkpoint

from answer_ranking import rank_by_decoder, weighted_answer_loss, word_logits
from model_registry import ModelFamily, layer_id_from_name, register_family, register_model
from modeling_simvtp import (NEGATIVE_MODES, build_text_embeddings, causal_key_mask, matching_negatives,
                             mlm_loss, negatives_now)

CLS_TO_PATCH, PATCH_TO_CLS, CLS_TO_CLS = -3, -2, -1  # the table's last three rows, counted from its end
MLP_CHUNK_ROWS = 1024  # tokens per MLP call on CPU: a 1024 x 3072 fp32 hidden activation is 12 MiB
SPARSE_CHUNK_BYTES = 8 << 20  # on CPU, block-sparse attention gathers this many bytes of keys per sample at once


def run_layer(layer: nn.Module, recompute: bool, *args, **kwargs):
    """layer(*args, **kwargs); with `recompute` (gradient checkpointing) and gradients on, its activations are
    not kept but recomputed in the backward pass, under the forward's RNG state (drop path draws the same)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


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


def svitt_tiny_config(**overrides) -> SViTTVisionConfig:
    """Tiny tower for tests: width 192, 4 layers, 3 heads, 8 frames of 112 px (7x7 patches)."""
    return SViTTVisionConfig(**{**dict(image_size=112, num_frames=8, width=192, depth=4, num_heads=3), **overrides})


def svitt_base_config(**overrides) -> SViTTVisionConfig:
    """The release's BEiT-B/16 tower: width 768, 12 layers, 12 heads, 224 px."""
    return SViTTVisionConfig(**overrides)


# ------------------------------------------------------------------------------------- relative position bias


def patch_coordinates(num_frames: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(t, h, w) of every patch token in frame-major order: [T*h*w, 3] int64."""
    t, h, w = torch.meshgrid(torch.arange(num_frames), torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


def relative_table_rows(num_frames: int, grid_h: int, grid_w: int) -> int:
    """Row count of a layer's bias table: every (dt, dh, dw) offset plus the three [CLS] rows."""
    return (2 * num_frames - 1) * (2 * grid_h - 1) * (2 * grid_w - 1) + 3


class RelativePositionBias3D(nn.Module):
    """One learned bias per head for every (query - key) offset in (t, h, w), plus three rows for [CLS]."""

    def __init__(self, grid: tuple[int, int, int], num_heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros(relative_table_rows(*grid), num_heads))

    def patch_rows(self, q_coords: torch.Tensor, k_coords: torch.Tensor) -> torch.Tensor:
        """Table rows for query/key coordinate sets [..., Nq, 3] x [..., Nk, 3] -> [..., Nq, Nk]:
        (dt+T-1)*(2h-1)*(2w-1) + (dh+h-1)*(2w-1) + (dw+w-1) is linear in the coordinates, so it is
        code(query) - code(key) + code(T-1, h-1, w-1) with code(t, h, w) = t*(2h-1)*(2w-1) + h*(2w-1) + w.
        The weights are Python ints: nothing is made on the host (no copy to the device, no sync)."""
        T, h, w = self.grid
        centre = ((T - 1) * (2 * h - 1) + h - 1) * (2 * w - 1) + w - 1

        def code(c: torch.Tensor) -> torch.Tensor:
            return c[..., 0] * ((2 * h - 1) * (2 * w - 1)) + c[..., 1] * (2 * w - 1) + c[..., 2]
        return code(q_coords).unsqueeze(-1) - code(k_coords).unsqueeze(-2) + centre

    def cls_row(self, which: int) -> int:
        return self.relative_position_bias_table.shape[0] + which

    def full_rows(self, coords: torch.Tensor) -> torch.Tensor:
        """Rows for the whole sequence [CLS] + patches with coordinates [B, N, 3] -> [B, L, L]."""
        rows = F.pad(self.patch_rows(coords, coords), (1, 0, 1, 0), value=self.cls_row(CLS_TO_CLS))
        rows[:, 0, 1:] = self.cls_row(CLS_TO_PATCH)
        rows[:, 1:, 0] = self.cls_row(PATCH_TO_CLS)
        return rows

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Bias for table rows [B, *rest] -> [B, H, *rest]."""
        bias = self.relative_position_bias_table[rows]
        return bias.movedim(-1, 1)


def relative_bias(table: torch.Tensor, rows: torch.Tensor, batch: int, dtype: torch.dtype, width: int
                  ) -> torch.Tensor:
    """Additive attention bias [batch*M, H, Lq, width] in `dtype` from a layer's table [R, H] at `rows`
    [b, M, Lq, Lk] (int32, b = batch or 1; row R, one past the table, means "not allowed": -inf; Lk >= width is
    a multiple of 8 so that the mask's strides suit CUDA's memory-efficient kernel without a padded copy).
    Gathered from the fp32 table and cast afterwards: the gather's backward then sums each row's gradient in fp32
    (a table cast first would sum them in bf16 under autocast). A per-head table row is `table.t()`'s column, so
    the index needs no head dimension."""
    columns = F.pad(table.t(), (0, 1), value=float("-inf"))  # [H, R + 1]
    bias = columns.index_select(1, rows.flatten()).view(table.shape[1], *rows.shape).movedim(0, 2)
    bias = bias.expand(batch, *bias.shape[1:]).to(dtype)  # [batch, M, H, Lq, Lk]: a view unless broadcast
    return bias.flatten(0, 1)[..., :width]


def round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def pad_tokens(x: torch.Tensor, extra: int) -> torch.Tensor:
    """x [B, L, D] with `extra` zero tokens appended (x itself when there are none: no copy)."""
    return F.pad(x, (0, 0, 0, extra)) if extra else x


# ------------------------------------------------------------------------------------- block-sparse pattern


@dataclass
class BlockPattern:
    """Which key blocks each query block sees: key_blocks [nb, K] (clamped indices), valid [nb, K]."""
    key_blocks: torch.Tensor
    valid: torch.Tensor
    block_size: int
    layout: tuple | None = field(default=None, repr=False, compare=False)  # sparse_layout's cache
    copies: dict = field(default_factory=dict, repr=False, compare=False)  # per device: (key_blocks, valid)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_blocks, valid) on `device`, copied once per device. The pattern is drawn on the CPU (from a CPU
        generator, for reproducible evaluation); to CUDA it goes from pinned memory without blocking the host."""
        if device.type == "cpu":
            return self.key_blocks, self.valid
        if device not in self.copies:
            pinned = device.type == "cuda"
            self.copies[device] = tuple((t.pin_memory() if pinned else t).to(device, non_blocking=pinned)
                                        for t in (self.key_blocks, self.valid))
        return self.copies[device]


def sample_block_pattern(num_blocks: int, local: int, num_random: int, block_size: int,
                         generator: torch.Generator | None = None) -> BlockPattern:
    """A local window of `local` blocks centred on each query block plus `num_random` distinct random blocks from
    outside the window (fewer when too few exist). Drawn on the CPU from `generator` (global RNG when None)."""
    half = local // 2
    blocks = torch.arange(num_blocks)
    local_idx = blocks[:, None] + torch.arange(-half, half + 1)[None]
    local_valid = (local_idx >= 0) & (local_idx < num_blocks)
    key_blocks, valid = [local_idx], [local_valid]
    take = min(num_random, num_blocks)
    if take > 0:
        in_window = (blocks[None] - blocks[:, None]).abs() <= half
        scores = torch.rand(num_blocks, num_blocks, generator=generator).masked_fill(in_window, 2.0)
        chosen = scores.argsort(dim=1)[:, :take]
        key_blocks.append(chosen)
        valid.append(~torch.gather(in_window, 1, chosen))
    return BlockPattern(torch.cat(key_blocks, 1).clamp(0, num_blocks - 1), torch.cat(valid, 1), block_size)


def pattern_to_dense_mask(pattern: BlockPattern, num_patches: int) -> torch.Tensor:
    """The boolean [L, L] mask a block pattern stands for: [CLS] row and column all True (reference for tests)."""
    bs = pattern.block_size
    block_of = torch.arange(num_patches) // bs
    allowed = torch.zeros(pattern.key_blocks.shape[0], pattern.key_blocks.shape[0], dtype=torch.bool)
    rows = torch.arange(pattern.key_blocks.shape[0])[:, None].expand_as(pattern.key_blocks)
    allowed[rows[pattern.valid], pattern.key_blocks[pattern.valid]] = True
    patch_mask = allowed[block_of[:, None], block_of[None, :]]
    return F.pad(patch_mask, (1, 0, 1, 0), value=True)


# ------------------------------------------------------------------------------------------------- attention


class SViTTSelfAttention(nn.Module):
    """Multi-head attention with the 3-D relative bias; key without bias (BEiT). Dense or block-sparse."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim)
        self.relative_position_bias = RelativePositionBias3D(grid, num_heads)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, pattern: BlockPattern | None = None,
                mask: torch.Tensor | None = None, release_padding: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, D], coords [B, N, 3] -> (context [B, L, D], head-mean [CLS] attention on patches [B, N]).
        Dense when `pattern` is None (`mask` [B or 1, L, L] bool optionally restricts the patch queries; [CLS]
        always attends to every token)."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if pattern is None:
            return self.dense(q, k, v, coords, mask)
        return self.block_sparse(q, k, v, coords, pattern, release_padding)

    # The relative position bias is an additive float mask in every SDPA call below (BEiT has no attention without
    # it), so on CUDA neither call can take the flash kernel (it takes no mask). Both can take the memory-efficient
    # kernel (float masks, and their gradient, supported; fp32 and fp16 from sm50, bf16 from sm80; head width a
    # multiple of 8); cuDNN's only when the mask needs no gradient (evaluation), in fp16/bf16 on sm80+; else math.

    def dense(self, q, k, v, coords, mask):
        """Every patch query against every key in one SDPA call, the bias as its mask ([B or 1, H, N, L], the
        table gathered at int32 rows); [CLS]'s row separately (its attention is returned for pruning)."""
        B, L, D = q.shape
        rpb = self.relative_position_bias
        cls_ctx, cls_attn = self.cls_row(q, k, v)
        coords = coords[:1] if coords.stride(0) == 0 else coords  # unpruned: one bias broadcast over the batch
        rows = F.pad(rpb.patch_rows(coords, coords), (1, 0), value=rpb.cls_row(PATCH_TO_CLS))  # [B or 1, N, L]
        if mask is not None:
            rows = rows.masked_fill(~mask[:, 1:], rpb.relative_position_bias_table.shape[0])
        rows = F.pad(rows, (0, round_up(L) - L), value=rpb.relative_position_bias_table.shape[0]).to(torch.int32)
        bias = relative_bias(rpb.relative_position_bias_table, rows[:, None], rows.shape[0], q.dtype, L)
        ctx = F.scaled_dot_product_attention(self.heads(q[:, 1:]), self.heads(k), self.heads(v), attn_mask=bias,
                                             scale=self.scale)
        return torch.cat([cls_ctx[:, None].to(ctx.dtype), ctx.transpose(1, 2).flatten(2)], dim=1), cls_attn

    def cls_row(self, q, k, v):
        """[CLS] attends to every token: q, k, v [B, L, D] (unpadded) -> its context [B, D] and its head-mean
        attention on the patches [B, N]. A per-head dot product (einsum) and one bmm: no head-major copies of k, v."""
        B, L, D = k.shape
        H = self.num_heads
        table = self.relative_position_bias.relative_position_bias_table
        cls_bias = torch.stack([table[CLS_TO_CLS], table[CLS_TO_PATCH]])  # [2, H]: key [CLS], key patch
        q0 = (q[:, 0] * self.scale).view(B, H, -1)
        logits = torch.einsum("blhd,bhd->blh", k.view(B, L, H, -1), q0)
        logits = torch.cat([logits[:, :1] + cls_bias[0], logits[:, 1:] + cls_bias[1]], dim=1)
        probs = logits.softmax(dim=1)  # [B, L, H]
        ctx = torch.bmm(probs.transpose(1, 2).to(v.dtype), v)  # [B, H, D]: head h's own slice is its context
        ctx = ctx.view(B, H, H, -1).diagonal(dim1=1, dim2=2).transpose(1, 2).reshape(B, D)
        return ctx, probs[:, 1:].mean(dim=2)

    def block_sparse(self, q, k, v, coords, pattern: BlockPattern, release_padding: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch queries block by block, the batch folded into the block dimension: each block's keys are [CLS] +
        its K key blocks, gathered for every sample at once (one index_select with per-sample offsets) into a
        [B*c, H, 1 + K*bs, d] layout for c query blocks, then one scaled_dot_product_attention call over
        (sample x block, head) with the bias as additive mask. The kernel count does not grow with B: on CUDA one
        chunk holds every block; on CPU chunks keep the gathered keys under SPARSE_CHUNK_BYTES per sample (small
        temporaries the allocator reuses). The gather indices come from `sparse_layout` (cached)."""
        B, L, D = q.shape
        H, n, bs = self.num_heads, L - 1, pattern.block_size
        nb = pattern.key_blocks.shape[0]
        cls_ctx, cls_attn = self.cls_row(q, k, v)
        key_tokens, rows = sparse_layout(pattern, coords, self.relative_position_bias, release_padding)
        S, d, padded = key_tokens.shape[1], D // H, 1 + nb * bs
        # the last block's missing queries and keys: zero rows (masked keys unless release_padding)
        queries = pad_tokens(q[:, 1:], padded - L).view(B, nb, bs, H, d)
        k, v = (pad_tokens(t, padded - L).reshape(B * padded, D) for t in (k, v))
        sample_start = torch.arange(0, B * padded, padded, device=q.device).view(B, 1, 1)
        table = self.relative_position_bias.relative_position_bias_table
        chunk = nb if q.device.type != "cpu" else max(1, SPARSE_CHUNK_BYTES // (S * D * q.element_size()))
        parts = []
        for j0 in range(0, nb, chunk):
            j1 = min(nb, j0 + chunk)
            tokens = (key_tokens[j0:j1] + sample_start).flatten()  # [B*c*S]: every sample's own keys
            qb = queries[:, j0:j1].flatten(0, 1).transpose(1, 2)  # [B*c, H, bs, d]
            kb, vb = (t.index_select(0, tokens).view(-1, S, H, d).transpose(1, 2) for t in (k, v))
            bias = relative_bias(table, rows[:, j0:j1], B, q.dtype, S)  # [B*c, H, bs, S]
            # blocks and heads as the two leading dims: 4-D, as every fused kernel wants (5-D is a slow path)
            ctx = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=self.scale)
            parts.append(ctx.transpose(1, 2).reshape(B, -1, D))
        ctx = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return torch.cat([cls_ctx[:, None].to(ctx.dtype), ctx[:, :n]], dim=1), cls_attn


def sparse_layout(pattern: BlockPattern, coords: torch.Tensor, rpb: RelativePositionBias3D,
                  release_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices of a block pattern over one coordinate set, cached on the pattern (every layer that uses the
    pattern with the same `coords` tensor reuses them; only the per-layer bias table differs), built on coords'
    device from host-side shapes:
    key_tokens [nb, 1 + K*bs]: positions of [CLS] + each query block's key blocks in one sample's padded sequence;
    rows [B or 1, nb, bs, S8] int32: each (query, key) pair's row in a layer's table (S8: 1 + K*bs rounded up to a
    multiple of 8), or R (one past the table: -inf) where the key is not allowed: invalid block, the columns past
    1 + K*bs, padding unless release_padding. With release_padding a padding key gets the release's row: it pads
    the keys' token indices with 0, i.e. [CLS]'s, so a padding key takes the patch->[CLS] row, wherever the
    padded block appears (local or random)."""
    cached = pattern.layout
    if cached is not None and cached[0] is coords and cached[1] == release_padding:
        return cached[2], cached[3]
    bs, device = pattern.block_size, coords.device
    nb, K = pattern.key_blocks.shape
    n = coords.shape[1]
    key_blocks, valid = pattern.on(device)
    key_pos = (key_blocks[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)  # [nb, K*bs] patch positions
    key_tokens = F.pad(1 + key_pos, (1, 0), value=0)  # [CLS] + keys, sequence positions
    shared = coords.stride(0) == 0  # unpruned: one coordinate set for the whole batch, one bias broadcast over it
    cp = F.pad(coords[:1] if shared else coords, (0, 0, 0, nb * bs - n)).unflatten(1, (nb, bs))  # [B or 1, nb, bs, 3]
    rows = rpb.patch_rows(cp, cp[:, key_blocks].flatten(2, 3))  # [B or 1, nb, bs, K*bs]
    not_allowed = rpb.relative_position_bias_table.shape[0]
    rows = rows.masked_fill((key_pos >= n)[None, :, None], rpb.cls_row(PATCH_TO_CLS) if release_padding
                            else not_allowed)
    rows = rows.masked_fill(~valid.repeat_interleave(bs, dim=1)[None, :, None], not_allowed)
    rows = F.pad(rows, (1, 0), value=rpb.cls_row(PATCH_TO_CLS))
    rows = F.pad(rows, (0, round_up(rows.shape[-1]) - rows.shape[-1]), value=not_allowed).to(torch.int32)
    pattern.layout = (coords, release_padding, key_tokens, rows)
    return key_tokens, rows


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


def keep_count(num_tokens: int, rate: float) -> int:
    return max(1, math.ceil(rate * num_tokens - 1e-9))


def random_scores(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform scores for random token selection: drawn on `device` in training (generator None: no host-side draw
    and copy in the step); from evaluation's seeded CPU generator, then copied, so a test number never changes."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator).to(device)


def select_patch_tokens(x: torch.Tensor, coords: torch.Tensor, scores: torch.Tensor, rate: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep [CLS] and the ceil(rate*N) highest-scoring patch tokens in their original order."""
    keep = scores.topk(keep_count(scores.shape[1], rate), dim=1).indices.sort(dim=1).values
    patches = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    kept_coords = torch.gather(coords, 1, keep[..., None].expand(-1, -1, 3))
    return torch.cat([x[:, :1], patches], dim=1), kept_coords, keep


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


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, L] (1 = token) -> bool [B, 1, 1, L]: True on the keys that may be attended to."""
    return (attention_mask != 0)[:, None, None]


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

# ------------------------------------------------------------------------------------------------- losses


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


# ------------------------------------------------------------------------------------------------- the model


class SViTTPretrain(nn.Module):
    """SViTT pre-training model (the release's names): vision tower, text tower with fusion layers, projections,
    matching head, temperature. Losses ITC + ITM (hard negatives) + MLM, weights `w_itc`, `w_itm`, `w_mlm`."""

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
                 vtm_random_epochs: int = 0,
                 temporal_expand_mode: str = "release") -> None:
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
        self.loss_weights = dict(itc=w_itc, itm=w_itm, mlm=w_mlm)
        if temporal_expand_mode not in EXPAND_MODES:
            raise ValueError(f"temporal_expand_mode must be one of {EXPAND_MODES}, got {temporal_expand_mode!r}")
        self.itc_local, self.vtm_negatives, self.eval_seed = itc_local, vtm_negatives, eval_seed
        self.vtm_random_epochs = vtm_random_epochs
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

    def current_temperature(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)

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

    def matching_loss(self, video_tokens, text_states, attention_mask, video_feat, text_feat, video_ids,
                      negatives: str | None = None):
        """ITM over 3B pairs: positives, a negative video per caption, a negative caption per video; negatives by
        similarity (or uniformly) among other videos of the local batch. Returns (loss, accuracy)."""
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
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()

    def masked_word_loss(self, video_tokens, mlm_input_ids, attention_mask, mlm_labels) -> torch.Tensor:
        """MLM through the text layers and the fusion layers (with the video), BERT's head on every position (as
        the release: a static shape), the loss over the masked ones (labels != -100)."""
        states = self.text_encoder.text_layers(mlm_input_ids, attention_mask)
        states = self.text_encoder.fusion_layers(states, attention_mask, video_tokens, self._selection())
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
        loss_itm, itm_acc = self.matching_loss(video_tokens, text_states, attention_mask, video_feat, text_feat,
                                               video_ids,
                                               negatives_now(self.vtm_negatives, self.vtm_random_epochs, batch))
        terms = dict(itc=loss_itc, itm=loss_itm)
        if "mlm_input_ids" in batch:  # a retrieval fine-tuning batch has no MLM captions: ITC + ITM, as the release
            terms["mlm"] = self.masked_word_loss(video_tokens, batch["mlm_input_ids"], attention_mask,
                                                 batch["mlm_labels"])
        out = {"loss": sum(self.loss_weights[k] * v for k, v in terms.items())}
        out.update({f"loss_{k}": v.detach() for k, v in terms.items()})
        out["itm_acc"] = itm_acc.detach()
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


def decoder_from_fusion_layers(state_dict: dict, fusion_layer: int, decoder_depth: int) -> dict:
    """ALBEF/Singularity's initialisation of the answer decoder from a pre-trained text tower (names with
    `text_encoder.bert.`): fusion layers fusion_layer + i -> `text_decoder.bert.encoder.layer.i`, the embeddings
    and the MLM head copied to `text_decoder.*`. Entries the state dict already has under text_decoder stay."""
    src_layer = TEXT_PREFIX + "bert.encoder.layer."
    out = dict(state_dict)
    for k, v in state_dict.items():
        new = None
        if k.startswith(src_layer):
            index, rest = k[len(src_layer):].split(".", 1)
            if 0 <= int(index) - fusion_layer < decoder_depth:
                new = f"{DECODER_PREFIX}bert.encoder.layer.{int(index) - fusion_layer}.{rest}"
        elif k.startswith((TEXT_PREFIX + "bert.embeddings.", TEXT_PREFIX + "cls.")):
            new = DECODER_PREFIX + k[len(TEXT_PREFIX):]
        if new is not None:
            out.setdefault(new, v)
    return out


class SViTTQA(SViTTPretrain):
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
        states = self.encode_question(batch["video"], batch["question_input_ids"], batch["question_mask"])
        loss = weighted_answer_loss(self, states, batch["question_mask"], batch)
        return {"loss": loss}

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

    # -- the retrieval half of the model contract does not apply
    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError("SViTTQA has no retrieval projections: use a svitt_* retrieval model")

    encode_text = match_video_cache = match_logits = encode_video




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


# ------------------------------------------------------------------------------------- checkpoint conversion
#
# Sources `convert_state_dict` recognises by their tensor names (see detect_source):
#   svitt_pretrain   the release's pre-training model: text_encoder.bert.*, MLM head text_encoder.cls.*
#   svitt_retrieval  the release's retrieval model: text_encoder.* without "bert.", no MLM head
#   svitt_qa         the release's QA model: adds text_decoder.*
#   svitt_vision     vision_encoder.* only (a release file's vision tower kept on its own)
#   beit             a Hugging Face BEiT (beit.*), or the same names without the prefix (e.g. our bare tower's)
#   bert             a Hugging Face BERT (bert.*, cls.*), or embeddings.* / encoder.* without the prefix
# Everything is mapped onto the names of the model being loaded, read from its own state_dict (with or without
# "bert." in its text names, with or without "vision_encoder."), and the relative position tables are resized to
# its frame count (temporal expansion).

RELEASE_VISION_PREFIX = "vision_encoder."
TEXT_PREFIX = "text_encoder."
DECODER_PREFIX = "text_decoder."
TABLE_SUFFIX = "relative_position_bias.relative_position_bias_table"
REBUILT_BUFFERS = ("relative_position_index", "embeddings.position_ids")  # saved by the release, rebuilt by us
EXPAND_MODES = ("release", "symmetric")
# source kind -> registered model of that file
RELEASE_MODELS = {"svitt_pretrain": "svitt_base_patch16_224", "svitt_qa": "svitt_qa_base_patch16_224",
                  "svitt_retrieval": "svitt_retrieval_base_patch16_224"}
MLM_HEAD_PREFIX = TEXT_PREFIX + "cls."


def release_vision_state_dict(state_dict: dict) -> dict:
    """The tower's tensors out of a release state dict: `vision_encoder.` dropped, rebuilt index buffers skipped."""
    return {k[len(RELEASE_VISION_PREFIX):]: v for k, v in state_dict.items()
            if k.startswith(RELEASE_VISION_PREFIX) and not k.endswith("relative_position_index")}


def table_frames(rows: int, grid_hw: tuple[int, int]) -> int:
    """Frame count T of a bias table with `rows` = (2T-1)*(2h-1)*(2w-1) + 3 rows at an h x w patch grid."""
    h, w = grid_hw
    spatial = (2 * h - 1) * (2 * w - 1)
    slices, rest = divmod(rows - 3, spatial)
    if rows <= 3 or rest or slices % 2 == 0:
        raise ValueError(f"a relative position table of {rows} rows fits no frame count at a {h}x{w} patch grid "
                         f"(rows = (2T-1)*{spatial} + 3); was it trained at another image size?")
    return (slices + 1) // 2


def temporal_source_slices(src_frames: int, dst_frames: int, expand_mode: str = "release") -> list[int]:
    """For each of the 2*dst-1 temporal offsets of the new table, the source slice it copies.

    release: nearest neighbour as the release resizes, slice i <- floor(i*(2*src-1)/(2*dst-1)) (4 -> 8:
    0,0,0,1,1,2,2,3,3,4,4,5,5,6,6: not symmetric, offset -1 takes source offset -1 but +1 takes 0).
    symmetric: offset dt <- the source offset nearest dt*(src-1)/(dst-1) (halves away from 0), so offset 0 <- 0
    and dt, -dt take mirrored slices."""
    n_src, n_dst = 2 * src_frames - 1, 2 * dst_frames - 1
    if expand_mode == "release":
        return [i * n_src // n_dst for i in range(n_dst)]
    if expand_mode == "symmetric":
        ratio = (src_frames - 1) / (dst_frames - 1) if dst_frames > 1 else 0.0
        offsets = [(i - (dst_frames - 1)) * ratio for i in range(n_dst)]
        return [src_frames - 1 + int(math.copysign(math.floor(abs(o) + 0.5), o)) for o in offsets]
    raise ValueError(f"expand_mode must be one of {EXPAND_MODES}, got {expand_mode!r}")


def resize_relative_table(table: torch.Tensor, src_frames: int, dst_frames: int, grid_hw: tuple[int, int],
                          expand_mode: str = "release") -> torch.Tensor:
    """[(2*src-1)*S + 3, H] -> [(2*dst-1)*S + 3, H]: temporal slices of S = (2h-1)(2w-1) rows picked by
    temporal_source_slices, the three [CLS] rows copied."""
    expected = relative_table_rows(src_frames, *grid_hw)
    if table.shape[0] != expected:
        raise ValueError(f"table of {table.shape[0]} rows, expected {expected} for {src_frames} frames at "
                         f"{grid_hw[0]}x{grid_hw[1]} patches")
    slices = table[:-3].unflatten(0, (2 * src_frames - 1, -1))
    index = torch.tensor(temporal_source_slices(src_frames, dst_frames, expand_mode), device=table.device)
    return torch.cat([slices[index].flatten(0, 1), table[-3:]])


def resize_relative_tables(state_dict: dict, src_frames: int, dst_frames: int, grid: tuple[int, ...],
                           expand_mode: str = "release") -> dict:
    """Every `...relative_position_bias_table` of a state dict resized from src to dst frames (temporal
    expansion); `grid` is (h, w) or (T, h, w) of patches (only h, w are used). Other tensors pass unchanged."""
    grid_hw = tuple(grid[-2:])
    return {k: resize_relative_table(v, src_frames, dst_frames, grid_hw, expand_mode)
            if k.endswith(TABLE_SUFFIX) else v for k, v in state_dict.items()}


def state_dict_frames(state_dict: dict, grid: tuple[int, ...]) -> int | None:
    """The frame count the state dict's bias tables were trained at (None without tables); tables of different
    frame counts are a ValueError."""
    found = {}
    for k, v in state_dict.items():
        if k.endswith(TABLE_SUFFIX):
            try:
                found[k] = table_frames(v.shape[0], tuple(grid[-2:]))
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
    if len(set(found.values())) > 1:
        raise ValueError(f"relative position tables of different frame counts: {sorted(set(found.values()))}")
    return next(iter(found.values()), None)


def config_frames(file_config: dict | None) -> int | None:
    """config.video_input.num_frames of a release file (read as plain data by checkpoint.read_checkpoint_file)."""
    video_input = (file_config or {}).get("video_input")
    frames = video_input.get("num_frames") if isinstance(video_input, dict) else None
    return int(frames) if isinstance(frames, (int, float, str)) and str(frames).isdigit() else None


def detect_source(keys: list[str]) -> str:
    """svitt_pretrain | svitt_retrieval | svitt_qa | svitt_vision | beit | bert, from a checkpoint's tensor names."""
    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)
    if has("text_decoder."):
        return "svitt_qa"
    if has("text_encoder.bert."):
        return "svitt_pretrain"
    if has(TEXT_PREFIX):
        return "svitt_retrieval"
    if has(RELEASE_VISION_PREFIX):
        return "svitt_vision"
    if has("bert.", "cls.predictions.", "embeddings.word_embeddings.", "encoder.layer.0.attention.self."):
        return "bert"
    if has("beit.", "embeddings.patch_embeddings.", "embeddings.cls_token", "layers.0.attention.q_proj."):
        return "beit"
    raise ValueError(f"unrecognised checkpoint ({len(keys)} tensors, first {keys[:5]}): expected a SViTT release "
                     "(pretrain, retrieval, qa), Hugging Face BEiT or BERT checkpoint")


def recognise_release(keys: list[str]) -> str | None:
    """A file without model_cfg: the registered model its keys identify (the release's pre-training, retrieval or
    QA model)."""
    try:
        return RELEASE_MODELS.get(detect_source(keys))
    except ValueError:
        return None


BEIT_TOWER_PARTS = ("embeddings.cls_token", "embeddings.patch_embeddings.", "encoder.layer.", "pooler.")


# transformers >= 5 names a BEiT's modules differently in memory (its files keep the names above): -> file names
BEIT_MEMORY_NAMES = ((r"^layers\.(\d+)\.relative_position_bias\.",
                      r"encoder.layer.\1.attention.attention.relative_position_bias."),
                     (r"^layers\.(\d+)\.attention\.([qkv])_proj\.", r"encoder.layer.\1.attention.attention.\2_proj."),
                     (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
                     (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
                     (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
                     (r"^layers\.", "encoder.layer."), (r"^shared_position_bias\.", "encoder.relative_position_bias."),
                     (r"\.q_proj\.", ".query."), (r"\.k_proj\.", ".key."), (r"\.v_proj\.", ".value."))


def beit_file_name(name: str) -> str:
    """A BEiT name without `beit.`, as its files spell it ('layers.0.mlp.fc1.weight' ->
    'encoder.layer.0.intermediate.dense.weight'); file names pass unchanged."""
    if not name.startswith(("layers.", "shared_position_bias.")):
        return name
    for pattern, repl in BEIT_MEMORY_NAMES:
        name = re.sub(pattern, repl, name)
    return name


def map_beit(state_dict: dict) -> dict:
    """Hugging Face BEiT names (with or without `beit.`; file or transformers-5 module names) ->
    `vision_encoder.*`. A shared table (`encoder.relative_position_bias.*`, pre-training-only checkpoints) is
    copied to every layer; heads, mask token and final layernorm keep their names (reported unused). Tables
    stay 2-D sized (T = 1) here."""
    out, shared, layers = {}, None, set()
    for k, v in state_dict.items():
        name = beit_file_name(k[len("beit."):] if k.startswith("beit.") else k)
        if name == "encoder.relative_position_bias.relative_position_bias_table":
            shared = v
        elif name.startswith("encoder.relative_position_bias."):
            continue  # the shared index buffer: rebuilt
        elif name.startswith(BEIT_TOWER_PARTS):
            out[RELEASE_VISION_PREFIX + name] = v
            if name.startswith("encoder.layer."):
                layers.add(int(name.split(".")[2]))
        else:
            out[k] = v
    for i in sorted(layers) if shared is not None else ():
        out.setdefault(f"{RELEASE_VISION_PREFIX}encoder.layer.{i}.attention.attention.{TABLE_SUFFIX}", shared)
    return out


def _bert_name(key: str) -> str | None:
    """'bert.encoder.layer.0.output.LayerNorm.gamma' -> 'text_encoder.bert.encoder.layer.0.output.LayerNorm.weight';
    None for BERT parts SViTT has no place for (pooler, next-sentence head)."""
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
    name = key[len("bert."):] if key.startswith("bert.") else key
    if name.startswith(("embeddings.", "encoder.")):
        return TEXT_PREFIX + "bert." + name
    if key.startswith("cls.predictions."):
        return TEXT_PREFIX + key
    return None


def map_bert(state_dict: dict) -> dict:
    """Hugging Face BERT (BertForMaskedLM / BertModel, old gamma/beta names too) -> `text_encoder.bert.*` and
    `text_encoder.cls.*`; pooler and next-sentence head keep their names (reported unused). Cross-attention has
    no source: it stays randomly initialised (missing in a non-strict load), as ALBEF does."""
    return {_bert_name(k) or k: v for k, v in state_dict.items()}


def to_target_names(state_dict: dict, target_keys: set[str]) -> dict:
    """Release-style names -> the target model's: `text_encoder.` with or without `bert.` as the model has it,
    and no `vision_encoder.` for a bare vision tower."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in target_keys)
    text_bert = has(TEXT_PREFIX + "bert.")
    text_plain = has(TEXT_PREFIX) and not text_bert
    bare_tower = not has(RELEASE_VISION_PREFIX) and "embeddings.cls_token" in target_keys
    out = {}
    for k, v in state_dict.items():
        if k.startswith(TEXT_PREFIX):
            rest = k[len(TEXT_PREFIX):]
            if text_bert and not rest.startswith(("bert.", "cls.")):
                k = TEXT_PREFIX + "bert." + rest
            elif text_plain and rest.startswith("bert."):
                k = TEXT_PREFIX + rest[len("bert."):]
        elif bare_tower and k.startswith(RELEASE_VISION_PREFIX):
            k = k[len(RELEASE_VISION_PREFIX):]
        out[k] = v
    return out


def _fill_tied(state_dict: dict, target_keys: set[str]) -> dict:
    """The MLM decoder's weight and bias are tied to the word embeddings and `predictions.bias`: a file holding
    only one name of a pair (Hugging Face drops the tied copy) fills the other."""
    out = dict(state_dict)
    for key in target_keys:
        if key.endswith("cls.predictions.decoder.weight"):
            owner = key[:-len("cls.predictions.decoder.weight")]
            pairs = ((key, owner + "bert.embeddings.word_embeddings.weight"),
                     (owner + "cls.predictions.decoder.bias", owner + "cls.predictions.bias"))
            for tied, source in pairs:
                if tied in target_keys and tied not in out and source in out:
                    out[tied] = out[source]
    return out


def model_grid(model: nn.Module) -> tuple[int, int, int] | None:
    """(T, h, w) patch grid of the model's vision tower (None: the model has no SViTT tower)."""
    for m in model.modules():
        if isinstance(m, RelativePositionBias3D):
            return m.grid
    return None


def _expand_frames(state_dict: dict, own: dict, model: nn.Module, declared: int | None,
                   expand_mode: str) -> tuple[dict, str]:
    """Resize the source's bias tables to the model's frame count -> (state dict, note for the load report)."""
    grid = model_grid(model)
    if grid is None:
        return state_dict, ""
    dst = state_dict_frames({k: v for k, v in own.items() if k.endswith(TABLE_SUFFIX)}, grid)
    src = state_dict_frames({k: v for k, v in state_dict.items() if k in own}, grid)
    if src is None:
        return state_dict, ""
    if declared is not None and declared != src:
        raise ValueError(f"the file's config.video_input.num_frames is {declared} but its relative position "
                         f"tables are sized for {src} frames")
    if dst is None or src == dst:
        return state_dict, ""
    resized = {k: resize_relative_table(v, src, dst, grid[-2:], expand_mode) if k in own and k.endswith(TABLE_SUFFIX)
               else v for k, v in state_dict.items()}
    return resized, f" (relative position tables {src} -> {dst} frames, {expand_mode} mapping)"


def convert_state_dict(state_dict: dict, model: nn.Module, file_config: dict | None = None,
                       expand_mode: str | None = None) -> tuple[dict, str]:
    """Map a checkpoint's tensors onto `model`'s names -> (mapped state dict, source kind and any resizing).

    Sources: see detect_source. Saved index buffers / position_ids the model rebuilds are dropped; text names
    follow the model's (with or without `bert.`); bias tables of another frame count are resized to the model's
    (temporal expansion, `expand_mode` "release" or "symmetric", default the model's `temporal_expand_mode` or
    "release"). `file_config`: the release file's config (its num_frames must agree with its tables)."""
    model = getattr(model, "module", model)
    kind = detect_source(list(state_dict))
    own = model.state_dict()
    target_keys = set(own)
    mapped = map_beit(state_dict) if kind == "beit" else map_bert(state_dict) if kind == "bert" else dict(state_dict)
    mapped = {k: v for k, v in mapped.items() if k in target_keys or not k.endswith(REBUILT_BUFFERS)}
    mapped = to_target_names(mapped, target_keys)
    init_decoder = isinstance(model, SViTTQA) and not any(k.startswith(DECODER_PREFIX) for k in mapped)
    if init_decoder:  # a pre-training (or BERT) checkpoint into the QA model: the decoder from the fusion layers
        mapped = decoder_from_fusion_layers(mapped, model.text_encoder.config.fusion_layer,
                                            len(model.text_decoder.bert.encoder.layer))
    mapped = _fill_tied(mapped, target_keys)
    mapped, head_note = drop_absent_mlm_head(mapped, target_keys)
    mode = expand_mode or getattr(model, "temporal_expand_mode", None) or "release"
    if mode not in EXPAND_MODES:
        raise ValueError(f"expand_mode must be one of {EXPAND_MODES}, got {mode!r}")
    mapped, note = _expand_frames(mapped, own, model, config_frames(file_config), mode)
    return mapped, kind + note + (" (answer decoder from the fusion layers)" if init_decoder else "") + head_note


def drop_absent_mlm_head(state_dict: dict, target_keys: set[str]) -> tuple[dict, str]:
    """A file's MLM head (`text_encoder.cls.*`, a pre-training or BERT file's) into a model without one (retrieval,
    QA): dropped, so a strict load succeeds, and counted in the note for the load report."""
    if any(k.startswith(MLM_HEAD_PREFIX) for k in target_keys):
        return state_dict, ""
    kept = {k: v for k, v in state_dict.items() if not k.startswith(MLM_HEAD_PREFIX)}
    dropped = len(state_dict) - len(kept)
    return kept, f" (its MLM head dropped: {dropped} tensors this model has no use for)" if dropped else ""


# ------------------------------------------------------------------------------------------------- registry

TINY = dict(img_size=112, num_frames=8, vision_width=192, vision_depth=4, vision_heads=3, text_width=192,
            text_depth=4, text_heads=3, text_intermediate=768, fusion_layer=2, embed_dim=64, drop_path_rate=0.0)
BASE: dict = {}  # the constructor's defaults are the paper's BEiT-B/16 + BERT-base
_TIMM_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _build(defaults: dict, kwargs: dict, cls: type = None) -> SViTTPretrain:
    """A registered size: `cls` (SViTTPretrain, SViTTRetrieval or SViTTQA) from the size's defaults and timm's call
    arguments."""
    if kwargs.pop("pretrained", False):
        raise ValueError("pretrained=True: load weights with --beit_path / --bert_path / --init_ckpt, nothing is "
                         "downloaded")
    return (cls or SViTTPretrain)(**{**defaults, **{k: v for k, v in kwargs.items() if k not in _TIMM_ARGS}})


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
