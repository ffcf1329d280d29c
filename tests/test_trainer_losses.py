"""Losses on hand-computed cases; ignored (padding) pixels contribute nothing."""
import math

import numpy as np
import pytest
import tensorflow as tf

from data_prep import schema
from trainer import losses

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


@pytest.mark.parametrize("name", ["dice", "dice_ce"])
def test_ignored_pixels_carry_no_loss_and_no_gradient(name):
  # The 2x2 sample padded to 2x4 with IGNORE_LABEL: whatever the logits there, the loss
  # equals that of the unpadded sample and their gradient is zero.
  padded = np.concatenate([LABELS, np.full_like(LABELS, schema.IGNORE_LABEL)], axis=2)
  rng = np.random.default_rng(0)
  inner = rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
  loss_fn = losses.make_loss(name, num_classes=3)
  reference = loss_fn(LABELS, inner).numpy()
  for _ in range(3):
    logits = tf.Variable(np.concatenate(
        [inner, rng.normal(scale=10, size=(1, 2, 2, 3)).astype(np.float32)], axis=2))
    with tf.GradientTape() as tape:
      loss = loss_fn(padded, logits)
    np.testing.assert_allclose(loss.numpy(), reference, rtol=1e-6)
    grad = tape.gradient(loss, logits).numpy()
    assert np.all(grad[:, :, 2:] == 0) and np.any(grad[:, :, :2] != 0)
  # A sample that is all padding contributes 0 cross-entropy (not NaN).
  all_ignored = np.full_like(LABELS, schema.IGNORE_LABEL)
  assert losses.cross_entropy_per_sample(all_ignored, inner).numpy().tolist() == [0.0]
