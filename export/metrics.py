"""Evaluation metrics on label arrays: per-class Dice and HD95, NumPy only.

Label arrays hold class ids (0 background, 1 disc, 2 vertebra) in any rank (a 2D slice or
a 3D volume); prediction and ground truth have one shape.

Dice of class c = 2 |P_c & G_c| / (|P_c| + |G_c|). A class absent from the ground truth
gets `ABSENT` (neither 0 nor 1: the score is undefined, and an unlabelled class of a
partially labelled volume must not drag a mean up or down). Means skip absent entries.

HD95 of class c: surface voxels of P_c and G_c (foreground voxels with a face neighbour
outside the class; the array border counts as outside), distances in mm using the voxel
spacing (anisotropy handled by scaling coordinates; exact nearest distances by brute
force for small surfaces, else from an exact separable squared distance transform), the
95th percentile of each directed
set of nearest-surface distances, and the larger of the two (the symmetric form MONAI's
`compute_hausdorff_distance(percentile=95)` uses). `ABSENT` if the class is absent from the
ground truth, `math.inf` if it is present there but not predicted.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ABSENT = "absent"
CLASS_NAMES = ("background", "disc", "vertebra")
# Points of one surface compared against all of the other per chunk: bounds memory to
# about _CHUNK_ELEMENTS float64 values (~32 MB).
_CHUNK_ELEMENTS = 4_000_000
# Above this many point pairs, a distance transform is cheaper than brute force.
_BRUTE_FORCE_PAIRS = 50_000_000


def class_counts(pred: np.ndarray, gt: np.ndarray,
                 num_classes: int = 3) -> np.ndarray:
  """Per class [intersection, predicted voxels, ground-truth voxels], int64 [C, 3].

  Raises:
    ValueError: if the shapes differ.
  """
  pred, gt = np.asarray(pred), np.asarray(gt)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
  out = np.zeros((num_classes, 3), dtype=np.int64)
  for c in range(num_classes):
    p, g = pred == c, gt == c
    out[c] = (np.count_nonzero(p & g), np.count_nonzero(p), np.count_nonzero(g))
  return out


def dice_from_counts(counts: np.ndarray) -> dict[str, float | str]:
  """Dice per class name plus the two means, from `class_counts` (or sums of them).

  Returns:
    {"background", "disc", "vertebra": Dice or ABSENT,
     "mean_disc_vertebra": mean over the foreground classes present (ABSENT if none),
     "mean_all": mean over all classes present, background included}.
  """
  out: dict[str, float | str] = {}
  for c, (inter, p, g) in enumerate(np.asarray(counts)):
    out[CLASS_NAMES[c]] = ABSENT if g == 0 else float(2.0 * inter / (p + g))
  fg = [out[n] for n in CLASS_NAMES[1:len(counts)]]
  out["mean_disc_vertebra"] = mean_present(fg)
  out["mean_all"] = mean_present([out[n] for n in CLASS_NAMES[:len(counts)]])
  return out


def mean_present(values: Sequence[float | str]) -> float | str:
  """Mean of the numeric values (ABSENT entries skipped; ABSENT if none is numeric)."""
  nums = [float(v) for v in values if v != ABSENT]
  return float(np.mean(nums)) if nums else ABSENT


def surface(mask: np.ndarray) -> np.ndarray:
  """Boolean surface of a binary mask: voxels with a face neighbour outside it."""
  mask = np.asarray(mask, dtype=bool)
  padded = np.pad(mask, 1, constant_values=False)
  interior = mask.copy()
  center = tuple(slice(1, -1) for _ in range(mask.ndim))
  for axis in range(mask.ndim):
    for shift in (-1, 1):
      index = list(center)
      index[axis] = slice(1 + shift, padded.shape[axis] - 1 + shift)
      interior &= padded[tuple(index)]
  return mask & ~interior


def _nearest_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """For each point of a [n, d], the distance to the nearest point of b [m, d]."""
  out = np.empty(len(a), dtype=np.float64)
  step = max(1, _CHUNK_ELEMENTS // max(len(b), 1))
  for start in range(0, len(a), step):
    chunk = a[start:start + step]
    d2 = ((chunk[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    out[start:start + step] = np.sqrt(d2.min(axis=1))
  return out


def squared_distance_transform(points: np.ndarray,
                               spacing: Sequence[float]) -> np.ndarray:
  """Squared distance (mm^2) from every voxel to the nearest True voxel of `points`.

  Exact: the separable (Saito-Toriwaki) form, min over each axis in turn of
  f(j) + (spacing * (i - j))^2. Each axis pass stops once the shift cost exceeds every
  finite distance on lines that hold a point, so near surfaces finish in a few shifts.
  """
  d = np.where(np.asarray(points, dtype=bool), 0.0, np.inf)
  for axis, step in enumerate(spacing):
    # Contiguous along the working axis: strided shifts are several times slower.
    f = np.ascontiguousarray(np.moveaxis(d, axis, -1))
    out = f.copy()
    live = np.broadcast_to(np.isfinite(f).any(axis=-1, keepdims=True), f.shape)
    for k in range(1, f.shape[-1]):
      cost = (float(step) * k) ** 2
      if k % 4 == 1 and (not live.any() or cost > out[live].max()):
        break
      np.minimum(out[..., k:], f[..., :-k] + cost, out=out[..., k:])
      np.minimum(out[..., :-k], f[..., k:] + cost, out=out[..., :-k])
    d = np.moveaxis(out, -1, axis)
  return d


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
  pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
  if pred.shape != gt.shape or len(spacing) != gt.ndim:
    raise ValueError(f"hd95: shapes {pred.shape} / {gt.shape} and spacing {spacing} "
                     "must agree")
  if not gt.any():
    return ABSENT
  if not pred.any():
    return math.inf
  # Everything outside the bounding box of both masks is background in both: crop.
  box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(pred | gt))
  surf_p, surf_g = surface(pred[box]), surface(gt[box])
  scale = np.asarray(spacing, dtype=np.float64)
  a = np.argwhere(surf_p) * scale
  b = np.argwhere(surf_g) * scale
  if len(a) * len(b) <= _BRUTE_FORCE_PAIRS:
    d_ab, d_ba = _nearest_distances(a, b), _nearest_distances(b, a)
  else:
    d_ab = np.sqrt(squared_distance_transform(surf_g, spacing)[surf_p])
    d_ba = np.sqrt(squared_distance_transform(surf_p, spacing)[surf_g])
  return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def hd95_per_class(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                   classes: Sequence[int] = (1, 2)) -> dict[str, float | str]:
  """HD95 (mm) of each foreground class, keyed by class name."""
  pred, gt = np.asarray(pred), np.asarray(gt)
  return {CLASS_NAMES[c]: hd95(pred == c, gt == c, spacing) for c in classes}
