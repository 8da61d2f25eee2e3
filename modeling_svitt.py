"""SViTT (sparse video-text transformer, Li et al., CVPR 2023): the vision tower and its two sparsities.

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

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

CLS_TO_PATCH, PATCH_TO_CLS, CLS_TO_CLS = -3, -2, -1  # the table's last three rows, counted from its end
MLP_CHUNK_ROWS = 1024  # tokens per MLP call: a 1024 x 3072 fp32 hidden activation is 12 MiB
SPARSE_CHUNK_BYTES = 8 << 20  # block-sparse attention gathers the keys of this many bytes' worth of blocks at once


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
    release_sparse_padding: bool = False  # True: zero-padded keys of the last block enter the softmax (release)

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
        code(query) - code(key) + code(T-1, h-1, w-1) with code(t, h, w) = t*(2h-1)*(2w-1) + h*(2w-1) + w."""
        T, h, w = self.grid
        weights = torch.tensor([(2 * h - 1) * (2 * w - 1), 2 * w - 1, 1], device=q_coords.device)
        centre = (T - 1) * int(weights[0]) + (h - 1) * (2 * w - 1) + w - 1
        q_code, k_code = (q_coords * weights).sum(-1), (k_coords * weights).sum(-1)
        return q_code.unsqueeze(-1) - k_code.unsqueeze(-2) + centre

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


# ------------------------------------------------------------------------------------- block-sparse pattern


@dataclass
class BlockPattern:
    """Which key blocks each query block sees: key_blocks [nb, K] (clamped indices), valid [nb, K]."""
    key_blocks: torch.Tensor
    valid: torch.Tensor
    block_size: int
    layout: tuple | None = field(default=None, repr=False, compare=False)  # sparse_layout's cache


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
        Dense when `pattern` is None (`mask` [B or 1, L, L] bool optionally restricts it)."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if pattern is None:
            out, cls_attn = self.dense(*(self.heads(t) for t in (q, k, v)), coords, mask)
            return out.transpose(1, 2).flatten(2), cls_attn
        return self.block_sparse(q, k, v, coords, pattern, release_padding)

    def dense(self, q, k, v, coords, mask):
        logits = (q * self.scale) @ k.transpose(-2, -1)
        logits = logits + self.relative_position_bias.lookup(self.relative_position_bias.full_rows(coords))
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        return probs @ v, probs[:, :, 0, 1:].mean(dim=1)

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
        """Patch queries, block by block: each block's keys are [CLS] + its K key blocks, gathered (index_select)
        into a [c, 1 + K*bs, D] layout for a chunk of c query blocks, then one 4-D scaled_dot_product_attention
        call over (blocks, heads) with the bias as additive mask, per chunk and batch element. q, k, v stay
        token-major [B, L, D]: their (block, head) views need no copy. Chunks keep every temporary under
        SPARSE_CHUNK_BYTES, far below glibc's mmap threshold, so the allocator reuses them instead of mapping
        and page-faulting fresh memory for each. The gather indices come from `sparse_layout` (cached)."""
        B, L, D = q.shape
        H, n, bs = self.num_heads, L - 1, pattern.block_size
        nb = pattern.key_blocks.shape[0]
        cls_ctx, cls_attn = self.cls_row(q, k, v)
        key_tokens, bias_index = sparse_layout(pattern, coords, self.relative_position_bias, release_padding)
        pad = nb * bs - n
        if pad:  # the last block's missing queries and keys: zero rows (masked keys unless release_padding)
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        table = F.pad(self.relative_position_bias.relative_position_bias_table.t(), (0, 1), value=float("-inf"))
        table = table.to(q.dtype).flatten()
        key_tokens = key_tokens.view(nb, -1)
        S, d = key_tokens.shape[1], D // H
        out = q.new_empty(B, L, D)
        out[:, 0] = cls_ctx.to(q.dtype)
        chunk = max(1, SPARSE_CHUNK_BYTES // (S * D * q.element_size()))
        for j0 in range(0, nb, chunk):  # a few query blocks at a time: small temporaries, reused by the allocator
            j1 = min(nb, j0 + chunk)
            tokens = key_tokens[j0:j1].flatten()
            bias = None
            for b in range(B):
                if bias is None or bias_index.shape[0] > 1:  # unpruned: one bias for the whole batch
                    idx = bias_index[b if bias_index.shape[0] > 1 else 0, j0:j1]
                    bias = table.index_select(0, idx.flatten()).view(idx.shape)  # [c, H, bs, S]
                qb = q[b, 1 + j0 * bs:1 + j1 * bs].view(j1 - j0, bs, H, d).transpose(1, 2)
                kb, vb = (t[b].index_select(0, tokens).view(j1 - j0, S, H, d).transpose(1, 2) for t in (k, v))
                # heads and blocks as the two leading dims: torch's fused CPU kernel (5-D falls back to a slow path)
                ctx = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=self.scale)  # [c, H, bs, d]
                rows = min(j1 * bs, n) - j0 * bs
                out[b, 1 + j0 * bs:1 + j0 * bs + rows] = ctx.transpose(1, 2).reshape(-1, D)[:rows]
        return out, cls_attn


