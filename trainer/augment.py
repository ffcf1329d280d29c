"""Joint augmentation of one slice and its mask, with stateless (seeded) randomness.

Geometry (rotation, isotropic scale, translation) is ONE affine matrix applied to both the
image (bilinear) and the mask (nearest), so labels stay on the anatomy they came from;
an optional smooth elastic field (off by default) is likewise shared by both, and so is
an optional field-of-view cut (off by default; on in the multi-scanner recipe): a band on
one side of the labelled extent becomes padding, as at the border of a scan.
Intensity changes (gamma, contrast/brightness, bias field, noise) touch the image only, as
do the scanner/sequence changes, all off by default (`random_appearance`: per-region
contrast remapping, Gaussian blur, low resolution), which let a model trained on one
sequence (T2) hold up on others (T1, inversion recovery) and on other scanners.

Every random draw is `tf.random.stateless_*` from a [2] int seed, so a given seed yields
the same result eagerly and inside `tf.data` (tests hold the two to it), and the input
pipeline feeds an independent seed per batch from `tf.data.Dataset.random`.
The work is done on whole batches (`augment_batch`, per-sample random parameters): one
op over B slices instead of B small ops. The pixel work (warp by flat gathers, the fused
intensity chain) is XLA-compiled; the random draws are not (XLA's CPU samplers are
slow). `augment_in_train_step` moves the whole thing into Keras' train step, so on an
accelerator the input pipeline only reads and batches (see bench/pipeline_bench.py).
Layout: images float32 [B, H, W, 1], masks integer [B, H, W, 1]; `augment` wraps one
example.
"""
from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from data_prep import schema


def _range(default, help_text: str):
  """An AugmentConfig field: its default and what it means, which is also the --help of
  its spine-train flag (`trainer.config` makes one TrainConfig setting per field)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges of the random transforms; a probability of 0 switches one off."""
  max_rotation_deg: float = _range(15.0, "Largest rotation, in degrees.")
  scale_range: float = _range(
      0.15, "Zoom drawn log-uniformly in [1 - r, 1 + r] (0 <= r < 1).")
  max_translation: float = _range(0.08, "Largest shift, as a fraction of the side.")
  geometric_prob: float = _range(0.8, "Share of slices rotated, zoomed and shifted.")
  elastic_alpha: float = _range(
      10.0, "Largest displacement of the elastic field, in pixels of the stored squares.")
  elastic_grid: int = _range(6, "Control points per side of the elastic field (>= 2).")
  elastic_prob: float = _range(
      0.0, "Share of training slices also deformed by a smooth random elastic field "
      "(same field for image and mask); 0: off.")
  gamma_min: float = _range(0.7, "Smallest intensity gamma (> 0).")
  gamma_max: float = _range(1.5, "Largest intensity gamma.")
  gamma_prob: float = _range(0.3, "Share of slices gamma-changed.")
  contrast_min: float = _range(0.75, "Smallest contrast factor.")
  contrast_max: float = _range(1.25, "Largest contrast factor.")
  brightness: float = _range(0.1, "Largest brightness shift, in units of the image's std.")
  contrast_prob: float = _range(0.5, "Share of slices with contrast/brightness changed.")
  bias_field_strength: float = _range(
      0.3, "Log-amplitude of the smooth multiplicative bias field.")
  bias_field_prob: float = _range(0.3, "Share of slices given a bias field.")
  noise_std: float = _range(0.05, "Largest Gaussian noise std, in units of the image's std.")
  noise_prob: float = _range(0.3, "Share of slices given noise.")
  # Scanner/sequence changes (`random_appearance`), off by default.
  remap_prob: float = _range(
      0.0, "Share of slices whose background, discs and vertebrae each get their own "
      "random linear intensity map (slope in [-1, 1]: contrast may invert, as T2 vs "
      "T1/inversion recovery), edges blended, mean/std kept; 0: off.")
  blur_prob: float = _range(0.0, "Share of slices Gaussian-blurred (resolution loss); 0: off.")
  blur_max_sigma: float = _range(
      1.5, "Largest sigma of that blur, in pixels (drawn in [0, max]).")
  lowres_prob: float = _range(
      0.0, "Share of slices downsampled (area) and upsampled back (bilinear): a coarser "
      "scanner resolution; 0: off.")
  lowres_max_factor: float = _range(
      3.0, "Largest down/upsampling factor, drawn in [1, max] per axis (>= 1).")
  cut_prob: float = _range(
      0.0, "Share of slices whose field of view is cut short on one random side: a band "
      "of the labelled extent becomes padding (`cut_field_of_view`), so that anatomy "
      "may end at the edge of a scan, as in a volume whose lowest disc sits on its "
      "border; 0: off.")
  cut_max: float = _range(
      0.3, "Largest share of the slice's labelled extent (along the cut's axis) that a cut "
      "removes (0 <= r < 1; 0: off).")


