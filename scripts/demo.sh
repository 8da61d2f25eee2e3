#!/usr/bin/env bash
# From nothing to a pre-trained tiny SimVTP and a tiny sparse SViTT, a zero-shot and a fine-tuned retrieval table
# (beside the same fine-tuning from random initialisation; SViTT with and without matching-head re-ranking), video
# question answering on the synthetic questions and a reconstruction figure, on CPU. Safe to run again: the dataset is
# reused, finished runs auto-resume and stop at once, and the evaluations are simply repeated.
# Knobs (environment): DEMO_PRETRAIN_EPOCHS, DEMO_SVITT_EPOCHS, DEMO_FINETUNE_EPOCHS, DEMO_QA_EPOCHS, DEMO_OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh requirements.txt
source scripts/fast_malloc.sh
fast_malloc  # tcmalloc when installed: faster CPU training steps (SIMVTP_MALLOC=glibc to keep glibc's)

DATA=data/synthetic
ANN="$DATA/annotations"
OUT="${DEMO_OUT:-output/demo}"
PRETRAIN_EPOCHS="${DEMO_PRETRAIN_EPOCHS:-20}"
SVITT_EPOCHS="${DEMO_SVITT_EPOCHS:-16}"
FINETUNE_EPOCHS="${DEMO_FINETUNE_EPOCHS:-4}"
QA_EPOCHS="${DEMO_QA_EPOCHS:-4}"
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false
step() { echo; echo "=== $* ==="; }
timed() { local t0=$SECONDS; "$@"; echo "[demo] took $((SECONDS - t0)) s"; }

# One clip shape for every step: 8 frames of 112 x 112 px (7 x 7 tubes per slice), stride 4. Clips are decoded in
# the training process (--num_workers 0): on 2 cores a loader process competes with the 2 compute threads, and the
# steps ran 25-35% slower with one (clips decode at over 150 per second per core here, so the loader never waits).
CLIP=(--num_frames 8 --sampling_rate 4 --input_size 112 --device cpu --precision auto --num_workers 0)
EVAL=(--short_side_size 112 --test_num_segment 2 --test_num_crop 1 --batch_size 16)

step "1/10 synthetic video-text dataset -> $DATA"
timed "$PY" synthetic_dataset.py --out "$DATA"

step "2/10 pre-training simvtp_tiny_patch16 ($PRETRAIN_EPOCHS epochs; zero-shot and matching accuracy on val every 10) -> $OUT/pretrain"
# The matching head (VTM) from random weights: its pairs carry the whole caption (the masked one rarely keeps the
# words that tell a pair apart), negatives are uniform for 6 epochs, then one by similarity and one uniform per
# positive (with hard negatives only, from the start, the head stays on the constant "no match"). It trains on the
# 10% of tubes the mask leaves, so it also scores held-out pairs through 4 such masks (--match_mask_ratio 0.9).
timed "$PY" run_simvtp_pretraining.py --data_path "$ANN/pretrain.json" --data_root "$DATA" \
  --model simvtp_tiny_patch16 "${CLIP[@]}" --batch_size 16 --epochs "$PRETRAIN_EPOCHS" --warmup_epochs 2 \
  --vtm_text full --vtm_negatives mixed --vtm_random_epochs 6 --match_mask_ratio 0.9 \
  --lr 5e-3 --min_lr 1e-5 --print_freq 10 --save_ckpt_freq 0 --keep_last 1 \
  --eval_every 10 --eval_data_path "$ANN/val.json" --output_dir "$OUT/pretrain"
PRETRAINED="$OUT/pretrain/latest"
PRETRAINED="$OUT/pretrain/$(cat "$PRETRAINED")"

# Temporal sensitivity: the same test with each clip's frames as read, reversed, shuffled and frozen to one frame
# (the synthetic captions name a motion: "slides left", "grows"; a model that uses time loses R@1 without it).
ORDERS=(--eval_frame_order none reverse shuffle freeze)

step "3/10 zero-shot retrieval on the test split (all tubes, each query's top 16 re-ranked by the matching head through 4 tube masks of 90%; the same in four frame orders; then the pre-training 90% tube mask)"
timed "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$PRETRAINED" --rerank_k 16 --match_mask_ratio 0.9 \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" \
  --zero_shot_video_mask_ratio 0.0 --output_dir "$OUT/zero_shot_mask0.0"
timed "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$PRETRAINED" \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" "${ORDERS[@]}" \
  --output_dir "$OUT/zero_shot_orders"
timed "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$PRETRAINED" \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" \
  --zero_shot_video_mask_ratio 0.9 --output_dir "$OUT/zero_shot_mask0.9"

