r"""Benchmark of inference: the exported SavedModel versus the Keras model, and NIfTI volumes.

Builds an UNTRAINED U-Net of the default architecture (experiments/default.flags:
base_filters=32, depth=4, group norm; image_size 256, the converter's default), exports
it with spine-export's library, then measures on the same batches of raw 256x256 slices
  1. slices/s of the SavedModel's `serving_default` (raw pixels in: normalization, fit,
     model, softmax, unfit and argmax all in the graph);
  2. slices/s of the Keras model called directly on the already preprocessed squares
     (`model(x, training=False)` eagerly, and `predict_on_batch`, a compiled function);
  3. seconds per NIfTI volume for spine-predict's library (read, reorient,
     `segment_volume`, write the label volume), volume S x 256 x 256, and for the same
     volume as a DICOM series of S files (when SimpleITK, the ".[dicom]" extra, is
     installed);
  4. the same volume with spine-predict's options: --save_probabilities, an ensemble of
     2 models, --postprocess (seconds and the ratio to the plain prediction);
  5. slices/s of the same export as model.onnx in ONNX Runtime (export/portable.py; when
     the ".[onnx]" extra is installed), and as model.tflite in LiteRT's interpreter (its
     float32 twin, `portable.to_litert`; when the ".[litert]" extra is installed).
Weights do not change the cost, so an untrained model measures the real one.

  .venv/bin/python bench/inference_bench.py                  # ~1-2 minutes on 2 cores
  .venv/bin/python bench/inference_bench.py --base_filters=8 --depth=3 --image_size=128
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, help="Model input square side.")
_BASE_FILTERS = flags.DEFINE_integer("base_filters", 32, help="U-Net base filters.")
_DEPTH = flags.DEFINE_integer("depth", 4, help="U-Net depth.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, help="Slices per call.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 4, help="Timed batches per method.")
_VOLUME_SLICES = flags.DEFINE_integer("volume_slices", 16, help="Slices of the NIfTI.")
_WORK_DIR = flags.DEFINE_string("work_dir", None, help="Scratch folder (default: temp).")


def _rate(fn, batches) -> float:
  fn(batches[0])  # warm-up: tracing, thread pools, first allocation
  start = time.perf_counter()
  for b in batches:
    fn(b)
  return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)  # SavedModel writing logs every step at INFO
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from data_prep import manifest, preprocess, schema  # pylint: disable=g-import-not-at-top
  from export import inference, predict_lib, predict_report, serving, stable_norm  # pylint: disable=g-import-not-at-top
  from trainer import unet  # pylint: disable=g-import-not-at-top

  size, bs = _IMAGE_SIZE.value, _BATCH_SIZE.value
  work = pathlib.Path(_WORK_DIR.value or tempfile.mkdtemp(prefix="inference_bench."))
  model_dir = work / "model"
  model_dir.mkdir(parents=True, exist_ok=True)
  model = unet.build_unet(base_filters=_BASE_FILTERS.value, depth=_DEPTH.value,
                          norm="group")
  model.save(model_dir / "best.keras")
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, manifest.make(
      image_size=size, normalization="percentile", per="image", compression="none",
      splits={}))
  t = time.perf_counter()
  export_dir = serving.export(model_dir, work / "serving" / "1", overwrite=True)
  export_s = time.perf_counter() - t
  loaded = inference.load_saved_model(export_dir)

  rng = np.random.default_rng(0)
  raw = [rng.gamma(2.0, 100.0, (bs, size, size)).astype(np.float32)
         for _ in range(_NUM_BATCHES.value)]
  squares = []
  for batch in raw:  # the converter's preprocessing, outside the timed region
    geo = preprocess.fit_geometry(size, size, size)
    fitted = []
    for x in batch:
      off, sc = preprocess.normalization_params(x, "percentile")
      fitted.append(preprocess.fit_image(preprocess.apply_normalization(
          x, "percentile", off, sc), geo, size, preprocess.pad_value("percentile", off, sc)))
    squares.append(tf.constant(np.stack(fitted)[..., None]))
  raw_t = [tf.constant(b[..., None]) for b in raw]
  serve = loaded.module.signatures["serving_default"]
  saved_name = "SavedModel serving_default (raw pixels in)"
  rates = {
      saved_name: _rate(lambda b: serve(images=b), raw_t),
      "Keras model(x) eager (preprocessed in)": _rate(
          lambda b: model(b, training=False), squares),
      "Keras predict_on_batch (preprocessed in)": _rate(model.predict_on_batch, squares),
      # What the export's float64 group statistics cost against Keras' float32 ones.
      "Keras predict_on_batch, float64 group statistics": _rate(
          stable_norm.with_stable_statistics(model).predict_on_batch, squares),
  }
  onnx_skipped = None
  if all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnxruntime")):  # ".[onnx]"
    import onnxruntime  # pylint: disable=g-import-not-at-top
    from export import portable  # pylint: disable=g-import-not-at-top
    session = onnxruntime.InferenceSession(str(portable.to_onnx(export_dir)),
                                           providers=["CPUExecutionProvider"])
    rates["ONNX Runtime model.onnx (raw pixels in)"] = _rate(
        lambda b: session.run(None, {"images": b}), [b[..., None] for b in raw])
  else:
    onnx_skipped = 'ONNX Runtime: skipped, not installed (pip install -e ".[onnx]")'
  litert_skipped = None
  if importlib.util.find_spec("ai_edge_litert") is not None:  # ".[litert]"
    from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
    from export import portable  # pylint: disable=g-import-not-at-top
    runner = interpreter.Interpreter(
        model_path=str(portable.to_litert(model_dir, export_dir))).get_signature_runner(
            portable.SIGNATURE)
    rates["LiteRT model.tflite (raw pixels in)"] = _rate(
        lambda b: runner(images=b), [b[..., None] for b in raw])
  else:
    litert_skipped = 'LiteRT: skipped, not installed (pip install -e ".[litert]")'

  volume = rng.gamma(2.0, 100.0, (size, size, _VOLUME_SLICES.value)).astype(np.float32)
  vol_dir = work / "volumes"
  vol_dir.mkdir(exist_ok=True)
  # Scanner order (I, P, R) so that the reorientation is part of the cost.
  affine = np.array([[0, 0, 1.0, 0], [0, -1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1]])
  nib.save(nib.Nifti1Image(volume, affine), vol_dir / "v.nii.gz")

  def seconds_per_volume(path, model=loaded, **options):
    predict_lib.predict(model, path, work / "pred", overwrite=True,
                        progress=False, **options)  # warm-up
    runs = 2
    t = time.perf_counter()
    for _ in range(runs):
      predict_lib.predict(model, path, work / "pred", overwrite=True, progress=False,
                          **options)
    return (time.perf_counter() - t) / runs

  volume_s = seconds_per_volume(vol_dir / "v.nii.gz")
  dicom_s = None
  if importlib.util.find_spec("SimpleITK") is not None:  # the optional ".[dicom]" extra
    from data_prep import dicom  # pylint: disable=g-import-not-at-top
    # The same volume as a sagittal int16 series: slice k = voxels [:, :, k], its rows
    # running inferior (i), its columns posterior (j), slices 1 mm apart toward right.
    slices = np.round(volume).clip(-32768, 32767).transpose(2, 0, 1)
    dicom.write_series(vol_dir / "series", slices,
                       [(-float(k), 0.0, 0.0) for k in range(len(slices))],
                       row_cosine=(0, 1, 0), column_cosine=(0, 0, -1),
                       pixel_spacing=(1.0, 1.0), slice_thickness=1.0,
                       series_uid="1.2.826.0.1.3680043.2.1125.99")
    dicom_s = seconds_per_volume(vol_dir / "series")

  # spine-predict options on the same NIfTI volume; the ensemble's second member is the
  # same export loaded again (an equal-size model costs the same).
  options_s = {
      "--save_probabilities": seconds_per_volume(vol_dir / "v.nii.gz",
                                                 save_probabilities=True),
      "ensemble of 2 (--saved_model=A,B)": seconds_per_volume(
          vol_dir / "v.nii.gz",
          inference.Ensemble((loaded, inference.load_saved_model(export_dir)))),
      "--postprocess": seconds_per_volume(vol_dir / "v.nii.gz", postprocess=True),
      # overwrite=True replaces the previous timing run's report folder each time.
      "--report (QC page)": seconds_per_volume(
          vol_dir / "v.nii.gz", report=predict_report.Options(str(work / "report"))),
  }

  base = rates["Keras model(x) eager (preprocessed in)"]
  print(f"\nU-Net base_filters={_BASE_FILTERS.value} depth={_DEPTH.value} group norm "
        f"({model.count_params():,} parameters), untrained; image {size}x{size}, "
        f"batch {bs}, {_NUM_BATCHES.value} timed batches; {os.cpu_count()} CPU cores, "
        f"TF {tf.__version__}; export took {export_s:.1f} s\n")
  print("| method | slices/s | ratio vs Keras eager | ratio vs SavedModel |")
  print("| --- | ---: | ---: | ---: |")
  for name, r in rates.items():
    print(f"| {name} | {r:.2f} | {r / base:.2f} | {r / rates[saved_name]:.2f} |")
  if onnx_skipped:
    print(f"| {onnx_skipped} | | | |")
  if litert_skipped:
    print(f"| {litert_skipped} | | | |")
  print("\n| volume via spine-predict | s/volume | s/slice |")
  print("| --- | ---: | ---: |")
  print(f"| NIfTI, {_VOLUME_SLICES.value} slices of {size}x{size}, scanner order | "
        f"{volume_s:.2f} | {volume_s / _VOLUME_SLICES.value:.3f} |")
  if dicom_s is None:
    print('| DICOM series: skipped, SimpleITK not installed (pip install -e ".[dicom]") '
          "| | |")
  else:
    print(f"| DICOM series of the same volume ({_VOLUME_SLICES.value} files) | "
          f"{dicom_s:.2f} | {dicom_s / _VOLUME_SLICES.value:.3f} |")
  print("\n| spine-predict option, same NIfTI volume | s/volume | ratio vs plain |")
  print("| --- | ---: | ---: |")
  for name, seconds in options_s.items():
    print(f"| {name} | {seconds:.2f} | {seconds / volume_s:.2f} |")
  if _WORK_DIR.value is None:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