# `remap_regions`: offsets b_k are drawn in [-REMAP_MAX_OFFSET, REMAP_MAX_OFFSET] (units of
# the image's std), and region boundaries are smoothed by a Gaussian of REMAP_EDGE_SIGMA
# pixels so the remapping paints no artificial edges along the label outlines.
REMAP_MAX_OFFSET = 1.0
REMAP_EDGE_SIGMA = 1.0


def affine_transforms(size: tf.Tensor, angle: tf.Tensor, scale: tf.Tensor,
                      shift: tf.Tensor) -> tf.Tensor:
  """Output->input projective transforms of rotations/scales about the centre + shifts.

  Args:
    size: float32 [2] (height, width) of the images.
    angle: [B] rotations in radians.
    scale: [B] zoom factors (> 1 enlarges the content).
    shift: [B, 2] (dy, dx) translations of the content in pixels.

  Returns:
    float32 [B, 8] as expected by `ImageProjectiveTransformV3` (maps OUTPUT pixel (x, y)
    to the INPUT pixel it samples).
  """
  cy = (size[0] - 1.0) / 2.0
  cx = (size[1] - 1.0) / 2.0
  cos = tf.cos(angle) / scale
  sin = tf.sin(angle) / scale
  # in = c + R(-angle) / scale * (out - c - shift)
  ox = cx + shift[:, 1]
  oy = cy + shift[:, 0]
  a0, a1, b0, b1 = cos, sin, -sin, cos
  a2 = cx - a0 * ox - a1 * oy
  b2 = cy - b0 * ox - b1 * oy
  zero = tf.zeros_like(a0)
  return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)


