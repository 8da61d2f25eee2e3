"""The public SimVTP release's own pre-training step and data loader, run from a checkout the user points to, so
that bench_pretrain.py and bench_dataloader.py can time it next to ours in the same run (`--release_src DIR`).

The release is github:wufeim/SimVTP (commit 4b54321, "release code"; later commits only change paths and add a
loading test). Its modules have the same flat names as ours (utils, datasets, engine_for_pretraining, ...), so
it runs in its own interpreter: the benchmarks start this file as a job and read back the JSON it writes. Nothing
of the release is copied here; it is imported from DIR, unchanged on disk, with these in-memory adjustments so it
runs on current libraries and without network (each is printed when applied):
  1. `from torch._six import inf` (utils.py): torch._six is gone; a module `torch._six` with `inf` is provided.
  2. `from numpy.lib.function_base import disp` (datasets.py): gone in numpy 2; a module with `disp` is provided.
  3. optim_factory.py imports ten optimizers from timm 0.4 module paths; those timm 1.x moved or renamed (Nadam,
     NovoGrad, NvNovoGrad, ...) are provided as placeholders that raise if used: the step uses AdamW.
  4. datasets.py imports pandas, which only its MSR-VTT fine-tuning set uses; without pandas installed a
     placeholder module that raises on use is provided.
  5. `AutoModelForMaskedLM.from_pretrained('/apdcephfs/...')` builds a randomly initialised bert-base-uncased
     (BertForMaskedLM(BertConfig())): the release only takes its embeddings, the weights do not change the time.
  6. `BertTokenizerFast.from_pretrained('bert-base-uncased')` loads our bundled copy of that vocabulary, with the
     `_pad_token` attribute its word masking reads (transformers 5 dropped it) set to the pad token.
  7. `torch.cuda.synchronize()` / `torch.cuda.empty_cache()` (called every step and epoch) do nothing without CUDA.
  8. Its get_model calls timm.create_model, which in timm 1.x adds `pretrained_cfg` arguments the model does not
     take; the model function get_model names is called directly with get_model's arguments.
The step is the release's own `engine_for_pretraining.train_one_epoch` (its tokenisation and 75% word masking,
pixel targets, model forward, the four losses, backward, its AdamW from `optim_factory.create_optimizer`) with
the model and optimizer its `run_simvtp_pretraining.py` builds from the flags of its `scripts/pretrain_webvid.sh`.
The data loader is its `build_datasets.build_pretraining_dataset` (decord, multi-scale crop, tube mask).

    python benchmarks/release_simvtp.py --src DIR --job '{"kind": "step", ...}' --job_out out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types

from bench_common import release_first_path, require_release_checkout  # beside this file

# The flags of the release's scripts/pretrain_webvid.sh that shape the step (the rest: paths and schedule).
RELEASE_FLAGS = ["--mask_type", "tube", "--mask_ratio", "0.9", "--model", "pretrain_simvtp_base_patch16_224",
                 "--decoder_depth", "4", "--sampling_rate", "4", "--opt", "adamw", "--opt_betas", "0.9", "0.95",
                 "--lr", "1.5e-4", "--device", "cpu"]


def say(msg: str) -> None:
    print(f"  [release] {msg}", flush=True)


TIMM_OPTIMIZERS = (("adafactor", "Adafactor"), ("adahessian", "Adahessian"), ("adamp", "AdamP"),
                   ("lookahead", "Lookahead"), ("nadam", "Nadam"), ("novograd", "NovoGrad"),
                   ("nvnovograd", "NvNovoGrad"), ("radam", "RAdam"), ("rmsprop_tf", "RMSpropTF"), ("sgdp", "SGDP"))


def provide_timm_optimizers() -> None:
    """The release's optim_factory imports these by timm 0.4 paths; a missing one becomes a placeholder."""
    import importlib

    for module, name in TIMM_OPTIMIZERS:
        full = f"timm.optim.{module}"
        try:
            mod = importlib.import_module(full)
        except ImportError:
            mod = sys.modules[full] = types.ModuleType(full)
        if not hasattr(mod, name):
            def unavailable(*a, _name=name, **k):
                raise RuntimeError(f"{_name} is not in this timm; the release benchmark uses AdamW")
            setattr(mod, name, unavailable)
            say(f"placeholder for {full}.{name} (not in timm 1.x)")


def import_release(src: str, vocab_dir: str):
    """Put the checkout first on sys.path, apply the in-memory adjustments of the module docstring, and return the
    release's run_simvtp_pretraining module (which imports the rest)."""
    require_release_checkout(src)
    sys.path[:] = release_first_path(src)
    import math

    import numpy
    import torch
    import transformers

    if "torch._six" not in sys.modules:
        sys.modules["torch._six"] = types.ModuleType("torch._six")
        sys.modules["torch._six"].inf = math.inf
        say("provided torch._six.inf (removed from torch)")
    try:
        from numpy.lib.function_base import disp  # noqa: F401
    except ImportError:
        sys.modules["numpy.lib.function_base"] = types.ModuleType("numpy.lib.function_base")
        sys.modules["numpy.lib.function_base"].disp = print
        say(f"provided numpy.lib.function_base.disp (removed in numpy {numpy.__version__})")
    provide_timm_optimizers()
    try:
        import pandas  # noqa: F401
    except ImportError:
        placeholder = sys.modules["pandas"] = types.ModuleType("pandas")

        def no_pandas(name):
            raise RuntimeError(f"pandas.{name}: pandas is not installed (only the release's MSR-VTT set uses it)")
        placeholder.__getattr__ = no_pandas
        say("placeholder for pandas (not installed; only the release's MSR-VTT set uses it)")
    transformers.AutoModelForMaskedLM.from_pretrained = (
        lambda *a, **k: transformers.BertForMaskedLM(transformers.BertConfig()))
    load_tokenizer = transformers.BertTokenizerFast.from_pretrained

    def local_tokenizer(*args, **kwargs):
        tokenizer = load_tokenizer(vocab_dir)
        if not hasattr(tokenizer, "_pad_token"):
            tokenizer._pad_token = tokenizer.pad_token
        return tokenizer
    transformers.BertTokenizerFast.from_pretrained = local_tokenizer
    say("bert-base-uncased: random weights for the text embeddings, the vocabulary from " + vocab_dir)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.empty_cache = lambda *a, **k: None
    import run_simvtp_pretraining as release_run
    return release_run


