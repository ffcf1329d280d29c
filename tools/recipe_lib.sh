# Sourced by tools/recipe.sh and tools/finetune_study.sh (FLAGS: the flagfile folder).
# recipe_overrides SIZE EPOCHS STEPS sets two arrays, each empty where its value is:
#   convert_size  --image_size=SIZE with the target spacing that keeps the flagfiles' field
#                 of view (convert_2d.flags' image size x spacing) on that square;
#   train_more    --epochs=EPOCHS --steps_per_epoch=STEPS (train.flags' otherwise).
recipe_overrides() {
  convert_size=()
  if [ -n "$1" ]; then
    local fov spacing
    fov=$(awk -F= '/^--image_size=/ {s=$2} /^--target_spacing_mm=/ {t=$2} END {print s * t}' \
      "$FLAGS/convert_2d.flags")
    spacing=$(awk -v f="$fov" -v s="$1" 'BEGIN { printf "%.4g", f / s }')
    convert_size=(--image_size="$1" --target_spacing_mm="$spacing")
  fi
  train_more=()
  if [ -n "$2" ]; then train_more+=(--epochs="$2"); fi
  if [ -n "$3" ]; then train_more+=(--steps_per_epoch="$3"); fi
}
