#!/usr/bin/env bash
# The whole job on built-in phantom data, under demo_out/ (git-ignored):
#   phantom -> spine-convert -> spine-train -> spine-export -> spine-predict -> spine-evaluate
# Run from the repository root (`make demo` does). Rerunning starts the stages afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT="${DEMO_OUT:-demo_out}"
TRAIN_CASES="${DEMO_TRAIN_CASES:-80}"
IMAGE_SIZE="${DEMO_IMAGE_SIZE:-96}"
MODEL="$OUT/export/spineseg/1"

step() { printf '\n== %s  (%s)\n' "$1" "$(date +%H:%M:%S)"; }
# The commands hide TensorFlow's C++ start-up lines themselves (TF_CPP_MIN_LOG_LEVEL=0
# shows them).
start=$(date +%s)

# Each stage owns one folder; clearing them makes a rerun start from scratch instead of
# resuming a finished training run.
rm -rf "$OUT/raw" "$OUT/heldout" "$OUT/data" "$OUT/model" "$OUT/export" \
  "$OUT/predictions" "$OUT/eval" "$OUT/inspect"
mkdir -p "$OUT/eval"

step "1/6 phantom data: $TRAIN_CASES 2D slices to train on, held-out 2D slices and 3D volumes"
$BIN/python -m data_prep.phantom --output_dir="$OUT/raw" --format=2d \
  --num_cases="$TRAIN_CASES" --seed=0
$BIN/python -m data_prep.phantom --output_dir="$OUT/heldout/2d" --format=2d \
  --num_cases=8 --seed=1
$BIN/python -m data_prep.phantom --output_dir="$OUT/heldout/3d" --format=3d \
  --num_cases=2 --seed=2 --size=128 --num_slices=16

step "2/6 spine-convert -> $OUT/data, spine-inspect -> $OUT/inspect"
$BIN/spine-convert --images_dir="$OUT/raw/images" --masks_dir="$OUT/raw/masks" \
  --output_dir="$OUT/data" --image_size="$IMAGE_SIZE" --val_fraction=0.2 \
  --test_fraction=0.0 --seed=0 --num_workers=2 --overwrite
$BIN/spine-inspect --data_dir="$OUT/data" --output="$OUT/inspect"

step "3/6 spine-train (experiments/demo.flags) -> $OUT/model"
$BIN/spine-train --data_dir="$OUT/data" --model_dir="$OUT/model" \
  --flagfile=experiments/demo.flags

step "4/6 spine-export -> $MODEL"
$BIN/spine-export --model_dir="$OUT/model" --export_dir="$MODEL" --overwrite

step "5/6 spine-predict on held-out cases -> $OUT/predictions"
$BIN/spine-predict --saved_model="$MODEL" --input="$OUT/heldout/2d/images" \
  --output="$OUT/predictions/2d" --overlay --overwrite
$BIN/spine-predict --saved_model="$MODEL" --input="$OUT/heldout/3d/images" \
  --output="$OUT/predictions/3d" --overlay --report --overwrite

step "6/6 spine-evaluate -> $OUT/eval"
$BIN/spine-evaluate --saved_model="$MODEL" --data_dir="$OUT/data" --split=val \
  --output_json="$OUT/eval/val.json" --overwrite
$BIN/spine-evaluate --saved_model="$MODEL" --images_dir="$OUT/heldout/2d/images" \
  --masks_dir="$OUT/heldout/2d/masks" --output_json="$OUT/eval/heldout_2d.json" --overwrite
$BIN/spine-evaluate --saved_model="$MODEL" --images_dir="$OUT/heldout/3d/images" \
  --masks_dir="$OUT/heldout/3d/masks" --output_json="$OUT/eval/heldout_3d.json" --overwrite

step "done in $(( $(date +%s) - start )) s"
cat <<SUMMARY
  phantom data        $OUT/raw, $OUT/heldout/{2d,3d}
  converted dataset   $OUT/data (dataset.json + TFRecord shards)
  its QC report       $OUT/inspect/index.html
  trained model       $OUT/model
  SavedModel          $MODEL
  predictions         $OUT/predictions/{2d,3d} (*_mask.*, *_overlay.png)
  their QC report     $OUT/predictions/3d/report/index.html
  scores              $OUT/eval/{val,heldout_2d,heldout_3d}.json
SUMMARY
$BIN/python tools/demo_summary.py "$OUT/eval"/*.json
