"""THE TFRecord contract of spineseg: every feature key, dtype and the format version.

The converter writes examples with `make_example`; the trainer, the evaluator and the
serving signature read them with `parse_example`. No other module spells a feature key.

One example is one 2D sagittal slice, already normalized and brought to a square
`image_size` (aspect ratio kept, padded), plus what is needed to map a prediction back
to the slice's original geometry.

On-disk encoding: the image is stored as raw little-endian float32 bytes and the mask as
raw uint8 bytes. Decoding raw bytes is a memcpy (`tf.io.decode_raw`), whereas PNG would
force a quantization of the normalized float intensities and cost a zlib inflate per
example in the training hot path; `bench/convert_bench.py` measures both (size and decode
rate). Users short on disk pass `--compression=gzip` to the converter, which shrinks the
mostly-zero masks and padded borders at a decode cost, still off the accelerator.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

FORMAT_VERSION = 1

# Feature keys. Geometry keys describe how the stored square slice maps back to the
# original slice: original (height, width) -> resized (height, width) by `scale`, then
# padded by (pad_top, pad_left) into the square.
IMAGE = "image/raw_float32"
MASK = "mask/raw_uint8"
HEIGHT = "image/height"
WIDTH = "image/width"
CASE_ID = "case/id"
SLICE_INDEX = "slice/index"
SOURCE = "source/image_path"
ORIGINAL_HEIGHT = "geometry/original_height"
ORIGINAL_WIDTH = "geometry/original_width"
RESIZED_HEIGHT = "geometry/resized_height"
RESIZED_WIDTH = "geometry/resized_width"
PAD_TOP = "geometry/pad_top"
PAD_LEFT = "geometry/pad_left"
SPACING = "geometry/spacing_mm"  # [row, column] pixel spacing in mm of the ORIGINAL slice.
NORM_METHOD = "normalization/method"
NORM_OFFSET = "normalization/offset"
NORM_SCALE = "normalization/scale"

# Names of the split files and the manifest, shared by writer and readers.
MANIFEST_NAME = "dataset.json"
SPLITS = ("train", "val", "test")


def shard_name(split: str, index: int, num_shards: int) -> str:
  """File name of one shard, e.g. `train-00000-of-00004.tfrecord`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(split: str) -> str:
  """Glob matching every shard of `split` (relative to the dataset directory)."""
  return f"{split}-*-of-*.tfrecord"


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How a stored square slice maps back to the original slice."""
  original_height: int
  original_width: int
  resized_height: int
  resized_width: int
  pad_top: int
  pad_left: int


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values: Sequence[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values: Sequence[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def make_example(image: np.ndarray, mask: np.ndarray, *, case_id: str, slice_index: int,
                 source: str, geometry: Geometry, spacing: Sequence[float],
                 norm_method: str, norm_offset: float, norm_scale: float) -> tf.train.Example:
  """Builds one tf.train.Example from a preprocessed slice.

  Args:
    image: [H, W] float array, already normalized and fitted to the square.
    mask: [H, W] integer array of class ids (0 background, 1 disc, 2 vertebra).
    case_id: the subject/volume the slice belongs to (splits are made by case).
    slice_index: index of the slice within its case (0 for a 2D file).
    source: path of the source image file, for tracing a bad example back.
    geometry: how the square maps back to the original slice.
    spacing: [row, column] spacing in mm of the original slice.
    norm_method: name of the normalization applied (see `preprocess.NORMALIZATIONS`).
    norm_offset: offset subtracted from the raw intensities.
    norm_scale: divisor applied after the offset.

  Returns:
    The example; serialize it with `.SerializeToString()`.

  Raises:
    ValueError: if shapes disagree or the mask holds values outside 0..255.
  """
  image = np.asarray(image)
  mask = np.asarray(mask)
  if image.ndim != 2 or image.shape != mask.shape:
    raise ValueError(f"{source}: expected a 2D image and mask of one shape, found image "
                     f"{image.shape} and mask {mask.shape}")
  if mask.size and (mask.min() < 0 or mask.max() > 255):
    raise ValueError(f"{source}: mask values must lie in 0..255, found "
                     f"{mask.min()}..{mask.max()}")
  feature = {
      IMAGE: _bytes(image.astype("<f4").tobytes()),
      MASK: _bytes(mask.astype(np.uint8).tobytes()),
      HEIGHT: _ints([image.shape[0]]),
      WIDTH: _ints([image.shape[1]]),
      CASE_ID: _bytes(case_id.encode("utf-8")),
      SLICE_INDEX: _ints([slice_index]),
      SOURCE: _bytes(source.encode("utf-8")),
      ORIGINAL_HEIGHT: _ints([geometry.original_height]),
      ORIGINAL_WIDTH: _ints([geometry.original_width]),
      RESIZED_HEIGHT: _ints([geometry.resized_height]),
      RESIZED_WIDTH: _ints([geometry.resized_width]),
      PAD_TOP: _ints([geometry.pad_top]),
      PAD_LEFT: _ints([geometry.pad_left]),
      SPACING: _floats(list(spacing)),
      NORM_METHOD: _bytes(norm_method.encode("utf-8")),
      NORM_OFFSET: _floats([norm_offset]),
      NORM_SCALE: _floats([norm_scale]),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature))


_FEATURES = {
    IMAGE: tf.io.FixedLenFeature([], tf.string),
    MASK: tf.io.FixedLenFeature([], tf.string),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    CASE_ID: tf.io.FixedLenFeature([], tf.string),
    SLICE_INDEX: tf.io.FixedLenFeature([], tf.int64),
    SOURCE: tf.io.FixedLenFeature([], tf.string),
    ORIGINAL_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    ORIGINAL_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    RESIZED_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    RESIZED_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    PAD_TOP: tf.io.FixedLenFeature([], tf.int64),
    PAD_LEFT: tf.io.FixedLenFeature([], tf.int64),
    SPACING: tf.io.FixedLenFeature([2], tf.float32),
    NORM_METHOD: tf.io.FixedLenFeature([], tf.string),
    NORM_OFFSET: tf.io.FixedLenFeature([], tf.float32),
    NORM_SCALE: tf.io.FixedLenFeature([], tf.float32),
}


def parse_example(serialized: tf.Tensor, image_size: int | None = None) -> Mapping[str, tf.Tensor]:
  """Parses ONE serialized example (use inside `tf.data.Dataset.map`).

  Args:
    serialized: scalar string tensor.
    image_size: the dataset's square size (from the manifest); when given, the image and
      mask get a static shape, which Keras and XLA need.

  Returns:
    A dict with "image" float32 [H, W, 1], "mask" uint8 [H, W, 1], "case_id" string,
    "slice_index" int64, "source" string, "geometry" int64 [6] ordered as the fields of
    `Geometry`, "spacing" float32 [2], "norm_method" string, "norm_offset" and
    "norm_scale" float32.
  """
  f = tf.io.parse_single_example(serialized, _FEATURES)
  shape = tf.stack([f[HEIGHT], f[WIDTH], tf.constant(1, tf.int64)])
  image = tf.reshape(tf.io.decode_raw(f[IMAGE], tf.float32, little_endian=True), shape)
  mask = tf.reshape(tf.io.decode_raw(f[MASK], tf.uint8), shape)
  if image_size is not None:
    image = tf.ensure_shape(image, [image_size, image_size, 1])
    mask = tf.ensure_shape(mask, [image_size, image_size, 1])
  geometry = tf.stack([f[ORIGINAL_HEIGHT], f[ORIGINAL_WIDTH], f[RESIZED_HEIGHT],
                       f[RESIZED_WIDTH], f[PAD_TOP], f[PAD_LEFT]])
  return {
      "image": image,
      "mask": mask,
      "case_id": f[CASE_ID],
      "slice_index": f[SLICE_INDEX],
      "source": f[SOURCE],
      "geometry": geometry,
      "spacing": f[SPACING],
      "norm_method": f[NORM_METHOD],
      "norm_offset": f[NORM_OFFSET],
      "norm_scale": f[NORM_SCALE],
  }
