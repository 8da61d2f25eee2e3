"""SimVTP text-video retrieval: fine-tuning, test-only evaluation, zero-shot evaluation, re-ranking, export.

    # fine-tune the dual encoder from a pre-training checkpoint (its model picks the retrieval model), select on
    # val, evaluate the best on test
    python run_simvtp_finetuning.py --finetune output/pretrain/checkpoint-5.pth \
        --data_path train.json --val_fraction 0.1 --test_data_path test.json --output_dir output/finetune ...
    # test only (never auto-resumes over the given weights)
    python run_simvtp_finetuning.py --only_test --finetune output/finetune/checkpoint-best.pth --data_path test.json
    # zero-shot with the pre-training model's unimodal passes, then re-rank the top 16 with its matching head
    python run_simvtp_finetuning.py --zero_shot --finetune pretrain.pth --test_data_path test.json --rerank_k 16
    # SViTT's evaluation: 16 frames as 2 clips of 8 (lse over clips), re-rank the top 128, temporal sensitivity
    python run_simvtp_finetuning.py --zero_shot --finetune svitt.pth --test_data_path test.json --num_frames 8 \
        --num_frames_test 16 --test_num_segment 1 --rerank_k 128 --eval_frame_order none reverse shuffle freeze
    # embeddings for search elsewhere
    python run_simvtp_finetuning.py --export_embeddings emb.safetensors --finetune best.pth --video_dir videos/
See scripts/finetune_msrvtt.sh and scripts/only_test_msrvtt.sh for the paper's MSR-VTT runs.
"""
from __future__ import annotations

import argparse

import torch

import annotations
import checkpoint
import command_lines
import datasets
import engine_for_finetuning
import engine_for_pretraining
import engine_for_retrieval as engine
import model_registry
import utils
import video_io
import video_transforms
from engine_for_retrieval import EXIT_SKIPPED


def get_args_parser() -> argparse.ArgumentParser:
    """This entry point's command line (command_lines.py holds every entry point's)."""
    return command_lines.finetuning_parser()


# ----------------------------------------------------------------------------------------------- set-up


def setup(args: argparse.Namespace) -> torch.dtype:
    """The run's set-up and every check of the flags that needs no file: a bad combination stops here."""
    video_transforms.resolve_sample_types(args)
    dtype = utils.setup_run(args)
    if args.enable_deepspeed:
        print("--enable_deepspeed: accepted for the release's scripts; DeepSpeed is not used, native AMP + DDP are")
    fmt = engine.annotation_format(args)  # an unknown --data_set stops here, before any file is read
    if fmt != annotations.AnnotationFormat():
        print(f"Captions ({args.data_set}): paragraphs {'on' if fmt.paragraphs else 'off'}, cleaning "
              f"{'on' if fmt.clean_text else 'off'}, match by {fmt.match_by}")
    if args.num_sample != 1:
        raise ValueError(f"--num_sample {args.num_sample}: only 1 is supported (repeated clips of one video in a "
                         "batch would be false negatives of the contrastive loss)")
    if args.model and model_registry.canonical_name(args.model) != args.model:
        print(f"--model {args.model} is another name of {model_registry.canonical_name(args.model)}")
        args.model = model_registry.canonical_name(args.model)
    engine_for_finetuning.eval_frames(args)  # an inconsistent clip set-up stops before any training or loading
    return dtype


def main(args: argparse.Namespace) -> dict:
    """Dispatch: --export_embeddings, --zero_shot, --only_test, else fine-tuning. Returns the test metrics
    (or export's {"written", "skipped_videos"})."""
    dtype = setup(args)
    tokenizer = datasets.build_tokenizer(args.tokenizer)
    if args.export_embeddings:
        return engine.export(args, dtype, tokenizer)
    if args.zero_shot:
        return engine.zero_shot(args, dtype, tokenizer)
    if args.only_test:
        return engine.only_test(args, dtype, tokenizer)
    return engine_for_finetuning.finetune(engine.RetrievalTask(args, tokenizer, dtype))


def exit_status(result: dict) -> int:
    """0, or EXIT_SKIPPED when an export left out unreadable videos."""
    return EXIT_SKIPPED if isinstance(result, dict) and result.get("skipped_videos") else 0


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser(), engine_for_pretraining.NonFiniteLossError,
                          video_io.VideoDecodeError, datasets.BrokenDataError, exit_status=exit_status,
                          find_checkpoint=checkpoint.find_latest)
