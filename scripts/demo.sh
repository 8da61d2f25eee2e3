#!/usr/bin/env bash
# From nothing to a pre-trained tiny SimVTP and a tiny sparse SViTT, a zero-shot and a fine-tuned retrieval table
# (beside the same fine-tuning from random initialisation; both families with and without matching-head
# re-ranking; the same in four frame orders: SimVTP learns the direction of time), video question answering on the
# synthetic questions (on the frozen pre-trained encoder) and a reconstruction figure, on CPU. The clips:
# the synthetic set with 1,920 training clips at 64 px (docs/demo.md says why). Safe to run again: the dataset is
# reused, finished runs auto-resume and stop at once, and the evaluations are simply repeated.
# Knobs (environment): DEMO_PRETRAIN_EPOCHS (5), DEMO_SVITT_EPOCHS (5), DEMO_FINETUNE_EPOCHS (1), DEMO_QA_EPOCHS (3),
# DEMO_OUT (output/demo). DRY_RUN=1 prints each command instead of running it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEMO_TAG=demo
source scripts/demo_64px.sh
OUT="${DEMO_OUT:-output/demo}"
PRETRAIN_EPOCHS="${DEMO_PRETRAIN_EPOCHS:-5}"
SVITT_EPOCHS="${DEMO_SVITT_EPOCHS:-5}"
FINETUNE_EPOCHS="${DEMO_FINETUNE_EPOCHS:-1}"
QA_EPOCHS="${DEMO_QA_EPOCHS:-3}"
[ -n "${DRY_RUN:-}" ] || mkdir -p "$OUT"

step "1/10 synthetic video-text set: 1,920 training clips at 64 px (val and test: 48 and 64 clips) -> $DATA"
build_data

step "2/10 pre-training simvtp_tiny_patch16 with the time-order loss ($PRETRAIN_EPOCHS epochs; zero-shot and matching accuracy on val after every epoch) -> $OUT/pretrain"
# (The matching-head flags and why: scripts/demo_64px.sh, SIMVTP_PRETRAIN.) Every caption names a motion, but with
# the release's losses alone the tiny model tells a clip from its reversal by nothing: the time-order loss (each
# caption must score its clip above the same clip played backwards) weighted 10 through every tube, beside a
# contrastive pass on every tube, puts the direction into the encoder in these 600 steps (docs/matching_heads.md,
# "In the demo's 600 steps").
run "$PY" run_simvtp_pretraining.py "${SIMVTP_PRETRAIN[@]}" --vtc_video full --w_reverse 10 --reverse_tubes all \
  --epochs "$PRETRAIN_EPOCHS" --eval_every 1 --output_dir "$OUT/pretrain"
PRETRAINED="$(last_checkpoint "$OUT/pretrain" "$PRETRAIN_EPOCHS")"

# Temporal sensitivity: the same test with each clip's frames as read, reversed, shuffled and frozen to one frame
# (the synthetic captions name a motion: "slides left", "grows"; a model that uses time loses R@1 without it).
ORDERS=(--eval_frame_order none reverse shuffle freeze)

step "3/10 zero-shot retrieval on the test split (all tubes, each query's top 16 re-ranked by the matching head through 4 tube masks of 90%; the same in four frame orders; then the pre-training 90% tube mask)"
run "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$PRETRAINED" --rerank_k 16 --match_mask_ratio 0.9 \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" \
  --zero_shot_video_mask_ratio 0.0 --output_dir "$OUT/zero_shot_mask0.0"
run "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$PRETRAINED" \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" "${ORDERS[@]}" \
  --output_dir "$OUT/zero_shot_orders"
run "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$PRETRAINED" \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" \
  --zero_shot_video_mask_ratio 0.9 --output_dir "$OUT/zero_shot_mask0.9"

step "4/10 pre-training svitt_tiny_patch16, edge + node sparse ($SVITT_EPOCHS epochs; zero-shot and matching accuracy on val after every epoch) -> $OUT/svitt_pretrain"
# 128 patch tokens in 4 blocks of 32 (two frames each): each query block sees its own block and 1 random one; 60%
# of the video tokens kept after vision layers 1 and 2 (from random weights that pruning costs 5-8 points of R@1
# here, the block sparsity nothing: docs/ablations.md); one random frame of each of 8 equal segments (evaluation:
# the middle frames). From random weights the masked-word loss (its gradient ~6x the matching loss's in the shared
# fusion layers) and hard negatives from the first step keep the matching head (ITM) on the constant answer: words
# weigh 0.1 here (the paper starts from BERT, where that loss is already low), negatives are uniform for 3 epochs,
# then one by similarity and one uniform per positive. Base lr 1e-2, twice SimVTP's: in 600 steps SViTT then
# learns more (contrastive t2v R@1 37.8-45.9 in three runs against 33.8-38.3 at 5e-3). A head trained on negatives
# drawn by the contrastive logit learns what to add to it, so a rank term orders log-odds + contrastive logit, the
# sum re-ranking reads, training the fusion layers and head only (docs/matching_heads.md, "The head as a ranker").
run "$PY" run_simvtp_pretraining.py "${PRETRAIN[@]}" --model svitt_tiny_patch16 --sample_type rand \
  --sparse_local_attn 1 --sparse_random_attn 1 --attn_block_size 32 --token_keep_rate 0.6 --token_drop_loc 1 2 \
  --lr 1e-2 --w_mlm 0.1 --vtm_negatives mixed --vtm_random_epochs 3 --w_vtm_rank 1 --vtm_rank_score sum \
  --epochs "$SVITT_EPOCHS" --eval_every 1 --output_dir "$OUT/svitt_pretrain"
