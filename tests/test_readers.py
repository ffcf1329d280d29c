"""readers: pairing by stem, every 2D/NIfTI flavour, and a clear error for each bad input."""
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_prep import readers


def _png(path, array, mode=None):
  Image.fromarray(array, mode=mode).save(path)
  return str(path)


def _nifti(path, array, affine=None):
  nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
  return str(path)


def test_pair_files_by_stem_with_orphans_and_nnunet(tmp_path):
  img, msk = tmp_path / "images", tmp_path / "masks"
  img.mkdir()
  msk.mkdir()
  for name in ("b.png", "a.png", "10.png", "2.png", "lonely.png", "notes.txt", "c_0000.nii.gz"):
    (img / name).write_bytes(b"x")
  for name in ("a.npy", "b.png", "10.npy", "2.npy", "extra.npy", "c.nii.gz"):
    (msk / name).write_bytes(b"x")
  pairs, orphans = readers.pair_files(img, msk)
  assert [p[0] for p in pairs] == ["2", "10", "a", "b", "c"]
  assert pairs[-1][1].endswith("c_0000.nii.gz") and pairs[-1][2].endswith("c.nii.gz")
  assert pairs[2][2].endswith("a.npy")
  reasons = {p.split("/")[-1]: why for p, why in orphans}
  assert set(reasons) == {"lonely.png", "notes.txt", "extra.npy"}
  assert "no mask named lonely" in reasons["lonely.png"]
  assert "no image named extra" in reasons["extra.npy"]
  assert "unsupported" in reasons["notes.txt"]


def test_pair_files_ambiguous_and_missing_dirs(tmp_path):
  img, msk = tmp_path / "images", tmp_path / "masks"
  img.mkdir()
  msk.mkdir()
  (img / "a.png").write_bytes(b"x")
  (img / "a.tif").write_bytes(b"x")
  (msk / "a.npy").write_bytes(b"x")
  pairs, orphans = readers.pair_files(img, msk)
  assert pairs == [] and len(orphans) == 3 and all("ambiguous" in w for _, w in orphans)
  with pytest.raises(readers.InputError, match="does not exist"):
    readers.pair_files(tmp_path / "nope", msk)
  (tmp_path / "empty").mkdir()
  with pytest.raises(readers.InputError, match="empty.*is empty|is empty"):
    readers.pair_files(img, tmp_path / "empty")


def test_real_spine2d_pairs(shared_data):
  pairs, orphans = readers.pair_files(shared_data / "spine2d" / "images",
                                      shared_data / "spine2d" / "masks")
  assert len(pairs) == 15 and orphans == []
  case = readers.read_case(pairs[0][1], pairs[0][2])
  assert case.image.shape == case.mask.shape == (1, 256, 256)
  assert case.image.dtype == np.float32 and case.kind == "2d" and case.spacing == (1.0, 1.0)


@pytest.mark.parametrize("suffix,dtype,mode", [(".png", np.uint8, None),
                                               (".png", np.uint16, None),
                                               (".tif", np.float32, "F"),
                                               (".jpg", np.uint8, None)])
def test_2d_formats(tmp_path, suffix, dtype, mode):
  rng = np.random.default_rng(0)
  image = (rng.random((12, 9)) * (250 if dtype == np.uint8 else 60000)).astype(dtype)
  path = _png(tmp_path / f"x{suffix}", image, mode)
  mask = rng.integers(0, 3, (12, 9)).astype(np.uint8)
  mask_path = _png(tmp_path / "x_mask.png", mask)
  case = readers.read_case(path, mask_path)
  assert case.image.shape == (1, 12, 9) and case.case_id == "x"
  if suffix != ".jpg":  # JPEG is lossy
    np.testing.assert_array_equal(case.image[0], image.astype(np.float32))
  np.testing.assert_array_equal(case.mask[0], mask)
  assert readers.read_image(path).mask is None


def test_nifti_float_labels_accepted_when_integral(tmp_path):
  image = _nifti(tmp_path / "v.nii.gz", np.ones((4, 5, 6), np.float32))
  mask = _nifti(tmp_path / "m.nii.gz", np.full((4, 5, 6), 2.0, np.float32))
  case = readers.read_case(image, mask)
  assert case.mask.dtype == np.int32 and case.mask.max() == 2 and case.kind == "3d"
  assert case.image.shape == (4, 6, 5)  # RAS -> (R, I, P)


def _expect(match, path, fn, *args, **kwargs):
  with pytest.raises(readers.InputError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert str(path) in message, message
  assert all(m in message for m in match), message


def test_bad_2d_inputs(tmp_path):
  good = _png(tmp_path / "good.png", np.zeros((8, 8), np.uint8))
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  _expect(["unreadable image"], corrupt, readers.read_image, corrupt)
  rgb = _png(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8))
  _expect(["grayscale", "RGB", "3 channel"], rgb, readers.read_image, rgb)
  nan = tmp_path / "nan.tif"
  Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(nan)
  _expect(["finite", "64 NaN/Inf"], nan, readers.read_image, nan)
  frac = tmp_path / "frac.npy"
  np.save(frac, np.full((8, 8), 0.5))
  _expect(["integer label mask", "0.5"], frac, readers.read_case, good, frac)
  obj = tmp_path / "obj.npy"
  np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  _expect(["unreadable .npy"], obj, readers.read_case, good, obj)
  small = tmp_path / "small.npy"
  np.save(small, np.zeros((8, 7), np.int64))
  _expect(["(8, 7)", "(8, 8)", "does not match"], small, readers.read_case, good, small)
  three = tmp_path / "three.npy"
  np.save(three, np.zeros((1, 8, 8), np.int64))
  _expect(["2D mask", "(1, 8, 8)"], three, readers.read_case, good, three)


