"""Shared helpers of the export tests: tiny model directories to export.

`write_model_dir` holds a briefly trained U-Net (the real architecture: for tests of
geometry and signatures). `write_threshold_model_dir` holds a hand-built model whose
output is known in advance: with "divide255" normalization it labels each pixel by its raw
8-bit intensity alone (`threshold_labels`), so the tests that score or write masks have a
ground truth computed from the input, independently of the model.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np

from data_prep import manifest
from data_prep import schema
from export import inference
from export import serving
from trainer import unet

IMAGE_SIZE = 32
# Raw 8-bit intensities separating background | disc | vertebra for the threshold model;
# half-integers, so that no integer pixel sits on a boundary.
THRESHOLDS = (85.5, 170.5)


def write_model_dir(path: pathlib.Path, *, norm_method: str = "percentile",
                    steps: int = 2) -> pathlib.Path:
  """A spine-train-like model directory: best.keras (briefly trained), dataset.json."""
  path.mkdir(parents=True, exist_ok=True)
  keras.utils.set_random_seed(0)
  model = unet.build_unet(num_classes=3, base_filters=4, depth=2, norm="batch")
  model.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.default_rng(0)
  x = rng.random((8, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
  y = (x[..., 0] * 3).astype(np.int32).clip(0, 2)  # a learnable intensity -> class map
  model.fit(x, y, batch_size=4, epochs=steps, verbose=0)
  model.save(path / "best.keras")
  manifest.write_json_atomic(path / schema.MANIFEST_NAME, manifest.make(
      image_size=IMAGE_SIZE, normalization=norm_method, per="image", compression="none",
      splits={}))
  (path / "config.json").write_text(json.dumps({"base_filters": 4, "depth": 2}))
  return path


def threshold_labels(image) -> np.ndarray:
  """The threshold model's labels for raw intensities: 0 below 85.5, 1 up to 170.5, else 2."""
  image = np.asarray(image, dtype=np.float64)
  return ((image > THRESHOLDS[0]).astype(np.uint8) + (image > THRESHOLDS[1])).astype(np.uint8)


def write_threshold_model_dir(path: pathlib.Path, image_size: int = IMAGE_SIZE, *,
                              thresholds: tuple[float, float] = THRESHOLDS,
                              gain: float = 1020.0,
                              target_spacing_mm: float | None = None) -> pathlib.Path:
  """A model directory whose model computes `threshold_labels` of the raw pixels.

  One 1x1 convolution gives logits (0, K (v - t1), K (2v - t1 - t2)) of the normalized
  pixel v = raw / 255 with t = `thresholds` / 255 (`threshold_probabilities`): class 1
  beats 0 exactly when v > t1 and class 2 beats 1 exactly when v > t2, so the argmax is
  the threshold label. K = `gain` = 1020 keeps the logit gap of the nearest integer pixel
  (half a grey level) at 2; a smaller gain gives soft probabilities. `target_spacing_mm`:
  the model works at that spacing (a 1x1 model's labels do not depend on it, but the
  predict/evaluate checks do).
  """
  path.mkdir(parents=True, exist_ok=True)
  t1, t2 = (t / 255.0 for t in thresholds)
  k = gain
  model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(3, 1)])
  model.layers[0].set_weights([np.array([0.0, k, 2 * k], np.float32).reshape(1, 1, 1, 3),
                               np.array([0.0, -k * t1, -k * (t1 + t2)], np.float32)])
  model.save(path / "best.keras")
  manifest.write_json_atomic(path / schema.MANIFEST_NAME, manifest.make(
      image_size=image_size, normalization="divide255", per="image", compression="none",
      splits={}, extra=({} if target_spacing_mm is None
                        else {"target_spacing_mm": target_spacing_mm})))
  return path


def threshold_probabilities(image, thresholds: tuple[float, float] = THRESHOLDS,
                            gain: float = 1020.0) -> np.ndarray:
  """float64 [..., 3]: the softmax of the threshold model's logits, computed in NumPy."""
  v = np.asarray(image, dtype=np.float64) / 255.0
  t1, t2 = (t / 255.0 for t in thresholds)
  logits = np.stack([np.zeros_like(v), gain * (v - t1), gain * (2 * v - t1 - t2)], -1)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def export_and_load(model_dir: pathlib.Path, export_dir: pathlib.Path):
  """Exports `model_dir` to `export_dir` and loads it as the binaries do.

  Returns:
    the `inference.LoadedModel`; its `.path` is the export folder (what
    spine-predict/evaluate receive).
  """
  return inference.load_saved_model(serving.export(model_dir, export_dir))


# Side of the square of `export_portable`'s model: each group statistic then sums ~260k
# values, as on the real 384 px canvases of the spine2d models (where Keras' float32 sums
# went wrong; see export/stable_norm.py).
PORTABLE_SIZE = 512


def export_portable(root: pathlib.Path, flag: str) -> tuple[pathlib.Path, pathlib.Path]:
  """An untrained group-norm U-Net exported by the spine-export CLI with `flag`.

  Args:
    root: an empty folder; gets `model/` (best.keras, dataset.json) and `export/1/`.
    flag: "--onnx" or "--litert": the portable model written beside the SavedModel.

  Returns:
    (model dir, export dir).
  """
  model_dir = root / "model"
  model_dir.mkdir()
  keras.utils.set_random_seed(0)
  unet.build_unet(base_filters=8, depth=2, norm="group").save(model_dir / "best.keras")
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, manifest.make(
      image_size=PORTABLE_SIZE, normalization="percentile", per="image",
      compression="none", splits={}))
  export_dir = root / "export" / "1"
  proc = subprocess.run(
      [sys.executable, "-m", "export.export_saved_model", f"--model_dir={model_dir}",
       f"--export_dir={export_dir}", flag], cwd=pathlib.Path(__file__).resolve().parents[1],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  name = {"--onnx": "model.onnx", "--litert": "model.tflite"}[flag]
  assert f"wrote {export_dir / name}" in proc.stdout, proc.stdout
  return model_dir, export_dir


def group_norm_case():
  """A big flat group-norm input with an offset (as on a serving canvas), its layer in a
  model, and the float64 NumPy reference output: where float32 single-pass sums lose
  digits (Keras' own layer is 2.2e-4 off here).

  Returns:
    (x float32 [1, 384, 384, 4], keras model of one GroupNormalization, want float64).
  """
  rng = np.random.default_rng(0)
  x = (rng.normal(0.3, 0.2, (1, 384, 384, 4)) + rng.random((1, 384, 384, 1))).astype(
      np.float32)
  layer = keras.layers.GroupNormalization(groups=2)
  layer.build(x.shape)
  layer.set_weights([rng.uniform(0.5, 1.5, 4).astype(np.float32),
                     rng.normal(0, 0.1, 4).astype(np.float32)])
  model = keras.Sequential([keras.Input((None, None, 4)), layer])
  g = x.astype(np.float64).reshape(1, 384, 384, 2, 2)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  gamma, beta = (w.astype(np.float64).reshape(2, 2) for w in layer.get_weights())
  want = ((g - mean) / np.sqrt(var + layer.epsilon) * gamma + beta).reshape(x.shape)
  return x, model, want
