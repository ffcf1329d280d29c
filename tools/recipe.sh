#!/usr/bin/env bash
# The multi-scanner recipe end to end on ../shared/data (README "Recipe (b)"), with the
# flags of experiments/multi_scanner/:
#   spine-convert per source folder -> spine-train per seed -> spine-export per seed
#   -> spine-evaluate of the ensemble with --tta on held-out volumes of other scanners.
# Run from anywhere (`make recipe` does). Rerunning starts afresh under $RECIPE_OUT.
# Full size (3 seeds x 30 x 20 steps at 256 px) is ~40 min of training on 2 CPU cores.
# Shrink it with the environment (tests/test_docs.py does):
#   RECIPE_SEEDS="0 1 2"     training seeds, one model each (the ensemble's members)
#   RECIPE_EPOCHS, RECIPE_STEPS   override train.flags' --epochs / --steps_per_epoch
#   RECIPE_IMAGE_SIZE        override the square side (the target spacing follows:
#                            1.1 * 256 / size mm per pixel, the same field of view)
#   RECIPE_TRAIN_FLAGS       extra spine-train flags, e.g. "--base_filters=4 --depth=2"
#   RECIPE_HELD_OUT          held-out volumes to score (default: "spine3d/ivd_11 spine3d/vb2_05")
#   RECIPE_DATA (../shared/data), RECIPE_OUT (recipe_out), PYTHON (.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="${PYTHON:-.venv/bin/python}"
DATA="${RECIPE_DATA:-../shared/data}"
OUT="${RECIPE_OUT:-recipe_out}"
SEEDS="${RECIPE_SEEDS:-0 1 2}"
FLAGS=experiments/multi_scanner
HELD_OUT="${RECIPE_HELD_OUT:-spine3d/ivd_11 spine3d/vb2_05}"   # other scanners, never trained on

for sub in spine2d spine3d_extra spine3d; do
  if [ ! -d "$DATA/$sub" ]; then
    echo "recipe: error: $DATA/$sub is missing (set RECIPE_DATA to the shared data folder)" >&2
    exit 1
  fi
done

convert_size=()
if [ -n "${RECIPE_IMAGE_SIZE:-}" ]; then
  spacing=$(awk -v s="$RECIPE_IMAGE_SIZE" 'BEGIN { printf "%.4g", 1.1 * 256 / s }')
  convert_size=(--image_size="$RECIPE_IMAGE_SIZE" --target_spacing_mm="$spacing")
fi
train_more=()
[ -n "${RECIPE_EPOCHS:-}" ] && train_more+=(--epochs="$RECIPE_EPOCHS")
[ -n "${RECIPE_STEPS:-}" ] && train_more+=(--steps_per_epoch="$RECIPE_STEPS")
read -r -a extra <<< "${RECIPE_TRAIN_FLAGS:-}"
train_more+=("${extra[@]}")

step() { printf '\n== %s  (%s)\n' "$1" "$(date +%H:%M:%S)"; }
start=$(date +%s)
rm -rf "$OUT/data" "$OUT/runs" "$OUT/heldout" "$OUT/eval"
mkdir -p "$OUT/eval"

step "1/4 spine-convert: spine2d (2D, fully labelled), spine3d_extra (vertebral bodies only)"
"$PY" -m data_prep.convert --flagfile=$FLAGS/convert_2d.flags \
  --images_dir="$DATA/spine2d/images" --masks_dir="$DATA/spine2d/masks" \
  --output_dir="$OUT/data/spine2d" "${convert_size[@]}"
"$PY" -m data_prep.convert --flagfile=$FLAGS/convert_vb.flags \
  --images_dir="$DATA/spine3d_extra/images" --masks_dir="$DATA/spine3d_extra/masks" \
  --output_dir="$OUT/data/spine3d_extra" "${convert_size[@]}"

models=()
for seed in $SEEDS; do
  step "2/4 spine-train seed $seed, 3/4 spine-export"
  "$PY" -m trainer.main --flagfile=$FLAGS/train.flags \
    --data_dir="$OUT/data/spine2d,$OUT/data/spine3d_extra" \
    --model_dir="$OUT/runs/seed$seed" --seed="$seed" --verbose=2 "${train_more[@]}"
  "$PY" -m export.export_saved_model --model_dir="$OUT/runs/seed$seed" \
    --export_dir="$OUT/runs/seed$seed/export/1"
  models+=("$OUT/runs/seed$seed/export/1")
done
ensemble=$(IFS=,; echo "${models[*]}")

step "4/4 spine-evaluate: the ensemble of ${#models[@]} with --tta on held-out volumes"
for held in $HELD_OUT; do
  case_id=${held#*/}
  for kind in images masks; do  # a folder holding only this case (symlinks, no copy)
    mkdir -p "$OUT/heldout/$case_id/$kind"
    ln -s "$(realpath "$DATA/${held%/*}/$kind/$case_id.nii.gz")" "$OUT/heldout/$case_id/$kind/"
  done
  "$PY" -m export.evaluate --saved_model="$ensemble" --tta \
    --images_dir="$OUT/heldout/$case_id/images" --masks_dir="$OUT/heldout/$case_id/masks" \
    --output_json="$OUT/eval/$case_id.json"
done
# The training scanners' val split, scored as the trainer validates it (no TTA there).
"$PY" -m export.evaluate --saved_model="$ensemble" --data_dir="$OUT/data/spine2d" \
  --split=val --output_json="$OUT/eval/spine2d_val.json"

step "done in $(( $(date +%s) - start )) s"
echo "  models $ensemble; scores $OUT/eval/*.json"
"$PY" tools/demo_summary.py "$OUT"/eval/*.json
