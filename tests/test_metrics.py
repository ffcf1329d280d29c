"""Dice and HD95 against hand-computed answers and an independent brute-force computation.

`data_prep.metrics` is the one definition behind the trainer's validation and
spine-evaluate; here its NumPy and TF twins are held equal, and its HD95 (scipy's
Euclidean distance transform) is checked against known distances and against a
brute-force surface-to-surface computation written out below.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from data_prep import metrics
from data_prep import schema
from export import evaluate_lib as evaluate

IGN = schema.IGNORE_LABEL


def test_dice_on_a_2x2_table():
  gt = np.array([[0, 1], [2, 2]])
  pred = np.array([[0, 1], [1, 2]])
  # background: 1 & 1 -> 1; disc: pred 2 px, gt 1 px, 1 shared -> 2/3; vertebra: 1 vs 2 -> 2/3.
  counts = metrics.counts(pred, gt)
  np.testing.assert_array_equal(counts, [[1, 1, 1], [1, 2, 1], [1, 1, 2]])
  dice = metrics.dice(counts)
  assert list(dice) == list(metrics.KEYS)
  assert dice["dice_background"] == 1.0
  assert dice["dice_disc"] == pytest.approx(2 / 3)
  assert dice["dice_vertebra"] == pytest.approx(2 / 3)
  assert dice["dice_mean"] == pytest.approx(2 / 3)
  assert dice["dice_mean_all"] == pytest.approx(7 / 9)


def test_shifted_cubes_dice():
  gt = np.zeros((10, 10, 10), np.uint8)
  gt[2:6, 2:6, 2:6] = 2                      # 64 voxels
  pred = np.roll(gt, 1, axis=0)              # shares 3 of 4 layers: 48 voxels
  dice = metrics.dice(metrics.counts(pred, gt))
  assert dice["dice_vertebra"] == pytest.approx(2 * 48 / 128)
  assert dice["dice_disc"] == metrics.ABSENT
  assert dice["dice_mean"] == pytest.approx(0.75)


def test_absent_class_is_neither_zero_nor_one():
  gt = np.array([[0, 1], [0, 1]])
  pred = np.array([[2, 1], [0, 0]])  # vertebra predicted but absent from the truth
  dice = metrics.dice(metrics.counts(pred, gt))
  assert dice["dice_vertebra"] == metrics.ABSENT
  assert dice["dice_disc"] == pytest.approx(2 / 3)
  assert dice["dice_mean"] == pytest.approx(2 / 3)  # absent class skipped
  assert dice["dice_background"] == pytest.approx(0.5)  # 1 shared of 2 + 2
  assert dice["dice_mean_all"] == pytest.approx((0.5 + 2 / 3) / 2)
  assert metrics.mean_present([metrics.ABSENT, metrics.ABSENT]) == metrics.ABSENT
  assert "dice_vertebra absent" in metrics.format_dice(dice)
  with pytest.raises(ValueError, match="shape"):
    metrics.counts(pred, gt[:1])


def test_ignored_pixels_count_for_nothing():
  gt = np.array([[1, 1, IGN, IGN], [0, 2, IGN, IGN]])
  pred = np.array([[1, 1, 1, 0], [0, 2, 2, 2]])  # anything on the ignored pixels
  np.testing.assert_array_equal(metrics.counts(pred, gt), [[1, 1, 1], [2, 2, 2], [1, 1, 1]])
  assert metrics.dice(metrics.counts(pred, gt))["dice_mean_all"] == 1.0


def test_tf_and_numpy_counts_agree_and_add_over_batches():
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 3, (4, 9, 7)).astype(np.uint8)
  gt[:, :2] = IGN
  pred = rng.integers(0, 3, (4, 9, 7))
  ref = metrics.counts(pred, gt)
  np.testing.assert_array_equal(metrics.tf_counts(gt, pred).numpy(), ref)
  graph = tf.function(metrics.tf_counts)
  halves = graph(gt[:2], pred[:2]).numpy() + graph(gt[2:], pred[2:]).numpy()
  np.testing.assert_array_equal(halves, ref)
  # Independent count of the disc row.
  keep = gt != IGN
  assert ref[1].tolist() == [int(((pred == 1) & (gt == 1) & keep).sum()),
                             int(((pred == 1) & keep).sum()), int((gt == 1).sum())]


# ---------------------------------------------------------------------------- HD95

def _surface_by_hand(mask):
  """Foreground voxels with a face neighbour outside (the border counts as outside)."""
  padded = np.pad(mask, 1)
  inner = np.ones_like(mask)
  for axis in range(mask.ndim):
    for shift in (-1, 1):
      inner &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in mask.shape)]
  return mask & ~inner


def _hd95_brute_force(pred, gt, spacing):
  a = np.argwhere(_surface_by_hand(pred)) * np.asarray(spacing, float)
  b = np.argwhere(_surface_by_hand(gt)) * np.asarray(spacing, float)
  d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_surface_of_a_cube():
  mask = np.zeros((5, 5, 5), bool)
  mask[1:4, 1:4, 1:4] = True
  surf = metrics.surface(mask)
  assert surf.sum() == 26 and not surf[2, 2, 2]
  full = np.ones((3, 4), bool)  # the array border counts as outside
  assert metrics.surface(full).sum() == 10


def test_hd95_single_points_anisotropic():
  a = np.zeros((4, 5, 3), bool)
  b = np.zeros_like(a)
  a[0, 0, 0] = b[2, 3, 0] = True
  # offsets (2, 3, 0) voxels at (2.0, 0.5, 1.0) mm -> sqrt(4^2 + 1.5^2) mm.
  assert metrics.hd95(a, b, (2.0, 0.5, 1.0)) == pytest.approx(math.sqrt(18.25))


def test_hd95_shifted_slab_and_special_cases():
  gt = np.zeros((12, 6, 6), bool)
  gt[2:6] = True
  pred = np.roll(gt, 3, axis=0)  # shifted 3 voxels along an axis of 2 mm voxels
  # Every surface voxel of one slab lies within 6 mm of the other's surface, and the far
  # faces are exactly 6 mm away, which is more than 5% of the surface.
  assert metrics.hd95(pred, gt, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
  assert metrics.hd95(gt, gt, (2.0, 1.0, 1.0)) == 0.0
  assert metrics.hd95(pred, np.zeros_like(gt), (1, 1, 1)) == metrics.ABSENT
  assert metrics.hd95(np.zeros_like(gt), gt, (1, 1, 1)) == math.inf
  per_class = metrics.hd95_per_class(np.where(pred, 2, 0), np.where(gt, 2, 0), (2, 1, 1))
  assert per_class == {"hd95_disc": metrics.ABSENT, "hd95_vertebra": pytest.approx(6.0)}
  with pytest.raises(ValueError, match="spacing"):
    metrics.hd95(pred, gt, (1.0, 1.0))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.6, 0.8)])
def test_hd95_shifted_cubes_equal_brute_force(spacing):
  gt = np.zeros((14, 16, 12), bool)
  gt[3:9, 4:11, 2:8] = True
  pred = np.roll(np.roll(gt, 2, axis=0), -1, axis=2)
  expected = _hd95_brute_force(pred, gt, spacing)
  assert expected > 0
  assert metrics.hd95(pred, gt, spacing) == pytest.approx(expected, abs=1e-9)


def test_hd95_random_shapes_equal_brute_force():
  rng = np.random.default_rng(0)
  a = rng.random((7, 16, 13)) < 0.2
  b = rng.random((7, 16, 13)) < 0.1
  spacing = (3.0, 0.6, 0.8)
  assert metrics.hd95(a, b, spacing) == pytest.approx(_hd95_brute_force(a, b, spacing),
                                                      abs=1e-9)


# ------------------------------------------------------------- label map, summaries

def test_one_label_map_grammar_for_convert_and_evaluate():
  # 0 maps to background unless listed: "128:1,255:2" works on masks with background.
  assert schema.parse_label_map("128:1,255:2") == {0: 0, 128: 1, 255: 2}
  assert schema.parse_label_map("1-3:1, 7:2") == {0: 0, 1: 1, 2: 1, 3: 1, 7: 2}
  assert schema.parse_label_map("") == {}
  for bad, why in (("0-", "expected SRC:DST"), ("5:3", "not a class id"),
                   ("3-1:1", "below start"), ("1:1,1:2", "twice")):
    with pytest.raises(schema.LabelError, match=why):
      schema.parse_label_map(bad)
  mask = np.array([[0, 128], [255, 255]])
  np.testing.assert_array_equal(
      schema.apply_label_map(mask, schema.parse_label_map("128:1,255:2"), "m.png"),
      [[0, 1], [2, 2]])
  with pytest.raises(schema.LabelError, match=r"m.png: mask holds values \[128, 255\]"):
    schema.apply_label_map(mask, {}, "m.png")
  with pytest.raises(schema.LabelError, match=r"m.png: mask values \[255\] are not covered"):
    schema.apply_label_map(mask, schema.parse_label_map("128:1"), "m.png")


def test_summary_means_skip_absent_and_table_says_so():
  a = np.array([[1, 1, 1], [1, 2, 1], [0, 0, 0]])
  b = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1]])
  rows = [{"case_id": "a", "kind": "2d", "counts": a.tolist(), "dice": metrics.dice(a)},
          {"case_id": "b", "kind": "2d", "counts": b.tolist(), "dice": metrics.dice(b)}]
  overall = evaluate.summarize(rows)
  assert overall["mean"]["dice"]["dice_disc"] == pytest.approx((2 / 3 + 1) / 2)
  assert overall["mean"]["dice"]["dice_vertebra"] == 1.0  # case a has no vertebra
  assert overall["pooled"]["dice"]["dice_disc"] == pytest.approx(2 * 2 / (3 + 2))
  table = evaluate.format_table({"cases": rows, "overall": overall})
  assert "absent" in table and "MEAN" in table and "POOLED" in table
  assert all(k in table.splitlines()[0] for k in metrics.KEYS)


def test_within_labelled_levels_clears_a_class_beyond_its_truth_rows():
  gt = np.zeros((10, 4), np.uint8)
  gt[3:7, 1:3] = 2                       # vertebra labelled on rows 3-6 only
  gt[5, 0] = schema.set_label((0, 1))    # disc unknown there: disc is not annotated
  pred = np.zeros_like(gt)
  pred[1:9, 1:3] = 2                     # predicted on rows 1-8: rows 1-2 and 7-8 beyond
  pred[0, 0] = 1                         # a disc: absent from the truth, left alone
  got = metrics.within_labelled_levels(pred, gt)
  want = pred.copy()
  want[[1, 2, 7, 8]] = 0
  want[0, 0] = 1
  np.testing.assert_array_equal(got, want)
  assert pred[1, 1] == 2  # the input is not modified
  assert metrics.dice(metrics.counts(got, gt))["dice_vertebra"] == 1.0
  assert metrics.dice(metrics.counts(pred, gt))["dice_vertebra"] == pytest.approx(2 / 3)
  # A volume [S, H, W]: rows are axis 1, the band is the union over its slices.
  vol_gt = np.zeros((3, 10, 4), np.uint8)
  vol_gt[0, 2:4, 1] = 1
  vol_gt[2, 6, 1] = 1
  vol_pred = np.ones_like(vol_gt)
  got = metrics.within_labelled_levels(vol_pred, vol_gt)
  assert np.all(got[:, 2:7] == 1) and not got[:, :2].any() and not got[:, 7:].any()
  with pytest.raises(ValueError, match="must agree"):
    metrics.within_labelled_levels(pred, gt[:5])
