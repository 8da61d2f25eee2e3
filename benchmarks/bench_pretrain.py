"""Speed and memory of one SimVTP pre-training step on CPU: clips/s, s/step, peak RSS, FLOPs, MFU, where the time
goes, fp32 vs bf16, and the encoder alone at 90% vs 0% tube masking.

    .venv/bin/python benchmarks/bench_pretrain.py                     # tiny + base, fp32 + bf16 (~4 min on 2 cores)
    .venv/bin/python benchmarks/bench_pretrain.py --configs tiny      # about 30 s
    .venv/bin/python benchmarks/bench_pretrain.py --configs base --precision bf16 --grad_checkpointing
    .venv/bin/python benchmarks/bench_pretrain.py --quick --json out.json   # smallest run (what the test runs)
    .venv/bin/python benchmarks/bench_pretrain.py --configs base --release_src ../SimVTP   # + the release, same run
    .venv/bin/python benchmarks/bench_pretrain.py --configs base --precision bf16 --speed_options  # + method options
    .venv/bin/python benchmarks/bench_pretrain.py --attention_table    # SDPA vs explicit attention by key count

Configs (clip shapes are the registered models' defaults): tiny = simvtp_tiny_patch16, 8 frames x 112 px, batch 16
(the demo's pre-training batch); base = simvtp_base_patch16, 16 frames x 224 px, batch 4.

How each figure is obtained
- The step is the engine's own: engine_for_pretraining._forward_backward (forward with every pass and loss under
  autocast, the finite-loss check, backward) then _optimizer_step (gradient norm, which the engine computes for
  its log even without clipping, fused AdamW, zero_grad), with the run script's AdamW parameter groups. The batch
  is built by datasets.VideoTextCollator from dataset-like items: random pixels (already normalised), a tube mask
  at 0.9 drawn per sample as VideoTextDataset draws it, WebVid-like captions through datasets.build_tokenizer()
  (at most 32 tokens) and 75% MLM masking. The same batch is used every step: data loading is not timed here
  (benchmarks/bench_dataloader.py times it).
- Each (config, precision) runs in a fresh process, so its peak RSS (resource.getrusage ru_maxrss) is its own; it
  is read right after the timed steps, before the profiling, FLOP counting and encoder-only phases.
- Seconds per step: the mean of --steps timed steps after --warmup untimed ones (oneDNN builds its kernels and
  the allocator grows in the first step). CPU ops are synchronous, so time.perf_counter() brackets are exact.
- FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward under the same autocast. It counts
  matmuls, convolutions and attention; torch's table has no entry for the CPU attention kernel
  (_scaled_dot_product_flash_attention_for_cpu and its backward) and would count 0 for it, so this script adds
  both with torch's own SDPA formulas. Element-wise work, norms, softmax, the embeddings' backward and AdamW are
  not counted: MFU here is the step's matmul work over its time. With --grad_checkpointing the count includes the
  forward recomputed in backward (work done, not model FLOPs).
- MFU = FLOPs per step / seconds per step / peak, for two peaks measured in the same process with the same
  threads right after the steps: the best of a few n x n x n matmuls (n = --matmul_size) in fp32 and in bf16. The
  peak matching the step's precision is the meaningful one; both are printed.
- Breakdown. Forward: the parts' methods and modules are wrapped on the model instance for the run (no model code
  changes) and each wrapper adds the wall time of its call; only the outermost wrapped call counts, so the VTM
  negatives' joint pass counts under VTM, not under the joint pass. "other forward" is the forward's time no part
  covers (pixel MSE, VTC loss, pooling, loss sums). Backward: one extra step runs under torch.profiler. Every
  backward node (autograd::engine::evaluate_function: XBackward0) carries the sequence number of the forward op
  that created it; that op ran inside the record_function range of one forward part, which gets the node's time.
  The proportions of this profiled step are applied to the mean timed backward; backward time no part's node
  accounts for (AccumulateGrad, summing the gradients of the encoder's several uses, the engine itself) is its
  own row. Optimizer: fused AdamW (optimizer.step) vs the rest of the engine's optimizer step (grad norm,
  zero_grad). The rows add up to the measured step.
- CPU use over the timed steps (getrusage): cores used = (user + system CPU s) / wall s, system seconds and minor
  page faults per step. glibc gives large freed blocks back to the OS and faults them in again on the next step;
  --malloc_env starts the jobs with glibc settings that keep them (an experiment; the default is the run scripts').
- Encoder alone: forward + backward (of the outputs' sum) of embed_video (tube convolution, visible tokens
  selected) and the unified encoder (blocks + norm) on the video tokens only, with the step's batch, at tube
  mask 0.9 and 0.0; one warm-up, then the mean of --encoder_reps. It runs in the bf16 process (else the only one).

--attention_table (instead of the steps): forward + backward of one attention call, F.scaled_dot_product_attention
vs modeling_simvtp.explicit_attention (matmul + softmax), in bf16 and fp32, for [B, H, S, 64] shapes over key counts
S (the step's: text, joint, visible video and the decoder's all tubes); the mean of --steps calls after one
warm-up. Its bf16 rows are modeling_simvtp.CPU_BF16_ATTENTION_MS, from which the model picks its CPU bf16 path.

Targets on this 2-core machine (printed with PASS/MISS): base, batch 4, 16 x 224, bf16: peak RSS under 12 GiB and
at most 5.5 s per step; the encoder at 0.9 masking at least 5x faster than at 0.0. Other processes on the same
cores slow every figure: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# bench_common first: it puts the repository's modules on sys.path
from bench_common import REPO, print_table, require_release_checkout, run_job_in_subprocess, time_calls
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own chatter


def import_training_stack() -> None:
    """torch and the repo's modules, as module globals. Only the job processes need them: the parent process just
    plans, starts and reports, and starts in a fraction of a second (the test runs the whole script in < 30 s)."""
    global torch, model_registry, flop_counter, datasets, engine, masking_generator, modeling_simvtp, utils, CPU
    global video_transforms
    import torch
    from torch.utils import flop_counter

    import datasets
    import engine_for_pretraining as engine
    import masking_generator
    import model_registry
    import modeling_simvtp
    import utils
    import video_transforms
    CPU = torch.device("cpu")


CONFIGS = {
    "tiny": dict(model="simvtp_tiny_patch16", num_frames=8, input_size=112, batch_size=16),
    "base": dict(model="simvtp_base_patch16", num_frames=16, input_size=224, batch_size=4),
}
QUICK = {"quick": dict(model="simvtp_tiny_patch16", num_frames=4, input_size=32, batch_size=2)}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # names of torch dtypes (torch is imported by jobs only)
# --speed_options: the method options that cut work (modeling_simvtp.SimVTPPretrain; off by default)
SPEED_OPTIONS = {"decode 50%": dict(decode_fraction=0.5), "1 negative": dict(vtm_negatives_per_pair=1),
                 "both": dict(decode_fraction=0.5, vtm_negatives_per_pair=1)}
COMPILED = ("compiled blocks", dict(compile_blocks=True))  # --compile_blocks: the paper's method, blocks compiled
MASK_RATIO, TEXT_MASK_RATIO, MAX_TEXT_LEN = 0.9, 0.75, 32
TARGET = dict(config="base", batch_size=4, num_frames=16, input_size=224, precision="bf16",
              max_s_per_step=5.5, max_rss_gib=12.0, min_encoder_speedup=5.0)
CAPTIONS = ("a man in a red jacket rides a bicycle along a mountain road at sunset",
            "aerial view of waves breaking on a sandy beach",
            "close up of hands kneading dough on a wooden table in a bright kitchen",
            "young woman smiling and talking on the phone while walking through the city",
            "time lapse of clouds moving over a green valley",
            "slow motion shot of a dog running through tall grass",
            "traffic on a busy highway at night with long light trails",
            "a chef slices fresh vegetables and drops them into a hot pan")

# Forward parts, in the order the model runs them; the rows after them are computed (see the docstring).
PARTS = ("video tube embedding", "text embeddings", "joint encoder pass (a)", "pixel decoder", "pixel targets",
         "MLM word head + loss", "unimodal VTC passes (b)", "VTM: negatives joint pass (c) + head + loss")
OTHER_FORWARD = "other forward (pixel MSE, VTC loss, pooling)"
UNTIED_BACKWARD = "backward not tied to a part (AccumulateGrad, grad sums, engine)"
ADAMW, OPT_REST = "optimizer: fused AdamW", "optimizer: grad norm + zero_grad"
BACKWARD_EVENT = "autograd::engine::evaluate_function"
# --malloc_env: glibc malloc keeps freed memory instead of returning it to the OS and faulting it in again next step
# (glibc ignores an mmap threshold above 32 MiB, so large blocks are kept off mmap by MALLOC_MMAP_MAX_=0)
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 34), "MALLOC_TOP_PAD_": str(2 ** 28)}
# --allocators: malloc libraries a job can be started with (LD_PRELOAD) -> (file, the Debian package that has it)
ALLOCATORS = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
              "jemalloc": ("libjemalloc.so.2", "libjemalloc2")}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")

# ----------------------------------------------------------------------------------------------- inputs


def make_batch(cfg: dict, tokenizer, mask_ratio: float = MASK_RATIO) -> dict[str, torch.Tensor]:
    """The tensors engine_for_pretraining feeds the model, made by the real collate from dataset-like items."""
    b, t, s = cfg["batch_size"], cfg["num_frames"], cfg["input_size"]
    mask_gen = masking_generator.build_mask_generator("tube", (t // 2, s // 16, s // 16), mask_ratio)
    items = []
    for i in range(b):
        video = torch.randn(3, t, s, s, generator=torch.Generator().manual_seed(i))
        mask = torch.from_numpy(mask_gen(video_transforms.sample_rng(0, 0, i, "video_mask")))
        items.append(dict(video=video, video_mask=mask, caption=CAPTIONS[i % len(CAPTIONS)], index=i, epoch=0,
                          skipped=0))
    collate = datasets.VideoTextCollator(tokenizer, max_text_len=MAX_TEXT_LEN, text_mask_ratio=TEXT_MASK_RATIO)
    return engine.move_batch(collate(items), CPU)


def build(cfg: dict, vocab_size: int, grad_checkpointing: bool):
    """Model (train mode) and fused AdamW with the parameter groups run_simvtp_pretraining.py makes."""
    t, s = cfg["num_frames"], cfg["input_size"]
    kwargs = dict(cfg.get("model_kwargs", {}))
    compiled = kwargs.pop("compile_blocks", False)
    model = model_registry.create(cfg["model"], img_size=s, num_frames=t, vocab_size=vocab_size, **kwargs)
    model.set_grad_checkpointing(grad_checkpointing)
    if compiled:  # as --compile_blocks does; the warm-up steps pay for the compilation
        utils.compile_blocks(model)
    groups = utils.param_groups(model, 0.05, no_decay_names=("mask_token", "temp"))
    for g in groups:
        g.pop("names")
    optimizer = utils.make_adamw(groups, 1.5e-4, (0.9, 0.95), 1e-8, CPU)
    utils.apply_schedules(optimizer, 1.5e-4, 0.05)
    return model.train(), optimizer


# ----------------------------------------------------------------------------------------------- part clock


class PartClock:
    """Wall time (and, while `counter` is set, FLOPs) of named calls, by wrapping them on their instances.

    Parts: only the outermost wrapped call counts (a nested one belongs to its caller). Totals (the whole forward,
    the AdamW step) are timed independently of the parts. With `annotate`, parts also open a
    torch.profiler.record_function range named after the part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.counter: flop_counter.FlopCounterMode | None = None
        self.annotate = False
        self._depth = 0
        self._wrapped: list[tuple[object, str]] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.flops.clear()

    def _flops_now(self) -> float:
        return float(self.counter.get_total_flops()) if self.counter is not None else 0.0

    def _install(self, owner: object, attr: str, timed) -> None:
        setattr(owner, attr, timed)  # an instance attribute shadows the class's method
        self._wrapped.append((owner, attr))

    def wrap_part(self, owner: object, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            if self._depth:
                return inner(*args, **kwargs)
            self._depth += 1
            label = torch.profiler.record_function(name) if self.annotate else contextlib.nullcontext()
            f0, t0 = self._flops_now(), time.perf_counter()
            try:
                with label:
                    return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.flops[name] += self._flops_now() - f0
                self._depth -= 1
        self._install(owner, attr, timed)

    def wrap_total(self, owner: object, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            f0, t0 = self._flops_now(), time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.flops[name] += self._flops_now() - f0
        self._install(owner, attr, timed)

    def remove(self) -> None:
        for owner, attr in reversed(self._wrapped):
            delattr(owner, attr)
        self._wrapped.clear()


def watch_parts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> PartClock:
    """Wrap the forward parts (PARTS order), the whole forward and the AdamW step."""
    clock = PartClock()
    enc = model.encoder
    for owner, attr, name in ((enc, "embed_video", PARTS[0]), (model.text_embeddings, "forward", PARTS[1]),
                              (model, "joint", PARTS[2]), (model, "decode_pixels", PARTS[3]),
                              (model, "pixel_target", PARTS[4]), (model, "masked_word_loss", PARTS[5]),
                              (enc, "forward", PARTS[6]), (model, "matching_loss", PARTS[7])):
        clock.wrap_part(owner, attr, name)
    clock.wrap_total(model, "forward", "forward")
    clock.wrap_total(optimizer, "step", ADAMW)
    return clock


# ----------------------------------------------------------------------------------------------- measurements


def train_step(model, optimizer, scaler, batch: dict, cfg: engine.StepConfig) -> tuple[float, float]:
    """One engine step -> (seconds of forward + backward, seconds of the optimizer step)."""
    t0 = time.perf_counter()
    _, bad = engine._forward_backward(model, batch, scaler, cfg, sync=True)
    if bool(bad):  # the engine's one host read per step (there: the window's flags summed over ranks)
        raise RuntimeError("non-finite loss in the benchmark step")
    t1 = time.perf_counter()
    engine._optimizer_step(model, optimizer, scaler, cfg)
    return t1 - t0, time.perf_counter() - t1


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (kineto prints start/stop lines there that no log level turns off)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def backward_shares(model, optimizer, scaler, batch, cfg, clock: PartClock) -> dict[str, float]:
    """Fractions of one profiled step's backward wall time per forward part (see the module docstring)."""
    clock.reset()
    clock.annotate = True
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with quiet_stderr():
        prof.start()
    try:
        fwd_bwd, _ = train_step(model, optimizer, scaler, batch, cfg)
    finally:
        with quiet_stderr():
            prof.stop()
        clock.annotate = False
    backward_wall = fwd_bwd - clock.seconds["forward"]
    events = prof.events()
    part_of_seq: dict[int, str] = {}
    for e in events:
        if e.sequence_nr < 0 or e.name.startswith(BACKWARD_EVENT):
            continue
        part, parent = OTHER_FORWARD, e.cpu_parent
        while parent is not None:
            if parent.name in PARTS or parent.name.startswith(BACKWARD_EVENT):
                part = parent.name  # a BACKWARD_EVENT parent: recomputed in backward (checkpointing), not forward
                break
            parent = parent.cpu_parent
        if not part.startswith(BACKWARD_EVENT):
            part_of_seq.setdefault(e.sequence_nr, part)
    seconds: dict[str, float] = defaultdict(float)
    for e in events:
        if not e.name.startswith(BACKWARD_EVENT):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(BACKWARD_EVENT):
            parent = parent.cpu_parent
        if parent is None:  # outermost node evaluations only
            seconds[part_of_seq.get(e.sequence_nr, UNTIED_BACKWARD)] += e.time_range.elapsed_us() / 1e6
    seconds[UNTIED_BACKWARD] += max(0.0, backward_wall - sum(seconds.values()))
    total = sum(seconds.values())
    return {k: v / total for k, v in seconds.items()}


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(model, batch: dict, dtype: torch.dtype, clock: PartClock) -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of one step; the clock records each part's forward FLOPs."""
    clock.reset()
    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        clock.counter = counter
        with utils.autocast(CPU, dtype):
            loss = model(batch)["loss"]
        forward = float(counter.get_total_flops())
        loss.backward()
        clock.counter = None
    model.zero_grad(set_to_none=True)
    return forward, float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, n: int, reps: int = 3) -> float:
    """Best achieved FLOP/s of an n x n x n matmul in this precision (the MFU denominator)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_size(precision: str, n: int) -> int:
    """The peak's matmul size: bf16 without native support (e.g. AVX2 only) runs at about 1 GFLOP/s, where a
    4096^3 matmul would take minutes; 1024 measures the same rate."""
    return n if precision != "bf16" or utils.native_bf16(CPU) else min(n, 1024)


def encoder_seconds(model, batch: dict, dtype: torch.dtype, reps: int, log) -> float:
    """Mean seconds of forward + backward of tube embedding + unified encoder on the batch's visible tokens."""
    enc = model.encoder

    def once() -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with utils.autocast(CPU, dtype):
            out = enc(enc.embed_video(batch["video"], batch["video_mask"]))
        out.float().sum().backward()
        return time.perf_counter() - t0

    log(f"    warm-up {once():.2f} s")
    times = []
    for i in range(reps):
        times.append(once())
        log(f"    rep {i + 1}/{reps} {times[-1]:.2f} s")
    model.zero_grad(set_to_none=True)
    return sum(times) / len(times)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


# ----------------------------------------------------------------------------------------------- one job


def time_steps(model, optimizer, scaler, batch: dict, step_cfg, job: dict, log) -> tuple[dict, dict]:
    """Warm-up steps, then the timed ones with the part clock on -> (step figures, mean seconds per row)."""
    for i in range(job["warmup"]):
        fb, opt = train_step(model, optimizer, scaler, batch, step_cfg)
        log(f"warm-up step {i + 1}/{job['warmup']}: {fb + opt:.2f} s")
    clock = watch_parts(model, optimizer)
    steps, fwd_bwd, opt_s = job["steps"], [], []
    usage_start = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(steps):
        fb, opt = train_step(model, optimizer, scaler, batch, step_cfg)
        fwd_bwd.append(fb)
        opt_s.append(opt)
        mean = (sum(fwd_bwd) + sum(opt_s)) / (i + 1)
        log(f"step {i + 1}/{steps}: {fb + opt:.2f} s (mean {mean:.2f} s), eta of the timed steps "
            f"{mean * (steps - i - 1):.0f} s")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    clock.remove()
    step_times = [a + b for a, b in zip(fwd_bwd, opt_s)]
    figures = dict(peak_rss_gib=peak_rss_gib(), step_times_s=step_times, s_per_step=sum(step_times) / steps,
                   per_step=dict(user_s=(usage.ru_utime - usage_start.ru_utime) / steps,
                                 sys_s=(usage.ru_stime - usage_start.ru_stime) / steps,
                                 minor_page_faults=(usage.ru_minflt - usage_start.ru_minflt) / steps))
    seconds = {k: v / steps for k, v in clock.seconds.items()}
    seconds["forward + backward"], seconds["optimizer"] = sum(fwd_bwd) / steps, sum(opt_s) / steps
    return figures, seconds


def breakdown(model, optimizer, scaler, batch: dict, step_cfg, dtype, seconds: dict, log) -> dict:
    """Rows of the breakdown table from the timed steps' mean seconds, one profiled step (backward proportions)
    and one FLOP-counted forward + backward -> {"parts": rows, forward/backward/optimizer seconds, FLOPs}."""
    forward_s = seconds["forward"]
    backward_s = seconds["forward + backward"] - forward_s
    log(f"one profiled step for the backward split (~{1.3 * (backward_s + forward_s):.0f} s + trace processing)")
    clock = watch_parts(model, optimizer)
    shares = backward_shares(model, optimizer, scaler, batch, step_cfg, clock)
    log(f"counting FLOPs over one forward + backward (~{2 * (backward_s + forward_s):.0f} s)")
    forward_flops, step_flops = count_flops(model, batch, dtype, clock)
    clock.remove()
    parts = {p: dict(forward_s=seconds.get(p, 0.0), backward_s=backward_s * shares.get(p, 0.0),
                     forward_flops=clock.flops.get(p, 0.0)) for p in PARTS}
    parts[OTHER_FORWARD] = dict(forward_s=forward_s - sum(p["forward_s"] for p in parts.values()),
                                backward_s=backward_s * shares.get(OTHER_FORWARD, 0.0),
                                forward_flops=forward_flops - sum(p["forward_flops"] for p in parts.values()))
    parts[UNTIED_BACKWARD] = dict(forward_s=0.0, backward_s=backward_s * shares.get(UNTIED_BACKWARD, 0.0),
                                  forward_flops=0.0)
    adamw_s = seconds.get(ADAMW, 0.0)
    parts[ADAMW] = dict(forward_s=0.0, backward_s=0.0, other_s=adamw_s, forward_flops=0.0)
    parts[OPT_REST] = dict(forward_s=0.0, backward_s=0.0, other_s=seconds["optimizer"] - adamw_s, forward_flops=0.0)
    return dict(parts=parts, forward_s=forward_s, backward_s=backward_s, optimizer_s=seconds["optimizer"],
                forward_flops=forward_flops, step_flops=step_flops)


def run_job(job: dict) -> dict:
    """One (config, precision) in this process; returns every figure (see the module docstring)."""
    import_training_stack()
    torch.manual_seed(0)
    torch.set_num_threads(job["threads"])
    cfg, dtype, tag = job["cfg"], getattr(torch, DTYPES[job["precision"]]), f"  [{job['config']} {job['precision']}]"
    job_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{tag} {time.perf_counter() - job_start:6.1f}s  {msg}", flush=True)

    tokenizer = datasets.build_tokenizer()
    model, optimizer = build(cfg, len(tokenizer), job["grad_checkpointing"])
    batch = make_batch(cfg, tokenizer)
    scaler = utils.make_grad_scaler(CPU, dtype)
    step_cfg = engine.StepConfig(device=CPU, dtype=dtype)
    out = dict(config=job["config"], precision=job["precision"], **cfg, threads=torch.get_num_threads(),
               grad_checkpointing=job["grad_checkpointing"], malloc_env=job["malloc_env"],
               allocator=job.get("allocator", "glibc"), torch=torch.__version__,
               auto_precision=utils.auto_precision("cpu", utils.native_bf16(CPU)),  # ours by default here
               cpu_capability=torch.backends.cpu.get_cpu_capability(),
               params_M=sum(p.numel() for p in model.parameters()) / 1e6,
               video_tokens=int((~batch["video_mask"][0]).sum()), all_video_tokens=batch["video_mask"].shape[1],
               text_tokens=batch["input_ids"].shape[1])
    log(f"{cfg['model']}: {out['params_M']:.1f} M parameters, batch {cfg['batch_size']} x {cfg['num_frames']} x "
        f"{cfg['input_size']} px, {out['video_tokens']} of {out['all_video_tokens']} video tokens visible, "
        f"{out['text_tokens']} text tokens, {out['threads']} threads")

    figures, seconds = time_steps(model, optimizer, scaler, batch, step_cfg, job, log)
    out.update(figures, clips_per_s=cfg["batch_size"] / figures["s_per_step"])
    out.update(breakdown(model, optimizer, scaler, batch, step_cfg, dtype, seconds, log))
    log(f"matmul peaks ({job['matmul_size']}^3 fp32, {peak_size('bf16', job['matmul_size'])}^3 bf16)")
    out["peak_flops"] = {name: matmul_peak(getattr(torch, dt), peak_size(name, job["matmul_size"]))
                         for name, dt in DTYPES.items()}
    out["mfu"] = {name: out["step_flops"] / out["s_per_step"] / peak for name, peak in out["peak_flops"].items()}
    if job["encoder"]:
        enc = {}
        for ratio in (0.9, 0.0):
            masked = make_batch(cfg, tokenizer, mask_ratio=ratio)
            tokens = int((~masked["video_mask"][0]).sum())
            log(f"encoder alone (embed + encoder, fwd + bwd), tube mask {ratio}: {tokens} video tokens per clip")
            enc[str(ratio)] = dict(seconds=encoder_seconds(model, masked, dtype, job["encoder_reps"], log),
                                   tokens=tokens)
        enc["speedup"] = enc["0.0"]["seconds"] / enc["0.9"]["seconds"]
        out["encoder"] = enc
    out["peak_rss_gib_whole_job"] = peak_rss_gib()
    out["job_seconds"] = time.perf_counter() - job_start
    log(f"done in {out['job_seconds']:.0f} s")
    return out


def allocator_library(name: str, dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """The library file a job preloads for --allocators NAME (None for glibc, the default malloc); a missing one
    is one clear error naming the package to install."""
    if name == "glibc":
        return None
    if name not in ALLOCATORS:
        raise SystemExit(f"unknown allocator {name!r}; one of glibc, {', '.join(ALLOCATORS)}")
    file, package = ALLOCATORS[name]
    found = next((os.path.join(d, file) for d in dirs if os.path.exists(os.path.join(d, file))), None)
    if found is None:
        raise SystemExit(f"--allocators {name}: {file} is not in {', '.join(dirs)}; install it (Debian / Ubuntu: "
                         f"sudo apt-get install {package})")
    return found


def run_in_subprocess(job: dict, folder: str) -> dict:
    """A fresh interpreter per job (its peak RSS is its own); its progress lines go straight to our stdout."""
    out_path = os.path.join(folder, f"{job['config']}_{job['precision']}.json".replace(" ", "_"))
    env = dict(os.environ, **MALLOC_ENV) if job["malloc_env"] else None
    library = allocator_library(job.get("allocator", "glibc"))
    if library:
        env = dict(env or os.environ, LD_PRELOAD=library)
    return run_job_in_subprocess(os.path.abspath(__file__), job, out_path, f"{job['config']} {job['precision']}", env)


# ----------------------------------------------------------------------------------------------- report


def print_stepprint_table(results: list[dict]) -> None:
    print("\nStep = engine forward (every pass and loss) + backward + grad norm + fused AdamW, mean of the timed steps")
    rows = [[r["config"], r["precision"], r["batch_size"], f"{r['num_frames']}x{r['input_size']}",
             f"{r['video_tokens']}/{r['all_video_tokens']}+{r['text_tokens']}", f"{r['s_per_step']:.2f}",
             f"{min(r['step_times_s']):.2f}-{max(r['step_times_s']):.2f}", f"{r['clips_per_s']:.2f}",
             f"{r['peak_rss_gib']:.2f}"] for r in results]
    print_table(["config", "prec", "batch", "clip", "tokens v+t", "s/step", "range", "clips/s", "peak RSS GiB"], rows,
           left=2)
    print("tokens v+t: visible/all video tokens + text tokens per clip; range: fastest-slowest timed step")
    print("\nFLOPs from FlopCounterMode (fwd + bwd); MFU = FLOPs / (s/step) / matmul peak measured in the same "
          "process (vs the fp32 peak | vs the bf16 peak)")
    rows = []
    for r in results:
        u = r["per_step"]
        rows.append([r["config"], r["precision"], f"{r['step_flops'] / 1e9:.0f}", f"{r['forward_flops'] / 1e9:.0f}",
                     f"{r['step_flops'] / r['s_per_step'] / 1e12:.3f}",
                     f"{r['peak_flops']['fp32'] / 1e12:.3f} | {r['peak_flops']['bf16'] / 1e12:.3f}",
                     f"{100 * r['mfu']['fp32']:.0f}% | {100 * r['mfu']['bf16']:.0f}%",
                     f"{(u['user_s'] + u['sys_s']) / r['s_per_step']:.2f}", f"{u['sys_s']:.2f}",
                     f"{u['minor_page_faults'] / 1e3:.0f}k"])
    print_table(["config", "prec", "GFLOP/step", "fwd GFLOP", "TFLOP/s", "peak TFLOP/s", "MFU", "cores used",
            "sys s/step", "faults/step"], rows, left=2)
    print("cores used: (user + system CPU s) / wall s over the timed steps; sys s, faults: system CPU seconds and "
          "minor page faults per step\n(mostly memory the allocator gave back to the OS and touches again)")


def print_breakdown(r: dict) -> None:
    steps = len(r["step_times_s"])
    print(f"\nBreakdown: {r['config']} {r['precision']} (forward: mean of {steps} timed steps; backward: their mean "
          f"split in the proportions of one profiled step)")
    rows, total = [], 0.0
    for name, p in r["parts"].items():
        fwd, bwd, other = p["forward_s"], p["backward_s"], p.get("other_s", 0.0)
        both = fwd + bwd + other
        total += both
        gflop = p["forward_flops"] / 1e9
        rate = f"{p['forward_flops'] / fwd / 1e12:.3f}" if fwd > 1e-4 and p["forward_flops"] > 0 else "-"
        rows.append([name, f"{fwd:.3f}" if name in PARTS or name == OTHER_FORWARD else "-",
                     "-" if name in (ADAMW, OPT_REST) else f"{bwd:.3f}", f"{both:.3f}",
                     f"{100 * both / r['s_per_step']:.1f}%", f"{gflop:.1f}" if gflop else "-", rate])
    rows.append(["step (sum of the rows)", f"{r['forward_s']:.3f}", f"{r['backward_s']:.3f}", f"{total:.3f}",
                 f"{100 * total / r['s_per_step']:.1f}%", f"{r['forward_flops'] / 1e9:.1f}",
                 f"{r['forward_flops'] / r['forward_s'] / 1e12:.3f}"])
    print_table(["part", "fwd s", "bwd s", "total s", "of step", "fwd GFLOP", "fwd TFLOP/s"], rows)
    bwd_flops = r["step_flops"] - r["forward_flops"]
    print(f"backward: {bwd_flops / 1e9:.1f} GFLOP in {r['backward_s']:.3f} s = "
          f"{bwd_flops / r['backward_s'] / 1e12:.3f} TFLOP/s; optimizer step {r['optimizer_s']:.3f} s")


def print_comparisons(results: list[dict]) -> None:
    by = {(r["config"], r["precision"]): r for r in results}
    lines = []
    for name in dict.fromkeys(r["config"] for r in results):
        if (name, "fp32") in by and (name, "bf16") in by:
            f32, b16 = by[(name, "fp32")]["s_per_step"], by[(name, "bf16")]["s_per_step"]
            lines.append(f"{name}: fp32 {f32:.2f} s/step, bf16 {b16:.2f} s/step -> bf16 is {f32 / b16:.2f}x faster")
    if lines:
        print("\nfp32 vs bf16 (torch.autocast cpu bfloat16)\n" + "\n".join(lines))
    for r in results:
        if "encoder" in r:
            e = r["encoder"]
            verdict = ""
            if r["config"] == TARGET["config"]:
                ok = e["speedup"] >= TARGET["min_encoder_speedup"]
                verdict = f"  [target >= {TARGET['min_encoder_speedup']:.0f}x: {'PASS' if ok else 'MISS'}]"
            print(f"\nencoder alone, {r['config']} {r['precision']} batch {r['batch_size']} "
                  f"(embed + encoder, fwd + bwd): "
                  f"mask 0.9 ({e['0.9']['tokens']} tokens/clip) {e['0.9']['seconds']:.3f} s, mask 0.0 "
                  f"({e['0.0']['tokens']} tokens/clip) {e['0.0']['seconds']:.3f} s -> 0.9 is {e['speedup']:.1f}x faster"
                  + verdict)


def print_targets(results: list[dict]) -> None:
    t = TARGET
    match = [r for r in results if r["config"] == t["config"] and r["precision"] == t["precision"]
             and (r["batch_size"], r["num_frames"], r["input_size"]) == (t["batch_size"], t["num_frames"],
                                                                         t["input_size"])]
    print(f"\nTargets: {t['config']}, batch {t['batch_size']}, {t['num_frames']} x {t['input_size']}, {t['precision']}")
    if not match:
        print("  not measured at these settings in this run")
        return
    r = match[0]
    rss_ok, time_ok = r["peak_rss_gib"] < t["max_rss_gib"], r["s_per_step"] <= t["max_s_per_step"]
    print(f"  peak RSS  {r['peak_rss_gib']:6.2f} GiB  (target < {t['max_rss_gib']:.0f} GiB)   "
          f"{'PASS' if rss_ok else 'MISS'}")
    print(f"  s/step    {r['s_per_step']:6.2f} s    (target <= {t['max_s_per_step']} s)   "
          f"{'PASS' if time_ok else 'MISS'}")
    if "encoder" in r:
        speedup = r["encoder"]["speedup"]
        print(f"  encoder at mask 0.9 vs 0.0   {speedup:5.1f}x  (target >= {t['min_encoder_speedup']:.0f}x)      "
              f"{'PASS' if speedup >= t['min_encoder_speedup'] else 'MISS'}")
    if not time_ok:
        parts = sorted(r["parts"].items(), key=lambda kv: -sum(v for k, v in kv[1].items() if k.endswith("_s")))
        top = ", ".join(f"{name} {sum(v for k, v in p.items() if k.endswith('_s')):.2f} s" for name, p in parts[:4])
        floor = r["step_flops"] / r["peak_flops"][r["precision"]]
        print(f"  what limits it: the largest rows are {top}; the step's {r['step_flops'] / 1e9:.0f} GFLOP alone "
              f"need {floor:.2f} s at the measured {r['precision']} matmul peak "
              f"(MFU {100 * r['mfu'][r['precision']]:.0f}%), so {r['s_per_step'] - floor:.2f} s go to work "
              f"below the matmul peak (see the breakdown's fwd TFLOP/s), {r['per_step']['sys_s']:.2f} s of system "
              f"CPU time among them ({r['per_step']['minor_page_faults'] / 1e3:.0f}k page faults per step)")


def print_speed_options(results: list[dict]) -> None:
    """Each method option's (or allocator's) step against the paper's method at the same config and precision."""
    plain = {(r["config"], r["precision"]): r for r in results if " + " not in r["config"]}
    rows = []
    for r in results:
        ref = plain.get((r["config"].split(" + ")[0], r["precision"]))
        if " + " in r["config"] and ref:
            rows.append([r["config"], r["precision"], f"{ref['s_per_step']:.2f}", f"{r['s_per_step']:.2f}",
                         f"{ref['s_per_step'] / r['s_per_step']:.2f}x", f"{r['step_flops'] / 1e9:.0f}"])
    if rows:
        print("\nMethod options (off by default) and allocators against the paper's method with glibc malloc, "
              "this run")
        print_table(["config + option", "prec", "paper's s/step", "option s/step", "faster", "GFLOP/step"], rows)


def print_report(results: list[dict]) -> None:
    print_stepprint_table(results)
    for r in results:
        print_breakdown(r)
    print_comparisons(results)
    print_targets(results)
    print_speed_options(results)


# ----------------------------------------------------------------------------------------------- command line


def parse_batch_sizes(text: str | None, names: list[str]) -> dict[str, int]:
    """'8' -> every config; 'tiny=8,base=2' -> per config; None -> no override."""
    if not text:
        return {}
    if "=" not in text:
        return {n: int(text) for n in names}
    sizes = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    unknown = set(sizes) - set(names)
    if unknown:
        raise SystemExit(f"--batch_size names {sorted(unknown)} are not among --configs {names}")
    return sizes


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default="tiny,base", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated, of fp32, bf16 (autocast)")
    p.add_argument("--batch_size", default=None,
                   help="one size for every config ('8') or per config ('tiny=8,base=2'); default tiny 16, base 4")
    p.add_argument("--steps", type=int, default=5, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--encoder_reps", type=int, default=2, help="timed encoder-only passes per mask ratio")
    p.add_argument("--matmul_size", type=int, default=4096, help="n of the n x n x n matmul peak")
    p.add_argument("--malloc_env", action="store_true",
                   help="run the jobs with glibc malloc keeping freed memory (" + " ".join(
                       f"{k}={v}" for k, v in MALLOC_ENV.items()) + "): no page faults on reused memory")
    p.add_argument("--release_src", default=None,
                   help="a checkout of the public SimVTP release (github:wufeim/SimVTP, commit 4b54321): also time its "
                        "own step at the base config in this run (its default fp32, and with bf16 autocast added) and "
                        "print the ratios; see benchmarks/release_simvtp.py")
    p.add_argument("--speed_options", action="store_true",
                   help="also time each config and precision with each method option that cuts work (decode 50%% "
                   "of the masked tubes; one VTM negative per pair; both), compared with the plain step")
    p.add_argument("--allocators", nargs="+", default=["glibc"], choices=["glibc", *ALLOCATORS],
                   help="also time the plain step with each of these malloc libraries preloaded (LD_PRELOAD; "
                   "tcmalloc from Debian's libtcmalloc-minimal4, jemalloc from libjemalloc2), beside glibc's")
    p.add_argument("--compile_blocks", action="store_true", help="also time the step with every transformer "
                   "block compiled (torch.compile, as run_simvtp_pretraining.py --compile_blocks; the warm-up "
                   "steps pay for the compilation)")
    p.add_argument("--attention_table", action="store_true",
                   help="instead of the steps: SDPA vs explicit attention (forward + backward) over key counts, per "
                        "--precision; the bf16 rows are modeling_simvtp.CPU_BF16_ATTENTION_MS")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="smallest run (tiny model at 4 x 32 px, batch 2, one step, fp32 and bf16) for the test")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job in this process
    p.add_argument("--job_out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_jobs(args: argparse.Namespace) -> list[dict]:
    configs = QUICK if args.quick else {n: CONFIGS[n] for n in args.configs.split(",")}
    precisions = args.precision.split(",")
    bad = [p for p in precisions if p not in DTYPES] + [n for n in configs if n not in CONFIGS and n not in QUICK]
    if bad:
        raise SystemExit(f"unknown config or precision: {bad}")
    sizes = parse_batch_sizes(args.batch_size, list(configs))
    encoder_precision = "bf16" if "bf16" in precisions else precisions[0]
    variants = [("", {}, "glibc")] + [(o, k, "glibc") for o, k in SPEED_OPTIONS.items() if args.speed_options] + \
        ([(*COMPILED, "glibc")] if args.compile_blocks else []) + \
        [(a, {}, a) for a in args.allocators if a != "glibc"]
    for allocator in args.allocators:
        allocator_library(allocator)  # a missing library stops here, before any job
    jobs = []
    for (name, cfg), (option, kwargs, allocator) in [(c, v) for c in configs.items() for v in variants]:
        for precision in precisions:
            jobs.append(dict(config=f"{name} + {option}" if option else name,
                             cfg=dict(cfg, batch_size=sizes.get(name, cfg["batch_size"]), model_kwargs=kwargs),
                             precision=precision, threads=args.threads, grad_checkpointing=args.grad_checkpointing,
                             malloc_env=args.malloc_env, allocator=allocator,
                             warmup=0 if args.quick else args.warmup, steps=1 if args.quick else args.steps,
                             encoder=precision == encoder_precision and not option,
                             encoder_reps=1 if args.quick else args.encoder_reps,
                             matmul_size=256 if args.quick else args.matmul_size))
    return jobs


def plan_release_jobs(args: argparse.Namespace, jobs: list[dict]) -> list[dict]:
    """The release's step at every (base config, precision) of our jobs; the release has only the base model."""
    if not args.release_src:
        return []
    require_release_checkout(args.release_src)
    vocab = str(REPO / "assets" / "bert-base-uncased")
    base = [j for j in jobs if j["config"] == "base"]
    if not base:
        print("--release_src: the release has only the base model; add base to --configs to compare", flush=True)
    return [dict(kind="step", src=args.release_src, vocab_dir=vocab, threads=j["threads"], precision=j["precision"],
                 warmup=j["warmup"], steps=j["steps"], batch_size=j["cfg"]["batch_size"],
                 num_frames=j["cfg"]["num_frames"], input_size=j["cfg"]["input_size"]) for j in base]


def run_release_job(job: dict, folder: str) -> dict:
    out_path = os.path.join(folder, f"release_{job['precision']}.json")
    script = str(Path(__file__).with_name("release_simvtp.py"))
    return run_job_in_subprocess(script, job, out_path, f"release base {job['precision']}")


RELEASE_TARGET = 2.5  # ours at our defaults (bf16 where the CPU has it) vs the release at its defaults (fp32), same run


def print_release_comparison(results: list[dict], release: list[dict]) -> None:
    """Same-run ratios: the release's step vs ours at equal precision and at each code's defaults (ours: bf16
    autocast where the CPU runs bf16 natively, else fp32, as --precision auto)."""
    ours = {r["precision"]: r for r in results if r["config"] == "base"}
    theirs = {r["precision"]: r for r in release}
    default = next(iter(ours.values()), {}).get("auto_precision", "bf16")
    print("\nThe release's step vs ours, measured in this run (base, same batch and clip; the release: its own "
          "train_one_epoch; fp32 is its default, bf16 = autocast added to it)")
    rows = [[prec, f"{theirs[prec]['s_per_step']:.2f}", f"{ours[prec]['s_per_step']:.2f}",
             f"{theirs[prec]['s_per_step'] / ours[prec]['s_per_step']:.2f}x"]
            for prec in DTYPES if prec in ours and prec in theirs]
    print_table(["precision", "release s/step", "ours s/step", "ours faster"], rows)
    if default != "bf16":
        print("this CPU has no native bf16 (AVX512-BF16 or AMX): --precision auto trains in fp32 here")
    if "fp32" in theirs and default in ours:
        ratio = theirs["fp32"]["s_per_step"] / ours[default]["s_per_step"]
        print(f"at each code's defaults (release fp32, ours {default}): ours {ratio:.2f}x faster "
              f"[target >= {RELEASE_TARGET}x: {'PASS' if ratio >= RELEASE_TARGET else 'MISS'}]")
        fast = next((r for r in results if r["config"] == "base + tcmalloc" and r["precision"] == default), None)
        if fast is not None:  # the scripts' default where tcmalloc is installed (scripts/fast_malloc.sh)
            ratio = theirs["fp32"]["s_per_step"] / fast["s_per_step"]
            print(f"with tcmalloc, as the scripts run where it is installed (release fp32 with glibc's malloc, ours "
                  f"{default}): ours {ratio:.2f}x faster [target >= {RELEASE_TARGET}x: "
                  f"{'PASS' if ratio >= RELEASE_TARGET else 'MISS'}]")
    if default in ours:
        mfu = ours[default]["mfu"][default]
        print(f"ours {default} at {100 * mfu:.0f}% of the {default} matmul peak measured in the same process "
              f"[target >= 80%: {'PASS' if mfu >= 0.8 else 'MISS'}]")


# --attention_table: [B, H, S, d_head] shapes over key counts S (the first two, then longer ones)
ATTENTION_SHAPES = ((12, 12, 160, 64), (4, 12, 178, 64), (4, 12, 400, 64), (4, 12, 800, 64), (4, 12, 1568, 64))
QUICK_ATTENTION_SHAPES = ((2, 2, 16, 8), (2, 2, 64, 8))


def attention_ms(shape: tuple[int, ...], dtype, fused: bool, reps: int) -> float:
    """Mean ms of forward + backward of one attention call on random q, k, v of `shape` in `dtype`."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=g).to(dtype)

    def call() -> None:
        if fused:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = modeling_simvtp.explicit_attention(q, k, v, None, shape[-1] ** -0.5)
        out.backward(grad)
    _, seconds = time_calls(call, reps)
    return 1000 * sum(seconds) / len(seconds)


def print_attention_table(args: argparse.Namespace) -> dict:
    """SDPA vs explicit attention per precision and key count; the bf16 rows in modeling_simvtp's table format."""
    import_training_stack()
    torch.set_num_threads(args.threads)
    shapes = QUICK_ATTENTION_SHAPES if args.quick else ATTENTION_SHAPES
    reps = 1 if args.quick else args.steps
    table = {p: {s[2]: (s, attention_ms(s, getattr(torch, DTYPES[p]), True, reps),
                        attention_ms(s, getattr(torch, DTYPES[p]), False, reps)) for s in shapes}
             for p in args.precision.split(",")}
    print(f"Attention forward + backward, ms per call (mean of {reps}), {args.threads} threads, load average "
          f"{load_average()}")
    print_table(["precision", "shape [B, H, S, d]", "SDPA ms", "explicit ms", "SDPA / explicit"],
                [[p, "x".join(map(str, s)), f"{f:.2f}", f"{e:.2f}", f"{f / e:.2f}"]
                 for p, rows in table.items() for s, f, e in rows.values()], left=2)
    if "bf16" in table:
        rows = {n: (s, round(f, 1), round(e, 1)) for n, (s, f, e) in table["bf16"].items()}
        print(f"\nmodeling_simvtp.CPU_BF16_ATTENTION_MS = {rows}\n-> explicit attention on CPU in bf16 below "
              f"{modeling_simvtp.sdpa_threshold(rows)} keys (now {modeling_simvtp.CPU_BF16_SDPA_MIN_KEYS})")
    return table


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> list[dict]:
    args = get_args(argv)
    if args.job:
        result = run_job(json.loads(args.job))
        with open(args.job_out, "w") as f:
            json.dump(result, f)
        return [result]
    if args.attention_table:
        print_attention_table(args)
        return []
    jobs = plan_jobs(args)
    release_jobs = plan_release_jobs(args, jobs)
    load_before = load_average()
    print(f"bench_pretrain: {os.cpu_count()} CPU cores, {args.threads} torch threads, load average {load_before} "
          f"(1/5/15 min) before the run; {len(jobs)} jobs, each in a fresh process"
          + ("; grad checkpointing" if args.grad_checkpointing else "")
          + ("; glibc malloc keeps freed memory (--malloc_env)" if args.malloc_env else ""), flush=True)
    start, results, release = time.perf_counter(), [], []
    total = len(jobs) + len(release_jobs)
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as folder:
        for i, job in enumerate(jobs):
            print(f"\n[job {i + 1}/{total}] {job['config']} {job['precision']}  (run time so far "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)
            results.append(run_in_subprocess(job, folder))
        for i, job in enumerate(release_jobs, len(jobs) + 1):
            print(f"\n[job {i}/{total}] the release, base {job['precision']}  (run time so far "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)
            release.append(run_release_job(job, folder))
    load_after = load_average()
    print_report(results)
    if release:
        print_release_comparison(results, release)
    print(f"\ntorch {results[0]['torch']} ({results[0]['cpu_capability']}), {results[0]['threads']} threads; load "
          f"average {load_before} before, {load_after} after (1/5/15 min; {os.cpu_count()} cores); whole run "
          f"{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(load_average_before=load_before, load_average_after=load_after, cpu_count=os.cpu_count(),
                           argv=sys.argv[1:] if argv is None else list(argv), results=results, release=release), f,
                      indent=2)
        print(f"figures written to {args.json}")
    return results


if __name__ == "__main__":
    main()
