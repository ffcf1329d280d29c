"""THE overlay renderer: a slice with its labels tinted, for predict, TensorBoard and QC.

One colour per class (background untinted), one contrast stretch (P0.5..P99.5 of the
slice), one blend; `spine-predict --overlay` and the trainer's TensorBoard images use it.
Pixels labelled `schema.IGNORE_LABEL` (padding, unknown) are drawn darkened.
"""
from __future__ import annotations

import numpy as np

from data_prep import schema

# RGB per class id: disc orange, vertebra blue (distinguishable with red-green blindness).
COLORS = {1: (255, 160, 0), 2: (0, 140, 255)}
ALPHA = 0.45


def grayscale(image: np.ndarray) -> np.ndarray:
  """float [H, W] -> float32 [H, W] in 0..255, stretched between P0.5 and P99.5."""
  image = np.asarray(image, dtype=np.float32)
  lo, hi = np.percentile(image, (0.5, 99.5))
  return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255.0


def overlay_rgb(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3]: the slice (contrast-stretched) with labels tinted.

  Args:
    image: [H, W] intensities (raw or normalized).
    mask: [H, W] class ids of the same shape.
  """
  image = np.asarray(image)
  mask = np.asarray(mask)
  if image.shape != mask.shape:
    raise ValueError(f"overlay: image {image.shape} and mask {mask.shape} differ in shape")
  rgb = np.repeat(grayscale(image)[..., None], 3, axis=-1)
  for label, color in COLORS.items():
    sel = mask == label
    rgb[sel] = (1 - ALPHA) * rgb[sel] + ALPHA * np.asarray(color, np.float32)
  rgb[mask == schema.IGNORE_LABEL] *= 0.5
  return np.round(rgb).astype(np.uint8)


def side_by_side(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
  """uint8 [H, 3W, 3]: the slice | truth overlay | prediction overlay."""
  gray = np.round(np.repeat(grayscale(image)[..., None], 3, axis=-1)).astype(np.uint8)
  return np.concatenate([gray, overlay_rgb(image, truth), overlay_rgb(image, prediction)],
                        axis=1)
