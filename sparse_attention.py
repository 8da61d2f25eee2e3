"""SViTT's two sparsities and the 3-D relative position bias they index: block-sparse self-attention (edge
sparsity) and [CLS]-attention token pruning (node sparsity).

Edge sparsity: patch tokens attend block-sparsely (a local window of blocks plus random blocks), [CLS] attends to
and is attended by every token. The random blocks are drawn once per forward and token count (shared by the batch,
the heads and the layers between two pruning layers; the release redraws them on every forward), so the gather
indices of a pattern are built once and reused by those layers. Node sparsity: after the pruning layers only the
patch tokens with the most [CLS] attention survive; each keeps its original (t, h, w) so the relative bias stays
right. Shapes: B batch, H heads, N patch tokens (after pruning: the kept ones), L = 1 + N, D width, d head width,
nb blocks, K key blocks per query block, bs block size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

CLS_TO_PATCH, PATCH_TO_CLS, CLS_TO_CLS = -3, -2, -1  # the table's last three rows, counted from its end


SPARSE_CHUNK_BYTES = 8 << 20  # on CPU, block-sparse attention gathers this many bytes of keys per sample at once


# ------------------------------------------------------------------------------------ relative position bias


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


# -------------------------------------------------------------------------------------- block-sparse pattern


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


# --------------------------------------------------------------------------------------------- token pruning


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
