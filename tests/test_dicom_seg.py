"""spine-predict --output_format=dicom_seg: a DICOM Segmentation per DICOM series.

The SEG is read back with highdicom and checked against two references computed without
`export/dicom_seg.py`: the threshold model's labels of each slice file's own pixels, and
the NIfTI mask spine-predict writes for the same series, looked up through the world
position (from the file's tags) of every pixel. The series is oblique, its in-plane axes
run against display order and its files are named out of slice order, so a frame paired
with the wrong file, or pixels transposed or flipped, would show.
"""
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import export_testlib
from data_prep import dicom
from export import portable
from export import predict_lib

hd = pytest.importorskip("highdicom")  # the optional ".[dicom_seg]" extra
pytest.importorskip("SimpleITK")
import pydicom  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
S = export_testlib.IMAGE_SIZE
# A sagittal series tilted 10 deg about left-right: columns run toward superior, rows
# toward anterior (display order has them the other way round). LPS world.
_A = np.deg2rad(10.0)
ROW_COSINE = np.array([0.0, -np.sin(_A), np.cos(_A)])      # column index -> superior
COLUMN_COSINE = np.array([0.0, -np.cos(_A), -np.sin(_A)])  # row index -> anterior
NORMAL = np.cross(ROW_COSINE, COLUMN_COSINE)
PIXEL_SPACING = (0.8, 1.2)  # between rows, between columns
STEP = 2.5
ORIGIN = np.array([-10.0, 30.0, -5.0])
UID = "1.2.826.0.1.3680043.2.1125.22.3"
NOT_DICOM = "not a DICOM series: --output_format=dicom_seg needs DICOM input"


