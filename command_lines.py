"""The command lines of the training entry points (pre-training, retrieval fine-tuning, video QA): their argparse
parsers, in one module so the ablation runner can read a run's arguments (to name its folder and to build its model)
without importing a run script.
"""
from __future__ import annotations

import argparse

import annotations
import engine_for_qa
import engine_for_retrieval
import model_registry
import retrieval_eval
import utils



def add_finetuning_args(p: argparse.ArgumentParser, *, model_help: str, finetune_help: str, optimisation: dict,
                        layer_decay: float, layer_decay_help: str) -> None:
    """The model, its initial weights (--finetune) and the optimisation flags of a fine-tuning entry point."""
    g = model_registry.add_model_args(p, model=None, drop_path=0.1, model_help=model_help)
    g.add_argument("--finetune", default="", help=finetune_help)
    g = utils.add_optimisation_args(p, **optimisation)
    g.add_argument("--layer_decay", type=float, default=layer_decay, help=layer_decay_help)
    g.add_argument("--freeze", nargs="+", default=[], metavar="PREFIX",
                   help="keep the parameters named PREFIX or PREFIX.* at their initial weights (e.g. encoder: "
                   "SimVTP's unified encoder; vision_encoder: SViTT's video tower): the rest learns to read the "
                   "pre-trained features without changing them; default: train every parameter, as the papers do")


def pretraining_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimVTP / SViTT pre-training", add_help=True,
                                formatter_class=utils.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", required=True, help="annotation file (WebVid CSV, release JSON dict, "
                   "Singularity JSON list or MSR-VTT CSV; the format is detected)")
    utils.add_clip_args(g)
    g.add_argument("--clips_per_video", type=int, default=1,
                   help="repeated sampling (MAE-ST, VideoMAE V2): read each video once for C clips, each with its "
                   "own frames, crop and masks, positives of each other in the contrastive loss and never each "
                   "other's matching negatives; a step still has --batch_size clips (from batch_size / C videos) "
                   "and an epoch as many clips and steps, from a different 1/C of the videos each epoch: C times "
                   "fewer video reads, for when decoding limits the step (1: the paper's method)")
    g.add_argument("--caption_group_size", type=int, default=1,
                   help="neighbour batches (batch_grouping.py): before each epoch the model embeds every clip's "
                   "first caption, and each batch is built from groups of K clips with the nearest embeddings, so "
                   "that every clip has K-1 in-batch negatives the model currently confuses (the contrastive loss "
                   "and the matching head's hard negatives then need the detail); K must divide the batch size. "
                   "1: uniformly random batches, as the papers")
    g.add_argument("--caption_group_pool", type=int, default=4096,
                   help="neighbours are searched among this many clips of the epoch's random order at a time "
                   "(the grouping costs O(videos x pool) per epoch, in every process)")
    g = p.add_argument_group("masking (what the model asks for: a video mask, MLM captions)")
    g.add_argument("--mask_type", default="tube", choices=["tube", "random"],
                   help="tube: one spatial mask for all frames (SimVTP); random: per token")
    g.add_argument("--mask_ratio", type=float, default=0.9, help="share of video tubes masked")
    g.add_argument("--text_mask_ratio", type=float, default=None, help="share of caption words masked (default: "
                   "the model's: 0.75 for SimVTP, 0.5 for SViTT)")
    g = model_registry.add_model_args(p, model="simvtp_base_patch16",
                                      model_help="registered pre-training model (model_registry.py; the release's "
                                      "pretrain_simvtp_base_patch16_224 is an alias of simvtp_base_patch16)")
    g.add_argument("--init_ckpt", default=None, help="weights the model starts from (loaded non-strictly, a report "
                   "printed): a VideoMAE or SimVTP pre-training checkpoint, or a SViTT one (ours or the release's; "
                   "another frame count is expanded: the next stage of the 4 -> 8 -> 16 frame curriculum)")
    g.add_argument("--beit_path", default=None, help="SViTT: Hugging Face BEiT weights for the vision tower (e.g. "
                   "beit-base-patch16-224-pt22k-ft22k): a local directory with model.safetensors or "
                   "pytorch_model.bin, or the file itself (names with or without `beit.`); its image tables are "
                   "repeated over every temporal offset, its heads reported unused")
    g.add_argument("--bert_path", default=None, help="Hugging Face BERT weights (local bert-base-uncased directory "
                   "or file; bert.*, cls.predictions.* or unprefixed names, old gamma/beta accepted): SimVTP takes "
                   "its embeddings, SViTT its text tower and MLM head (cross-attention stays randomly initialised)")
    g.add_argument("--compile_blocks", action="store_true",
                   help="torch.compile every transformer block in place (Module.compile): the checkpoints keep "
                        "the plain tensor names; the first steps pay the compilation (needs a C++ compiler on CPU)")
    g.add_argument("--compile_backend", default=None, choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend for --compile_blocks (default inductor; refused without it): "
                        "inductor generates kernels (the speed-up); "
                        "aot_eager and eager trace the same graphs without generating code, to tell a tracing "
                        "problem from a code-generation one")
    utils.add_optimisation_args(p, batch_size=16, epochs=200, betas=(0.9, 0.95), lr=1.5e-4, min_lr=1e-5,
                                warmup_epochs=40)
    utils.add_run_args(p, output_dir="output/pretrain", save_ckpt_freq=20, keep_last=3)
    g = p.add_argument_group("zero-shot evaluation during training")
    g.add_argument("--eval_every", type=int, default=0,
                   help="run zero-shot retrieval on --eval_data_path every N epochs (0 = never)")
    g.add_argument("--eval_data_path", default=None, help="validation annotation file (never the test set)")
    g.add_argument("--eval_mask_ratio", type=float, default=0.0,
                   help="tube-mask ratio of the video pass in zero-shot evaluation (0 = every tube visible)")
    g.add_argument("--eval_host_memory_gb", type=float, default=retrieval_eval.DEFAULT_EVAL_HOST_MEMORY_GB,
                   help="bound on the host memory (GB, per process) of the evaluation loader's batches in flight "
                   "(uint8 clips x (workers x prefetch + 1)); the estimate is printed at each evaluation")
    add_match_mask_args(g)
    return p


