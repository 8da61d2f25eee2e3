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
from dataclasses import replace

import numpy as np
import torch

import checkpoint
import command_lines
import datasets
import retrieval_eval
import engine_for_pretraining as engine
import masking_generator
import model_registry
import utils


def get_args_parser() -> argparse.ArgumentParser:
    """This entry point's command line (command_lines.py holds every entry point's)."""
    return command_lines.pretraining_parser()


def build_model(args: argparse.Namespace, vocab_size: int) -> torch.nn.Module:
    """The model named by --model with its family's flags; --init_ckpt / --bert_path weights on top."""
    model = model_registry.create(args.model, **model_registry.model_kwargs(args, args.model, vocab_size=vocab_size))
    for path in (args.init_ckpt, args.beit_path, args.bert_path):
        if path:
            checkpoint.load_pretrained(model, path, strict=False)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.compile_blocks:
        print(f"torch.compile: {utils.compile_blocks(model)} transformer blocks compiled in place")
    return model


def build_loader(args: argparse.Namespace, tokenizer, model: torch.nn.Module) -> tuple[
        torch.utils.data.DataLoader, datasets.VideoTextDataset, utils.ResumableDistributedSampler]:
    """Training data shaped by what the model asks for: a video mask on its token grid, MLM captions."""
    # numpy columns, not a list of objects: forked loader workers share them instead of copying them
    records = datasets.read_record_table(args.data_path, args.data_root, args.skip_bad_records)
    mask_gen = None
    if model.takes_video_mask:
        grid = model.token_grid(args.num_frames, args.input_size, args.input_size)
        mask_gen = masking_generator.build_mask_generator(args.mask_type, grid, args.mask_ratio)
    dataset = datasets.VideoTextDataset(records, mode="train", num_frames=args.num_frames,
                                        sampling_rate=args.sampling_rate, input_size=args.input_size,
                                        video_backend=args.video_backend, seed=args.seed,
                                        decode_threads=args.decode_threads, mask_generator=mask_gen,
                                        sample_type=args.sample_type, clips_per_video=args.clips_per_video,
                                        excluded=datasets.exclusions_for(records, args.exclude_list, args.data_root))
    collator = datasets.VideoTextCollator(tokenizer, max_text_len=args.max_text_len,
                                          text_mask_ratio=args.text_mask_ratio if model.text_masking else None,
                                          text_mask_mode=model.text_masking or "mask", seed=args.seed)
    sampler = utils.ResumableDistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                                seed=args.seed, shuffle=True, drop_last=True)
    videos_per_batch = args.batch_size // args.clips_per_video
    if len(dataset) < videos_per_batch * args.world_size:
        raise ValueError(f"{args.data_path}: {len(dataset)} videos per epoch, fewer than one global batch "
                         f"({videos_per_batch} x {args.world_size} processes)")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=videos_per_batch, sampler=sampler, num_workers=args.num_workers,
        collate_fn=collator, drop_last=True, pin_memory=args.device_obj.type == "cuda",
        # a private generator: creating worker seeds must not consume the global RNG (resume equivalence)
        generator=torch.Generator().manual_seed(args.seed))
    text = f"{model.text_masking} text masking {args.text_mask_ratio}" if model.text_masking else "no text masking"
    repeated = (f"; {args.clips_per_video} clips per video read ({len(dataset)} videos an epoch, "
                f"{videos_per_batch} a step)" if args.clips_per_video > 1 else "")
    print(f"Data: {len(records)} videos from {args.data_path}; video mask {mask_gen}; {text}{repeated}")
    return loader, dataset, sampler


def build_eval_dataset(args: argparse.Namespace) -> datasets.VideoTextDataset | None:
    """The validation set of --eval_every: one centre clip per video (frames by --sample_type_test), read strictly
    (a broken video is an error), so every video of it is checked now, before any training (unless
    --skip_eval_check)."""
    if args.eval_every <= 0:
        return None
    if not args.eval_data_path:
        raise ValueError("--eval_every needs --eval_data_path (a validation annotation file)")
    records = datasets.read_annotations(args.eval_data_path, args.data_root, args.skip_bad_records)
    datasets.check_eval_lists({f"--eval_data_path {args.eval_data_path}": records}, args.video_backend,
                              skip=args.skip_eval_check)
    return datasets.VideoTextDataset(records, mode="test", num_frames=args.num_frames,
                                     sampling_rate=args.sampling_rate, input_size=args.input_size,
                                     short_side_size=args.short_side_size, test_num_segment=1,
                                     test_num_crop=1, video_backend=args.video_backend, seed=args.seed,
                                     sample_type=args.sample_type_test, decode_threads=args.decode_threads)