def _sample(images: tf.Tensor, masks: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor,
            fill: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
  """Samples images (bilinear) and masks (nearest) at float pixel coordinates [B, H, W].

  One flat gather per neighbour instead of `ImageProjectiveTransformV3`: plain ops that
  XLA compiles (on CPU, 2-3x faster than that op) and that run inside a compiled train
  step on an accelerator. `fill`: [B, 1, 1] value of image pixels whose neighbour lies
  outside the source (masks take `schema.IGNORE_LABEL` there); None clamps coordinates to
  the edge instead.
  """
  shape = tf.shape(images)
  batch, height, width = shape[0], shape[1], shape[2]
  base = (tf.range(batch) * height * width)[:, None, None]
  flat_images = tf.reshape(images, [-1])
  flat_masks = tf.reshape(masks, [-1])

  def at(flat, r, c, outside):
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    index = base + tf.clip_by_value(r, 0, height - 1) * width + tf.clip_by_value(c, 0, width - 1)
    values = tf.gather(flat, index)
    return values if fill is None else tf.where(inside, values, outside)

  r0 = tf.floor(rows)
  c0 = tf.floor(cols)
  fr = rows - r0
  fc = cols - c0
  r0 = tf.cast(r0, tf.int32)
  c0 = tf.cast(c0, tf.int32)
  top = at(flat_images, r0, c0, fill) * (1 - fc) + at(flat_images, r0, c0 + 1, fill) * fc
  bottom = (at(flat_images, r0 + 1, c0, fill) * (1 - fc) +
            at(flat_images, r0 + 1, c0 + 1, fill) * fc)
  out_images = (top * (1 - fr) + bottom * fr)[..., tf.newaxis]
  # Nearest: round half away from zero, as ImageProjectiveTransformV3 did.
  nearest = lambda x: tf.cast(tf.sign(x) * tf.floor(tf.abs(x) + 0.5), tf.int32)
  # What moves in from outside the slice is not anatomy: no loss or metric counts it.
  out_masks = at(flat_masks, nearest(rows), nearest(cols),
                 tf.constant(schema.IGNORE_LABEL, masks.dtype))
  return (tf.ensure_shape(out_images, images.shape),
          tf.ensure_shape(out_masks[..., tf.newaxis], masks.shape))


def warp(images: tf.Tensor, masks: tf.Tensor,
         transforms: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Applies [B, 8] transforms to images (bilinear) and masks (nearest), per sample.

  Same coordinates for both (one matrix per sample). Outside the source each image takes
  its own minimum (the padding/air value of every normalization) and the mask
  `schema.IGNORE_LABEL` (not anatomy: no loss counts it).
  """
  size = tf.shape(images)[1:3]
  x = tf.cast(tf.range(size[1]), tf.float32)[None, None, :]
  y = tf.cast(tf.range(size[0]), tf.float32)[None, :, None]
  t = transforms[:, :, tf.newaxis, tf.newaxis]
  cols = t[:, 0] * x + t[:, 1] * y + t[:, 2]
  rows = t[:, 3] * x + t[:, 4] * y + t[:, 5]
  low = tf.reduce_min(images, axis=[1, 2, 3])[:, None, None]
  return _sample(images, masks, rows, cols, fill=low)


def _uniform(seed, shape, low=0.0, high=1.0):
  return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _per_sample(x):
  """[B] -> [B, 1, 1, 1], to broadcast over images."""
  return x[:, tf.newaxis, tf.newaxis, tf.newaxis]


def _select(apply, new, old):
  return tf.where(_per_sample(apply), new, old)


@tf.function(jit_compile=True)
def _warp_where(images, masks, transforms, apply):
  # XLA: the gathers and the blend in one compiled kernel (~10x the ops one by one).
  warped_images, warped_masks = warp(images, masks, transforms)
  return _select(apply, warped_images, images), _select(apply, warped_masks, masks)


@tf.function(jit_compile=True)
def _elastic_where(images, masks, coarse, alpha, apply):
  """Upsamples [B, g, g, 2] coarse offsets bicubically (as two small matmuls: XLA has no
  bicubic resize), scales them by alpha pixels and samples image and mask there."""
  size = tf.shape(images)[1:3]
  grid = coarse.shape[1]
  offsets = tf.einsum("hk,bklc,wl->bhwc", _cubic_matrix(size[0], grid), coarse,
                      _cubic_matrix(size[1], grid)) * alpha
  rows = tf.cast(tf.range(size[0]), tf.float32)[None, :, None] + offsets[..., 0]
  cols = tf.cast(tf.range(size[1]), tf.float32)[None, None, :] + offsets[..., 1]
  warped_images, warped_masks = _sample(images, masks, rows, cols, fill=None)
  return _select(apply, warped_images, images), _select(apply, warped_masks, masks)


def cut_field_of_view(images: tf.Tensor, masks: tf.Tensor, side: tf.Tensor,
                      share: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Cuts each slice's field of view short on one side.

  The extent is the bounding box of the pixels that are not `schema.IGNORE_LABEL` (the
  slice without its padding). On `side` (0 top, 1 bottom, 2 left, 3 right) the rows or
  columns within `share` of that extent from its edge become padding: the image takes
  its own minimum (the padding value, as `warp`), the mask `schema.IGNORE_LABEL` (no loss
  there). A slice with nothing but padding is returned unchanged.

  Args:
    images: float32 [B, H, W, 1].
    masks: integer [B, H, W, 1].
    side: int32 [B].
    share: float32 [B], in [0, 1).

  Returns:
    (images, masks) of the same shapes and dtypes.
  """
  valid = tf.not_equal(masks[..., 0], tf.cast(schema.IGNORE_LABEL, masks.dtype))
  shape = tf.shape(masks)

  def extent(axis):  # first and last index holding a valid pixel, per sample
    index = tf.range(shape[axis], dtype=tf.float32)[tf.newaxis]
    any_valid = tf.reduce_any(valid, axis=3 - axis)  # [B, size]
    first = tf.reduce_min(tf.where(any_valid, index, 1e9), axis=1)
    last = tf.reduce_max(tf.where(any_valid, index, -1e9), axis=1)
    return first, last

  top, bottom = extent(1)
  left, right = extent(2)
  rows = tf.range(shape[1], dtype=tf.float32)[tf.newaxis, :, tf.newaxis]
  cols = tf.range(shape[2], dtype=tf.float32)[tf.newaxis, tf.newaxis, :]
  per = lambda x: x[:, tf.newaxis, tf.newaxis]
  height = per(bottom - top + 1) * per(share)
  width = per(right - left + 1) * per(share)
  side = per(side)
  cut = ((tf.equal(side, 0) & (rows < per(top) + height)) |
         (tf.equal(side, 1) & (rows > per(bottom) - height)) |
         (tf.equal(side, 2) & (cols < per(left) + width)) |
         (tf.equal(side, 3) & (cols > per(right) - width)))
  cut = (cut & per(tf.reduce_any(valid, axis=[1, 2])))[..., tf.newaxis]
  low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
  ignore = tf.cast(schema.IGNORE_LABEL, masks.dtype)
  return tf.where(cut, low, images), tf.where(cut, ignore, masks)


def random_cut(images, masks, seed, config: AugmentConfig):
  """`cut_field_of_view` on a share `cut_prob` of the samples: a side drawn uniformly,
  a share of the extent in [0, cut_max]."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(_portable_seed(seed), 3))
  batch = tf.shape(images)[:1]
  side = tf.cast(tf.minimum(_portable_uniform(seeds[0], batch, 0.0, 4.0), 3.0), tf.int32)
  share = _portable_uniform(seeds[1], batch, 0.0, config.cut_max)
  share = tf.where(_portable_uniform(seeds[2], batch) < config.cut_prob, share, 0.0)
  return cut_field_of_view(images, masks, side, share)


def random_geometry(images, masks, seed, config: AugmentConfig):
  """Random rotation/scale/translation per sample (same matrix for image and mask)."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  batch = tf.shape(images)[:1]
  size = tf.cast(tf.shape(images)[1:3], tf.float32)
  max_angle = config.max_rotation_deg * math.pi / 180.0
  angle = _uniform(seeds[0], batch, -max_angle, max_angle)
  log_r = math.log1p(config.scale_range)
  scale = tf.exp(_uniform(seeds[1], batch, -log_r, log_r))
  shift = _uniform(seeds[2], tf.concat([batch, [2]], 0), -config.max_translation,
                   config.max_translation) * size
  apply = _uniform(seeds[3], batch) < config.geometric_prob
  return _warp_where(images, masks, affine_transforms(size, angle, scale, shift), apply)


def random_elastic(images, masks, seed, config: AugmentConfig):
  """Smooth random displacement per sample (image bilinear, mask nearest, same field)."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  batch = tf.shape(images)[:1]
  grid = config.elastic_grid
  coarse = _uniform(seeds[0], tf.concat([batch, [grid, grid, 2]], 0), -1.0, 1.0)
  apply = _uniform(seeds[1], batch) < config.elastic_prob
  return _elastic_where(images, masks, coarse, tf.constant(config.elastic_alpha, tf.float32),
                        apply)


def _source_positions(size, coarse: int) -> tf.Tensor:
  """Grid coordinates of `size` output pixels upsampled from `coarse` (half-pixel centres)."""
  return (tf.cast(tf.range(size), tf.float32) + 0.5) * (coarse / tf.cast(size, tf.float32)) - 0.5


def _cubic_matrix(size, coarse: int):
  """[size, coarse] weights of `tf.image.resize` bicubic (Keys a = -0.5, half-pixel
  centres; taps outside the grid dropped and the rest renormalized) along one axis."""
  src = _source_positions(size, coarse)
  base = tf.floor(src)
  weights, total = 0.0, 0.0
  for tap in (-1.0, 0.0, 1.0, 2.0):
    index = base + tap
    t = tf.abs(src - index)
    w = tf.where(t <= 1, (1.5 * t - 2.5) * t * t + 1,
                 tf.where(t < 2, ((-0.5 * t + 2.5) * t - 4) * t + 2, 0.0))
    w = tf.where((index >= 0) & (index <= coarse - 1), w, 0.0)
    total += w
    clamped = tf.cast(tf.clip_by_value(index, 0, coarse - 1), tf.int32)
    weights += tf.one_hot(clamped, coarse) * w[:, None]
  return weights / total[:, None]


def _bilinear_matrix(size, coarse: int):
  """[size, coarse] weights of `tf.image.resize` bilinear (half-pixel centres) along one axis."""
  src = tf.clip_by_value(_source_positions(size, coarse), 0.0, coarse - 1.0)
  low = tf.floor(src)
  frac = (src - low)[:, None]
  low = tf.cast(low, tf.int32)
  high = tf.minimum(low + 1, coarse - 1)
  return tf.one_hot(low, coarse) * (1 - frac) + tf.one_hot(high, coarse) * frac


@tf.function(jit_compile=True)
def _intensity(images, p, noise):
  """The elementwise part of `random_intensity`, fused by XLA into a few passes."""
  axes = [1, 2, 3]
  lo = tf.reduce_min(images, axis=axes, keepdims=True)
  span = tf.maximum(tf.reduce_max(images, axis=axes, keepdims=True) - lo, 1e-6)
  std = tf.maximum(tf.math.reduce_std(images, axis=axes, keepdims=True), 1e-6)
  # Gamma acts on [0, 1]; map there and back so any normalization works. x ** gamma as
  # exp(gamma log x): exact at x = 0 too (log 0 = -inf, gamma > 0, exp(-inf) = 0).
  gamma = _per_sample(p["gamma"])
  out = _select(p["gamma_on"],
                lo + span * tf.exp(gamma * tf.math.log((images - lo) / span)), images)
  mean = tf.reduce_mean(out, axis=axes, keepdims=True)
  shift = _per_sample(p["shift"]) * std
  out = _select(p["contrast_on"], (out - mean) * _per_sample(p["contrast"]) + mean + shift,
                out)
  # Bias field: the coarse grid upsampled bilinearly as two small matmuls (XLA's own
  # resize is slow on CPU), then exp.
  shape = tf.shape(images)
  field = tf.einsum("hk,bkl,wl->bhw", _bilinear_matrix(shape[1], p["coarse"].shape[1]),
                    p["coarse"], _bilinear_matrix(shape[2], p["coarse"].shape[2]))
  field = tf.exp(p["strength"] * field)[..., tf.newaxis]
  out = _select(p["bias_on"], lo + (out - lo) * field, out)
  return out + noise * _per_sample(p["sigma"]) * std


def _normal_where(apply, shape, seed, static_shapes):
  """Standard normal noise for the samples where `apply`, zeros elsewhere.

  Drawn only for those samples (a third of a batch by default): normal draws are the
  most expensive part of the intensity changes. With static_shapes (inside an
  XLA-compiled step, where shapes cannot depend on data) it is drawn for all samples.
  """
  if static_shapes:
    return tf.random.stateless_normal(shape, seed=seed)
  index = tf.where(apply)
  count = tf.shape(index, out_type=tf.int32)[:1]
  noise = tf.random.stateless_normal(tf.concat([count, shape[1:]], 0), seed=seed)
  return tf.scatter_nd(index, noise, tf.cast(shape, tf.int64))


def random_intensity(images, seed, config: AugmentConfig, static_shapes: bool = False):
  """Random gamma, contrast/brightness, bias field and noise, per sample, images only.

  Contrast shift and noise std are in units of each image's std; the bias field is a
  smooth multiplicative field around the air level (MRI coil inhomogeneity): a 4x4
  random grid upsampled bilinearly, exponentiated.
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 10))
  batch = tf.shape(images)[:1]

  def draw(i, low=0.0, high=1.0):
    return _uniform(seeds[i], batch, low, high)

  noise_on = draw(9) < config.noise_prob
  params = {
      "gamma": tf.exp(draw(0, math.log(config.gamma_min), math.log(config.gamma_max))),
      "gamma_on": draw(1) < config.gamma_prob,
      "contrast": draw(2, config.contrast_min, config.contrast_max),
      "shift": draw(3, -config.brightness, config.brightness),
      "contrast_on": draw(4) < config.contrast_prob,
      "coarse": _uniform(seeds[5], tf.concat([batch, [4, 4]], 0), -1.0, 1.0),
      "strength": tf.constant(config.bias_field_strength, tf.float32),
      "bias_on": draw(6) < config.bias_field_prob,
      "sigma": draw(7, 0.0, config.noise_std) * tf.cast(noise_on, tf.float32),
  }
  noise = _normal_where(noise_on, tf.shape(images), seeds[8], static_shapes)
  return _intensity(images, params, noise)


