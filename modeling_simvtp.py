"""SimVTP: one unified video-text transformer, its pre-training model, the retrieval dual encoder, the video QA
model and their registration (layers both families share are in layers.py, checkpoint key mapping in
simvtp_weights.py).

Tensor names and shapes follow the release exactly (the release's key lists are in tests/data/), so its
checkpoints, VideoMAE's K400 pre-training checkpoint and BERT's embeddings load strictly / by role. Shapes: B batch,
N tubes of a clip, Nv visible tubes, Nm masked tubes, L caption tokens, D encoder width, Dd decoder width,
P = 2*16*16*3 values.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_

from answer_ranking import qa_training_loss, rank_by_decoder, word_logits
from video_transforms import IMAGENET_MEAN, IMAGENET_STD, equal_row_count, on_device
from layers import (NEGATIVE_MODES, build_registered, build_text_embeddings, causal_key_mask, check_rank_score,
                    masked_word_states, matching_negatives, matching_rank_loss, mlm_loss, negatives_now,
                    positions_first, reversal_loss, run_layer, vtc_loss)
from model_registry import ModelFamily, layer_id_from_name, register_family, register_model
from simvtp_weights import convert_state_dict, recognise_release

# ----------------------------------------------------------------------------------------------- building blocks


def sincos_table(num_tokens: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sinusoid table [1, num_tokens, dim]: angle(pos, j) = pos / 10000^(2*(j//2)/dim), even j sin,
    odd j cos (computed in float64 like the release's numpy table, returned as float32)."""
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float()[None]


class SinCosPosition(nn.Module):
    """The sinusoid table as a non-persistent buffer (moves with .to(), never in state_dict) for the configured
    token count; any other count is computed on the fly."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("table", sincos_table(num_tokens, dim), persistent=False)

    def forward(self, num_tokens: int) -> torch.Tensor:
        if self.table.shape[1] == num_tokens:
            return self.table
        return sincos_table(num_tokens, self.dim).to(self.table.device)


class PatchEmbed(nn.Module):
    """Tube embedding: [B, 3, T, H, W] -> [B, N, D], tokens in (t, h, w) order."""

    def __init__(self, embed_dim: int, patch_size: int = 16, tubelet_size: int = 2, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = video.shape
        if t % self.tubelet_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"video {tuple(video.shape)}: frames must divide by {self.tubelet_size} and "
                             f"height/width by {self.patch_size}")
        return self.proj(video).flatten(2).transpose(1, 2)


# Fused (SDPA) vs explicit (matmul + softmax) attention on CPU in bf16, forward + backward, ms per call, by key
# count: (shape [B, H, S, d_head], sdpa ms, explicit ms), measured on a 2-core AMX Xeon (issue 28). Re-measure with
# `benchmarks/bench_pretrain.py --attention_table` and paste its rows here. SDPA's CPU kernel loses on short
# sequences in bf16 and wins on long ones; in fp32 the two are even; on CUDA SDPA always wins.
CPU_BF16_ATTENTION_MS = {
    160: ((12, 12, 160, 64), 38.5, 8.4),
    178: ((4, 12, 178, 64), 15.2, 4.3),
    1568: ((4, 12, 1568, 64), 139.0, 190.0),
}


def sdpa_threshold(table: dict[int, tuple]) -> int:
    """The fewest keys from which SDPA is measured faster (no longer slower at any longer measured length)."""
    lengths = sorted(table)
    faster = [n for i, n in enumerate(lengths) if all(table[m][1] <= table[m][2] for m in lengths[i:])]
    return faster[0] if faster else lengths[-1] + 1


CPU_BF16_SDPA_MIN_KEYS = sdpa_threshold(CPU_BF16_ATTENTION_MS)


def use_sdpa(device_type: str, dtype: torch.dtype, num_keys: int) -> bool:
    """SDPA always on CUDA (flash / memory-efficient kernels) and in fp32; on CPU in bf16 only from
    CPU_BF16_SDPA_MIN_KEYS keys on (its CPU kernel is several times slower than matmul + softmax below)."""
    return device_type != "cpu" or dtype != torch.bfloat16 or num_keys >= CPU_BF16_SDPA_MIN_KEYS


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v, as the release computes it; mask bool (True = may attend), broadcast to
    [B, H, Sq, Sk], None = every key."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        attn = attn.masked_fill(~mask, float("-inf"))
    return attn.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head attention with the release's bias layout cat(q_bias, 0, v_bias) (no key bias): self-attention,
    or cross-attention to a `context` (queries from rows 0..D of qkv, keys / values from rows D..3D of the same
    weight, so a cross-attention starts as a copy of a pre-trained self-attention).

    Masks are boolean (True = may attend) and only where keys are padded: an unmasked call can take CUDA's flash
    kernel, a key-padding mask [B, 1, 1, S] the memory-efficient one. `fused` (default True) is the one switch:
    F.scaled_dot_product_attention where use_sdpa picks it, else (and always when False) an explicit softmax."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.fused = True

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, D]; keep: bool [B, S] or None (no padding) -> [B, S, D]. With `context` [B, M, D]: attention
        to it instead of x. `mask`: bool [B, 1, S or 1, M] (True = may attend) used instead of keep (causal +
        padding)."""
        b, s, d = x.shape
        heads, dh = self.num_heads, d // self.num_heads
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        if context is None:
            qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(b, s, 3, heads, dh)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, S, d_head]
        else:
            q = F.linear(x, self.qkv.weight[:d], self.q_bias).reshape(b, s, heads, dh).transpose(1, 2)
            kv = F.linear(context, self.qkv.weight[d:], qkv_bias[d:]).reshape(b, context.shape[1], 2, heads, dh)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, M, d_head]
        if mask is None and keep is not None:
            mask = keep[:, None, None, :]
        if self.fused and use_sdpa(q.device.type, q.dtype, k.shape[-2]):
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            x = explicit_attention(q, k, v, mask, self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, GELU MLP ratio 4, stochastic depth)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), keep))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, keep: torch.Tensor | None, grad_ckpt: bool) -> torch.Tensor:
    """The blocks in order; with grad_ckpt, activations are recomputed in backward (non-reentrant)."""
    for blk in blocks:
        x = run_layer(blk, grad_ckpt, x, keep)
    return x


