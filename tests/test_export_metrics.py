"""Evaluation metrics by hand: Dice on a 2x2 table, absent classes, HD95 in mm."""
import math

import numpy as np
import pytest

from export import evaluate_lib as evaluate
from export import metrics


def test_dice_on_a_2x2_table():
  gt = np.array([[0, 1], [2, 2]])
  pred = np.array([[0, 1], [1, 2]])
  # background: 1 & 1 -> 1; disc: pred 2 px, gt 1 px, 1 shared -> 2/3; vertebra: 1 vs 2 -> 2/3.
  counts = metrics.class_counts(pred, gt)
  np.testing.assert_array_equal(counts, [[1, 1, 1], [1, 2, 1], [1, 1, 2]])
  dice = metrics.dice_from_counts(counts)
  assert dice["background"] == 1.0
  assert dice["disc"] == pytest.approx(2 / 3) and dice["vertebra"] == pytest.approx(2 / 3)
  assert dice["mean_disc_vertebra"] == pytest.approx(2 / 3)
  assert dice["mean_all"] == pytest.approx(7 / 9)


def test_absent_class_is_neither_zero_nor_one():
  gt = np.array([[0, 1], [0, 1]])
  pred = np.array([[2, 1], [0, 0]])  # vertebra predicted but absent from the truth
  dice = metrics.dice_from_counts(metrics.class_counts(pred, gt))
  assert dice["vertebra"] == metrics.ABSENT
  assert dice["disc"] == pytest.approx(2 / 3)
  assert dice["mean_disc_vertebra"] == pytest.approx(2 / 3)  # absent class skipped
  assert dice["background"] == pytest.approx(0.5)  # 1 shared of 2 + 2
  assert dice["mean_all"] == pytest.approx((0.5 + 2 / 3) / 2)
  assert metrics.mean_present([metrics.ABSENT, metrics.ABSENT]) == metrics.ABSENT
  with pytest.raises(ValueError, match="shape"):
    metrics.class_counts(pred, gt[:1])


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
  assert per_class == {"disc": metrics.ABSENT, "vertebra": pytest.approx(6.0)}


def test_distance_transform_path_equals_brute_force(monkeypatch):
  rng = np.random.default_rng(0)
  a = rng.random((7, 16, 13)) < 0.2
  b = rng.random((7, 16, 13)) < 0.1
  spacing = (3.0, 0.6, 0.8)
  brute = metrics.hd95(a, b, spacing)
  monkeypatch.setattr(metrics, "_BRUTE_FORCE_PAIRS", 0)
  assert metrics.hd95(a, b, spacing) == pytest.approx(brute, abs=1e-9)
  pts = np.argwhere(b) * spacing
  grid = np.argwhere(np.ones(b.shape, bool)) * spacing
  ref = ((grid[:, None] - pts[None]) ** 2).sum(-1).min(1).reshape(b.shape)
  np.testing.assert_allclose(metrics.squared_distance_transform(b, spacing), ref,
                             atol=1e-9)


def test_label_map():
  assert evaluate.parse_label_map("0:0,128:1,255:2") == {0: 0, 128: 1, 255: 2}
  with pytest.raises(ValueError, match="value:class"):
    evaluate.parse_label_map("0-0")
  with pytest.raises(ValueError, match="0..2"):
    evaluate.parse_label_map("5:3")
  mask = np.array([[0, 128], [255, 255]])
  np.testing.assert_array_equal(
      evaluate.apply_label_map(mask, {0: 0, 128: 1, 255: 2}, "m.png"), [[0, 1], [2, 2]])
  with pytest.raises(ValueError, match=r"m.png: mask values \[128, 255\]"):
    evaluate.apply_label_map(mask, None, "m.png")


def test_summary_means_skip_absent_and_table_says_so():
  rows = [
      {"case_id": "a", "kind": "2d", "counts": [[1, 1, 1], [1, 2, 1], [0, 0, 0]],
       "dice": metrics.dice_from_counts(np.array([[1, 1, 1], [1, 2, 1], [0, 0, 0]]))},
      {"case_id": "b", "kind": "2d", "counts": [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
       "dice": metrics.dice_from_counts(np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1]]))},
  ]
  overall = evaluate.summarize(rows)
  assert overall["mean"]["dice"]["disc"] == pytest.approx((2 / 3 + 1) / 2)
  assert overall["mean"]["dice"]["vertebra"] == 1.0  # case a has no vertebra
  assert overall["pooled"]["dice"]["disc"] == pytest.approx(2 * 2 / (3 + 2))
  table = evaluate.format_table({"cases": rows, "overall": overall})
  assert "absent" in table and "MEAN" in table and "POOLED" in table