step "4/10 pre-training svitt_tiny_patch16, edge + node sparse ($SVITT_EPOCHS epochs; zero-shot and matching accuracy on val every 8) -> $OUT/svitt_pretrain"
# 392 patch tokens in 7 blocks of 56: each query block sees its own block and 1 random one (2 of 7, near the
# paper's 4 of 14 at 4 frames); 60% of the video tokens kept after vision layers 1 and 2; one random frame of each
# of 8 equal segments (evaluation: the middle frames). From random weights the masked-word loss (its gradient
# ~6x the matching loss's in the shared fusion layers) and hard negatives from the first step keep the matching
# head (ITM) on the constant answer: words weigh 0.1 here (the paper starts from BERT, where that loss is already
# low), negatives are uniform for 6 epochs, then one by similarity and one uniform per positive.
timed "$PY" run_simvtp_pretraining.py --data_path "$ANN/pretrain.json" --data_root "$DATA" \
  --model svitt_tiny_patch16 "${CLIP[@]}" --sample_type rand --sparse_local_attn 1 --sparse_random_attn 1 \
  --attn_block_size 56 --token_keep_rate 0.6 --token_drop_loc 1 2 --batch_size 16 --epochs "$SVITT_EPOCHS" \
  --warmup_epochs 1 --lr 5e-3 --min_lr 1e-5 --w_mlm 0.1 --vtm_negatives mixed --vtm_random_epochs 6 \
  --print_freq 10 --save_ckpt_freq 0 --keep_last 1 \
  --eval_every 8 --eval_data_path "$ANN/val.json" --output_dir "$OUT/svitt_pretrain"
SVITT="$OUT/svitt_pretrain/$(cat "$OUT/svitt_pretrain/latest")"

step "5/10 SViTT zero-shot retrieval on the test split, each query's top 16 re-ranked by the matching head; the same in four frame orders"
timed "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$SVITT" --rerank_k 16 \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" \
  --sample_type rand --output_dir "$OUT/svitt_zero_shot"
timed "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$SVITT" \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" "${ORDERS[@]}" \
  --sample_type rand --output_dir "$OUT/svitt_zero_shot_orders"

step "6/10 fine-tuning the dual encoder ($FINETUNE_EPOCHS epochs, selected on val): from the pre-trained weights, then from random initialisation"
FINETUNE=(--model simvtp_dual_tiny_patch16 --data_path "$ANN/train.json" --val_data_path "$ANN/val.json"
  --data_root "$DATA" "${CLIP[@]}" --batch_size 16 --epochs "$FINETUNE_EPOCHS" --warmup_epochs 1 --lr 5e-3
  --drop_path 0.0 --print_freq 10 --keep_last 1 --short_side_size 112 --test_num_segment 2 --test_num_crop 1)
timed "$PY" run_simvtp_finetuning.py "${FINETUNE[@]}" --finetune "$PRETRAINED" --output_dir "$OUT/finetune"
timed "$PY" run_simvtp_finetuning.py "${FINETUNE[@]}" --test_data_path "$ANN/test.json" \
  --output_dir "$OUT/finetune_random_init"

step "7/10 testing the best fine-tuned weights (--only_test, 2 clips x 1 crop per video)"
timed "$PY" run_simvtp_finetuning.py --only_test \
  --finetune "$OUT/finetune/checkpoint-best.pth" --test_data_path "$ANN/test.json" --data_root "$DATA" \
  "${CLIP[@]}" "${EVAL[@]}" --output_dir "$OUT/finetune"

step "8/10 video QA: simvtp_qa_tiny_patch16 from the pre-trained weights ($QA_EPOCHS epochs on the synthetic questions, selected on val), tested with normal and frozen frames -> $OUT/qa"
# The answer decoder starts from the encoder's top blocks, answers come from the 19-word list; the test repeats with
# every clip frozen to its middle frame, which hides the motion the direction and size questions ask about.
timed "$PY" run_simvtp_qa.py --finetune "$PRETRAINED" --data_path "$ANN/qa_train.json" \
  --val_data_path "$ANN/qa_val.json" --test_data_path "$ANN/qa_test.json" --answer_list "$ANN/qa_answer_list.json" \
  --data_root "$DATA" "${CLIP[@]}" --short_side_size 112 --batch_size 16 --epochs "$QA_EPOCHS" \
  --warmup_epochs 0.5 --lr 1e-2 --print_freq 20 --keep_last 1 \
  --eval_frame_order none freeze --output_dir "$OUT/qa"

step "9/10 reconstruction figure (a test video, its caption, 90% tubes and 75% words masked)"
VIDEO="$(ls "$DATA"/test/*.mp4 | head -n 1)"
CAPTION="$("$PY" -c 'import sys, annotations; r = {x.path: x for x in annotations.read_annotations(sys.argv[1], sys.argv[2])}; print(r[sys.argv[3]].captions[0])' "$ANN/test.json" "$DATA" "$VIDEO")"
timed "$PY" run_simvtp_vis.py --ckpt "$PRETRAINED" --video "$VIDEO" --caption "$CAPTION" \
  --frame_stride 4 --device cpu --save_path "$OUT/reconstruction.png"

