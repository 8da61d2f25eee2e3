"""Checkpoint files and the run settings they carry: safe reading of ours and the release's, atomic writing,
resume, pruning, safetensors, args.json.

Every read goes through `read_checkpoint_file`: `torch.load(weights_only=True)` with one extra allowed type,
`argparse.Namespace` (the release's and VideoMAE's files pickle their args), and inert stand-ins for the classes of
a pickled OmegaConf config (the SViTT release's "config"), read as plain dicts: nothing in a file is imported or
run. Our own checkpoints hold only tensors and plain Python values. Writing goes to a temporary file in the same folder, then `os.replace`, so a
crash never leaves a half-written checkpoint behind a valid name; new files get the permissions the umask gives
(0644 under the usual umask 022), so colleagues and evaluation accounts can read them.

Command line (a small converter; the output's folder is created, the input is never overwritten):
    python checkpoint.py to-safetensors IN.pth OUT.safetensors   # model tensors + model_cfg/args as metadata
    python checkpoint.py from-safetensors IN.safetensors OUT.pth # -> {"model", "model_cfg", "args"}
Both outputs load wherever a checkpoint is taken (--finetune, --ckpt, build_model_from).
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import secrets
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import distributed
import model_registry

MODEL_KEYS = ("model", "module", "state_dict")
LATEST_POINTER = "latest"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file."""


def read_checkpoint_file(path: str) -> dict:
    """Load a .pth/.bin (weights_only) or .safetensors file into a dict, with errors that name the file.

    A pickled OmegaConf config (the SViTT release's "config") is read into plain dicts and lists without importing
    or running anything (see PickledConfigNode); any other global outside torch's allow-list is refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if _is_safetensors(path):
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *pickled_config_stand_ins()]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(_refused_global_message(path, refused.group(1))) from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return {k: plain_data(v) if _holds_stand_in(v) else v for k, v in obj.items()}


def _refused_global_message(path: str, name: str) -> str:
    keep = f"{path}.weights.pth"
    return (f"{path}: refused to unpickle {name} (loading it could run code; only tensors, plain values and "
            "OmegaConf configs are read); if you trust the file, keep its weights once in the environment that wrote "
            f"it: python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'model': c['model']}}, '{keep}')\" and load {keep}")


# ---------------------------------------------------------------------------------- pickled OmegaConf configs

# every global a pickled OmegaConf config references (omegaconf 2.0-2.4): its node classes, its metadata, the
# types its metadata names, and the resolver cache's defaultdict. Each is replaced by an inert stand-in.
OMEGACONF_CLASSES = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode", "omegaconf.nodes.PathNode")
CONFIG_TYPE_NAMES = ("typing.Any", "builtins.dict", "builtins.list", "builtins.int", "builtins.float",
                     "builtins.str", "builtins.bool", "builtins.bytes", "builtins.object")


class PickledConfigNode:
    """Stand-in for an OmegaConf class: the unpickler creates it (NEWOBJ, or a call on REDUCE) and hands it its
    state (BUILD -> __setstate__); it stores both as plain data and never imports, calls or evaluates anything."""
    pickled_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class PickledTypeName:
    """Stand-in for a type or typing object a config's metadata names (`typing.Any`, `dict`): only its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _plain_defaultdict(*args: Any) -> dict:
    """collections.defaultdict(factory) as the unpickler rebuilds it: an empty plain dict (factory never kept)."""
    return {}


@functools.lru_cache(maxsize=1)
def pickled_config_stand_ins() -> tuple[tuple[Any, str], ...]:
    """(stand-in, "module.QualName") pairs for torch.serialization.safe_globals: OmegaConf's classes become
    PickledConfigNode subclasses, the types their metadata names become PickledTypeName values."""
    classes = tuple((type(name.rsplit(".", 1)[1], (PickledConfigNode,), {"pickled_name": name}), name)
                    for name in OMEGACONF_CLASSES)
    names = tuple((PickledTypeName(name), name) for name in CONFIG_TYPE_NAMES)
    return classes + names + ((_plain_defaultdict, "collections.defaultdict"),)