def zero_shot_eval(model: torch.nn.Module, dataset: datasets.VideoTextDataset, tokenizer, args: argparse.Namespace,
                   dtype: torch.dtype) -> dict[str, float]:
    """Zero-shot retrieval on the validation set; every rank embeds its share (features are gathered)."""
    cfg = retrieval_eval.EvalConfig(device=args.device_obj, dtype=dtype, chunk=args.batch_size,
                                           max_text_len=args.max_text_len, video_mask_ratio=args.eval_mask_ratio,
                                           seed=args.seed)
    workers = min(args.num_workers, 2)
    loader = retrieval_eval.build_eval_loader(dataset, tokenizer, args.batch_size, workers, args.max_text_len,
                                                     args.distributed, args.eval_host_memory_gb, device=cfg.device)
    res = retrieval_eval.evaluate(model, loader, tokenizer, cfg)
    metrics = dict(res["metrics"])
    print(f"Zero-shot on {args.eval_data_path}: t2v R@1 {metrics['t2v_R@1']:.1f} R@5 {metrics['t2v_R@5']:.1f} "
          f"| v2t R@1 {metrics['v2t_R@1']:.1f} R@5 {metrics['v2t_R@5']:.1f} "
          f"(chance R@1 {100.0 / len(dataset):.1f})")
    if model_registry.supports(model, "rerank"):  # the matching head on held-out pairs
        metrics.update(retrieval_eval.held_out_matching_accuracy(
            model, res, dataset, tokenizer, replace(cfg, print_freq=10**9), seed=args.seed, num_workers=workers))
        print(f"Matching head on {args.eval_data_path}: accuracy {metrics['match_acc']:.1f} with random and "
              f"{metrics['match_acc_hard']:.1f} with hard non-matches (1 match : 2 non-matches; a constant answer "
              f"scores 66.7)")
    return metrics


def check_masks(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """Pre-training learns from masked inputs: masking no word (or no tube, for a model that takes a video mask)
    leaves the word head (or the pixel decoder) without gradient, and DDP stops at the second step."""
    name = model.model_cfg["name"]
    if model.text_masking and not args.text_mask_ratio:
        raise ValueError(f"--text_mask_ratio {args.text_mask_ratio}: {name} learns masked words, so some must be "
                         f"masked (its default: {model.default_text_mask_ratio}); --w_mlm 0 turns that loss off")
    if model.takes_video_mask:
        grid = model.token_grid(args.num_frames, args.input_size, args.input_size)
        mask_gen = masking_generator.build_mask_generator(args.mask_type, grid, args.mask_ratio)
        if not mask_gen(np.random.default_rng(0)).any():
            raise ValueError(f"--mask_ratio {args.mask_ratio} masks no tube of {name}'s {'x'.join(map(str, grid))} "
                             "token grid: its pixel decoder would have nothing to reconstruct")


def check_args(args: argparse.Namespace) -> None:
    if args.clips_per_video < 1 or args.batch_size % args.clips_per_video:
        raise ValueError(f"--clips_per_video {args.clips_per_video} must be >= 1 and divide --batch_size "
                         f"{args.batch_size} (a step's clips come from batch_size / clips_per_video videos)")


def main(args: argparse.Namespace) -> dict:
    """Pre-train; returns {"summary": last epoch's averages, "history": per-step scalars of this run}."""
    check_args(args)
    dtype = utils.setup_run(args)
    eval_set = build_eval_dataset(args)  # first: a broken evaluation list stops the run before anything else
    tokenizer = datasets.build_tokenizer(args.tokenizer)
    model = build_model(args, len(tokenizer)).to(args.device_obj)
    if args.text_mask_ratio is None:
        args.text_mask_ratio = model_registry.capability_value(model, "default_text_mask_ratio")
    check_masks(args, model)
    loader, dataset, sampler = build_loader(args, tokenizer, model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Model {model.model_cfg['name']}: {n_params / 1e6:.1f} M parameters; precision {dtype}; device "
          f"{args.device_obj}; {args.world_size} process(es)")

    _, lr_schedule, wd_schedule = utils.training_schedules(args, len(sampler) * args.clips_per_video)
    optimizer = engine.build_optimizer(model, args)
    scaler = utils.make_grad_scaler(args.device_obj, dtype)
    run = engine.start_run(args, model, loader, sampler, dataset, optimizer, scaler, lr_schedule, wd_schedule, dtype)
    state = run.state
    t_start = time.time()
    summary = engine.train(run, evaluate=(lambda epoch: zero_shot_eval(model, eval_set, tokenizer, args, dtype))
                           if eval_set is not None else None,
                           eval_due=lambda e: (e + 1) % max(args.eval_every, 1) == 0 or e + 1 == args.epochs,
                           eval_name="zs")
    print(f"Pre-training done in {time.time() - t_start:.0f} s; outputs in {args.output_dir}")
    return {"summary": summary, "history": state.history}


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser(), engine.NonFiniteLossError, datasets.VideoDecodeError,
                          datasets.BrokenDataError)