def _portable_seed(seed):
  """The low 31 bits of each seed element, as int64.

  XLA's samplers turn negative seed elements into other keys than TF's (TF and XLA agree
  on non-negative int32-range seeds), and seeds from `tf.data.Dataset.random` are often
  negative.
  """
  return tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), tf.constant(0x7FFFFFFF, tf.int64))


def _portable_uniform(seed, shape, low=0.0, high=1.0):
  """Uniform in [low, high), the same numbers eagerly, in tf.data and under XLA.

  XLA's float samplers give other numbers than TF's for one seed, its integer samplers
  the same ones (for a `_portable_seed`): so draw 32 random bits and keep the top 24
  (exact in float32).
  """
  bits = tf.random.stateless_uniform(shape, seed=_portable_seed(seed), minval=None, maxval=None,
                                     dtype=tf.uint32)
  unit = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))
  return low + (high - low) * unit


def _gaussian_taps(sigma: tf.Tensor, radius: int) -> tf.Tensor:
  """[B, 2 radius + 1] normalized sampled Gaussians exp(-t^2 / 2 sigma^2), t = -r..r.

  sigma 0 gives the identity (sigma is floored at 1e-3: every tap but the centre is 0).
  """
  t = tf.range(-radius, radius + 1, dtype=tf.float32)[tf.newaxis]
  sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-3)[:, tf.newaxis]
  taps = tf.exp(-0.5 * tf.square(t / sigma))
  return taps / tf.reduce_sum(taps, axis=1, keepdims=True)


