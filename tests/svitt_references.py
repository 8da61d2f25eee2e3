"""Test-side SViTT helpers: a tiny vision-tower config, the dense mask a block pattern stands for (the reference
block-sparse attention is checked against), a release file's vision tower on its own, and resizing every relative
position table of a state dict. Only tests use them, so they live here, not in the model modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling_svitt import SViTTVisionConfig
from sparse_attention import BlockPattern
from svitt_weights import RELEASE_VISION_PREFIX, TABLE_SUFFIX, resize_relative_table


def svitt_tiny_config(**overrides) -> SViTTVisionConfig:
    """Tiny tower for tests: width 192, 4 layers, 3 heads, 8 frames of 112 px (7x7 patches)."""
    return SViTTVisionConfig(**{**dict(image_size=112, num_frames=8, width=192, depth=4, num_heads=3), **overrides})


def pattern_to_dense_mask(pattern: BlockPattern, num_patches: int) -> torch.Tensor:
    """The boolean [L, L] mask a block pattern stands for: [CLS] row and column all True."""
    bs = pattern.block_size
    block_of = torch.arange(num_patches) // bs
    allowed = torch.zeros(pattern.key_blocks.shape[0], pattern.key_blocks.shape[0], dtype=torch.bool)
    rows = torch.arange(pattern.key_blocks.shape[0])[:, None].expand_as(pattern.key_blocks)
    allowed[rows[pattern.valid], pattern.key_blocks[pattern.valid]] = True
    patch_mask = allowed[block_of[:, None], block_of[None, :]]
    return F.pad(patch_mask, (1, 0, 1, 0), value=True)


def release_vision_state_dict(state_dict: dict) -> dict:
    """The tower's tensors out of a release state dict: `vision_encoder.` dropped, rebuilt index buffers skipped."""
    return {k[len(RELEASE_VISION_PREFIX):]: v for k, v in state_dict.items()
            if k.startswith(RELEASE_VISION_PREFIX) and not k.endswith("relative_position_index")}


def resize_relative_tables(state_dict: dict, src_frames: int, dst_frames: int, grid: tuple[int, ...],
                           expand_mode: str = "release") -> dict:
    """Every `...relative_position_bias_table` of a state dict resized from src to dst frames (temporal
    expansion); `grid` is (h, w) or (T, h, w) of patches (only h, w are used). Other tensors pass unchanged."""
    grid_hw = tuple(grid[-2:])
    return {k: resize_relative_table(v, src_frames, dst_frames, grid_hw, expand_mode)
            if k.endswith(TABLE_SUFFIX) else v for k, v in state_dict.items()}
