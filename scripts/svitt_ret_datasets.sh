#!/usr/bin/env bash
# The SViTT retrieval recipes' per-dataset settings and shared start (sourced by svitt_train_ret.sh and
# svitt_eval_ret.sh; not run).
#   svitt_ret_dataset NAME   sets TRAIN_ANNO, VAL_ANNO (may be empty), TEST_ANNO, VIDEO_ROOT and the array
#                            DATASET_FLAGS for NAME in: msrvtt didemo charades ssv2_label ssv2_template anet
# Files follow the Singularity / SViTT layout under DATA_DIR (default: data):
#   DATA_DIR/anno_downstream/<annotation>.json and DATA_DIR/<dataset>_videos/ (ActivityNet:
#   DATA_DIR/activity_net_2fps_360/, as Singularity stores it).
# Settings shared by every dataset (the release's ret_*.yaml): BEiT-B/16 + BERT-base with edge sparsity (local 1,
# 3 random blocks of 56) and node sparsity (keep 0.7 after vision layers 3, 6, 9); train 4 frames, one random frame
# per segment; test 12 frames (3 clips of 4, middle frames) with the matching logits log-sum-exp'd over clips;
# re-ranking of each query's top 128. Per dataset: the caption length and the files; --data_set NAME turns on what
# the benchmark needs (paragraphs for didemo and anet, caption positives for ssv2_*, the recipes' text cleaning).
SVITT_RET_DATASETS="msrvtt didemo charades ssv2_label ssv2_template anet"

svitt_ret_dataset() {
  local name="$1" anno="$DATA_DIR/anno_downstream"
  VAL_ANNO=""
  case "$name" in
    msrvtt)
      TRAIN_ANNO="$anno/msrvtt_ret_train9k.json"; TEST_ANNO="$anno/msrvtt_ret_test1k.json"
      VIDEO_ROOT="$DATA_DIR/msrvtt_videos"; DATASET_FLAGS=(--max_text_len 64) ;;
    didemo)
      TRAIN_ANNO="$anno/didemo_ret_train.json"; VAL_ANNO="$anno/didemo_ret_val.json"
      TEST_ANNO="$anno/didemo_ret_test.json"; VIDEO_ROOT="$DATA_DIR/didemo_videos"
      DATASET_FLAGS=(--max_text_len 64) ;;
    charades)
      TRAIN_ANNO="$anno/charades-script_train.json"; TEST_ANNO="$anno/charades-script_test.json"
      VIDEO_ROOT="$DATA_DIR/charades_videos"; DATASET_FLAGS=(--max_text_len 48) ;;
    ssv2_label | ssv2_template)
      local kind="${name#ssv2_}"
      TRAIN_ANNO="$anno/ssv2_ret_${kind}_train.json"; TEST_ANNO="$anno/ssv2_ret_${kind}_val_small.json"
      VIDEO_ROOT="$DATA_DIR/ssv2_videos"; DATASET_FLAGS=(--max_text_len 25 --eval_offload) ;;
    anet)
      TRAIN_ANNO="$anno/anet_ret_train.json"; TEST_ANNO="$anno/anet_ret_val_1.json"
      VIDEO_ROOT="$DATA_DIR/activity_net_2fps_360"
      DATASET_FLAGS=(--max_text_len 150 --eval_offload) ;;
    *)
      echo "error: unknown DATASET '$name': use one of $SVITT_RET_DATASETS" >&2
      exit 2 ;;
  esac
  DATASET_FLAGS+=(--data_set "$name")
}

# svitt_ret_arguments SCRIPT "$@": the recipes' shared start: DATASET CKPT OUTPUT_DIR (usage and exit 2 when
# missing), paths made absolute, the dataset's settings, and (unless DRY_RUN) the checkpoint and test file checked.
# The caller then drops the three arguments (shift 3) and passes the rest on as extra flags.
svitt_ret_arguments() {
  local script="$1"
  shift
  if [ $# -lt 3 ]; then
    echo "usage: bash scripts/$script DATASET CKPT OUTPUT_DIR [flags]  (DATASET: $SVITT_RET_DATASETS)" >&2
    echo "  (runs in .venv via scripts/setup_env.sh; PY=/path/to/python for another environment)" >&2
    exit 2
  fi
  DATASET="$1"; CKPT="$2"; OUTPUT_DIR="$3"
  DATA_DIR="${DATA_DIR:-data}"
  launcher_paths DATA_DIR CKPT OUTPUT_DIR
  svitt_ret_dataset "$DATASET"
  if [ -z "${DRY_RUN:-}" ]; then
    [ -f "$CKPT" ] || launcher_fail "checkpoint not found: $CKPT"
    [ -f "$TEST_ANNO" ] || launcher_fail "annotation file not found: $TEST_ANNO (DATA_DIR=$DATA_DIR: the Singularity layout, see scripts/svitt_ret_datasets.sh)"
  fi
}

# The model and evaluation flags of every recipe: the release's retrieval model (no MLM head: a pre-training file's
# is dropped on loading), sparsity as the release trained it, 12 test frames, lse, k 128.
SVITT_RET_MODEL=(--model svitt_retrieval_base_patch16_224 --sparse_local_attn 1 --sparse_random_attn 3
                 --attn_block_size 56 --token_keep_rate 0.7 --token_drop_loc 3 6 9 --token_keep_strategy cls_attn
                 --num_frames 4 --sample_type rand --sample_type_test middle --input_size 224 --short_side_size 224
                 --num_frames_test 12 --eval_frame_ensemble lse --test_num_segment 1 --test_num_crop 1
                 --rerank_k 128 --dist_eval --device cuda --precision auto --num_workers 10)
