"""The serving graph: a tf.Module around the trained Keras model, preprocessing in-graph.

A client sends raw pixels; the graph runs the training preprocessing (the TF twins in
`data_prep.preprocess`: normalization, aspect-preserving resize and pad to the square
`image_size`), the model, a float32 softmax, and maps the probabilities back to the
client's geometry. The normalization method, `image_size` and `target_spacing_mm` are read
from the model directory's `dataset.json` at export time and baked in as constants, so the
SavedModel needs no project code and no custom objects to load.

Physical scale. A model converted with `--target_spacing_mm=T` saw T mm per pixel. The
`*_spacing` signatures take the [row, column] mm per pixel of the slices they receive and
resample them to T first (`preprocess.tf_spacing_geometry`); a resampled slice larger
than the square is not cropped but gets a larger canvas (the next multiple of
`image_size` per axis), so every pixel gets a label. Such a canvas is segmented with a
sliding window (`sliding_window`): overlapping `image_size` tiles at half-tile strides,
each run exactly like a training square, their probabilities blended with Gaussian
weights highest in the tile centre. Not in one pass over the canvas: the U-Net's group
normalization takes statistics over its whole input, and training only saw squares
(issue 19: one pass on a 351 mm field of view lost the vertebrae). A canvas that is the
square is a single tile: the same one model call as without the window. Every other
pixel signature assumes its pixels are ALREADY at T mm (no resampling, the same canvas
rule, the same window). For a model without a target spacing, slices are fitted into the
square by their longer side, as the converter did, and a spacing input is ignored. The
SavedModel's `target_spacing_mm` variable holds T (0: none).

Protocols. A model trained with one output head per labelling protocol
(`spine-convert --protocol`) is exported with every head. The signatures below segment
with the DEFAULT protocol (`export(protocol=...)`, or a one-head model's only one), each
exactly as a model of that head alone would. A model of several heads also gets, for
each signature S below, a twin `S_protocol` (e.g. `serving_default_protocol`) taking one
more input, `protocol` string [] (a name of the metadata's "protocols"), which picks the
head in the graph: the body runs once, the chosen head's channels are gathered from all
heads' logits, then the softmax; an unknown name fails the call with an error listing the
names. Twins rather than an optional input because a TF Serving signature has no
optional inputs: a client either always sends a protocol or never does. A one-head
model has no twins: its SavedModel is what it was before protocols existed.

Signatures (inputs -> outputs):
  serving_default   images float32 [N,H,W,1] (any H, W; one size per call), statistics
                    per image -> probabilities float32 [N,H,W,3], mask uint8 [N,H,W].
  segment_spacing   images float32 [N,H,W,1], spacing float32 [2] (row, column mm per
                    pixel, shared by the batch) -> as serving_default.
  segment_uint8     same, for uint8 pixels (a gRPC client sending 8-bit images).
  segment_uint16    same, for uint16 pixels (16-bit PNG/DICOM-like intensities).
  segment_volume    images float32 [S,H,W,1], the sagittal slices of ONE volume;
                    normalization statistics over the whole volume, as the converter does
                    for NIfTI -> same outputs. The model runs in chunks of VOLUME_CHUNK
                    squares (slices, or sliding-window tiles of a grown canvas).
  segment_volume_spacing  images float32 [S,H,W,1], spacing float32 [2] (the in-plane
                    spacing of the display-order slices) -> as segment_volume.
  segment_png       png string [N] of 1-channel (grayscale) 8- or 16-bit PNGs, sizes may
                    differ -> probabilities [N,Hmax,Wmax,3], mask [N,Hmax,Wmax] (zero-padded
                    at the bottom/right beyond each image), height/width int32 [N].
  segment_examples  serialized tf.Examples of `data_prep.schema` [N] -> probabilities
                    [N,S,S,3] and mask [N,S,S] in the stored square geometry;
                    original_mask [N,Hmax,Wmax] uint8 at each slice's original geometry
                    (zero-padded; rows/columns a target-spacing crop cut away: 0), original_height/original_width int32 [N]; case_id
                    string [N], slice_index int64 [N].
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Sequence
import zipfile
import zlib

import keras
import numpy as np
import tensorflow as tf

from data_prep import fileio
from data_prep import manifest as manifest_lib
from data_prep import preprocess
from data_prep import schema
from export import stable_norm

# Slices per model call inside `segment_volume`: bounds memory for long volumes.
VOLUME_CHUNK = 16
MODEL_FILE = "best.keras"
# Written next to the SavedModel (TF Serving ignores assets.extra): what was exported.
METADATA_FILE = "assets.extra/spineseg.json"
SIGNATURES = ("serving_default", "segment_spacing", "segment_uint8", "segment_uint16",
              "segment_volume", "segment_volume_spacing", "segment_png", "segment_examples")
# The twin of signature S that takes a `protocol` input (a model of several heads).
PROTOCOL_SUFFIX = "_protocol"
PROTOCOL_SPEC = tf.TensorSpec([], tf.string, name="protocol")
_IMAGES = tf.TensorSpec([None, None, None, 1], tf.float32, name="images")
_SPACING = tf.TensorSpec([2], tf.float32, name="spacing")


def _signature(*specs: tf.TensorSpec) -> Any:
  """The tf.function decorator of a serving signature taking `specs`.

  AutoGraph off: the graphs hold no Python control flow on tensors (tf.where, tf.map_fn
  and Python values only; a tensor in an `if` fails the export loudly), and converting
  every traced function cost a quarter of an export of the default U-Net
  (bench/export_bench.py).
  """
  return tf.function(input_signature=list(specs), autograph=False)


def tile_weights(size: int) -> np.ndarray:
  """float32 [size]: the blending weight of a tile row or column (sliding window).

  A Gaussian of sigma size / 8 centred on the tile (nnU-Net's choice): highest in the
  centre, where the model saw the most context, about 3e-4 of that at an edge, never 0,
  so every canvas pixel has a positive summed weight. A tile pixel weighs the product of
  its row's and its column's weight.
  """
  axis = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  return np.exp(-0.5 * (axis / (size / 8.0)) ** 2).astype(np.float32)


def _axis_tiles(extent: tf.Tensor, size: int) -> dict[str, tf.Tensor]:
  """Tiles along one canvas axis of `extent` (a multiple of `size`) and their blend.

  Tiles start at k * size / 2, k = 0 .. 2 extent / size - 2. Canvas position e lies in
  tile j = e // (size / 2) (its first half) and in tile j - 1 (its second half), where
  those exist; a missing one is replaced by an existing tile with share 0, so every
  position reads exactly two tiles and no tensor is empty (ONNX Runtime reads a 0 in a
  Reshape's shape as "copy the input's size", which breaks on empty tiles).

  Returns:
    {"gather": int32 [count * size], the canvas positions of the tiles' pixels, tile by
    tile; "first"/"second": int32 [extent], where position e is in the tiles' pixels
    (index into count * size); "first_share"/"second_share": float32 [extent], their
    weights over the summed weight (1 and 0 where one tile covers e)}.
  """
  half = size // 2
  count = 2 * (extent // size) - 1
  gather = tf.reshape(tf.range(count)[:, None] * half + tf.range(size)[None], [-1])
  e = tf.range(extent)
  j = e // half
  # The tile of whose first half e is part (j), and the one of whose second half (j - 1).
  has_first, has_second = j < count, j >= 1
  first_tile, second_tile = tf.minimum(j, count - 1), tf.maximum(j - 1, 0)
  first_offset = tf.where(has_first, e % half, e - first_tile * half)
  second_offset = tf.where(has_second, e % half + half, e - second_tile * half)
  weights = tf.constant(tile_weights(size))
  w1 = tf.gather(weights, first_offset) * tf.cast(has_first, tf.float32)
  w2 = tf.gather(weights, second_offset) * tf.cast(has_second, tf.float32)
  total = w1 + w2  # w + 0 == w exactly: a lone tile's share is w / w == 1
  return {"gather": gather, "first": first_tile * size + first_offset,
          "second": second_tile * size + second_offset,
          "first_share": w1 / total, "second_share": w2 / total}


def sliding_window(probabilities: Any, canvas: tf.Tensor, size: int) -> tf.Tensor:
  """Segments a grown canvas as overlapping training squares (nnU-Net's sliding window).

  Tiles of size x size start at 0, size / 2, size, ... per axis, the last one ending at
  the canvas edge; their probabilities are blended with weights `tile_weights` (row) x
  `tile_weights` (column), normalized per pixel by the summed weights. Why not one pass
  over the canvas: the U-Net normalizes groups over its whole input and training only
  saw size x size squares; on a larger canvas the statistics and context differ and a
  class can vanish (issue 19: vertebra Dice 0.03 on a 351 mm field of view, 0.86 on its
  centre 281 mm). Gathers, reshapes and a rank-4 transpose only: ONNX and LiteRT convert
  them (no extract_patches, no scatter).

  A canvas of one tile is exact: the gathers copy it, its shares are 1 and 0 (p * 1 +
  p * 0 == p), so the result is `probabilities(canvas)` bit for bit.

  Args:
    probabilities: the model on training squares, [T, size, size, 1] -> [T, size, size,
      C] float32; called once, on every tile of the batch.
    canvas: [N, H, W, 1], H and W multiples of `size` (`preprocess.grown_canvas`).
    size: the training square's side, even.

  Returns:
    float32 [N, H, W, C], the blended probabilities.
  """
  n = tf.shape(canvas)[0]
  rows, cols = (_axis_tiles(tf.shape(canvas)[axis], size) for axis in (1, 2))
  strips = tf.gather(tf.gather(canvas, rows["gather"], axis=1), cols["gather"], axis=2)
  # [N, R*size, C*size, 1] -> [N*R*C, size, size, 1], tile (r, c) of image n at n, r, c.
  r, c = tf.shape(strips)[1] // size, tf.shape(strips)[2] // size
  tiles = tf.transpose(tf.reshape(strips, [n * r, size, c, size]), [0, 2, 1, 3])
  probs = probabilities(tf.reshape(tiles, [n * r * c, size, size, 1]))
  classes = probs.shape[-1]
  probs = tf.transpose(tf.reshape(probs, [n * r, c, size, size * classes]), [0, 2, 1, 3])
  probs = tf.reshape(probs, [n, r * size, c * size, classes])

  def blend(x, tiles_axis, axis):
    """Each position's two tiles along `axis` (1: rows, 2: columns), weighted."""
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    return (tf.gather(x, tiles_axis["first"], axis=axis)
            * tf.reshape(tiles_axis["first_share"], shape)
            + tf.gather(x, tiles_axis["second"], axis=axis)
            * tf.reshape(tiles_axis["second_share"], shape))

  return blend(blend(probs, cols, 2), rows, 1)


def _pad_to(x: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """Zero-pads [h, w, ...] at the bottom/right to [height, width, ...]."""
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  rank = len(x.shape)
  paddings = [[0, height - h], [0, width - w]] + [[0, 0]] * (rank - 2)
  return tf.pad(x, paddings)


class SegmentationModule(tf.Module):
  """Keras segmentation model plus its preprocessing, with serving signatures."""

  def __init__(self, model: keras.Model, *, image_size: int, norm_method: str,
               num_classes: int = 3, target_spacing_mm: float | None = None,
               float64: bool = True, protocols: Sequence[str] = (),
               protocol: str | None = None, drawn: Sequence[Sequence[int]] = ()):
    """Wraps `model` (float logits [N,S,S,num_classes] from [N,S,S,1]).

    `target_spacing_mm`: mm per pixel the model was trained at (dataset.json), or None
    (slices fitted by their longer side). `float64=False` builds graphs without float64
    ops, for LiteRT (export/portable.py): float32 group statistics summed in stages,
    integer geometry and percentile ranks; only `serve_float32` is meant for it.
    `protocols`: with two or more, `model` has one head per protocol (layers
    `schema.head_layer(name)`, logits [N,S,S,P*num_classes] in this order) and
    `protocol`, one of them, is the default the plain signatures segment with; the
    `_protocol` twins pick any. Fewer: `model` is a one-head model, no twins.
    `drawn`: per head (in `protocols` order; one entry for a one-head model) the class ids
    its training folders annotate (`drawn_classes`); a class a head never saw annotated
    is folded into background (`_fold`). Empty: every head draws every class.

    Raises:
      ValueError: for an unknown normalization method, a bad image size or spacing (a
        target spacing needs an even image size: the sliding window's stride is half),
        or a `protocol` not among two or more `protocols`.
    """
    super().__init__(name="spineseg")
    if norm_method not in preprocess.NORMALIZATIONS:
      raise ValueError(f"unknown normalization {norm_method!r}; expected one of "
                       f"{preprocess.NORMALIZATIONS}")
    if int(image_size) < 1:
      raise ValueError(f"image_size must be positive, found {image_size}")
    # Exact group statistics on big canvases, in TF and in converted graphs alike.
    stable = stable_norm.with_stable_statistics(model, float64=float64)
    self._protocols = tuple(protocols) if len(protocols) > 1 else ()
    if self._protocols:
      if protocol not in self._protocols:
        raise ValueError(f"default protocol {protocol!r}: expected one of the model's "
                         f"protocols {', '.join(self._protocols)}")
      self.all_heads = stable  # the twins' model: every head's logits, one body
      # The default's head on the same body and weights: the plain signatures compute
      # exactly what a model of that head alone computes.
      head = stable.get_layer(schema.head_layer(protocol)).output
      stable = keras.Model(stable.input, head, name=f"{stable.name}_{protocol}")
    self.model = stable
    self._keep = _kept_classes(drawn, int(num_classes))
    self._default_head = self._protocols.index(protocol) if self._protocols else 0
    self._float64 = bool(float64)
    self._size = int(image_size)
    self._method = norm_method
    self._classes = int(num_classes)
    self._target = None if target_spacing_mm is None else float(target_spacing_mm)
    if self._target is not None and not 0 < self._target < float("inf"):
      raise ValueError(f"target_spacing_mm must be a positive number, found "
                       f"{target_spacing_mm}")
    if self._target is not None and self._size % 2:
      # The sliding window steps half a square (a U-Net's square is even anyway).
      raise ValueError(f"a model with a target spacing needs an even image_size, found "
                       f"{image_size}")
    # Restored with the SavedModel, so a loader knows T even without assets.extra.
    self.target_spacing_mm = tf.Variable(self._target or 0.0, dtype=tf.float64,
                                         trainable=False, name="target_spacing_mm")

  # --------------------------------------------------------------- building blocks

  def _head_index(self, protocol: tf.Tensor) -> tf.Tensor:
    """int32 [] position of `protocol` (string []) among the heads; fails the call
    (InvalidArgumentError, listing the names) for a name the model has no head for."""
    found = tf.equal(tf.constant(self._protocols), protocol)
    check = tf.debugging.Assert(tf.reduce_any(found), [
        f"unknown protocol: expected one of {', '.join(self._protocols)}; found",
        protocol])
    with tf.control_dependencies([check]):
      return tf.argmax(tf.cast(found, tf.int32), output_type=tf.int32)

  def _probabilities_square(self, squares: tf.Tensor,
                            head: tf.Tensor | None = None) -> tf.Tensor:
    """Softmax [N,S,S,C] of the model on `squares`. `head`: the index of the protocol
    head to use (`_head_index`); None: the default protocol's."""
    if head is None:
      logits = self.model(squares, training=False)
    else:
      channels = head * self._classes + tf.range(self._classes)
      logits = tf.gather(self.all_heads(squares, training=False), channels, axis=-1)
    # A mixed-precision model may return float16 logits; the contract is float32 out.
    return self._fold(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1), head)

  def _fold(self, probs: tf.Tensor, head: tf.Tensor | None) -> tf.Tensor:
    """Moves the probability of classes `head` never saw annotated into background.

    A head trained only on folders that outline some classes (vertebral bodies only:
    `--annotated_labels=2`) learned those against "everything else": its loss was
    marginal over the rest (background OR disc), so how it splits "everything else"
    among background and the unannotated classes is arbitrary (measured: a vertebral-body
    head called 96% of a volume disc). Such a head answers only for what its protocol
    draws. A head that saw every class is untouched (p * 1 + 0: exact).
    """
    if self._keep is None:
      return probs
    keep = tf.constant(self._keep)[self._default_head if head is None else head]
    others = tf.reduce_sum(probs * (1.0 - keep), axis=-1, keepdims=True)
    return probs * keep + others * tf.one_hot(0, self._classes, dtype=tf.float32)

  def _probabilities_chunked(self, squares: tf.Tensor,
                             head: tf.Tensor | None = None) -> tf.Tensor:
    n = tf.shape(squares)[0]
    h, w = tf.shape(squares)[1], tf.shape(squares)[2]  # the square, or window tiles
    k = VOLUME_CHUNK
    padded = tf.pad(squares, [[0, (n + k - 1) // k * k - n], [0, 0], [0, 0], [0, 0]])
    chunks = tf.reshape(padded, [-1, k, h, w, 1])
    probs = tf.map_fn(
        functools.partial(self._probabilities_square, head=head), chunks,
        fn_output_signature=tf.TensorSpec([k, None, None, self._classes], tf.float32))
    return tf.reshape(probs, [-1, h, w, self._classes])[:n]

  def _probabilities(self, canvas: tf.Tensor, chunked: bool,
                     head: tf.Tensor | None = None) -> tf.Tensor:
    """Probabilities [N,h,w,C] of a preprocessed canvas; `chunked`: VOLUME_CHUNK squares
    per model call (`segment_volume`), else one call for all; `head`: as
    `_probabilities_square`."""
    run = functools.partial(
        self._probabilities_chunked if chunked else self._probabilities_square, head=head)
    if self._target is None:  # the canvas is always the square
      return run(canvas)
    # A grown canvas is segmented tile-wise; the square alone is one tile, unchanged.
    return sliding_window(run, canvas, self._size)

  def preprocess(self, images: tf.Tensor, per_image: bool = True,
                 spacing: tf.Tensor | None = None):
    """Raw [N,H,W,1] pixels -> (canvas [N,h,w,1] float32, geometry dict).

    The canvas is the S x S square, except for a model with a target spacing whose
    resampled slice exceeds it (a multiple of S per axis, segmented by `sliding_window`;
    see the module docstring). `spacing` (float32 [2]) is
    used only by such a model; None means the pixels are already at its target spacing.
    """
    x = tf.cast(images, tf.float32)
    offset, scale = preprocess.tf_normalization_params(x, self._method, per_image,
                                                       float64=self._float64)
    normalized = preprocess.tf_apply_normalization(x, self._method, offset, scale)
    # Padding holds the normalized value of a raw 0 (air), as in the converter.
    pad = preprocess.tf_apply_normalization(tf.zeros_like(offset), self._method, offset,
                                            scale)
    if self._target is None:
      geometry = preprocess.tf_fit_geometry(tf.shape(x)[1], tf.shape(x)[2], self._size,
                                            float64=self._float64)
    else:
      if spacing is not None:
        spacing = tf.convert_to_tensor(spacing, tf.float32)
        tf.debugging.assert_all_finite(spacing, "spacing must be finite (mm per pixel)")
        tf.debugging.assert_positive(
            spacing, message="spacing must hold two positive mm values (row, column)")
      geometry = preprocess.tf_spacing_geometry(tf.shape(x)[1], tf.shape(x)[2], spacing,
                                                self._target, self._size, grow=True)
    return preprocess.tf_fit_images(normalized, geometry, self._size, pad,
                                    reshape=not self._float64), geometry

  def _segment(self, images: tf.Tensor, per_image: bool = True,
               chunked: bool = False, spacing: tf.Tensor | None = None,
               head: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    canvas, geometry = self.preprocess(images, per_image, spacing)
    probs_square = self._probabilities(canvas, chunked, head)
    # Bilinear resampling of probabilities keeps them summing to one (convex weights).
    probs = preprocess.tf_unfit(probs_square, geometry, tf.shape(images)[1],
                                tf.shape(images)[2])
    return {"probabilities": probs, "mask": tf.cast(tf.argmax(probs, axis=-1), tf.uint8)}

  def _decode_png(self, png: tf.Tensor) -> tf.Tensor:
    # Decode as 16 bit, then undo libpng's 8->16 bit expansion (v * 257) for 8-bit files,
    # so 8-bit PNGs give the same numbers as the converter's reader (matters for
    # "divide255"). The bit depth is byte 24 of every PNG (first chunk IHDR).
    depth = tf.io.decode_raw(tf.strings.substr(png, 24, 1), tf.uint8)[0]
    image = tf.io.decode_png(png, channels=0, dtype=tf.uint16)
    tf.debugging.assert_equal(
        tf.shape(image)[-1], 1,
        message="segment_png expects 1-channel grayscale PNGs; found another channel count")
    image = tf.cast(image, tf.float32)
    return tf.where(depth <= 8, tf.round(image / 257.0), image)

  # --------------------------------------------------------------------- signatures

  @_signature(_IMAGES)
  def serve_float32(self, images):
    """Raw slices, no spacing: taken to be at the model's target spacing (no resampling;
    for a model without one, fitted by the longer side). Old clients keep working."""
    return self._segment(images)

  @_signature(_IMAGES, _SPACING)
  def segment_spacing(self, images, spacing):
    """Raw slices of [row, column] `spacing` mm per pixel, resampled to the target."""
    return self._segment(images, spacing=spacing)

  @_signature(tf.TensorSpec([None, None, None, 1], tf.uint8, name="images"))
  def serve_uint8(self, images):
    return self._segment(images)

  @_signature(tf.TensorSpec([None, None, None, 1], tf.uint16, name="images"))
  def serve_uint16(self, images):
    return self._segment(images)

  @_signature(_IMAGES)
  def segment_volume(self, images):
    return self._segment(images, per_image=False, chunked=True)

  @_signature(_IMAGES, _SPACING)
  def segment_volume_spacing(self, images, spacing):
    return self._segment(images, per_image=False, chunked=True, spacing=spacing)

  @_signature(tf.TensorSpec([None], tf.string, name="png"))
  def segment_png(self, png):
    return self._segment_png(png)

  @_signature(tf.TensorSpec([None], tf.string, name="examples"))
  def segment_examples(self, examples):
    return self._segment_examples(examples)

  def _segment_png(self, png: tf.Tensor,
                   head: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    def header_int(offset):
      raw = tf.strings.substr(png, offset, 4)
      return tf.reshape(tf.io.decode_raw(raw, tf.int32, little_endian=False), [-1])

    # Every PNG starts with IHDR: width at byte 16, height at 20 (big-endian).
    widths, heights = header_int(16), header_int(20)
    max_h, max_w = tf.reduce_max(heights), tf.reduce_max(widths)

    def one(encoded):
      out = self._segment(self._decode_png(encoded)[None], head=head)
      return {"probabilities": _pad_to(out["probabilities"][0], max_h, max_w),
              "mask": _pad_to(out["mask"][0], max_h, max_w)}

    out = tf.map_fn(one, png, fn_output_signature={
        "probabilities": tf.TensorSpec([None, None, self._classes], tf.float32),
        "mask": tf.TensorSpec([None, None], tf.uint8)})
    out.update(height=heights, width=widths)
    return out

  def _segment_examples(self, examples: tf.Tensor,
                        head: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    def parse(serialized):
      f = schema.parse_example(serialized, self._size)
      return (f["image"], tf.cast(f["geometry"], tf.int32), f["norm_method"],
              f["case_id"], f["slice_index"])

    images, geometry, methods, case_ids, slice_index = tf.map_fn(
        parse, examples, fn_output_signature=(
            tf.TensorSpec([self._size, self._size, 1], tf.float32),
            tf.TensorSpec([6], tf.int32), tf.TensorSpec([], tf.string),
            tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)))
    # Examples normalized another way would be silently mis-segmented: refuse them.
    tf.debugging.assert_equal(
        methods, tf.fill(tf.shape(methods), self._method),
        message=f"segment_examples: examples are not normalized with {self._method!r}")
    probs = self._probabilities_square(images, head)
    max_h, max_w = tf.reduce_max(geometry[:, 0]), tf.reduce_max(geometry[:, 1])

    # What a converter crop (target spacing) cut away was never seen: background.
    background = tf.one_hot(0, self._classes, dtype=tf.float32)

    def unfit(args):
      p, g = args
      geo = schema.geometry_fields(g)
      original = preprocess.tf_unfit(p[None], geo, geo["original_height"],
                                     geo["original_width"], fill=background)[0]
      return _pad_to(tf.cast(tf.argmax(original, axis=-1), tf.uint8), max_h, max_w)

    original_mask = tf.map_fn(unfit, (probs, geometry),
                              fn_output_signature=tf.TensorSpec([None, None], tf.uint8))
    return {"probabilities": probs, "mask": tf.cast(tf.argmax(probs, axis=-1), tf.uint8),
            "original_mask": original_mask, "original_height": geometry[:, 0],
            "original_width": geometry[:, 1], "case_id": case_ids,
            "slice_index": slice_index}

  def _signature_functions(self) -> dict[str, tuple[Any, Any]]:
    """Signature name -> (its tf.function, the same segmentation with a `head` argument
    (`_probabilities_square`), for its `_protocol` twin)."""
    seg = self._segment
    return {
        "serving_default": (self.serve_float32, lambda images, head: seg(
            images, head=head)),
        "segment_spacing": (self.segment_spacing, lambda images, spacing, head: seg(
            images, spacing=spacing, head=head)),
        "segment_uint8": (self.serve_uint8, lambda images, head: seg(images, head=head)),
        "segment_uint16": (self.serve_uint16, lambda images, head: seg(
            images, head=head)),
        "segment_volume": (self.segment_volume, lambda images, head: seg(
            images, per_image=False, chunked=True, head=head)),
        "segment_volume_spacing": (
            self.segment_volume_spacing, lambda images, spacing, head: seg(
                images, per_image=False, chunked=True, spacing=spacing, head=head)),
        "segment_png": (self.segment_png, self._segment_png),
        "segment_examples": (self.segment_examples, self._segment_examples),
    }

  def _twin(self, function: Any, body: Any) -> Any:
    """The concrete `_protocol` twin of tf.function `function`: its inputs plus
    `protocol`, segmented by `body(*inputs, head=...)` with that protocol's head."""
    @_signature(*function.input_signature, PROTOCOL_SPEC)
    def twin(*args):
      *inputs, protocol = args
      return body(*inputs, head=self._head_index(protocol))
    return twin.get_concrete_function()

  def signature_names(self) -> list[str]:
    """The names of `signatures()`: SIGNATURES, then their twins for several heads."""
    twins = [name + PROTOCOL_SUFFIX for name in SIGNATURES] if self._protocols else []
    return list(SIGNATURES) + twins

  def signatures(self) -> dict[str, Any]:
    """Concrete functions keyed by signature name, for `tf.saved_model.save`."""
    functions = self._signature_functions()
    out = {name: functions[name][0].get_concrete_function() for name in SIGNATURES}
    if self._protocols:
      out.update({name + PROTOCOL_SUFFIX: self._twin(*functions[name])
                  for name in SIGNATURES})
    return out


# ------------------------------------------------------------------------ export

class ExportError(OSError):
  """Writing the SavedModel failed; the message names the export folder and the reason."""

  def __str__(self) -> str:
    return str(self.args[0])


def _check_keras_archive(model_path: pathlib.Path) -> None:
  """Refuses a truncated or corrupt `.keras` zip with its real cause.

  Keras reports any unreadable archive as "File not found", which sends users looking for
  a file that is there; zipfile names what is wrong (no end of archive, a bad CRC, ...).

  Raises:
    ValueError: the archive is unreadable, naming the file.
  """
  hint = "; retrain or restore it"
  try:
    with zipfile.ZipFile(fileio.source(model_path)) as archive:
      bad = archive.testzip()  # reads every member: catches a cut inside the weights
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise ValueError(f"{model_path}: unreadable Keras model (truncated or corrupt: "
                     f"{reason}){hint}") from e
  if bad is not None:
    raise ValueError(f"{model_path}: unreadable Keras model (truncated or corrupt: member "
                     f"{bad} fails its CRC check){hint}")


def _kept_classes(drawn: Sequence[Sequence[int]], num_classes: int) -> np.ndarray | None:
  """float32 [heads, C]: 1 where a head draws a class, else 0; None when all draw all."""
  if not drawn:
    return None
  keep = np.zeros((len(drawn), num_classes), np.float32)
  for row, classes in zip(keep, drawn):
    row[[0, *classes]] = 1.0  # background is always drawn
  return None if keep.all() else keep


def drawn_classes(model_dir: str | os.PathLike, manifest: manifest_lib.Manifest,
                  names: Sequence[str]) -> list[list[int]]:
  """The class ids each protocol of `names` was trained on with labels, in that order.

  Per protocol, the union of `annotated_labels` over the run's folders of that protocol
  (`datasets.json` of a run over several folders, else the run's `dataset.json`): the
  default protocol of a run over fully and partially labelled folders draws every class.

  Raises:
    ValueError: `datasets.json` is unreadable or not a spine-train record.
  """
  record = fileio.path(model_dir) / schema.DATASETS_NAME
  manifests = [manifest]
  if record.is_file():
    try:
      entries = json.loads(record.read_text(encoding="utf-8"))["datasets"]
      manifests = [manifest_lib.Manifest(str(record), e["manifest"]) for e in entries]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{record}: unreadable spine-train record of the run's folders "
                       f"({type(e).__name__}: {e})") from e
  drawn = []
  for name in names:
    # A one-head model's folders all share its protocol; `or` keeps old records working.
    mine = [m for m in manifests if m.protocol == name] or manifests
    drawn.append(sorted(set().union(*(m.annotated_labels for m in mine))))
  return drawn


def model_protocols(model: keras.Model, manifest: manifest_lib.Manifest) -> list[str]:
  """The labelling protocols `model` has an output head for, in head order (sorted).

  A model trained on several protocols has one `schema.head_layer` per protocol; a
  one-head model follows the protocol of its dataset manifest.
  """
  prefix = schema.HEAD_LAYER_PREFIX
  heads = sorted(layer.name[len(prefix):] for layer in model.layers
                 if layer.name.startswith(prefix))
  return heads or [manifest.protocol]


def default_protocol(names: Sequence[str], protocol: str | None,
                     where: str = "the model") -> str:
  """Checks `protocol` (--protocol) against the model's protocol `names`: the default.

  Args:
    names: `model_protocols` of the model.
    protocol: the name asked for; None: the model's only one.
    where: names the model in errors (its model_dir).

  Returns:
    The protocol: `protocol`, or the only name.

  Raises:
    ValueError: no `protocol` for a model of several, or one it has no head for; the
      message lists the names it has.
  """
  if protocol is None:
    if len(names) > 1:
      raise ValueError(f"{where} has one head per labelling protocol "
                       f"({', '.join(names)}); pass --protocol=NAME to name the default one")
    return names[0]
  if protocol not in names:
    raise ValueError(f"--protocol={protocol}: {where} has no head for it; its "
                     f"protocol{'s are' if len(names) > 1 else ' is'} {', '.join(names)}")
  return protocol


def protocol_head(model: keras.Model, manifest: manifest_lib.Manifest,
                  protocol: str | None = None, where: str = "the model"
                  ) -> tuple[keras.Model, str]:
  """The model of one protocol's head: input image [N,H,W,1] -> logits [N,H,W,C].

  A one-head model is returned as it is; of a model with several heads, the head of
  `protocol` on the shared body (same weights, nothing copied).

  Args:
    model: the trained Keras model.
    manifest: its dataset manifest (the protocol of a one-head model).
    protocol: the protocol to keep; None: the model's only one.
    where: names the model in errors (its model_dir).

  Returns:
    (the model, the protocol name).

  Raises:
    ValueError: as `default_protocol`.
  """
  names = model_protocols(model, manifest)
  protocol = default_protocol(names, protocol, where)
  if len(names) == 1:
    return model, protocol
  head = model.get_layer(schema.head_layer(protocol)).output
  return keras.Model(model.input, head, name=f"{model.name}_{protocol}"), protocol


def load_model_dir(model_dir: str | os.PathLike, protocol: str | None = None
                   ) -> tuple[keras.Model, manifest_lib.Manifest]:
  """Loads `best.keras` and the dataset manifest of a trained model directory.

  Args:
    model_dir: a spine-train output directory.
    protocol: with a model of several protocol heads, the one to keep (`protocol_head`);
      None: the model's only one.

  Returns:
    (the model of that protocol's head, the manifest).

  Raises:
    FileNotFoundError: the directory, its model or its dataset.json is missing.
    ValueError: the manifest is invalid, the model file is truncated, corrupt or not
      loadable, or `protocol` does not pick one head (`protocol_head`).
  """
  model, manifest = _load_full_model(model_dir)
  return protocol_head(model, manifest, protocol, str(model_dir))[0], manifest


def _load_full_model(
    model_dir: str | os.PathLike) -> tuple[keras.Model, manifest_lib.Manifest]:
  """`load_model_dir` with every head of the model."""
  model_dir = fileio.path(model_dir)
  if not model_dir.is_dir():
    raise FileNotFoundError(f"{model_dir}: no such model directory")
  model_path = model_dir / MODEL_FILE
  if not model_path.is_file():
    raise FileNotFoundError(f"{model_path}: missing; expected a spine-train output "
                            f"directory holding {MODEL_FILE} and {schema.MANIFEST_NAME}")
  if not manifest_lib.path_of(model_dir).is_file():
    raise FileNotFoundError(f"{manifest_lib.path_of(model_dir)}: missing; the model "
                            "directory must hold a copy of the dataset manifest")
  manifest = manifest_lib.load(model_dir)
  _check_keras_archive(model_path)
  try:
    with fileio.local_copy(model_path) as local:  # Keras opens local .keras files only
      model = keras.models.load_model(local, compile=False)
  except Exception as e:  # Keras raises many types (unknown layer, bad config, ...).
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(f"{model_path}: cannot load the Keras model: {type(e).__name__}: "
                     f"{first_line}") from e
  return model, manifest


def _replace_dir(tmp: pathlib.Path, export_dir: pathlib.Path) -> None:
  """Moves `tmp` to `export_dir`, replacing what is there; the old one is kept on failure."""
  old = None
  if export_dir.exists() or export_dir.is_symlink():
    old = export_dir.with_name(f".{export_dir.name}.old-{os.getpid()}")
    fileio.rename(export_dir, old)
  try:
    fileio.rename(tmp, export_dir)
  except BaseException:
    if old is not None:
      fileio.rename(old, export_dir)
    raise
  if old is not None:
    if old.is_dir() and not old.is_symlink():
      fileio.remove_tree(old)
    else:
      old.unlink(missing_ok=True)


def export(model_dir: str | os.PathLike, export_dir: str | os.PathLike, *,
           overwrite: bool = False, protocol: str | None = None) -> pathlib.Path:
  """Exports the model of `model_dir` as a SavedModel in `export_dir` (a version folder).

  The SavedModel is written to a temporary sibling folder, made readable by others (0755
  folders, 0644 files: TF Serving often runs as another account) and renamed into place,
  so a failed export leaves nothing behind and an existing version stays intact.

  Args:
    model_dir: a trained model directory (best.keras + dataset.json).
    export_dir: the target, e.g. `models/spineseg/1` (TF Serving's version layout).
    overwrite: replace an existing non-empty `export_dir`.
    protocol: the default labelling protocol, the one the plain signatures segment
      with, for a model trained with one head per protocol (required there; every head
      is exported, the `_protocol` twins pick any); None: the model's only one. The
      metadata records it ("protocol"), every protocol the model has in head order
      ("protocols") and the signatures with their twins ("signatures").

  Returns:
    The export directory.

  Raises:
    FileExistsError: `export_dir` exists, is not empty, and `overwrite` is False.
    FileNotFoundError, ValueError: see `load_model_dir` (a missing or unknown
      `protocol` included).
    ExportError: the SavedModel cannot be written (read-only or full disk, a file in the
      way, ...), naming `export_dir` and the reason.
  """
  export_dir = fileio.path(export_dir)
  if export_dir.exists() and (not export_dir.is_dir() or any(export_dir.iterdir())):
    if not overwrite:
      raise FileExistsError(f"{export_dir}: exists and is not empty; pass --overwrite "
                            "to replace it")
  model, manifest = _load_full_model(model_dir)
  names = model_protocols(model, manifest)
  protocol = default_protocol(names, protocol, str(model_dir))
  drawn = drawn_classes(model_dir, manifest, names)
  module = SegmentationModule(model, image_size=manifest.image_size,
                              norm_method=manifest.norm_method,
                              num_classes=manifest.num_classes,
                              target_spacing_mm=manifest.target_spacing_mm,
                              protocols=names, protocol=protocol,
                              drawn=drawn)
  tmp = None
  try:
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fileio.make_temp_dir(export_dir.parent, f".{export_dir.name}.tmp-")
    tf.saved_model.save(module, str(tmp), signatures=module.signatures())
    metadata = {"model_dir": str(fileio.path(model_dir).resolve()),
                "image_size": manifest.image_size,
                "normalization": manifest.normalization,
                "target_spacing_mm": manifest.target_spacing_mm,
                "num_classes": manifest.num_classes, "labels": manifest.labels,
                "volume_chunk": VOLUME_CHUNK, "signatures": module.signature_names(),
                "protocol": protocol, "protocols": names,
                "drawn_classes": dict(zip(names, drawn)),
                "tensorflow_version": tf.__version__}
    (tmp / "assets.extra").mkdir(exist_ok=True)
    fileio.write_json_atomic(tmp / METADATA_FILE, metadata)
    fileio.make_readable(tmp)  # mkdtemp made it 0700: unreadable to a serving account
    _replace_dir(tmp, export_dir)
  except (OSError, tf.errors.OpError) as e:
    if tmp is not None:
      fileio.remove_tree(tmp)
    # TF's file system layer raises OpErrors (e.g. ResourceExhausted) instead of OSError.
    if isinstance(e, OSError):
      reason = e.strerror or str(e)
    else:
      reason = (e.message.strip().splitlines() or [type(e).__name__])[0]
    raise ExportError(f"{export_dir}: cannot write the SavedModel: {reason}") from e
  except BaseException:
    if tmp is not None:
      fileio.remove_tree(tmp)
    raise
  return export_dir
