r"""Quality across scanners per training recipe, printed as one table (with the commands).

  python bench/quality_bench.py --quick              # smoke: every recipe runs (~minutes)
  python bench/quality_bench.py --recipes=default,partial --seeds=0,1 --epochs=300

For each recipe and seed this runs the real commands a user runs, each printed before it
runs so any row can be reproduced by hand:
  spine-convert (once per dataset and conversion setting) -> spine-train -> spine-export
  -> spine-evaluate on spine2d's val split (disc, vertebra: the training scanners) and on
  two volumes of OTHER scanners never trained on: spine3d/ivd_11 (discs labelled only:
  its disc Dice) and spine3d/vb2_05 (vertebral bodies only: its vertebra Dice); each
  volume once more with --within_labelled_levels (their masks label some levels only:
  5 lumbar discs; vertebral bodies T11-L5), a diagnostic column beside the plain one.
Data: ../shared/data (spine2d, spine3d, spine3d_extra; see its README). Without it the
bench says so and exits 0.

A recipe is data + flags. `partial` adds the five partially labelled volumes of
spine3d_extra (vertebral bodies only, T2/T1/inversion recovery) converted with
`--annotated_labels=2`. Seeds: a difference smaller than the seed-to-seed spread is not a
result; run several (`--seeds`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent

_DATA = flags.DEFINE_string("data", str(REPO.parent / "shared" / "data"),
                            help="The shared data folder (spine2d, spine3d, spine3d_extra).")
_RECIPES = flags.DEFINE_list("recipes", None, help="Recipes to run (default: all).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], help="Training seeds per recipe.")
_QUICK = flags.DEFINE_bool("quick", False, help="Smoke sizes: 64 px, 2 epochs, tiny U-Net.")
_EPOCHS = flags.DEFINE_integer("epochs", 300, help="Epochs per run (not --quick).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, help="Converted square side.")
_TARGET_SPACING_MM = flags.DEFINE_float(
    "target_spacing_mm", None, help="--target_spacing_mm of the scale recipes (default: "
    "1.1 * 256 / image_size, spine2d's scale; a smaller value or a larger --image_size "
    "crops less of a large field of view).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, help="Keep everything here (default: temp).")
_TRAIN_FLAGS = flags.DEFINE_string(
    "train_flags", "", help="Extra spine-train flags for every run, space-separated, e.g. "
    "'--base_filters=16' for a cheaper comparison.")
_EVAL_FLAGS = flags.DEFINE_string(
    "eval_flags", "", help="Extra spine-evaluate flags for the two volumes of other "
    "scanners, space-separated, e.g. '--nopostprocess' to score the raw argmax (the "
    "README's table was measured so, before the island clean-up became the default).")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Training data and flags of one row."""
  name: str
  description: str
  extra_data: bool = False              # + spine3d_extra with --annotated_labels=2
  convert_flags: tuple[str, ...] = ()   # for every dataset of the recipe ({target}: the
                                        # target spacing for the chosen image size)
  convert_2d_flags: tuple[str, ...] = ()  # for spine2d only
  train_flags: tuple[str, ...] = ()
  evaluate_flags: tuple[str, ...] = ()   # for the volumes of other scanners
  reuse: str = ""                         # score the model of this recipe (no training)


