"""spine-predict and spine-evaluate on tiny exported models: geometry, orientation, errors.

Two SavedModels: `model`, a briefly trained U-Net (orientation and geometry checks), and
`threshold`, a hand-built model labelling each pixel by its raw intensity
(`export_testlib.threshold_labels`), so that scores and written masks are checked against
a ground truth computed from the input, never against the model's own prediction.
"""
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import nibabel as nib
from nibabel import orientations
import numpy as np
from PIL import Image
import pytest

import export_testlib
import trainer_testdata
from data_prep import fileio
from data_prep import metrics
from data_prep import readers
from data_prep import schema
from export import evaluate_lib
from export import inference
from export import predict_lib
from export import serving

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
S = export_testlib.IMAGE_SIZE
threshold_labels = export_testlib.threshold_labels

# Runs a binary with one writer replaced by a full disk for files whose name holds
# sys.argv[2]: `python -c DRIVER MODULE:FUNCTION NEEDLE FLAGS...`.
FULL_DISK_DRIVER = r"""
import errno, importlib, sys
target, needle = sys.argv[1], sys.argv[2]
module_name, function = target.split(":")
module = importlib.import_module(module_name)
real = getattr(module, function)
def full(path, *args, **kwargs):
  if needle in str(path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
  return real(path, *args, **kwargs)
setattr(module, function, full)
binary = sys.argv[3]
sys.argv = [binary] + sys.argv[4:]
importlib.import_module(binary).run()
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  return export_testlib.export_and_load(export_testlib.write_model_dir(root / "model"),
                                        root / "serving" / "1")


@pytest.fixture(scope="module")
def threshold(tmp_path_factory):
  root = tmp_path_factory.mktemp("threshold")
  return export_testlib.export_and_load(
      export_testlib.write_threshold_model_dir(root / "model"), root / "serving" / "1")


def _run(args, **kwargs):
  return subprocess.run([sys.executable] + args, cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=300, **kwargs)


def _error_lines(stderr: str, program: str) -> list[str]:
  """The lines of a binary's stderr that start with `PROGRAM: error:`."""
  return [l for l in stderr.splitlines() if l.startswith(f"{program}: error:")]


