"""SimVTP pre-training entry point (one CPU, or torchrun / SLURM on many GPUs).

    python run_simvtp_pretraining.py --data_path data/synthetic/annotations/pretrain.json \
        --data_root data/synthetic --model simvtp_tiny_patch16 --num_frames 8 --input_size 112 \
        --batch_size 8 --epochs 2 --output_dir output/pretrain --device cpu
    torchrun --nproc_per_node 8 run_simvtp_pretraining.py ... (see scripts/pretrain_webvid.sh)
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from timm.models import create_model
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import datasets
import engine_for_finetuning
import engine_for_pretraining as engine
import masking_generator
import modeling_simvtp  # noqa: F401  (registers the models with timm)
import distributed
import utils


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimVTP pre-training", add_help=True,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", required=True, help="annotation file (WebVid CSV, release JSON dict, "
                   "Singularity JSON list or MSR-VTT CSV; the format is detected)")
    utils.add_clip_args(g)
    g = p.add_argument_group("masking")
    g.add_argument("--mask_type", default="tube", choices=["tube", "random"])
    g.add_argument("--mask_ratio", type=float, default=0.9)
    g.add_argument("--text_mask_ratio", type=float, default=0.75)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="pretrain_simvtp_base_patch16_224")
    g.add_argument("--decoder_depth", type=int, default=None, help="default: the model's own")
    g.add_argument("--vtc_text", default="full", choices=["full", "masked"],
                   help="caption of the contrastive text pass ('masked' is the release's behaviour)")
    g.add_argument("--vtm_negatives", default="hard", choices=["hard", "random"])
    g.add_argument("--release_pooling", action="store_true", help="average padding into text means, as the release")
    g.add_argument("--temperature", type=float, default=0.05)
    g.add_argument("--learnable_temp", action="store_true")
    for term in ("pixel", "mlm", "vtc", "vtm"):
        g.add_argument(f"--w_{term}", type=float, default=1.0, help=f"weight of the {term} loss")
    g.add_argument("--init_ckpt", default=None, help="VideoMAE or SimVTP pre-training checkpoint to start from")
    g.add_argument("--bert_path", default=None, help="local bert-base-uncased directory or weights file")
    g.add_argument("--grad_checkpointing", action="store_true")
    utils.add_optimisation_args(p, batch_size=16, epochs=200, betas=(0.9, 0.95), lr=1.5e-4, min_lr=1e-5,
                                warmup_epochs=40)
    utils.add_run_args(p, output_dir="output/pretrain", save_ckpt_freq=20, keep_last=3)
    g = p.add_argument_group("zero-shot evaluation during training")
    g.add_argument("--eval_every", type=int, default=0,
                   help="run zero-shot retrieval on --eval_data_path every N epochs (0 = never)")
    g.add_argument("--eval_data_path", default=None, help="validation annotation file (never the test set)")
    g.add_argument("--eval_mask_ratio", type=float, default=0.0,
                   help="tube-mask ratio of the video pass in zero-shot evaluation (0 = every tube visible)")
    g.add_argument("--short_side_size", type=int, default=None, help="evaluation resize (default: --input_size)")
    return p


def build_loader(args: argparse.Namespace, tokenizer) -> tuple[torch.utils.data.DataLoader, datasets.VideoTextDataset,
                                                                utils.ResumableDistributedSampler]:
    records = datasets.read_annotations(args.data_path, args.data_root)
    grid = (args.num_frames // 2, args.input_size // 16, args.input_size // 16)
    mask_gen = masking_generator.build_mask_generator(args.mask_type, grid, args.mask_ratio)
    dataset = datasets.VideoTextDataset(records, mode="train", num_frames=args.num_frames,
                                        sampling_rate=args.sampling_rate, input_size=args.input_size,
                                        video_backend=args.video_backend, seed=args.seed,
                                        mask_generator=mask_gen, max_retries=args.max_retries)
    collator = datasets.VideoTextCollator(tokenizer, max_text_len=args.max_text_len,
                                          text_mask_ratio=args.text_mask_ratio, seed=args.seed)
    sampler = utils.ResumableDistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                                seed=args.seed, shuffle=True, drop_last=True)
    if len(dataset) < args.batch_size * args.world_size:
        raise ValueError(f"{args.data_path}: {len(dataset)} videos, fewer than one global batch "
                         f"({args.batch_size} x {args.world_size} processes)")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        collate_fn=collator, drop_last=True, pin_memory=args.device_obj.type == "cuda",
        # a private generator: creating worker seeds must not consume the global RNG (resume equivalence)
        generator=torch.Generator().manual_seed(args.seed))
    print(f"Data: {len(records)} videos from {args.data_path}; mask {mask_gen}")
    return loader, dataset, sampler


def build_eval_dataset(args: argparse.Namespace) -> datasets.VideoTextDataset | None:
    """The validation set of --eval_every: one centre clip per video, read strictly (a broken video is an error)."""
    if args.eval_every <= 0:
        return None
    if not args.eval_data_path:
        raise ValueError("--eval_every needs --eval_data_path (a validation annotation file)")
    records = datasets.read_annotations(args.eval_data_path, args.data_root)
    return datasets.VideoTextDataset(records, mode="test", num_frames=args.num_frames,
                                     sampling_rate=args.sampling_rate, input_size=args.input_size,
                                     short_side_size=args.short_side_size or args.input_size, test_num_segment=1,
                                     test_num_crop=1, video_backend=args.video_backend, seed=args.seed)


def zero_shot_eval(model: torch.nn.Module, dataset: datasets.VideoTextDataset, tokenizer, args: argparse.Namespace,
                   dtype: torch.dtype) -> dict[str, float]:
    """Zero-shot retrieval on the validation set; every rank embeds its share (features are gathered)."""
    metrics = engine_for_finetuning.evaluate_zero_shot(
        model, dataset, tokenizer, device=args.device_obj, dtype=dtype, batch_size=args.batch_size,
        video_mask_ratio=args.eval_mask_ratio, seed=args.seed, max_text_len=args.max_text_len,
        num_workers=min(args.num_workers, 2), dist_eval=args.distributed)
    print(f"Zero-shot on {args.eval_data_path}: t2v R@1 {metrics['t2v_R@1']:.1f} R@5 {metrics['t2v_R@5']:.1f} "
          f"| v2t R@1 {metrics['v2t_R@1']:.1f} R@5 {metrics['v2t_R@5']:.1f} "
          f"(chance R@1 {100.0 / len(dataset):.1f})")
    return metrics


def build_model(args: argparse.Namespace, vocab_size: int) -> torch.nn.Module:
    kwargs = dict(img_size=args.input_size, num_frames=args.num_frames, vocab_size=vocab_size,
                  vtc_text=args.vtc_text, vtm_negatives=args.vtm_negatives, release_pooling=args.release_pooling,
                  temperature=args.temperature, learnable_temp=args.learnable_temp,
                  w_pixel=args.w_pixel, w_mlm=args.w_mlm, w_vtc=args.w_vtc, w_vtm=args.w_vtm)
    if args.decoder_depth is not None:
        kwargs["decoder_depth"] = args.decoder_depth
    model = create_model(args.model, pretrained=False, **kwargs)
    for path in (args.init_ckpt, args.bert_path):
        if path:
            checkpoint.load_pretrained(model, path, strict=False)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def main(args: argparse.Namespace) -> dict:
    """Pre-train; returns {"summary": last epoch's averages, "history": per-step losses of this run}."""
    dtype = utils.setup_run(args)

    tokenizer = datasets.build_tokenizer(args.tokenizer)
    loader, dataset, sampler = build_loader(args, tokenizer)
    eval_set = build_eval_dataset(args)
    model = build_model(args, len(tokenizer)).to(args.device_obj)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Model {args.model}: {n_params / 1e6:.1f} M parameters; precision {dtype}; device {args.device_obj}; "
          f"{args.world_size} process(es)")

    groups = utils.param_groups(model, args.weight_decay, no_decay_names=("mask_token", "temp"))
    for g in groups:
        g.pop("names")
    steps_per_epoch, lr_schedule, wd_schedule = utils.training_schedules(args, len(sampler))
    optimizer = utils.make_adamw(groups, args.abs_lr, args.opt_betas, args.opt_eps, args.device_obj)
    scaler = utils.make_grad_scaler(args.device_obj, dtype)
    state = engine.TrainState()
    start_epoch, start_step, state.global_step = checkpoint.resume_if_any(args, model, optimizer, scaler)
    utils.save_args_json(args, args.output_dir)

    ddp_model = model
    if args.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[args.gpu] if args.device_obj.type == "cuda" else None)
    tb = utils.TensorboardLogger(args.log_dir)
    cfg = engine.StepConfig.from_args(args, dtype)
    save = checkpoint.training_saver(args, model, optimizer, scaler, state)

    print(f"Training {args.epochs} epochs x {steps_per_epoch} steps from epoch {start_epoch} step {start_step}")
    t_start = time.time()
    summary: dict = {}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sampler.set_start(start_step * args.batch_size * args.accum_iter)
        summary = engine.train_one_epoch(ddp_model, loader, optimizer, scaler, epoch, start_step, steps_per_epoch,
                                         lr_schedule, wd_schedule, cfg, state, tb, save_mid_epoch=save)
        sampler.set_start(0)
        start_step = 0
        record = {"epoch": epoch, "global_step": state.global_step, **{f"train_{k}": v for k, v in summary.items()}}
        if eval_set is not None and not state.stop and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            metrics = zero_shot_eval(model, eval_set, tokenizer, args, dtype)
            record.update({f"zs_{k}": v for k, v in metrics.items()})
            tb.scalars(state.global_step, "zero_shot", metrics)
        utils.append_json_line(os.path.join(args.output_dir, "log.txt"), record)
        tb.flush()
        if state.stop:  # --max_steps reached mid-epoch: save where we are so the run can continue
            steps_done = state.global_step - epoch * steps_per_epoch
            save(epoch, steps_done if steps_done < steps_per_epoch else None)
            break
        save(epoch, None)
        _keep_periodic(args, epoch)
    if summary.get("skipped_videos_total"):
        print(f"Skipped {int(summary['skipped_videos_total'])} broken video reads in total (see warnings above)")
    print(f"Pre-training done in {time.time() - t_start:.0f} s; outputs in {args.output_dir}")
    return {"summary": summary, "history": state.history}


def _keep_periodic(args: argparse.Namespace, epoch: int) -> None:
    """Besides the rolling last-K, keep a hard-linked copy every --save_ckpt_freq epochs (no extra disk)."""
    if not distributed.is_main_process() or args.save_ckpt_freq <= 0:
        return
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        src = os.path.join(args.output_dir, checkpoint.checkpoint_name(epoch))
        dst = os.path.join(args.output_dir, f"keep-checkpoint-{epoch}.pth")
        if os.path.exists(src) and not os.path.exists(dst):
            os.link(src, dst)


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser(), engine.NonFiniteLossError)
