"""DICOM series input of spine-predict: geometry from the tags, errors naming the folder.

The reference is computed here from the tag values written (Image Position, Image
Orientation, Pixel Spacing; DICOM's LPS world negated in x and y for NIfTI's RAS), never
from `dicom.read_series`: every voxel of the predicted label volume must sit where the
tags put its pixel and carry the threshold model's label of that pixel's intensity.
"""
import locale
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import export_testlib
from data_prep import dicom
from data_prep import readers
from export import inference
from export import predict_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
S = export_testlib.IMAGE_SIZE
try:
  import SimpleITK as sitk  # the optional ".[dicom]" extra
except ImportError:
  sitk = None
needs_sitk = pytest.mark.skipif(
    sitk is None, reason='SimpleITK is not installed (pip install -e ".[dicom]")')

# A sagittal acquisition, double oblique (12 deg about left-right, 5 deg about
# anterior-posterior), with the in-plane axes swapped against display order: the column
# index runs toward superior, the row index toward anterior. LPS world.
_A, _B = np.deg2rad(12.0), np.deg2rad(5.0)
_ROT = (np.array([[1, 0, 0], [0, np.cos(_A), -np.sin(_A)], [0, np.sin(_A), np.cos(_A)]])
        @ np.array([[np.cos(_B), 0, np.sin(_B)], [0, 1, 0], [-np.sin(_B), 0, np.cos(_B)]]))
ROW_COSINE = _ROT @ [0.0, 0.0, 1.0]       # column index -> superior
COLUMN_COSINE = _ROT @ [0.0, -1.0, 0.0]   # row index -> anterior
NORMAL = np.cross(ROW_COSINE, COLUMN_COSINE)
PIXEL_SPACING = (0.9, 1.1)  # between rows, between columns
STEP = 3.0
ORIGIN = np.array([-12.5, 40.25, -7.0])