def add_match_mask_args(g: argparse._ArgumentGroup) -> None:
    """How the matching head sees each scored clip (re-ranking, held-out matching accuracy)."""
    g.add_argument("--match_mask_ratio", type=float, default=0.0,
                   help="tube mask of every clip the matching head scores (0 = every tube). SimVTP's VTM trains "
                        "on the pre-training mask's visible tubes (0.9); scored with all of them, its pooled input "
                        "is a different mix of video and text tokens. Models that take no video mask refuse > 0")
    g.add_argument("--match_masks", type=int, default=4,
                   help="with --match_mask_ratio > 0: fixed masks per clip (seeded by video), log-odds averaged")


def finetuning_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimVTP retrieval fine-tuning and evaluation",
                                formatter_class=utils.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_set", default="MSRVTT", help="the benchmark (case-insensitive): "
                   f"{', '.join(annotations.DATA_SETS)}. The file layout is detected; this picks the defaults of "
                   "--paragraph_retrieval (didemo, anet), text cleaning (didemo, charades, anet, ssv2_*) and "
                   "--match_by caption (ssv2_*); msrvtt and webvid change nothing (DATA.md)")
    g.add_argument("--paragraph_retrieval", dest="paragraph_retrieval", action="store_const", const=True,
                   default=None, help="join the captions of each record, in order and separated by a space, into "
                   "one paragraph caption (default: on for --data_set didemo / anet)")
    g.add_argument("--no_paragraph_retrieval", dest="paragraph_retrieval", action="store_const", const=False,
                   help="keep each caption of a record a caption of its own, whatever --data_set")
    g.add_argument("--clean_text", dest="clean_text", action="store_const", const=True, default=None,
                   help="clean captions as the SViTT recipes: lower case, no punctuation, <person> -> person "
                   "(default: on for didemo, charades, anet, ssv2_label, ssv2_template)")
    g.add_argument("--no_clean_text", dest="clean_text", action="store_const", const=False,
                   help="keep captions as written, whatever --data_set")
    g.add_argument("--match_by", default=None, choices=list(annotations.MATCH_BY),
                   help="video: a caption's positive is its own video; caption: videos with the same caption are "
                   "positives of each other in training, and in evaluation each distinct caption is one query "
                   "whose ground truths are all its videos (default: caption for ssv2_label / ssv2_template, "
                   "else video)")
    g.add_argument("--data_path", default=None, help="training annotation file (several captions per video "
                   "allowed); the test set in --only_test / --zero_shot when --test_data_path is not given")
    g.add_argument("--val_data_path", default=None, help="validation annotations for model selection")
    g.add_argument("--val_fraction", type=float, default=0.0, help="without --val_data_path: hold out this "
                   "seeded fraction of the training videos for model selection (0: no selection, last epoch)")
    g.add_argument("--test_data_path", default=None, help="test annotations (e.g. MSR-VTT 1k-A)")
    utils.add_clip_args(g)
    g.add_argument("--num_sample", type=int, default=1, help="the release's repeated augmentation; only 1 is "
                   "supported: repeated clips of one video would be false negatives of the contrastive loss")
    g.add_argument("--test_num_segment", type=int, default=3, help="clips per test video (views "
                   "averaged): windows spread over the video (stride) or positions in each segment (middle, rand; "
                   "see --sample_type_test)")
    g.add_argument("--test_num_crop", type=int, default=3, help="crops per clip of a test video")
    g.add_argument("--num_frames_test", type=int, default=None, help="frames read per test video (a multiple "
                   "of --num_frames; default: --num_frames), split into k = num_frames_test / num_frames clips, "
                   "each encoded alone: the contrastive score is the mean over clips of the cosine similarity. "
                   "With k > 1 the clips are the temporal views: --test_num_segment must be 1 (crops are still "
                   "averaged)")
    g.add_argument("--eval_sparse_sampling", action="store_true", help="with k > 1 clips: clip j takes frames "
                   "j, j+k, j+2k, ... of the num_frames_test (each clip spans the whole video) instead of the j-th "
                   "consecutive chunk")
    g.add_argument("--eval_frame_ensemble", default="lse", choices=retrieval_eval.ENSEMBLES, help="matching-head scores "
                   "(re-ranking) over the k clips: lse = logsumexp (SViTT's default), mean, max; concat = the "
                   "num_frames_test frames as ONE clip, for the contrastive pass too: the model is rebuilt at "
                   "num_frames_test frames (SViTT expands its relative position tables; SimVTP's fixed 1-D "
                   "sinusoid table just runs on to positions it never saw in training)")
    g.add_argument("--eval_frame_order", nargs="+", default=["none"], choices=retrieval_eval.FRAME_ORDERS,
                   help="temporal sensitivity: each clip's frames as read (none), reversed, shuffled (one "
                   "permutation fixed by --seed) or frozen (the middle frame repeated); with several orders the "
                   "test is repeated per order (model loaded once) and a table of R@1 per order is printed and "
                   "written to the metrics JSON")
    add_finetuning_args(
        p, model_help="registered model (model_registry.py; fine-tuning trains a pre-training model's registered "
        "retrieval model, e.g. svitt_base_patch16_224 -> svitt_retrieval_base_patch16_224, without the MLM head); "
        "default: when fine-tuning, the retrieval model of the --finetune checkpoint's family and size, else "
        f"{engine_for_retrieval.RELEASE_DUAL_MODEL} (alias: the release's vit_base_patch16_224); with --only_test / "
        "--zero_shot / --export_embeddings, the model the checkpoint names (its model_cfg), else the one its keys "
        "identify, built with the model flags given here (printed)",
        finetune_help="fine-tuning: the initial weights (a pre-training checkpoint, mapped onto the retrieval model, "
        "loaded non-strictly with a report); --only_test and --export_embeddings: the weights under test (loaded "
        "strictly); --zero_shot: the pre-training checkpoint evaluated (loaded strictly)",
        optimisation=dict(batch_size=8, epochs=100, betas=(0.9, 0.999), lr=3e-4, min_lr=1e-6, warmup_epochs=5),
        layer_decay=0.75, layer_decay_help="lr x decay^(depth from top), both branches")
    g = p.add_argument_group("evaluation")
    g.add_argument("--dist_eval", action="store_true", help="each process embeds its share; features gathered")
    g.add_argument("--eval_host_memory_gb", type=float, default=retrieval_eval.DEFAULT_EVAL_HOST_MEMORY_GB,
                   help="bound on the host memory (GB, per process) of the evaluation loader's batches in flight: "
                   "videos per batch x views x 3 x T x S x S bytes (uint8) x (workers x prefetch + 1); the loader "
                   "takes fewer videos per batch, then prefetch 1, then fewer workers to stay under it (and under "
                   "this process's share of /dev/shm); the estimate is printed at start-up")
    g.add_argument("--eval_offload", action="store_true", help="keep the features and the similarity matrix on "
                   "the CPU (moved there chunk by chunk) for large test sets; default: on the evaluation device")
    g.add_argument("--only_test", action="store_true", help="evaluate --finetune / --resume weights on test once")
    g.add_argument("--zero_shot", action="store_true", help="retrieval with a pre-training model, no training")
    g.add_argument("--zero_shot_video_mask_ratio", type=float, default=0.0,
                   help="tube mask in the zero-shot video pass (0 = all tubes, 0.9 = pre-training's ratio)")
    g.add_argument("--rerank_k", type=int, default=0, help="re-score every text's top K videos and every video's top K texts "
                   "with the matching head: ranked by its log-odds of match, aggregated over clips by "
                   "--eval_frame_ensemble (the SViTT release), and by that plus the contrastive logit (a sum as BLIP's); "
                   "the contrastive and both re-ranked rankings are reported (0: no re-ranking)")
    g.add_argument("--rerank_ckpt", default="", help="checkpoint of a model with a matching head (a pre-training "
                   "one) whose match_logits re-score the top K (loaded strictly); default: the evaluated model "
                   "itself when it has a matching head (SViTT; a SimVTP pre-training model with --zero_shot)")
    g.add_argument("--rerank_model", default=None, help="its model name (default: the one the checkpoint names)")
    add_match_mask_args(g)
    g.add_argument("--export_embeddings", default="", help="write embeddings to OUT.npy | OUT.safetensors. "
                   "Videos that cannot be read are left out, named on the console and in the metadata "
                   f"(skipped_videos), and the exit status is then {engine_for_retrieval.EXIT_SKIPPED}")
    g.add_argument("--video_dir", default=None, help="export: embed every video file in this folder")
    g.add_argument("--text_file", default=None, help="export: embed every line of this file (row i = line i; "
                   "a blank line is refused)")
    g = utils.add_run_args(p, output_dir="output/finetune", save_ckpt_freq=10, keep_last=2)
    g.add_argument("--enable_deepspeed", action="store_true", help="accepted for the release's scripts; "
                   "native AMP + DDP are used")
    return p


