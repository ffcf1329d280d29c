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
import re
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

FORMAT_VERSION = 1

# The classes, in id order. Every count, Dice table, colour and manifest label list is
# indexed by these ids.
CLASS_NAMES = ("background", "disc", "vertebra")
NUM_CLASSES = len(CLASS_NAMES)
FOREGROUND = tuple(range(1, NUM_CLASSES))
# Set labels: a mask value v >= SET_LABEL says "one of the classes whose bit is set in
# v - SET_LABEL", for pixels whose class is not known exactly. An unlabelled pixel of a
# slice whose folder annotates only some classes (`spine-convert --annotated_labels`) is
# background OR one of the unannotated classes: `set_label((0, 1))` when only vertebrae
# were outlined. Losses merge the classes of a set (marginal loss) and metrics count no
# class the set leaves open; class ids 0..NUM_CLASSES-1 stay exact labels.
SET_LABEL = 128
# The set of every class: pixels that are not anatomy to be learned or scored (the padding
# around a slice fitted into the square, derived from the stored geometry by
# `parse_example`, and what augmentation moves in from outside the slice). No loss and no
# metric counts them.
IGNORE_LABEL = 255


def set_label(classes: Sequence[int]) -> int:
  """The mask value meaning "one of `classes`" (IGNORE_LABEL when that is every class)."""
  bits = 0
  for c in classes:
    if not 0 <= int(c) < NUM_CLASSES:
      raise ValueError(f"{c} is not a class id 0..{NUM_CLASSES - 1}")
    bits |= 1 << int(c)
  return IGNORE_LABEL if bits == (1 << NUM_CLASSES) - 1 else SET_LABEL + bits


def allowed_classes(mask) -> np.ndarray:
  """bool [..., NUM_CLASSES]: which classes each mask value allows (NumPy).

  An exact label c allows c only; a set label the classes of its bits; IGNORE_LABEL, and
  any value that names no class, every class.
  """
  mask = np.asarray(mask).astype(np.int64)
  full = (1 << NUM_CLASSES) - 1
  bits = np.where(mask >= SET_LABEL, mask - SET_LABEL, np.left_shift(1, np.minimum(mask, 62)))
  bits = np.where((bits & full) == 0, full, bits & full)
  return (bits[..., None] & (1 << np.arange(NUM_CLASSES))) != 0


def tf_allowed_classes(mask):
  """TF twin of `allowed_classes` for an integer tensor."""
  mask = tf.cast(mask, tf.int32)
  full = (1 << NUM_CLASSES) - 1
  bits = tf.where(mask >= SET_LABEL, mask - SET_LABEL,
                  tf.bitwise.left_shift(1, tf.minimum(mask, 30)))
  bits = tf.bitwise.bitwise_and(bits, full)
  bits = tf.where(tf.equal(bits, 0), full, bits)
  return tf.not_equal(
      tf.bitwise.bitwise_and(bits[..., tf.newaxis],
                             tf.bitwise.left_shift(1, tf.range(NUM_CLASSES))), 0)


def unlabelled_value(annotated: Sequence[int]) -> int:
  """Mask value of an unlabelled pixel when the foreground classes `annotated` (plus
  background) were outlined: 0 if every class was, else the set of background and the
  classes that were not."""
  missing = [c for c in FOREGROUND if c not in set(int(a) for a in annotated)]
  return set_label((0,) + tuple(missing)) if missing else 0
# TFRecord compression names as stored in dataset.json -> tf.data compression types.
COMPRESSIONS = {"none": "", "gzip": "GZIP"}


class LabelError(ValueError):
  """A mask holds label values the label map does not account for, or a bad map."""


def labels_dict() -> dict[str, str]:
  """{"0": "background", "1": "disc", "2": "vertebra"}: the manifest's `labels`."""
  return {str(i): name for i, name in enumerate(CLASS_NAMES)}


def compression_type(name: str) -> str:
  """The tf.data compression type of a manifest `compression` value.

  Raises:
    ValueError: for a value this reader does not know.
  """
  if name not in COMPRESSIONS:
    raise ValueError(f"unknown compression {name!r}; expected one of {sorted(COMPRESSIONS)}")
  return COMPRESSIONS[name]


LABEL_MAP_HELP = ("SRC:DST or LO-HI:DST entries separated by commas, e.g. '1-5:1,6-12:2' "
                  "or '0:0,128:1,255:2'; source 0 maps to background unless listed")


