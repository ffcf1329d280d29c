"""Losses and split metrics on hand-computed cases."""
import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import losses
from trainer import metrics

# One 2x2 sample: truth [[0, 1], [1, 2]], prediction [[0, 1], [2, 2]].
LABELS = np.array([[[[0], [1]], [[1], [2]]]], np.int32)
PRED = np.array([[[0, 1], [2, 2]]])


def confident_logits(pred, num_classes=3):
  return (tf.one_hot(pred, num_classes) * 100.0).numpy()


def test_dice_of_confident_prediction_matches_hand_count():
  logits = confident_logits(PRED)
  # disc: |P&T| = 1, |P| = 1, |T| = 2 -> 2/3; vertebra: 1, 2, 1 -> 2/3; background: 1.
  fg = losses.soft_dice_per_sample(LABELS, logits, num_classes=3, smooth=0.0)
  np.testing.assert_allclose(fg.numpy(), [1 - 2 / 3], atol=1e-5)
  all_classes = losses.soft_dice_per_sample(LABELS, logits, num_classes=3, smooth=0.0,
                                            include_background=True)
  np.testing.assert_allclose(all_classes.numpy(), [1 - 7 / 9], atol=1e-5)


def test_dice_of_uniform_prediction():
  logits = np.zeros((1, 2, 2, 3), np.float32)
  # p = 1/3 everywhere. disc: 2*(2/3) / (4/3 + 2) = 0.4; vertebra: 2*(1/3) / (4/3 + 1) = 2/7.
  loss = losses.soft_dice_per_sample(LABELS, logits, num_classes=3, smooth=0.0)
  np.testing.assert_allclose(loss.numpy(), [1 - (0.4 + 2 / 7) / 2], atol=1e-6)


def test_smoothing_scores_an_absent_class_as_perfect():
  labels = np.zeros((1, 2, 2, 1), np.int32)
  logits = confident_logits(np.zeros((1, 2, 2), np.int32))
  loss = losses.soft_dice_per_sample(labels, logits, num_classes=3, smooth=1.0)
  np.testing.assert_allclose(loss.numpy(), [0.0], atol=1e-5)


def test_losses_are_per_sample_and_dice_ce_adds_cross_entropy():
  labels = np.concatenate([LABELS, np.zeros_like(LABELS)])
  logits = np.zeros((2, 2, 2, 3), np.float32)
  ce = losses.cross_entropy_per_sample(labels, logits)
  np.testing.assert_allclose(ce.numpy(), [math.log(3)] * 2, atol=1e-6)
  dice = losses.make_loss("dice", num_classes=3)(labels, logits)
  both = losses.make_loss("dice_ce", num_classes=3)(labels, logits)
  assert dice.shape == (2,)
  np.testing.assert_allclose(both.numpy(), dice.numpy() + math.log(3), atol=1e-6)
  with pytest.raises(ValueError, match="unknown loss"):
    losses.make_loss("focal", num_classes=3)


def test_global_batch_mean_of_two_halves_equals_whole():
  per_sample = tf.constant([1.0, 2.0, 3.0, 6.0])
  whole = losses.global_batch_mean(per_sample, 4)
  halves = losses.global_batch_mean(per_sample[:2], 4) + losses.global_batch_mean(
      per_sample[2:], 4)
  assert float(whole) == pytest.approx(3.0)
  assert float(halves) == pytest.approx(3.0)


def test_overlap_counts_and_dice_from_counts():
  counts = metrics.overlap_counts(LABELS[..., 0], PRED, 3).numpy()
  np.testing.assert_array_equal(counts, [[1, 1, 1], [1, 1, 2], [1, 2, 1]])
  dice = metrics.dice_from_counts(*counts)
  np.testing.assert_allclose(dice, [1.0, 2 / 3, 2 / 3])
  # Counts add over batches: the split Dice is not the mean of per-batch Dice.
  total = counts + metrics.overlap_counts(np.array([[1, 1]]), np.array([[0, 0]]), 3).numpy()
  np.testing.assert_allclose(metrics.dice_from_counts(*total)[1], 2 * 1 / (1 + 4))
  np.testing.assert_allclose(metrics.dice_from_counts([0], [0], [0]), [1.0])
  summary = metrics.summarize(dice, {"1": "disc", "2": "vertebra"})
  assert summary == pytest.approx({"disc_dice": 2 / 3, "vertebra_dice": 2 / 3,
                                   "mean_dice": 2 / 3})
