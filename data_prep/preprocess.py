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
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from data_prep import schema

NORMALIZATIONS = ("percentile", "zscore", "divide255")
PERCENTILES = (0.5, 99.5)
_EPS = 1e-6


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


def fit_image(image: np.ndarray, geometry: schema.Geometry, size: int,
              pad_value: float) -> np.ndarray:
  """Resizes a normalized 2D image (bilinear) and pads it into a size x size square."""
  resized = resize_bilinear(image, geometry.resized_height, geometry.resized_width)
  out = np.full((size, size), pad_value, dtype=np.float32)
  out[geometry.pad_top:geometry.pad_top + geometry.resized_height,
      geometry.pad_left:geometry.pad_left + geometry.resized_width] = resized
  return out


def fit_mask(mask: np.ndarray, geometry: schema.Geometry, size: int) -> np.ndarray:
  """Resizes a 2D label mask (nearest) and pads it with background into the square."""
  resized = resize_nearest(mask, geometry.resized_height, geometry.resized_width)
  out = np.zeros((size, size), dtype=np.uint8)
  out[geometry.pad_top:geometry.pad_top + geometry.resized_height,
      geometry.pad_left:geometry.pad_left + geometry.resized_width] = resized
  return out


def pad_value(method: str, offset: float, scale: float) -> float:
  """The normalized value of a raw 0 (air), used to pad."""
  return float(apply_normalization(np.zeros(()), method, offset, scale))


# ------------------------------------------------------------------------ TensorFlow

def tf_normalization_params(x: tf.Tensor, method: str, per_image: bool = True):
  """TF twin of `normalization_params`.

  Args:
    x: [N, H, W, 1] tensor of raw intensities (any real or integer dtype).
    method: one of NORMALIZATIONS (a Python string: it selects the graph).
    per_image: statistics per image (2D slices) when True, else over the whole batch
      (the slices of one volume).

  Returns:
    (offset, scale): float32 tensors of shape [N, 1, 1, 1], broadcastable against x.
  """
  x = tf.cast(x, tf.float32)
  n = tf.shape(x)[0]
  flat = tf.reshape(x, [n, -1]) if per_image else tf.reshape(x, [1, -1])
  if method == "percentile":
    values = tf.sort(flat, axis=-1)
    count = tf.cast(tf.shape(values)[-1], tf.float64)

    def pick(q):
      # NumPy's default "linear" percentile: interpolate between the two nearest ranks.
      rank = q / 100.0 * (count - 1.0)
      lo = tf.floor(rank)
      frac = tf.cast(rank - lo, tf.float32)
      lo_i = tf.cast(lo, tf.int32)
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


def tf_fit_geometry(height: tf.Tensor, width: tf.Tensor, size: int) -> dict[str, tf.Tensor]:
  """TF twin of `fit_geometry` for scalar int32 height and width."""
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  scale = size / tf.maximum(h, w)
  # np.round and tf.round both round half to even.
  rh = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, size)
  rw = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, size)
  return {"resized_height": rh, "resized_width": rw,
          "pad_top": (size - rh) // 2, "pad_left": (size - rw) // 2}


def tf_fit_images(images: tf.Tensor, geometry: dict[str, tf.Tensor], size: int,
                  pad_values: tf.Tensor) -> tf.Tensor:
  """TF twin of `fit_image` for a batch [N, H, W, 1] sharing one geometry.

  `pad_values` is [N, 1, 1, 1] (per-image pad value).
  """
  resized = tf.image.resize(images, tf.stack([geometry["resized_height"],
                                              geometry["resized_width"]]),
                            method="bilinear", antialias=False)
  top, left = geometry["pad_top"], geometry["pad_left"]
  bottom = size - geometry["resized_height"] - top
  right = size - geometry["resized_width"] - left
  # Pad with zeros, then add the pad value outside the image: one fused op, any dtype.
  padded = tf.pad(resized - pad_values, [[0, 0], [top, bottom], [left, right], [0, 0]])
  out = padded + pad_values
  return tf.ensure_shape(out, [None, size, size, None])


def tf_unfit(maps: tf.Tensor, geometry: dict[str, tf.Tensor], height: tf.Tensor,
             width: tf.Tensor) -> tf.Tensor:
  """Maps [N, size, size, C] per-class maps back to the original [N, H, W, C] slice.

  Crops the padding, then resizes bilinearly (for probabilities or logits; take the argmax
  afterwards to get labels).
  """
  top, left = geometry["pad_top"], geometry["pad_left"]
  cropped = maps[:, top:top + geometry["resized_height"],
                 left:left + geometry["resized_width"], :]
  return tf.image.resize(cropped, tf.stack([height, width]), method="bilinear",
                         antialias=False)
