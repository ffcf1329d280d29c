"""orientation: display order read from the affine, exactly undone by from_display."""
import itertools

import nibabel as nib
import numpy as np
import pytest

from data_prep import orientation, readers


def _affine(perm, signs, spacing=(1.0, 2.0, 3.0)):
  """Stored axis i points along world axis perm[i] (x=R, y=A, z=S) with sign signs[i]."""
  a = np.eye(4)
  a[:3, :3] = 0
  for i, (w, s) in enumerate(zip(perm, signs)):
    a[w, i] = s * spacing[i]
  a[:3, 3] = (10.0, -20.0, 30.0)
  return a


def _world(shape, affine):
  """World coordinates [3, X, Y, Z] of every voxel."""
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
  return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape((3,) + tuple(shape))


def _check_display(shape, affine):
  world = _world(shape, affine)
  display = [orientation.to_display(w, affine)[0] for w in world]
  x, y, z = display
  # axis 0 toward Right (+x), axis 1 toward Inferior (-z), axis 2 toward Posterior (-y).
  assert np.all(np.diff(x, axis=0) > 0) and np.all(np.diff(x, axis=1) == 0)
  assert np.all(np.diff(z, axis=1) < 0) and np.all(np.diff(z, axis=0) == 0)
  assert np.all(np.diff(y, axis=2) < 0) and np.all(np.diff(y, axis=1) == 0)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_every_storage_order_reaches_display_and_round_trips(perm):
  shape = (3, 4, 5)
  rng = np.random.default_rng(0)
  for signs in itertools.product((1, -1), repeat=3):
    affine = _affine(perm, signs)
    _check_display(shape, affine)
    volume = rng.integers(0, 1000, shape).astype(np.int16)
    display, transform = orientation.to_display(volume, affine)
    back = orientation.from_display(display, transform)
    assert back.shape == volume.shape and back.dtype == volume.dtype
    np.testing.assert_array_equal(back, volume)
    sizes = orientation.display_voxel_sizes(affine, transform)
    expected = [0.0] * 3  # spacing of the stored axis pointing along each display axis
    for i, w in enumerate(perm):
      expected[{0: 0, 2: 1, 1: 2}[w]] = (1.0, 2.0, 3.0)[i]
    assert sizes == pytest.approx(tuple(expected))


def test_oblique_affine_uses_closest_axes():
  theta = np.deg2rad(20)
  rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                  [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rot @ _affine((2, 1, 0), (-1, -1, 1))[:3, :3]
  _, transform = orientation.to_display(np.zeros((2, 3, 4)), affine)
  np.testing.assert_array_equal(transform, [[1, 1], [2, 1], [0, 1]])


def test_rejects_non_3d_and_degenerate():
  with pytest.raises(ValueError, match="3D"):
    orientation.to_display(np.zeros((2, 3)), np.eye(4))
  with pytest.raises(ValueError, match="4x4"):
    orientation.to_display(np.zeros((2, 3, 4)), np.eye(3))


def _spine_extent(mask, label):
  """(row extent, column extent) of `label` in the middle third of the sagittal slices."""
  s = mask.shape[0]
  rows, cols = np.nonzero((mask[s // 3: 2 * s // 3] == label).any(axis=0))
  return rows.max() - rows.min(), cols.max() - cols.min()


@pytest.mark.parametrize("name,label,stored_codes", [("vb2_05", 2, ("I", "P", "R")),
                                                     ("ivd_11", 1, ("R", "A", "S"))])
def test_real_volumes_stored_both_ways(shared_data, name, label, stored_codes):
  image_path = shared_data / "spine3d" / "images" / f"{name}.nii.gz"
  mask_path = shared_data / "spine3d" / "masks" / f"{name}.nii.gz"
  stored = nib.load(mask_path)
  assert nib.aff2axcodes(stored.affine) == stored_codes
  case = readers.read_case(image_path, mask_path)
  raw = np.asanyarray(stored.dataobj)
  # The slice axis is the stored axis whose world direction is left-right.
  lr_axis = [c in "LR" for c in stored_codes].index(True)
  assert case.image.shape[0] == raw.shape[lr_axis] == case.mask.shape[0]
  assert case.original_shape == raw.shape
  np.testing.assert_array_equal(orientation.from_display(case.mask, case.transform), raw)
  image_raw = np.asanyarray(nib.load(image_path).dataobj)
  np.testing.assert_array_equal(orientation.from_display(case.image, case.transform),
                                image_raw.astype(np.float32))
  # A lumbar spine is a vertical stack: taller (rows) than deep (columns) in display.
  height, depth = _spine_extent(case.mask, label)
  assert height > 2 * depth
  _check_display((3, 4, 5), stored.affine)
  assert case.spacing == (1.0, 1.0)