def sparse_layout(pattern: BlockPattern, coords: torch.Tensor, rpb: RelativePositionBias3D,
                  release_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices of a block pattern over one coordinate set, cached on the pattern (every layer that uses the
    pattern with the same `coords` tensor reuses them; only the per-layer bias table differs):
    key_tokens [nb*(1 + K*bs)]: sequence positions of [CLS] + each query block's key blocks (padded sequence);
    bias_index [B or 1, nb, H, bs, 1 + K*bs]: positions in a layer's table.t() padded with one -inf column and
    flattened, the -inf one where the key is not allowed (invalid block; padding unless release_padding)."""
    cached = pattern.layout
    if cached is not None and cached[0] is coords and cached[1] == release_padding:
        return cached[2], cached[3]
    bs, device = pattern.block_size, coords.device
    nb, K = pattern.key_blocks.shape
    n, H = coords.shape[1], rpb.relative_position_bias_table.shape[1]
    pad = nb * bs - n
    key_blocks = pattern.key_blocks.to(device)
    key_pos = key_blocks[:, :, None] * bs + torch.arange(bs, device=device)  # [nb, K, bs] patch positions
    key_tokens = F.pad(1 + key_pos.flatten(1), (1, 0), value=0).flatten()  # [CLS] + keys, sequence positions
    shared = coords.stride(0) == 0  # unpruned: one coordinate set for the whole batch, one bias broadcast over it
    cp = F.pad(coords[:1] if shared else coords, (0, 0, 0, pad)).unflatten(1, (nb, bs))  # [B or 1, nb, bs, 3]
    rows = rpb.patch_rows(cp, cp[:, key_blocks].flatten(2, 3))  # [B or 1, nb, bs, K*bs]
    rows = F.pad(rows, (1, 0), value=rpb.cls_row(PATCH_TO_CLS))
    key_ok = pattern.valid.to(device)[:, :, None] & (bool(release_padding) | (key_pos < n))
    key_ok = F.pad(key_ok.flatten(1), (1, 0), value=True)  # [nb, 1 + K*bs]
    table_rows = rpb.relative_position_bias_table.shape[0]
    rows = rows.masked_fill(~key_ok[None, :, None, :], table_rows)  # the extra -inf column: "not allowed"
    head_offset = torch.arange(H, device=device).view(1, 1, H, 1, 1) * (table_rows + 1)
    bias_index = rows.unsqueeze(2) + head_offset
    pattern.layout = (coords, release_padding, key_tokens, bias_index)
    return key_tokens, bias_index


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
        """The GELU MLP over at most MLP_CHUNK_ROWS tokens at a time: its 4x-wide hidden activations stay small
        enough for the allocator to reuse (larger ones are mapped and page-faulted afresh on every call)."""
        rows = h.flatten(0, -2)
        if rows.shape[0] <= MLP_CHUNK_ROWS:
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
    pooled: torch.Tensor  # [B, D]: pooler LayerNorm of the mean of the surviving patch tokens
    coords: torch.Tensor  # [B, N, 3]: original (t, h, w) of every surviving patch token
    patterns: list  # per layer: the BlockPattern used (None when dense)
    kept: list  # per pruning layer: indices [B, N_after] into that layer's patch tokens


def keep_count(num_tokens: int, rate: float) -> int:
    return max(1, math.ceil(rate * num_tokens - 1e-9))


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
            x, cls_attn = layer(x, coords, pattern, mask, cfg.release_sparse_padding)
            patterns.append(pattern)
            if i in cfg.token_drop_loc and cfg.token_keep_rate < 1.0:
                scores = cls_attn if cfg.token_drop_method == "cls_attention" else \
                    torch.rand(cls_attn.shape, generator=generator).to(cls_attn.device)
                x, coords, keep = select_patch_tokens(x, coords, scores.detach(), cfg.token_keep_rate)
                kept.append(keep)
        pooled = self.pooler.layernorm(x[:, 1:].mean(dim=1))
        return SViTTVisionOutput(x, pooled, coords, patterns, kept)


def init_weights(m: nn.Module) -> None:
    """BEiT's initialisation: truncated normal 0.02 for Linear/Conv weights, zero biases, unit LayerNorms."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


RELEASE_VISION_PREFIX = "vision_encoder."


def release_vision_state_dict(state_dict: dict) -> dict:
    """The tower's tensors out of a release state dict: `vision_encoder.` dropped, rebuilt index buffers skipped."""
    return {k[len(RELEASE_VISION_PREFIX):]: v for k, v in state_dict.items()
            if k.startswith(RELEASE_VISION_PREFIX) and not k.endswith("relative_position_index")}