def qa_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Video question answering: fine-tuning and testing", formatter_class=utils.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="training questions (a QA annotation file); in --only_test "
                   "the test questions when --test_data_path is not given")
    g.add_argument("--val_data_path", default=None, help="validation questions for model selection (accuracy)")
    g.add_argument("--val_fraction", type=float, default=0.0, help="without --val_data_path: hold out this seeded "
                   "fraction of the training VIDEOS (all their questions) for model selection, e.g. for AGQA whose "
                   "val file is its test file (0: no selection, the last epoch is tested)")
    g.add_argument("--test_data_path", default=None, help="test questions")
    g.add_argument("--answer_list", default=None, help="the closed answer list (a JSON list of strings) every "
                   "question is answered from; required")
    g.add_argument("--clean_text", action="store_true", help="clean the questions as the SViTT / Singularity QA "
                   "recipes do: lower case, no punctuation (answers are kept as written)")
    utils.add_clip_args(g)
    g.add_argument("--answer_types", nargs="+", default=None, metavar="TYPE", help="keep only the questions of "
                   "these answer types (the annotation's answer_type field) in the training, validation and test "
                   "files, e.g. a first stage on the motion questions (docs/qa.md); default: every question")
    g.add_argument("--max_q_len", type=int, default=25, help="question tokens kept, with [CLS] and [SEP] "
                   "(QA uses this, not --max_text_len)")
    g.add_argument("--max_a_len", type=int, default=5, help="answer tokens kept, with [CLS] and [SEP] (longer "
                   "answers are cut, keeping [SEP])")
    g.add_argument("--test_num_segment", type=int, default=1, help="views per test video (positions over the "
                   "video, see --sample_type_test); their answer scores are ensembled with the clips'")
    g.add_argument("--test_num_crop", type=int, default=1, help="crops per test view")
    g.add_argument("--num_frames_test", type=int, default=None, help="frames read per test view (a multiple of "
                   "--num_frames; default: --num_frames), split into k = num_frames_test / num_frames clips, each "
                   "answered alone; scores ensembled by --eval_frame_ensemble")
    g.add_argument("--eval_sparse_sampling", action="store_true", help="with k > 1 clips: clip j takes frames j, "
                   "j+k, ... (each clip spans the whole video) instead of the j-th consecutive chunk")
    g.add_argument("--eval_frame_ensemble", default="lse", choices=list(engine_for_qa.QA_ENSEMBLES), help="answer "
                   "log-likelihoods over the clips and views of a video: lse = logsumexp (SViTT's), mean or max")
    g.add_argument("--eval_frame_order", nargs="+", default=["none"],
                   choices=list(retrieval_eval.FRAME_ORDERS), help="temporal sensitivity: each clip's "
                   "frames as read (none), reversed, shuffled (fixed by --seed) or frozen (the middle frame "
                   "repeated); several orders repeat the test (model loaded once) and print accuracy per order")
    add_finetuning_args(
        p, model_help="registered QA model (model_registry.py); default: the QA model of the --finetune checkpoint's "
        f"family and size (a QA checkpoint: its own model), else {engine_for_qa.DEFAULT_QA_MODEL}; --only_test builds "
        "the model its file names with the model flags given here (printed)",
        finetune_help="fine-tuning: the initial weights (pre-training, retrieval or QA checkpoint of the family, "
        "mapped onto the QA model non-strictly with a report: the answer decoder starts from the text tower's fusion "
        "layers, SViTT, or the encoder's top blocks, SimVTP); --only_test: the weights under test (loaded strictly)",
        optimisation=dict(batch_size=32, epochs=10, betas=(0.9, 0.999), lr=1e-5, min_lr=1e-6, warmup_epochs=0.5),
        layer_decay=1.0, layer_decay_help="lr x decay^(depth from top) (1: off, as the SViTT recipes)")
    g = p.add_argument_group("frozen question pass")
    g.add_argument("--cache_memory", action="store_true", help="with the whole question pass frozen (--freeze; "
                   "SimVTP: encoder text_embeddings, SViTT: vision_encoder vision_layernorm text_encoder): compute "
                   "each training question's states once, before the first epoch, from one training clip of its "
                   "video in eval mode, and train the answer decoder on them for every epoch, so an epoch costs the "
                   "decoder's steps only (one process; the states are held in host memory)")
    g.add_argument("--cache_memory_gb", type=float, default=8.0, help="refuse --cache_memory when the states "
                   "would take more host memory than this (GB; estimated from the first batch)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--k_test", type=int, default=128, help="answers of the list kept per question by the "
                   "decoder's first-token distribution, then re-scored by their full log-likelihood")
    g.add_argument("--dist_eval", action="store_true", help="each process answers its share of the questions")
    g.add_argument("--eval_host_memory_gb", type=float, default=retrieval_eval.DEFAULT_EVAL_HOST_MEMORY_GB,
                   help="bound on the host memory (GB, per process) of the evaluation loader's batches in flight "
                   "(as in run_simvtp_finetuning.py)")
    g.add_argument("--only_test", action="store_true", help="test --finetune / --resume weights once")
    utils.add_run_args(p, output_dir="output/qa", save_ckpt_freq=10, keep_last=2)
    return p