def _blocks(shape=(S, S), seed=0) -> np.ndarray:
  """A uint8 slice of 4x4 blocks at intensities of all three threshold classes."""
  rng = np.random.default_rng(seed)
  levels = np.array([20, 60, 120, 150, 200, 250], np.uint8)
  grid = rng.integers(0, len(levels), (shape[0] // 4 + 1, shape[1] // 4 + 1))
  return np.kron(levels[grid], np.ones((4, 4), np.uint8))[:shape[0], :shape[1]]


def _volume(rng, shape=(6, 40, 48)):
  """A display-order [S, H, W] uint16 volume with structure (not pure noise)."""
  rows = np.linspace(0, 6 * np.pi, shape[1])[None, :, None]
  cols = np.linspace(0, 4 * np.pi, shape[2])[None, None, :]
  base = 600 + 400 * np.sin(rows) * np.cos(cols) + rng.normal(0, 40, shape)
  return np.clip(base, 0, None).astype(np.uint16)


def _save_png(path, array):
  Image.fromarray(array).save(path)


def test_nifti_in_scanner_order_and_ras_give_the_same_mask(model, tmp_path):
  display = _volume(np.random.default_rng(0))
  # Display order is (R, I, P); RAS stores x=R (display 0), y=A (display 2 reversed),
  # z=S (display 1 reversed).
  ras = display.transpose(0, 2, 1)[:, ::-1, ::-1]
  affine = np.array([[1.1, 0, 0, -30], [0, 0.9, 0, 12], [0, 0, 0.8, 5], [0, 0, 0, 1.0]])
  ras_img = nib.Nifti1Image(np.ascontiguousarray(ras), affine)
  to_ipr = orientations.ornt_transform(orientations.axcodes2ornt("RAS"),
                                       orientations.axcodes2ornt("IPR"))
  ipr_img = ras_img.as_reoriented(to_ipr)
  assert nib.aff2axcodes(ipr_img.affine) == ("I", "P", "R")
  inputs = tmp_path / "in"
  inputs.mkdir()
  nib.save(ras_img, inputs / "ras.nii.gz")
  nib.save(ipr_img, inputs / "ipr.nii")
  written, failures = predict_lib.predict(model, inputs, tmp_path / "out", overlay=True,
                                          progress=False)
  assert not failures
  out_ras = nib.load(tmp_path / "out" / "ras_mask.nii.gz")
  out_ipr = nib.load(tmp_path / "out" / "ipr_mask.nii")
  for out, src in ((out_ras, ras_img), (out_ipr, ipr_img)):
    assert out.shape == src.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, src.affine)
  pred_ras = np.asarray(out_ras.dataobj)
  to_ras = orientations.ornt_transform(orientations.axcodes2ornt("IPR"),
                                       orientations.axcodes2ornt("RAS"))
  back = np.asarray(out_ipr.as_reoriented(to_ras).dataobj)
  np.testing.assert_array_equal(back, pred_ras)
  # And it is the display-order prediction put back where each slice came from.
  expected = inference.labels(model.probabilities(display, kind=inference.VOLUME))
  expected = expected.transpose(0, 2, 1)[:, ::-1, ::-1]
  np.testing.assert_array_equal(pred_ras, expected)
  assert len(np.unique(pred_ras)) >= 2  # not a constant mask that would agree trivially
  assert (tmp_path / "out" / "ras_overlay.png").is_file()


def test_folder_mode_reports_bad_inputs_and_keeps_going(model, tmp_path):
  rng = np.random.default_rng(1)
  inputs = tmp_path / "in"
  inputs.mkdir()
  good = rng.integers(0, 256, (200, 310)).astype(np.uint8)
  _save_png(inputs / "good.png", good)
  _save_png(inputs / "good16.png", (rng.integers(0, 4000, (48, 40))).astype(np.uint16))
  np.save(inputs / "slice.npy", rng.random((37, 53)).astype(np.float32))
  _save_png(inputs / "rgb.png", rng.integers(0, 256, (20, 20, 3)).astype(np.uint8))
  (inputs / "broken.png").write_bytes(b"not a png")
  np.save(inputs / "rank3.npy", np.zeros((2, 5, 5), np.float32))
  nib.save(nib.Nifti1Image(np.zeros((8, 9), np.int16), np.eye(4)), inputs / "flat.nii.gz")
  nib.save(nib.Nifti1Image(np.zeros((5, 5, 5, 3), np.int16), np.eye(4)),
           inputs / "four_d.nii.gz")
  out = tmp_path / "out"
  written, failures = predict_lib.predict(model, inputs, out, batch_size=2, overlay=True,
                                          progress=False)
  failed = {pathlib.Path(p).name: message for p, message in failures}
  assert set(failed) == {"rgb.png", "broken.png", "rank3.npy", "flat.nii.gz",
                         "four_d.nii.gz"}
  for name, message in failed.items():
    assert message.startswith(str(inputs / name))
  assert "grayscale" in failed["rgb.png"] and "(2, 5, 5)" in failed["rank3.npy"]
  assert "3D" in failed["flat.nii.gz"] and "3D" in failed["four_d.nii.gz"]
  assert len(written) == 9  # 3 good inputs x (png, npy, overlay)
  mask = np.asarray(Image.open(out / "good_mask.png"))
  assert mask.shape == (200, 310) and mask.dtype == np.uint8 and mask.max() <= 2
  np.testing.assert_array_equal(np.load(out / "good_mask.npy"), mask)
  np.testing.assert_array_equal(mask, inference.labels(model.probabilities(good[None]))[0])
  assert np.load(out / "slice_mask.npy").shape == (37, 53)
  assert np.asarray(Image.open(out / "good_overlay.png")).shape == (200, 310, 3)
  # Existing outputs are kept without overwrite, replaced with it.
  for name in ("rgb.png", "broken.png", "rank3.npy", "flat.nii.gz", "four_d.nii.gz"):
    (inputs / name).unlink()
  _, failures = predict_lib.predict(model, inputs, out, progress=False)
  assert len(failures) == 3 and all("--overwrite" in m for _, m in failures)
  _, failures = predict_lib.predict(model, inputs, out, overwrite=True, progress=False)
  assert not failures


def test_saved_model_errors_name_the_folder(tmp_path):
  with pytest.raises(inference.InputError, match="does not exist"):
    inference.load_saved_model(tmp_path / "missing")
  with pytest.raises(inference.InputError, match="not a SavedModel"):
    inference.load_saved_model(tmp_path)
  (tmp_path / "saved_model.pb").write_bytes(b"garbage")
  with pytest.raises(inference.InputError, match=f"{tmp_path}: cannot load"):
    inference.load_saved_model(tmp_path)


def test_predict_cli_exits_non_zero_listing_failures(model, tmp_path):
  _save_png(tmp_path / "ok.png", np.full((30, 20), 9, np.uint8))
  _save_png(tmp_path / "rgb.png", np.zeros((30, 20, 3), np.uint8))
  proc = subprocess.run(
      [sys.executable, "-m", "export.predict", f"--saved_model={model.path}",
       f"--input={tmp_path}", f"--output={tmp_path / 'out'}"], cwd=REPO, env=ENV,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1] == (
      "spine-predict: error: 1 of 2 inputs failed (listed above)")
  assert "rgb.png" in proc.stderr
  assert (tmp_path / "out" / "ok_mask.png").is_file()


def _dice(pred: np.ndarray, gt: np.ndarray, c: int):
  """Dice of class c written out from its definition (ABSENT if c is not in gt)."""
  p, g = pred == c, gt == c
  if not g.any():
    return metrics.ABSENT
  return 2 * np.count_nonzero(p & g) / (np.count_nonzero(p) + np.count_nonzero(g))


def test_threshold_model_labels_are_known_in_advance(threshold):
  # The premise of the tests below: the exported model computes threshold_labels.
  image = _blocks((S, S), seed=7)
  image[0, :6] = [0, 85, 86, 170, 171, 255]  # both sides of each threshold
  expected = threshold_labels(image)
  assert set(np.unique(expected)) == {0, 1, 2}
  np.testing.assert_array_equal(
      inference.labels(threshold.probabilities(image[None]))[0], expected)


def test_evaluate_2d_folders_against_known_truth(threshold, tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  a, b = _blocks(seed=1), _blocks(seed=2)
  pred_a, pred_b = threshold_labels(a), threshold_labels(b)
  _save_png(images / "a.png", a)
  _save_png(images / "b.png", b)
  _save_png(images / "orphan.png", b)
  # Truth of a: the model's labels with a 10x12 patch relabelled, so every class loses
  # or gains pixels by a known amount.
  truth_a = pred_a.copy()
  truth_a[5:15, 8:20] = (truth_a[5:15, 8:20] + 1) % 3
  np.save(masks / "a.npy", truth_a.astype(np.int64))
  np.save(masks / "b.npy", np.zeros_like(pred_b, np.int64))  # only background
  report = evaluate_lib.evaluate_folders(threshold, images, masks, progress=False)
  assert [r["case_id"] for r in report["cases"]] == ["a", "b"]
  assert len(report["failures"]) == 1 and "orphan.png" in report["failures"][0]
  dice_a, dice_b = (r["dice"] for r in report["cases"])
  for c, name in enumerate(schema.CLASS_NAMES):
    expected = _dice(pred_a, truth_a, c)
    assert 0.5 < expected < 1.0  # neither trivial nor absent
    assert dice_a[f"dice_{name}"] == pytest.approx(expected)
  assert dice_b["dice_disc"] == dice_b["dice_vertebra"] == dice_b["dice_mean"] == "absent"
  bg = np.count_nonzero(pred_b == 0)
  assert dice_b["dice_background"] == pytest.approx(2 * bg / (bg + pred_b.size))
  # A label map translates other mask encodings to the same scores.
  lut = np.array([0, 128, 255], np.uint8)
  _save_png(masks / "a.png", lut[truth_a])
  (masks / "a.npy").unlink()
  mapped = evaluate_lib.evaluate_folders(threshold, images, masks, progress=False,
                                         label_map={0: 0, 128: 1, 255: 2})
  assert mapped["cases"][0]["dice"] == dice_a


def test_evaluate_volumes_dice_and_hd95_against_known_truth(threshold, tmp_path):
  # RAS storage [x, y, z] -> display [x, z reversed, y reversed]: 32x32 display slices
  # (the model's square, so no resampling) and 2.0 mm between sagittal slices.
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  volume = np.full((12, S, S), 20, np.uint8)
  volume[3:9, 8:24, 8:24] = 240   # vertebra: 6 x 16 x 16 voxels
  volume[3:9, 26:30, 4:28] = 128  # disc
  truth = threshold_labels(volume)
  truth[3:9, 8:24, 8:24] = 0
  truth[4:10, 8:24, 8:24] = 2     # the vertebra one slice (2.0 mm) further right
  affine = np.diag([2.0, 0.9, 0.8, 1.0])
  nib.save(nib.Nifti1Image(volume, affine), images / "v.nii.gz")
  nib.save(nib.Nifti1Image(truth, affine), masks / "v.nii.gz")
  nib.save(nib.Nifti1Image(volume[:, :, :-1], affine), images / "bad.nii.gz")
  nib.save(nib.Nifti1Image(truth, affine), masks / "bad.nii.gz")  # shape differs
  report = evaluate_lib.evaluate_folders(threshold, images, masks, progress=False)
  assert len(report["failures"]) == 1 and "bad.nii.gz" in report["failures"][0]
  (row,) = report["cases"]
  assert row["kind"] == "3d"
  assert row["dice"]["dice_disc"] == 1.0
  assert row["dice"]["dice_vertebra"] == pytest.approx(2 * 5 / 12)  # 5 of 6 layers shared
  assert row["hd95_mm"]["hd95_disc"] == 0.0
  # Every vertebra surface voxel has its twin exactly one slice away: 2.0 mm, not 0.8/0.9.
  assert row["hd95_mm"]["hd95_vertebra"] == pytest.approx(2.0)
  # --resample_masks: the label volume's extra (empty) row of voxels is dropped onto the
  # image's grid, and the pair scores as the first on its classes (background differs:
  # the image is a row smaller).
  both = evaluate_lib.evaluate_folders(threshold, images, masks, progress=False,
                                       resample_masks=True)
  assert both["failures"] == []
  resampled, same = both["cases"]
  assert (resampled["case_id"], same) == ("bad", row)
  for key in ("dice_disc", "dice_vertebra"):
    assert resampled["dice"][key] == row["dice"][key]
  assert resampled["hd95_mm"] == row["hd95_mm"]


def test_spacing_changes_nothing_for_a_model_without_target_spacing(model):
  # Fitted by the longer side, as its dataset was: a spacing is accepted and ignored, and
  # 2D inputs need none (tests/test_spacing.py covers models with a target spacing).
  rng = np.random.default_rng(2)
  assert model.target_spacing_mm is None
  images = rng.integers(0, 256, (2, 30, 50)).astype(np.uint8)
  plain = inference.labels(model.probabilities(images))
  np.testing.assert_array_equal(
      inference.labels(model.probabilities(images, (0.4, 0.9))), plain)
  volume = _volume(rng)
  np.testing.assert_array_equal(
      inference.labels(model.probabilities(volume, (0.5, 2.0), kind=inference.VOLUME)),
      inference.labels(model.probabilities(volume, kind=inference.VOLUME)))
  unknown = readers.Case(case_id="x", image=images[:1], mask=None, spacing=(1.0, 1.0),
                         image_path="x.png", spacing_known=False)
  assert inference.spacing_for(model, unknown) is None  # not refused: nothing to resample


def test_saved_model_reports_its_image_size(model, tmp_path):
  assert model.image_size == S
  assert model.metadata["normalization"]["method"] == "percentile"
  # An export without the metadata file: the size comes from the graph.
  bare = tmp_path / "bare"
  shutil.copytree(model.path, bare)
  (bare / serving.METADATA_FILE).unlink()
  loaded = inference.load_saved_model(bare)
  assert loaded.metadata == {} and loaded.image_size == S
  (bare / serving.METADATA_FILE).write_text("{not json")
  with pytest.raises(inference.InputError, match="spineseg.json: unreadable"):
    inference.load_saved_model(bare)


def test_evaluate_converted_split(model, tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=2, num_val=3,
                                            image_size=export_testlib.IMAGE_SIZE)
  report = evaluate_lib.evaluate_split(model, data_dir, "val", batch_size=2)
  assert [r["case_id"] for r in report["cases"]] == ["val0", "val1", "val2"]
  for row in report["cases"]:
    counts = np.asarray(row["counts"])
    assert counts[:, 1].sum() == counts[:, 2].sum() == 32 * 32
    assert counts[1, 2] > 0 and counts[2, 2] > 0  # the synthetic truth has both classes
  assert report["overall"]["pooled"]["dice"]["dice_mean_all"] != metrics.ABSENT
  with pytest.raises(ValueError, match="split 'test' has no shards"):
    evaluate_lib.evaluate_split(model, data_dir, "test")
  # Squares of another size than the export's: refused by name, not a graph error.
  other = trainer_testdata.write_dataset(tmp_path / "data48", num_train=1, num_val=1,
                                         image_size=48)
  with pytest.raises(ValueError, match=f"exported for {S} px"):
    evaluate_lib.evaluate_split(model, other, "val")


def test_evaluate_cli_writes_json_and_refuses_to_overwrite(model, tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  _save_png(images / "x.png", np.arange(32 * 40, dtype=np.uint16).reshape(32, 40))
  np.save(masks / "x.npy", np.ones((32, 40), np.int64))
  out_json = tmp_path / "scores.json"
  cmd = [sys.executable, "-m", "export.evaluate", f"--saved_model={model.path}",
         f"--images_dir={images}", f"--masks_dir={masks}", f"--output_json={out_json}"]
  proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  scores = json.loads(out_json.read_text())
  assert scores["cases"][0]["dice"]["dice_background"] == "absent"
  assert scores["cases"][0]["dice"]["dice_vertebra"] == "absent"
  assert "mean" in scores["overall"] and "pooled" in scores["overall"]
  proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "--overwrite" in proc.stderr


def _write_inputs(folder: pathlib.Path, count: int) -> list[np.ndarray]:
  folder.mkdir()
  slices = [_blocks(seed=10 + i) for i in range(count)]
  for i, x in enumerate(slices):
    _save_png(folder / f"in{i}.png", x)
  return slices


def test_write_error_stops_the_run_and_leaves_no_half_set(threshold, tmp_path,
                                                          monkeypatch):
  slices = _write_inputs(tmp_path / "in", 6)
  (tmp_path / "in" / "broken.png").write_bytes(b"not a png")  # a bad input, listed too
  real_npy = predict_lib._write_npy  # pylint: disable=protected-access

  def full_disk(path, array):
    # The 3rd input's second file (png, then npy, then overlay) hits a full disk.
    if "in2_mask.npy" in path:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real_npy(path, array)

  monkeypatch.setattr(predict_lib, "_write_npy", full_disk)
  out = tmp_path / "out"
  with pytest.raises(predict_lib.OutputError) as info:
    predict_lib.predict(threshold, tmp_path / "in", out, batch_size=2, overlay=True,
                        progress=False)
  error = info.value
  assert f"cannot write {out / 'in2_mask.npy'}: No space left on device" in str(error)
  failed = [pathlib.Path(p).name for p, _ in error.failures]
  assert failed == ["broken.png", "in2.png", "in3.png", "in4.png", "in5.png"]
  messages = dict(error.failures)
  assert "No space left on device" in messages[str(tmp_path / "in" / "in2.png")]
  assert all(m.startswith(p) for p, m in error.failures)
  # Inputs 1-2 are complete and right; input 3 has nothing, not even its finished PNG;
  # the rest were never written; no temporary is left behind.
  for i in (0, 1):
    mask = np.asarray(Image.open(out / f"in{i}_mask.png"))
    np.testing.assert_array_equal(mask, threshold_labels(slices[i]))
    np.testing.assert_array_equal(np.load(out / f"in{i}_mask.npy"), mask)
    assert (out / f"in{i}_overlay.png").is_file()
  assert sorted(p.name for p in out.iterdir()) == sorted(
      f"in{i}_{kind}" for i in (0, 1) for kind in ("mask.png", "mask.npy", "overlay.png"))
  assert sorted(error.written) == sorted(out.iterdir())


def test_output_folder_errors_name_the_path(threshold, tmp_path):
  _write_inputs(tmp_path / "in", 1)
  a_file = tmp_path / "taken"
  a_file.write_text("")
  with pytest.raises(predict_lib.OutputError, match=f"{a_file}: expected an output folder"):
    predict_lib.predict(threshold, tmp_path / "in", a_file, progress=False)
  with pytest.raises(predict_lib.OutputError,
                     match="/proc/spineseg-out: cannot create the output folder: No such"):
    predict_lib.predict(threshold, tmp_path / "in", "/proc/spineseg-out", progress=False)
  assert a_file.read_text() == ""


def test_outputs_are_readable_by_others(threshold, tmp_path):
  _write_inputs(tmp_path / "in", 1)
  old_umask = os.umask(0o077)  # a private umask must not leak into shared outputs
  try:
    written, _ = predict_lib.predict(threshold, tmp_path / "in", tmp_path / "out",
                                     overlay=True, progress=False)
  finally:
    os.umask(old_umask)
  assert len(written) == 3
  assert all(p.stat().st_mode & 0o777 == fileio.FILE_MODE for p in written)


def test_predict_cli_full_disk_one_line_and_unwritten_inputs(threshold, tmp_path):
  _write_inputs(tmp_path / "in", 5)
  out = tmp_path / "out"
  proc = _run(["-c", FULL_DISK_DRIVER, "export.predict_lib:_write_npy", "in2_mask",
               "export.predict", f"--saved_model={threshold.path}",
               f"--input={tmp_path / 'in'}", f"--output={out}", "--batch_size=1"])
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = _error_lines(proc.stderr, "spine-predict")
  assert len(lines) == 1, proc.stderr[-3000:]
  line = lines[0]
  assert f"cannot write {out / 'in2_mask.npy'}: No space left on device" in line
  listed = [l.strip() for l in proc.stderr.splitlines() if l.startswith("  ")]
  assert [l.split(":")[0] for l in listed] == [str(tmp_path / "in" / f"in{i}.png")
                                               for i in (2, 3, 4)]
  assert "wrote 4 files" in proc.stdout
  assert sorted(p.name for p in out.iterdir()) == [
      "in0_mask.npy", "in0_mask.png", "in1_mask.npy", "in1_mask.png"]


@pytest.mark.parametrize("output", ["a_file", "/proc", "/proc/spineseg/out"])
def test_predict_cli_unusable_output_is_one_line(threshold, tmp_path, output):
  # As root, chmod cannot make a folder read-only: a file in the way, and /proc (a
  # folder where nothing can be created), stand in for an unwritable output.
  _write_inputs(tmp_path / "in", 2)
  if output == "a_file":
    output = tmp_path / "a_file"
    output.write_text("keep")
  proc = _run(["-m", "export.predict", f"--saved_model={threshold.path}",
               f"--input={tmp_path / 'in'}", f"--output={output}"])
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  lines = _error_lines(proc.stderr, "spine-predict")
  assert len(lines) == 1, proc.stderr[-3000:]
  line = lines[0]
  assert str(output) in line
  if str(output) == "/proc":
    assert "cannot write /proc/in0_mask.png" in line
    listed = [l.strip() for l in proc.stderr.splitlines() if l.startswith("  ")]
    assert len(listed) == 2  # both inputs: the failing one and the never-tried one


@pytest.mark.parametrize("where", ["/proc/spineseg/scores.json", "folder", "full_disk"])
def test_evaluate_cli_unwritable_json_is_one_line(threshold, tmp_path, where):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  x = _blocks(seed=3)
  _save_png(images / "x.png", x)
  np.save(masks / "x.npy", threshold_labels(x).astype(np.int64))
  flags = [f"--saved_model={threshold.path}", f"--images_dir={images}",
           f"--masks_dir={masks}"]
  if where == "full_disk":
    out_json = tmp_path / "scores.json"
    proc = _run(["-c", FULL_DISK_DRIVER, "data_prep.fileio:atomic_write", "scores.json",
                 "export.evaluate", *flags, f"--output_json={out_json}"])
  else:
    out_json = tmp_path / "scores.json" if where == "folder" else pathlib.Path(where)
    if where == "folder":
      out_json.mkdir()
    proc = _run(["-m", "export.evaluate", *flags, f"--output_json={out_json}"])
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  lines = _error_lines(proc.stderr, "spine-evaluate")
  assert len(lines) == 1, proc.stderr[-3000:]
  line = lines[0]
  assert str(out_json) in line
  if where == "full_disk":
    assert "No space left on device" in line
    assert "dice_disc" in proc.stdout  # the scores were printed before the write failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "masks"]
  else:
    assert "dice_disc" not in proc.stdout  # refused before evaluating
