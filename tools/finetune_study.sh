#!/usr/bin/env bash
# "How many slices must I label?" (issue 21 item 2) on ../shared/data, with the flags of
# experiments/multi_scanner/ (README "Recipe (b)"). vb1_02 and vb1_03 play a new scanner;
# vb1_06, vb1_07 and vb1_08 (same centre) score every model. Per seed:
#   (a) base: the recipe on spine2d + ivd_11 only (no spine3d_extra), scored as it is with
#       its spine2d head (it has no vb1 head; spine2d's draws the vertebral bodies too);
#   (b) per k: the base fine-tuned (--init_from) on the k labelled slices only (a fresh
#       vb1 head), scored with the vb1 head;
#   (c) per k: the recipe from scratch on spine2d + ivd_11 + the k slices, vb1 head.
# k slices: k=1 is vb1_02's middle labelled slice; an even k takes k/2 of each volume
# (spine-convert --slices_per_case: the middle one first, then bisections, so a larger k
# holds the slices of a smaller one).
# Each cell goes to $STUDY_OUT/cells/ARM_kK_seedS.json: vertebra Dice pooled over the
# scoring volumes and per volume, the minutes of its spine-train call, and the commands
# that reproduce it. A cell whose JSON exists is skipped: rerun the same command to
# continue a stopped run, or with more seeds or k to extend it (the settings that shape
# the figures must stay the same: they are checked against $STUDY_OUT/settings.txt).
# Then tools/study_table.py prints the table and the verdict and writes study.svg.
# Run from anywhere (`make finetune-study` does). Full size (2 seeds, k = 1 2 4 8: 2 base
# and 8 recipe trainings of train.flags' 1,200 steps, ~35 min each on 2 CPU cores at
# 336 px, 8 short fine-tunings) takes about 6 hours there.
# Shrink it with the environment (tests/test_finetune_study.py does):
#   STUDY_SEEDS="0 1"        training seeds
#   STUDY_K="1 2 4 8"        labelled slices of the new scanner: 1 or even numbers
#   STUDY_ARMS="a b c"       the arms to run now (b needs a's base); the others' cells
#                            can follow in a later run
#   STUDY_EPOCHS, STUDY_STEPS        override train.flags' --epochs / --steps_per_epoch for
#                            the base and (c)
#   STUDY_FT_EPOCHS, STUDY_FT_STEPS  the fine-tuning's epochs and steps (default 10 x 10)
#   STUDY_FT_FLAGS           the fine-tuning's other spine-train flags (default below)
#   STUDY_TRAIN_FLAGS        extra spine-train flags of every training, e.g.
#                            "--base_filters=4 --depth=2"
#   STUDY_IMAGE_SIZE         the square side (the target spacing follows, as recipe.sh's)
#   STUDY_SCORE              the scoring volumes of spine3d_extra (default vb1_06 vb1_07 vb1_08)
#   STUDY_DATA (../shared/data), STUDY_OUT (out/finetune_study), PYTHON (.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="${PYTHON:-.venv/bin/python}"
DATA="${STUDY_DATA:-../shared/data}"
OUT="${STUDY_OUT:-out/finetune_study}"
SEEDS="${STUDY_SEEDS:-0 1}"
KS="${STUDY_K:-1 2 4 8}"
ARMS=" ${STUDY_ARMS:-a b c} "
SCORE="${STUDY_SCORE:-vb1_06 vb1_07 vb1_08}"
FLAGS=experiments/multi_scanner
# Fine-tuning: 100 steps, a sixth of the recipe's 600, so that (b) can meet the goal of a
# fifth of (c)'s minutes, at 3e-3 with no frozen layers: the best of a sweep on the new
# scanner's own volumes, never on the scoring ones (docs/results.md "Tuning the
# fine-tuning"); the usual lower rate and frozen encoder scored far lower there.
FT_EPOCHS="${STUDY_FT_EPOCHS:-10}"
FT_STEPS="${STUDY_FT_STEPS:-10}"
FT_FLAGS="${STUDY_FT_FLAGS:---learning_rate=3e-3 --warmup_epochs=1}"
NEW=(vb1_02 vb1_03)  # the "new scanner"

fail() { echo "finetune_study: error: $*" >&2; exit 1; }
for sub in spine2d spine3d spine3d_extra; do
  [ -d "$DATA/$sub" ] || fail "$DATA/$sub is missing (set STUDY_DATA to the shared data folder)"
