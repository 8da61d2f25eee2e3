"""The public SViTT release's own vision tower, run from a checkout the user points to, so that bench_svitt.py can
time it next to ours in the same run (`--release_src DIR`).

The release is github:JerryYLi/svitt (commit c8806b3, "Initial commit", its only one). Its BEiT and BERT code
is written against the transformers internals of 2022 and 2023, which transformers 5 no longer has, so it runs in
an interpreter of its own, in an environment outside this repository (not in requirements.txt):

    python3.11 -m venv /tmp/svitt_env
    /tmp/svitt_env/bin/pip install torch==2.14.1 'transformers==4.55.*' einops

(transformers 4.55 also brings numpy; torch 2.14.1 is the version our own environment times.) bench_svitt.py
starts this file with that interpreter, one job per timed row, and reads back the JSON it writes.

What is timed: the module the release's retrieval and pre-training models call `vision_encoder`, i.e.
`models.sparse_xbeit.BeitModel(config, add_pooling_layer=True, num_frames=T)`, with the config its
`build_huggingface_vit_with_image_size` (models/model_retrieval_base.py) makes: the BEiT-B/16 config
(configs/beit-base-patch16-224-pt22k-ft22k.json in the checkout, its copy of the hub's) updated with
`image_size` 224 and the yaml's `vision_encoder_args` (bench_svitt.py sends them: dense = `sparse_random_attn`
None, the release's full-attention path; edge = local 1 + random 3 blocks of 56; edge+node adds `token_keep_rate`
after layers 3 6 9). Two values differ from that builder, neither touching its code:
  - weights: random (the model's own initialisation) instead of the hub's BEiT weights; speed does not depend
    on them, and without network the hub cannot be reached;
  - `drop_path_rate` 0 (the json has 0.1) as in our timed tower; it only acts in train mode (forward + backward).
The release's own vision_layernorm, applied by its model on top of the tower, is not timed (nor is ours).

Nothing of the release is copied here; it is imported from DIR, unchanged on disk, with one in-memory adjustment
(printed when applied):
  1. models/sparse_xbeit.py imports `zCurve` and `hilbert` (PyPI: zCurve, numpy-hilbert-curve) at the top, used
     only for `token_3d_order` zcurve / hilbert (the configs use none); when not installed, placeholder modules
     that raise on use are provided.
bf16: the release runs fp16 autocast on CUDA; here, as for ours, torch.autocast("cpu", bfloat16) is put around
the tower's forward (weights fp32). Timing as bench_svitt's tower_job: same threads, seeds, input and loss, one
untimed warm-up call, then the median of `repeats` calls; forward in eval mode under torch.no_grad(), forward +
backward in train mode. The release draws its random blocks from torch's global generator, in every layer: it is
seeded with 0 at the start of every call, as ours gets a generator seeded with 0.

    /tmp/svitt_env/bin/python benchmarks/release_svitt.py --src DIR --job '{"frames": 4, ...}' --job_out out.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import sys
import types

from bench_common import release_first_path, require_svitt_release_checkout, time_calls  # beside this file

BATCH, IMAGE_SIZE = 2, 224
BEIT_CONFIG = os.path.join("configs", "beit-base-patch16-224-pt22k-ft22k.json")
# (module, its PyPI name, the function the release calls, the token_3d_order that calls it)
OPTIONAL_MODULES = (("zCurve", "zCurve", "par_interlace", "zcurve"),
                    ("hilbert", "numpy-hilbert-curve", "encode", "hilbert"))


def say(msg: str) -> None:
    print(f"  [release] {msg}", flush=True)


def provide_optional_modules() -> None:
    """Adjustment 1: the token-order packages the release imports but the timed configs never use."""
    for module, package, function, order in OPTIONAL_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            placeholder = sys.modules[module] = types.ModuleType(module)

            def unavailable(*args, _why: str = f"{module}.{function}: {package} is not installed (only "
                            f"token_3d_order {order} calls it)", **kwargs) -> None:
                raise RuntimeError(_why)
            setattr(placeholder, function, unavailable)
            say(f"placeholder for {module} ({package} not installed; only token_3d_order {order} uses it)")


def import_release(src: str):
    """Put the checkout first on sys.path (without this folder: our modules must not shadow the release's), apply
    the adjustment of the module docstring and return the release's (BeitConfig, BeitModel)."""
    require_svitt_release_checkout(src)
    sys.path[:] = release_first_path(src)
    provide_optional_modules()
    from models.sparse_config import BeitConfig
    from models.sparse_xbeit import BeitModel
    return BeitConfig, BeitModel


def build_tower(src: str, frames: int, encoder_args: dict):
    """The release's vision_encoder as its build_huggingface_vit_with_image_size configures it (random weights)."""
    beit_config, beit_model = import_release(src)
    config = beit_config.from_json_file(os.path.join(src, BEIT_CONFIG))
    config.update(dict(image_size=IMAGE_SIZE, drop_path_rate=0.0, **encoder_args))
    return beit_model(config=config, add_pooling_layer=True, num_frames=frames)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tower_job(job: dict) -> dict:
    """Seconds of one (frames, precision, pass, variant) of the release's tower, timed as bench_svitt's."""
    import torch
    import transformers

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = build_tower(job["src"], job["frames"], job["encoder_args"])
    video = torch.randn(BATCH, job["frames"], 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    bf16 = job["precision"] == "bf16"
    backward = job["passes"] == "fwd+bwd"
    model.train(backward)
    say(f"BeitModel {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {job['frames']} frames, "
        f"{job['precision']}{' (autocast added)' if bf16 else ''}, {job['passes']}, vision_encoder_args "
        f"{job['encoder_args']}, drop_path_rate 0, random weights")

    def call() -> None:
        torch.manual_seed(0)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        if backward:
            model.zero_grad(set_to_none=True)
            with autocast:
                out = model(video)
            (out.pooler_output.float().square().mean()
             + out.last_hidden_state[:, 0].float().square().mean()).backward()
        else:
            with torch.no_grad(), autocast:
                model(video)

    warmup, times = time_calls(call, job["repeats"])
    return dict(job, warmup_s=warmup, times_s=times, seconds=statistics.median(times), peak_rss_mib=peak_rss_mib(),
                torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a checkout of github:JerryYLi/svitt")
    p.add_argument("--job", required=True,
                   help="JSON: frames, precision, passes, variant, encoder_args, repeats, threads")
    p.add_argument("--job_out", required=True, help="where to write the figures (JSON)")
    args = p.parse_args()
    result = tower_job(dict(json.loads(args.job), src=args.src))
    with open(args.job_out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