def release_args(release_run, extra: list[str]):
    """The release's own argument parser on its pre-training script's flags plus ours (batch, frames, size)."""
    argv, sys.argv = sys.argv, ["run_simvtp_pretraining.py", "--data_path", "-", *RELEASE_FLAGS, *extra]
    try:
        args = release_run.get_args()
    finally:
        sys.argv = argv
    return args


def build_model(args):
    """What the release's get_model builds, without timm.create_model's timm 1.x extras (adjustment 8)."""
    import modeling_pretrain

    return getattr(modeling_pretrain, args.model)(pretrained=False, drop_path_rate=args.drop_path,
                                                  decoder_depth=args.decoder_depth)


def captions(n: int) -> list[str]:
    base = ("a man in a red jacket rides a bicycle along a mountain road at sunset",
            "aerial view of waves breaking on a sandy beach",
            "close up of hands kneading dough on a wooden table in a bright kitchen",
            "young woman smiling and talking on the phone while walking through the city")
    return [base[i % len(base)] for i in range(n)]


def time_step(job: dict) -> dict:
    """Seconds per step of the release's train_one_epoch: `warmup` untimed batches, then `steps` timed ones."""
    import torch

    release_run = import_release(job["src"], job["vocab_dir"])
    import engine_for_pretraining as release_engine
    import masking_generator as release_masks
    from optim_factory import create_optimizer

    torch.manual_seed(0)
    torch.set_num_threads(job["threads"])
    b, t, s = job["batch_size"], job["num_frames"], job["input_size"]
    args = release_args(release_run, ["--batch_size", str(b), "--num_frames", str(t), "--input_size", str(s)])
    model = build_model(args)
    model.train()
    optimizer = create_optimizer(args, model)
    window = (t // 2, s // 16, s // 16)
    masks = release_masks.TubeMaskingGenerator(window, args.mask_ratio)
    g = torch.Generator().manual_seed(0)
    batch = {"process_data": torch.randn(b, 3, t, s, s, generator=g),
             "mask": torch.stack([torch.from_numpy(masks()) for _ in range(b)]), "text": captions(b)}
    dtype = {"fp32": None, "bf16": torch.bfloat16}[job["precision"]]
    total = job["warmup"] + job["steps"]
    schedule = [args.lr * b / 256] * total, [args.weight_decay] * total

    def epoch(n: int, start: int) -> float:
        autocast = (torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False))
        t0 = time.perf_counter()
        with autocast:
            release_engine.train_one_epoch(model, [batch] * n, optimizer, torch.device("cpu"), 0, None, None,
                                           patch_size=16, normlize_target=True, start_steps=start,
                                           lr_schedule_values=schedule[0], wd_schedule_values=schedule[1],
                                           _mlm_probability=0.75)
        return time.perf_counter() - t0

    say(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, batch {b} x {t} x "
        f"{s} px, {job['precision']}{' (autocast added)' if dtype else ' (its default)'}")
    if job["warmup"]:
        epoch(job["warmup"], 0)
    seconds = epoch(job["steps"], job["warmup"])
    return dict(kind="step", precision=job["precision"], batch_size=b, num_frames=t, input_size=s,
                s_per_step=seconds / job["steps"], steps=job["steps"], threads=torch.get_num_threads(),
                params_M=sum(p.numel() for p in model.parameters()) / 1e6)


def time_loader(job: dict) -> dict:
    """Clips/s of the release's pre-training dataset (decord, its augmentation and tube mask) in one process:
    `warmup` untimed items, then `clips` timed ones, cycling over the files."""
    import torch

    release_run = import_release(job["src"], job["vocab_dir"])
    from build_datasets import build_pretraining_dataset

    torch.set_num_threads(1)
    args = release_args(release_run, ["--num_frames", str(job["num_frames"]), "--input_size",
                                      str(job["input_size"]), "--sampling_rate", str(job["sampling_rate"])])
    args.data_path = job["annotation"]
    args.window_size = (args.num_frames // 2, args.input_size // 16, args.input_size // 16)
    dataset = build_pretraining_dataset(args)
    for i in range(job["warmup"]):
        dataset[i % len(dataset)]
    t0 = time.perf_counter()
    for i in range(job["clips"]):
        dataset[(job["warmup"] + i) % len(dataset)]
    seconds = time.perf_counter() - t0
    return dict(kind="loader", clips_per_s=job["clips"] / seconds, clips=job["clips"], files=len(dataset))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", required=True, help="JSON: kind (step or loader), src, vocab_dir and its settings")
    p.add_argument("--job_out", required=True, help="where to write the figures (JSON)")
    args = p.parse_args()
    job = json.loads(args.job)
    result = {"step": time_step, "loader": time_loader}[job["kind"]](job)
    with open(args.job_out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