def _holds_stand_in(value: Any) -> bool:
    return isinstance(value, (PickledConfigNode, PickledTypeName))


def plain_data(value: Any, depth: int = 0) -> Any:
    """A read OmegaConf config -> plain dicts, lists and values (DictConfig -> dict, ListConfig -> list, a value
    node -> its value; interpolations stay strings). Plain data passes through unchanged."""
    if depth > 100:
        raise CheckpointError("pickled config nested deeper than 100 levels")
    if isinstance(value, PickledConfigNode):
        state = value.state if isinstance(value.state, dict) else {}
        content = state.get("_content", state.get("_val"))
        return plain_data(content, depth + 1)
    if isinstance(value, PickledTypeName):
        return value.name
    if isinstance(value, dict):
        return {k: plain_data(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, depth + 1) for v in value]
    return value


def file_config(ckpt: dict) -> dict:
    """The training config a release file carries ("config", read as plain data), or {}."""
    config = ckpt.get("config")
    return config if isinstance(config, dict) else {}


def saved_args(ckpt: dict) -> dict:
    """The args a read checkpoint was trained with: ours carry a plain dict, the release's an argparse.Namespace,
    a bare weights file none ({})."""
    saved = ckpt.get("args")
    if isinstance(saved, argparse.Namespace):
        return vars(saved)
    return saved if isinstance(saved, dict) else {}


# safetensors metadata (str -> str) entries holding our checkpoint entries as JSON, written by to_safetensors
SAFETENSORS_ENTRIES = ("model_cfg", "args")


def _read_safetensors(path: str) -> dict:
    """A plain safetensors file (e.g. BERT's) -> its flat tensors; one of ours, whose metadata carries model_cfg /
    args, -> {"model": tensors, "model_cfg": ..., "args": ...} like the .pth it came from."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    entries = {}
    for key in SAFETENSORS_ENTRIES:
        if key in metadata:
            try:
                entries[key] = json.loads(metadata[key])
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: metadata entry {key!r} is not JSON ({e})") from e
    return {"model": tensors, **entries} if entries else tensors


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors starts with an 8-byte little-endian header length, then the JSON header's '{'
    return len(head) == 9 and head[8:9] == b"{"


def model_state_dict(ckpt: dict, path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model's tensors from a checkpoint dict: under "model" (ours, the release), "module" (DeepSpeed),
    "state_dict", or the dict itself when it is already flat."""
    for key in MODEL_KEYS:
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    tensors = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no model tensors found (looked for keys {MODEL_KEYS} and flat tensors)")
    return tensors