def _convolve_axis(x: tf.Tensor, taps: tf.Tensor, axis: int) -> tf.Tensor:
  """Correlates [B, H, W, C] with symmetric taps ([T] shared or [B, T] per sample) along
  axis 1 or 2, edges replicated (scipy.ndimage mode 'nearest'). Shifted gathers, not a
  convolution op: per-sample kernels, any radius, and XLA fuses the sum into one pass."""
  size = tf.shape(x)[axis]
  count = taps.shape[-1]
  radius = (count - 1) // 2
  out = 0.0
  for t in range(count):
    index = tf.clip_by_value(tf.range(size) + (t - radius), 0, size - 1)
    weight = taps[t] if taps.shape.rank == 1 else _per_sample(taps[:, t])
    out += weight * tf.gather(x, index, axis=axis)
  return out


def remap_regions(images: tf.Tensor, masks: tf.Tensor, scale: tf.Tensor,
                  offset: tf.Tensor) -> tf.Tensor:
  """Maps the intensities of each labelled region through its own affine function.

  Per sample, with x the image, mu and s its mean and std (s floored at 1e-6):

    z = (x - mu) / s
    R_k = 1 where the mask's class is k (k = 0..NUM_CLASSES-1), else 0; set labels
          (>= schema.SET_LABEL) and schema.IGNORE_LABEL count as background (k = 0)
    w_k = G * R_k, G a Gaussian of REMAP_EDGE_SIGMA px (radius 3 sigma, edges
          replicated); sum_k w_k = 1 everywhere
    y = sum_k w_k (scale_k z + offset_k)
    x' = mu + s (y - mean(y)) / max(std(y), 1e-6)

  So pixels farther than 3 REMAP_EDGE_SIGMA px from another region go through one affine
  map of x per region (a negative scale inverts that region's contrast: discs are bright
  in T2, dark in T1), boundaries blend smoothly, and the image keeps its mean and std.

  Args:
    images: float32 [B, H, W, 1].
    masks: integer [B, H, W, 1] mask values (only read).
    scale: [B, NUM_CLASSES] slopes a_k.
    offset: [B, NUM_CLASSES] offsets b_k, in units of the image's std.

  Returns:
    float32 [B, H, W, 1].
  """
  axes = [1, 2, 3]
  mean = tf.reduce_mean(images, axis=axes, keepdims=True)
  std = tf.maximum(tf.math.reduce_std(images, axis=axes, keepdims=True), 1e-6)
  labels = tf.cast(masks[..., 0], tf.int32)
  labels = tf.where(labels < schema.NUM_CLASSES, labels, 0)
  regions = tf.one_hot(labels, schema.NUM_CLASSES)  # [B, H, W, K]
  taps = _gaussian_taps(tf.constant([REMAP_EDGE_SIGMA]),
                        math.ceil(3 * REMAP_EDGE_SIGMA))[0]
  weights = _convolve_axis(_convolve_axis(regions, taps, 1), taps, 2)
  slope = tf.reduce_sum(weights * scale[:, None, None, :], axis=3, keepdims=True)
  shift = tf.reduce_sum(weights * offset[:, None, None, :], axis=3, keepdims=True)
  remapped = slope * (images - mean) / std + shift
  new_mean = tf.reduce_mean(remapped, axis=axes, keepdims=True)
  new_std = tf.maximum(tf.math.reduce_std(remapped, axis=axes, keepdims=True), 1e-6)
  return mean + std * (remapped - new_mean) / new_std