def _pixels(num_slices=5, seed=0) -> np.ndarray:
  """[N, S, S] slices of 4x4 blocks at intensities of all three threshold classes."""
  rng = np.random.default_rng(seed)
  levels = np.array([20, 60, 120, 150, 200, 250], np.int16)
  grid = rng.integers(0, len(levels), (num_slices, S // 4, S // 4))
  return np.kron(levels[grid], np.ones((1, 4, 4), np.int16))


def _positions(num_slices) -> np.ndarray:
  return ORIGIN + np.arange(num_slices)[:, None] * STEP * NORMAL


def _write_series(folder, pixels, uid="1.2.826.0.1.3680043.2.1125.7.1"):
  """The series in shuffled file order (the reader must sort by position)."""
  order = np.random.default_rng(1).permutation(len(pixels))
  names = [f"IM{int(j):03d}.dcm" for j in np.argsort(order)]
  return dicom.write_series(folder, pixels, _positions(len(pixels)), ROW_COSINE,
                            COLUMN_COSINE, PIXEL_SPACING, STEP, uid, names=names)


def _check_tags_on_disk(files):
  """The geometry tags in the files are the values the reference below is computed from."""
  for position, path in zip(_positions(len(files)), files):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    tag = lambda key: [float(v) for v in reader.GetMetaData(key).split("\\")]
    np.testing.assert_allclose(tag("0020|0032"), position, atol=1e-5)
    np.testing.assert_allclose(tag("0020|0037"), np.r_[ROW_COSINE, COLUMN_COSINE],
                               atol=1e-7)
    np.testing.assert_allclose(tag("0028|0030"), PIXEL_SPACING)


def _world_ras(num_slices) -> np.ndarray:
  """[N, rows, cols, 3] RAS position of every pixel, from the tag values alone."""
  k, r, c = np.meshgrid(np.arange(num_slices), np.arange(S), np.arange(S), indexing="ij")
  lps = (_positions(num_slices)[k]
         + (c * PIXEL_SPACING[1])[..., None] * ROW_COSINE
         + (r * PIXEL_SPACING[0])[..., None] * COLUMN_COSINE)
  return lps * [-1.0, -1.0, 1.0]


def _check_against_tags(label_path, pixels):
  """Every pixel's label is at the voxel the tags place it in, and it is its true label."""
  img = nib.load(label_path)
  labels = np.asarray(img.dataobj)
  assert labels.ndim == 3 and labels.size == pixels.size
  world = _world_ras(len(pixels)).reshape(-1, 3)
  voxel = nib.affines.apply_affine(np.linalg.inv(img.affine), world)
  index = np.round(voxel).astype(int)
  np.testing.assert_allclose(voxel, index, atol=1e-3)  # pixel centres on voxel centres
  assert len(np.unique(index, axis=0)) == pixels.size  # one voxel per pixel: a bijection
  found = labels[tuple(index.T)]
  np.testing.assert_array_equal(found, export_testlib.threshold_labels(pixels).ravel())


@pytest.fixture(scope="module")
def threshold(tmp_path_factory):
  root = tmp_path_factory.mktemp("threshold")
  return export_testlib.export_and_load(
      export_testlib.write_threshold_model_dir(root / "model"), root / "serving" / "1")


@needs_sitk
def test_series_and_nifti_of_one_volume_give_the_same_labels_in_world_space(
    threshold, tmp_path):
  pixels = _pixels()
  inputs = tmp_path / "in"
  files = _write_series(inputs / "series", pixels)
  _check_tags_on_disk(files)
  # The same volume as NIfTI: voxel (i, j, k) = column, row, slice; affine from the tags.
  lps = np.eye(4)
  lps[:3, :3] = np.column_stack([ROW_COSINE * PIXEL_SPACING[1],
                                 COLUMN_COSINE * PIXEL_SPACING[0], NORMAL * STEP])
  lps[:3, 3] = ORIGIN
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
  nib.save(nib.Nifti1Image(pixels.transpose(2, 1, 0), affine), inputs / "volume.nii.gz")
  written, failures = predict_lib.predict(threshold, inputs, tmp_path / "out",
                                          overlay=True, progress=False)
  assert not failures
  out = tmp_path / "out"
  assert sorted(p.name for p in written) == sorted([
      "series_mask.nii.gz", "series_overlay.png", "volume_mask.nii.gz",
      "volume_overlay.png"])
  assert set(np.unique(export_testlib.threshold_labels(pixels))) == {0, 1, 2}
  for name in ("series_mask.nii.gz", "volume_mask.nii.gz"):
    _check_against_tags(out / name, pixels)
  series = nib.as_closest_canonical(nib.load(out / "series_mask.nii.gz"))
  volume = nib.as_closest_canonical(nib.load(out / "volume_mask.nii.gz"))
  np.testing.assert_allclose(series.affine, volume.affine, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(series.dataobj), np.asarray(volume.dataobj))
  header = nib.load(out / "series_mask.nii.gz").header
  assert header.get_data_dtype() == np.uint8
  assert int(header["sform_code"]) == int(header["qform_code"]) == 1
  # The model saw the same display slices: the case reads as the NIfTI one does.
  a = inference.read_input(inputs / "series")
  b = inference.read_input(inputs / "volume.nii.gz")
  assert a.case_id == "series" and a.kind == b.kind == "3d"
  np.testing.assert_array_equal(a.image, b.image)
  assert a.spacing == pytest.approx(b.spacing)
  assert a.spacing == pytest.approx(PIXEL_SPACING[::-1])  # rows run along the columns


@needs_sitk
def test_cli_predicts_series_subfolders_and_names_a_junk_one(threshold, tmp_path):
  pixels = _pixels(num_slices=3, seed=4)
  _write_series(tmp_path / "in" / "good", pixels)
  junk = tmp_path / "in" / "junk"
  junk.mkdir()
  for name in ("a.dcm", "b.dcm"):
    (junk / name).write_bytes(b"not a DICOM file" * 20)
  proc = subprocess.run(
      [sys.executable, "-m", "export.predict", f"--saved_model={threshold.path}",
       f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}",
       "--nopostprocess"], cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  failed = [l.strip() for l in proc.stderr.splitlines() if l.startswith("  ")]
  assert failed == [f"{junk}: expected one DICOM series, found no readable DICOM slice "
                    "among its 2 DICOM file(s)"]
  _check_against_tags(tmp_path / "out" / "good_mask.nii.gz", pixels)
  assert not (tmp_path / "out" / "junk_mask.nii.gz").exists()


@needs_sitk
def test_two_series_in_one_folder_is_one_error_naming_it(tmp_path):
  _write_series(tmp_path / "mixed", _pixels(3), uid="1.2.3.1")
  dicom.write_series(tmp_path / "mixed", _pixels(2, seed=2), _positions(2), ROW_COSINE,
                     COLUMN_COSINE, PIXEL_SPACING, STEP, "1.2.3.2",
                     names=["other0.dcm", "other1.dcm"])
  with pytest.raises(readers.InputError) as e:
    inference.read_input(tmp_path / "mixed")
  message = str(e.value)
  assert message.startswith(f"{tmp_path / 'mixed'}: expected one DICOM series per folder, "
                            "found 2")
  assert "1.2.3.1" in message and "1.2.3.2" in message


@needs_sitk
def test_a_missing_slice_is_refused(tmp_path):
  files = _write_series(tmp_path / "gap", _pixels(5))  # files[i]: the slice at position i
  files[2].unlink()
  with pytest.raises(readers.InputError,
                     match="one constant step apart .* found steps from 3 to 6 mm"):
    dicom.read_series(tmp_path / "gap")


@needs_sitk
def test_one_file_of_a_series_asks_for_its_folder(tmp_path):
  files = _write_series(tmp_path / "s", _pixels(2))
  with pytest.raises(readers.InputError, match=f"give the folder {tmp_path / 's'}$"):
    inference.read_input(files[0])


def test_list_inputs_takes_series_folders_alongside_files(tmp_path):
  (tmp_path / "b.nii.gz").write_bytes(b"")
  (tmp_path / "a10.png").write_bytes(b"")
  (tmp_path / "a2.png").write_bytes(b"")
  (tmp_path / "notes.txt").write_text("x")
  for sub in ("s1", "s2"):
    (tmp_path / sub).mkdir()
  (tmp_path / "s1" / "x.dcm").write_bytes(b"")
  # Another name (a UID here): a DICOM file only with the preamble and magic.
  (tmp_path / "s2" / "1.2.840.1.7").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 8)
  (tmp_path / "not_dicom").mkdir()
  (tmp_path / "not_dicom" / "IM0001").write_bytes(b"\0" * 140)
  names = [p.name for p in inference.list_inputs(tmp_path)]
  assert names == ["a2.png", "a10.png", "b.nii.gz", "s1", "s2"]
  (tmp_path / "here.dcm").write_bytes(b"")  # the folder is a series itself: listed first
  assert inference.list_inputs(tmp_path)[0] == tmp_path
  assert inference.list_inputs(tmp_path / "s2") == [tmp_path / "s2"]
  out = tmp_path / "o"
  assert predict_lib.output_paths(tmp_path / "s2", out, overlay=True) == {
      "nifti": out / "s2_mask.nii.gz", "overlay": out / "s2_overlay.png"}
  with pytest.raises(readers.InputError, match="no DICOM series"):
    inference.list_inputs(tmp_path / "not_dicom")


def test_without_simpleitk_the_error_names_the_folder_and_the_extra(tmp_path, monkeypatch):
  (tmp_path / "x.dcm").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails as if not installed
  with pytest.raises(readers.InputError) as e:
    inference.read_input(tmp_path)
  assert str(e.value) == (f"{tmp_path}: reading a DICOM series needs SimpleITK, which is "
                          'not installed: pip install -e ".[dicom]"')


@needs_sitk
def test_reading_and_writing_keep_the_process_locale(tmp_path):
  # GDCM switches the process to the C locale; after it, Python decoded subprocess output
  # as ASCII (a later test's `subprocess.run(text=True)` failed on a UTF-8 byte).
  saved = locale.setlocale(locale.LC_ALL)
  try:
    locale.setlocale(locale.LC_ALL, "C.UTF-8")
  except locale.Error:
    pytest.skip("no C.UTF-8 locale to tell a change by")
  try:
    before = locale.setlocale(locale.LC_ALL)
    dicom.write_series(tmp_path / "s", np.zeros((3, 8, 8)),
                       positions=[(0.0, 0.0, float(i)) for i in range(3)],
                       row_cosine=(1, 0, 0), column_cosine=(0, 1, 0),
                       pixel_spacing=(1.0, 1.0), slice_thickness=1.0, series_uid="1.2.3")
    assert locale.setlocale(locale.LC_ALL) == before
    assert dicom.read_series(tmp_path / "s").image.shape[0] == 8  # sagittal: x first
    assert locale.setlocale(locale.LC_ALL) == before
  finally:
    locale.setlocale(locale.LC_ALL, saved)