RECIPES = (
    Recipe("default", "today's default flags, spine2d only"),
    # Equal weights: proportional sampling would give spine2d's 7 slices a 3% share.
    Recipe("partial", "+ partially labelled volumes (spine3d_extra, --annotated_labels=2)",
           extra_data=True, train_flags=("--dataset_weights=1,1",)),
    # spine2d looks like ~1.1 mm/pixel at 256 px: every slice resampled to that physical
    # scale (scaled with --image_size so the square keeps a ~280 mm field of view).
    Recipe("scale", "+ physical scale (--target_spacing_mm, spine2d at 1.1 mm/px)",
           extra_data=True, train_flags=("--dataset_weights=1,1",),
           convert_flags=("--target_spacing_mm={target}",),
           convert_2d_flags=("--spacing_2d_mm=1.1",)),
    Recipe("intensity", "scale + strong intensity randomization (region remap 0.5, blur "
           "0.2, low resolution 0.2)",
           extra_data=True, convert_flags=("--target_spacing_mm={target}",),
           convert_2d_flags=("--spacing_2d_mm=1.1",),
           train_flags=("--dataset_weights=1,1", "--aug_remap_prob=0.5",
                        "--aug_blur_prob=0.2", "--aug_lowres_prob=0.2")),
    Recipe("mild", "scale + mild intensity randomization (0.15, 0.1, 0.1)",
           extra_data=True, convert_flags=("--target_spacing_mm={target}",),
           convert_2d_flags=("--spacing_2d_mm=1.1",),
           train_flags=("--dataset_weights=1,1", "--aug_remap_prob=0.15",
                        "--aug_blur_prob=0.1", "--aug_lowres_prob=0.1")),
    # The scale model scored again with --tta on the volumes (the val split is scored
    # through segment_examples, without TTA).
    Recipe("tta", "the scale model scored with --tta (no retraining)",
           extra_data=True, convert_flags=("--target_spacing_mm={target}",),
           convert_2d_flags=("--spacing_2d_mm=1.1",), evaluate_flags=("--tta",),
           reuse="scale"),
)


def _run(cmd: list[str], log: pathlib.Path) -> None:
  print("  $ " + " ".join(str(c) for c in cmd), flush=True)
  with open(log, "a") as f:
    proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                          cwd=REPO, check=False)
  if proc.returncode:
    tail = log.read_text().strip().splitlines()[-3:]
    raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {' | '.join(tail)}")


def _folder_of(data: pathlib.Path, sub: str, case: str, out: pathlib.Path) -> pathlib.Path:
  """A folder holding only `case`'s image and mask (symlinks), for spine-evaluate."""
  for kind in ("images", "masks"):
    (out / kind).mkdir(parents=True, exist_ok=True)
    src = data / sub / kind / f"{case}.nii.gz"
    dst = out / kind / src.name
    if not dst.exists():
      dst.symlink_to(src)
  return out


def _score(report: pathlib.Path, key: str) -> float | str:
  return json.loads(report.read_text())["overall"]["pooled"]["dice"][key]


def _train(recipe: Recipe, seed: str, data_dirs: list[pathlib.Path], work: pathlib.Path,
           epochs: int, model_flags: list[str], log: pathlib.Path):
  """spine-train + spine-export of one recipe and seed; (run folder, training minutes)."""
  run = work / f"{recipe.name}-seed{seed}"
  shutil.rmtree(run, ignore_errors=True)
  start = time.monotonic()
  _run([BIN / "spine-train", f"--data_dir={','.join(str(d) for d in data_dirs)}",
        f"--model_dir={run / 'model'}", f"--epochs={epochs}", f"--seed={seed}",
        "--verbose=0", *model_flags, *_TRAIN_FLAGS.value.split(), *recipe.train_flags], log)
  minutes = (time.monotonic() - start) / 60
  _run([BIN / "spine-export", f"--model_dir={run / 'model'}",
        f"--export_dir={run / 'export' / '1'}"], log)
  return run, minutes