SVITT="$(last_checkpoint "$OUT/svitt_pretrain" "$SVITT_EPOCHS")"

step "5/10 SViTT zero-shot retrieval on the test split, each query's top 16 re-ranked by the matching head; the same in four frame orders"
run "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$SVITT" --rerank_k 16 \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" \
  --sample_type rand --output_dir "$OUT/svitt_zero_shot"
run "$PY" run_simvtp_finetuning.py --zero_shot --finetune "$SVITT" \
  --test_data_path "$ANN/test.json" --data_root "$DATA" "${CLIP[@]}" "${EVAL[@]}" "${ORDERS[@]}" \
  --sample_type rand --output_dir "$OUT/svitt_zero_shot_orders"

step "6/10 fine-tuning the dual encoder ($FINETUNE_EPOCHS epochs, selected on val): from the pre-trained weights, then from random initialisation"
FINETUNE=(--model simvtp_dual_tiny_patch16 --data_path "$ANN/train.json" --val_data_path "$ANN/val.json"
  --data_root "$DATA" "${CLIP[@]}" --batch_size 16 --epochs "$FINETUNE_EPOCHS" --warmup_steps 20 --lr 5e-3
  --drop_path 0.0 --print_freq 20 --keep_last 1 --short_side_size 64 --test_num_segment 2 --test_num_crop 1)
run "$PY" run_simvtp_finetuning.py "${FINETUNE[@]}" --finetune "$PRETRAINED" --output_dir "$OUT/finetune"
run "$PY" run_simvtp_finetuning.py "${FINETUNE[@]}" --test_data_path "$ANN/test.json" \
  --output_dir "$OUT/finetune_random_init"

step "7/10 testing the best fine-tuned weights (--only_test, 2 clips x 1 crop per video)"
run "$PY" run_simvtp_finetuning.py --only_test \
  --finetune "$OUT/finetune/checkpoint-best.pth" --test_data_path "$ANN/test.json" --data_root "$DATA" \
  "${CLIP[@]}" "${EVAL[@]}" --output_dir "$OUT/finetune"

step "8/10 video QA: simvtp_qa_tiny_patch16 from the pre-trained weights, the question pass frozen and computed once ($QA_EPOCHS epochs of its answer decoder on the synthetic questions, selected on val), tested with the frames in order, reversed and frozen -> $OUT/qa"
# The answer decoder starts from the encoder's top blocks, answers come from the 19-word list; the test repeats with
# every clip reversed and frozen to its middle frame, which flip and hide the motion the direction and size
# questions ask about. The encoder and embeddings stay as pre-trained (--freeze): fine-tuned beside the colour and
# background questions, which one frame answers, the encoder loses the direction within an epoch
# (docs/matching_heads.md, "Fine-tuning erases the motion"). Their question pass is then computed once
# (--cache_memory) and the answer decoder trains on it for several cheap epochs: one epoch reads the motion in some
# seeds only (docs/qa.md, "A frozen question pass, computed once").
run "$PY" run_simvtp_qa.py --finetune "$PRETRAINED" --data_path "$ANN/qa_train.json" \
  --val_data_path "$ANN/qa_val.json" --test_data_path "$ANN/qa_test.json" --answer_list "$ANN/qa_answer_list.json" \
  --data_root "$DATA" "${CLIP[@]}" --short_side_size 64 --batch_size 16 --epochs "$QA_EPOCHS" \
  --warmup_steps 60 --lr 1.6e-2 --freeze encoder text_embeddings --cache_memory --print_freq 40 --keep_last 1 \
  --eval_frame_order none reverse freeze --output_dir "$OUT/qa"

step "9/10 reconstruction figure (a test video, its caption, 90% tubes and 75% words masked); cross-modal probe of the test split (masked words with the clip's own video, another's, none; masked tubes with its own caption, another's, none)"
if [ -n "${DRY_RUN:-}" ]; then
  VIDEO="$DATA/test/test_00000.mp4"; CAPTION="a caption"