def masked_mean(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, S, D], keep: bool/0-1 [B, S] or None (all) -> [B, D], the mean over kept tokens."""
    if keep is None:
        return x.mean(dim=1)
    w = keep.to(x.dtype)[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)


def token_keep(num_video: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, num_video + L]: every visible video token, then the caption's real tokens."""
    video = torch.ones(attention_mask.shape[0], num_video, dtype=torch.bool, device=attention_mask.device)
    return torch.cat([video, attention_mask.bool()], dim=1)


def init_weights(m: nn.Module) -> None:
    """VideoMAE's init (xavier Linear, unit LayerNorm) and BERT's for embeddings (N(0, 0.02), zero padding row)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            m.weight.data[m.padding_idx].zero_()

# ----------------------------------------------------------------------------------------------- unified encoder


class UnifiedEncoder(nn.Module):
    """One transformer for video tokens, text tokens or both (video first). Pre-training configures it with a
    per-token final `norm` (its text embeddings live beside it, top-level `text_embeddings`); a retrieval branch
    with `fc_norm` on the pooled output and its own `text_embeddings`."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_frames: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, final_norm: str = "norm", vocab_size: int | None = None,
                 max_text_positions: int = 512, release_pooling: bool = False) -> None:
        super().__init__()
        if final_norm not in ("norm", "fc_norm"):
            raise ValueError(f"final_norm {final_norm!r}: 'norm' (pre-training) or 'fc_norm' (retrieval branch)")
        self.patch_embed = PatchEmbed(embed_dim, patch_size, tubelet_size)
        num_tokens = (num_frames // tubelet_size) * (img_size // patch_size) ** 2
        self.pos_table = SinCosPosition(num_tokens, embed_dim)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm == "norm" else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm == "fc_norm" else nn.Identity()
        if vocab_size is not None:
            self.text_embeddings = build_text_embeddings(vocab_size, embed_dim, max_text_positions)
        self.release_pooling = release_pooling
        self.grad_checkpointing = False

    def embed_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None,
                    num_visible: int | None = None) -> torch.Tensor:
        """video: [B, 3, T, H, W], video_mask: bool [B, N] (True = masked) with num_visible False per row (None:
        read from the mask) -> visible tokens + position [B, Nv, D]."""
        x = self.patch_embed(video)
        x = x + self.pos_table(x.shape[1]).to(x.dtype)
        return x if video_mask is None else select_tokens(x, ~video_mask, num_visible)

    def forward(self, video_tokens: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """video_tokens: [B, Nv, D], text_tokens: [B, L, D], attention_mask: [B, L] -> [B, Nv + L, D]."""
        parts = [t for t in (video_tokens, text_tokens) if t is not None]
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        keep = None
        if text_tokens is not None and attention_mask is not None:
            keep = token_keep(0 if video_tokens is None else video_tokens.shape[1], attention_mask)
        return self.norm(run_blocks(self.blocks, x, keep, self.grad_checkpointing))

    def pool(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S, D] -> [B, D]: mean over kept tokens (all with release_pooling), then fc_norm (branch only)."""
        return self.fc_norm(masked_mean(x, None if self.release_pooling else keep))

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Video-only pass -> [B, D] (mean over the visible tokens when a mask is given)."""
        return self.pool(self(self.embed_video(video, video_mask)))

    def encode_text(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass on embedded tokens [B, L, D] -> [B, D] (mean over real tokens)."""
        return self.pool(self(None, text_tokens, attention_mask), attention_mask)


def select_tokens(x: torch.Tensor, keep: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """x: [B, N, D], keep: bool [B, N] with `count` True per row -> [B, count, D] in token order, by a gather: no
    data-dependent shape, no host sync when the caller knows `count` (the collator's num_visible_tubes). Without
    it the count is read from the mask (a sync: evaluation and visualisation, not the training step)."""
    if keep.shape != x.shape[:2]:
        raise ValueError(f"video_mask {tuple(keep.shape)} does not match the {tuple(x.shape[:2])} tube grid")
    if count is None:
        count = equal_row_count(keep)
    order = positions_first(keep, count)  # kept tokens first, in token order
    return torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))

# ----------------------------------------------------------------------------------------------- pixel targets


def token_grid(num_frames: int, height: int, width: int, tubelet_size: int = 2,
               patch_size: int = 16) -> tuple[int, int, int]:
    """The tube grid (T', H', W') of a clip; a clip that does not split into whole tubes is a ValueError."""
    if num_frames % tubelet_size or height % patch_size or width % patch_size:
        raise ValueError(f"a {num_frames} x {height} x {width} clip does not split into {tubelet_size} x {patch_size}"
                         f" x {patch_size} tubes: frames must divide by {tubelet_size}, sides by {patch_size}")
    return num_frames // tubelet_size, height // patch_size, width // patch_size


def patchify(video: torch.Tensor, tubelet_size: int = 2, patch_size: int = 16) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, N, P]: tubes in (t, h, w) order, values (frame-in-tube, row, column, channel)."""
    return rearrange(video, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)",
                     p0=tubelet_size, p1=patch_size, p2=patch_size)


def unpatchify(tubes: torch.Tensor, grid: tuple[int, int, int], tubelet_size: int = 2, patch_size: int = 16,
               channels: int = 3) -> torch.Tensor:
    """[B, N, P] with grid (T', H', W') -> [B, C, T, H, W]; the inverse of patchify."""
    t, h, w = grid
    return rearrange(tubes, "b (t h w) (p0 p1 p2 c) -> b c (t p0) (h p1) (w p2)", t=t, h=h, w=w,
                     p0=tubelet_size, p1=patch_size, p2=patch_size, c=channels)


_MEAN, _STD = (torch.tensor(v).view(1, 3, 1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


def denormalize_video(video: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [B, 3, T, H, W] -> pixels in [0, 1] (float32)."""
    mean, std = on_device(video.device, imagenet_mean=_MEAN, imagenet_std=_STD)
    return video.float() * std + mean


def normalize_tubes(tubes: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """[B, N, P] -> same, each tube and channel by its own mean and unbiased std: (x - mean) / (std + 1e-6)."""
    x = tubes.unflatten(-1, (-1, channels))  # [B, N, pixels, C]
    x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.flatten(-2)


def visible_pixel_stats(tubes: torch.Tensor, video_mask: torch.Tensor,
                        channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per clip and channel mean / unbiased std of the visible tubes' pixels: tubes [B, N, P] -> ([B, 1, 1, C],) x 2.
    The visualiser's stand-in for a masked tube's unknown statistics."""
    x = select_tokens(tubes, ~video_mask).unflatten(-1, (-1, channels)).flatten(1, 2)  # [B, Nv*pixels, C]
    return x.mean(dim=1)[:, None, None], x.std(dim=1)[:, None, None]

# ----------------------------------------------------------------------------------------------- losses


class PixelDecoder(nn.Module):
    """Decoder blocks, norm and the per-tube pixel head, applied to the last `num_masked` tokens."""

    def __init__(self, dim: int, depth: int, num_heads: int, out_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.pos_table = SinCosPosition(num_tokens, dim)
        self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, num_masked: int) -> torch.Tensor:
        """x: [B, Nv + Nm, Dd] -> [B, Nm, P]."""
        x = run_blocks(self.blocks, x, None, self.grad_checkpointing)
        return self.head(self.norm(x[:, -num_masked:]))


class TubeModelContract:
    """The contract parts both SimVTP models share: tube tokens (tubelet x patch x patch) and lr-decay layer ids
    counted over the blocks of the encoder named by `_layered_encoder`."""
    _layered_encoder = "encoder"
    patch_size: int
    tubelet_size: int

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return token_grid(num_frames, height, width, self.tubelet_size, self.patch_size)

    @property
    def num_layers(self) -> int:
        return len(getattr(self, self._layered_encoder).blocks)

    def layer_id(self, name: str) -> int:
        """`[<branch>.]blocks.i.*` -> i + 1 (the release keyed this on names without the branch prefix, so every
        dual-encoder parameter landed on the top layer and the decay did nothing)."""
        return layer_id_from_name(name, self.num_layers)


class SimVTPPretrain(TubeModelContract, nn.Module):
    """Unified encoder + pixel decoder + word head (MLM) + contrastive (VTC) and matching (VTM) heads."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_frames: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 decoder_embed_dim: int = 384, decoder_depth: int = 4, decoder_num_heads: int = 6,
                 vocab_size: int = 30522, max_text_positions: int = 512, drop_path_rate: float = 0.0,
                 vtc_text: str = "full", vtm_negatives: str = "hard", release_pooling: bool = False,
                 temperature: float = 0.05, learnable_temp: bool = False, w_pixel: float = 1.0,
                 w_mlm: float = 1.0, w_vtc: float = 1.0, w_vtm: float = 1.0, decode_fraction: float = 1.0,
                 vtm_negatives_per_pair: int = 2, vtm_random_epochs: int = 0, vtm_text: str = "masked",
                 w_reverse: float = 0.0, reverse_tubes: str = "visible", vtm_video: str = "masked",
                 vtc_video: str = "masked", vtm_pool: str = "joint", w_vtm_rank: float = 0.0,
                 vtm_rank_score: str = "head") -> None:
        super().__init__()
        self.clip_shape = (num_frames, img_size)  # the contract: frames and side it was built for
        views = dict(vtc_text=vtc_text, vtm_text=vtm_text, vtm_video=vtm_video, vtc_video=vtc_video)
        bad = {name: v for name, v in views.items() if v not in ("full", "masked")}
        if bad:
            raise ValueError(f"{bad}: each must be full or masked")
        if vtm_negatives not in NEGATIVE_MODES or vtm_pool not in ("joint", "text"):
            raise ValueError(f"vtm_negatives {vtm_negatives!r} ({'|'.join(NEGATIVE_MODES)}), vtm_pool {vtm_pool!r} "
                             f"(joint|text)")
        if reverse_tubes not in ("visible", "all"):
            raise ValueError(f"reverse_tubes {reverse_tubes!r} (visible|all)")
        self.reverse_tubes = reverse_tubes
        self.vtm_rank_score = check_rank_score(vtm_rank_score)
        if not 0.0 < decode_fraction <= 1.0 or vtm_negatives_per_pair not in (1, 2):
            raise ValueError(f"decode_fraction {decode_fraction} must be in (0, 1], vtm_negatives_per_pair "
                             f"{vtm_negatives_per_pair} 1 or 2")
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.vtc_text, self.vtm_negatives, self.vtm_random_epochs = vtc_text, vtm_negatives, vtm_random_epochs
        self.vtm_text, self.vtm_video, self.vtc_video, self.vtm_pool = vtm_text, vtm_video, vtc_video, vtm_pool
        self.decode_fraction, self.vtm_negatives_per_pair = decode_fraction, vtm_negatives_per_pair
        self.loss_weights = dict(pixel=w_pixel, mlm=w_mlm, vtc=w_vtc, vtm=w_vtm, reverse=w_reverse, vtm_rank=w_vtm_rank)
        self.encoder = UnifiedEncoder(img_size, patch_size, num_frames, tubelet_size, embed_dim, depth, num_heads,
                                      mlp_ratio, drop_path_rate, "norm", release_pooling=release_pooling)
        num_tokens = (num_frames // tubelet_size) * (img_size // patch_size) ** 2
        self.decoder = PixelDecoder(decoder_embed_dim, decoder_depth, decoder_num_heads,
                                    3 * tubelet_size * patch_size ** 2, num_tokens)
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.text_embeddings = build_text_embeddings(vocab_size, embed_dim, max_text_positions)
        self.text_cls = nn.Linear(embed_dim, vocab_size)
        self.vtm_head = nn.Linear(embed_dim, 2)
        self.temperature = temperature
        if learnable_temp:  # only then a parameter: release checkpoints hold no `temp`
            self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.apply(init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    # -- the model contract: what the data must provide, layer ids for lr decay
    takes_video_mask = True
    text_masking = "mask"  # [MASK]-only replacement of the caption's masked words (the release's)

    optional_keys = ("temp",)  # learnable temperature: absent from release files, tolerated by strict loads

    default_text_mask_ratio = 0.75

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "temp"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = enable

    def current_temperature(self) -> float | torch.Tensor:
        return self.temp.clamp(0.001, 0.5) if hasattr(self, "temp") else self.temperature

    # -- passes
    def joint(self, vis: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor):
        """Joint pass on visible tokens [B, Nv, D] + embedded text [B, L, D] -> (tokens [B, Nv+L, D], pooled [B, D]
        for the matching head: over visible video + real text tokens (or all tokens with release_pooling), or with
        vtm_pool "text" over the caption's tokens alone, which have attended to the video (a fusion encoder's
        text [CLS] reads the pair this way; a mean over many video tokens mostly describes the video)."""
        x = self.encoder(vis, text, attention_mask)
        if self.vtm_pool == "text":
            return x, self.encoder.pool(x[:, vis.shape[1]:], attention_mask)
        return x, self.encoder.pool(x, token_keep(vis.shape[1], attention_mask))

    def decode_pixels(self, video_out: torch.Tensor, video_mask: torch.Tensor,
                      decode_mask: torch.Tensor | None = None, num_decoded: int | None = None) -> torch.Tensor:
        """Joint output's video part [B, Nv, D] -> predicted normalised pixels of the masked tubes [B, Nm, P], or of
        the subset `decode_mask` of them (decoder masking: num_decoded per clip, read from it when None). Token
        counts come from the shapes, not the masks' contents."""
        x = self.encoder_to_decoder(video_out)
        num_tubes, num_visible = video_mask.shape[1], video_out.shape[1]
        pos = self.decoder.pos_table(num_tubes).to(x.dtype).expand(len(x), -1, -1)
        vis = x + select_tokens(pos, ~video_mask, num_visible)
        if decode_mask is None:
            decode_mask, num_decoded = video_mask, num_tubes - num_visible
        masked = self.mask_token.to(x.dtype) + select_tokens(pos, decode_mask, num_decoded)
        return self.decoder(torch.cat([vis, masked], dim=1), masked.shape[1])

    def decoded_count(self, num_masked: int) -> int:
        """How many of a clip's num_masked tubes the decoder reconstructs (decoder masking keeps a share)."""
        return num_masked if self.decode_fraction >= 1.0 else max(1, round(self.decode_fraction * num_masked))

    def tubes_to_decode(self, video_mask: torch.Tensor, num_masked: int | None = None) -> torch.Tensor:
        """Decoder masking (as in VideoMAE V2): a random `decode_fraction` of each clip's num_masked masked tubes
        [B, N] bool (the same count per clip; read from the mask when None), from torch's global RNG; all masked
        tubes at 1.0 (the paper)."""
        if self.decode_fraction >= 1.0:
            return video_mask
        if num_masked is None:
            num_masked = equal_row_count(video_mask)
        scores = torch.rand(video_mask.shape, device=video_mask.device).masked_fill(~video_mask, -1.0)
        chosen = scores.topk(self.decoded_count(num_masked), dim=1).indices
        return torch.zeros_like(video_mask).scatter_(1, chosen, True)

    def pixel_target(self, video: torch.Tensor, video_mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Normalised pixels of the masked tubes [B, Nm, P] (float32, no gradient); `count` masked per clip (read
        from the mask when None)."""
        with torch.no_grad():
            return normalize_tubes(self.masked_tube_pixels(video, video_mask, count))

    def masked_tube_pixels(self, video: torch.Tensor, video_mask: torch.Tensor,
                           count: int | None = None) -> torch.Tensor:
        """The masked tubes' raw pixels in [0, 1] [B, Nm, P] (what pixel_target normalises per tube)."""
        with torch.no_grad():
            tubes = patchify(denormalize_video(video), self.tubelet_size, self.patch_size)
            return select_tokens(tubes, video_mask, count)

    def masked_word_loss(self, text_out: torch.Tensor, mlm_labels: torch.Tensor,
                         max_masked_words: int | None = None) -> torch.Tensor:
        """Word head on the joint output's text part [B, L, D] at the masked positions (the release scores every
        position, padding and [CLS] included), the loss over the masked ones (labels != -100)."""
        text_out, mlm_labels = masked_word_states(text_out, mlm_labels, max_masked_words)
        return mlm_loss(self.text_cls(text_out), mlm_labels)

    def matching_loss(self, vis, text, attention_mask, pos_feat, video_feat, text_feat, match_ids=None,
                      negatives: str | None = None):
        """VTM: the B positives (pooled joint output, [B, D]) + one joint pass over 2B negatives: each caption with
        a negative video, each video with a negative caption, drawn by similarity of the local VTC features (never
        a pair of the same match id: clips of one video). With
        vtm_negatives_per_pair 1, B negatives: the first half of the captions get a negative video, the other half
        of the videos a negative caption (half the negatives' joint pass).
        Returns (loss, accuracy, logits [B + negatives, 2]: the positives first, and each pair's contrastive logit
        [B + negatives]: the rank loss's offsets when vtm_rank_score is "sum"). B = 1 has no negative: loss 0, still
        connected to the graph (DDP sees vtm_head)."""
        b = len(vis)
        pos_logits = self.vtm_head(pos_feat).float()
        if b < 2:
            return (pos_logits.sum() * 0.0, (pos_logits.argmax(1) == 1).float().mean(), pos_logits,
                    pos_logits.new_zeros(b))
        with torch.no_grad():
            sim = F.normalize(video_feat.float(), dim=-1) @ F.normalize(text_feat.float(), dim=-1).t()
            sim = sim / self.current_temperature()
            # [B] each: a video for each caption, a caption for each video
            neg_video, neg_text = matching_negatives(sim, negatives or self.vtm_negatives, match_ids)
        own = torch.arange(b, device=neg_video.device)
        if self.vtm_negatives_per_pair == 1:
            first = own < b // 2
            video_ids, text_ids = torch.where(first, neg_video, own), torch.where(first, own, neg_text)
        else:
            video_ids, text_ids = torch.cat([neg_video, own]), torch.cat([own, neg_text])
        _, neg_feat = self.joint(vis[video_ids], text[text_ids], attention_mask[text_ids])
        logits = torch.cat([pos_logits, self.vtm_head(neg_feat).float()])
        labels = (torch.arange(len(logits), device=logits.device) < b).long()  # built on the device: no copy
        pair_logits = torch.cat([sim[own, own], sim[video_ids, text_ids]])
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean(), logits, pair_logits

    def forward(self, batch: dict, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """The model contract's training step: batch with video [B, 3, T, H, W], video_mask bool [B, N], input_ids /
        attention_mask / mlm_input_ids / mlm_labels [B, L] and, optionally, match_id long [B] (rows of one id, e.g.
        one video's clips under --clips_per_video, are contrastive positives, never matching negatives) and
        num_visible_tubes and max_masked_words (ints, the collator's: without the first the count is read from the
        mask, a host sync; without the second the word head scores every position) -> losses
        (fp32); "loss" = weighted sum. Passes: (a) joint on visible tubes + masked caption, (b) video-only (every
        tube with vtc_video "full") and text-only for VTC, (c) one joint pass over the VTM negatives (with vtm_text
        or vtm_video "full" one more, the positives with their whole caption or every tube), (d) with w_reverse > 0,
        the video-only pass over the clips played backwards (reversal_loss)."""
        video, video_mask, attention_mask = batch["video"], batch["video_mask"], batch["attention_mask"]
        input_ids, mlm_input_ids, mlm_labels = batch["input_ids"], batch["mlm_input_ids"], batch["mlm_labels"]
        vis = self.encoder.embed_video(video, video_mask, batch.get("num_visible_tubes"))
        if self.vtc_text == "masked":
            masked_text = vtc_text = self.text_embeddings(mlm_input_ids)
        else:  # one embedding call for both captions: half the dense [V, D] gradient buffers
            masked_text, vtc_text = self.text_embeddings(torch.cat([mlm_input_ids, input_ids])).chunk(2)
        joint_out, pos_feat = self.joint(vis, masked_text, attention_mask)  # (a)
        nv = vis.shape[1]
        num_masked = video_mask.shape[1] - nv  # counts from shapes: nothing read from the device
        num_decoded = self.decoded_count(num_masked)
        decode_mask = self.tubes_to_decode(video_mask, num_masked)
        loss_pixel = F.mse_loss(self.decode_pixels(joint_out[:, :nv], video_mask, decode_mask, num_decoded).float(),
                                self.pixel_target(video, decode_mask, num_decoded))
        loss_mlm = self.masked_word_loss(joint_out[:, nv:], mlm_labels, batch.get("max_masked_words"))
        all_tubes = self.encoder.embed_video(video) if "full" in (self.vtc_video, self.vtm_video) else None
        video_feat = self.encoder.pool(self.encoder(all_tubes if self.vtc_video == "full" else vis))  # (b)
        text_feat = self.encoder.encode_text(vtc_text, attention_mask)
        match_ids = batch.get("match_id")  # with --clips_per_video: a video's clips are each other's positives
        loss_vtc = vtc_loss(video_feat, text_feat, self.current_temperature(), gather, match_ids)
        vtm_caption, vtm_vis = masked_text, vis
        if self.vtm_text == "full":
            vtm_caption = vtc_text if self.vtc_text == "full" else self.text_embeddings(input_ids)
        if self.vtm_video == "full":  # every tube: the object and its whole path in view
            vtm_vis = all_tubes
        if self.vtm_text == "full" or self.vtm_video == "full":  # one more joint pass: the positives as paired
            pos_feat = self.joint(vtm_vis, vtm_caption, attention_mask)[1]
        loss_vtm, vtm_acc, vtm_logits, pair_logits = self.matching_loss(
            vtm_vis, vtm_caption, attention_mask, pos_feat, video_feat, text_feat, match_ids,
            negatives_now(self.vtm_negatives, self.vtm_random_epochs, batch))
        terms = dict(pixel=loss_pixel, mlm=loss_mlm, vtc=loss_vtc, vtm=loss_vtm)
        if self.loss_weights["vtm_rank"] > 0:
            # one encoder reads both the pairs and the contrastive features: no part to train alone (cf. SViTT)
            terms["vtm_rank"] = matching_rank_loss(vtm_logits, len(vtm_vis),
                                                   pair_logits if self.vtm_rank_score == "sum" else None)
        if self.loss_weights["reverse"] > 0:  # (d) the same tubes played backwards (and forwards, with all tubes)
            terms["reverse"], reverse_acc = reversal_loss(text_feat, *self.time_order_pair(video, video_mask,
                                                                                          video_feat, batch),
                                                          self.current_temperature())
        out = {"loss": sum(self.loss_weights[k] * v for k, v in terms.items())}
        out.update({f"loss_{k}": v.detach() for k, v in terms.items()})
        out["vtm_acc"] = vtm_acc.detach()
        if "reverse" in terms:
            out["reverse_acc"] = reverse_acc.detach()
        return out

    def time_order_pair(self, video: torch.Tensor, video_mask: torch.Tensor, video_feat: torch.Tensor,
                        batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features of each clip played forwards and backwards, for the time-order loss. reverse_tubes
        "visible": the training mask's tubes (the contrastive pass's features, one more pass); "all": every tube
        (two more passes: the object is then in view in every frame, where 10% of the tubes often miss it). With
        vtc_video "full" the contrastive pass already is the forward one through every tube: one more pass either
        way."""
        if self.reverse_tubes == "visible" or self.vtc_video == "full":
            mask = None if self.vtc_video == "full" else video_mask
            backwards = self.encoder.embed_video(video.flip(2), mask, batch.get("num_visible_tubes"))
            return video_feat, self.encoder.pool(self.encoder(backwards))
        both = self.encoder.embed_video(torch.cat([video, video.flip(2)]))
        return self.encoder.pool(self.encoder(both)).chunk(2)

    # -- inference
    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Video-only pass -> [B, D] (zero-shot retrieval)."""
        return self.encoder.encode_video(video, video_mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass -> [B, D] (mean over real tokens unless release_pooling)."""
        return self.encoder.encode_text(self.text_embeddings(input_ids), attention_mask)

    def match_video_cache(self, video: torch.Tensor) -> torch.Tensor:
        """The part of match_logits that depends on the video alone (its tube embeddings, [B, N, D]): re-ranking
        computes it once per video and pairs it with every candidate caption."""
        return self.encoder.embed_video(video)

    def match_logits(self, video: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     video_mask: torch.Tensor | None = None, video_cache: torch.Tensor | None = None) -> torch.Tensor:
        """Joint pass + matching head -> fp32 [B, 2] (class 1 = match), for re-ranking; `video_cache` (from
        match_video_cache) stands in for `video`, its visible tubes taken by `video_mask` when one is given. The
        head runs in fp32 outside autocast: bf16 logits tie."""
        if video_cache is None:
            vis = self.encoder.embed_video(video, video_mask)
        else:
            vis = video_cache if video_mask is None else select_tokens(video_cache, ~video_mask)
        cls = self.joint(vis, self.text_embeddings(input_ids), attention_mask)[1]
        with torch.autocast(cls.device.type, enabled=False):
            return self.vtm_head(cls.float())

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, video_mask: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, mlm_input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """For the visualiser: pred_pixels [B, Nm, P] (normalised per tube), pred_pixels_01 [B, Nm, P] (de-normalised
        with the visible tubes' per-channel statistics, about [0, 1]), word_logits [B, L, V], filled_ids [B, L]
        (input_ids with the changed positions replaced by the predicted words)."""
        vis = self.encoder.embed_video(video, video_mask)
        joint_out, _ = self.joint(vis, self.text_embeddings(mlm_input_ids), attention_mask)
        pred = self.decode_pixels(joint_out[:, :vis.shape[1]], video_mask).float()
        mean, std = visible_pixel_stats(patchify(denormalize_video(video), self.tubelet_size, self.patch_size),
                                        video_mask)
        pred_01 = (pred.unflatten(-1, (-1, 3)) * std + mean).flatten(-2)
        word_logits = self.text_cls(joint_out[:, vis.shape[1]:]).float()
        filled = torch.where(mlm_input_ids != input_ids, word_logits.argmax(-1), input_ids)
        return dict(pred_pixels=pred, pred_pixels_01=pred_01, word_logits=word_logits, filled_ids=filled)

# ----------------------------------------------------------------------------------------------- retrieval


class SimVTPDualEncoder(TubeModelContract, nn.Module):
    """Two encoders of one shape: video_encoder embeds clips, text_encoder captions; output fc_norm(mean).

    Each branch stores both input embeddings (the release's layout) but uses one. With freeze_unused (default)
    the unused ones (video_encoder.text_embeddings, text_encoder.patch_embed) get requires_grad=False: they still
    load and save, and DDP (find_unused_parameters=False) never waits for their gradients."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_frames: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 vocab_size: int = 30522, max_text_positions: int = 512, drop_path_rate: float = 0.0,
                 release_pooling: bool = False, freeze_unused: bool = True, temperature: float = 0.05) -> None:
        super().__init__()
        self.clip_shape = (num_frames, img_size)  # the contract: frames and side it was built for
        self.patch_size, self.tubelet_size, self.temperature = patch_size, tubelet_size, temperature
        branch = dict(img_size=img_size, patch_size=patch_size, num_frames=num_frames, tubelet_size=tubelet_size,
                      embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                      drop_path_rate=drop_path_rate, final_norm="fc_norm", vocab_size=vocab_size,
                      max_text_positions=max_text_positions, release_pooling=release_pooling)
        self.video_encoder = UnifiedEncoder(**branch)
        self.text_encoder = UnifiedEncoder(**branch)
        self.apply(init_weights)
        if freeze_unused:
            self.video_encoder.text_embeddings.requires_grad_(False)
            self.text_encoder.patch_embed.requires_grad_(False)

    # -- the model contract
    takes_video_mask = False
    text_masking = None
    _layered_encoder = "video_encoder"

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.video_encoder.grad_checkpointing = self.text_encoder.grad_checkpointing = enable

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, T, H, W] -> [B, D]."""
        return self.video_encoder.encode_video(video, video_mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, D]."""
        return self.text_encoder.encode_text(self.text_encoder.text_embeddings(input_ids), attention_mask)

    def forward(self, batch: dict, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Retrieval fine-tuning's loss: the symmetric InfoNCE of pre-training's VTC over the global batch (with
        the batch's "match_id", same id = positives: --match_by caption)."""
        video_feat = self.encode_video(batch["video"])
        text_feat = self.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = vtc_loss(video_feat, text_feat, self.temperature, gather, batch.get("match_id"))
        return {"loss": loss}

# ----------------------------------------------------------------------------------------------- video QA


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, cross-attention to the question pass's states, MLP. The
    self-attention, MLP and norms are named as in Block, so a layer starts as a copy of an encoder block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
                ) -> torch.Tensor:
        """x: [N, La, D], self_mask bool [N, 1, La, La], memory [Q, M, D], memory_mask bool [Q, 1, 1, M] (True = may
        attend) -> [N, La, D]. Q may divide N: each memory row then serves N / Q consecutive answers, whose tokens
        query it together (its keys and values computed once, never copied per answer)."""
        if len(x) % len(memory):
            raise ValueError(f"{len(memory)} memory rows cannot serve {len(x)} answers")
        x = x + self.drop_path(self.attn(self.norm1(x), mask=self_mask))
        shared = self.cross_norm(x).reshape(len(memory), -1, x.shape[-1])
        x = x + self.drop_path(self.cross_attn(shared, context=memory, mask=memory_mask).reshape(x.shape))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AnswerDecoder(nn.Module):
    """`depth` decoder layers and a final LayerNorm over embedded answer tokens."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, answer_mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
                ) -> torch.Tensor:
        """x: [N, La, D] embedded answers, answer_mask [N, La], memory [Q, M, D], memory_mask [Q, M] (Q = N, or Q
        divides N: see DecoderLayer) -> [N, La, D]."""
        self_mask = causal_key_mask(answer_mask)
        memory_keys = memory_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, self_mask, memory, memory_keys)
        return self.norm(x)


class SimVTPQA(TubeModelContract, nn.Module):
    """SimVTP for video QA (ALBEF's VQA design on the unified encoder): the question pass is the joint pass of all
    tubes and the embedded question; the answer decoder `answer_decoder` (causal self-attention, cross-attention to
    every state of that pass, MLP) generates the answer with the pre-training's `text_embeddings` and word head
    `text_cls`. No pixel decoder, matching head nor mask token. A pre-training checkpoint initialises the decoder
    from the encoder's top `answer_decoder_depth` blocks (see answer_decoder_from_encoder_blocks)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_frames: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 vocab_size: int = 30522, max_text_positions: int = 512, drop_path_rate: float = 0.0,
                 answer_decoder_depth: int = 3) -> None:
        super().__init__()
        self.clip_shape = (num_frames, img_size)  # the contract: frames and side it was built for
        if not 1 <= answer_decoder_depth <= depth:
            raise ValueError(f"answer_decoder_depth {answer_decoder_depth}: between 1 and the encoder depth {depth} "
                             "(the decoder starts from the top encoder blocks)")
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.encoder = UnifiedEncoder(img_size, patch_size, num_frames, tubelet_size, embed_dim, depth, num_heads,
                                      mlp_ratio, drop_path_rate, "norm")
        self.text_embeddings = build_text_embeddings(vocab_size, embed_dim, max_text_positions)
        self.answer_decoder = AnswerDecoder(embed_dim, answer_decoder_depth, num_heads, mlp_ratio)
        self.text_cls = nn.Linear(embed_dim, vocab_size)
        self.apply(init_weights)

    # -- the model contract
    takes_video_mask = False
    text_masking = None
    question_pass = ("encoder", "text_embeddings")  # the modules answer_memory runs (--cache_memory: all frozen)

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = self.answer_decoder.grad_checkpointing = enable

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay: decoder layer i sits at the depth of the encoder block it starts from."""
        prefix = "answer_decoder.layers."
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            block = self.num_layers - len(self.answer_decoder.layers) + int(index)
            name = f"encoder.blocks.{block}.{rest}"
        return super().layer_id(name)

    # -- passes
    def video_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """The question pass's video-only part, its tube embeddings [B, N, D]: evaluation computes it once per
        video and answers all the video's questions from it."""
        return self.encoder.embed_video(video)

    def encode_question(self, video: torch.Tensor | None, question_ids: torch.Tensor, question_mask: torch.Tensor,
                        video_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint pass of all tubes of video [B, 3, T, H, W] (or its video_tokens) and the question [B, Lq] ->
        (memory [B, N + Lq, D], memory_mask [B, N + Lq]: 1 on every video token and the question's real tokens)."""
        vis = self.video_tokens(video) if video_tokens is None else video_tokens
        memory = self.encoder(vis, self.text_embeddings(question_ids), question_mask)
        return memory, token_keep(vis.shape[1], question_mask).long()

    def answer_memory(self, video: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the answer decoder reads (the contract's QA training step): encode_question's (memory, mask)."""
        return self.encode_question(video, question_ids, question_mask)

    def decode(self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, memory: torch.Tensor,
               memory_mask: torch.Tensor, fp32_logits: bool = False) -> torch.Tensor:
        """Teacher-forced decoder: answers [N, La] (starting with [CLS]) over their questions' memory [N, M, D], or
        [Q, M, D] when each question's N / Q answers are consecutive rows -> next-token logits [N, La, vocab]
        (fp32_logits: the word head outside autocast, for ranking)."""
        x = self.text_embeddings(answer_ids)
        return word_logits(self.text_cls, self.answer_decoder(x, answer_mask, memory, memory_mask), fp32_logits)

    def forward(self, batch: dict, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """The model contract's training step (datasets.VideoQACollator's batch): video [B, 3, T, H, W],
        question_input_ids / question_mask [B, Lq], answer_ids / answer_mask [N, La] ([CLS] answer [SEP], padded),
        answer_weights [N], answer_to_question [N] -> loss = sum_n w_n NLL_n / B."""
        return {"loss": qa_training_loss(self, batch)}

    @torch.no_grad()
    def rank_answers(self, video: torch.Tensor | None, question_ids: torch.Tensor, question_mask: torch.Tensor,
                     answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int = 128,
                     video_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-list answering (ALBEF): the decoder's first-token distribution after [CLS] picks each question's
        top k answers of the list answer_ids [A, La], which are re-scored by their full log-likelihood.
        `video_tokens` (video_tokens() of each question's video) stands in for `video`.
        -> (best answer index [Q], scores [Q, A]: log-likelihood, -inf outside the top k)."""
        memory, memory_mask = self.encode_question(video, question_ids, question_mask, video_tokens)
        return rank_by_decoder(self, memory, memory_mask, answer_ids, answer_mask, k)

# ----------------------------------------------------------------------------------------------- registry

TINY = dict(embed_dim=192, depth=4, num_heads=3, img_size=112, num_frames=8)
SMALL = dict(embed_dim=384, depth=12, num_heads=6)
BASE = dict(embed_dim=768, depth=12, num_heads=12)


def _build(cls: type, defaults: dict, kwargs: dict) -> nn.Module:
    """A registered SimVTP size (see layers.build_registered)."""
    return build_registered(cls, defaults, kwargs, "checkpoint.load_pretrained")


@register_model("simvtp", retrieval_model="simvtp_dual_tiny_patch16", qa_model="simvtp_qa_tiny_patch16")
def simvtp_tiny_patch16(**kwargs) -> SimVTPPretrain:
    return _build(SimVTPPretrain, dict(TINY, decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=3), kwargs)


@register_model("simvtp", retrieval_model="simvtp_dual_small_patch16", qa_model="simvtp_qa_small_patch16")
def simvtp_small_patch16(**kwargs) -> SimVTPPretrain:
    return _build(SimVTPPretrain, dict(SMALL, decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3), kwargs)


@register_model("simvtp", aliases=("pretrain_simvtp_base_patch16_224",), retrieval_model="simvtp_dual_base_patch16",
                qa_model="simvtp_qa_base_patch16")
def simvtp_base_patch16(**kwargs) -> SimVTPPretrain:
    return _build(SimVTPPretrain, dict(BASE, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6), kwargs)


@register_model("simvtp", qa_model="simvtp_qa_tiny_patch16")
def simvtp_dual_tiny_patch16(**kwargs) -> SimVTPDualEncoder:
    return _build(SimVTPDualEncoder, TINY, kwargs)


@register_model("simvtp", qa_model="simvtp_qa_small_patch16")
def simvtp_dual_small_patch16(**kwargs) -> SimVTPDualEncoder:
    return _build(SimVTPDualEncoder, SMALL, kwargs)


@register_model("simvtp", aliases=("vit_base_patch16_224", "simvtp_dual_base_patch16_224"),
                qa_model="simvtp_qa_base_patch16")
def simvtp_dual_base_patch16(**kwargs) -> SimVTPDualEncoder:
    return _build(SimVTPDualEncoder, BASE, kwargs)


@register_model("simvtp")
def simvtp_qa_tiny_patch16(**kwargs) -> SimVTPQA:
    """CPU-sized QA model: simvtp_tiny_patch16's encoder and a 2-layer answer decoder (its top 2 blocks)."""
    return _build(SimVTPQA, dict(TINY, answer_decoder_depth=2), kwargs)


@register_model("simvtp")
def simvtp_qa_small_patch16(**kwargs) -> SimVTPQA:
    return _build(SimVTPQA, dict(SMALL, answer_decoder_depth=3), kwargs)


@register_model("simvtp", aliases=("simvtp_qa_base_patch16_224",))
def simvtp_qa_base_patch16(**kwargs) -> SimVTPQA:
    return _build(SimVTPQA, dict(BASE, answer_decoder_depth=3), kwargs)


# What each loss's pass sees, full or masked: flag -> help.
VIEW_FLAGS = {
    "vtc_text": "caption of the contrastive text pass: full (default) or masked (the release's behaviour)",
    "vtm_text": "caption of the matching pairs: masked (default, the release's: the masked-word pass's caption, so a "
                "pair whose telling words are masked cannot be told apart) or full (one more joint pass; re-ranking "
                "scores whole captions)",
    "vtc_video": "tubes of the contrastive video pass: masked (default, the release's: the pre-training mask's "
                 "visible tubes) or full (every tube, as retrieval embeds clips; a longer pass)",
    "vtm_video": "tubes of the matching pairs: masked (default, the release's: the pre-training mask's visible "
                 "tubes; in the demo's 64 px clips, 2 of 16 patches kept, the object is out of view in 45%% of "
                 "pairs) or full (every tube, as re-ranking scores them; longer joint passes)",
}


def add_model_args(g: argparse._ArgumentGroup) -> None:
    """SimVTP's own flags; unset (None) means the model's default."""
    g.add_argument("--decoder_depth", type=int, default=None, help="pixel decoder blocks (pre-training model)")
    g.add_argument("--answer_decoder_depth", type=int, default=None,
                   help="answer decoder layers of the QA model, started from the top encoder blocks (2 tiny, 3 "
                        "small / base)")
    for name, what in VIEW_FLAGS.items():
        g.add_argument(f"--{name}", default=None, choices=["full", "masked"], help=what)
    g.add_argument("--vtm_pool", default=None, choices=["joint", "text"],
                   help="what the matching head reads: the mean over the joint pass's video and text tokens "
                        "(joint, default, the release's) or over its caption tokens alone (text: they attended to "
                        "the video, as a fusion encoder's text [CLS])")
    g.add_argument("--reverse_tubes", default=None, choices=["visible", "all"],
                   help="with --w_reverse: the clip forwards and backwards through the training mask's tubes "
                        "(visible, default: one more video pass) or through every tube (all: two more passes)")
    g.add_argument("--release_pooling", action="store_true", default=None,
                   help="average padding into text means, as the release did")
    g.add_argument("--temperature", type=float, default=None, help="contrastive temperature (default 0.05)")
    g.add_argument("--learnable_temp", action="store_true", default=None, help="learn the temperature")
    for term in ("pixel", "vtc", "vtm"):
        g.add_argument(f"--w_{term}", type=float, default=None, help=f"weight of the {term} loss (default 1)")
    g.add_argument("--decode_fraction", type=float, default=None,
                   help="decoder masking (VideoMAE V2): reconstruct only this random share of the masked tubes "
                        "(default 1.0, all of them, the paper's method); less decoder work")
    g.add_argument("--vtm_negatives_per_pair", type=int, default=None, choices=[1, 2],
                   help="matching negatives per positive pair: 2 (default: a negative video and a negative caption) "
                        "or 1 (half the negatives' joint pass)")


register_family(ModelFamily(name="simvtp", add_args=add_model_args, convert_state_dict=convert_state_dict,
                            recognise=recognise_release))
