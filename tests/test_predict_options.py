"""Predict options: --save_probabilities, ensembles (--saved_model=A,B), --postprocess.

Models are hand-built threshold models (`export_testlib.write_threshold_model_dir`) with a
soft gain, so their probabilities are known in advance from the raw pixels
(`export_testlib.threshold_probabilities`, NumPy): every check compares with that
independent reference, never with the code's own output.

What each test proves:
  * --save_probabilities writes float32 [H, W, 3] (2D) / [X, Y, Z, 3] NIfTI with the
    input's affine and voxel order, equal to the reference, whose argmax is the mask;
  * an ensemble of two models with different thresholds predicts the mean of their
    reference probabilities (not either member's), in the library, spine-predict and
    spine-evaluate; the same model twice equals it alone (with TTA too);
  * --postprocess removes a planted island and keeps two discs and a vertebra
    (`remove_small_components` against a mask edited by hand; predict and evaluate);
  * each refusal (empty list element, missing member folder, a member without target
    spacing under --tta, members with other classes, a 2D input without spacing for an
    ensemble with one target-spacing member, an existing probabilities file) is one line
    and a non-zero exit, before any output.
"""
import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
from PIL import Image
import pytest

import export_testlib
from data_prep import metrics
from data_prep import orientation
from data_prep import readers
from export import evaluate_lib
from export import inference
from export import postprocess
from export import predict_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
S = export_testlib.IMAGE_SIZE
GAIN = 8.0  # soft: probabilities well inside (0, 1), so the mean is not a vote
THRESHOLDS_A = export_testlib.THRESHOLDS
THRESHOLDS_B = (60.5, 200.5)
# Not axis-aligned with RAS: display order is a permutation with flips of the stored one.
AFFINE = np.array([[0.0, 0.0, -1.2, 30.0], [-0.9, 0.0, 0.0, 5.0], [0.0, 1.1, 0.0, -8.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _export(tmp_path_factory, name, **kwargs):
  root = tmp_path_factory.mktemp(name)
  model_dir = export_testlib.write_threshold_model_dir(root / "model", **kwargs)
  return export_testlib.export_and_load(model_dir, root / "serving" / "1")


@pytest.fixture(scope="module")
def model_a(tmp_path_factory):
  return _export(tmp_path_factory, "a", thresholds=THRESHOLDS_A, gain=GAIN)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
  return _export(tmp_path_factory, "b", thresholds=THRESHOLDS_B, gain=GAIN)


@pytest.fixture(scope="module")
def spaced(tmp_path_factory):
  return _export(tmp_path_factory, "spaced", gain=GAIN, target_spacing_mm=1.0)


def _reference(image, *thresholds):
  """Mean of the members' NumPy probabilities [..., 3]."""
  return np.mean([export_testlib.threshold_probabilities(image, t, GAIN)
                  for t in thresholds], axis=0)


def _inputs(folder: pathlib.Path, seed: int = 0):
  """A 2D PNG [S, S] and a NIfTI [S, S, 4] (non-RAS affine) of random 8-bit pixels."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  png = rng.integers(0, 256, (S, S), dtype=np.uint8)
  Image.fromarray(png).save(folder / "slice.png")
  # Display slices must be S x S (the threshold model's square: no resize); the slice
  # axis is the stored one the affine makes left-right.
  vol = rng.integers(0, 256, (4, S, S)).astype(np.int16)
  nib.save(nib.Nifti1Image(vol, AFFINE), folder / "vol.nii.gz")
  return png, vol


def _run(module, *flags):
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(proc, program: str) -> str:
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith(f"{program}: error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def test_probabilities_files_match_the_reference(model_a, tmp_path):
  png, vol = _inputs(tmp_path / "in")
  written, failures = predict_lib.predict(model_a, tmp_path / "in", tmp_path / "out",
                                          progress=False, save_probabilities=True)
  assert not failures
  assert {p.name for p in written} == {
      "slice_mask.png", "slice_mask.npy", "slice_probabilities.npy",
      "vol_mask.nii.gz", "vol_probabilities.nii.gz"}
  probs = np.load(tmp_path / "out" / "slice_probabilities.npy", allow_pickle=False)
  assert probs.shape == (S, S, 3) and probs.dtype == np.float32
  np.testing.assert_allclose(probs, _reference(png, THRESHOLDS_A), atol=1e-5)
  mask = np.asarray(Image.open(tmp_path / "out" / "slice_mask.png"))
  np.testing.assert_array_equal(probs.argmax(-1), mask)
  np.testing.assert_array_equal(mask, export_testlib.threshold_labels(png))

  image = nib.load(tmp_path / "out" / "vol_probabilities.nii.gz")
  assert image.shape == vol.shape + (3,) and image.get_data_dtype() == np.float32
  source = nib.load(tmp_path / "in" / "vol.nii.gz")
  np.testing.assert_array_equal(image.affine, source.affine)
  np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)  # not an identity stand-in
  data = np.asarray(image.dataobj)
  # A pixel-wise model: in the stored voxel order the reference is pixel-wise too, so a
  # wrong reorientation of the probabilities cannot pass.
  np.testing.assert_allclose(data, _reference(vol, THRESHOLDS_A), atol=1e-5)
  labels = np.asarray(nib.load(tmp_path / "out" / "vol_mask.nii.gz").dataobj)
  np.testing.assert_array_equal(data.argmax(-1), labels)


def test_ensemble_is_the_mean_of_the_members(model_a, model_b, tmp_path):
  png, vol = _inputs(tmp_path / "in", seed=1)
  expected_2d = _reference(png, THRESHOLDS_A, THRESHOLDS_B)
  expected_3d = _reference(vol, THRESHOLDS_A, THRESHOLDS_B)
  # Neither member alone: the mean must decide some pixels differently.
  assert not np.array_equal(expected_2d.argmax(-1), export_testlib.threshold_labels(png))
  ensemble = inference.Ensemble((model_a, model_b))
  np.testing.assert_allclose(
      ensemble.probabilities(png[None].astype(np.float32))[0], expected_2d, atol=1e-5)
  display = readers.read_image(str(tmp_path / "in" / "vol.nii.gz")).image  # [S, H, W]
  np.testing.assert_allclose(
      ensemble.probabilities(display, kind=inference.VOLUME),
      _reference(display, THRESHOLDS_A, THRESHOLDS_B), atol=1e-5)

  out = tmp_path / "out"
  proc = _run("export.predict", f"--saved_model={model_a.path},{model_b.path}",
              f"--input={tmp_path / 'in'}", f"--output={out}", "--save_probabilities",
              "--nopostprocess")
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(np.load(out / "slice_probabilities.npy"), expected_2d,
                             atol=1e-5)
  np.testing.assert_array_equal(np.load(out / "slice_mask.npy"), expected_2d.argmax(-1))
  np.testing.assert_allclose(
      np.asarray(nib.load(out / "vol_probabilities.nii.gz").dataobj), expected_3d,
      atol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(nib.load(out / "vol_mask.nii.gz").dataobj), expected_3d.argmax(-1))


def test_same_model_twice_equals_it_alone(spaced):
  x = np.random.default_rng(2).integers(0, 256, (2, S, S)).astype(np.float32)
  alone = spaced.probabilities(x, (1.0, 1.0))
  np.testing.assert_allclose(alone, _reference(x, THRESHOLDS_A), atol=1e-5)
  twice = inference.Ensemble((spaced, spaced))
  for tta in (False, True):
    np.testing.assert_allclose(twice.probabilities(x, (1.0, 1.0), tta=tta),
                               spaced.probabilities(x, (1.0, 1.0), tta=tta),
                               rtol=0, atol=1e-7)


def test_evaluate_scores_the_ensemble(model_a, model_b, tmp_path):
  png, vol = _inputs(tmp_path / "images", seed=3)
  masks = tmp_path / "masks"
  masks.mkdir()
  gt_2d = export_testlib.threshold_labels(png)  # member A's labels: not the ensemble's
  np.save(masks / "slice.npy", gt_2d)
  gt_3d = export_testlib.threshold_labels(vol)
  nib.save(nib.Nifti1Image(gt_3d, AFFINE), masks / "vol.nii.gz")
  expected = {"slice": metrics.counts(
      _reference(png, THRESHOLDS_A, THRESHOLDS_B).argmax(-1), gt_2d).tolist(),
              "vol": metrics.counts(
      _reference(vol, THRESHOLDS_A, THRESHOLDS_B).argmax(-1), gt_3d).tolist()}
  report = evaluate_lib.evaluate_folders(inference.Ensemble((model_a, model_b)),
                                         tmp_path / "images", masks, progress=False)
  assert not report["failures"]
  assert {r["case_id"]: r["counts"] for r in report["cases"]} == expected
  out_json = tmp_path / "scores.json"
  proc = _run("export.evaluate", f"--saved_model={model_a.path},{model_b.path}",
              f"--images_dir={tmp_path / 'images'}", f"--masks_dir={masks}",
              f"--output_json={out_json}", "--nopostprocess")
  assert proc.returncode == 0, proc.stderr[-3000:]
  scores = json.loads(out_json.read_text())
  assert {r["case_id"]: r["counts"] for r in scores["cases"]} == expected


def _planted_volume():
  """(mask, cleaned by hand): two discs, a vertebra, and islands of each class."""
  mask = np.zeros((4, 20, 20), np.uint8)
  mask[1:3, 2:6, 2:8] = 1      # disc, 48 voxels: the largest disc
  mask[1:3, 12:15, 2:8] = 1    # disc, 36 voxels (>= 10% of 48): kept
  mask[0:4, 2:16, 10:18] = 2   # vertebra, 448 voxels
  clean = mask.copy()
  mask[3, 18, 1] = 1           # disc island, 1 voxel (< 4.8)
  mask[0, 18, 18:] = 2         # vertebra island, 2 voxels (< 44.8)
  mask[2, 16, 9] = 2           # touches the vertebra only at a corner: an island
  return mask, clean


def test_remove_small_components_removes_planted_islands():
  mask, clean = _planted_volume()
  before = mask.copy()
  np.testing.assert_array_equal(postprocess.remove_small_components(mask), clean)
  np.testing.assert_array_equal(mask, before)  # input untouched
  # A slice is cleaned in 2D: slice 3 holds no true disc, so there the disc island is
  # its class's largest component and stays (the vertebra island of slice 0 goes).
  expected_3 = clean[3].copy()
  expected_3[18, 1] = 1
  np.testing.assert_array_equal(postprocess.remove_small_components(mask[3]), expected_3)
  np.testing.assert_array_equal(postprocess.remove_small_components(mask[0]), clean[0])
  # Per class, not "largest component only": both discs stay.
  assert (postprocess.remove_small_components(mask) == 1).sum() == 48 + 36


def test_predict_and_evaluate_postprocess(model_a, tmp_path):
  # A bright square (vertebra) and a 2x2 bright island on a dark slice.
  png = np.full((S, S), 10, np.uint8)
  png[4:20, 4:20] = 240
  png[26:28, 26:28] = 240
  clean = export_testlib.threshold_labels(png)
  clean[26:28, 26:28] = 0
  (tmp_path / "in").mkdir()
  Image.fromarray(png).save(tmp_path / "in" / "s.png")
  predict_lib.predict(model_a, tmp_path / "in", tmp_path / "plain", progress=False)
  predict_lib.predict(model_a, tmp_path / "in", tmp_path / "pp", progress=False,
                      postprocess=True, save_probabilities=True)
  np.testing.assert_array_equal(np.load(tmp_path / "plain" / "s_mask.npy"),
                                export_testlib.threshold_labels(png))
  np.testing.assert_array_equal(np.load(tmp_path / "pp" / "s_mask.npy"), clean)
  # The probabilities are saved before the clean-up.
  np.testing.assert_array_equal(
      np.load(tmp_path / "pp" / "s_probabilities.npy").argmax(-1),
      export_testlib.threshold_labels(png))
  masks = tmp_path / "masks"
  masks.mkdir()
  np.save(masks / "s.npy", clean)
  for flag in (False, True):
    report = evaluate_lib.evaluate_folders(model_a, tmp_path / "in", masks,
                                           progress=False, postprocess=flag)
    pred = clean if flag else export_testlib.threshold_labels(png)
    assert report["cases"][0]["counts"] == metrics.counts(pred, clean).tolist(), flag


def test_check_ensemble_refuses_other_classes():
  def model(path, num_classes):
    return inference.LoadedModel(module=None, path=path, metadata={}, image_size=None,
                                 target_spacing_mm=None, num_classes=num_classes)
  a, b = model("runs/a/1", 3), model("runs/b/1", 2)
  assert inference.Ensemble((a, a)).members == (a, a)
  with pytest.raises(inference.InputError, match=r"^runs/b/1: ensemble members must "
                     r"give the same classes: 3 in runs/a/1, found 2$"):
    inference.Ensemble((a, b))


@pytest.mark.parametrize("value", ["", "a,", ",a", "a,,b", "a, ,b"])
def test_parse_model_list_refuses_empty_elements(value):
  with pytest.raises(inference.InputError, match="found an empty element"):
    inference.parse_model_list(value)
  assert inference.parse_model_list("x/1, y/1") == ["x/1", "y/1"]


def test_ensemble_with_a_spaced_member_needs_a_2d_spacing(model_a, spaced, tmp_path):
  Image.fromarray(np.zeros((S, S), np.uint8)).save(tmp_path / "a.png")
  case = inference.read_input(tmp_path / "a.png")
  assert inference.spacing_for(model_a, case) is None
  with pytest.raises(inference.InputError, match=f"{spaced.path}.*--spacing_2d_mm"):
    inference.spacing_for(inference.Ensemble((model_a, spaced)), case)
  known = inference.read_input(tmp_path / "a.png", (0.5, 0.5))
  assert inference.spacing_for(inference.Ensemble((model_a, spaced)), known) == (0.5, 0.5)


def test_cli_refusals_are_one_line(model_a, spaced, tmp_path):
  png, _ = _inputs(tmp_path / "in")
  del png
  out = tmp_path / "out"
  missing = tmp_path / "nowhere"
  cases = [
      (["--saved_model=" + f"{model_a.path},", f"--input={tmp_path / 'in'}"],
       "found an empty element"),
      ([f"--saved_model={model_a.path},{missing}", f"--input={tmp_path / 'in'}"],
       f"{missing}: SavedModel directory does not exist"),
      ([f"--saved_model={spaced.path},{model_a.path}", f"--input={tmp_path / 'in'}",
        "--tta"], f"({model_a.path} has none)"),
  ]
  for flags, expected in cases:
    line = _one_error_line(_run("export.predict", *flags, f"--output={out}"),
                           "spine-predict")
    assert expected in line, line
  assert not out.exists()  # refused before any output

  # An existing probabilities file is kept: the input fails, its mask is not written.
  out.mkdir()
  (out / "slice_probabilities.npy").write_bytes(b"keep")
  proc = _run("export.predict", f"--saved_model={model_a.path}",
              f"--input={tmp_path / 'in' / 'slice.png'}", f"--output={out}",
              "--save_probabilities")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  lines = [l.strip() for l in proc.stderr.splitlines() if "slice_probabilities" in l]
  assert len(lines) == 1 and lines[0].endswith("exists; pass --overwrite"), proc.stderr
  assert (out / "slice_probabilities.npy").read_bytes() == b"keep"
  assert not (out / "slice_mask.png").exists()


def test_evaluate_within_labelled_levels(model_a, tmp_path):
  """A 2D slice and a non-RAS volume whose truth labels the vertebra on some rows only:
  --within_labelled_levels scores the prediction cleared beyond those rows (display
  order: rows superior -> inferior), the default scores every pixel."""
  png = np.full((S, S), 10, np.uint8)
  png[2:30, 8:20] = 240                   # the model predicts vertebra on rows 2-29
  gt_2d = np.zeros((S, S), np.uint8)
  gt_2d[10:20, 8:20] = 2                  # labelled on rows 10-19 only
  (tmp_path / "images").mkdir()
  masks = tmp_path / "masks"
  masks.mkdir()
  Image.fromarray(png).save(tmp_path / "images" / "slice.png")
  np.save(masks / "slice.npy", gt_2d)
  vol = np.full((6, S, S), 10, np.uint8)  # display order [L-R, S-I, A-P]
  vol[1:5, 2:30, 8:20] = 240
  gt_vol = np.zeros_like(vol)
  gt_vol[1:5, 12:24, 8:20] = 2
  transform = orientation.display_transform(AFFINE)
  stored = lambda a: orientation.from_display(a, transform)  # noqa: E731
  nib.save(nib.Nifti1Image(stored(vol), AFFINE), tmp_path / "images" / "vol.nii.gz")
  nib.save(nib.Nifti1Image(stored(gt_vol), AFFINE), masks / "vol.nii.gz")
  pred_2d, pred_vol = (export_testlib.threshold_labels(a) for a in (png, vol))
  cleared_2d, cleared_vol = pred_2d.copy(), pred_vol.copy()
  cleared_2d[:10] = cleared_2d[20:] = 0
  cleared_vol[:, :12] = cleared_vol[:, 24:] = 0
  for within, want in ((False, {"slice": metrics.counts(pred_2d, gt_2d),
                                "vol": metrics.counts(pred_vol, gt_vol)}),
                       (True, {"slice": metrics.counts(cleared_2d, gt_2d),
                               "vol": metrics.counts(cleared_vol, gt_vol)})):
    report = evaluate_lib.evaluate_folders(model_a, tmp_path / "images", masks,
                                           progress=False, within_levels=within)
    assert not report["failures"]
    got = {r["case_id"]: r["counts"] for r in report["cases"]}
    assert got == {k: v.tolist() for k, v in want.items()}, within
    dice = {r["case_id"]: r["dice"]["dice_vertebra"] for r in report["cases"]}
    assert (dice == {"slice": 1.0, "vol": 1.0}) == within
  proc = _run("export.evaluate", f"--saved_model={model_a.path}",
              f"--data_dir={tmp_path}", "--within_labelled_levels")
  assert proc.returncode != 0
  assert "--within_labelled_levels applies to --images_dir only" in proc.stderr
  proc = _run("export.evaluate", f"--saved_model={model_a.path}",
              f"--data_dir={tmp_path}", "--resample_masks")
  assert proc.returncode != 0
  assert "--resample_masks applies to --images_dir only" in proc.stderr