def parse_label_map(text: str | None) -> dict[int, int]:
  """Parses a `--label_map` value into {source id: class id} (spine-convert, -evaluate).

  Grammar: comma-separated `SRC:DST` or `LO-HI:DST` with non-negative integers; DST is a
  class id. Source 0 maps to 0 (background) unless listed. An empty text gives {} (mask
  values must then already be class ids).

  Raises:
    LabelError: on a malformed entry, a target that is not a class id, or a source id
      mapped twice; the message names the entry and shows the grammar.
  """
  mapping: dict[int, int] = {}
  if not text or not text.strip():
    return mapping
  for entry in text.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\s*-\s*(\d+))?\s*:\s*(\d+)\s*", entry)
    if not m:
      raise LabelError(f"--label_map entry {entry!r}: expected {LABEL_MAP_HELP}")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    dst = int(m.group(3))
    if hi < lo:
      raise LabelError(f"--label_map entry {entry!r}: range end {hi} is below start {lo}")
    if dst >= NUM_CLASSES:
      raise LabelError(f"--label_map entry {entry!r}: target {dst} is not a class id "
                       f"(expected 0..{NUM_CLASSES - 1}: {', '.join(CLASS_NAMES)})")
    for src in range(lo, hi + 1):
      if src in mapping:
        raise LabelError(f"--label_map maps source id {src} twice")
      mapping[src] = dst
  mapping.setdefault(0, 0)
  return mapping


def apply_label_map(mask, mapping: dict[int, int], source: str):
  """Maps source ids to class ids (uint8); with an empty mapping only checks the ids.

  Raises:
    LabelError: values absent from the map (or, without a map, outside the class ids),
      naming the file and the values.
  """
  mask = np.asarray(mask)
  values = np.unique(mask)
  if not mapping:
    bad = [int(v) for v in values if not 0 <= v < NUM_CLASSES]
    if bad:
      raise LabelError(f"{source}: mask holds values {bad[:8]} outside the class ids "
                       f"0..{NUM_CLASSES - 1}; pass --label_map ({LABEL_MAP_HELP})")
    return mask.astype(np.uint8)
  bad = [int(v) for v in values if int(v) not in mapping]
  if bad:
    raise LabelError(f"{source}: mask values {bad[:8]} are not covered by --label_map "
                     f"(it maps {sorted(mapping)})")
  lut = np.zeros(max(int(values.max()), max(mapping)) + 1, dtype=np.uint8)
  for src, dst in mapping.items():
    lut[src] = dst
  return lut[mask]

# Feature keys. Geometry keys describe how the stored square slice maps back to the
# original slice: original (height, width) -> resized (height, width) by `scale`, then
# padded by (pad_top, pad_left) into the square; a negative pad is a centred crop (a slice
# resampled to `--target_spacing_mm` that is larger than the square).
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
# 0/1 per class id: whether the source folder outlines that class. Unlabelled pixels of a
# slice lacking a foreground class here are read back as the set label of background and
# the missing classes. Absent from older shards: every class annotated.
ANNOTATED = "labels/annotated"
# The labelling protocol the slice's masks follow (`spine-convert --protocol`). Written
# only for a protocol other than DEFAULT_PROTOCOL, so that a default conversion's shards
# keep their bytes; absent (older shards, default conversions): DEFAULT_PROTOCOL.
PROTOCOL = "labels/protocol"

# Labelling protocols. Datasets outline the same class differently (thin or full discs,
# vertebral bodies with or without the sacrum); folders drawn the same way share a
# protocol name, and the trainer gives each protocol its own output head.
DEFAULT_PROTOCOL = "default"
_PROTOCOL_RE = re.compile(r"[a-z0-9_]{1,32}")
# The model's output head of protocol P is the layer `logits_P` (`trainer.unet`); the
# exporter finds the heads by these names without importing the trainer.
HEAD_LAYER_PREFIX = "logits_"
# Values of spine-predict/spine-evaluate --protocol that are no protocol's name: "list"
# prints each model's protocols, "all" is kept for a later mode using every head.
LIST_PROTOCOLS = "list"
RESERVED_PROTOCOLS = (LIST_PROTOCOLS, "all")


def check_protocol(name: str) -> str:
  """Returns `name` if it is a valid protocol name: 1-32 of [a-z0-9_].

  Raises:
    ValueError: naming the value and the expected form.
  """
  if not isinstance(name, str) or not _PROTOCOL_RE.fullmatch(name):
    raise ValueError(f"protocol {name!r}: expected a short name of 1-32 lowercase "
                     "letters, digits or underscores, e.g. 'thin_discs'")
  return name


def head_layer(protocol: str) -> str:
  """The name of the model's output layer for `protocol` (a model with several heads)."""
  return HEAD_LAYER_PREFIX + protocol

# Names of the split files and the manifest, shared by writer and readers.
MANIFEST_NAME = "dataset.json"
# A spine-train model_dir over several folders records each folder's manifest here.
DATASETS_NAME = "datasets.json"
SPLITS = ("train", "val", "test")


