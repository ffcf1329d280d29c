"""Intensity normalization and aspect-preserving fit to a square, in NumPy and in TensorFlow.

The converter runs the NumPy functions (in worker processes, per case); the exported
SavedModel runs the TensorFlow twins inside its graph, so that a client sends raw pixels.
`tests/test_preprocess.py` holds the two to the same numbers, eagerly and in tf.data.

Every normalization has the form `(x - offset) / scale`, optionally clipped:
  * "percentile": offset = P0.5, scale = P99.5 - P0.5, clipped to [0, 1]. Robust to the
    bright outliers (fat, flow artefacts) that make the max of an MRI meaningless and to
    the scanner-to-scanner intensity scale, which divide-by-255 ignores.
  * "zscore": offset = mean, scale = std, not clipped.
  * "divide255": offset = 0, scale = 255, not clipped (the original research script).
Statistics are computed over one 2D image, or over a whole 3D volume.

Fit: scale the longer side to `size` (bilinear for images, nearest for masks, both with
half-pixel centers and no antialiasing, exactly as `tf.image.resize`), then pad the shorter
side symmetrically (extra pixel at the bottom/right). Padding holds the normalized value of
a raw 0, i.e. air.

Fit at a target spacing (`spine-convert --target_spacing_mm`, nnU-Net's habit): the slice
is resampled from its own [row, column] spacing to `target_spacing` mm per pixel (same
resize as above, sizes rounded to whole pixels), then centred in the square: padded where
it is smaller, CROPPED where it is larger (negative `pad_top` / `pad_left` in the stored
`schema.Geometry`; the extra row or column goes to the top/left crop). Every stored pixel
then covers the same millimetres whatever the scanner's field of view. Sizes are computed
from the spacing rounded to float32 (what the SavedModel's `spacing` input holds), so both
twins round to the same pixel count. The serving graph does not crop: it grows the canvas
to the next multiple of `size` along an axis the resampled slice exceeds
(`grown_canvas`), since a crop would label the cut away anatomy as background, and
segments that canvas as overlapping `size` x `size` tiles, each like a training square
(`export.serving.sliding_window`; one pass over the whole canvas would give the U-Net's
group normalization statistics it never saw in training).
"""
from __future__ import annotations

import fractions
import math

import numpy as np
import tensorflow as tf

from data_prep import schema

NORMALIZATIONS = ("percentile", "zscore", "divide255")
PERCENTILES = (0.5, 99.5)
_EPS = 1e-6
# Longer sides up to which the integer fit (`tf_fit_geometry(..., float64=False)`) is
# proven equal to the float64 one; beyond, an exact tie may round one pixel apart.
FIT_EXACT_LIMIT = 16384


# ----------------------------------------------------------------------------- NumPy

def normalization_params(x: np.ndarray, method: str) -> tuple[float, float]:
  """Returns (offset, scale) of `method` computed over all of `x`.

  Raises:
    ValueError: for an unknown method.
  """
  x = np.asarray(x, dtype=np.float64)
  if method == "percentile":
    low, high = np.percentile(x, PERCENTILES)
    return float(low), float(max(high - low, _EPS))
  if method == "zscore":
    return float(x.mean()), float(max(x.std(), _EPS))
  if method == "divide255":
    return 0.0, 255.0
  raise ValueError(f"unknown normalization {method!r}; expected one of {NORMALIZATIONS}")


def apply_normalization(x: np.ndarray, method: str, offset: float, scale: float) -> np.ndarray:
  """Applies `(x - offset) / scale` (clipped to [0, 1] for "percentile") as float32."""
  y = ((np.asarray(x, dtype=np.float64) - offset) / scale).astype(np.float32)
  if method == "percentile":
    y = np.clip(y, 0.0, 1.0)
  return y


