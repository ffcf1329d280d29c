"""Shared helpers of the export tests: a tiny trained model directory and its SavedModel."""
from __future__ import annotations

import json
import pathlib

import keras
import numpy as np

from data_prep import manifest
from data_prep import schema
from trainer import unet

IMAGE_SIZE = 32


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
  manifest.write_json_atomic(path / schema.MANIFEST_NAME, {
      "format_version": schema.FORMAT_VERSION, "image_size": IMAGE_SIZE, "num_classes": 3,
      "labels": dict(manifest.LABELS),
      "normalization": {"method": norm_method, "per": "image"}, "compression": "none",
      "splits": {}})
  (path / "config.json").write_text(json.dumps({"base_filters": 4, "depth": 2}))
  return path