def _pixels(num_slices=4, seed=0) -> np.ndarray:
  """[N, S, S] slices of 4x4 blocks at intensities of all three threshold classes."""
  rng = np.random.default_rng(seed)
  levels = np.array([20, 60, 120, 150, 200, 250], np.int16)
  grid = rng.integers(0, len(levels), (num_slices, S // 4, S // 4))
  return np.kron(levels[grid], np.ones((1, 4, 4), np.int16))


def _write_series(folder, pixels, uid=UID, steps=None):
  """The series with file names in reversed-then-shuffled order; `steps`: per gap (mm)."""
  steps = np.full(len(pixels) - 1, STEP) if steps is None else np.asarray(steps)
  offsets = np.r_[0.0, np.cumsum(steps)]
  order = np.random.default_rng(3).permutation(len(pixels))
  names = [f"IM{int(j):03d}.dcm" for j in order]
  return dicom.write_series(folder, pixels, ORIGIN + offsets[:, None] * NORMAL, ROW_COSINE,
                            COLUMN_COSINE, PIXEL_SPACING, STEP, uid, names=names)


@pytest.fixture(scope="module")
def threshold(tmp_path_factory):
  root = tmp_path_factory.mktemp("threshold")
  return export_testlib.export_and_load(
      export_testlib.write_threshold_model_dir(root / "model"), root / "serving" / "1")


def _predict(model, inputs, out, **kwargs):
  return predict_lib.predict(model, inputs, out, progress=False, postprocess=False,
                             **kwargs)


def _frame_labels(seg, sources) -> np.ndarray:
  """[N, rows, cols] labels of the SEG for each source file (0 where no frame)."""
  return seg.get_pixels_by_source_instance(
      source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources],
      combine_segments=True)


def _nifti_labels_at(mask_path, source) -> np.ndarray:
  """[rows, cols] labels of the NIfTI mask at the world position of a file's pixels."""
  img = nib.load(mask_path)
  r, c = np.meshgrid(np.arange(source.Rows), np.arange(source.Columns), indexing="ij")
  spacing = [float(v) for v in source.PixelSpacing]
  cosines = np.asarray([float(v) for v in source.ImageOrientationPatient])
  lps = (np.asarray([float(v) for v in source.ImagePositionPatient])
         + (c * spacing[1])[..., None] * cosines[:3]
         + (r * spacing[0])[..., None] * cosines[3:])
  voxel = nib.affines.apply_affine(np.linalg.inv(img.affine), lps * [-1.0, -1.0, 1.0])
  index = np.round(voxel).astype(int)
  np.testing.assert_allclose(voxel, index, atol=1e-3)
  return np.asarray(img.dataobj)[tuple(np.moveaxis(index, -1, 0))]


def test_seg_round_trips_to_the_nifti_mask_and_references_the_source_series(
    threshold, tmp_path):
  pixels = _pixels()
  files = _write_series(tmp_path / "in" / "spine", pixels)
  written, failures = _predict(threshold, tmp_path / "in", tmp_path / "nifti")
  assert not failures and [p.name for p in written] == ["spine_mask.nii.gz"]
  written, failures = _predict(threshold, tmp_path / "in", tmp_path / "seg",
                               output_format="dicom_seg")
  assert not failures
  assert written == [tmp_path / "seg" / "spine.seg.dcm"]
  assert sorted(os.listdir(tmp_path / "seg")) == ["spine.seg.dcm"]  # no NIfTI, no temp

  seg = hd.seg.segread(tmp_path / "seg" / "spine.seg.dcm")
  sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]  # slice order
  labels = _frame_labels(seg, sources)
  truth = export_testlib.threshold_labels(pixels)
  assert set(np.unique(truth)) == {0, 1, 2}
  np.testing.assert_array_equal(labels, truth)  # each file's frame: its own pixels' labels
  for k, source in enumerate(sources):  # the NIfTI mask, voxel for voxel
    np.testing.assert_array_equal(
        labels[k], _nifti_labels_at(tmp_path / "nifti" / "spine_mask.nii.gz", source))

  # It names the source series, and each frame its source image and that image's plane.
  assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
  assert seg.StudyInstanceUID == f"{UID}.0"
  assert seg.FrameOfReferenceUID == f"{UID}.9"
  assert seg.SeriesInstanceUID != UID
  assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [UID]
  referenced = {i.ReferencedSOPInstanceUID
                for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
  assert referenced == {ds.SOPInstanceUID for ds in sources}
  by_uid = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
  frames = []
  for frame in seg.PerFrameFunctionalGroupsSequence:
    uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    k = by_uid[uid]
    np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0]
                                .ImagePositionPatient],
                               [float(v) for v in sources[k].ImagePositionPatient],
                               atol=1e-4)
    frames.append((frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber, k))
  assert sorted(frames) == [(n, k) for n in (1, 2) for k in range(len(sources))]
  for n in (1, 2):  # each segment's frames run through the slices in order (highdicom
    ks = [k for m, k in frames if m == n]  # sorts them along its own normal's sign)
    assert ks in (sorted(ks), sorted(ks, reverse=True))
  orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
  np.testing.assert_allclose([float(v) for v in orientation.ImageOrientationPatient],
                             np.r_[ROW_COSINE, COLUMN_COSINE], atol=1e-6)


