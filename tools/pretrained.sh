#!/usr/bin/env bash
# Trains the model that ships with spineseg (export/pretrained_model/, MODEL_CARD.md):
# the multi-scanner recipe (tools/recipe.sh, README "Recipe (b)") with one seed and
# --deterministic, then packs its run without optimizer state. `make pretrained` runs it.
#   Same TensorFlow build and CPU: the same weights bit for bit (the weights sha256 it
#   prints equals the card's). Training takes 35 minutes (fast cores) to 2 hours
#   15 minutes (slow ones) on 2 CPU cores.
#   The held-out volumes stay out of training so that the card's Dice is measured on
#   scans the model never saw; its scores land in $PRETRAINED_OUT/eval/.
# Environment: PRETRAINED_OUT (pretrained_out), RECIPE_DATA (../shared/data),
#   PYTHON (.venv/bin/python); PRETRAINED_DEST (export/pretrained_model).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${PRETRAINED_OUT:-pretrained_out}"
RECIPE_SEEDS=0 RECIPE_TRAIN_FLAGS="--deterministic" \
  RECIPE_OUT="$OUT" tools/recipe.sh
"${PYTHON:-.venv/bin/python}" tools/pack_pretrained.py "$OUT/runs/seed0" \
  "${PRETRAINED_DEST:-export/pretrained_model}"
