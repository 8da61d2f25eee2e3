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