def gaussian_blur(images: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
  """Separable Gaussian blur, sigma [B] pixels per sample, taps t = -radius..radius.

  The same as scipy.ndimage.gaussian_filter(x, sigma, mode="nearest", radius=radius).
  """
  taps = _gaussian_taps(sigma, radius)
  return _convolve_axis(_convolve_axis(images, taps, 1), taps, 2)


def _area_matrix(side, coarse: tf.Tensor) -> tf.Tensor:
  """[B, side, side] area downsampling of `side` pixels to coarse[b] (<= side) pixels.

  Row j (< coarse) averages the fine pixels it covers, [j, j + 1) * side / coarse, with
  fractional weights at its ends (partial volume of a thick voxel; `tf.image.resize`
  method "area"); rows >= coarse are zero.
  """
  width = (tf.cast(side, tf.float32) / coarse)[:, None, None]
  j = tf.cast(tf.range(side), tf.float32)[None, :, None]
  p = tf.cast(tf.range(side), tf.float32)[None, None, :]
  overlap = tf.minimum(p + 1, (j + 1) * width) - tf.maximum(p, j * width)
  return tf.maximum(overlap, 0.0) / width


def _upsample_matrix(side, coarse: tf.Tensor) -> tf.Tensor:
  """[B, side, side] bilinear upsampling (half-pixel centres, as `tf.image.resize`) of the
  first coarse[b] pixels to `side` pixels."""
  position = (tf.cast(tf.range(side), tf.float32)[None] + 0.5) * (
      coarse[:, None] / tf.cast(side, tf.float32)) - 0.5
  src = tf.clip_by_value(position, 0.0, coarse[:, None] - 1)
  low = tf.floor(src)
  frac = (src - low)[..., None]
  high = tf.minimum(low + 1, coarse[:, None] - 1)
  return (tf.one_hot(tf.cast(low, tf.int32), side) * (1 - frac) +
          tf.one_hot(tf.cast(high, tf.int32), side) * frac)


def downsample_upsample(images: tf.Tensor, coarse: tf.Tensor) -> tf.Tensor:
  """Area-downsamples each image to coarse[b] = (rows, cols) pixels, upsamples it back
  bilinearly (what `tf.image.resize` "area" then "bilinear" do, with per-sample sizes).

  Dense [B, side, side] operators per axis (static shapes whatever the sizes drawn).
  """
  shape = tf.shape(images)
  coarse = tf.cast(coarse, tf.float32)
  rows = tf.matmul(_upsample_matrix(shape[1], coarse[:, 0]),
                   _area_matrix(shape[1], coarse[:, 0]))
  cols = tf.matmul(_upsample_matrix(shape[2], coarse[:, 1]),
                   _area_matrix(shape[2], coarse[:, 1]))
  return tf.einsum("bip,bpqc,bjq->bijc", rows, images, cols)


@tf.function(jit_compile=True)
def _remap_where(images, masks, scale, offset, apply):
  return _select(apply, remap_regions(images, masks, scale, offset), images)


@tf.function(jit_compile=True)
def _blur_where(images, sigma, apply, radius):
  return _select(apply, gaussian_blur(images, sigma, radius), images)


@tf.function(jit_compile=True)
def _lowres_where(images, factor, apply):
  side = tf.cast(tf.shape(images)[1:3], tf.float32)
  coarse = tf.clip_by_value(tf.round(side / factor), 1.0, side)
  return _select(apply, downsample_upsample(images, coarse), images)


def random_appearance(images, masks, seed, config: AugmentConfig):
  """How other sequences and scanners show the same anatomy, per sample, image only.

  - remap_prob: `remap_regions` with slopes a_k ~ U[-1, 1] and offsets
    b_k ~ U[-REMAP_MAX_OFFSET, REMAP_MAX_OFFSET] per region (SynthSeg's random contrast
    per label, applied to real images: T2 <-> T1 / inversion-recovery contrasts).
  - blur_prob: `gaussian_blur` with sigma ~ U[0, blur_max_sigma] px (radius
    ceil(3 blur_max_sigma)): thick slices, low field.
  - lowres_prob: `downsample_upsample` by factors ~ U[1, lowres_max_factor] drawn per
    axis (anisotropic acquisitions): coarse size round(side / factor).

  Applied in that order. Every parameter is drawn (integer-based, `_portable_uniform`)
  whatever is on, so switching one transform on leaves the others' draws alone, and a
  seed gives the same result eagerly, in tf.data and inside an XLA-compiled step.
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(_portable_seed(seed), 7))
  batch = tf.shape(images)[:1]
  classes = tf.concat([batch, [schema.NUM_CLASSES]], 0)
  scale = _portable_uniform(seeds[0], classes, -1.0, 1.0)
  offset = _portable_uniform(seeds[1], classes, -REMAP_MAX_OFFSET, REMAP_MAX_OFFSET)
  remap_on = _portable_uniform(seeds[2], batch) < config.remap_prob
  sigma = _portable_uniform(seeds[3], batch, 0.0, config.blur_max_sigma)
  blur_on = _portable_uniform(seeds[4], batch) < config.blur_prob
  factor = _portable_uniform(seeds[5], tf.concat([batch, [2]], 0), 1.0,
                             config.lowres_max_factor)
  lowres_on = _portable_uniform(seeds[6], batch) < config.lowres_prob
  if config.remap_prob > 0:
    images = _remap_where(images, masks, scale, offset, remap_on)
  if config.blur_prob > 0 and config.blur_max_sigma > 0:
    images = _blur_where(images, sigma, blur_on, math.ceil(3 * config.blur_max_sigma))
  if config.lowres_prob > 0 and config.lowres_max_factor > 1:
    images = _lowres_where(images, factor, lowres_on)
  return images


def augment_batch(images: tf.Tensor, masks: tf.Tensor, seed: tf.Tensor,
                  config: AugmentConfig = AugmentConfig(),
                  static_shapes: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
  """Joint geometric + intensity augmentation of a batch, independent per sample.

  The pixel work runs in XLA-compiled functions (also inside `tf.data` and a train
  step); the random draws stay outside (XLA's normal sampler is slow on CPU).

  Args:
    images: float32 [B, H, W, 1] normalized slices.
    masks: integer [B, H, W, 1] class ids; [B, H, W, 1 + K]: channel 0 the class ids,
      the others per-sample values (a protocol head index) passed through untouched.
    seed: int [2] stateless seed; equal seeds give equal outputs.
    config: the ranges.
    static_shapes: no data-dependent shapes (needed inside an XLA-compiled train step;
      draws noise for every sample, a little slower, same distribution).

  Returns:
    (images, masks) with the input shapes and dtypes.
  """
  if masks.shape[-1] is not None and masks.shape[-1] > 1:
    images, classes = augment_batch(images, masks[..., :1], seed, config, static_shapes)
    return images, tf.concat([classes, masks[..., 1:]], axis=-1)
  seed = tf.cast(seed, tf.int64)
  geo_seed, int_seed, elastic_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  images, masks = random_geometry(images, masks, geo_seed, config)
  if config.elastic_prob > 0 and config.elastic_alpha > 0:
    images, masks = random_elastic(images, masks, elastic_seed, config)
  if config.cut_prob > 0 and config.cut_max > 0:
    # Its own seed, folded in, as the appearance changes below: the default draws stay.
    cut_seed = tf.random.experimental.stateless_fold_in(_portable_seed(seed), 5)
    images, masks = random_cut(images, masks, cut_seed, config)
  if config.remap_prob > 0 or config.blur_prob > 0 or config.lowres_prob > 0:
    # Its own seed, folded in: the three above stay as they were, so with these
    # transforms off (the default) the output is what it was before they existed.
    # Before the gamma/bias/noise changes: those act on whatever contrast comes out.
    appearance_seed = tf.random.experimental.stateless_fold_in(_portable_seed(seed), 3)
    images = random_appearance(images, masks, appearance_seed, config)
  return random_intensity(images, int_seed, config, static_shapes), masks


def augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor,
            config: AugmentConfig = AugmentConfig()) -> tuple[tf.Tensor, tf.Tensor]:
  """`augment_batch` of one example: image float32 [H, W, 1], mask [H, W, 1]."""
  images, masks = augment_batch(image[tf.newaxis], mask[tf.newaxis], seed, config)
  return images[0], masks[0]


def augment_in_train_step(model, config: AugmentConfig, seed: int) -> None:
  """Makes `model.fit` augment each batch inside its train step, on the accelerator.

  The input pipeline then only reads and batches (`TrainingOptions(augment=None)`); the
  augmentation runs in the (distributed, possibly XLA-compiled) step before the forward
  pass, on the replica's own batch. `evaluate`/`predict` (test_step) are untouched.
  Seeds: (seed + replica id, optimizer step), so every replica and step draws anew and a
  resumed run continues the sequence.

  Args:
    model: a compiled Keras model (TensorFlow backend); its train_step is wrapped.
    config: the ranges.
    seed: base seed.
  """
  original = model.train_step
  # Data-dependent shapes only where the step is not XLA-compiled.
  static_shapes = bool(getattr(model, "jit_compile", True))

  def train_step(data):
    images, masks = data
    context = tf.distribute.get_replica_context()
    replica = context.replica_id_in_sync_group if context is not None else 0
    step_seed = tf.stack([tf.cast(seed, tf.int64) + tf.cast(replica, tf.int64),
                          tf.cast(model.optimizer.iterations, tf.int64)])
    images, masks = augment_batch(images, masks, step_seed, config, static_shapes)
    return original((images, masks))

  model.train_step = train_step

