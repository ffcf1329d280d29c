#!/usr/bin/env bash
# The multi-scanner recipe end to end on ../shared/data (README "Recipe (b)"), with the
# flags of experiments/multi_scanner/:
#   spine-convert per source folder, each with its labelling protocol -> spine-train per
#   seed (one output head per protocol) -> spine-export per seed -> spine-evaluate of the
#   ensemble with --tta on held-out volumes, each with the head of its protocol.
# Run from anywhere (`make recipe` does). Rerunning starts afresh under $RECIPE_OUT.
# Full size (3 seeds x 60 x 20 steps, then 3 models x 3 TTA scales per held-out volume)
# takes about 3.5 hours on 2 CPU cores.
# Shrink it with the environment (tests/test_docs.py does):
#   RECIPE_SEEDS="0 1 2"     training seeds, one model each (the ensemble's members)
#   RECIPE_EPOCHS, RECIPE_STEPS   override train.flags' --epochs / --steps_per_epoch
#   RECIPE_IMAGE_SIZE        override the square side (the target spacing follows:
#                            the flagfiles' field of view over the new size)
#   RECIPE_TRAIN_FLAGS       extra spine-train flags, e.g. "--base_filters=4 --depth=2"
#   RECIPE_HELD_OUT          held-out volumes to score, FOLDER/CASE:PROTOCOL each (default:
#                            every shared volume never trained on, see HELD_OUT below)
#   RECIPE_DATA (../shared/data), RECIPE_OUT (recipe_out), PYTHON (.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="${PYTHON:-.venv/bin/python}"
DATA="${RECIPE_DATA:-../shared/data}"
OUT="${RECIPE_OUT:-recipe_out}"
SEEDS="${RECIPE_SEEDS:-0 1 2}"
FLAGS=experiments/multi_scanner
# Other subjects, scanners and centres, never trained on; each scored on its protocol's head.
HELD_OUT="${RECIPE_HELD_OUT:-spine3d_ivd/ivd_20:ivd spine3d/vb2_05:vb1 spine3d_vb1_repro/vb1_10:vb1 spine3d_vb1_repro/vb1_17:vb1}"

for sub in spine2d spine3d_extra spine3d; do
  if [ ! -d "$DATA/$sub" ]; then
    echo "recipe: error: $DATA/$sub is missing (set RECIPE_DATA to the shared data folder)" >&2
    exit 1
  fi
done

source tools/recipe_lib.sh
recipe_overrides "${RECIPE_IMAGE_SIZE:-}" "${RECIPE_EPOCHS:-}" "${RECIPE_STEPS:-}"
read -r -a extra <<< "${RECIPE_TRAIN_FLAGS:-}"
train_more+=("${extra[@]}")

step() { printf '\n== %s  (%s)\n' "$1" "$(date +%H:%M:%S)"; }
one_case() {  # FOLDER/CASE -> a folder $OUT/cases/CASE holding only it (symlinks, no copy)
  local case_id=${1#*/}
  for kind in images masks; do
    mkdir -p "$OUT/cases/$case_id/$kind"
    ln -sf "$(realpath "$DATA/${1%/*}/$kind/$case_id.nii.gz")" "$OUT/cases/$case_id/$kind/"
  done
}
start=$(date +%s)
rm -rf "$OUT/data" "$OUT/runs" "$OUT/cases" "$OUT/eval"
mkdir -p "$OUT/eval"

step "1/4 spine-convert: spine2d (2D, every class), ivd_11 (discs only), spine3d_extra (vertebral bodies only)"
"$PY" -m data_prep.convert --flagfile=$FLAGS/convert_2d.flags --protocol=spine2d \
  --images_dir="$DATA/spine2d/images" --masks_dir="$DATA/spine2d/masks" \
  --output_dir="$OUT/data/spine2d" "${convert_size[@]}"
one_case spine3d/ivd_11  # spine3d/ holds volumes of other sets too
"$PY" -m data_prep.convert --flagfile=$FLAGS/convert_disc.flags --protocol=ivd \
  --images_dir="$OUT/cases/ivd_11/images" --masks_dir="$OUT/cases/ivd_11/masks" \
  --output_dir="$OUT/data/ivd_11" "${convert_size[@]}"
"$PY" -m data_prep.convert --flagfile=$FLAGS/convert_vb.flags --protocol=vb1 \
  --images_dir="$DATA/spine3d_extra/images" --masks_dir="$DATA/spine3d_extra/masks" \
  --output_dir="$OUT/data/spine3d_extra" "${convert_size[@]}"

models=()
for seed in $SEEDS; do
  step "2/4 spine-train seed $seed, 3/4 spine-export"
  "$PY" -m trainer.main --flagfile=$FLAGS/train.flags \
    --data_dir="$OUT/data/spine2d,$OUT/data/ivd_11,$OUT/data/spine3d_extra" \
    --model_dir="$OUT/runs/seed$seed" --seed="$seed" --verbose=2 "${train_more[@]}"
  "$PY" -m export.export_saved_model --model_dir="$OUT/runs/seed$seed" \
    --export_dir="$OUT/runs/seed$seed/export/1" --protocol=spine2d
  models+=("$OUT/runs/seed$seed/export/1")
done
ensemble=$(IFS=,; echo "${models[*]}")

step "4/4 spine-evaluate: the ensemble of ${#models[@]} with --tta on held-out volumes"
for held in $HELD_OUT; do
  source=${held%%:*}
  case_id=${source#*/}
  one_case "$source"
  "$PY" -m export.evaluate --saved_model="$ensemble" --tta --protocol="${held##*:}" \
    --images_dir="$OUT/cases/$case_id/images" --masks_dir="$OUT/cases/$case_id/masks" \
    --output_json="$OUT/eval/$case_id.json"
done
# The training scanners' val splits, scored as the trainer validates them (no TTA there).
"$PY" -m export.evaluate --saved_model="$ensemble" --data_dir="$OUT/data/spine2d" \
  --split=val --protocol=spine2d --output_json="$OUT/eval/spine2d_val.json"
"$PY" -m export.evaluate --saved_model="$ensemble" --data_dir="$OUT/data/spine3d_extra" \
  --split=val --protocol=vb1 --output_json="$OUT/eval/vb1_val.json"

step "done in $(( $(date +%s) - start )) s"
echo "  models $ensemble; scores $OUT/eval/*.json"
"$PY" tools/demo_summary.py "$OUT"/eval/*.json
