"""Dice over a whole split, from accumulated counts (not a mean of per-batch Dice).

`overlap_counts` runs per batch (in TensorFlow) and returns integer counts that add up
across batches and replicas; `dice_from_counts` turns the totals into per-class Dice.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf


def overlap_counts(labels: tf.Tensor, predictions: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Per-class pixel counts of one batch.

  Args:
    labels: integer [...] true class ids.
    predictions: integer [...] predicted class ids, same shape.
    num_classes: C.

  Returns:
    int64 [3, C]: rows are intersection |P_c & T_c|, predicted |P_c|, true |T_c|.
  """
  labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
  predictions = tf.reshape(tf.cast(predictions, tf.int32), [-1])
  both = tf.where(tf.equal(labels, predictions), labels, num_classes)
  counts = [tf.math.bincount(x, minlength=num_classes + 1, maxlength=num_classes + 1,
                             dtype=tf.int64)[:num_classes]
            for x in (both, predictions, labels)]
  return tf.stack(counts)


def dice_from_counts(intersection: Sequence[float], predicted: Sequence[float],
                     true: Sequence[float], empty_value: float = 1.0) -> np.ndarray:
  """Per-class Dice 2|P&T| / (|P| + |T|) from counts summed over a split.

  A class absent from both prediction and truth gets `empty_value` (nothing to find,
  nothing found).

  Returns:
    float64 [C].
  """
  intersection = np.asarray(intersection, np.float64)
  denominator = np.asarray(predicted, np.float64) + np.asarray(true, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    dice = np.where(denominator > 0, 2.0 * intersection / denominator, empty_value)
  return dice


def summarize(dice: Sequence[float], labels: Mapping[str, str]) -> dict[str, float]:
  """Names per-class Dice after the manifest's labels; the mean is over foreground.

  Returns:
    e.g. {"disc_dice": .., "vertebra_dice": .., "mean_dice": ..} (background excluded).
  """
  out = {}
  for index in range(1, len(dice)):
    out[f"{labels.get(str(index), f'class{index}')}_dice"] = float(dice[index])
  out["mean_dice"] = float(np.mean(dice[1:]))
  return out
