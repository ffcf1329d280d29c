"""THE Dice and HD95 of spineseg: one count layout, NumPy and TF twins, one absent rule.

Used by the trainer's validation (`trainer.callbacks.SplitDice`, TensorFlow counts) and by
`spine-evaluate` (NumPy counts), so the two print the same keys and, for the same model
and split, the same numbers (tests/test_metrics.py holds the twins equal;
tests/test_trainer_train.py holds trainer and evaluate equal).

Counts: int64 [C, 3], per class c the pixel counts (|P_c & G_c|, |P_c|, |G_c|) over the
pixels whose label says whether they are c: not `schema.IGNORE_LABEL` (padding is not
anatomy), and not a set label leaving c open (an unannotated class of a partially labelled
slice). Counts add up over slices, batches, replicas and cases; Dice over a split is
computed from the summed counts, never as a mean of per-batch Dice.

Dice of class c = 2 |P_c & G_c| / (|P_c| + |G_c|). A class absent from the ground truth
is `ABSENT`: neither 0 nor 1 (the score is undefined, and an unlabelled class of a
partially labelled volume must not drag a mean up or down). Means skip absent entries.

Summary keys (`KEYS`): dice_background, dice_disc, dice_vertebra, dice_mean (over the
foreground classes present: the figure models are selected by), dice_mean_all (over all
classes present, background included).

HD95 of class c: surface voxels of P_c and G_c (foreground voxels with a face neighbour
outside the class; the array border counts as outside), the Euclidean distance in mm
from each surface voxel of one to the nearest of the other (`scipy.ndimage.
distance_transform_edt` with `sampling=` the voxel spacing), the 95th percentile of each
directed set, and the larger of the two (the symmetric form of MONAI's
`compute_hausdorff_distance(percentile=95)`). `ABSENT` if the class is absent from the
ground truth, `math.inf` if it is present there but not predicted.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from data_prep import schema

ABSENT = "absent"
KEYS = tuple(f"dice_{name}" for name in schema.CLASS_NAMES) + ("dice_mean", "dice_mean_all")


# ------------------------------------------------------------------------------ counts

def _value_tables(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """int64 [256, C] tables over the uint8 mask values: `exact[v, c]` (v is exactly c) and
  `known[v, c]` (a pixel labelled v says whether it is c: exact, or a set without c)."""
  allowed = schema.allowed_classes(np.arange(256))[:, :num_classes]
  single = allowed.sum(-1) == 1
  exact = allowed & single[:, None]
  known = ~allowed | single[:, None]
  return exact.astype(np.int64), known.astype(np.int64)


def counts(pred: np.ndarray, gt: np.ndarray,
           num_classes: int = schema.NUM_CLASSES) -> np.ndarray:
  """Per-class (intersection, predicted, true) pixel counts, int64 [C, 3].

  Args:
    pred: predicted class ids, any rank.
    gt: true labels of the same shape (uint8 values): class ids, or set labels
      (`schema.SET_LABEL`); a pixel counts for class c only where its label says whether
      it is c, so IGNORE_LABEL pixels count for no class and an unannotated class is not
      counted on the pixels that leave it open.
    num_classes: C.

  Raises:
    ValueError: if the shapes differ.
  """
  pred, gt = np.asarray(pred), np.asarray(gt)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
  # One bincount over the joint (label value, prediction) index, then [256, C] table
  # algebra: no boolean masks or copies of a whole volume per class.
  k = num_classes + 1
  g = np.clip(gt.reshape(-1), 0, 255).astype(np.intp)
  p = np.minimum(pred.reshape(-1), num_classes).astype(np.intp)
  joint = np.bincount(g * k + p, minlength=256 * k).reshape(256, k)
  return _from_joint(joint, *_value_tables(num_classes))


def _from_joint(joint, exact, known):
  """[C, 3] counts from a [256, C+1] joint histogram (NumPy or TF, same algebra)."""
  c = exact.shape[1]
  inter = (exact * joint[:, :c]).sum(0)
  predicted = (known * joint[:, :c]).sum(0)
  true = (exact * joint.sum(1)[:, None]).sum(0)
  return np.stack([inter, predicted, true], axis=1).astype(np.int64)


def tf_counts(labels, predictions, num_classes: int = schema.NUM_CLASSES):
  """TF twin of `counts`: int64 [C, 3] for integer tensors of one shape.

  Runs inside a tf.function or a distributed step; the results add across batches.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  k = num_classes + 1
  g = tf.clip_by_value(tf.reshape(tf.cast(labels, tf.int32), [-1]), 0, 255)
  p = tf.minimum(tf.reshape(tf.cast(predictions, tf.int32), [-1]), num_classes)
  joint = tf.reshape(tf.math.bincount(g * k + p, minlength=256 * k, maxlength=256 * k,
                                      dtype=tf.int64), [256, k])
  exact, known = (tf.constant(t) for t in _value_tables(num_classes))
  inter = tf.reduce_sum(exact * joint[:, :num_classes], axis=0)
  predicted = tf.reduce_sum(known * joint[:, :num_classes], axis=0)
  true = tf.reduce_sum(exact * tf.reduce_sum(joint, axis=1, keepdims=True), axis=0)
  return tf.stack([inter, predicted, true], axis=1)