else
  VIDEO="$(ls "$DATA"/test/*.mp4 | head -n 1)"
  CAPTION="$("$PY" -c 'import sys, annotations; r = {x.path: x for x in annotations.read_annotations(sys.argv[1], sys.argv[2])}; print(r[sys.argv[3]].captions[0])' "$ANN/test.json" "$DATA" "$VIDEO")"
fi
run "$PY" run_simvtp_vis.py --ckpt "$PRETRAINED" --video "$VIDEO" --caption "$CAPTION" \
  --frame_stride 4 --device cpu --save_path "$OUT/reconstruction.png"
run "$PY" cross_modal_probe.py --ckpt "$PRETRAINED" --data_path "$ANN/test.json" --data_root "$DATA" \
  --word_groups synthetic --output_json "$OUT/cross_modal.json"

step "10/10 text-to-video search: an index of the test split with the fine-tuned model -> $OUT/search_index"
# Embeds each test video (2 clips x 1 crop, as the test above) and writes a thumbnail strip per video; run again, it
# only embeds new or changed files.
run "$PY" search.py index "$DATA/test" --ckpt "$OUT/finetune/checkpoint-best.pth" --out "$OUT/search_index" \
  --device cpu --precision auto --print_freq 100
run "$PY" search.py query "$OUT/search_index" "$CAPTION" -k 3
[ -z "${DRY_RUN:-}" ] || exit 0

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
print(f"SViTT / SimVTP zero-shot t2v R@1: {svitt['t2v_R@1']:.1f} / {simvtp['t2v_R@1']:.1f} = "
      f"{svitt['t2v_R@1'] / max(simvtp['t2v_R@1'], 1e-9):.2f} (the same clips and steps)")
for family, m in (("SimVTP", simvtp), ("SViTT", svitt)):
    print(f"{family} t2v R@1, top {m['rerank']['rerank_k']} re-ranked by the matching head (+ the contrastive logit) "
          f"minus the contrastive order: {m['rerank']['t2v_R@1'] - m['t2v_R@1']:+.1f} "
          f"({m['rerank_contrastive']['t2v_R@1'] - m['t2v_R@1']:+.1f})")
for family, rel in (("SimVTP", "pretrain"), ("SViTT", "svitt_pretrain")):
    evals = [r for r in map(json.loads, open(os.path.join(out, rel, "log.txt"))) if "zs_match_acc" in r]
    trail = ", ".join(f"epoch {r['epoch']}: {r['zs_match_acc']:.1f} / {r['zs_match_acc_hard']:.1f}" for r in evals)
    print(f"{family} matching head on val pairs (accuracy with random / hard non-matches; 1 match : 2 non-matches, "
          f"a constant answer scores 66.7): {trail}")
from engine_for_retrieval import format_frame_orders
from engine_for_qa import format_answer_kinds, format_frame_orders as qa_orders
for family, rel in (("SimVTP", "zero_shot_orders"), ("SViTT", "svitt_zero_shot_orders")):
    orders = json.load(open(os.path.join(out, rel, "zero_shot_metrics.json")))["frame_orders"]
    print()
    print(format_frame_orders(orders).replace("Temporal sensitivity", f"{family} zero-shot, temporal sensitivity", 1))
qa = json.load(open(os.path.join(out, "qa/test_metrics.json")))
print()
orders = qa["frame_orders"]
print(f"Video QA (SimVTP), test accuracy {qa['accuracy']:.1f}% on {qa['questions']} questions; reversed frames "
      f"{orders['reverse']['accuracy']:.1f}%, frozen {orders['freeze']['accuracy']:.1f}%; always the most frequent "
      f"training answer {qa['majority_train']['accuracy']:.1f}%; each question's most frequent training answer "
      f"(no video) {qa['question_prior_train']:.1f}%")
print(qa_orders(orders).replace("Temporal sensitivity", "Video QA, temporal sensitivity", 1))
if "answer_kinds" in qa:
    print(format_answer_kinds(qa["answer_kinds"]))
from cross_modal_probe import format_pixels, format_word_groups
probe = json.load(open(os.path.join(out, "cross_modal.json")))
print()
print(f"Cross-modal help (SimVTP, test split, the pre-training masks): {probe['masked_words']} masked words, "
      f"{probe['clips']} clips")
print(format_word_groups(probe))
print(format_pixels(probe))
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
echo "  cross-modal:      $OUT/cross_modal.json (the probe's figures)"
echo "  search index:     $OUT/search_index (manifest.json, embeddings.safetensors, thumbs/)"
echo "  tensorboard logs: $OUT/*/tb (view with TensorBoard: pip install tensorboard; tensorboard --logdir $OUT)"
echo
echo "Search the test split in a browser (http://127.0.0.1:7860; Ctrl+C stops):"
echo "  $PY search.py serve $OUT/search_index"
