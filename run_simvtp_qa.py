"""Video question answering: fine-tuning a QA model with an answer decoder, and testing it on a closed answer list.

    # fine-tune SViTT's QA model from a SViTT checkpoint (pre-training or retrieval), select on val, test the best
    .venv/bin/python run_simvtp_qa.py --finetune svitt.pth --data_path qa_train.json --val_data_path qa_val.json \
        --test_data_path qa_test.json --answer_list answer_list.json --output_dir output/qa
    # the same for SimVTP (its pre-training checkpoint names its QA model), selection on 5% of the training videos
    .venv/bin/python run_simvtp_qa.py --finetune output/pretrain/checkpoint-best.pth --data_path qa_train.json \
        --val_fraction 0.05 --test_data_path qa_test.json --answer_list answer_list.json
    # test only: 16 frames as 2 clips of 8 (lse over clips), normal and frozen frames
    .venv/bin/python run_simvtp_qa.py --only_test --finetune output/qa/checkpoint-best.pth --test_data_path qa_test.json \
        --answer_list answer_list.json --num_frames 8 --num_frames_test 16 --eval_frame_order none freeze
Annotation files: the Singularity QA layout (DATA.md, "Video question answering"). See scripts/svitt_train_qa.sh
for the paper's MSRVTT-QA, ActivityNet-QA and AGQA runs.
"""
from __future__ import annotations

import argparse

import checkpoint
import command_lines
import datasets
import engine_for_finetuning
import engine_for_pretraining
import engine_for_qa as engine
import utils
import video_io
import video_transforms


def get_args_parser() -> argparse.ArgumentParser:
    """This entry point's command line (command_lines.py holds every entry point's)."""
    return command_lines.qa_parser()


def main(args: argparse.Namespace) -> dict:
    """Dispatch: --only_test, else fine-tuning. Returns the test metrics."""
    video_transforms.resolve_sample_types(args)
    dtype = utils.setup_run(args)
    engine_for_finetuning.eval_frames(args, clips_are_views=False)  # an inconsistent clip set-up stops here
    tokenizer = datasets.build_tokenizer(args.tokenizer)
    if args.only_test:
        return engine.only_test(args, dtype, tokenizer)
    return engine_for_finetuning.finetune(engine.QATask(args, tokenizer, dtype))


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser(), engine_for_pretraining.NonFiniteLossError,
                          video_io.VideoDecodeError, datasets.BrokenDataError, find_checkpoint=checkpoint.find_latest)
