r"""Benchmark of spine-evaluate on NIfTI volumes against spine-predict on the same volumes.

Builds an UNTRAINED U-Net (weights do not change the model's cost), exports it with
spine-export's library, then times per volume, with the same SavedModel:
  1. spine-predict's library: read, reorient, `segment_volume`, write the label NIfTI;
  2. spine-evaluate's folder mode: read image and mask, `segment_volume`, Dice counts and
     HD95 of both foreground classes (whatever `export.evaluate_lib` calls), and the share
     of that time spent in HD95.
Goal: evaluate <= 1.5x predict. Volumes: the real ones of ../shared/data/spine3d
(`--cases`, about 381x381x77) when that folder exists, else phantom volumes
(data_prep/phantom.py). The "pred fg %" column is the share of voxels the model labels
disc or vertebra: HD95 cost grows with the predicted surfaces, and an untrained model's
labels are noisier than a trained one's, so its HD95 share is an upper bound.

  .venv/bin/python bench/evaluate_bench.py                 # ~2 minutes on 2 cores
  .venv/bin/python bench/evaluate_bench.py --image_size=128 --base_filters=8 --depth=3
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Defaults: the U-Net spine-train builds by default, so the ratio is the one users get (a
# tiny model makes predicting cheap and the fixed cost of HD95 look larger).
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, help="Model input square side.")
_BASE_FILTERS = flags.DEFINE_integer("base_filters", 32, help="U-Net base filters.")
_DEPTH = flags.DEFINE_integer("depth", 4, help="U-Net depth.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", str(_REPO.parent / "shared" / "data" / "spine3d"),
    help="Folder with images/ and masks/ NIfTI pairs; phantom volumes when absent.")
_CASES = flags.DEFINE_list("cases", ["ivd_11", "vb2_05"], help="Case ids of --data_dir.")
_PHANTOM_SIZE = flags.DEFINE_integer("phantom_size", 256, help="Phantom in-plane size.")
_PHANTOM_SLICES = flags.DEFINE_integer("phantom_slices", 48, help="Phantom slices.")
_RUNS = flags.DEFINE_integer("runs", 1, help="Timed runs per volume (the minimum counts).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, help="Scratch folder (default: temp).")


def _volumes(work: pathlib.Path) -> tuple[str, list[tuple[str, pathlib.Path, pathlib.Path]]]:
  """(source description, [(case id, image, mask)]): real volumes if present, else phantom."""
  data = pathlib.Path(_DATA_DIR.value)
  real = [(c, data / "images" / f"{c}.nii.gz", data / "masks" / f"{c}.nii.gz")
          for c in _CASES.value]
  if real and all(i.is_file() and m.is_file() for _, i, m in real):
    return f"real volumes of {data}", real
  from data_prep import phantom  # pylint: disable=g-import-not-at-top
  out = work / "phantom"
  ids = phantom.write_3d_dataset(out, num_cases=2, seed=0, size=_PHANTOM_SIZE.value,
                                 num_slices=_PHANTOM_SLICES.value, overwrite=True)
  return (f"phantom volumes ({data} absent)",
          [(c, out / "images" / f"{c}.nii.gz", out / "masks" / f"{c}.nii.gz") for c in ids])


def _one_pair_folders(work: pathlib.Path, case: str, image: pathlib.Path,
                      mask: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """images/ and masks/ folders holding links to one pair (real data is never copied)."""
  images, masks = work / "pairs" / case / "images", work / "pairs" / case / "masks"
  for folder, src in ((images, image), (masks, mask)):
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / src.name
    if not link.exists():
      link.symlink_to(src.resolve())
  return images, masks


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)  # SavedModel writing logs every step at INFO
  import keras  # pylint: disable=g-import-not-at-top
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from data_prep import manifest, schema  # pylint: disable=g-import-not-at-top
  from export import evaluate_lib, inference, predict_lib, serving  # pylint: disable=g-import-not-at-top
  from trainer import unet  # pylint: disable=g-import-not-at-top

  work = pathlib.Path(_WORK_DIR.value or tempfile.mkdtemp(prefix="evaluate_bench."))
  model_dir = work / "model"
  model_dir.mkdir(parents=True, exist_ok=True)
  keras.utils.set_random_seed(0)  # the same untrained weights, so the same labels, each run
  keras_model = unet.build_unet(base_filters=_BASE_FILTERS.value, depth=_DEPTH.value,
                                norm="group")
  keras_model.save(model_dir / "best.keras")
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, {
      "format_version": schema.FORMAT_VERSION, "image_size": _IMAGE_SIZE.value,
      "num_classes": 3, "normalization": {"method": "percentile", "per": "image"},
      "compression": "none", "splits": {}})
  export_dir = serving.export(model_dir, work / "serving" / "1", overwrite=True)
  model = inference.load_saved_model(export_dir)
  source, volumes = _volumes(work)

  # Time HD95 inside evaluate by wrapping the function evaluate_lib calls.
  hd95_seconds = [0.0]
  real_hd95 = evaluate_lib.metrics.hd95_per_class

  def timed_hd95(*args, **kwargs):
    t = time.perf_counter()
    try:
      return real_hd95(*args, **kwargs)
    finally:
      hd95_seconds[0] += time.perf_counter() - t

  evaluate_lib.metrics.hd95_per_class = timed_hd95

  def predict_once(image):
    predict_lib.predict(model, image, work / "pred", overwrite=True, progress=False)

  def evaluate_once(images, masks):
    report = evaluate_lib.evaluate_folders(model, images, masks, progress=False)
    if report["failures"]:
      raise RuntimeError(f"evaluate failed: {report['failures']}")

  predict_once(volumes[0][1])  # warm-up: tracing of segment_volume, thread pools
  tiny = np.zeros((4, 4, 4), np.uint8)
  tiny[1:3, 1:3, 1:3] = 2
  real_hd95(tiny, tiny, (1.0, 1.0, 1.0))  # warm-up: the metric's lazy imports (scipy)
  rows = []
  try:
    for case, image, mask in volumes:
      images, masks = _one_pair_folders(work, case, image, mask)
      shape = nib.load(image).shape
      pred_s = eval_s = hd_s = float("inf")
      for _ in range(_RUNS.value):
        t = time.perf_counter()
        predict_once(image)
        pred_s = min(pred_s, time.perf_counter() - t)
        hd95_seconds[0] = 0.0
        t = time.perf_counter()
        evaluate_once(images, masks)
        elapsed = time.perf_counter() - t
        if elapsed < eval_s:
          eval_s, hd_s = elapsed, hd95_seconds[0]
      pred_mask = np.asarray(nib.load(next((work / "pred").glob(f"{case}_mask.nii*"))).dataobj)
      rows.append((case, "x".join(map(str, shape)), pred_s, eval_s, hd_s,
                   100.0 * np.count_nonzero(pred_mask) / pred_mask.size))
  finally:
    evaluate_lib.metrics.hd95_per_class = real_hd95

  print(f"\nU-Net base_filters={_BASE_FILTERS.value} depth={_DEPTH.value} group norm "
        f"({keras_model.count_params():,} parameters), untrained; image_size "
        f"{_IMAGE_SIZE.value}; {source}; best of {_RUNS.value} run(s); {os.cpu_count()} "
        f"CPU cores, TF {tf.__version__}\n")
  print("| volume | shape | pred fg % | predict s | evaluate s | of which HD95 s "
        "| evaluate / predict |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for case, shape, pred_s, eval_s, hd_s, fg in rows:
    print(f"| {case} | {shape} | {fg:.1f} | {pred_s:.2f} | {eval_s:.2f} | {hd_s:.2f} | "
          f"{eval_s / pred_s:.2f} |")
  total_p = sum(r[2] for r in rows)
  total_e = sum(r[3] for r in rows)
  total_h = sum(r[4] for r in rows)
  print(f"| per volume (mean) | | | {total_p / len(rows):.2f} | {total_e / len(rows):.2f} | "
        f"{total_h / len(rows):.2f} | {total_e / total_p:.2f} |")
  if _WORK_DIR.value is None:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
