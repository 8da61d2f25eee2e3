"""Checkpoint files: safe reading of ours and the release's, atomic writing, resume, pruning, safetensors.

Every read goes through `read_checkpoint_file`: `torch.load(weights_only=True)` with exactly one extra allowed
type, `argparse.Namespace` (the release's and VideoMAE's files pickle their args). Our own checkpoints hold only
tensors and plain Python values. Writing goes to a temporary file in the same folder, then `os.replace`, so a
crash never leaves a half-written checkpoint behind a valid name.

Command line (a small converter):
    python checkpoint.py to-safetensors IN.pth OUT.safetensors   # the model tensors of any supported file
    python checkpoint.py from-safetensors IN.safetensors OUT.pth # -> {"model": state_dict}
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
from typing import Any, Callable

import torch

MODEL_KEYS = ("model", "module", "state_dict")
LATEST_POINTER = "latest"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file."""


def read_checkpoint_file(path: str) -> dict:
    """Load a .pth/.bin (weights_only) or .safetensors file into a dict, with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if _is_safetensors(path):
        from safetensors.torch import load_file
        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def saved_args(ckpt: dict) -> dict:
    """The args a read checkpoint was trained with: ours carry a plain dict, the release's an argparse.Namespace,
    a bare weights file none ({})."""
    saved = ckpt.get("args")
    if isinstance(saved, argparse.Namespace):
        return vars(saved)
    return saved if isinstance(saved, dict) else {}


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


def load_pretrained(model: torch.nn.Module, path: str, strict: bool = False, verbose: bool = True,
                    ckpt: dict | None = None):
    """The one loading function of every entry point: read a file, map its keys onto `model`, load, report.

    Accepts SimVTP pre-training / fine-tuned checkpoints (ours or the release's), VideoMAE's pre-training
    checkpoint, and a BERT checkpoint (file or directory with pytorch_model.bin / model.safetensors).
    Returns the modeling.LoadReport; a shape mismatch raises a ValueError naming the key and both shapes.
    `ckpt`: the file's contents when the caller has read them already (for its args), so a large file is read once.
    """
    from modeling_simvtp import convert_state_dict, load_weights
    if ckpt is None:
        path = _resolve_weights_path(path)
        ckpt = read_checkpoint_file(path)
    state = model_state_dict(ckpt, path)
    mapped, kind = convert_state_dict(state, model)
    report = load_weights(model, mapped, strict=strict)
    if verbose:
        print(f"Loaded {path} as {kind}: {report}")
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


def save_atomic(obj: dict, path: str) -> None:
    """torch.save to a temporary file beside `path`, flush to disk, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_text_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
                        global_step: int, args: dict, keep_last: int = 0, extra: dict | None = None) -> str:
    """Write one resumable checkpoint atomically, point `latest` at it, prune to the last `keep_last`.

    `epoch` is the epoch the checkpoint belongs to; `step_in_epoch` is None when that epoch is complete,
    else the number of optimizer steps already done in it. `latest` is a one-line text file, not a copy.
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "epoch": epoch,
        "step_in_epoch": -1 if step_in_epoch is None else step_in_epoch,
        "global_step": global_step,
        "rng_torch": torch.get_rng_state(),
        "args": args,
        **(extra or {}),
    }
    name = checkpoint_name(epoch, step_in_epoch)
    save_atomic(state, os.path.join(output_dir, name))
    _write_text_atomic(os.path.join(output_dir, LATEST_POINTER), name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            os.remove(old)
    return os.path.join(output_dir, name)


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


def restore_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                           scaler: torch.amp.GradScaler | None) -> tuple[int, int, int]:
    """Load model/optimizer/scaler/RNG from one of our checkpoints.

    Returns (start_epoch, start_step_in_epoch, global_step): where the loop should continue.
    """
    ckpt = read_checkpoint_file(path)
    if "model" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint of this codebase (no model/epoch entries); "
                              "use --finetune / --init_ckpt for weights-only files")
    model.load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if "rng_torch" in ckpt:
        torch.set_rng_state(ckpt["rng_torch"])
    epoch, step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", -1))
    global_step = int(ckpt.get("global_step", 0))
    if step < 0:
        return epoch + 1, 0, global_step
    return epoch, step, global_step


# ----------------------------------------------------------------------------------------------- converter


def resume_if_any(args: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None) -> tuple[int, int, int]:
    """--resume, else (with --auto_resume) the newest checkpoint in --output_dir -> (epoch, step in epoch,
    global step) to continue from; (0, 0, 0) for a fresh run."""
    path = args.resume or (find_latest(args.output_dir) if args.auto_resume else None)
    if not path:
        return 0, 0, 0
    epoch, step, global_step = restore_training_state(path, model, optimizer, scaler)
    print(f"Resumed from {path}: epoch {epoch}, step {step} (global step {global_step})")
    return epoch, step, global_step


def training_saver(args: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, state: Any) -> Callable[[int, int | None], None]:
    """save(epoch, step_in_epoch or None): rank 0 writes the training state atomically, every rank waits for it
    (state.global_step is read at call time)."""
    import distributed
    import utils

    def save(epoch: int, step_in_epoch: int | None) -> None:
        if distributed.is_main_process():
            path = save_training_state(args.output_dir, model=model, optimizer=optimizer, scaler=scaler, epoch=epoch,
                                       step_in_epoch=step_in_epoch, global_step=state.global_step,
                                       args=utils.plain_args(args), keep_last=args.keep_last)
            print(f"Saved {path}")
        distributed.barrier()
    return save


def to_safetensors(src: str, dst: str) -> int:
    """Write the model tensors of any supported checkpoint to safetensors; returns the tensor count."""
    from safetensors.torch import save_file
    state = model_state_dict(read_checkpoint_file(src), src)
    save_file({k: v.contiguous() for k, v in state.items()}, dst)
    return len(state)


def from_safetensors(src: str, dst: str) -> int:
    """safetensors -> {"model": state_dict} .pth, loadable by every entry point."""
    state = read_checkpoint_file(src)
    save_atomic({"model": state}, dst)
    return len(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert SimVTP/VideoMAE/BERT checkpoints to and from safetensors.")
    parser.add_argument("direction", choices=["to-safetensors", "from-safetensors"])
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    convert = to_safetensors if args.direction == "to-safetensors" else from_safetensors
    try:
        count = convert(args.src, args.dst)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
