"""spine-predict --report: sizes, flags and mosaics of predictions, and the page.

References are built by hand: masks with known voxel counts, slice spans and pieces, and
affines with a known voxel volume; the page is opened in a real headless Chromium.
"""
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
from PIL import Image
import pytest

import export_testlib
import page_check
from data_prep import readers
from export import predict_report

REPO = pathlib.Path(__file__).resolve().parents[1]
S = export_testlib.IMAGE_SIZE


@pytest.fixture(scope="module")
def threshold(tmp_path_factory):
  root = tmp_path_factory.mktemp("threshold")
  model_dir = export_testlib.write_threshold_model_dir(root / "model")
  return export_testlib.export_and_load(model_dir, root / "serving" / "1")


def _predict(*flags):
  return subprocess.run([sys.executable, "-m", "export.predict", *flags], cwd=REPO,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                        capture_output=True, text=True, timeout=300)


def _volume_case(shape=(9, 20, 20), zooms=(2.0, 1.0, 1.5)):
  rng = np.random.default_rng(0)
  image = rng.random(shape).astype(np.float32) * 100
  return readers.Case(case_id="v", image=image, mask=None, spacing=zooms[1:],
                      image_path="/data/v.nii.gz", kind="3d",
                      affine=np.diag(list(zooms) + [1.0]), original_shape=shape,
                      transform=None)


def _2d_case(spacing=None, shape=(24, 30)):
  image = np.arange(np.prod(shape), dtype=np.float32).reshape((1,) + shape)
  return readers.Case(case_id="s", image=image, mask=None, spacing=spacing or (1.0, 1.0),
                      image_path="/data/s.png", kind="2d", original_shape=shape,
                      spacing_known=spacing is not None)


def test_volume_sizes_slices_and_pieces_match_the_planted_mask():
  case = _volume_case()
  mask = np.zeros(case.image.shape, np.uint8)
  mask[3:6, 2:6, 2:8] = 1  # one disc block: 3 slices x 4 x 6 = 72 voxels
  mask[3:6, 10:14, 2:8] = 1  # a second disc, apart from the first
  mask[2:8, 16:19, 10:19] = 2  # one vertebra: 6 x 3 x 9 = 162 voxels
  entry = predict_report.summarize(case, mask)
  voxel = 2.0 * 1.0 * 1.5
  assert entry.unit == "mm^3"
  assert entry.size == {1: pytest.approx(144 * voxel), 2: pytest.approx(162 * voxel)}
  assert entry.slices == {1: 3, 2: 6}
  assert entry.components == {1: 2, 2: 1}
  assert entry.flags == []
  # The middle slice and two neighbours each side (step 1 for 9 slices).
  assert predict_report.shown_slices(9) == [2, 3, 4, 5, 6]


def test_flags_empty_few_slices_and_fragmented():
  case = _volume_case()
  mask = np.zeros(case.image.shape, np.uint8)
  mask[4, 5, 5] = 2  # vertebra in one slice only
  entry = predict_report.summarize(case, mask, min_slices=3)
  assert entry.flags == ["empty: no disc predicted",
                         "few slices: vertebra in 1 sagittal slice(s), expected >= 3"]
  # 5 x 5 isolated voxels (one apart) in each of 2 slices: 50 face-connected pieces.
  mask = np.zeros(case.image.shape, np.uint8)
  mask[1, 0:10:2, 0:10:2] = 1
  mask[2, 1:11:2, 1:11:2] = 1  # diagonal to the first: still separate pieces
  mask[0:9, 15:18, 15:18] = 2
  entry = predict_report.summarize(case, mask, min_slices=2, max_components=30)
  assert entry.components[1] == 50
  assert entry.flags == ["fragmented: disc in 50 pieces, expected <= 30"]
  assert predict_report.summarize(case, mask, min_slices=2,
                                  max_components=50).flags == []


def test_2d_units_follow_the_known_spacing():
  mask = np.zeros((24, 30), np.uint8)
  mask[2:5, 3:7] = 1
  mask[10:20, 0:30] = 2
  plain = predict_report.summarize(_2d_case(), mask)
  assert (plain.unit, plain.size) == ("px", {1: 12.0, 2: 300.0})
  assert plain.slices == {1: 1, 2: 1} and plain.components == {1: 1, 2: 1}
  spaced = predict_report.summarize(_2d_case((0.5, 0.8)), mask)
  assert spaced.unit == "mm^2"
  assert spaced.size == {1: pytest.approx(12 * 0.4), 2: pytest.approx(300 * 0.4)}
  assert spaced.mosaic.shape == (24 + 8, 30 + 8, 3)  # one tile, gap 4 around it
  with pytest.raises(ValueError, match="differ in shape"):
    predict_report.summarize(_2d_case(), mask[:10])