def fit_geometry(height: int, width: int, size: int) -> schema.Geometry:
  """Geometry that fits a (height, width) slice into a size x size square."""
  if height < 1 or width < 1:
    raise ValueError(f"cannot fit an empty slice of shape ({height}, {width})")
  scale = size / max(height, width)
  rh = min(size, max(1, int(round(height * scale))))
  rw = min(size, max(1, int(round(width * scale))))
  return schema.Geometry(height, width, rh, rw, (size - rh) // 2, (size - rw) // 2)


def fit_rounding_exceptions(size: int, limit: int = FIT_EXACT_LIMIT) -> np.ndarray:
  """Where `fit_geometry`'s float64 rounding differs from exact rational rounding.

  `round(side * (size / longer))` in float64 and round-half-even of the exact fraction
  side * size / longer agree except at some exact ties (the fraction is k + 1/2 and the
  two float64 roundings move it off the tie). Only ties can differ, and a tie needs
  2 * side * size to be a multiple of `longer`: at most 2 * size sides per longer side.

  Returns:
    int32 [K, 3]: (side, longer side, float64 result minus exact result) for every
    differing pair with side <= longer side <= `limit`.
  """
  rows = []
  for longer in range(1, limit + 1):
    step = longer // math.gcd(2 * size, longer)  # sides with 2 * side * size % longer == 0
    side = np.arange(step, longer + 1, step, dtype=np.int64)
    twice = 2 * side * size // longer
    side = side[twice % 2 == 1]  # exact ties k + 1/2
    if side.size:
      q = side * size // longer
      exact = q + (q % 2)  # half to even
      float64 = np.round(side * (size / longer)).astype(np.int64)
      for s, d in zip(side[float64 != exact], (float64 - exact)[float64 != exact]):
        rows.append((s, longer, d))
  return np.asarray(rows, dtype=np.int32).reshape(-1, 3)


def float32_spacing(spacing) -> tuple[float, float]:
  """(row, column) spacing in mm as the float32 values the SavedModel receives.

  Raises:
    ValueError: unless two positive finite numbers.
  """
  s = np.asarray(spacing, dtype=np.float64).reshape(-1)
  if s.shape != (2,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
    raise ValueError(f"expected a positive (row, column) spacing in mm, found {spacing}")
  s = s.astype(np.float32)
  return float(s[0]), float(s[1])


def resampled_size(height: int, width: int, spacing, target_spacing: float
                   ) -> tuple[int, int]:
  """Pixel size of a (height, width) slice at `spacing` resampled to `target_spacing`.

  `spacing` None means the slice is already at the target spacing (no resampling).
  """
  if spacing is None:
    return int(height), int(width)
  row, col = float32_spacing(spacing)
  t = float(target_spacing)
  # np.round and tf.round both round half to even; the float64 products are exact twins.
  return (max(1, int(np.round(height * row / t))), max(1, int(np.round(width * col / t))))


def place_geometry(height: int, width: int, resized_height: int, resized_width: int,
                   canvas_height: int, canvas_width: int) -> schema.Geometry:
  """Geometry of a resized slice centred on a canvas (negative pads: a centred crop)."""
  return schema.Geometry(height, width, resized_height, resized_width,
                         (canvas_height - resized_height) // 2,
                         (canvas_width - resized_width) // 2)


def spacing_geometry(height: int, width: int, spacing, target_spacing: float,
                     size: int) -> schema.Geometry:
  """Geometry that resamples a slice to `target_spacing` and centres it in the square.

  Args:
    height, width: the slice's size in pixels.
    spacing: its (row, column) spacing in mm, or None when already at the target.
    target_spacing: mm per stored pixel.
    size: side of the stored square; a larger resampled slice is centre-cropped.
  """
  if height < 1 or width < 1:
    raise ValueError(f"cannot fit an empty slice of shape ({height}, {width})")
  rh, rw = resampled_size(height, width, spacing, target_spacing)
  return place_geometry(height, width, rh, rw, size, size)


def grown_canvas(resized_height: int, resized_width: int, size: int) -> tuple[int, int]:
  """The serving canvas: the square, grown per axis to the next multiple of `size`.

  A multiple of `size` is tiled exactly by the serving graph's sliding window (tile
  origins 0, size / 2, ..., side - size).
  """
  return (size * max(1, -(-int(resized_height) // size)),
          size * max(1, -(-int(resized_width) // size)))


def _source_coords(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Bilinear source indices (lo, hi) and weights along one axis, as tf.image.resize."""
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  lo_f = np.floor(src)
  frac = (src - lo_f).astype(np.float32)
  lo = np.clip(lo_f, 0, in_size - 1).astype(np.int64)
  hi = np.clip(np.ceil(src), 0, in_size - 1).astype(np.int64)
  return lo, hi, frac


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a 2D float array, matching tf.image.resize(antialias=False)."""
  x = np.asarray(x, dtype=np.float32)
  r0, r1, rf = _source_coords(height, x.shape[0])
  c0, c1, cf = _source_coords(width, x.shape[1])
  top = x[r0][:, c0] + (x[r0][:, c1] - x[r0][:, c0]) * cf[None, :]
  bottom = x[r1][:, c0] + (x[r1][:, c1] - x[r1][:, c0]) * cf[None, :]
  return top + (bottom - top) * rf[:, None]


def resize_nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest-neighbour resize of a 2D array, matching tf.image.resize(method="nearest")."""
  x = np.asarray(x)
  rows = np.minimum(np.floor((np.arange(height) + 0.5) * (x.shape[0] / height)),
                    x.shape[0] - 1).astype(np.int64)
  cols = np.minimum(np.floor((np.arange(width) + 0.5) * (x.shape[1] / width)),
                    x.shape[1] - 1).astype(np.int64)
  return x[rows][:, cols]


def _place(resized: np.ndarray, geometry: schema.Geometry, size, fill, dtype) -> np.ndarray:
  """Puts `resized` at (pad_top, pad_left) of a `fill` canvas, cropping what lies outside.

  `size` is the square's side, or a (height, width) canvas.
  """
  ch, cw = (size, size) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
  out = np.full((ch, cw), fill, dtype=dtype)
  top, left = geometry.pad_top, geometry.pad_left
  # The rows/columns of the resized slice that land on the canvas (all, unless cropped).
  r0, r1 = max(0, -top), min(geometry.resized_height, ch - top)
  c0, c1 = max(0, -left), min(geometry.resized_width, cw - left)
  out[top + r0:top + r1, left + c0:left + c1] = resized[r0:r1, c0:c1]
  return out


def fit_image(image: np.ndarray, geometry: schema.Geometry, size,
              pad_value: float) -> np.ndarray:
  """Resizes a normalized 2D image (bilinear) and pads (or crops) it into the square.

  `size`: the square's side, or a (height, width) canvas (`grown_canvas`).
  """
  resized = resize_bilinear(image, geometry.resized_height, geometry.resized_width)
  return _place(resized, geometry, size, pad_value, np.float32)


def fit_mask(mask: np.ndarray, geometry: schema.Geometry, size) -> np.ndarray:
  """Resizes a 2D label mask (nearest) and pads it with background (or crops it)."""
  resized = resize_nearest(mask, geometry.resized_height, geometry.resized_width)
  return _place(resized, geometry, size, 0, np.uint8)


def pad_value(method: str, offset: float, scale: float) -> float:
  """The normalized value of a raw 0 (air), used to pad."""
  return float(apply_normalization(np.zeros(()), method, offset, scale))


# ------------------------------------------------------------------------ TensorFlow

def tf_normalization_params(x: tf.Tensor, method: str, per_image: bool = True, *,
                            float64: bool = True):
  """TF twin of `normalization_params`.

  Args:
    x: [N, H, W, 1] tensor of raw intensities (any real or integer dtype).
    method: one of NORMALIZATIONS (a Python string: it selects the graph).
    per_image: statistics per image (2D slices) when True, else over the whole batch
      (the slices of one volume).
    float64: False builds no float64 op (LiteRT has no float64 kernels): the percentile
      ranks are taken in integer arithmetic (same ranks; the interpolation weight within
      a float32 rounding).

  Returns:
    (offset, scale): float32 tensors of shape [N, 1, 1, 1], broadcastable against x.
  """
  x = tf.cast(x, tf.float32)
  n = tf.shape(x)[0]
  flat = tf.reshape(x, [n, -1]) if per_image else tf.reshape(x, [1, -1])
  if method == "percentile":
    values = tf.sort(flat, axis=-1)
    count = tf.cast(tf.shape(values)[-1], tf.float64 if float64 else tf.float32)

    def pick(q):
      # NumPy's default "linear" percentile: interpolate between the two nearest ranks.
      if float64:
        rank = q / 100.0 * (count - 1.0)
        lo = tf.floor(rank)
        frac = tf.cast(rank - lo, tf.float32)
        lo_i = tf.cast(lo, tf.int32)
      else:  # rank = (count - 1) * num / den exactly; int32 up to 2**31 / den pixels
        ratio = fractions.Fraction(str(q)) / 100
        num = (tf.shape(values)[-1] - 1) * ratio.numerator
        lo_i = num // ratio.denominator
        frac = tf.cast(num % ratio.denominator, tf.float32) / float(ratio.denominator)
      hi_i = tf.minimum(lo_i + 1, tf.cast(count, tf.int32) - 1)
      v_lo = tf.gather(values, lo_i, axis=-1)
      v_hi = tf.gather(values, hi_i, axis=-1)
      return v_lo + (v_hi - v_lo) * frac

    offset = pick(PERCENTILES[0])
    scale = tf.maximum(pick(PERCENTILES[1]) - offset, _EPS)
  elif method == "zscore":
    offset = tf.reduce_mean(flat, axis=-1)
    scale = tf.maximum(tf.math.reduce_std(flat, axis=-1), _EPS)
  elif method == "divide255":
    offset = tf.zeros(tf.shape(flat)[:1])
    scale = tf.fill(tf.shape(flat)[:1], 255.0)
  else:
    raise ValueError(f"unknown normalization {method!r}; expected one of {NORMALIZATIONS}")
  offset = tf.reshape(offset, [-1, 1, 1, 1])
  scale = tf.reshape(scale, [-1, 1, 1, 1])
  if not per_image:
    offset = tf.tile(offset, [n, 1, 1, 1])
    scale = tf.tile(scale, [n, 1, 1, 1])
  return offset, scale


def tf_apply_normalization(x: tf.Tensor, method: str, offset: tf.Tensor,
                           scale: tf.Tensor) -> tf.Tensor:
  """TF twin of `apply_normalization`."""
  y = (tf.cast(x, tf.float32) - offset) / scale
  if method == "percentile":
    y = tf.clip_by_value(y, 0.0, 1.0)
  return y


def tf_fit_geometry(height: tf.Tensor, width: tf.Tensor, size: int, *,
                    float64: bool = True) -> dict[str, tf.Tensor]:
  """TF twin of `fit_geometry` for scalar int32 height and width.

  float64=False builds it in int32 (for LiteRT, which has no float64 kernels): exact
  rational rounding plus the table of `fit_rounding_exceptions`, so equal to `fit_geometry`
  for longer sides up to FIT_EXACT_LIMIT and sides up to 2**31 / size.
  """
  if not float64:
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    longer = tf.maximum(height, width)
    table = tf.constant(fit_rounding_exceptions(size), tf.int32)

    def fitted(side):
      q, r = side * size // longer, side * size % longer
      up = (2 * r > longer) | ((2 * r == longer) & (q % 2 == 1))
      hit = (table[:, 0] == side) & (table[:, 1] == longer)
      fix = tf.reduce_sum(tf.where(hit, table[:, 2], tf.zeros_like(table[:, 2])))
      return tf.clip_by_value(q + tf.cast(up, tf.int32) + fix, 1, size)

    rh, rw = fitted(height), fitted(width)
    return {"resized_height": rh, "resized_width": rw,
            "pad_top": (size - rh) // 2, "pad_left": (size - rw) // 2}
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  scale = size / tf.maximum(h, w)
  # np.round and tf.round both round half to even.
  rh = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, size)
  rw = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, size)
  return {"resized_height": rh, "resized_width": rw,
          "pad_top": (size - rh) // 2, "pad_left": (size - rw) // 2}


def tf_resampled_size(height: tf.Tensor, width: tf.Tensor, spacing: tf.Tensor | None,
                      target_spacing: float) -> tuple[tf.Tensor, tf.Tensor]:
  """TF twin of `resampled_size`: int32 scalars; `spacing` float32 [2] or None."""
  if spacing is None:
    return tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  s = tf.cast(tf.cast(spacing, tf.float32), tf.float64)
  t = tf.constant(float(target_spacing), tf.float64)
  rh = tf.cast(tf.round(tf.cast(height, tf.float64) * s[0] / t), tf.int32)
  rw = tf.cast(tf.round(tf.cast(width, tf.float64) * s[1] / t), tf.int32)
  return tf.maximum(rh, 1), tf.maximum(rw, 1)


def tf_spacing_geometry(height: tf.Tensor, width: tf.Tensor, spacing: tf.Tensor | None,
                        target_spacing: float, size: int,
                        grow: bool = False) -> dict[str, tf.Tensor]:
  """TF twin of `spacing_geometry` (grow=False) or of it on `grown_canvas` (grow=True).

  With grow=True the dict also holds "canvas_height" and "canvas_width", which
  `tf_fit_images` then uses instead of the static square.
  """
  rh, rw = tf_resampled_size(height, width, spacing, target_spacing)
  if grow:
    ch = size * tf.maximum(1, (rh + size - 1) // size)
    cw = size * tf.maximum(1, (rw + size - 1) // size)
  else:
    ch = cw = tf.constant(size, tf.int32)
  geometry = {"resized_height": rh, "resized_width": rw,
              "pad_top": (ch - rh) // 2, "pad_left": (cw - rw) // 2}  # floor, as NumPy
  if grow:
    geometry.update(canvas_height=ch, canvas_width=cw)
  return geometry


def tf_fit_images(images: tf.Tensor, geometry: dict[str, tf.Tensor], size: int,
                  pad_values: tf.Tensor, *, reshape: bool = False) -> tf.Tensor:
  """TF twin of `fit_image` for a batch [N, H, W, 1] sharing one geometry.

  `pad_values` is [N, 1, 1, 1] (per-image pad value). The canvas is size x size, or
  geometry's "canvas_height" x "canvas_width" when present (then not a static shape).
  Negative pads crop, as in `fit_image`. `reshape`: give the canvas its static shape
  (channels included: LiteRT's convolutions need them) with a Reshape instead of
  EnsureShape, which LiteRT lacks.
  """
  rh, rw = geometry["resized_height"], geometry["resized_width"]
  top, left = geometry["pad_top"], geometry["pad_left"]
  ch = geometry.get("canvas_height", size)
  cw = geometry.get("canvas_width", size)
  resized = tf.image.resize(images, tf.stack([rh, rw]), method="bilinear",
                            antialias=False)
  # The part on the canvas: everything, unless the slice is larger (a centred crop).
  r0, r1 = tf.maximum(-top, 0), tf.minimum(rh, ch - top)
  c0, c1 = tf.maximum(-left, 0), tf.minimum(rw, cw - left)
  resized = resized[:, r0:r1, c0:c1, :]
  top, left = top + r0, left + c0
  bottom = ch - (r1 - r0) - top
  right = cw - (c1 - c0) - left
  # Pad with zeros, then add the pad value outside the image: one fused op, any dtype.
  padded = tf.pad(resized - pad_values, [[0, 0], [top, bottom], [left, right], [0, 0]])
  out = padded + pad_values
  if reshape and images.shape[-1] is not None:
    return tf.reshape(out, [-1, ch, cw, images.shape[-1]])
  if "canvas_height" in geometry:
    return out
  return tf.ensure_shape(out, [None, size, size, None])


def tf_unfit(maps: tf.Tensor, geometry: dict[str, tf.Tensor], height: tf.Tensor,
             width: tf.Tensor, fill: tf.Tensor | None = None) -> tf.Tensor:
  """Maps [N, h, w, C] per-class maps on the canvas back to the original [N, H, W, C].

  Crops the padding, then resizes bilinearly (for probabilities or logits; take the argmax
  afterwards to get labels). Where the slice was cropped to fit the square (negative
  pads), the part never seen by the model gets `fill` ([C], e.g. background probability
  1; zeros when None) before the resize.
  """
  rh, rw = geometry["resized_height"], geometry["resized_width"]
  top, left = geometry["pad_top"], geometry["pad_left"]
  h, w = tf.shape(maps)[1], tf.shape(maps)[2]
  # Extend the maps over the cropped-away border (zero-sized unless there was a crop).
  extend = [[0, 0], [tf.maximum(-top, 0), tf.maximum(top + rh - h, 0)],
            [tf.maximum(-left, 0), tf.maximum(left + rw - w, 0)], [0, 0]]
  extended = tf.pad(maps, extend)
  if fill is not None:
    outside = 1.0 - tf.pad(tf.ones_like(maps[..., :1]), extend)
    extended = extended + outside * tf.cast(fill, maps.dtype)  # + 0 on the canvas: exact
  top, left = top + extend[1][0], left + extend[2][0]
  cropped = extended[:, top:top + rh, left:left + rw, :]
  return tf.image.resize(cropped, tf.stack([height, width]), method="bilinear",
                         antialias=False)
