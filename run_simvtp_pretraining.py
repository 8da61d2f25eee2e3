"""Pre-training entry point of every model family (SimVTP, SViTT: `--model`), on one CPU or torchrun / SLURM.

    python run_simvtp_pretraining.py --data_path data/synthetic/annotations/pretrain.json \
        --data_root data/synthetic --model simvtp_tiny_patch16 --num_frames 8 --input_size 112 \
        --batch_size 8 --epochs 2 --output_dir output/pretrain --device cpu
    torchrun --nproc_per_node 8 run_simvtp_pretraining.py ... (see scripts/pretrain_webvid.sh)
    ... --model svitt_tiny_patch16 --sparse_random_attn 3 --token_keep_rate 0.6 --token_drop_loc 1 2 (SViTT)
"""
from __future__ import annotations

import argparse
import time

import checkpoint
import command_lines
import datasets
import engine_for_pretraining as engine
import model_registry
import utils
import video_io
import video_transforms


def get_args_parser() -> argparse.ArgumentParser:
    """This entry point's command line (command_lines.py holds every entry point's)."""
    return command_lines.pretraining_parser()


def main(args: argparse.Namespace) -> dict:
    """Pre-train; returns {"summary": last epoch's averages, "history": per-step scalars of this run}."""
    engine.check_args(args)
    video_transforms.resolve_sample_types(args)
    dtype = utils.setup_run(args)
    eval_set = engine.build_eval_dataset(args)  # first: a broken evaluation list stops the run before anything else
    tokenizer = datasets.build_tokenizer(args.tokenizer)
    model = engine.build_model(args, len(tokenizer)).to(args.device_obj)
    if args.text_mask_ratio is None:
        args.text_mask_ratio = model_registry.capability_value(model, "default_text_mask_ratio")
    engine.check_masks(args, model)
    loader, dataset, sampler = engine.build_loader(args, tokenizer, model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Model {model.model_cfg['name']}: {n_params / 1e6:.1f} M parameters; precision {dtype}; device "
          f"{args.device_obj}; {args.world_size} process(es)")

    _, lr_schedule, wd_schedule = utils.training_schedules(args, len(sampler) * args.clips_per_video)
    optimizer = engine.build_optimizer(model, args)
    scaler = utils.make_grad_scaler(args.device_obj, dtype)
    run = engine.start_run(args, model, loader, sampler, dataset, optimizer, scaler, lr_schedule, wd_schedule, dtype)
    run.before_epoch = engine.neighbour_grouping(args, model, sampler, dataset, tokenizer, dtype)
    state = run.state
    t_start = time.time()
    summary = engine.train(run, evaluate=(lambda epoch: engine.zero_shot_eval(model, eval_set, tokenizer, args,
                                                                              dtype)) if eval_set is not None else None,
                           eval_due=lambda e: (e + 1) % max(args.eval_every, 1) == 0 or e + 1 == args.epochs,
                           eval_name="zs")
    print(f"Pre-training done in {time.time() - t_start:.0f} s; outputs in {args.output_dir}")
    return {"summary": summary, "history": state.history}


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser(), engine.NonFiniteLossError, video_io.VideoDecodeError,
                          datasets.BrokenDataError, find_checkpoint=checkpoint.find_latest)
