"""The synthetic spine phantom: deterministic, exact labels, both raw formats readable."""
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_prep import phantom
from data_prep import readers


def _runs(sequence):
  """Collapses consecutive repeats: [2, 2, 1, 1, 2] -> [2, 1, 2]."""
  return [v for i, v in enumerate(sequence) if i == 0 or v != sequence[i - 1]]


@pytest.mark.parametrize("shape,dtype", [((64, 64), np.uint8), ((96, 80), np.uint16),
                                         ((256, 256), np.uint8)])
def test_slice_shapes_labels_and_determinism(shape, dtype):
  image, mask = phantom.make_slice(np.random.default_rng(7), *shape, dtype=dtype)
  again, mask_again = phantom.make_slice(np.random.default_rng(7), *shape, dtype=dtype)
  other, _ = phantom.make_slice(np.random.default_rng(8), *shape, dtype=dtype)
  assert image.shape == mask.shape == shape
  assert image.dtype == dtype and mask.dtype == np.uint8
  assert set(np.unique(mask)) == {0, 1, 2}
  np.testing.assert_array_equal(image, again)
  np.testing.assert_array_equal(mask, mask_again)
  assert not np.array_equal(image, other)
  assert image.max() > image.min()


def test_slice_anatomy_is_stacked_and_canal_is_posterior():
  image, mask = phantom.make_slice(np.random.default_rng(3), 256, 256)
  # Top to bottom, the labelled rows alternate vertebra / disc: a stacked column.
  row_label = [int(np.bincount(r[r > 0]).argmax()) for r in mask if (r > 0).any()]
  runs = _runs(row_label)
  assert runs.count(2) >= 4 and runs.count(1) >= 3
  assert all(a != b for a, b in zip(runs, runs[1:]))
  # Discs are brighter than vertebral bodies on average, and the brightest column band
  # just posterior (right) of the bodies is CSF, brighter than the bodies themselves.
  assert image[mask == 1].mean() > image[mask == 2].mean()
  rows = np.flatnonzero((mask == 2).any(axis=1))
  behind = [image[r, np.flatnonzero(mask[r] == 2).max() + 1:][:30].max() for r in rows]
  assert np.median(behind) > 1.5 * image[mask == 2].mean()


@pytest.mark.parametrize("orientation", ["RAS", "IPR", "LPS"])
def test_volume_affine_orientation_and_sagittal_axis(orientation):
  volume, labels, affine = phantom.make_volume(np.random.default_rng(1), 48, 40, 12,
                                               orientation)
  assert nib.aff2axcodes(affine) == tuple(orientation)
  assert volume.shape == labels.shape
  assert set(np.unique(labels)) == {0, 1, 2}
  canonical = nib.as_closest_canonical(nib.Nifti1Image(labels, affine))
  ras = np.asarray(canonical.dataobj)
  # Left-right is the axis of the 12 sagittal slices; S-I and A-P keep the in-plane size.
  assert ras.shape == (12, 40, 48)
  per_slice = (ras > 0).sum(axis=(1, 2))
  assert per_slice[6] > 0 and per_slice[6] >= per_slice[0]
  # Inferior -> superior along the mid-sagittal slice, vertebra and disc alternate.
  column = ras[6, :, :]  # [A-P (y), I-S (z)]
  z_label = [int(np.bincount(c[c > 0]).argmax()) for c in column.T if (c > 0).any()]
  assert _runs(z_label).count(1) >= 2


def test_same_case_same_volume_across_orientations():
  a = phantom.make_volume(np.random.default_rng(5), 32, 32, 6, "RAS")
  b = phantom.make_volume(np.random.default_rng(5), 32, 32, 6, "IPR")
  ca = nib.as_closest_canonical(nib.Nifti1Image(a[0], a[2]))
  cb = nib.as_closest_canonical(nib.Nifti1Image(b[0], b[2]))
  np.testing.assert_array_equal(np.asarray(ca.dataobj), np.asarray(cb.dataobj))
  np.testing.assert_allclose(ca.affine, cb.affine, atol=1e-6)


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_write_2d_dataset_reads_back(tmp_path, bit_depth):
  ids = phantom.write_2d_dataset(tmp_path / "a", 3, seed=4, bit_depth=bit_depth,
                                 min_size=48, max_size=80)
  assert ids == ["phantom-0000", "phantom-0001", "phantom-0002"]
  phantom.write_2d_dataset(tmp_path / "b", 3, seed=4, bit_depth=bit_depth, min_size=48,
                           max_size=80)
  for cid in ids:
    image = np.asarray(Image.open(tmp_path / "a" / "images" / f"{cid}.png"))
    mask = np.load(tmp_path / "a" / "masks" / f"{cid}.npy", allow_pickle=False)
    assert image.ndim == 2 and image.shape == mask.shape
    assert 48 <= min(image.shape) and max(image.shape) <= 80
    assert set(np.unique(mask)) <= {0, 1, 2} and (mask == 2).any()
    if bit_depth == 16:
      assert image.max() > 255  # really 16-bit samples, not 8-bit ones widened
    same = np.asarray(Image.open(tmp_path / "b" / "images" / f"{cid}.png"))
    np.testing.assert_array_equal(image, same)
  assert not list((tmp_path / "a").rglob(".tmp-*"))


def test_write_3d_dataset_reads_back(tmp_path):
  ids = phantom.write_3d_dataset(tmp_path, 2, seed=2, size=40, num_slices=8)
  codes = []
  for cid in ids:
    image = nib.load(tmp_path / "images" / f"{cid}.nii.gz")
    mask = nib.load(tmp_path / "masks" / f"{cid}.nii.gz")
    assert image.shape == mask.shape and 8 in image.shape
    np.testing.assert_allclose(image.affine, mask.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1, 2}
    codes.append("".join(nib.aff2axcodes(image.affine)))
  assert codes == ["RAS", "IPR"]
  # The converter's reader pairs every image with its mask by case id, with no orphans.
  pairs, orphans = readers.pair_files(tmp_path / "images", tmp_path / "masks")
  assert [p[0] for p in pairs] == ids and not orphans


def test_refuses_non_empty_output_without_overwrite(tmp_path):
  phantom.write_2d_dataset(tmp_path, 1, min_size=32, max_size=32)
  with pytest.raises(FileExistsError, match="not empty"):
    phantom.write_2d_dataset(tmp_path, 1, min_size=32, max_size=32)
  phantom.write_2d_dataset(tmp_path, 2, min_size=32, max_size=32, overwrite=True)
  assert len(list((tmp_path / "images").iterdir())) == 2


def test_cli_writes_and_refuses(tmp_path):
  repo = pathlib.Path(__file__).resolve().parents[1]
  cmd = [sys.executable, "-m", "data_prep.phantom", f"--output_dir={tmp_path}",
         "--format=3d", "--num_cases=1", "--size=32", "--num_slices=4"]
  done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert (tmp_path / "images" / "phantom-0000.nii.gz").is_file()
  again = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
  assert again.returncode == 1 and "not empty" in again.stderr
  assert again.stderr.startswith("spine-phantom: error: ") and again.stderr.count("\n") == 1
  assert "Traceback" not in again.stderr
