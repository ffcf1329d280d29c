"""Sagittal axis from the affine: volumes in display order and back again.

A NIfTI volume may be stored in any voxel order (RAS, scanner order I,P,R, ...). The
display order used by every 2D slice of spineseg is

  array axis 0: left -> right   (the sagittal slices; index increases toward Right)
  array axis 1: superior -> inferior (image rows)
  array axis 2: anterior -> posterior (image columns)

i.e. nibabel axis codes ("R", "I", "P"). The transform is always read from the affine with
nibabel's orientation codes (the closest world axis of each voxel axis), never assumed from
the array layout. `from_display` undoes `to_display` exactly (a pure permutation and flips),
so a predicted label volume can be written back in the input's voxel order and affine.
"""
from __future__ import annotations

import numpy as np
from nibabel import orientations

# Target axis codes: each code names the world direction the array axis INCREASES toward.
DISPLAY_CODES = ("R", "I", "P")


def display_transform(affine: np.ndarray) -> np.ndarray:
  """The nibabel orientation transform from the stored voxel order to display order.

  Args:
    affine: [4, 4] voxel-to-world (RAS+) affine of the volume.

  Returns:
    int array [3, 2]: row i = (display axis of stored axis i, flip +1/-1), the format of
    `nibabel.orientations.apply_orientation`.

  Raises:
    ValueError: if the affine is degenerate (an axis without a world direction).
  """
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ValueError(f"expected a finite 4x4 affine, found shape {affine.shape}")
  start = orientations.io_orientation(affine)
  if np.isnan(start).any():
    raise ValueError(f"affine has an axis with no world direction:\n{affine}")
  target = orientations.axcodes2ornt(DISPLAY_CODES)
  return orientations.ornt_transform(start, target).astype(np.int64)


def to_display(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reorders a 3D volume into display order.

  Args:
    volume: [X, Y, Z] array in stored voxel order.
    affine: its [4, 4] affine.

  Returns:
    (array, transform): array [S, H, W] in display order (a view where possible) and the
    transform to pass to `from_display`.

  Raises:
    ValueError: if the volume is not 3D or the affine is degenerate.
  """
  volume = np.asarray(volume)
  if volume.ndim != 3:
    raise ValueError(f"expected a 3D volume, found shape {volume.shape}")
  transform = display_transform(affine)
  return orientations.apply_orientation(volume, transform), transform


def inverse(transform: np.ndarray) -> np.ndarray:
  """The transform that undoes `transform` (display order back to stored order)."""
  transform = np.asarray(transform)
  inv = np.zeros_like(transform)
  for axis, (new_axis, flip) in enumerate(transform):
    inv[int(new_axis)] = (axis, flip)
  return inv


def from_display(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
  """Puts a display-order [S, H, W] array back into the stored voxel order.

  Args:
    array: [S, H, W] array as returned by `to_display` (or a prediction of its shape).
    transform: the transform `to_display` returned for the source volume.

  Returns:
    The array in the source volume's voxel order and shape; write it with the source
    volume's affine.
  """
  return orientations.apply_orientation(np.asarray(array), inverse(transform))


def display_voxel_sizes(affine: np.ndarray, transform: np.ndarray) -> tuple[float, ...]:
  """Voxel sizes in mm along the display axes (slice, row, column)."""
  sizes = np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
  out = [0.0, 0.0, 0.0]
  for axis, (new_axis, _) in enumerate(np.asarray(transform)):
    out[int(new_axis)] = float(sizes[axis])
  return tuple(out)
