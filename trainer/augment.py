"""Joint augmentation of one slice and its mask, with stateless (seeded) randomness.

Geometry (rotation, isotropic scale, translation) is ONE affine matrix applied to both the
image (bilinear) and the mask (nearest), so labels stay on the anatomy they came from;
an optional smooth elastic field (off by default) is likewise shared by both.
Intensity changes (gamma, contrast/brightness, bias field, noise) touch the image only.

Every random draw is `tf.random.stateless_*` from a [2] int seed, so a given seed yields
the same result eagerly and inside `tf.data` (tests hold the two to it), and the input
pipeline feeds an independent seed per batch from `tf.data.Dataset.random`.
The work is done on whole batches (`augment_batch`, per-sample random parameters): one
op over B slices instead of B small ops, which `bench/pipeline_bench.py` shows is what
keeps augmentation from dominating the input pipeline. Layout: images float32
[B, H, W, 1], masks integer [B, H, W, 1]; `augment` wraps one example.
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
  elastic_alpha: float = 0.0         # max displacement in pixels of the smooth elastic field
  elastic_grid: int = 6              # control points per side of that field
  elastic_prob: float = 0.0          # off by default: slow on CPU, see bench/pipeline_bench.py
  gamma_range: tuple[float, float] = (0.7, 1.5)
  gamma_prob: float = 0.3
  contrast_range: tuple[float, float] = (0.75, 1.25)
  brightness: float = 0.1            # shift, in units of the image's standard deviation
  contrast_prob: float = 0.5
  bias_field_strength: float = 0.3   # log-amplitude of the smooth multiplicative field
  bias_field_prob: float = 0.3
  noise_std: float = 0.05            # max noise std, in units of the image's std
  noise_prob: float = 0.3


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


def warp(images: tf.Tensor, masks: tf.Tensor,
         transforms: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Applies [B, 8] transforms to images (bilinear) and masks (nearest), per sample.

  Outside the source each image takes its own minimum (the padding/air value of every
  normalization) and the mask takes background.
  """
  shape = tf.shape(images)[1:3]
  low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
  # The op fills with one scalar for the batch: shift so that each image's air is 0.
  out_images = tf.raw_ops.ImageProjectiveTransformV3(
      images=images - low, transforms=transforms, output_shape=shape, fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT") + low
  out_masks = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(masks, tf.float32), transforms=transforms, output_shape=shape,
      fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")
  out_images = tf.ensure_shape(out_images, images.shape)
  out_masks = tf.ensure_shape(tf.cast(tf.round(out_masks), masks.dtype), masks.shape)
  return out_images, out_masks


def _uniform(seed, shape, low=0.0, high=1.0):
  return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _per_sample(x):
  """[B] -> [B, 1, 1, 1], to broadcast over images."""
  return x[:, tf.newaxis, tf.newaxis, tf.newaxis]


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
  warped_images, warped_masks = warp(images, masks,
                                     affine_transforms(size, angle, scale, shift))
  apply = _per_sample(_uniform(seeds[3], batch) < config.geometric_prob)
  return tf.where(apply, warped_images, images), tf.where(apply, warped_masks, masks)


def _sample(x: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor, bilinear: bool) -> tf.Tensor:
  """Samples x [B, H, W, C] at float pixel coordinates rows/cols [B, H, W] (edge-clamped)."""
  shape = tf.shape(x)
  height, width = shape[1], shape[2]
  b = tf.broadcast_to(tf.range(shape[0])[:, None, None], tf.shape(rows))

  def at(r, c):
    r = tf.clip_by_value(r, 0, height - 1)
    c = tf.clip_by_value(c, 0, width - 1)
    return tf.gather_nd(x, tf.stack([b, r, c], axis=-1))

  if not bilinear:
    return at(tf.cast(tf.round(rows), tf.int32), tf.cast(tf.round(cols), tf.int32))
  r0 = tf.floor(rows)
  c0 = tf.floor(cols)
  fr = (rows - r0)[..., None]
  fc = (cols - c0)[..., None]
  r0 = tf.cast(r0, tf.int32)
  c0 = tf.cast(c0, tf.int32)
  top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
  bottom = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
  return top * (1 - fr) + bottom * fr


def random_elastic(images, masks, seed, config: AugmentConfig):
  """Smooth random displacement per sample (image bilinear, mask nearest, same field)."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  batch = tf.shape(images)[:1]
  size = tf.shape(images)[1:3]
  grid = config.elastic_grid
  coarse = _uniform(seeds[0], tf.concat([batch, [grid, grid, 2]], 0), -1.0, 1.0)
  offsets = tf.image.resize(coarse, size, method="bicubic") * config.elastic_alpha
  rows = tf.cast(tf.range(size[0]), tf.float32)[None, :, None] + offsets[..., 0]
  cols = tf.cast(tf.range(size[1]), tf.float32)[None, None, :] + offsets[..., 1]
  warped_images = _sample(images, rows, cols, bilinear=True)
  warped_masks = _sample(masks, rows, cols, bilinear=False)
  apply = _per_sample(_uniform(seeds[1], batch) < config.elastic_prob)
  return tf.where(apply, warped_images, images), tf.where(apply, warped_masks, masks)


def random_intensity(images, seed, config: AugmentConfig):
  """Random gamma, contrast/brightness, bias field and noise, per sample, images only."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 10))
  batch = tf.shape(images)[:1]
  axes = [1, 2, 3]
  lo = tf.reduce_min(images, axis=axes, keepdims=True)
  span = tf.maximum(tf.reduce_max(images, axis=axes, keepdims=True) - lo, 1e-6)
  std = tf.maximum(tf.math.reduce_std(images, axis=axes, keepdims=True), 1e-6)

  def draw(i, low=0.0, high=1.0):
    return _per_sample(_uniform(seeds[i], batch, low, high))

  # Gamma acts on [0, 1]; map there and back so any normalization works.
  gamma = tf.exp(draw(0, math.log(config.gamma_range[0]), math.log(config.gamma_range[1])))
  out = tf.where(draw(1) < config.gamma_prob,
                 lo + span * tf.pow((images - lo) / span, gamma), images)

  mean = tf.reduce_mean(out, axis=axes, keepdims=True)
  contrast = draw(2, *config.contrast_range)
  shift = draw(3, -config.brightness, config.brightness) * std
  out = tf.where(draw(4) < config.contrast_prob, (out - mean) * contrast + mean + shift, out)

  # MRI coil inhomogeneity: a smooth multiplicative field around the air level,
  # a coarse 4x4 random grid upsampled bilinearly.
  coarse = _uniform(seeds[5], tf.concat([batch, [4, 4, 1]], 0), -1.0, 1.0)
  field = tf.exp(config.bias_field_strength *
                 tf.image.resize(coarse, tf.shape(images)[1:3], method="bilinear"))
  out = tf.where(draw(6) < config.bias_field_prob, lo + (out - lo) * field, out)

  sigma = draw(7, 0.0, config.noise_std) * std
  noise = tf.random.stateless_normal(tf.shape(images), seed=seeds[8]) * sigma
  return tf.where(draw(9) < config.noise_prob, out + noise, out)


def augment_batch(images: tf.Tensor, masks: tf.Tensor, seed: tf.Tensor,
                  config: AugmentConfig = AugmentConfig()) -> tuple[tf.Tensor, tf.Tensor]:
  """Joint geometric + intensity augmentation of a batch, independent per sample.

  Args:
    images: float32 [B, H, W, 1] normalized slices.
    masks: integer [B, H, W, 1] class ids.
    seed: int [2] stateless seed; equal seeds give equal outputs.
    config: the ranges.

  Returns:
    (images, masks) with the input shapes and dtypes.
  """
  seed = tf.cast(seed, tf.int64)
  geo_seed, int_seed, elastic_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  images, masks = random_geometry(images, masks, geo_seed, config)
  if config.elastic_prob > 0 and config.elastic_alpha > 0:
    images, masks = random_elastic(images, masks, elastic_seed, config)
  return random_intensity(images, int_seed, config), masks


def augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor,
            config: AugmentConfig = AugmentConfig()) -> tuple[tf.Tensor, tf.Tensor]:
  """`augment_batch` of one example: image float32 [H, W, 1], mask [H, W, 1]."""
  images, masks = augment_batch(image[tf.newaxis], mask[tf.newaxis], seed, config)
  return images[0], masks[0]
