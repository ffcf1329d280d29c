"""spine-predict and spine-evaluate on a tiny exported model: geometry, orientation, errors."""
import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
from nibabel import orientations
import numpy as np
from PIL import Image
import pytest

import export_testlib
import trainer_testdata
from export import evaluate_lib
from export import inference
from export import metrics
from export import predict_lib
from export import serving

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  model_dir = export_testlib.write_model_dir(root / "model")
  export_dir = serving.export(model_dir, root / "serving" / "1")
  loaded = inference.load_saved_model(export_dir)
  loaded.path = export_dir
  return loaded


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
  expected = inference.segment_volume(model, display).transpose(0, 2, 1)[:, ::-1, ::-1]
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
  np.testing.assert_array_equal(mask, inference.segment_slices(model, good[None])[0])
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
  assert "1 input(s) failed" in proc.stderr and "rgb.png" in proc.stderr
  assert (tmp_path / "out" / "ok_mask.png").is_file()


def test_evaluate_2d_folders_by_hand(model, tmp_path):
  rng = np.random.default_rng(2)
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  a = rng.integers(0, 256, (40, 56)).astype(np.uint8)
  b = rng.integers(0, 256, (32, 32)).astype(np.uint8)
  _save_png(images / "a.png", a)
  _save_png(images / "b.png", b)
  _save_png(images / "orphan.png", b)
  pred_a, pred_b = (inference.segment_slices(model, x[None])[0] for x in (a, b))
  np.save(masks / "a.npy", pred_a.astype(np.int64))  # the truth is the prediction
  np.save(masks / "b.npy", np.zeros_like(pred_b, np.int64))  # only background
  report = evaluate_lib.evaluate_folders(model, images, masks, progress=False)
  assert [r["case_id"] for r in report["cases"]] == ["a", "b"]
  assert len(report["failures"]) == 1 and "orphan.png" in report["failures"][0]
  dice_a, dice_b = (r["dice"] for r in report["cases"])
  for name in ("background", "disc", "vertebra"):
    present = (pred_a == metrics.CLASS_NAMES.index(name)).any()
    assert dice_a[name] == (1.0 if present else metrics.ABSENT)
  assert dice_b["disc"] == dice_b["vertebra"] == dice_b["mean_disc_vertebra"] == "absent"
  bg = np.count_nonzero(pred_b == 0)
  assert dice_b["background"] == pytest.approx(2 * bg / (bg + pred_b.size))
  # A label map translates other mask encodings.
  lut = np.array([0, 128, 255], np.uint8)
  _save_png(masks / "a.png", lut[pred_a])
  (masks / "a.npy").unlink()
  mapped = evaluate_lib.evaluate_folders(model, images, masks, progress=False,
                                         label_map={0: 0, 128: 1, 255: 2})
  assert mapped["cases"][0]["dice"] == dice_a


def test_evaluate_volumes_dice_and_hd95(model, tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  volume = _volume(np.random.default_rng(3))
  affine = np.diag([1.0, 0.9, 0.8, 1.0])
  nib.save(nib.Nifti1Image(volume, affine), images / "v.nii.gz")
  nib.save(nib.Nifti1Image(volume[:, :, :-1], affine), images / "bad.nii.gz")
  predict_lib.predict(model, images / "v.nii.gz", tmp_path / "pred", progress=False)
  truth = nib.load(tmp_path / "pred" / "v_mask.nii.gz")
  nib.save(truth, masks / "v.nii.gz")
  nib.save(truth, masks / "bad.nii.gz")  # shape differs from its image
  report = evaluate_lib.evaluate_folders(model, images, masks, progress=False)
  assert len(report["failures"]) == 1 and "bad.nii.gz" in report["failures"][0]
  (row,) = report["cases"]
  assert row["kind"] == "3d"
  labels = np.unique(np.asarray(truth.dataobj))
  for c in (1, 2):
    name = metrics.CLASS_NAMES[c]
    assert row["dice"][name] == (1.0 if c in labels else metrics.ABSENT)
    assert row["hd95_mm"][name] == (0.0 if c in labels else metrics.ABSENT)


def test_evaluate_converted_split(model, tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=2, num_val=3,
                                            image_size=export_testlib.IMAGE_SIZE)
  report = evaluate_lib.evaluate_split(model, data_dir, "val", batch_size=2)
  assert [r["case_id"] for r in report["cases"]] == ["val0", "val1", "val2"]
  for row in report["cases"]:
    counts = np.asarray(row["counts"])
    assert counts[:, 1].sum() == counts[:, 2].sum() == 32 * 32
    assert counts[1, 2] > 0 and counts[2, 2] > 0  # the synthetic truth has both classes
  assert report["overall"]["pooled"]["dice"]["mean_all"] != metrics.ABSENT
  with pytest.raises(ValueError, match="split 'test' has no shards"):
    evaluate_lib.evaluate_split(model, data_dir, "test")


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
  assert scores["cases"][0]["dice"]["background"] == "absent"
  assert scores["cases"][0]["dice"]["vertebra"] == "absent"
  assert "mean" in scores["overall"] and "pooled" in scores["overall"]
  proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "--overwrite" in proc.stderr