def test_bad_nifti_inputs(tmp_path):
  good = _nifti(tmp_path / "good.nii.gz", np.zeros((4, 5, 6), np.int16))
  four = _nifti(tmp_path / "four.nii.gz", np.zeros((4, 5, 6, 2), np.int16))
  _expect(["3D", "(4, 5, 6, 2)", "4D"], four, readers.read_image, four)
  # A trailing singleton axis carries no data and is accepted.
  assert readers.read_image(_nifti(tmp_path / "t.nii.gz",
                                   np.zeros((4, 5, 6, 1), np.int16))).image.shape == (4, 6, 5)
  corrupt = tmp_path / "corrupt.nii.gz"
  corrupt.write_bytes(open(good, "rb").read()[:60])
  _expect(["unreadable NIfTI"], corrupt, readers.read_image, corrupt)
  shifted = np.eye(4)
  shifted[0, 3] = 5.0
  moved = _nifti(tmp_path / "moved.nii.gz", np.zeros((4, 5, 6), np.uint8), shifted)
  _expect(["affine does not match", "good.nii.gz"], moved, readers.read_case, good, moved)
  nan = _nifti(tmp_path / "nan.nii.gz", np.full((4, 5, 6), np.inf, np.float32))
  _expect(["finite", "NaN/Inf"], nan, readers.read_image, nan)
  png_mask = _png(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
  _expect(["expected a NIfTI label volume"], png_mask, readers.read_case, good, png_mask)


def test_real_mismatched_pair(shared_data):
  image = shared_data / "spine3d" / "images" / "vb2_04.nii.gz"
  mask = shared_data / "spine3d" / "masks" / "vb2_04.nii.gz"
  _expect(["(381, 381, 77)", "(381, 381, 76)", "does not match"], mask,
          readers.read_case, image, mask)


def test_resample_masks_copies_a_label_volume_a_slice_longer(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 200, (6, 7, 5)).astype(np.uint8)
  labels = np.zeros((6, 7, 6), np.uint8)  # one slice more than the image, same affine
  labels[1:4, 2:5, 1:4] = 2
  affine = np.diag([1.0, 1.0, 2.0, 1.0])
  img = _nifti(tmp_path / "v.nii.gz", image, affine)
  msk = _nifti(tmp_path / "m.nii.gz", labels, affine)
  _expect(["(6, 7, 6)", "(6, 7, 5)", "--resample_masks"], msk, readers.read_case, img, msk)
  case = readers.read_case(img, msk, resample_masks=True)
  same = readers.read_case(img, _nifti(tmp_path / "cut.nii.gz", labels[:, :, :5], affine))
  np.testing.assert_array_equal(case.mask, same.mask)
  assert (case.mask == 2).sum() == 27


def test_resample_masks_nearest_neighbour_from_a_coarser_shifted_grid(tmp_path):
  image = np.zeros((8, 6, 4), np.float32)
  coarse = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2) % 3
  # 2 mm voxels whose centres lie a quarter mm before the image's: fine voxel i (centre
  # i mm) is nearest to coarse voxel round((i + 0.25) / 2).
  coarse_affine = np.diag([2.0, 2.0, 2.0, 1.0])
  coarse_affine[:3, 3] = -0.25
  coarse = np.pad(coarse, ((0, 1), (0, 1), (0, 1)))  # covers the fine grid's far edge
  img = _nifti(tmp_path / "v.nii.gz", image)
  msk = _nifti(tmp_path / "m.nii.gz", coarse, coarse_affine)
  case = readers.read_case(img, msk, resample_masks=True)
  idx = [np.rint((np.arange(n) + 0.25) / 2).astype(int) for n in image.shape]
  expected = coarse[np.ix_(*idx)]
  np.testing.assert_array_equal(case.mask, readers.read_case(
      img, _nifti(tmp_path / "e.nii.gz", expected)).mask)


def test_resample_masks_refuses_to_lose_labels_or_invent_them(tmp_path):
  img = _nifti(tmp_path / "v.nii.gz", np.zeros((6, 7, 5), np.uint8))
  labels = np.zeros((6, 7, 6), np.uint8)
  labels[2, 3, 5] = 1  # on the extra slice, outside the image
  lost = _nifti(tmp_path / "lost.nii.gz", labels)
  _expect(["1 labelled voxels lie outside", "v.nii.gz"], lost, readers.read_case, img, lost,
          resample_masks=True)
  short = _nifti(tmp_path / "short.nii.gz", np.zeros((6, 7, 4), np.uint8))
  _expect(["does not cover the whole", "v.nii.gz"], short, readers.read_case, img, short,
          resample_masks=True)


def test_real_mismatched_pair_resampled(shared_data):
  image = shared_data / "spine3d" / "images" / "vb2_04.nii.gz"
  mask = shared_data / "spine3d" / "masks" / "vb2_04.nii.gz"
  case = readers.read_case(image, mask, resample_masks=True)
  stored = np.asarray(nib.load(str(mask)).dataobj)
  assert case.mask.shape == case.image.shape
  assert (case.mask == 2).sum() == (stored == 2).sum()  # the extra slice holds no label