def within_labelled_levels(pred: np.ndarray, gt: np.ndarray,
                            classes: Sequence[int] = schema.FOREGROUND) -> np.ndarray:
  """`pred` with each class kept only within the levels its ground truth covers.

  For each class c of `classes` present in `gt`, predictions of c in rows above the
  first or below the last row holding c in `gt` (axis -2: image rows, superior ->
  inferior, of a slice [H, W] or a display-order volume [S, H, W]) become background.
  For ground truth labelled at some levels only (e.g. vertebral bodies T11-L5: a
  predicted sacrum or T10 is unknown there, not wrong). A class absent from `gt` is
  left as predicted (its Dice is ABSENT anyway).

  Raises:
    ValueError: if the shapes differ or the arrays have fewer than 2 axes.
  """
  pred, gt = np.asarray(pred), np.asarray(gt)
  if pred.shape != gt.shape or gt.ndim < 2:
    raise ValueError(f"prediction shape {pred.shape} and ground truth {gt.shape} must "
                     "agree, with rows on axis -2")
  out = pred.copy()
  row_axes = tuple(a for a in range(gt.ndim) if a != gt.ndim - 2)
  for c in classes:
    rows = np.nonzero(np.any(gt == c, axis=row_axes))[0]
    if rows.size == 0:
      continue
    outside = np.ones(gt.shape[-2], dtype=bool)
    outside[rows[0]:rows[-1] + 1] = False
    out[(out == c) & outside[:, None]] = 0  # [H, 1] broadcasts over [..., H, W]
  return out


# -------------------------------------------------------------------------------- Dice

def mean_present(values: Sequence[float | str]) -> float | str:
  """Mean of the numeric values (ABSENT entries skipped; ABSENT if none is numeric)."""
  nums = [float(v) for v in values if v != ABSENT]
  return float(np.mean(nums)) if nums else ABSENT


def dice(class_counts: np.ndarray) -> dict[str, float | str]:
  """Dice per class and the two means (keys `KEYS`) from `counts` or sums of them.

  Returns:
    {"dice_background", "dice_disc", "dice_vertebra": Dice or ABSENT,
     "dice_mean": mean over foreground classes present (ABSENT if none),
     "dice_mean_all": mean over all classes present}.
  """
  class_counts = np.asarray(class_counts)
  per_class = []
  for inter, p, g in class_counts:
    per_class.append(ABSENT if g == 0 else float(2.0 * inter / (p + g)))
  out: dict[str, float | str] = {f"dice_{schema.CLASS_NAMES[c]}": v
                                 for c, v in enumerate(per_class)}
  out["dice_mean"] = mean_present(per_class[1:])
  out["dice_mean_all"] = mean_present(per_class)
  return out


def format_dice(summary: dict[str, float | str]) -> str:
  """`dice_disc 0.8123, dice_vertebra absent, ...`: one line for logs."""
  return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in summary.items())


# ------------------------------------------------------------------------------- HD95

def surface(mask: np.ndarray) -> np.ndarray:
  """Boolean surface of a binary mask: voxels with a face neighbour outside it."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  mask = np.asarray(mask, dtype=bool)
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  interior = ndimage.binary_erosion(mask, structure=structure, border_value=0)
  return mask & ~interior


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float | str:
  """95th percentile symmetric Hausdorff distance (mm) between two binary masks.

  Args:
    pred: binary prediction, any rank.
    gt: binary ground truth of the same shape.
    spacing: voxel size in mm along each axis (len == rank).

  Returns:
    The distance, ABSENT if `gt` is empty, math.inf if only `pred` is empty.

  Raises:
    ValueError: if shapes or the spacing length disagree.
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
  if pred.shape != gt.shape or len(spacing) != gt.ndim:
    raise ValueError(f"hd95: shapes {pred.shape} / {gt.shape} and spacing {tuple(spacing)} "
                     "must agree")
  if not gt.any():
    return ABSENT
  if not pred.any():
    return math.inf
  # Every surface point lies in the bounding box of both masks, so the nearest-surface
  # distances are the same inside the crop: a transform over far less memory and time.
  box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(pred | gt))
  surf_p, surf_g = surface(pred[box]), surface(gt[box])
  sampling = [float(s) for s in spacing]
  d_pg = ndimage.distance_transform_edt(~surf_g, sampling=sampling)[surf_p]
  d_gp = ndimage.distance_transform_edt(~surf_p, sampling=sampling)[surf_g]
  return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def hd95_per_class(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                   classes: Sequence[int] = schema.FOREGROUND) -> dict[str, float | str]:
  """HD95 (mm) of each foreground class, keyed `hd95_<class name>`."""
  pred, gt = np.asarray(pred), np.asarray(gt)
  return {f"hd95_{schema.CLASS_NAMES[c]}": hd95(pred == c, gt == c, spacing)
          for c in classes}