done
for k in $KS; do
  case "$k" in
    1 | *[02468]) [[ "$k" =~ ^[1-9][0-9]*$ ]] && continue ;;
  esac
  fail "STUDY_K: $k is not 1 or an even number of slices (k/2 of each of ${NEW[*]})"
done

source tools/recipe_lib.sh
recipe_overrides "${STUDY_IMAGE_SIZE:-}" "${STUDY_EPOCHS:-}" "${STUDY_STEPS:-}"
read -r -a extra <<< "${STUDY_TRAIN_FLAGS:-}"
read -r -a ft_flags <<< "$FT_FLAGS"

mkdir -p "$OUT/cells" "$OUT/commands" "$OUT/eval"
settings="image_size=${STUDY_IMAGE_SIZE:-} epochs=${STUDY_EPOCHS:-} steps=${STUDY_STEPS:-}
ft_epochs=$FT_EPOCHS ft_steps=$FT_STEPS ft_flags=$FT_FLAGS
train_flags=${STUDY_TRAIN_FLAGS:-} score=$SCORE"
if [ -f "$OUT/settings.txt" ]; then
  [ "$(cat "$OUT/settings.txt")" = "$settings" ] || fail "$OUT holds cells of other \
settings ($OUT/settings.txt); use another STUDY_OUT or the same settings"
else
  printf '%s\n' "$settings" > "$OUT/settings.txt"
fi

