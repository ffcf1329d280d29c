"""Builds tiny converted datasets (shards + dataset.json) for the trainer tests."""
from __future__ import annotations

import hashlib
import pathlib
from typing import Sequence

import numpy as np
import tensorflow as tf

from data_prep import manifest
from data_prep import schema


def synthetic_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """A slice whose labels are visible: bright vertebra blocks, a darker disc between."""
  image = rng.normal(0.1, 0.02, (size, size)).astype(np.float32)
  mask = np.zeros((size, size), np.uint8)
  left = int(rng.integers(size // 8, size // 4))
  right = int(rng.integers(3 * size // 4, 7 * size // 8))
  top = int(rng.integers(2, size // 4))
  mid = top + size // 4
  mask[top:mid, left:right] = 2
  mask[mid:mid + size // 8, left:right] = 1
  mask[mid + size // 8:mid + size // 8 + size // 4, left:right] = 2
  image[mask == 2] += 0.8
  image[mask == 1] += 0.4
  return image, mask


def write_dataset(out_dir, *, num_train: int = 6, num_val: int = 3, image_size: int = 32,
                  compression: str = "none", train_shards: int = 2, seed: int = 0,
                  train_image_value: float | None = None, image_offset: float = 0.0,
                  annotated: Sequence[int] = (0, 1, 2),
                  normalization: str = "percentile",
                  protocol: str = schema.DEFAULT_PROTOCOL) -> str:
  """Writes train/val shards and a manifest as spine-convert would; returns the dir.

  Every shard's SHA-256 is recorded, as the converter does. `train_image_value` (e.g.
  inf) replaces every pixel of the train images, for a loss that cannot be finite; the
  random draws stay those of the unpoisoned dataset. `image_offset` is added to every
  image (a dataset whose slices can be told apart from another's by their values).
  `annotated` (the classes the masks outline) makes a partially labelled dataset: the
  other foreground classes are left unlabelled in the masks, as spine-convert
  --annotated_labels stores them. `normalization` is the method the manifest names.
  `protocol` is the labelling protocol of the examples and the manifest (written as
  spine-convert --protocol writes it: only when not the default).
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  geometry = schema.Geometry(image_size, image_size, image_size, image_size, 0, 0)
  options = tf.io.TFRecordOptions(compression_type="GZIP" if compression == "gzip" else "")
  splits = {}
  for split, count, shards in (("train", num_train, train_shards), ("val", num_val, 1)):
    if count == 0:
      continue
    entries = []
    for shard in range(shards):
      name = schema.shard_name(split, shard, shards)
      indices = range(shard, count, shards)
      with tf.io.TFRecordWriter(str(out / name), options) as writer:
        for i in indices:
          image, mask = synthetic_slice(rng, image_size)
          image = image + np.float32(image_offset)
          for c in schema.FOREGROUND:
            if c not in annotated:
              mask[mask == c] = 0
          if split == "train" and train_image_value is not None:
            image = np.full_like(image, train_image_value)
          example = schema.make_example(
              image, mask, case_id=f"{split}{i}", slice_index=0, source=f"{split}{i}.png",
              geometry=geometry, spacing=[1.0, 1.0], norm_method=normalization,
              norm_offset=0.0, norm_scale=1.0, annotated=annotated, protocol=protocol)
          writer.write(example.SerializeToString())
      sha256 = hashlib.sha256((out / name).read_bytes()).hexdigest()
      entries.append({"file": name, "examples": len(indices), "sha256": sha256})
    splits[split] = {"cases": count, "slices": count, "shards": entries}
  manifest.write_json_atomic(out / schema.MANIFEST_NAME, manifest.make(
      image_size=image_size, normalization=normalization, per="image",
      compression=compression, splits=splits,
      extra={"annotated_labels": sorted({0, *annotated}),
             **({} if protocol == schema.DEFAULT_PROTOCOL else {"protocol": protocol})}))
  return str(out)