def test_segments_are_disc_and_vertebra_with_their_codes(threshold, tmp_path):
  _write_series(tmp_path / "in" / "s", _pixels(2))
  _, failures = _predict(threshold, tmp_path / "in", tmp_path / "out",
                         output_format="dicom_seg")
  assert not failures
  seg = pydicom.dcmread(tmp_path / "out" / "s.seg.dcm")
  assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
  found = [(s.SegmentNumber, s.SegmentLabel, s.SegmentAlgorithmType,
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
           for s in seg.SegmentSequence]
  assert found == [
      (1, "intervertebral disc", "AUTOMATIC", "91723000", "SCT", "360499006",
       "Intervertebral disc"),
      (2, "vertebra", "AUTOMATIC", "91723000", "SCT", "51282000", "Vertebra")]
  algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
  assert algorithm.AlgorithmName == "spineseg"


def test_cli_refuses_a_png_in_one_line_and_still_writes_the_series(threshold, tmp_path):
  _write_series(tmp_path / "in" / "series", _pixels(2))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  png = tmp_path / "in" / "a.png"
  Image.fromarray(np.full((S, S), 200, np.uint8)).save(png)
  proc = subprocess.run(
      [sys.executable, "-m", "export.predict", f"--saved_model={threshold.path}",
       f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}",
       "--output_format=dicom_seg"], cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  failed = [l.strip() for l in proc.stderr.splitlines() if l.startswith("  ")]
  assert failed == [f"{png}: {NOT_DICOM}"]
  assert proc.stderr.splitlines()[-1] == ("spine-predict: error: 1 of 2 inputs failed "
                                          "(listed above)")
  assert sorted(os.listdir(tmp_path / "out")) == ["series.seg.dcm"]
  hd.seg.segread(tmp_path / "out" / "series.seg.dcm")  # a readable SEG


def test_a_series_missing_a_uid_is_refused_in_one_line_and_the_others_written(
    threshold, tmp_path):
  _write_series(tmp_path / "in" / "good", _pixels(2))
  files = _write_series(tmp_path / "in" / "bad", _pixels(3), uid="1.2.3.4.5")
  ds = pydicom.dcmread(files[1])
  del ds.FrameOfReferenceUID  # the images' geometry is then no frame a SEG can name
  ds.save_as(files[1])
  volume = tmp_path / "in" / "v.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), volume)
  written, failures = _predict(threshold, tmp_path / "in", tmp_path / "out",
                               output_format="dicom_seg")
  bad = str(tmp_path / "in" / "bad")
  assert failures == [
      (str(volume), f"{volume}: {NOT_DICOM}"),
      (bad, f"{bad}: cannot make a DICOM-SEG: {files[1].name} lacks FrameOfReferenceUID, "
       "which a segmentation needs")]
  assert written == [tmp_path / "out" / "good.seg.dcm"]
  assert sorted(os.listdir(tmp_path / "out")) == ["good.seg.dcm"]


def test_uneven_slice_steps_are_refused_although_the_nifti_mask_takes_them(
    threshold, tmp_path):
  # Every step within 4.5% of the mean (dicom.read_series takes 5%), but they add up:
  # slice 12 lies 0.54 steps from where the series' affine puts it.
  steps = np.r_[np.full(12, 1.045 * STEP), np.full(12, 0.955 * STEP)]
  _write_series(tmp_path / "in" / "uneven", _pixels(25), steps=steps)
  _, failures = _predict(threshold, tmp_path / "in", tmp_path / "nifti")
  assert not failures
  written, failures = _predict(threshold, tmp_path / "in", tmp_path / "seg",
                               output_format="dicom_seg")
  uneven = str(tmp_path / "in" / "uneven")
  assert written == [] and len(failures) == 1
  assert failures[0][1].startswith(
      f"{uneven}: cannot make a DICOM-SEG: a slice file's Image Position (Patient) lies "
      "0.54 slices off the series' evenly spaced slices")
  assert failures[0][1].endswith("non-uniform slice spacing")
  assert os.listdir(tmp_path / "seg") == []


def test_a_failed_write_leaves_no_partial_seg(threshold, tmp_path, monkeypatch):
  _write_series(tmp_path / "in" / "s", _pixels(2))
  from export import dicom_seg  # pylint: disable=g-import-not-at-top

  def write_half_then_fail(path, seg):
    pathlib.Path(path).write_bytes(b"\0" * 128 + b"DICM")
    raise OSError(28, "No space left on device", path)

  monkeypatch.setattr(dicom_seg, "write", write_half_then_fail)
  with pytest.raises(predict_lib.OutputError) as e:
    _predict(threshold, tmp_path / "in", tmp_path / "out", output_format="dicom_seg")
  assert str(e.value).startswith(
      f"cannot write {tmp_path / 'out' / 's.seg.dcm'}: No space left on device")
  assert os.listdir(tmp_path / "out") == []


def test_without_highdicom_one_error_names_the_extra(threshold, tmp_path, monkeypatch):
  _write_series(tmp_path / "in" / "s", _pixels(2))
  monkeypatch.setitem(sys.modules, "highdicom", None)  # import fails as if not installed
  with pytest.raises(portable.MissingExtraError) as e:
    _predict(threshold, tmp_path / "in", tmp_path / "out", output_format="dicom_seg")
  message = str(e.value)
  assert message.startswith("--output_format=dicom_seg needs highdicom, which is not "
                            "installed (")
  assert message.endswith('; pip install -e ".[dicom_seg]"') and "\n" not in message
  assert not (tmp_path / "out").exists()  # refused before any work
