"""Joint augmentation of one slice and its mask, with stateless (seeded) randomness.

Geometry (rotation, isotropic scale, translation) is ONE affine matrix applied to both the
image (bilinear) and the mask (nearest), so labels stay on the anatomy they came from.
Intensity changes (gamma, contrast/brightness, bias field, noise) touch the image only.

Every random draw is `tf.random.stateless_*` from a [2] int seed, so a given seed yields
the same result eagerly and inside `tf.data` (tests hold the two to it), and the input
pipeline can feed an independent seed per example from `tf.data.Dataset.random`.
Layout: image float32 [H, W, 1], mask uint8 [H, W, 1].
"""
from __future__ import annotations

import dataclasses
import math

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges of the random transforms; a probability of 0 switches one off."""
  max_rotation_deg: float = 15.0
  scale_range: float = 0.15          # scale drawn log-uniformly in [1 - r, 1 + r]
  max_translation: float = 0.08      # fraction of the side
  geometric_prob: float = 0.8
  gamma_range: tuple[float, float] = (0.7, 1.5)
  gamma_prob: float = 0.3
  contrast_range: tuple[float, float] = (0.75, 1.25)
  brightness: float = 0.1            # shift, in units of the image's standard deviation
  contrast_prob: float = 0.5
  bias_field_strength: float = 0.3   # log-amplitude of the smooth multiplicative field
  bias_field_prob: float = 0.3
  noise_std: float = 0.05            # max noise std, in units of the image's std
  noise_prob: float = 0.3


def affine_transform(size: tf.Tensor, angle: tf.Tensor, scale: tf.Tensor,
                     shift: tf.Tensor) -> tf.Tensor:
  """The [8] output->input projective transform of a rotation/scale about the centre + shift.

  Args:
    size: float32 [2] (height, width) of the image.
    angle: rotation in radians (scalar).
    scale: zoom factor (> 1 enlarges the content).
    shift: float32 [2] (dy, dx) translation of the content in pixels.

  Returns:
    float32 [8] as expected by `ImageProjectiveTransformV3` (maps OUTPUT pixel (x, y) to
    the INPUT pixel it samples).
  """
  cy = (size[0] - 1.0) / 2.0
  cx = (size[1] - 1.0) / 2.0
  cos = tf.cos(angle) / scale
  sin = tf.sin(angle) / scale
  # in = c + R(-angle)/scale * (out - c - shift)
  ox = cx + shift[1]
  oy = cy + shift[0]
  a0, a1 = cos, sin
  b0, b1 = -sin, cos
  a2 = cx - a0 * ox - a1 * oy
  b2 = cy - b0 * ox - b1 * oy
  zero = tf.zeros_like(a0)
  return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero])


def warp(image: tf.Tensor, mask: tf.Tensor, transform: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Applies one [8] transform to image (bilinear) and mask (nearest).

  Outside the source the image takes its minimum (the padding/air value of every
  normalization) and the mask takes background.
  """
  shape = tf.shape(image)[:2]
  transforms = transform[tf.newaxis, :]
  fill = tf.reduce_min(image)
  out_image = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[tf.newaxis], transforms=transforms, output_shape=shape,
      fill_value=fill, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  out_mask = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(mask, tf.float32)[tf.newaxis], transforms=transforms,
      output_shape=shape, fill_value=0.0, interpolation="NEAREST",
      fill_mode="CONSTANT")[0]
  out_image = tf.ensure_shape(out_image, image.shape)
  out_mask = tf.ensure_shape(tf.cast(tf.round(out_mask), mask.dtype), mask.shape)
  return out_image, out_mask


def _uniform(seed, low=0.0, high=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _smooth_field(seed, shape, grid=4):
  """A smooth random field in [-1, 1]: a coarse grid upsampled bilinearly."""
  coarse = _uniform(seed, -1.0, 1.0, [1, grid, grid, 1])
  return tf.image.resize(coarse, shape, method="bilinear")[0]


def random_geometry(image, mask, seed, config: AugmentConfig):
  """Random rotation/scale/translation of image and mask (same matrix)."""
  seeds = tf.random.experimental.stateless_split(seed, 5)
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  max_angle = config.max_rotation_deg * math.pi / 180.0
  angle = _uniform(seeds[0], -max_angle, max_angle)
  log_r = math.log1p(config.scale_range)
  scale = tf.exp(_uniform(seeds[1], -log_r, log_r))
  shift = _uniform(seeds[2], -config.max_translation, config.max_translation, [2]) * size
  warped_image, warped_mask = warp(image, mask, affine_transform(size, angle, scale, shift))
  apply = _uniform(seeds[3]) < config.geometric_prob
  return (tf.where(apply, warped_image, image), tf.where(apply, warped_mask, mask))


def random_intensity(image, seed, config: AugmentConfig):
  """Random gamma, contrast/brightness, bias field and noise on the image only."""
  seeds = tf.random.experimental.stateless_split(seed, 10)
  lo = tf.reduce_min(image)
  hi = tf.reduce_max(image)
  span = tf.maximum(hi - lo, 1e-6)
  std = tf.maximum(tf.math.reduce_std(image), 1e-6)

  # Gamma acts on [0, 1]; map there and back so any normalization works.
  gamma = tf.exp(_uniform(seeds[0], math.log(config.gamma_range[0]),
                          math.log(config.gamma_range[1])))
  out = tf.where(_uniform(seeds[1]) < config.gamma_prob,
                 lo + span * tf.pow((image - lo) / span, gamma), image)

  mean = tf.reduce_mean(out)
  contrast = _uniform(seeds[2], *config.contrast_range)
  shift = _uniform(seeds[3], -config.brightness, config.brightness) * std
  out = tf.where(_uniform(seeds[4]) < config.contrast_prob,
                 (out - mean) * contrast + mean + shift, out)

  # MRI coil inhomogeneity: a smooth multiplicative field around the air level.
  field = tf.exp(config.bias_field_strength * _smooth_field(seeds[5], tf.shape(image)[:2]))
  out = tf.where(_uniform(seeds[6]) < config.bias_field_prob, lo + (out - lo) * field, out)

  sigma = _uniform(seeds[7], 0.0, config.noise_std) * std
  noise = tf.random.stateless_normal(tf.shape(image), seed=seeds[8]) * sigma
  out = tf.where(_uniform(seeds[9]) < config.noise_prob, out + noise, out)
  return out


def augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor,
            config: AugmentConfig = AugmentConfig()) -> tuple[tf.Tensor, tf.Tensor]:
  """Joint geometric + intensity augmentation of one example.

  Args:
    image: float32 [H, W, 1] normalized slice.
    mask: integer [H, W, 1] class ids.
    seed: int32/int64 [2] stateless seed; equal seeds give equal outputs.
    config: the ranges.

  Returns:
    (image, mask) with the input shapes and dtypes.
  """
  seed = tf.cast(seed, tf.int64)
  geo_seed, int_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image, mask = random_geometry(image, mask, geo_seed, config)
  return random_intensity(image, int_seed, config), mask