step() { printf '\n== %s  (%s)\n' "$1" "$(date +%H:%M:%S)"; }
log=/dev/null  # the commands file of the folder or cell being made
run() {  # runs a command, appending it to $log as one line a shell reads back
  local arg line=""
  for arg in "$@"; do
    [[ "$arg" =~ ^[A-Za-z0-9_./=,:+-]+$ ]] || arg=${arg@Q}
    line+="${line:+ }$arg"
  done
  echo "$line" >> "$log"
  "$@"
}
link_case() {  # FOLDER/CASE DEST: symlinks CASE's image and mask into DEST/{images,masks}
  for kind in images masks; do
    mkdir -p "$2/$kind"
    ln -sf "$(realpath "$DATA/${1%/*}/$kind/${1#*/}.nii.gz")" "$2/$kind/"
  done
}
convert() {  # NAME FLAGS...: spine-convert into $OUT/data/NAME unless done before
  local name=$1
  shift
  if [ -f "$OUT/data/$name/dataset.json" ]; then
    echo "  $OUT/data/$name: converted before"
    return
  fi
  rm -rf "$OUT/data/$name"
  log="$OUT/commands/data_$name.sh"
  : > "$log"
  run "$PY" -m data_prep.convert "$@" --output_dir="$OUT/data/$name" "${convert_size[@]}"
}
slices_of() {  # NAME: the slices written into $OUT/data/NAME
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["totals"]["slices_written"])' \
    "$OUT/data/$1/dataset.json"
}
started=0
train() {  # spine-train FLAGS...: the seconds it took go to $seconds
  local model_dir arg
  for arg in "$@"; do [[ "$arg" == --model_dir=* ]] && model_dir=${arg#--model_dir=}; done
  rm -rf "$model_dir"  # a killed run would resume, and its minutes would be wrong
  started=$(date +%s.%N)
  run "$PY" -m trainer.main --flagfile=$FLAGS/train.flags --verbose=2 --deterministic "$@"
  seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
}
score() {  # ARM K SEED MODEL_DIR PROTOCOL [STUDY_TABLE FLAGS...]: export, evaluate, cell
  local arm=$1 k=$2 seed=$3 model_dir=$4 protocol=$5 name="$1_k$2_seed$3"
  shift 5
  run "$PY" -m export.export_saved_model --model_dir="$model_dir" \
    --export_dir="$model_dir/export/1" --protocol="$protocol"
  run "$PY" -m export.evaluate --saved_model="$model_dir/export/1" --protocol="$protocol" \
    --images_dir="$OUT/cases/score/images" --masks_dir="$OUT/cases/score/masks" \
    --output_json="$OUT/eval/$name.json" --overwrite
  "$PY" tools/study_table.py --cell="$OUT/cells/$name.json" --arm="$arm" --k="$k" \
    --seed="$seed" --seconds="$seconds" --eval_json="$OUT/eval/$name.json" \
    --commands="$log" "$@"
}
begin_cell() {  # NAME PREREQUISITE...: 0 when the cell must be made; its commands file
  local name=$1 prerequisite  # starts with those of $OUT/commands/PREREQUISITE.sh, each
  shift
  if [ -f "$OUT/cells/$name.json" ]; then
    echo "  $name: measured before ($OUT/cells/$name.json)"
    return 1
  fi
  log="$OUT/commands/$name.sh"
  : > "$log"
  for prerequisite in "$@"; do cat "$OUT/commands/$prerequisite.sh" >> "$log"; done
}
start=$(date +%s)

step "1/3 spine-convert: spine2d, ivd_11, the k-slice folders of ${NEW[*]}; scoring volumes: $SCORE"
convert spine2d --flagfile=$FLAGS/convert_2d.flags --protocol=spine2d \
  --images_dir="$DATA/spine2d/images" --masks_dir="$DATA/spine2d/masks"
link_case spine3d/ivd_11 "$OUT/cases/ivd_11"
convert ivd_11 --flagfile=$FLAGS/convert_disc.flags --protocol=ivd \
  --images_dir="$OUT/cases/ivd_11/images" --masks_dir="$OUT/cases/ivd_11/masks"
for k in $KS; do
  cases=("${NEW[0]}")
  per_case=1
  if [ "$k" -gt 1 ]; then
    cases=("${NEW[@]}")
    per_case=$((k / 2))
  fi
  for case_id in "${cases[@]}"; do link_case "spine3d_extra/$case_id" "$OUT/cases/new_k$k"; done
  # Every slice trains: a val split would take one of the two volumes away.
  convert "new_k$k" --flagfile=$FLAGS/convert_vb.flags --protocol=vb1 --val_fraction=0 \
    --slices_per_case="$per_case" \
    --images_dir="$OUT/cases/new_k$k/images" --masks_dir="$OUT/cases/new_k$k/masks"
  [ "$(slices_of "new_k$k")" -eq "$k" ] || fail "$OUT/data/new_k$k holds \
$(slices_of "new_k$k") slices, not $k (too few labelled slices in ${cases[*]}?)"
done
for case_id in $SCORE; do link_case "spine3d_extra/$case_id" "$OUT/cases/score"; done

for seed in $SEEDS; do
  base="$OUT/runs/a_seed$seed"
  step "2/3 seed $seed: (a) the base, the recipe on spine2d + ivd_11"
  if begin_cell "a_k0_seed$seed" data_spine2d data_ivd_11; then
    train --data_dir="$OUT/data/spine2d,$OUT/data/ivd_11" --dataset_weights=1,1 \
      --model_dir="$base" --seed="$seed" "${train_more[@]}" "${extra[@]}"
    score a 0 "$seed" "$base" spine2d
  fi
  for k in $KS; do
    step "3/3 seed $seed, k=$k: (b) fine-tuned from the base, (c) the recipe from scratch"
    if [[ "$ARMS" == *" b "* ]] && begin_cell "b_k${k}_seed$seed" "a_k0_seed$seed" "data_new_k$k"; then
      train --data_dir="$OUT/data/new_k$k" --dataset_weights=1 --init_from="$base" \
        --model_dir="$OUT/runs/b_k${k}_seed$seed" --seed="$seed" --epochs="$FT_EPOCHS" \
        --steps_per_epoch="$FT_STEPS" "${ft_flags[@]}" "${extra[@]}"
      score b "$k" "$seed" "$OUT/runs/b_k${k}_seed$seed" vb1 --slices="$k" \
        --init_from="a_k0_seed$seed"
    fi
    if [[ "$ARMS" == *" c "* ]] && begin_cell "c_k${k}_seed$seed" data_spine2d data_ivd_11 "data_new_k$k"; then
      train --data_dir="$OUT/data/spine2d,$OUT/data/ivd_11,$OUT/data/new_k$k" \
        --model_dir="$OUT/runs/c_k${k}_seed$seed" --seed="$seed" "${train_more[@]}" \
        "${extra[@]}"
      score c "$k" "$seed" "$OUT/runs/c_k${k}_seed$seed" vb1 --slices="$k"
    fi
  done
done

step "done in $(( $(date +%s) - start )) s"
"$PY" tools/study_table.py "$OUT"
