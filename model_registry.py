"""The model contract (`VideoTextModel`, a typing.Protocol, plus named optional capabilities asked with `supports`)
and the registry of model families: all that run scripts, engines and checkpoint.py may ask of a model, so a new
family plugs in without `if family == ...` anywhere else.

A family module (modeling_simvtp.py, ...) calls `register_family` once and decorates its factories with
`register_model(family, aliases=...)`. Every model built by `create` carries `model.model_cfg` (registered name +
constructor arguments), which our checkpoints store, so any reader rebuilds the model without flags. A family kept
outside this repository registers itself the same way and is loaded with `--model_module my_family`.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn
from timm.models import register_model as timm_register_model

# the family modules shipped with the codebase, imported at the end of this module so their models are registered
FAMILY_MODULES = ("modeling_simvtp", "modeling_svitt")
# flags every family shares: constructor argument -> run-script flag (a model that does not take one ignores it)
COMMON_FLAGS = {"img_size": "input_size", "num_frames": "num_frames", "drop_path_rate": "drop_path",
                "vtm_negatives": "vtm_negatives", "vtm_random_epochs": "vtm_random_epochs", "w_mlm": "w_mlm",
                "w_reverse": "w_reverse", "w_vtm_rank": "w_vtm_rank",
                "vtm_rank_score": "vtm_rank_score"}


@dataclass
class ModelFamily:
    """One family: its CLI group (every flag defaults to None = the model's own default), how its flags become
    constructor arguments, its checkpoint key converter, and how to recognise a file that names no model."""
    name: str
    add_args: Callable[[argparse._ArgumentGroup], None]
    # (state_dict, model) -> (mapped state_dict, source kind); also given file_config= (the file's "config" as
    # plain data) when the file carries one
    convert_state_dict: Callable[..., tuple[dict, str]]
    recognise: Callable[[list[str]], str | None] = lambda keys: None  # keys -> a registered model name, or None
    flag_to_kwarg: dict[str, str] = field(default_factory=dict)  # renames; others pass under their own name
    flags: tuple[str, ...] = ()  # filled by register_family: the dest names add_args creates


@dataclass
class ModelSpec:
    name: str
    family: str
    cls: type
    factory: Callable[..., nn.Module]
    retrieval_model: str | None  # the model a checkpoint of this one fine-tunes into for retrieval (None: itself)
    qa_model: str | None = None  # the model a checkpoint of this one fine-tunes into for video QA (None: itself)


_FAMILIES: dict[str, ModelFamily] = {}
_MODELS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}

# ----------------------------------------------------------------------------------------------- the contract


@runtime_checkable
class VideoTextModel(Protocol):
    """What every registered model provides (engine_for_pretraining trains it, retrieval_eval evaluates it).

    - `forward(batch, gather=None) -> {"loss": tensor, other named scalars}`: the collated batch in, its own
      losses out; `gather` ([b, ...] -> [world*b, ...], with gradient) makes contrastive losses global.
    - What it needs from the data: `takes_video_mask` and `token_grid(num_frames, height, width)` for the video
      mask; `text_masking` (None, "mask" = [MASK] only, or "bert" = 80/10/10) for its MLM captions.
    - Layer-wise lr decay: `num_layers` and `layer_id(name) -> 0 .. num_layers + 1`.
    - `set_grad_checkpointing(enable)`: recompute its layers in the backward pass (`--grad_checkpointing`).
    - `model_cfg`: set by `create` (name + constructor arguments), stored in checkpoints.

    Optional capabilities, each a name in CAPABILITIES asked with `supports(model, name)` (never by probing
    attributes elsewhere); a model that lacks one simply does not define its methods (no stubs that raise):
    - "retrieval": `encode_video(video, video_mask=None) -> [B, D]`, `encode_text(input_ids, attention_mask) ->
      [B, D]` (retrieval, zero-shot, search, export).
    - "rerank": `match_logits(video, input_ids, attention_mask, video_cache=None) -> [B, 2]` (class 1 = match, fp32
      even under autocast); "match_video_cache": `match_video_cache(video)`, the video side of match_logits
      computed once per clip for all its candidate texts.
    - "temperature": `current_temperature()`, the contrastive temperature (re-ranking adds similarity / it).
    - "qa" (video question answering): `video_tokens(video) -> [B, N, D]` (a clip encoded once for all its
      questions); `rank_answers(video, question_ids, question_mask, answer_ids, answer_mask, k, video_tokens=None)
      -> (top-k answer indices, scores [Q, A] fp32)`; `answer_memory(video, question_ids, question_mask) ->
      (memory [B, M, D], memory_mask [B, M])`, the states its answer decoder reads; `question_pass`, the top-level
      modules answer_memory runs (--cache_memory computes it once when they are all frozen); `forward(batch)`
      returns the answer loss (answer_ranking.qa_training_loss: from the batch's cached `memory` when it has one).
    - "reconstruct": `reconstruct(video, video_mask, input_ids, attention_mask, ...)` (run_simvtp_vis.py);
      "probe": `decode_pixels(...)`, `pixel_target(...)`, `masked_tube_pixels(...)` and `text_cls`
      (cross_modal_probe.py).
    - "clip_shape": `clip_shape = (num_frames, img_size)`, the clip it was built for (search.py).
    - "no_weight_decay": `no_weight_decay() -> set of parameter names` kept out of weight decay.
    - "default_text_mask_ratio": the MLM ratio a model that masks words uses by default.
    - "optional_keys": tensor names a strict load tolerates missing (e.g. a learnable temperature absent from
      release files).
    """
    model_cfg: dict
    takes_video_mask: bool
    text_masking: str | None
    num_layers: int

    def forward(self, batch: dict, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict: ...

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]: ...

    def layer_id(self, name: str) -> int: ...

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...


# capability -> the attributes a model defines when it has it (CAPABILITY_ALIASES: other names of a capability)
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "retrieval": ("encode_video", "encode_text"),
    "rerank": ("match_logits",),
    "match_video_cache": ("match_video_cache",),
    "temperature": ("current_temperature",),
    "qa": ("rank_answers", "video_tokens", "answer_memory", "question_pass"),
    "reconstruct": ("reconstruct",),
    "probe": ("decode_pixels", "pixel_target", "masked_tube_pixels", "text_cls"),
    "clip_shape": ("clip_shape",),
    "no_weight_decay": ("no_weight_decay",),
    "default_text_mask_ratio": ("default_text_mask_ratio",),
    "optional_keys": ("optional_keys",),
    "model_cfg": ("model_cfg",),
}
CAPABILITY_ALIASES = {"match": "rerank", "match_logits": "rerank", "current_temperature": "temperature",
                      "rank_answers": "qa", "video_tokens": "qa", "decode_pixels": "probe", "text_cls": "probe"}


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under a DDP (or any `.module`) wrapper."""
    return getattr(model, "module", model)


def supports(model: nn.Module, capability: str) -> bool:
    """Whether the model (DDP unwrapped) has the named optional capability of the contract (CAPABILITIES)."""
    name = CAPABILITY_ALIASES.get(capability, capability)
    if name not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; the contract names {', '.join(sorted(CAPABILITIES))}")
    model = unwrap(model)
    return all(getattr(model, attr, None) is not None for attr in CAPABILITIES[name])


def require(model: nn.Module, capability: str, message: str) -> nn.Module:
    """The model when it `supports` the capability, else a ValueError with the caller's message."""
    if not supports(model, capability):
        raise ValueError(message)
    return model


def capability_value(model: nn.Module, capability: str, default: Any = None) -> Any:
    """The attribute of a one-attribute capability (e.g. clip_shape, optional_keys), or `default` without it."""
    name = CAPABILITY_ALIASES.get(capability, capability)
    if not supports(model, name):
        return default
    (attr,) = CAPABILITIES[name]
    return getattr(unwrap(model), attr)


def import_model_modules(modules: list[str] | tuple[str, ...] | None) -> None:
    """Import out-of-tree family modules (`--model_module`): importing one runs its register_family /
    register_model calls, so its models can be built by name like the shipped ones."""
    for module in modules or ():
        importlib.import_module(module)


class ImportModelModule(argparse.Action):
    """--model_module: the module is imported as soon as the flag is parsed, before any model is looked up."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import_model_modules(values)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])


def register_family(family: ModelFamily) -> ModelFamily:
    scratch = argparse.ArgumentParser(add_help=False)
    family.add_args(scratch.add_argument_group(family.name))
    family.flags = tuple(a.dest for a in scratch._actions)
    _FAMILIES[family.name] = family
    return family


def register_model(family: str, aliases: tuple[str, ...] = (), retrieval_model: str | None = None,
                   qa_model: str | None = None):
    """Decorator for a factory `name(**kwargs) -> nn.Module` whose return annotation is the model class: registers
    it with timm (so timm.create_model works too) and with its family; `aliases` are other accepted names;
    `retrieval_model` / `qa_model` name the models its checkpoints are fine-tuned into for those tasks."""
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        cls = inspect.signature(factory, eval_str=True).return_annotation
        _MODELS[factory.__name__] = ModelSpec(factory.__name__, family, cls, factory, retrieval_model, qa_model)
        for alias in aliases:
            _ALIASES[alias] = factory.__name__
        return timm_register_model(factory)
    return wrap


def families() -> list[ModelFamily]:
    load_family_modules()
    return list(_FAMILIES.values())


def canonical_name(name: str) -> str:
    load_family_modules()
    return _ALIASES.get(name, name)


def model_spec(name: str) -> ModelSpec:
    load_family_modules()
    spec = _MODELS.get(canonical_name(name))
    if spec is None:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return spec


def family_of(model: nn.Module) -> ModelFamily:
    """The family a built model belongs to (DDP's .module unwrapped)."""
    model = unwrap(model)
    load_family_modules()
    for spec in _MODELS.values():
        if type(model) is spec.cls:
            return _FAMILIES[spec.family]
    raise ValueError(f"{type(model).__name__} is not a registered model class")


def constructor_args(cls: type) -> set[str]:
    """The keyword arguments `cls` takes; a subclass passing **kwargs on to its parent takes the parent's too."""
    params = inspect.signature(cls.__init__).parameters
    names = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    parent = cls.__mro__[1]
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and parent not in (nn.Module, object):
        names |= constructor_args(parent)
    return names


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; `model.model_cfg` records the canonical name and the arguments given."""
    spec = model_spec(name)
    model = spec.factory(**kwargs)
    model.model_cfg = {"name": spec.name, "kwargs": dict(kwargs)}
    return model

# ----------------------------------------------------------------------------------------------- command line


def add_model_module_arg(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--model_module, for every command that builds a model or reads a checkpoint of one."""
    group.add_argument("--model_module", nargs="+", default=[], action=ImportModelModule, metavar="MODULE",
                       help="import these modules before any model is built: a model family kept outside this "
                       "repository registers its models there (model_registry.register_family / register_model)")


def add_model_args(parser: argparse.ArgumentParser, *, model: str | None, model_help: str,
                   drop_path: float | None = None) -> argparse._ArgumentGroup:
    """--model, the shared --drop_path, and every family's own group (flags default None: the model decides)."""
    from layers import NEGATIVE_MODES, RANK_SCORES  # the matching-loss choices the models check

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=model, help=model_help)
    add_model_module_arg(g)
    g.add_argument("--drop_path", type=float, default=drop_path, help="stochastic depth rate (default: the model's)")
    g.add_argument("--vtm_negatives", default=None, choices=NEGATIVE_MODES,
                   help="matching-loss negatives: hard (default, drawn by contrastive similarity, never the same "
                        "video), random (SimVTP's release) or mixed (the negative video hard, the negative caption "
                        "random)")
    g.add_argument("--vtm_random_epochs", type=int, default=None,
                   help="matching-loss negatives drawn uniformly for this many epochs before --vtm_negatives hard "
                        "(default 0, the papers'): from random weights the head otherwise stays on a constant answer")
    g.add_argument("--w_mlm", type=float, default=None, help="weight of the masked-word loss (default 1)")
    g.add_argument("--w_reverse", type=float, default=None,
                   help="weight of the time-order loss (default 0, the papers'): each caption must prefer its clip "
                        "to the same clip played backwards. Only for captions that name a direction of motion "
                        "(the synthetic set's; on WebVid most captions fit either order)")
    g.add_argument("--w_vtm_rank", type=float, default=None,
                   help="weight of the matching head's rank loss (default 0, the papers'): each non-match's log-odds "
                        "below those of the match it was drawn for, the order re-ranking reads")
    g.add_argument("--vtm_rank_score", default=None, choices=RANK_SCORES,
                   help="what --w_vtm_rank orders: the head's log-odds (default) or log-odds + the pair's contrastive "
                        "logit (no gradient), the sum re-ranking reads; SViTT then trains only its fusion layers and "
                        "head with it")
    for family in families():
        family.add_args(parser.add_argument_group(f"{family.name} model options (other families reject them)"))
    return g


def model_kwargs(args: argparse.Namespace, name: str, **extra: Any) -> dict:
    """Constructor arguments of model `name` from the run flags: the shared ones and its family's flags that were
    set, plus the `extra` ones it takes (e.g. vocab_size). A set flag of another family, or one this model does
    not take, is a ValueError naming it."""
    spec = model_spec(name)
    accepted = constructor_args(spec.cls)
    kwargs = {k: getattr(args, flag) for k, flag in COMMON_FLAGS.items()
              if k in accepted and getattr(args, flag, None) is not None}
    for family in families():
        for flag in family.flags:
            value = getattr(args, flag, None)
            if value is None:
                continue
            if family.name != spec.family:
                raise ValueError(f"--{flag} belongs to the {family.name} model family; --model {spec.name} is "
                                 f"{spec.family}")
            key = family.flag_to_kwarg.get(flag, flag)
            if key not in accepted:
                raise ValueError(f"--{flag} does not apply to --model {spec.name} ({spec.cls.__name__})")
            kwargs[key] = value
    return {**kwargs, **{k: v for k, v in extra.items() if k in accepted}}


def saved_kwargs(cls: type, saved: dict) -> dict:
    """A checkpoint's plain saved args (written before model_cfg existed) -> the constructor arguments of `cls`."""
    accepted = constructor_args(cls)
    renamed = {k: saved.get(flag) for k, flag in COMMON_FLAGS.items()}
    return {k: v for k, v in {**saved, **renamed}.items() if k in accepted and v is not None}

# ----------------------------------------------------------------------------------------------- layer ids


_LAYER_RE = re.compile(r"(?:^|\.)(?:blocks|layer|layers)\.(\d+)\.")
_EMBEDDING_PARTS = ("patch_embed", "text_embeddings", "embeddings", "pos_embed", "cls_token")


def layer_id_from_name(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay, from its name: `...blocks.i.` / `...layer.i.` (BERT) ->
    i + 1; embeddings -> 0; norms, heads and anything else -> the top (num_layers + 1)."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(p in _EMBEDDING_PARTS for p in name.split(".")):
        return 0
    return num_layers + 1


def load_family_modules() -> None:
    """Import the shipped family modules (they register themselves). Called by every lookup rather than at import
    time: a family module imports this one (and layers.py for what the families share, never another family)."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
