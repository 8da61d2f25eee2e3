"""Do the papers' claims hold at toy scale? The ablation runner behind `bash scripts/ablate.sh`.

Every study is a list of settings; every (setting, seed) is a run of our own entry points in subprocesses:
pre-training (run_simvtp_pretraining.py), zero-shot retrieval, fine-tuning and its test (run_simvtp_finetuning.py),
plus in-process measurements (GFLOPs of one training step; for study 6 the cross-modal probe,
cross_modal_probe.py). A run is finished when its `result.json` exists, so a stopped runner resumes where it
stopped and never repeats a finished run; a failed run is reported (`failed.json`, its log) and the rest go on.
Identical pre-training (same model, flags, data and seed) is trained once and shared between studies. The tables
(`claims.md`) and the figure (`claims.png`) are built from the runs' own result files. A pre-training keeps its
checkpoint (fine-tunings and evaluations start from it); a tested fine-tuning keeps its metrics and best weights, not
its training state. At start the runner prints the disk the trainings still to run will take and warns when the
output's file system has less free.

    python run_ablations.py --out output/ablations                        # every study, seeds 0 1
    python run_ablations.py --out output/ablations --studies text_mask --seeds 0 1 2
    python run_ablations.py --out output/ablations --report_only          # rebuild the table and figure
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

import checkpoint
import command_lines
import utils

if TYPE_CHECKING:
    import torch

REPO = os.path.dirname(os.path.abspath(__file__))
MODELS = {"simvtp": ("simvtp_tiny_patch16", "simvtp_dual_tiny_patch16"),  # (pre-training, retrieval)
          "svitt": ("svitt_tiny_patch16", "svitt_tiny_patch16")}


@dataclass
class Setting:
    """One point of a study. `pretrain`: extra pre-training flags (None: no pre-training, fine-tuning from random
    initialisation). `model_flags`: the part of them that shapes the model (passed to fine-tuning too). `stages`:
    further pre-training stages, each from the previous stage's checkpoint (temporal expansion), with their epochs
    a share `epochs_scale` of the budget each. `data_fraction`: share of the pre-training clips."""
    name: str
    pretrain: list[str] | None = field(default_factory=list)
    family: str = "simvtp"
    model_flags: list[str] = field(default_factory=list)
    data_fraction: float = 1.0
    epochs_scale: float = 1.0
    stages: list[list[str]] = field(default_factory=list)
    eval_orders: bool = False
    cross_modal: bool = False

    def frames(self, default: int) -> int:
        """Frames of the last stage (its --num_frames, else the runner's)."""
        flags = self.stages[-1] if self.stages else (self.pretrain or [])
        return int(flags[flags.index("--num_frames") + 1]) if "--num_frames" in flags else default


@dataclass
class Study:
    key: str
    title: str
    claim: str
    settings: list[Setting]


EDGE = ["--sparse_local_attn", "1", "--sparse_random_attn", "1", "--attn_block_size", "16"]
NODE = ["--token_keep_rate", "0.6", "--token_drop_loc", "1", "2"]


def _svitt(name: str, flags: list[str], **kw) -> Setting:
    return Setting(name, list(flags), family="svitt", model_flags=list(flags), **kw)


def all_studies() -> list[Study]:
    """The studies of issue 14: SimVTP 1-5 (6 is built from the probes of 1-3), SViTT 7-9, frame order 10."""
    probe = dict(cross_modal=True)
    return [
        Study("video_mask", "1. Video mask ratio and masking type (SimVTP)",
              "a high tube-mask ratio (90%) works best, and tube masking beats random masking", [
                  Setting("tube 0.75", ["--mask_ratio", "0.75"], **probe),
                  Setting("tube 0.90", ["--mask_ratio", "0.9"], **probe),
                  Setting("tube 0.95", ["--mask_ratio", "0.95"], **probe),
                  Setting("random 0.90", ["--mask_ratio", "0.9", "--mask_type", "random"], **probe)]),
        Study("text_mask", "2. Text mask ratio (SimVTP)", "masking 75% of the words beats BERT's 15%", [
            # 0.75 is SimVTP's own default, which the flag's default (None: the model's) stands for: shared runs
            Setting(f"words {r}", ["--text_mask_ratio", r] if r != "0.75" else [], **probe)
            for r in ("0.15", "0.45", "0.75")]),
        Study("objectives", "3. Objectives (SimVTP)", "adding VTC, then VTM with hard negatives, to pixel + word "
              "reconstruction helps retrieval", [
                  Setting("pixel + word", ["--w_vtc", "0", "--w_vtm", "0"], **probe),
                  Setting("+ VTC", ["--w_vtm", "0"], **probe),
                  Setting("+ VTC + VTM hard", [], **probe),  # hard negatives are the default: the shared run
                  Setting("+ VTC + VTM random", ["--vtm_negatives", "random"], **probe)]),
        Study("data", "4. Data efficiency (SimVTP)", "pre-training on less data still helps", [
            Setting("10% of clips", data_fraction=0.1), Setting("30% of clips", data_fraction=0.3),
            Setting("100% of clips")]),
        Study("scratch", "5. No pre-training (SimVTP)", "the floor: fine-tuning from random initialisation",
              [Setting("from scratch", None)]),
        Study("svitt_sparsity", "7. Edge and node sparsity (SViTT)", "sparse attention keeps accuracy at a "
              "fraction of the compute", [
                  _svitt("dense", []), _svitt("edge", EDGE), _svitt("edge + node 0.6", EDGE + NODE)]),
        Study("svitt_keep", "8. Keep rate at 8 frames (SViTT)", "accuracy falls slowly as fewer tokens are kept", [
            _svitt(f"keep {k}", EDGE + (["--token_keep_rate", k, "--token_drop_loc", "1", "2"] if k != "1.0" else []))
            for k in ("1.0", "0.7", "0.5", "0.3")]),
        Study("svitt_expand", "9. Temporal expansion (SViTT)", "4 -> 8 frames from the 4-frame checkpoint matches "
              "8 frames from scratch with the same total steps", [
                  Setting("4 frames", EDGE + ["--num_frames", "4"], family="svitt", model_flags=EDGE),
                  Setting("4 -> 8 frames", EDGE + ["--num_frames", "4"], family="svitt", model_flags=EDGE,
                          epochs_scale=0.5, stages=[list(EDGE)]),
                  _svitt("8 frames", EDGE)]),
        Study("frame_order", "10. Frame order at evaluation (both families)", "a model that uses time loses "
              "accuracy when its frames are reversed, shuffled or frozen", [
                  Setting("SimVTP", eval_orders=True), _svitt("SViTT", EDGE + NODE, eval_orders=True)]),
        Study("speed_options", "Options that cut work (SimVTP; not in the default set)", "decoding half of the "
              "masked tubes, one matching negative per pair or two clips per video read costs no retrieval accuracy",
              [Setting("the paper's method"), Setting("decode 50% of masked tubes", ["--decode_fraction", "0.5"]),
               Setting("1 VTM negative per pair", ["--vtm_negatives_per_pair", "1"]),
               Setting("both", ["--decode_fraction", "0.5", "--vtm_negatives_per_pair", "1"]),
               Setting("2 clips per video read", ["--clips_per_video", "2"])]),
        Study("time_order", "Time-order loss (both families; not in the default set)", "a caption that must prefer "
              "its clip to the same clip played backwards (--w_reverse) makes the model use time", [
                  Setting("SimVTP", eval_orders=True), Setting("SimVTP + time order", ["--w_reverse", "1"],
                                                               eval_orders=True),
                  _svitt("SViTT", EDGE + NODE, eval_orders=True),
                  Setting("SViTT + time order", EDGE + NODE + ["--w_reverse", "1"], family="svitt",
                          model_flags=EDGE + NODE, eval_orders=True)]),  # pre-training only: fine-tuning as SViTT's
    ]


OPT_IN = ("speed_options", "time_order")  # studies run only when asked for by name


CROSS_MODAL = "cross_modal"  # study 6's table key: the probes of studies 1-3's runs


# ----------------------------------------------------------------------------------------------- configuration


@dataclass
class Config:
    out: str
    data_root: str
    epochs: int = 5
    finetune_epochs: int = 3
    input_size: int = 64
    num_frames: int = 8
    batch_size: int = 16
    lr: float = 5e-3
    python: str = sys.executable

    @property
    def ann(self) -> str:
        return os.path.join(self.data_root, "annotations")

    def clip_flags(self, frames: int) -> list[str]:
        return ["--num_frames", str(frames), "--sampling_rate", "4", "--input_size", str(self.input_size),
                "--short_side_size", str(self.input_size), "--device", "cpu", "--precision", "auto",
                "--num_workers", "0", "--print_freq", "50", "--batch_size", str(self.batch_size),
                "--data_root", self.data_root]


def write_json(path: str, data) -> None:
    """Atomically: a stopped runner never leaves half a result file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


class StepFailed(RuntimeError):
    pass


def run_step(cmd: list[str], log_path: str, label: str) -> float:
    """One of our entry points in a subprocess, its output appended to log_path -> seconds taken. A non-zero exit
    raises StepFailed with the last lines of its output."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    if status != 0:
        with open(log_path) as f:
            tail = [line for line in f.read().splitlines() if line.strip()][-3:]
        raise StepFailed(f"{label} exited with status {status}: {' | '.join(tail)}")
    return time.time() - t0


# ----------------------------------------------------------------------------------------------- one run


def subset_file(cfg: Config, fraction: float, seed: int) -> str:
    """The pre-training list, or a seeded fraction of its clips, written once beside the runs."""
    src = os.path.join(cfg.ann, "pretrain.json")
    if fraction >= 1.0:
        return src
    path = os.path.join(cfg.out, "data", f"pretrain_{fraction:g}_seed{seed}.json")
    if not os.path.exists(path):
        with open(src) as f:
            records = json.load(f)  # the release's {video: caption} dict or the Singularity list: kept as it is
        items = list(records.items()) if isinstance(records, dict) else records
        keep = np.random.default_rng([seed, 14]).permutation(len(items))[:max(1, round(fraction * len(items)))]
        chosen = [items[i] for i in sorted(keep.tolist())]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, dict(chosen) if isinstance(records, dict) else chosen)
    return path


