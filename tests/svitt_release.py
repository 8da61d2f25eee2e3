"""Release-format SViTT files for tests, without omegaconf: the key lists of the release's three models
(tests/data/svitt_release_keys.json), seeded state dicts built from them, and `write_release_file`, which saves
{"model", "optimizer", "scheduler", "scaler", "config", "epoch", "global_step"} as the release does, its
"config" pickled under OmegaConf's own class names with OmegaConf's layout (checked against omegaconf 2.0.6 and
2.4.0 pickles: DictConfig / ListConfig / AnyNode objects whose state holds _metadata, _parent and _content or
_val; ContainerMetadata / Metadata dataclasses naming typing.Any, dict, int and a defaultdict resolver cache).
"""
from __future__ import annotations

import collections
import contextlib
import json
import sys
import types
import typing
from pathlib import Path

import torch

RELEASE_KEYS = Path(__file__).parent / "data" / "svitt_release_keys.json"


def release_keys(kind: str) -> list[tuple[str, list[int]]]:
    """[(key, shape)] of the release's "pretrain", "retrieval" or "qa" state dict at 4 frames, 224 px."""
    return [(k, shape) for k, shape in json.loads(RELEASE_KEYS.read_text())[kind]]


def seeded_state_dict(keys: list[tuple[str, list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the listed shapes: seeded normal floats (0.02 scale), the release's int buffers as it saves
    them (position_ids 0..n-1; index buffers zero: every loader drops them), `temp` 0.07."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in keys:
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[-1]).expand(shape).clone()
        elif key.endswith("relative_position_index"):
            out[key] = torch.zeros(shape, dtype=torch.int64)
        elif key == "temp":
            out[key] = torch.tensor(0.07)
        else:
            out[key] = torch.randn(shape, generator=g) * 0.02
    return out


# --------------------------------------------------------------------------- OmegaConf's pickled layout


class _Node:
    """Pickles like an OmegaConf node: NEWOBJ of the class named below, then BUILD with its __dict__."""


class DictConfig(_Node):
    pass


class ListConfig(_Node):
    pass


class AnyNode(_Node):
    pass


class Metadata:
    pass


class ContainerMetadata:
    pass


FAKE_MODULES = {"omegaconf.dictconfig": [DictConfig], "omegaconf.listconfig": [ListConfig],
                "omegaconf.nodes": [AnyNode], "omegaconf.base": [Metadata, ContainerMetadata]}
for _module, _classes in FAKE_MODULES.items():
    for _cls in _classes:
        _cls.__module__ = _module


@contextlib.contextmanager
def omegaconf_names(extra: dict[str, list[type]] | None = None):
    """Make the classes above (and `extra` {module: [classes]}) picklable under their OmegaConf module names:
    fake modules in sys.modules for the duration (the previous entries are restored)."""
    wanted = {**FAKE_MODULES, **(extra or {})}
    names = {"omegaconf", *wanted}
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for name in names:
            sys.modules[name] = types.ModuleType(name)
        for name, classes in wanted.items():
            for cls in classes:
                setattr(sys.modules[name], cls.__qualname__, cls)
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _metadata(cls: type, key, container: bool, object_type) -> object:
    meta = cls.__new__(cls)
    meta.__dict__.update(ref_type=typing.Any, object_type=object_type, optional=True, key=key, flags={},
                         flags_root=False, resolver_cache=collections.defaultdict(dict))
    if container:
        meta.__dict__.update(key_type=int if object_type is list else typing.Any, element_type=typing.Any)
    return meta


def omegaconf_like(value, key=None, parent=None):
    """Plain data -> objects with OmegaConf's pickled layout (dict -> DictConfig, list -> ListConfig, a value ->
    AnyNode), parents linked as OmegaConf links them."""
    if isinstance(value, (dict, list)):
        node = (DictConfig if isinstance(value, dict) else ListConfig).__new__(
            DictConfig if isinstance(value, dict) else ListConfig)
        node.__dict__.update(_metadata=_metadata(ContainerMetadata, key, True, type(value)), _parent=parent)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        content = {k: omegaconf_like(v, k, node) for k, v in items}
        node._content = content if isinstance(value, dict) else list(content.values())
        return node
    node = AnyNode.__new__(AnyNode)
    node.__dict__.update(_metadata=_metadata(Metadata, key, False, None), _parent=parent, _val=value)
    return node


RELEASE_CONFIG = {"video_input": {"num_frames": 4, "reader": "decord", "sample_type": "rand", "num_frames_test": 4},
                  "image_res": 224, "vit_type": "beit", "vision_encoder_args": {"token_keep_rate": 0.7,
                                                                              "token_drop_loc": [3, 6, 9]},
                  "text_encoder": "bert-base-uncased", "embed_dim": 256, "temp": 0.07, "fusion_layer": 9}


def write_release_file(path, state_dict: dict, num_frames: int | None = 4, config=None) -> None:
    """torch.save a release-format checkpoint: `config` (any picklable object, default RELEASE_CONFIG with
    `num_frames`) is stored as an OmegaConf-layout object; num_frames None leaves video_input out."""
    if config is None:
        config = json.loads(json.dumps(RELEASE_CONFIG))
        if num_frames is None:
            del config["video_input"]
        else:
            config["video_input"]["num_frames"] = config["video_input"]["num_frames_test"] = num_frames
        config = omegaconf_like(config)
    with omegaconf_names():
        torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                    "scheduler": {"last_epoch": 9, "base_lrs": [1e-4]}, "scaler": {"scale": 65536.0},
                    "config": config, "epoch": 9, "global_step": 1000}, path)


