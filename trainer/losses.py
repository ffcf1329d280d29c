"""Segmentation losses: soft multi-class Dice and Dice + cross-entropy, marginal over
label sets.

Layout: labels integer [N, H, W, 1] (or [N, H, W]); logits float [N, H, W, C]. A label is
an exact class id, or a set label (`schema.SET_LABEL`): "one of these classes". Both losses
are MARGINAL over sets, so that partially annotated data teaches only what it knows:
  * cross-entropy of a pixel = -log(sum of the probabilities of the classes its label
    allows); an exact label gives the usual cross-entropy, a set merges its classes
    (predicting background or an unannotated class costs the same on an unlabelled pixel
    of a vertebra-only volume), and `schema.IGNORE_LABEL` (every class: the padding
    around a fitted slice, what augmentation moves in from outside it) costs nothing;
  * Dice of class c in a sample counts only if no pixel there leaves c open (a set of
    several classes containing c: c was not annotated in that slice); pixels whose label
    allows every class are not counted for any class.
With exact labels only, both are the usual losses. Every loss here returns ONE value PER
SAMPLE, shape [N]. Keras (`compile(loss=...)`) averages those over the replica's batch and
divides by the number of replicas before the gradients are summed across replicas, which
equals the mean over the global batch. Two replicas thus give the loss and gradients of
one replica on the same global batch (tests/test_trainer_distribute.py).

A model with P protocol heads (`unet.build_unet(protocols=...)`) returns logits
[N, H, W, P * C]; its labels [N, H, W, 2] carry each sample's head index in channel 1
(`input_pipeline.make_dataset(protocols=...)`), and `make_loss(num_heads=P)` scores each
sample on its own head only: the other heads get no gradient from it.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from data_prep import schema

LOSSES = ("dice", "dice_ce")


def _label_sets(labels: tf.Tensor, num_classes: int):
  """(allowed, size): float32 [N, H, W, C] classes each pixel's label allows, and their
  number [N, H, W]."""
  labels = tf.cast(labels, tf.int32)
  if labels.shape.rank == 4:
    labels = tf.squeeze(labels, -1)
  allowed = tf.cast(schema.tf_allowed_classes(labels)[..., :num_classes], tf.float32)
  return allowed, tf.reduce_sum(allowed, axis=-1)


def soft_dice_per_sample(labels: tf.Tensor, logits: tf.Tensor, *, num_classes: int,
                         include_background: bool = False,
                         smooth: float = 1.0) -> tf.Tensor:
  """Mean over the known classes of 1 - soft Dice, per sample.

  For sample n and class c, with p = softmax(logits), g = 1 where the label is exactly c,
  and k = 1 on the pixels where c is known (the label is exact, or a set without c):
    dice[n, c] = (2 * sum_hw k p g + smooth) / (sum_hw k p + sum_hw g + smooth)
  A known class absent from both truth and prediction scores 1. The loss of sample n is
  the mean of 1 - dice[n, c] over the classes known in it: classes 1.. (foreground: disc,
  vertebra) by default, or all with `include_background` (background dominates the pixels
  and would reward predicting it everywhere); 0 when no class is known.

  Returns:
    float32 [N].
  """
  allowed, size = _label_sets(labels, num_classes)
  several = tf.cast(size > 1, tf.float32)[..., tf.newaxis]
  truth = allowed * (1.0 - several)
  known = 1.0 - allowed * several
  # Class c is unannotated in a sample when a set of 2..C-1 classes leaves it open there.
  partial = several * tf.cast(size < num_classes, tf.float32)[..., tf.newaxis]
  counted = 1.0 - tf.cast(tf.reduce_any(allowed * partial > 0, axis=[1, 2]), tf.float32)
  probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1) * known
  intersection = tf.reduce_sum(probs * truth, axis=[1, 2])
  denominator = tf.reduce_sum(probs, axis=[1, 2]) + tf.reduce_sum(truth, axis=[1, 2])
  dice = (2.0 * intersection + smooth) / (denominator + smooth)
  if not include_background:
    dice, counted = dice[:, 1:], counted[:, 1:]
  return tf.reduce_sum((1.0 - dice) * counted, axis=-1) / tf.maximum(
      tf.reduce_sum(counted, axis=-1), 1.0)


def cross_entropy_per_sample(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Marginal softmax cross-entropy -log sum_{c allowed} p_c, averaged over the sample's
  pixels whose label does not allow every class: float32 [N] (0 without such pixels)."""
  logits = tf.cast(logits, tf.float32)
  allowed, size = _label_sets(labels, logits.shape[-1])
  informative = tf.cast(size < tf.cast(logits.shape[-1], tf.float32), tf.float32)
  masked = tf.where(allowed > 0, logits, tf.fill(tf.shape(logits), -1e30))
  ce = tf.reduce_logsumexp(logits, axis=-1) - tf.reduce_logsumexp(masked, axis=-1)
  return tf.reduce_sum(ce * informative, axis=[1, 2]) / tf.maximum(
      tf.reduce_sum(informative, axis=[1, 2]), 1.0)


def head_logits(logits: tf.Tensor, heads: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Each sample's logits of its own head.

  Args:
    logits: [N, H, W, P * num_classes], head p in channels p*C..(p+1)*C-1.
    heads: integer [N], the head of each sample (0..P-1).
    num_classes: C.

  Returns:
    [N, H, W, num_classes]: a gather, so no gradient reaches another head.
  """
  shape = tf.shape(logits)
  per_head = tf.reshape(logits, tf.concat([shape[:3], [-1, num_classes]], axis=0))
  return tf.gather(per_head, tf.cast(heads, tf.int32), axis=3, batch_dims=1)


def make_loss(name: str, *, num_classes: int, include_background: bool = False,
              smooth: float = 1.0, ce_weight: float = 1.0, num_heads: int = 1) -> Callable:
  """The per-sample loss function `fn(labels, logits) -> [N]` for `model.compile`.

  Args:
    name: "dice" (soft Dice) or "dice_ce" (soft Dice + ce_weight * cross-entropy).
    num_classes: number of classes C.
    include_background: whether class 0 counts in the Dice mean.
    smooth: additive smoothing of numerator and denominator.
    ce_weight: weight of the cross-entropy term for "dice_ce".
    num_heads: P, the protocol heads of the model. With P > 1 the labels are
      [N, H, W, 2], channel 0 the mask and channel 1 the sample's head index (constant
      over its pixels), and each sample is scored on its own head (`head_logits`).

  Raises:
    ValueError: for an unknown name.
  """
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")

  def loss_fn(labels, logits):
    if num_heads > 1:
      labels, heads = labels[..., :1], labels[:, 0, 0, 1]
      logits = head_logits(logits, heads, num_classes)
    loss = soft_dice_per_sample(labels, logits, num_classes=num_classes,
                                include_background=include_background, smooth=smooth)
    if name == "dice_ce":
      loss += ce_weight * cross_entropy_per_sample(labels, logits)
    return loss

  loss_fn.__name__ = name
  return loss_fn