def test_report_page_lists_flagged_inputs_first_and_renders(tmp_path):
  case = _volume_case()
  good = np.zeros(case.image.shape, np.uint8)
  good[2:7, 2:6, 2:8] = 1
  good[2:7, 10:14, 2:8] = 2
  entries = [predict_report.summarize(case, good),
             predict_report.summarize(_2d_case(), np.zeros((24, 30), np.uint8))]
  out = predict_report.write(tmp_path / "report", entries,
                             [("/data/bad.png", "/data/bad.png: unreadable")],
                             title="spine-predict report", settings={"tta": False},
                             overwrite=False)
  html = (out / "index.html").read_text()
  assert html.index("/data/s.png") < html.index("/data/v.nii.gz")  # flagged first
  assert "empty: no disc predicted" in html and "/data/bad.png: unreadable" in html
  assert sorted(p.name for p in out.glob("*.png")) == ["0001_v.nii.gz.png",
                                                       "0002_s.png.png"]
  with pytest.raises(FileExistsError, match="--overwrite"):
    predict_report.write(tmp_path / "report", entries, [], title="t", settings={},
                         overwrite=False)
  if page_check.find_browser() is None:
    pytest.skip(page_check.missing_reason())
  result = page_check.check_page(out / "index.html")
  assert result.console_errors == [] and result.broken_images == []
  assert result.images == 2


def test_predict_cli_report_and_default_clean_up(threshold, tmp_path):
  # A 2D slice: a vertebra square and a 2x2 island; a volume [4, S, S] (RAS, 2 x 1 x 1
  # mm): a disc block in 3 slices, nothing else.
  inputs = tmp_path / "in"
  inputs.mkdir()
  png = np.full((S, S), 10, np.uint8)
  png[4:20, 4:20] = 240
  png[26:28, 26:28] = 240
  Image.fromarray(png).save(inputs / "a.png")
  vol = np.full((4, S, S), 10, np.uint8)
  vol[1:4, 5:9, 5:15] = 120
  nib.save(nib.Nifti1Image(vol, np.diag([2.0, 1.0, 1.0, 1.0])), inputs / "b.nii.gz")
  out = tmp_path / "out"
  proc = _predict(f"--saved_model={threshold.path}", f"--input={inputs}",
                  f"--output={out}", "--report")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cleaned = export_testlib.threshold_labels(png)
  assert cleaned[26, 26] == 2
  cleaned[26:28, 26:28] = 0  # the default --postprocess removes the island
  np.testing.assert_array_equal(np.asarray(Image.open(out / "a_mask.png")), cleaned)
  html = (out / "report" / "index.html").read_text()
  # The slice has no disc (flagged), the volume no vertebra (flagged): sizes by hand.
  assert "empty: no disc predicted" in html and "empty: no vertebra predicted" in html
  assert f"<td class=\"num\">{16 * 16}</td>" in html  # the slice's vertebra, px
  assert f"<td class=\"num\">{3 * 4 * 10 * 2}</td>" in html  # the volume's disc, mm^3
  assert sorted(p.name for p in (out / "report").glob("*.png")) == [
      "0001_a.png.png", "0002_b.nii.gz.png"]
  # Again: the masks exist and so does the report; refused before any work, one line.
  again = _predict(f"--saved_model={threshold.path}", f"--input={inputs}",
                   f"--output={out}", "--report", "--nopostprocess")
  assert again.returncode == 1 and "Traceback" not in again.stderr
  assert "--report" in again.stderr and "--overwrite" in again.stderr
  again = _predict(f"--saved_model={threshold.path}", f"--input={inputs}",
                   f"--output={out}", "--report", "--nopostprocess", "--overwrite")
  assert again.returncode == 0, again.stderr[-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(out / "a_mask.png")),
                                export_testlib.threshold_labels(png))
  if page_check.find_browser() is None:
    pytest.skip(page_check.missing_reason())
  result = page_check.check_page(out / "report" / "index.html")
  assert result.console_errors == [] and result.broken_images == []
  assert result.images == 2