# --------------------------------------------------------------------------- the release's sparse attention


def release_relative_position_index(grid: tuple[int, int, int]) -> torch.Tensor:
    """The release's BeitRelativePositionBias3D.relative_position_index (one [CLS] token) [1 + n, 1 + n]: a patch
    pair's (dt + T-1, dh + h-1, dw + w-1) numbered row-major in the (2T-1, 2h-1, 2w-1) box of offsets; then the
    [CLS] row (query [CLS]) = box size, the [CLS] column = box size + 1, the [CLS] pair = box size + 2."""
    T, h, w = grid
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([t.flatten(), y.flatten(), x.flatten()], dim=1)
    rel = coords[:, None] - coords[None] + torch.tensor([T - 1, h - 1, w - 1])
    box = (2 * T - 1) * (2 * h - 1) * (2 * w - 1)
    index = torch.empty(1 + len(coords), 1 + len(coords), dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] * (2 * h - 1) + rel[..., 1]) * (2 * w - 1) + rel[..., 2]
    index[0, 1:], index[1:, 0], index[0, 0] = box, box + 1, box + 2
    return index


def release_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_idx: torch.Tensor,
                             key_blocks: torch.Tensor, table: torch.Tensor, index: torch.Tensor, block_size: int,
                             scale: float) -> torch.Tensor:
    """One sample of the release's BeitSelfAttention with sparse attention (models/sparse_xbeit.py), block by
    block: q, k, v [H, 1 + n, d] ([CLS] first), token_idx [n] the kept patches' original indices, key_blocks
    [nb, K] the key blocks of each query block (its local window and random blocks), table [R, H], index the
    release's relative_position_index -> context [H, 1 + n, d].
    As the release does: [CLS] attends densely to every token; the patch queries, keys and values are zero-padded
    to nb whole blocks, and so are the token indices (q_idx = token_idx + 1, padded with 0, [CLS]'s index);
    each query block attends to [CLS] + its key blocks, padding keys included (a zero key: logit 0, zero value),
    with bias table[index[query's index, key's index]]: a padding key gets index[q, 0], the patch->[CLS] row."""
    H, L, d = q.shape
    n, nb = L - 1, key_blocks.shape[0]
    pad = nb * block_size - n
    all_idx = torch.cat([torch.zeros(1, dtype=torch.long), token_idx + 1])

    def attend(queries, q_index, keys, values, k_index):
        logits = queries @ keys.transpose(-2, -1) * scale + table[index[q_index][:, k_index]].permute(2, 0, 1)
        return logits.softmax(dim=-1) @ values

    cls_out = attend(q[:, :1], all_idx[:1], k, v, all_idx)
    qp, kp, vp = (torch.nn.functional.pad(t[:, 1:], (0, 0, 0, pad)) for t in (q, k, v))
    idx = torch.nn.functional.pad(token_idx + 1, (0, pad), value=0).view(nb, block_size)
    blocks = []
    for m in range(nb):
        positions = (key_blocks[m, :, None] * block_size + torch.arange(block_size)).flatten()
        keys, values = (torch.cat([t[:, :1], tp[:, positions]], dim=1) for t, tp in ((k, kp), (v, vp)))
        k_index = torch.cat([torch.zeros(1, dtype=torch.long), idx[key_blocks[m]].flatten()])
        rows = slice(m * block_size, (m + 1) * block_size)
        blocks.append(attend(qp[:, rows], idx[m], keys, values, k_index))
    return torch.cat([cls_out, torch.cat(blocks, dim=1)[:, :n]], dim=1)
