"""Segmentation losses: soft multi-class Dice and Dice + cross-entropy.

Layout: labels integer [N, H, W, 1] (or [N, H, W]) class ids; logits float [N, H, W, C].
Pixels labelled `schema.IGNORE_LABEL` (the padding around a fitted slice, and what
augmentation moves in from outside it) are not anatomy: they contribute nothing to any
loss, whatever is predicted there.
Every loss here returns ONE value PER SAMPLE, shape [N]. Keras (`compile(loss=...)`)
averages those over the replica's batch and divides by the number of replicas before the
gradients are summed across replicas, which equals the mean over the global batch. Two
replicas thus give the loss and gradients of one replica on the same global batch
(tests/test_trainer_distribute.py).
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from data_prep import schema

LOSSES = ("dice", "dice_ce")


def _labels_and_valid(labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """int32 [N, H, W] class ids (ignored pixels set to 0) and float32 [N, H, W] validity."""
  labels = tf.cast(labels, tf.int32)
  if labels.shape.rank == 4:
    labels = tf.squeeze(labels, -1)
  valid = tf.not_equal(labels, schema.IGNORE_LABEL)
  return tf.where(valid, labels, 0), tf.cast(valid, tf.float32)


def soft_dice_per_sample(labels: tf.Tensor, logits: tf.Tensor, *, num_classes: int,
                         include_background: bool = False,
                         smooth: float = 1.0) -> tf.Tensor:
  """1 - mean soft Dice over classes, per sample.

  For sample n and class c, with p = softmax(logits), g = one_hot(labels) and v = 1 on
  pixels not labelled IGNORE_LABEL, 0 on those:
    dice[n, c] = (2 * sum_hw v p g + smooth) / (sum_hw v p + sum_hw v g + smooth)
  A class absent from both truth and prediction scores 1. The loss of sample n is
  1 - mean_c dice[n, c], over classes 1.. (foreground: disc, vertebra) by default, or
  over all classes with `include_background` (background dominates the pixels and would
  reward predicting it everywhere).

  Returns:
    float32 [N].
  """
  labels, valid = _labels_and_valid(labels)
  probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1) * valid[..., tf.newaxis]
  truth = tf.one_hot(labels, num_classes, dtype=tf.float32) * valid[..., tf.newaxis]
  intersection = tf.reduce_sum(probs * truth, axis=[1, 2])
  denominator = tf.reduce_sum(probs, axis=[1, 2]) + tf.reduce_sum(truth, axis=[1, 2])
  dice = (2.0 * intersection + smooth) / (denominator + smooth)
  if not include_background:
    dice = dice[:, 1:]
  return 1.0 - tf.reduce_mean(dice, axis=-1)


def cross_entropy_per_sample(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Softmax cross-entropy averaged over the sample's non-ignored pixels: float32 [N].

  A sample without any such pixel contributes 0.
  """
  labels, valid = _labels_and_valid(labels)
  ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                      logits=tf.cast(logits, tf.float32))
  return tf.reduce_sum(ce * valid, axis=[1, 2]) / tf.maximum(
      tf.reduce_sum(valid, axis=[1, 2]), 1.0)


def make_loss(name: str, *, num_classes: int, include_background: bool = False,
              smooth: float = 1.0, ce_weight: float = 1.0) -> Callable:
  """The per-sample loss function `fn(labels, logits) -> [N]` for `model.compile`.

  Args:
    name: "dice" (soft Dice) or "dice_ce" (soft Dice + ce_weight * cross-entropy).
    num_classes: number of classes C.
    include_background: whether class 0 counts in the Dice mean.
    smooth: additive smoothing of numerator and denominator.
    ce_weight: weight of the cross-entropy term for "dice_ce".

  Raises:
    ValueError: for an unknown name.
  """
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")

  def loss_fn(labels, logits):
    loss = soft_dice_per_sample(labels, logits, num_classes=num_classes,
                                include_background=include_background, smooth=smooth)
    if name == "dice_ce":
      loss += ce_weight * cross_entropy_per_sample(labels, logits)
    return loss

  loss_fn.__name__ = name
  return loss_fn
