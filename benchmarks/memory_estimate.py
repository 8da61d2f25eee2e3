"""Peak GPU memory per device of each recipe, estimated from the models' shapes, and which GPUs it fits.

    .venv/bin/python benchmarks/memory_estimate.py            # the table (builds the base models on CPU: ~1 min)
    .venv/bin/python benchmarks/memory_estimate.py --quick    # only the check against a measured CPU peak

Estimate = weights, gradients and AdamW state (fp32 parameters: 4 + 4 + 8 bytes each; autocast keeps no separate
master copy, its bf16 weight casts add 2 bytes) + the activations saved for the backward pass + the largest
transient (word-head logits) + the CUDA context (~1 GB). Activations are counted layer by layer from the tokens,
width and MLP hidden size of each pass the recipe's forward makes (pruned token counts after each drop layer, the
3 fusion passes of SViTT's matching loss, SimVTP's joint, video-only and negative passes and pixel decoder), as
the tensors autograd keeps: the fp32 residual stream at each LayerNorm, the bf16 inputs and outputs of every
linear, q / k / v and the attention output, both MLP hidden tensors, the block-sparse attention's gathered keys,
values and bias. Attention probabilities are not kept (SDPA on CUDA); `--grad_checkpointing` keeps each layer's
input only, plus one layer recomputed in the backward pass. The estimate is checked against a measured peak: a
tiny model's forward + backward in fp32 on CPU, in a fresh process (peak RSS over the RSS before the step), must
be within 0.5-2x of the same estimate at fp32 (tests/test_memory_estimate.py).
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

# bench_common first: it puts the repository's modules on sys.path
from bench_common import print_table, run_job_in_subprocess

GIB = 2 ** 30
GPUS = {"V100-32": 32, "A100-80": 80, "H100-80": 80}
CUDA_CONTEXT_GIB = 1.0
USABLE = 0.9  # of a GPU's memory: the allocator's fragmentation and the data loader's pinned buffers
VOCAB = 30522


@dataclass
class Stack:
    """A pass through `layers` transformer layers: `batch` sequences of `tokens` (one count per layer, after
    pruning), width, MLP hidden size, cross-attention to `memory` tokens (0: none), block-sparse attention
    with `sparse_keys` keys per query (0: dense SDPA) and `heads` heads (for its bias)."""
    name: str
    batch: int
    tokens: list[int]
    width: int
    mlp: int
    memory: int = 0
    sparse_keys: int = 0
    heads: int = 12


def layer_bytes(n: int, d: int, mlp: int, act: int, memory: int = 0, sparse_keys: int = 0, heads: int = 12) -> int:
    """Bytes autograd keeps for one sequence through one layer (n tokens; act: 2 under bf16 autocast, 4 in fp32;
    the residual stream and LayerNorm inputs stay fp32)."""
    attn = 4 * n * d + act * n * d * (1 + 3 + 1 + 1)  # LN in; linear in, q k v, attention out, projection out
    if sparse_keys:  # keys and values gathered per query block of 56, the relative-position bias, its int32 index
        attn += 2 * act * n * (sparse_keys // 56) * d + act * heads * n * sparse_keys + 4 * n * sparse_keys
    cross = 0
    if memory:  # LN in, query in / out, the memory's cast, keys and values, attention out, projection out
        cross = 4 * n * d + act * n * d * 4 + act * memory * d * 3
    mlp_bytes = 4 * n * d + act * n * d * 2 + act * n * mlp * 2  # LN in, fc1 in, fc2 out; fc1 out, GELU out
    return attn + cross + mlp_bytes


def stack_bytes(s: Stack, act: int, checkpointing: bool) -> int:
    per_layer = [layer_bytes(n, s.width, s.mlp, act, s.memory, s.sparse_keys, s.heads) for n in s.tokens]
    if checkpointing:  # each layer's input kept, one layer's activations alive while it is recomputed
        return s.batch * (sum(4 * n * s.width for n in s.tokens) + max(per_layer))
    return s.batch * sum(per_layer)


@dataclass
class Recipe:
    name: str
    model: str
    model_kwargs: dict
    stacks: list[Stack]
    logits: int  # elements of the word-head logits (masked words: 50% SViTT, 75% SimVTP; answers x 5 in QA)
    entry: str  # the entry point, whose --help names the flags offered
    batch: int
    notes: str = ""
    params: int = field(default=0)


def pruned(tokens: int, rate: float, drop_at: tuple[int, ...], depth: int) -> list[int]:
    """Tokens per layer (CLS + patches) when after each layer in drop_at ceil(rate x patches) stay."""
    out, patches = [], tokens - 1
    for layer in range(depth):
        out.append(patches + 1)
        if layer + 1 in drop_at:
            patches = math.ceil(patches * rate)
    return out


def svitt_stacks(batch: int, frames: int, rate: float, text_len: int, qa: bool, px: int = 224, width: int = 768,
                 depth: int = 12, fusion: int = 9, text_depth: int = 12, drop=(3, 6, 9)) -> list[Stack]:
    """SViTT's passes: the sparse vision tower (local 1 + 3 random blocks of 56), then pre-training's text layers,
    3B matching pairs and MLM through the fusion layers, or QA's question pass and 3-layer answer decoder."""
    vision = pruned(frames * (px // 16) ** 2 + 1, rate, drop, depth)
    stacks = [Stack("vision", batch, vision, width, 4 * width, sparse_keys=4 * 56)]
    kept = vision[-1]
    text_layers, fusion_layers = [text_len] * fusion, [text_len] * (text_depth - fusion)
    if qa:
        stacks += [Stack("question", batch, text_layers, width, 4 * width),
                   Stack("question fusion", batch, fusion_layers, width, 4 * width, memory=kept),
                   Stack("answer decoder", 2 * batch, [5] * 3, width, 4 * width, memory=text_len)]
    else:
        stacks += [Stack("text", batch, text_layers, width, 4 * width),
                   Stack("matching fusion (3B pairs)", 3 * batch, fusion_layers, width, 4 * width, memory=kept),
                   Stack("MLM text", batch, text_layers, width, 4 * width),
                   Stack("MLM fusion", batch, fusion_layers, width, 4 * width, memory=kept)]
    return stacks


def simvtp_stacks(batch: int, frames: int, mask_ratio: float, text_len: int, qa: bool, px: int = 224,
                  width: int = 768, depth: int = 12, decoder_width: int = 384, decoder_depth: int = 4
                  ) -> list[Stack]:
    """SimVTP's passes: pre-training's joint pass (visible tubes + caption), video-only and text-only passes, 2B
    negative joint passes and pixel decoder over every tube; QA's joint pass of all tubes + question and 3-layer answer decoder."""
    tubes = frames // 2 * (px // 16) ** 2
    if qa:
        return [Stack("joint (all tubes + question)", batch, [tubes + text_len] * depth, width, 4 * width),
                Stack("answer decoder", 2 * batch, [5] * 3, width, 4 * width, memory=tubes + text_len)]
    visible = tubes - int(mask_ratio * tubes)
    return [Stack("joint", batch, [visible + text_len] * depth, width, 4 * width),
            Stack("video only", batch, [visible] * depth, width, 4 * width),
            Stack("text only", batch, [text_len] * depth, width, 4 * width),
            Stack("matching negatives (2B)", 2 * batch, [visible + text_len] * depth, width, 4 * width),
            Stack("pixel decoder", batch, [tubes] * decoder_depth, decoder_width, 4 * decoder_width)]


def recipes() -> list[Recipe]:
    """The recipes of scripts/*.sh (per-GPU batch, frames, keep rates), base models."""
    sparse = dict(sparse_local_attn=1, sparse_random_attn=3, attn_block_size=56, token_drop_loc=(3, 6, 9))
    return [
        Recipe("SViTT pre-training, 4 frames (svitt_pretrain_webvid.sh)", "svitt_base_patch16_224",
               dict(sparse, num_frames=4, token_keep_rate=0.7), svitt_stacks(32, 4, 0.7, 32, qa=False),
               32 * 32 // 2 * VOCAB, "run_simvtp_pretraining.py", 32),
        Recipe("SViTT 16-frame expansion (svitt_expand.sh, keep 0.5)", "svitt_base_patch16_224",
               dict(sparse, num_frames=16, token_keep_rate=0.5), svitt_stacks(32, 16, 0.5, 32, qa=False),
               32 * 32 // 2 * VOCAB, "run_simvtp_pretraining.py", 32),
        Recipe("SViTT QA, 8 frames (svitt_train_qa.sh)", "svitt_qa_base_patch16_224",
               dict(sparse, num_frames=8, token_keep_rate=0.6), svitt_stacks(32, 8, 0.6, 25, qa=True),
               64 * 5 * VOCAB, "run_simvtp_qa.py", 32),
        Recipe("SimVTP pre-training, 16 frames (pretrain_webvid.sh)", "simvtp_base_patch16", dict(num_frames=16),
               simvtp_stacks(16, 16, 0.9, 32, qa=False), 16 * 24 * VOCAB, "run_simvtp_pretraining.py", 16),
        Recipe("SimVTP QA, 16 frames (run_simvtp_qa.py defaults)", "simvtp_qa_base_patch16", dict(num_frames=16),
               simvtp_stacks(32, 16, 0.0, 25, qa=True), 64 * 5 * VOCAB, "run_simvtp_qa.py", 32),
    ]


def count_parameters(model: str, kwargs: dict) -> int:
    """Trainable parameters of the registered model (built on CPU: the towers draw their init with .tolist())."""
    import torch
    import model_registry  # (creating a model registers both families)
    with torch.no_grad():
        net = model_registry.create(model, **kwargs)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def estimate_gib(stacks: list[Stack], params: int, logits: int, act: int, checkpointing: bool,
                 optimizer: bool = True, context: float = CUDA_CONTEXT_GIB) -> float:
    """Peak GiB: weights + gradients (+ AdamW moments, + bf16 weight casts) + activations + logits + context."""
    static = params * (4 + 4 + (8 if optimizer else 0) + (2 if act == 2 else 0))
    activations = sum(stack_bytes(s, act, checkpointing) for s in stacks)
    return (static + activations + logits * (act + 4)) / GIB + context


def entry_flags(entry: str) -> set[str]:
    """The option strings an entry point's parser has (so the table names only flags that exist)."""
    import importlib
    parser = importlib.import_module(entry[:-3]).get_args_parser()
    return {s for a in parser._actions for s in a.option_strings}


def advice(recipe: Recipe, plain: float, ckpt: float | None, gib: int) -> str:
    """What to pass where the recipe does not fit a GPU of `gib`."""
    budget = gib * USABLE
    if plain <= budget:
        return "fits"
    if ckpt is not None and ckpt <= budget:
        return "--grad_checkpointing"
    checkpointing = ckpt is not None
    for accum in (2, 4, 8):
        smaller = [Stack(s.name, s.batch // accum, s.tokens, s.width, s.mlp, s.memory, s.sparse_keys, s.heads)
                   for s in recipe.stacks]
        if estimate_gib(smaller, recipe.params, recipe.logits // accum, 2, checkpointing) <= budget:
            flags = "--grad_checkpointing " if checkpointing else ""
            return f"{flags}--batch_size {recipe.batch // accum} --accum_iter {accum}"
    return "does not fit"


def table(recipe_list: list[Recipe]) -> list[list[str]]:
    rows = []
    for r in recipe_list:
        r.params = count_parameters(r.model, r.model_kwargs)
        has_ckpt = "--grad_checkpointing" in entry_flags(r.entry)
        plain = estimate_gib(r.stacks, r.params, r.logits, 2, False)
        ckpt = estimate_gib(r.stacks, r.params, r.logits, 2, True) if has_ckpt else None
        rows.append([r.name, f"{r.params / 1e6:.0f} M", str(r.batch), f"{plain:.1f}",
                     f"{ckpt:.1f}" if ckpt is not None else "(no flag)",
                     *[advice(r, plain, ckpt, g) for g in GPUS.values()]])
    return rows


# ------------------------------------------------------------------------------------- check on the CPU allocator

def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) afresh at the current RSS: ru_maxrss survives execve, so a process started by a
    large one (a test worker) would otherwise report its parent's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_job(job: dict) -> dict:
    """A tiny SimVTP pre-training step in fp32 on CPU: peak RSS of forward + backward over the RSS before it."""
    import torch
    import model_registry
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = model_registry.create("simvtp_tiny_patch16", num_frames=job["frames"], img_size=job["px"]).train()
    b, frames, px, text = job["batch"], job["frames"], job["px"], job["text_len"]
    tubes = frames // 2 * (px // 16) ** 2
    mask = torch.zeros(b, tubes, dtype=torch.bool)
    mask[:, :int(0.9 * tubes)] = True
    ids = torch.randint(1000, 2000, (b, text))
    batch = dict(video=torch.randn(b, 3, frames, px, px), video_mask=mask, input_ids=ids,
                 attention_mask=torch.ones_like(ids), mlm_input_ids=ids.clone(),
                 mlm_labels=ids.masked_fill(torch.rand(ids.shape) > 0.5, -100))
    before = current_rss_bytes()
    reset_peak_rss()
    model(batch)["loss"].backward()
    peak = peak_rss_bytes()
    return dict(job, measured_bytes=peak - before,
                params=sum(p.numel() for p in model.parameters() if p.requires_grad))


def quick_check(folder: str) -> dict:
    """Measured vs estimated peak of a tiny fp32 CPU step (gradients allocated in the step, no optimizer)."""
    job = dict(batch=16, frames=8, px=112, text_len=32)
    out = run_job_in_subprocess(os.path.abspath(__file__), job, os.path.join(folder, "measure.json"), "measure")
    stacks = simvtp_stacks(job["batch"], job["frames"], 0.9, job["text_len"], qa=False, px=job["px"], width=192,
                           depth=4, decoder_width=96, decoder_depth=2)
    logits = job["batch"] * job["text_len"] // 2 * VOCAB  # the job masks half the words
    est = estimate_gib(stacks, out["params"], logits, 4, False, optimizer=False, context=0.0) * GIB \
        - out["params"] * 4  # the weights were there before the step
    ratio = est / out["measured_bytes"]
    print(f"check on CPU (simvtp_tiny_patch16, batch {job['batch']}, {job['frames']} frames x {job['px']} px, fp32): "
          f"measured peak {out['measured_bytes'] / 2**20:.0f} MiB, estimated {est / 2**20:.0f} MiB, "
          f"ratio {ratio:.2f}")
    return dict(measured=out["measured_bytes"], estimated=est, ratio=ratio)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the check against a measured CPU peak")
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--job_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        import json
        with open(args.job_out, "w") as f:
            json.dump(measure_job(json.loads(args.job)), f)
        return {}
    import tempfile
    with tempfile.TemporaryDirectory(prefix="memory_estimate_") as folder:
        check = quick_check(folder)
    if args.quick:
        return check
    rows = table(recipes())
    print(f"\nPeak GPU memory per device (GiB, bf16 autocast, AdamW; {CUDA_CONTEXT_GIB:.0f} GiB CUDA context; "
          f"fits = under {USABLE:.0%} of the GPU)")
    print_table(["recipe", "params", "batch/GPU", "estimate", "--grad_checkpointing", *GPUS], rows)
    return dict(check=check, rows=rows)


if __name__ == "__main__":
    main()