def main(argv):
  del argv
  data = pathlib.Path(_DATA.value)
  if not (data / "spine2d").is_dir() or not (data / "spine3d").is_dir():
    print(f"quality_bench: {data} lacks spine2d/spine3d; nothing to measure")
    return
  quick = _QUICK.value
  size = 64 if quick else _IMAGE_SIZE.value
  epochs = 2 if quick else _EPOCHS.value
  model_flags = ["--base_filters=4", "--depth=2"] if quick else []
  wanted = _RECIPES.value or [r.name for r in RECIPES]
  unknown = sorted(set(wanted) - {r.name for r in RECIPES})
  if unknown:
    raise app.UsageError(f"unknown recipes {unknown}; expected {[r.name for r in RECIPES]}")
  recipes = [r for r in RECIPES if r.name in wanted]
  work = pathlib.Path(_WORK_DIR.value or tempfile.mkdtemp(prefix="quality_bench-"))
  work.mkdir(parents=True, exist_ok=True)
  log = work / "commands.log"
  ivd = _folder_of(data, "spine3d", "ivd_11", work / "eval" / "ivd_11")
  vb2 = _folder_of(data, "spine3d", "vb2_05", work / "eval" / "vb2_05")
  rows = []
  target = f"{_TARGET_SPACING_MM.value or 1.1 * 256 / size:.4g}"
  for recipe in recipes:
    convert_flags = [f.format(target=target) for f in recipe.convert_flags]
    tag = "-".join(convert_flags).replace("--", "").replace("=", "") or "plain"
    d2 = work / f"spine2d-{size}-{tag}"
    if not (d2 / "dataset.json").exists():
      _run([BIN / "spine-convert", f"--images_dir={data / 'spine2d' / 'images'}",
            f"--masks_dir={data / 'spine2d' / 'masks'}", f"--output_dir={d2}",
            f"--image_size={size}", "--val_fraction=0.2", "--seed=0",
            *convert_flags, *recipe.convert_2d_flags], log)
    data_dirs = [d2]
    if recipe.extra_data:
      dx = work / f"extra-{size}-{tag}"
      if not (dx / "dataset.json").exists():
        _run([BIN / "spine-convert", f"--images_dir={data / 'spine3d_extra' / 'images'}",
              f"--masks_dir={data / 'spine3d_extra' / 'masks'}", f"--output_dir={dx}",
              f"--image_size={size}", "--annotated_labels=2", "--val_fraction=0.2",
              "--seed=0", *convert_flags], log)
      data_dirs.append(dx)
    for seed in _SEEDS.value:
      if recipe.reuse:
        source = work / f"{recipe.reuse}-seed{seed}"
        if not (source / "export" / "1").is_dir():
          raise app.UsageError(f"recipe {recipe.name} scores the model of {recipe.reuse}: "
                               f"run them together (--recipes={recipe.reuse},{recipe.name})")
        run = work / f"{recipe.name}-seed{seed}"
        shutil.rmtree(run, ignore_errors=True)
        (run / "export").mkdir(parents=True)
        (run / "export" / "1").symlink_to(source / "export" / "1")
        minutes = 0.0
      else:
        run, minutes = _train(recipe, seed, data_dirs, work, epochs, model_flags, log)
      export = run / "export" / "1"
      scores = {}
      ivd_args = [f"--images_dir={ivd / 'images'}", f"--masks_dir={ivd / 'masks'}"]
      vb2_args = [f"--images_dir={vb2 / 'images'}", f"--masks_dir={vb2 / 'masks'}"]
      within = (*recipe.evaluate_flags, "--within_labelled_levels")
      for name, args, extra in (
          ("val", [f"--data_dir={d2}", "--split=val"], ()),
          ("ivd_11", ivd_args, recipe.evaluate_flags),
          ("vb2_05", vb2_args, recipe.evaluate_flags),
          ("ivd_11_within", ivd_args, within),
          ("vb2_05_within", vb2_args, within)):
        out = run / f"{name}.json"
        if name != "val":  # a converted split is scored as the trainer's validation
          extra = (*extra, *_EVAL_FLAGS.value.split())
        _run([BIN / "spine-evaluate", f"--saved_model={export}", *args,
              f"--output_json={out}", *extra], log)
        scores[name] = out
      rows.append((recipe, seed, _score(scores["val"], "dice_disc"),
                   _score(scores["val"], "dice_vertebra"),
                   _score(scores["ivd_11"], "dice_disc"),
                   _score(scores["vb2_05"], "dice_vertebra"),
                   _score(scores["ivd_11_within"], "dice_disc"),
                   _score(scores["vb2_05_within"], "dice_vertebra"), minutes))

  def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)

  print(f"\n{size} px, {epochs} epochs {_TRAIN_FLAGS.value}"
        f"{' (quick smoke: figures mean nothing)' if quick else ''}; work dir {work}\n")
  print("| recipe | seed | spine2d val disc | spine2d val vertebra | ivd_11 disc | "
        "vb2_05 vertebral body | ivd_11 within levels | vb2_05 within levels | "
        "train min |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for recipe, seed, *values, minutes in rows:
    print(f"| {recipe.name}: {recipe.description} | {seed} | "
          + " | ".join(fmt(v) for v in values) + f" | {minutes:.1f} |")


if __name__ == "__main__":
  app.run(main)