def step_folder(cmd: list[str], kind: str, cfg: Config, label: str) -> str:
    """The folder of one entry point's run (cmd without --output_dir): named by a hash of its parsed arguments that
    differ from their defaults. Equal arguments written differently (a default spelled out, flags in another order)
    parse alike, so settings that amount to the same training or evaluation share one folder; a flag added to an
    entry point later (at its default) keeps finished folders valid."""
    script = os.path.basename(cmd[1])
    parser = (command_lines.pretraining_parser if script == "run_simvtp_pretraining.py"
              else command_lines.finetuning_parser)()
    try:
        parsed = vars(parser.parse_args(cmd[2:]))
    except SystemExit:  # argparse has printed why
        raise StepFailed(f"{label}: {script} refused its arguments: {' '.join(cmd[2:])}") from None
    changed = {k: v for k, v in parsed.items() if k != "output_dir" and v != parser.get_default(k)}
    key = hashlib.sha1(json.dumps([script, changed], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.join(cfg.out, kind, key)


def finished(folder: str) -> bool:
    """A shared training or evaluation is finished when its done.json exists (written after the step exits)."""
    return os.path.exists(os.path.join(folder, "done.json"))


def shared_step(cmd: list[str], kind: str, cfg: Config, log_path: str, label: str) -> tuple[str, dict]:
    """Run one entry point (cmd without --output_dir) in its step_folder unless it finished there already
    -> (folder, its done.json): settings that amount to the same training or evaluation run it once."""
    folder = step_folder(cmd, kind, cfg, label)
    done = os.path.join(folder, "done.json")
    if finished(folder):
        with open(log_path, "a") as log:
            log.write(f"\n{label}: shared, already in {folder}\n")
    else:
        took = run_step([*cmd, "--output_dir", folder], log_path, label)
        write_json(done, {"seconds": took})
    with open(done) as f:
        return folder, json.load(f)


def stage_flags(setting: Setting) -> list[list[str]]:
    """The pre-training flags of each stage (none without pre-training)."""
    return [] if setting.pretrain is None else [setting.pretrain, *setting.stages]


def pretrain_command(setting: Setting, seed: int, cfg: Config, flags: list[str], init_ckpt: str | None) -> list[str]:
    """One pre-training stage (without --output_dir), from init_ckpt when it follows another stage."""
    epochs = max(1, round(cfg.epochs * setting.epochs_scale))
    frames = int(flags[flags.index("--num_frames") + 1]) if "--num_frames" in flags else cfg.num_frames
    rest = [f for i, f in enumerate(flags) if f != "--num_frames" and (i == 0 or flags[i - 1] != "--num_frames")]
    cmd = [cfg.python, "run_simvtp_pretraining.py", "--model", MODELS[setting.family][0], "--data_path",
           subset_file(cfg, setting.data_fraction, seed), *cfg.clip_flags(frames), "--epochs", str(epochs),
           "--warmup_epochs", str(max(1, epochs // 10)), "--lr", str(cfg.lr), "--min_lr", "1e-5",
           "--save_ckpt_freq", "0", "--keep_last", "1", "--seed", str(seed), *rest]
    if setting.family == "svitt":
        cmd += ["--sample_type", "rand"]
    if init_ckpt:
        cmd += ["--init_ckpt", init_ckpt]
    return cmd


def latest_checkpoint(folder: str) -> str:
    """The checkpoint a finished pre-training left (its `latest` pointer)."""
    with open(os.path.join(folder, "latest")) as f:
        return os.path.join(folder, f.read().strip())


def pretrain(setting: Setting, seed: int, cfg: Config, log_path: str) -> tuple[str | None, float, int]:
    """Every pre-training stage of a setting -> (last checkpoint, seconds, steps) summed over the stages; a stage
    that another setting already trained is shared (its figures are the first training's)."""
    ckpt, seconds, steps = None, 0.0, 0
    for flags in stage_flags(setting):
        folder, record = shared_step(pretrain_command(setting, seed, cfg, flags, ckpt), "pretrain", cfg, log_path,
                                     f"pre-training ({setting.name})")
        if "steps" not in record:
            record["steps"] = last_step(folder)
            write_json(os.path.join(folder, "done.json"), record)
        seconds, steps = seconds + record["seconds"], steps + record["steps"]
        ckpt = latest_checkpoint(folder)
    return ckpt, seconds, steps


def last_step(folder: str) -> int:
    with open(os.path.join(folder, "log.txt")) as f:
        lines = f.read().splitlines()
    return int(json.loads(lines[-1])["global_step"]) if lines else 0


def eval_flags(setting: Setting, seed: int, cfg: Config) -> list[str]:
    """The clip, test-set and seed flags zero-shot retrieval and fine-tuning share."""
    flags = cfg.clip_flags(setting.frames(cfg.num_frames)) + [
        "--test_num_segment", "1", "--test_num_crop", "1", "--seed", str(seed),
        "--test_data_path", os.path.join(cfg.ann, "test.json")]
    return flags + (["--sample_type", "rand"] if setting.family == "svitt" else [])


def finetune_command(setting: Setting, seed: int, cfg: Config, ckpt: str | None) -> list[str]:
    """Fine-tuning + test (without --output_dir), from ckpt or, without one, from random initialisation."""
    cmd = [cfg.python, "run_simvtp_finetuning.py", "--model", MODELS[setting.family][1], "--data_path",
           os.path.join(cfg.ann, "train.json"), "--val_data_path", os.path.join(cfg.ann, "val.json"),
           "--epochs", str(cfg.finetune_epochs), "--warmup_epochs", "1", "--lr", str(cfg.lr), "--drop_path", "0.0",
           "--keep_last", "1", *eval_flags(setting, seed, cfg), *setting.model_flags]
    return cmd + (["--finetune", ckpt] if ckpt else [])


def evaluate(setting: Setting, seed: int, cfg: Config, ckpt: str | None, log_path: str) -> dict:
    """Zero-shot retrieval (a pre-trained model) and fine-tuning + test on the test split -> their metrics. Equal
    evaluations of a shared checkpoint are shared too. A fine-tuning's training state goes once it is tested."""
    out: dict = {}
    if ckpt:
        orders = ["--eval_frame_order", "none", "reverse", "shuffle", "freeze"] if setting.eval_orders else []
        zero, _ = shared_step([cfg.python, "run_simvtp_finetuning.py", "--zero_shot", "--finetune", ckpt,
                               *eval_flags(setting, seed, cfg), *orders], "evals", cfg, log_path,
                              f"zero-shot ({setting.name})")
        with open(os.path.join(zero, "zero_shot_metrics.json")) as f:
            out["zero_shot"] = json.load(f)
    tuned, _ = shared_step(finetune_command(setting, seed, cfg, ckpt), "evals", cfg, log_path,
                           f"fine-tuning ({setting.name})")
    with open(os.path.join(tuned, "test_metrics.json")) as f:
        out["finetune"] = json.load(f)
    drop_training_state(tuned)
    return out


def build_model(name: str, flags: list[str], frames: int, size: int) -> tuple[torch.nn.Module, argparse.Namespace]:
    """A registered model as the pre-training flags shape it -> (model, the parsed flags)."""
    import model_registry
    args = command_lines.pretraining_parser().parse_args(
        ["--data_path", "-", "--model", name, *flags, "--num_frames", str(frames), "--input_size", str(size)])
    return model_registry.create(name, **model_registry.model_kwargs(args, name, vocab_size=30522)), args


def step_gflops(setting: Setting, cfg: Config) -> float:
    """Forward + backward GFLOPs of one pre-training step (a fine-tuning step without pre-training) at the runs'
    batch size and clip shape, counted by torch's FlopCounterMode on a random batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import video_transforms
    import masking_generator
    name = MODELS[setting.family][0 if setting.pretrain is not None else 1]
    frames, size, b = setting.frames(cfg.num_frames), cfg.input_size, cfg.batch_size
    flags = list((setting.stages[-1] if setting.stages else setting.pretrain) or [])
    model, args = build_model(name, flags, frames, size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (b, 16), generator=g)
    batch = {"video": torch.randn(b, 3, frames, size, size, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "mlm_input_ids": ids.clone(),
             "mlm_labels": torch.where(torch.rand(ids.shape, generator=g) < 0.5, ids, -100),
             "index": torch.arange(b)}  # SViTT tells a clip's own captions from others' by it
    if model.takes_video_mask:
        gen = masking_generator.build_mask_generator(args.mask_type, model.token_grid(frames, size, size),
                                                     args.mask_ratio)
        batch["video_mask"] = torch.from_numpy(np.stack([gen(video_transforms.sample_rng(0, 0, i, "video_mask"))
                                                         for i in range(b)]))
    with FlopCounterMode(display=False) as counter:
        model(batch)["loss"].backward()
    return counter.get_total_flops() / 1e9


def run_folder(cfg: Config, study: Study, setting: Setting, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in setting.name).strip("_")
    return os.path.join(cfg.out, "runs", study.key, slug, f"seed{seed}")


def run_one(study: Study, setting: Setting, seed: int, cfg: Config) -> dict:
    """One (setting, seed) -> its result.json: pre-training (shared), evaluations, cost, probe."""
    folder = run_folder(cfg, study, setting, seed)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "run.log")
    t0 = time.time()
    ckpt, seconds, steps = pretrain(setting, seed, cfg, log_path)
    result = {"study": study.key, "setting": setting.name, "seed": seed, "pretrain_seconds": seconds,
              "pretrain_steps": steps, "checkpoint": ckpt, **evaluate(setting, seed, cfg, ckpt, log_path),
              "gflops_per_step": step_gflops(setting, cfg)}
    if setting.cross_modal and ckpt:
        import cross_modal_probe
        import synthetic_dataset
        result["cross_modal"] = cross_modal_probe.probe(ckpt, os.path.join(cfg.ann, "test.json"), cfg.data_root,
                                                        seed=seed, word_groups=synthetic_dataset.word_groups())
    result["seconds"] = time.time() - t0
    write_json(os.path.join(folder, "result.json"), result)
    return result


# ----------------------------------------------------------------------------------------------- disk


def drop_training_state(folder: str) -> int:
    """A tested fine-tuning's resume checkpoints (checkpoint-N.pth, their keep-checkpoint-N.pth hard links, the
    `latest` pointer) -> bytes freed. Nothing resumes a finished fine-tuning (the runner goes by done.json and reads
    test_metrics.json) and checkpoint-best.pth keeps its weights; without that file (or before the test) nothing
    is removed."""
    best, metrics = (os.path.join(folder, name) for name in ("checkpoint-best.pth", "test_metrics.json"))
    if not (finished(folder) and os.path.exists(best) and os.path.exists(metrics)):
        return 0
    paths = checkpoint.list_checkpoints(folder) + glob.glob(os.path.join(folder, "keep-checkpoint-*.pth"))
    freed: dict[tuple[int, int], int] = {}  # by inode: a hard link frees its bytes with the last name
    for path in paths:
        stat = os.stat(path)
        freed[(stat.st_dev, stat.st_ino)] = stat.st_size
        os.remove(path)
    pointer = os.path.join(folder, checkpoint.LATEST_POINTER)
    if os.path.exists(pointer):  # it would name a file that is gone
        os.remove(pointer)
    return sum(freed.values())


def drop_finished_training_states(cfg: Config) -> tuple[int, int]:
    """drop_training_state on every tested fine-tuning in cfg.out (those a runner before this one kept)
    -> (folders cleaned, bytes freed)."""
    freed = [drop_training_state(folder) for folder in sorted(glob.glob(os.path.join(cfg.out, "evals", "*")))]
    return sum(1 for b in freed if b), sum(freed)


@dataclass(frozen=True)
class ModelSize:
    """A model's parameter count: its weights take 4 bytes a parameter (float32), a training state 4 more for each
    of AdamW's two moments of every trainable one."""
    params: int
    trainable: int

    @property
    def weights_bytes(self) -> int:
        return 4 * self.params

    @property
    def state_bytes(self) -> int:
        return 4 * (self.params + 2 * self.trainable)


@dataclass(frozen=True)
class DiskEstimate:
    leaves: int  # bytes the trainings still to run leave in the output folder
    peak: int  # bytes they need at most while they run


def disk_estimate(pretrainings: list[ModelSize], finetunings: list[ModelSize]) -> DiskEstimate:
    """Each pre-training leaves its training state (the checkpoint later stages, evaluations and fine-tunings start
    from), each fine-tuning its best weights (its training state is dropped once tested). While training, a run
    holds up to two training states more: it writes the next before removing the last."""
    leaves = sum(m.state_bytes for m in pretrainings) + sum(m.weights_bytes for m in finetunings)
    in_flight = 2 * max((m.state_bytes for m in pretrainings + finetunings), default=0)
    return DiskEstimate(leaves, leaves + in_flight)


def model_sizes(family: str, cfg: Config) -> tuple[ModelSize, ModelSize]:
    """(pre-training, retrieval) model of a family at the runs' clip shape and the models' default flags: built
    once to count their parameters (the studies' flags change the counts little)."""
    sizes = []
    for name in MODELS[family]:
        params = list(build_model(name, [], cfg.num_frames, cfg.input_size)[0].parameters())
        sizes.append(ModelSize(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    return sizes[0], sizes[1]


def trainings_to_run(runs: list[tuple[Study, Setting, int]], cfg: Config) -> tuple[dict[str, str], dict[str, str]]:
    """The pre-training and fine-tuning folders the unfinished runs will train in -> their model family, each
    once however many runs share it. A stage after an unfinished one gets a stand-in for the checkpoint it will
    start from (the previous stage's folder): the real name is known only once that stage has trained, and the
    stand-in tells the trainings apart just as well. A run whose arguments are refused is left out (it fails)."""
    pretrainings: dict[str, str] = {}
    finetunings: dict[str, str] = {}
    for study, setting, seed in runs:
        if os.path.exists(os.path.join(run_folder(cfg, study, setting, seed), "result.json")):
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # argparse's refusal is printed when the run fails
                ckpt = None
                for flags in stage_flags(setting):
                    folder = step_folder(pretrain_command(setting, seed, cfg, flags, ckpt), "pretrain", cfg, "")
                    if not finished(folder):
                        pretrainings[folder] = setting.family
                    ckpt = latest_checkpoint(folder) if finished(folder) else os.path.join(folder, "checkpoint")
                folder = step_folder(finetune_command(setting, seed, cfg, ckpt), "evals", cfg, "")
        except StepFailed:
            continue
        if not finished(folder):
            finetunings[folder] = setting.family
    return pretrainings, finetunings


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def disk_report(estimate: DiskEstimate, pretrainings: int, finetunings: int, free: int, out: str) -> str:
    """What the trainings still to run take and how that is estimated; a warning when `free` bytes are less."""
    text = (f"Disk: {pretrainings} pre-trainings and {finetunings} fine-tunings to train will leave about "
            f"{_gb(estimate.leaves)} in {out} ({_gb(estimate.peak)} at peak); {_gb(free)} free there.\n"
            "  (from the models' parameter counts: a pre-training keeps its checkpoint, 4 bytes a parameter + 8 for "
            "AdamW's moments of a trainable one; a fine-tuning its best weights, 4 bytes a parameter; the peak adds "
            "two training states of the largest model)")
    if free < estimate.peak:
        text += (f"\nWARNING: only {_gb(free)} free on the file system of {out}, the runs need about "
                 f"{_gb(estimate.peak)}: free some space or pass --out on a larger disk")
    return text


def report_disk(runs: list[tuple[Study, Setting, int]], cfg: Config) -> DiskEstimate:
    """Print the disk the trainings still to run will take, with a warning when the output's file system has less
    free (an estimate: the runner goes on either way)."""
    pretrainings, finetunings = trainings_to_run(runs, cfg)
    sizes = {family: model_sizes(family, cfg) for family in {*pretrainings.values(), *finetunings.values()}}
    estimate = disk_estimate([sizes[f][0] for f in pretrainings.values()], [sizes[f][1] for f in finetunings.values()])
    print(disk_report(estimate, len(pretrainings), len(finetunings), shutil.disk_usage(cfg.out).free, cfg.out),
          flush=True)
    return estimate


# ----------------------------------------------------------------------------------------------- the runner


def plan(studies: list[Study], seeds: list[int]) -> list[tuple[Study, Setting, int]]:
    return [(study, setting, seed) for study in studies for setting in study.settings for seed in seeds]


def run_all(runs: list[tuple[Study, Setting, int]], cfg: Config) -> list[str]:
    """Every run not finished yet, with progress and an ETA from the runs timed so far -> failures (messages)."""
    todo = [r for r in runs if not os.path.exists(os.path.join(run_folder(cfg, *r[:2], r[2]), "result.json"))]
    print(f"Ablations: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to go", flush=True)
    cleaned, freed = drop_finished_training_states(cfg)
    if cleaned:
        print(f"Removed the training state of {cleaned} tested fine-tunings ({_gb(freed)}; checkpoint-best.pth "
              "kept)", flush=True)
    report_disk(todo, cfg)
    failures, took, t0 = [], [], time.time()
    for n, (study, setting, seed) in enumerate(todo, 1):
        label = f"{study.key} / {setting.name} / seed {seed}"
        eta = f", ETA {_clock(np.mean(took) * (len(todo) - n + 1))}" if took else ""
        print(f"[{n}/{len(todo)}] {label} (elapsed {_clock(time.time() - t0)}{eta})", flush=True)
        folder = run_folder(cfg, study, setting, seed)
        start = time.time()
        try:
            run_one(study, setting, seed, cfg)
            failed = os.path.join(folder, "failed.json")
            if os.path.exists(failed):
                os.remove(failed)
        except Exception as e:  # a failed step or in-process measurement: a failed run, the others go on
            failures.append(f"{label}: {e if isinstance(e, StepFailed) else repr(e)}")
            write_json(os.path.join(folder, "failed.json"), {"error": str(e)})
            print(f"FAILED {label}: {e} (log: {os.path.join(folder, 'run.log')}); going on", flush=True)
        took.append(time.time() - start)
    return failures


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------- the report


def load_results(cfg: Config, runs: list[tuple[Study, Setting, int]]) -> dict[tuple[str, str], list[dict]]:
    """(study, setting) -> the result.json of each finished seed (from the files, never from memory)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for study, setting, seed in runs:
        path = os.path.join(run_folder(cfg, study, setting, seed), "result.json")
        if os.path.exists(path):
            with open(path) as f:
                out.setdefault((study.key, setting.name), []).append(json.load(f))
    return out


def mean_std(values: list[float]) -> str:
    """"m +- s" over seeds (s: sample std; one seed: no spread)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} +- {np.std(values, ddof=1):.1f}"


COLUMNS = (("zero-shot R@1", ("zero_shot", "t2v_R@1")), ("zero-shot R@5", ("zero_shot", "t2v_R@5")),
           ("fine-tuned R@1", ("finetune", "t2v_R@1")), ("fine-tuned R@5", ("finetune", "t2v_R@5")))


def _get(result: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def study_table(study: Study, results: dict, seeds: list[int], cfg: Config) -> str:
    """One study's markdown table: mean +- std over seeds of t2v R@1 / R@5 (zero-shot, fine-tuned), the
    pre-training wall time and GFLOPs per step; a setting without results says so."""
    head = "| setting | " + " | ".join(c for c, _ in COLUMNS) + " | pre-training s | GFLOPs / step | seeds |"
    lines = [f"### {study.title}", "", f"Claim: {study.claim}.", "", head, "|" + "---|" * (len(COLUMNS) + 4)]
    for setting in study.settings:
        done = results.get((study.key, setting.name), [])
        failed = [s for s in seeds if os.path.exists(os.path.join(run_folder(cfg, study, setting, s), "failed.json"))]
        cells = [mean_std([v for r in done if (v := _get(r, path)) is not None]) for _, path in COLUMNS]
        cost = [mean_std([r["pretrain_seconds"] for r in done if r.get("pretrain_steps")]),
                mean_std([r["gflops_per_step"] for r in done])]
        note = f"{len(done)}" + (f" ({len(failed)} failed)" if failed else "")
        lines.append(f"| {setting.name} | " + " | ".join(cells + cost) + f" | {note} |")
    orders = [r for s in study.settings for r in results.get((study.key, s.name), [])
              if _get(r, ("zero_shot", "frame_orders"))]
    if orders:
        lines += ["", "Zero-shot t2v R@1 per frame order:", "", "| setting | none | reverse | shuffle | freeze |",
                  "|---|---|---|---|---|"]
        for setting in study.settings:
            done = [r for r in results.get((study.key, setting.name), []) if _get(r, ("zero_shot", "frame_orders"))]
            if done:
                cells = [mean_std([r["zero_shot"]["frame_orders"][o]["t2v_R@1"] for r in done])
                         for o in ("none", "reverse", "shuffle", "freeze")]
                lines.append(f"| {setting.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PROBE_COLUMNS = (("words top-1 own / other / none", "word_top1_{}", "{:.1f}"),
                 ("words top-5 own / other / none", "word_top5_{}", "{:.1f}"),
                 ("colour words, top 1 among the colours, own / other / none", "word_in_group_{}/colour", "{:.1f}"),
                 ("pixel MSE own / other / none / tube mean", "pixel_mse_{}", "{:.3f}"),
                 ("pixel MSE, high-contrast quarter, own / other / none / tube mean", "pixel_mse_{}/high_contrast",
                  "{:.3f}"))


def _probe_cell(done: list[dict], key: str, fmt: str) -> str:
    """One study-6 cell: the mean over seeds per condition ("-" where a probe lacks the figure: an older run)."""
    conditions = ("own", "other", "none", "mean") if key.startswith("pixel") else ("own", "other", "none")
    values = [[d[key.format(c)] for d in done if key.format(c) in d] for c in conditions]
    return " / ".join(fmt.format(np.mean(v)) if v else "-" for v in values)


def cross_modal_table(studies: list[Study], results: dict) -> str:
    """Study 6: the probe of every pre-trained model of studies 1-3, means over seeds."""
    lines = ["### 6. Cross-modal help (SimVTP)", "",
             "Claim: the model reconstructs the masked signal of one modality with the help of the other. Masked-word "
             "accuracy (%) with the clip's own video, another clip's video, no video, over every masked word and, for "
             "the colour words, as the choice among the colour words (chance: one in their number); pixel error of "
             "the masked tubes with the clip's own caption, another caption, no text, beside predicting each tube's "
             "mean, over every masked tube and over the quarter with the most contrast (the object's) (test split, "
             "pre-training masks).", "",
             "| study / setting | " + " | ".join(c for c, _, _ in PROBE_COLUMNS) + " |",
             "|---|" + "---|" * len(PROBE_COLUMNS)]
    for study in studies:
        for setting in study.settings:
            done = [r["cross_modal"] for r in results.get((study.key, setting.name), []) if "cross_modal" in r]
            if not done:
                continue
            cells = [_probe_cell(done, key, fmt) for _, key, fmt in PROBE_COLUMNS]
            lines.append(f"| {study.key} / {setting.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(cfg: Config, studies: list[Study], seeds: list[int], failures: list[str], seconds: float) -> str:
    """claims.md and claims.png in cfg.out from the runs' result files -> the markdown."""
    runs = plan(studies, seeds)
    results = load_results(cfg, runs)
    finished = sum(len(done) for done in results.values())
    spent = sum(r.get("seconds", 0.0) for done in results.values() for r in done)
    parts = ["# Claims at toy scale", "",
             f"Synthetic set, {cfg.num_frames} frames of {cfg.input_size} px, pre-training {cfg.epochs} epochs, "
             f"fine-tuning {cfg.finetune_epochs} epochs, batch {cfg.batch_size}, seeds {' '.join(map(str, seeds))}; "
             f"text-to-video R@1 / R@5 on the test split (mean +- sample std over seeds). {finished} of "
             f"{len(runs)} runs finished; their own times add up to {_clock(spent)} (a training or evaluation "
             f"shared with an earlier run counts once); this invocation took {_clock(seconds)}.", ""]
    for study in studies:
        parts += [study_table(study, results, seeds, cfg), ""]
    if any(s.cross_modal for st in studies for s in st.settings):
        parts += [cross_modal_table(studies, results), ""]
    if failures:
        parts += ["Failed runs (see their run.log):", ""] + [f"- {f}" for f in failures] + [""]
    text = "\n".join(parts)
    with open(os.path.join(cfg.out, "claims.md"), "w") as f:
        f.write(text)
    draw(cfg, studies, results)
    return text


def draw(cfg: Config, studies: list[Study], results: dict) -> None:
    """claims.png: one panel per study, fine-tuned (and zero-shot) t2v R@1 per setting with the seed spread."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(studies))
    rows = -(-len(studies) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, study in zip(axes.flat, studies):
        names = [s.name for s in study.settings]
        x = np.arange(len(names))
        for offset, (label, path) in ((-0.2, ("zero-shot", ("zero_shot", "t2v_R@1"))),
                                      (0.2, ("fine-tuned", ("finetune", "t2v_R@1")))):
            values = [[v for r in results.get((study.key, n), []) if (v := _get(r, path)) is not None]
                      for n in names]
            means = [np.mean(v) if v else np.nan for v in values]
            errs = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.bar(x + offset, means, 0.4, yerr=errs, label=label, capsize=3)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_title(study.title, fontsize=9)
        ax.set_ylabel("t2v R@1")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(studies):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "claims.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    keys = [s.key for s in all_studies()]
    default = [k for k in keys if k not in OPT_IN]
    p = argparse.ArgumentParser("Ablation studies on the synthetic set: claims table and figure",
                                formatter_class=utils.HelpFormatter)
    p.add_argument("--out", default="output/ablations", help="runs, claims.md and claims.png")
    p.add_argument("--data_root", default="data/synthetic_ablate", help="the synthetic set (synthetic_dataset.py)")
    p.add_argument("--studies", nargs="+", default=default, choices=keys + [CROSS_MODAL],
                   help=f"studies to run ({CROSS_MODAL}: the probes of video_mask, text_mask and objectives; "
                        f"{', '.join(OPT_IN)} only when named)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every setting")
    p.add_argument("--epochs", type=int, default=5, help="pre-training epochs of a run (5: 100 steps on the 320 clips)")
    p.add_argument("--finetune_epochs", type=int, default=3, help="fine-tuning epochs of a run")
    p.add_argument("--input_size", type=int, default=64, help="clip side in pixels")
    p.add_argument("--num_frames", type=int, default=8, help="frames per clip (SViTT's 4-frame settings keep 4)")
    p.add_argument("--batch_size", type=int, default=16, help="clips per step")
    p.add_argument("--lr", type=float, default=5e-3, help="peak lr per 256 clips, pre-training and fine-tuning")
    p.add_argument("--report_only", action="store_true", help="only rebuild claims.md / claims.png from the runs")
    return p


def selected(keys: list[str]) -> list[Study]:
    """The studies asked for; cross_modal means the probed studies 1-3."""
    wanted = set(keys) | ({"video_mask", "text_mask", "objectives"} if CROSS_MODAL in keys else set())
    return [s for s in all_studies() if s.key in wanted]


def main(args: argparse.Namespace) -> dict:
    cfg = Config(out=args.out, data_root=args.data_root, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                 input_size=args.input_size, num_frames=args.num_frames, batch_size=args.batch_size, lr=args.lr)
    if not os.path.exists(os.path.join(cfg.ann, "pretrain.json")):
        raise ValueError(f"--data_root {cfg.data_root}: no annotations/pretrain.json; build the set with "
                         f"`python synthetic_dataset.py --out {cfg.data_root}`")
    os.makedirs(cfg.out, exist_ok=True)
    studies = selected(args.studies)
    t0 = time.time()
    failures = [] if args.report_only else run_all(plan(studies, args.seeds), cfg)
    text = write_report(cfg, studies, args.seeds, failures, time.time() - t0)
    print(text)
    print(f"\nWrote {os.path.join(cfg.out, 'claims.md')} and {os.path.join(cfg.out, 'claims.png')}"
          + (f"; {len(failures)} run(s) failed" if failures else ""))
    if failures:
        raise SystemExit(1)
    return {"failures": failures}


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser())