step "10/10 text-to-video search: an index of the test split with the fine-tuned model -> $OUT/search_index"
# Embeds each test video (2 clips x 1 crop, as the test above) and writes a thumbnail strip per video; run again, it
# only embeds new or changed files.
timed "$PY" search.py index "$DATA/test" --ckpt "$OUT/finetune/checkpoint-best.pth" --out "$OUT/search_index" \
  --device cpu --precision auto --print_freq 100
"$PY" search.py query "$OUT/search_index" "$CAPTION" -k 3

step "results"
"$PY" - "$OUT" <<'PY'
import json, os, sys
from retrieval_eval import format_table
out = sys.argv[1]
tables = {"zero-shot, all tubes": "zero_shot_mask0.0/zero_shot_metrics.json",
          "zero-shot, 90% masked": "zero_shot_mask0.9/zero_shot_metrics.json",
          "fine-tuned": "finetune/test_metrics.json",
          "random init, same steps": "finetune_random_init/test_metrics.json"}
rows = {name: json.load(open(os.path.join(out, rel))) for name, rel in tables.items()}
simvtp = rows["zero-shot, all tubes"]
rows[f"zero-shot, re-ranked top {simvtp['rerank']['rerank_k']}"] = simvtp["rerank"]
rows["zero-shot, re-ranked + contrastive"] = simvtp["rerank_contrastive"]
svitt = json.load(open(os.path.join(out, "svitt_zero_shot/zero_shot_metrics.json")))
rows["SViTT zero-shot"] = svitt
rows[f"SViTT re-ranked top {svitt['rerank']['rerank_k']}"] = svitt["rerank"]
rows["SViTT re-ranked + contrastive"] = svitt["rerank_contrastive"]
print(format_table(rows, title="Test split"))
videos = json.load(open(os.path.join(out, "finetune/test_metrics.json")))["v2t_queries"]
print(f"chance: R@1 about {100 / videos:.1f} in both directions ({videos} test videos)")
for family, rel in (("SimVTP", "pretrain"), ("SViTT", "svitt_pretrain")):
    evals = [r for r in map(json.loads, open(os.path.join(out, rel, "log.txt"))) if "zs_match_acc" in r]
    trail = ", ".join(f"epoch {r['epoch']}: {r['zs_match_acc']:.1f} / {r['zs_match_acc_hard']:.1f}" for r in evals)
    print(f"{family} matching head on val pairs (accuracy with random / hard non-matches; 1 match : 2 non-matches, "
          f"a constant answer scores 66.7): {trail}")
from engine_for_retrieval import format_frame_orders
for family, rel in (("SimVTP", "zero_shot_orders"), ("SViTT", "svitt_zero_shot_orders")):
    orders = json.load(open(os.path.join(out, rel, "zero_shot_metrics.json")))["frame_orders"]
    print()
    print(format_frame_orders(orders).replace("Temporal sensitivity", f"{family} zero-shot, temporal sensitivity", 1))
qa = json.load(open(os.path.join(out, "qa/test_metrics.json")))
print()
print(f"Video QA (SimVTP), test accuracy {qa['accuracy']:.1f}% on {qa['questions']} questions; frozen frames "
      f"{qa['frame_orders']['freeze']['accuracy']:.1f}%; always the most frequent training answer "
      f"{qa['majority_train']['accuracy']:.1f}%; each question's most frequent training answer (no video) "
      f"{qa['question_prior_train']:.1f}%")
from engine_for_qa import format_frame_orders as qa_orders
print(qa_orders(qa["frame_orders"]).replace("Temporal sensitivity", "Video QA, temporal sensitivity", 1))
PY
echo
echo "Outputs:"
echo "  dataset:          $DATA (annotations in $ANN)"
echo "  pre-training:     $OUT/pretrain (checkpoints, log.txt with zero-shot val metrics, args.json, tb/)"
echo "  zero-shot:        $OUT/zero_shot_mask0.0, $OUT/zero_shot_mask0.9, $OUT/zero_shot_orders (*_metrics.json, *_per_query.jsonl)"
echo "  SViTT:            $OUT/svitt_pretrain (pre-training), $OUT/svitt_zero_shot (zero-shot and re-ranked), $OUT/svitt_zero_shot_orders"
echo "  fine-tuning:      $OUT/finetune (checkpoint-best.pth, test_metrics.json, test_per_query.jsonl, log.txt)"
echo "  baseline:         $OUT/finetune_random_init (the same fine-tuning from random initialisation)"
echo "  video QA:         $OUT/qa (checkpoint-best.pth, test_metrics.json, test_predictions.jsonl, log.txt)"
echo "  figure:           $OUT/reconstruction.png"
echo "  search index:     $OUT/search_index (manifest.json, embeddings.safetensors, thumbs/)"
echo "  tensorboard logs: $OUT/*/tb (view with TensorBoard: pip install tensorboard; tensorboard --logdir $OUT)"
echo
echo "Search the test split in a browser (http://127.0.0.1:7860; Ctrl+C stops):"
echo "  $PY search.py serve $OUT/search_index"