def unwrapped_state_dict(ckpt: dict, path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """model_state_dict without the `module.` prefix a DDP / DeepSpeed wrapper adds to every name."""
    state = model_state_dict(ckpt, path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_pretrained(model: torch.nn.Module, path: str, strict: bool = False, verbose: bool = True,
                    ckpt: dict | None = None) -> "LoadReport":
    """The one loading function of every entry point: read a file, map its keys onto `model` with the converter
    of the model's family (e.g. SimVTP's maps the release's, VideoMAE's and BERT's files), load, report.

    Returns the LoadReport; a file that does not fit (shape mismatch, unknown source) is a CheckpointError naming
    the file, the key and both shapes.
    `ckpt`: the file's contents when the caller has read them already, so a large file is read once.
    """
    if ckpt is None:
        path = _resolve_weights_path(path)
        ckpt = read_checkpoint_file(path)
    state = unwrapped_state_dict(ckpt, path)
    convert = model_registry.family_of(model).convert_state_dict
    config = {"file_config": file_config(ckpt)} if file_config(ckpt) else {}  # a release's config (SViTT)
    try:
        mapped, kind = convert(state, model_registry.unwrap(model), **config)
        report = load_weights(model, mapped, strict=strict)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if verbose:
        print(f"Loaded {path} as {kind}: {report}")
    return report


def build_model_from(ckpt: dict, path: str = "<checkpoint>", name: str | None = None, strict: bool = True,
                     flags: Callable[[str], dict] | None = None, **overrides: Any) -> torch.nn.Module:
    """Rebuild the model a checkpoint holds and load it (strictly by default: half-loaded weights score nonsense).

    The model is `name` if given, else the file's `model_cfg` (ours), else the model its saved args name (ours
    before model_cfg), else the one its keys identify (the release's). `flags(model name) -> constructor
    arguments` set on the command line: they win over what the file implies (a release file implies the model's
    defaults), and those that change it are printed in one line. `overrides` replace constructor arguments.
    """
    cfg = ckpt.get("model_cfg") if isinstance(ckpt.get("model_cfg"), dict) else None
    saved = saved_args(ckpt)
    if cfg is not None:
        chosen, kwargs = cfg["name"], dict(cfg.get("kwargs", {}))
    elif saved.get("model"):
        chosen = saved["model"]
        kwargs = model_registry.saved_kwargs(model_registry.model_spec(chosen).cls, saved)
    else:
        chosen, kwargs = _recognise(ckpt, path), {}
    if name and model_registry.canonical_name(name) != model_registry.canonical_name(chosen):
        # another model of the checkpoint: keep the arguments it takes (clip shape, vocabulary, options)
        accepted = model_registry.constructor_args(model_registry.model_spec(name).cls)
        chosen, kwargs = name, {k: v for k, v in kwargs.items() if k in accepted}
    if flags is not None:
        kwargs = _command_line_over_file(kwargs, flags(chosen), path)
    model = model_registry.create(chosen, **{**kwargs, **overrides})
    try:
        load_pretrained(model, path, strict=strict, ckpt=ckpt)
    except ValueError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: does not load into {chosen} ({reason}); pass the right --model") from e
    return model


def _command_line_over_file(from_file: dict, given: dict, path: str) -> dict:
    """The file's constructor arguments with the command line's on top; the ones that change them are printed."""
    changed = {k: v for k, v in given.items() if k not in from_file or from_file[k] != v}
    if changed:
        said = ", ".join(f"{k} {v} (file: {from_file[k] if k in from_file else 'model default'})"
                         for k, v in changed.items())
        print(f"{path}: model settings from the command line: {said}")
    return {**from_file, **given}


def _recognise(ckpt: dict, path: str) -> str:
    keys = list(unwrapped_state_dict(ckpt, path))
    for family in model_registry.families():
        found = family.recognise(keys)
        if found:
            return found
    raise CheckpointError(f"{path}: names no model (no model_cfg or args) and its {len(keys)} tensors (first "
                          f"{keys[:3]}) match no family's known files; pass --model")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    ignored: list[str] = field(default_factory=list)  # non-persistent buffers (e.g. BERT's position_ids)

    def __str__(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        for name in ("missing", "unexpected", "ignored"):
            names = getattr(self, name)
            if names:
                parts.append(f"{len(names)} {name}: {compact_names(names)}")
        return "; ".join(parts)


def compact_names(names: list[str]) -> str:
    """Names with layer indices folded: 'blocks.*.attn.qkv.weight (x12)'."""
    groups = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    return ", ".join(g if c == 1 else f"{g} (x{c})" for g, c in sorted(groups.items()))


def load_weights(model: torch.nn.Module, state_dict: dict, strict: bool) -> LoadReport:
    """Copy the tensors of an already mapped state_dict into `model` (cast to its dtype).

    A shape mismatch is a ValueError naming each key and both shapes; with strict, any missing or unexpected
    tensor (other than the model's `optional_keys`) is a ValueError listing them. Nothing is copied on error."""
    model = model_registry.unwrap(model)
    own = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()} - set(own)
    report = LoadReport(missing=[k for k in own if k not in state_dict])
    mismatched = []
    for k, v in state_dict.items():
        if k in buffers:
            report.ignored.append(k)
        elif k not in own or not isinstance(v, torch.Tensor):
            report.unexpected.append(k)
        elif v.shape != own[k].shape:
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            report.loaded.append(k)
    if mismatched:
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise ValueError(f"shape mismatch of {len(mismatched)} tensors: " + "; ".join(mismatched[:3]) + more)
    if strict:
        optional = set(model_registry.capability_value(model, "optional_keys", ()))
        bad = [k for k in report.missing + report.unexpected if k not in optional]
        if bad:
            raise ValueError(f"strict load: missing {compact_names([k for k in report.missing if k in bad]) or '-'}; "
                             f"unexpected {compact_names([k for k in report.unexpected if k in bad]) or '-'}")
    model.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    return report


def _resolve_weights_path(path: str) -> str:
    """A directory (e.g. a local bert-base-uncased) stands for the weights file inside it."""
    if not os.path.isdir(path):
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{path}: directory holds neither model.safetensors nor pytorch_model.bin")


# ----------------------------------------------------------------------------------------------- writing


def _new_temp_file(folder: str, name: str) -> str:
    """Create an empty hidden file in `folder` with mode 0666 & ~umask, as any new file gets (tempfile.mkstemp
    makes 0600, which the rename keeps: no one else on a shared cluster could read the checkpoint)."""
    while True:
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(4)}-{name[:100]}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:  # name the file the caller asked for, not the temporary one
            raise type(e)(e.errno, f"cannot create a file in {folder} ({e.strerror})", os.path.join(folder, name))


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` to a new file beside `path` (folder created), flush it to disk, then rename over `path`:
    a crash leaves the old file or none, never half of one. The temporary file is removed on any error."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _new_temp_file(folder, os.path.basename(path))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors: 0600)
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj: dict, path: str) -> None:
    """torch.save to a temporary file beside `path`, flush to disk, then rename over `path`."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    write_atomic(path, write)


def write_text_atomic(path: str, text: str) -> None:
    """A text file written as write_atomic writes: whole or not at all."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def checkpoint_name(epoch: int, step_in_epoch: int | None = None) -> str:
    """checkpoint-<epoch>.pth after a whole epoch; checkpoint-<epoch>-step<k>.pth inside one."""
    return f"checkpoint-{epoch}.pth" if step_in_epoch is None else f"checkpoint-{epoch}-step{step_in_epoch}.pth"


_NAME_RE = re.compile(r"checkpoint-(\d+)(?:-step(\d+))?\.pth$")


def _order_key(path: str) -> tuple[int, float]:
    m = _NAME_RE.search(os.path.basename(path))
    assert m is not None
    epoch, step = int(m.group(1)), m.group(2)
    # a finished epoch sorts after every step inside it
    return epoch, float("inf") if step is None else int(step)


def list_checkpoints(output_dir: str) -> list[str]:
    """Our training checkpoints in `output_dir`, oldest first."""
    paths = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")) if _NAME_RE.search(p)]
    return sorted(paths, key=_order_key)


def save_training_state(output_dir: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None, epoch: int, step_in_epoch: int | None,
                        global_step: int, args: dict, keep_last: int = 0, train_state: dict | None = None,
                        rng_states: list[dict] | None = None) -> str:
    """Write one resumable checkpoint atomically, point `latest` at it, prune to the last `keep_last`.

    `epoch` is the epoch the checkpoint belongs to; `step_in_epoch` is None when that epoch is complete, else the
    optimizer steps already done in it (the file's name). `train_state` is the loop's exact position and counters,
    `rng_states` every rank's generator states (rank order). `latest` is a one-line text file, not a copy.
    """
    state = {
        "model": model.state_dict(),
        "model_cfg": model_registry.capability_value(model, "model_cfg"),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "epoch": epoch,
        "step_in_epoch": -1 if step_in_epoch is None else step_in_epoch,
        "global_step": global_step,
        "train_state": train_state or {},
        "rng_states": rng_states if rng_states is not None else [rng_state()],
        "args": args,
    }
    name = checkpoint_name(epoch, step_in_epoch)
    save_atomic(state, os.path.join(output_dir, name))
    write_text_atomic(os.path.join(output_dir, LATEST_POINTER), name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            os.remove(old)
    return os.path.join(output_dir, name)


def rng_state() -> dict:
    """This process's torch generators: the CPU one and every visible GPU's (drop-path, VTM negatives)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(states: list[dict], rank: int, world_size: int) -> None:
    """Each rank restores its own generators; a different process count cannot continue them (warned)."""
    if len(states) != world_size:
        print(f"WARNING: the checkpoint holds the generator states of {len(states)} process(es), this run has "
              f"{world_size}: random draws (drop-path, negatives) will differ from an uninterrupted run", flush=True)
        return
    torch.set_rng_state(states[rank]["cpu"])
    if states[rank]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states[rank]["cuda"])


def find_latest(output_dir: str) -> str | None:
    """The checkpoint `latest` points to, else the newest checkpoint-*.pth, else None."""
    pointer = os.path.join(output_dir, LATEST_POINTER)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            candidate = os.path.join(output_dir, f.read().strip())
        if os.path.isfile(candidate):
            return candidate
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def agreed_latest(output_dir: str) -> str | None:
    """find_latest as rank 0 sees it, on every rank (its file name, joined to this rank's --output_dir): another
    node may still see an older `latest` (NFS caching), and ranks resuming at different steps hang."""
    latest = distributed.main_value(lambda: find_latest(output_dir))
    return os.path.join(output_dir, os.path.basename(latest)) if latest else None


def check_same_position(path: str, train_state: dict) -> None:
    """Every rank must have read the same training position from `path`; else (storage showing the ranks
    different files) a CheckpointError on every rank, instead of collectives that never match."""
    views = distributed.gather_objects((int(train_state["global_step"]), int(train_state["samples_in_epoch"])))
    if len(set(views)) > 1:
        raise CheckpointError(f"{path}: the processes read different training positions from it (global step, "
                              f"samples per rank: {views}); --output_dir must be shared storage every node sees "
                              "the same way")


def restore_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                           scaler: torch.amp.GradScaler | None, ckpt: dict | None = None) -> dict:
    """Load model/optimizer/scaler and this rank's generators from one of our checkpoints; returns the loop's
    saved train_state (position and counters; rebuilt from the epoch/step fields for older files)."""
    ckpt = read_checkpoint_file(path) if ckpt is None else ckpt
    check_same_model(ckpt, path, model)
    model.load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng_states"):
        set_rng_state(ckpt["rng_states"], distributed.get_rank(), distributed.get_world_size())
    elif "rng_torch" in ckpt:  # older files: rank 0's CPU generator only
        torch.set_rng_state(ckpt["rng_torch"])
    saved = saved_args(ckpt)
    if ckpt.get("train_state"):
        state = dict(ckpt["train_state"])
    else:
        epoch, step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", -1))
        accum = int(saved.get("accum_iter", 1))
        state = {"global_step": int(ckpt.get("global_step", 0)),
                 **({"epoch": epoch + 1, "micro_in_epoch": 0} if step < 0 else
                    {"epoch": epoch, "micro_in_epoch": step * accum})}
    if "samples_in_epoch" not in state:  # older files count micro-batches of their own batch size and processes
        state["samples_in_epoch"] = (int(state.get("micro_in_epoch", 0)) * int(saved.get("batch_size", 1))
                                     * int(saved.get("world_size", 1)))
    return state


def describe_checkpoint(ckpt: dict, path: str) -> str:
    """What a file holds, in a few words: its model_cfg name, or the model its saved args or keys identify."""
    cfg = ckpt.get("model_cfg")
    if isinstance(cfg, dict) and cfg.get("name"):
        return str(cfg["name"])
    if saved_args(ckpt).get("model"):
        return str(saved_args(ckpt)["model"])
    try:
        return f"{_recognise(ckpt, path)} weights"
    except CheckpointError:
        return f"{len(unwrapped_state_dict(ckpt, path))} tensors of no known model"


def check_same_model(ckpt: dict, path: str, model: torch.nn.Module) -> None:
    """--resume needs a training checkpoint of the model being trained: else one line saying what the file holds
    and what to do, never a key list."""
    has_cfg = model_registry.supports(model, "model_cfg")
    ours = model_registry.canonical_name(model.model_cfg["name"]) if has_cfg else None
    held = describe_checkpoint(ckpt, path)
    if "model" not in ckpt or "epoch" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(
            f"{path}: holds {held} but no training state (epoch, optimizer), so it cannot be resumed; to start "
            "from its weights, pass it as --init_ckpt (pre-training) or --finetune (fine-tuning) instead of --resume")
    if ours and model_registry.canonical_name(held) != ours:
        raise CheckpointError(
            f"{path}: is a training checkpoint of {held}, this run trains {ours}; to continue it pass "
            f"--model {held} (or a fine-tuning file to run_simvtp_finetuning.py); to start from its weights use "
            "--init_ckpt / --finetune with a new --output_dir")
    mine = model.model_cfg.get("kwargs", {}) if has_cfg else {}
    theirs = ckpt.get("model_cfg", {}).get("kwargs", {}) if isinstance(ckpt.get("model_cfg"), dict) else {}
    shape = {k: (theirs[k], mine[k]) for k in ("img_size", "num_frames") if k in theirs and k in mine
             and theirs[k] != mine[k]}
    if shape:
        said = ", ".join(f"--{model_registry.COMMON_FLAGS[k]} {old} (this run: {new})" for k, (old, new) in shape.items())
        flags = " ".join(f"--{model_registry.COMMON_FLAGS[k]} {old}" for k, (old, _) in shape.items())
        raise CheckpointError(f"{path}: was trained with {said}; pass {flags} to continue it")


# run plumbing: where things go, how they are printed or loaded; changing these on resume changes nothing learnt
RESUME_PLUMBING = {"output_dir", "log_dir", "resume", "auto_resume", "num_workers", "pin_mem", "print_freq",
                   "device", "device_obj", "rank", "gpu", "distributed", "dist_url", "dist_eval", "save_ckpt_freq",
                   "save_every_steps", "keep_last", "max_steps", "video_backend", "eval_every", "skip_eval_check",
                   "eval_host_memory_gb", "decode_threads"}


def plain_args(args: Any) -> dict:
    """argparse.Namespace -> dict of plain JSON-able values (our checkpoints hold no pickled objects)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def save_args_json(args: Any, output_dir: str, resumed: dict | None = None) -> None:
    """args.json: this run's settings. A resumed run keeps the earlier file's `resume_history` and adds `resumed`
    (where it continued from and which settings changed), so a run's changes of settings stay on record."""
    if not distributed.is_main_process():
        return
    path = os.path.join(output_dir, "args.json")
    history = []
    if resumed is not None and os.path.isfile(path):
        try:
            with open(path) as f:
                history = list(json.load(f).get("resume_history", []))
        except (OSError, ValueError):
            history = []
    record = plain_args(args)
    if resumed is not None:
        record["resume_history"] = history + [resumed]
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)


# settings added after checkpoints were first written -> the behaviour such a checkpoint's run had without them
SETTINGS_BEFORE_THEY_EXISTED = {"sample_type": "stride", "sample_type_test": "stride"}


def setting_changes(saved: dict, args: Any) -> dict[str, tuple[Any, Any]]:
    """Settings of a resumed run that differ from the checkpoint's (flag -> (old, new)); plumbing and values
    derived from others (abs_lr ...) are left out. A flag newer than the checkpoint counts as the behaviour the
    run had before it existed (SETTINGS_BEFORE_THEY_EXISTED)."""
    now = plain_args(args)
    if saved:
        saved = {**SETTINGS_BEFORE_THEY_EXISTED, **saved}
    keys = (set(saved) & set(now)) - RESUME_PLUMBING
    return {k: (saved[k], now[k]) for k in sorted(keys) if not k.startswith("abs_") and saved[k] != now[k]}


def check_resume_settings(changes: dict[str, tuple[Any, Any]], mid_epoch: bool, dataset_size: tuple[int, int],
                          path: str) -> None:
    """Refuse a change that cannot be honoured: inside an epoch, the position is a count of samples of that
    epoch's order, which another --seed or another training list would make meaningless."""
    old_size, new_size = dataset_size
    if not mid_epoch:
        return
    if "seed" in changes:
        raise CheckpointError(f"{path}: saved inside an epoch of --seed {changes['seed'][0]}; the rest of that "
                              f"epoch is defined by its order: pass --seed {changes['seed'][0]} to continue")
    if old_size and old_size != new_size:
        raise CheckpointError(f"{path}: saved inside an epoch of a {old_size}-clip training list, this one has "
                              f"{new_size}; the position cannot carry over: pass the same --data_path (and "
                              "--exclude_list) to continue, or resume from an epoch-end checkpoint")


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """One line: `--batch_size 4 -> 2, processes 1 -> 2`."""
    label = {"world_size": "processes"}
    return ", ".join(f"{label.get(k, '--' + k)} {old} -> {new}" for k, (old, new) in changes.items())


def resume_if_any(args: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None, dataset_size: int = 0) -> tuple[dict, dict] | None:
    """--resume, else (with --auto_resume) the newest checkpoint in --output_dir -> (its train_state to continue
    from, a record of the resume for args.json); None for a fresh run. Changed settings are reported in one line,
    a change that cannot be honoured is refused (CheckpointError naming the flag that restores it)."""
    path = args.resume or (agreed_latest(args.output_dir) if args.auto_resume else None)
    if not path:
        return None
    if os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: is a folder; give a checkpoint file in it (e.g. "
                              f"{find_latest(path) or 'checkpoint-N.pth'}) or pass it as --output_dir with "
                              "--auto_resume")
    ckpt = read_checkpoint_file(path)
    check_same_model(ckpt, path, model)
    state = ckpt.get("train_state") or {}
    changes = setting_changes(saved_args(ckpt), args)
    mid_epoch = int(ckpt.get("step_in_epoch", -1)) >= 0
    check_resume_settings(changes, mid_epoch, (int(state.get("dataset_size", 0)), dataset_size), path)
    train_state = restore_training_state(path, model, optimizer, scaler, ckpt=ckpt)
    check_same_position(path, train_state)
    print(f"Resumed from {path}: epoch {train_state['epoch']}, sample {train_state['samples_in_epoch']} of it "
          f"(global step {train_state['global_step']})")
    if changes:
        batch = {"batch_size", "world_size", "accum_iter"} & set(changes)
        note = " (the global batch changed: the lr follows it, --lr is per 256 clips)" if batch else ""
        print(f"Resuming with changed settings: {describe_changes(changes)}{note}")
    record = {"checkpoint": path, "epoch": train_state["epoch"], "samples_in_epoch": train_state["samples_in_epoch"],
              "changed": {k: list(v) for k, v in changes.items()}}
    return train_state, record


def training_saver(args: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, state: Any) -> Callable[[int, int | None], None]:
    """save(epoch, step_in_epoch or None), called by every rank: the ranks' generator states are gathered, rank 0
    writes the training state (state.to_dict() at call time) atomically, every rank waits for it."""
    def save(epoch: int, step_in_epoch: int | None) -> None:
        rng_states = distributed.gather_objects(rng_state())
        if distributed.is_main_process():
            path = save_training_state(args.output_dir, model=model, optimizer=optimizer, scaler=scaler, epoch=epoch,
                                       step_in_epoch=step_in_epoch, global_step=state.global_step,
                                       args=plain_args(args), keep_last=args.keep_last,
                                       train_state=state.to_dict(), rng_states=rng_states)
            print(f"Saved {path}")
        distributed.barrier()
    return save


def keep_periodic(output_dir: str, epoch: int, every: int, last_epoch: int) -> None:
    """Besides the rolling last-K, keep a hard-linked copy every `every` epochs and of the last (no extra disk)."""
    if not distributed.is_main_process() or every <= 0:
        return
    if (epoch + 1) % every == 0 or epoch == last_epoch:
        src = os.path.join(output_dir, checkpoint_name(epoch))
        dst = os.path.join(output_dir, f"keep-checkpoint-{epoch}.pth")
        if os.path.exists(src) and not os.path.exists(dst):
            os.link(src, dst)


EVAL_STATE = "eval_state.json"


def read_eval_state(output_dir: str) -> dict:
    """The small record of evaluations done ({"epoch", "global_step": the last evaluated; "best", "best_epoch",
    "metric": model selection}), so the best score is known without loading a checkpoint; {} before any."""
    path = os.path.join(output_dir, EVAL_STATE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_eval_state(output_dir: str, record: dict) -> None:
    """Rank 0 only; atomic, like the checkpoints."""
    if distributed.is_main_process():
        write_text_atomic(os.path.join(output_dir, EVAL_STATE), json.dumps(record) + "\n")


def _check_output(src: str, dst: str) -> None:
    """The converter must never write over its input, however the two paths are spelled (links included)."""
    if os.path.isdir(dst):
        raise ValueError(f"{dst}: is a directory; give the output file's name")
    same = os.path.realpath(src) == os.path.realpath(dst)
    if not same and os.path.exists(dst):
        same = os.path.samefile(src, dst)
    if same:
        raise ValueError(f"{dst}: is the input file; give another output path (the input is never overwritten)")


def _safetensors_tensors(state: dict, path: str) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing memory with another (safetensors refuses both)."""
    out, seen = {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {k!r} is a {type(v).__name__}, not a tensor")
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.detach().clone().contiguous() if ptr in seen else v.detach().contiguous()
        if ptr is not None:
            seen.add(ptr)
    return out


def to_safetensors(src: str, dst: str) -> str:
    """Write the model tensors of any supported checkpoint to safetensors, with its model_cfg and args (ours; the
    release's args) as JSON metadata, so the file rebuilds the model alone. Returns a summary of what was written."""
    from safetensors.torch import save_file
    _check_output(src, dst)
    ckpt = read_checkpoint_file(src)
    tensors = _safetensors_tensors(model_state_dict(ckpt, src), src)
    entries = {"model_cfg": ckpt.get("model_cfg"), "args": saved_args(ckpt) or None}
    metadata = {"format": "pt", **{k: json.dumps(v, default=str) for k, v in entries.items() if v is not None}}
    write_atomic(dst, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return _summary(dst, len(tensors), [k for k in SAFETENSORS_ENTRIES if k in metadata],
                    [k for k in ckpt if k not in (*MODEL_KEYS, *SAFETENSORS_ENTRIES)
                     and not isinstance(ckpt[k], torch.Tensor)])


def from_safetensors(src: str, dst: str) -> str:
    """safetensors -> {"model": state_dict, "model_cfg", "args"} .pth (the entries its metadata holds), which
    every entry point loads. Returns a summary of what was written."""
    _check_output(src, dst)
    if os.path.isfile(src) and os.path.getsize(src) > 0 and not _is_safetensors(src):
        raise CheckpointError(f"{src}: not a safetensors file (use to-safetensors to convert a .pth)")
    ckpt = read_checkpoint_file(src)
    out = ckpt if "model" in ckpt and isinstance(ckpt["model"], dict) else {"model": ckpt}
    save_atomic(out, dst)
    return _summary(dst, len(out["model"]), [k for k in SAFETENSORS_ENTRIES if k in out], [])


def _summary(dst: str, count: int, entries: list[str], left_out: list[str]) -> str:
    text = f"wrote {dst}: {count} model tensors"
    text += f" and {' + '.join(entries)}" if entries else " (no model_cfg or args: loaders identify the model " \
                                                          "by its keys or need --model)"
    if left_out:
        text += f"; left out (training state, not weights): {', '.join(left_out)}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert SimVTP/VideoMAE/BERT checkpoints to and from safetensors. to-safetensors keeps the "
                    "model tensors and the model's description (model_cfg, args) as metadata; optimizer and "
                    "other training state are left out. The output's folder is created; the input is never "
                    "overwritten. Exit status: 0 written, 2 bad input or output.")
    parser.add_argument("direction", choices=["to-safetensors", "from-safetensors"],
                        help="to-safetensors: .pth/.bin -> .safetensors; from-safetensors: .safetensors -> .pth")
    parser.add_argument("src", help="input checkpoint file (never modified)")
    parser.add_argument("dst", help="output file (replaced atomically if it exists; must differ from src)")
    args = parser.parse_args(argv)
    convert = to_safetensors if args.direction == "to-safetensors" else from_safetensors
    try:
        summary = convert(args.src, args.dst)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError; FileNotFoundError an OSError
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.strerror and e.filename else e
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