def shard_name(split: str, index: int, num_shards: int) -> str:
  """File name of one shard, e.g. `train-00000-of-00004.tfrecord`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(split: str) -> str:
  """Glob matching every shard of `split` (relative to the dataset directory)."""
  return f"{split}-*-of-*.tfrecord"


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How a stored square slice maps back to the original slice.

  The resized slice's pixel (r, c) is the square's (pad_top + r, pad_left + c). Negative
  pads (only with a target spacing) mean the resized slice is larger than the square and
  was centre-cropped: `valid_region` and `preprocess.tf_unfit` handle both signs.
  """
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
                 norm_method: str, norm_offset: float, norm_scale: float,
                 annotated: Sequence[int] = tuple(range(NUM_CLASSES)),
                 protocol: str = DEFAULT_PROTOCOL) -> tf.train.Example:
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
    annotated: the class ids the source folder outlines (background is always implied);
      the others are unknown, not background, on this slice's unlabelled pixels.
    protocol: the labelling protocol the mask follows (`check_protocol`); stored only
      when it is not DEFAULT_PROTOCOL.

  Returns:
    The example; serialize it with `.SerializeToString()`.

  Raises:
    ValueError: if shapes disagree, the mask holds values outside 0..255, or the
      protocol name is malformed.
  """
  check_protocol(protocol)
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
      ANNOTATED: _ints([int(c == 0 or c in set(int(a) for a in annotated))
                        for c in range(NUM_CLASSES)]),
  }
  if protocol != DEFAULT_PROTOCOL:
    feature[PROTOCOL] = _bytes(protocol.encode("utf-8"))
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
    ANNOTATED: tf.io.FixedLenFeature([NUM_CLASSES], tf.int64,
                                     default_value=[1] * NUM_CLASSES),
    PROTOCOL: tf.io.FixedLenFeature([], tf.string, default_value=DEFAULT_PROTOCOL),
}


def parse_example(serialized: tf.Tensor, image_size: int | None = None) -> Mapping[str, tf.Tensor]:
  """Parses ONE serialized example (use inside `tf.data.Dataset.map`).

  Args:
    serialized: scalar string tensor.
    image_size: the dataset's square size (from the manifest); when given, the image and
      mask get a static shape, which Keras and XLA need.

  Returns:
    A dict with "image" float32 [H, W, 1], "mask" uint8 [H, W, 1] (class ids inside the
    slice; on a partially annotated slice the unlabelled pixels hold the set label of
    background and the unannotated classes; IGNORE_LABEL in the padding), "valid" bool
    [H, W, 1] (the slice, not the padding), "annotated" bool [NUM_CLASSES], "protocol"
    string (DEFAULT_PROTOCOL for shards without one), "case_id" string, "slice_index"
    int64, "source" string, "geometry" int64 [6] ordered as the fields of `Geometry`,
    "spacing" float32 [2], "norm_method" string, "norm_offset" and "norm_scale" float32.
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
  valid = valid_region(geometry, tf.shape(image)[0], tf.shape(image)[1])[..., tf.newaxis]
  # Unlabelled pixels of a partially annotated slice are background OR an unannotated
  # class: the set label of those (no loss punishes predicting either).
  annotated = tf.cast(f[ANNOTATED], tf.bool)
  class_bits = tf.bitwise.left_shift(tf.constant(1, tf.int64),
                                     tf.range(NUM_CLASSES, dtype=tf.int64))
  unknown_bits = tf.reduce_sum(tf.where(annotated, tf.zeros_like(class_bits), class_bits))
  # Background (bit 0) plus the unannotated classes, or plain background (0).
  unlabelled = tf.cast(tf.where(unknown_bits > 0, SET_LABEL + 1 + unknown_bits,
                                tf.zeros_like(unknown_bits)), tf.uint8)
  mask = tf.where(tf.equal(mask, 0), unlabelled, mask)
  # Padding is not anatomy: it carries IGNORE_LABEL, which no loss or metric counts.
  mask = tf.where(valid, mask, tf.constant(IGNORE_LABEL, tf.uint8))
  return {
      "image": image,
      "mask": mask,
      "valid": valid,
      "annotated": annotated,
      "protocol": f[PROTOCOL],
      "case_id": f[CASE_ID],
      "slice_index": f[SLICE_INDEX],
      "source": f[SOURCE],
      "geometry": geometry,
      "spacing": f[SPACING],
      "norm_method": f[NORM_METHOD],
      "norm_offset": f[NORM_OFFSET],
      "norm_scale": f[NORM_SCALE],
  }


def geometry_fields(geometry: tf.Tensor) -> dict[str, tf.Tensor]:
  """Names the entries of a parsed int [6] "geometry" tensor after `Geometry`'s fields."""
  geometry = tf.cast(geometry, tf.int32)
  return {f.name: geometry[i] for i, f in enumerate(dataclasses.fields(Geometry))}


def valid_region(geometry: tf.Tensor, height, width) -> tf.Tensor:
  """bool [height, width]: True on the resized slice, False on the padding around it.

  Args:
    geometry: int [6] ordered as the fields of `Geometry`.
    height, width: the stored square's size.
  """
  g = geometry_fields(geometry)
  rh, rw, top, left = g["resized_height"], g["resized_width"], g["pad_top"], g["pad_left"]
  rows = tf.range(height)
  cols = tf.range(width)
  in_rows = (rows >= top) & (rows < top + rh)
  in_cols = (cols >= left) & (cols < left + rw)
  return in_rows[:, tf.newaxis] & in_cols[tf.newaxis, :]
