"""Scale test-time augmentation (`--tta` of spine-predict and spine-evaluate).

What each test proves:
  * on a model whose output depends on mm per pixel, the TTA probabilities are the mean of
    three calls of the spacing signatures at the true spacing times 0.85, 1.0, 1.15, called
    here directly (2D slices and a volume), and the mask is their argmax; the three calls
    differ, so the mean is not the plain prediction in disguise;
  * spine-predict --tta keeps the input's geometry (2D shape; NIfTI shape and affine) and
    writes the TTA masks; spine-evaluate's folder mode scores them;
  * a model without a target spacing refuses --tta in one line (library and both CLIs).
"""
import os
import pathlib
import subprocess
import sys

import keras
import nibabel as nib
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import export_testlib
from data_prep import manifest
from data_prep import metrics
from data_prep import orientation
from data_prep import schema
from export import evaluate_lib
from export import inference
from export import predict_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
SCALES = (0.85, 1.0, 1.15)  # written out here: the reference does not read the module
SIZE = 32
K = 5        # window of the scale-dependent model, in target pixels
GAIN = 12.0  # soft logits: probabilities vary smoothly with the window mean


def _window_model_dir(path: pathlib.Path) -> pathlib.Path:
  """A model at 1 mm per pixel scoring class 2 by the mean of a K x K window (mm-dependent:
  a bright square covers more or fewer target pixels as the spacing changes)."""
  path.mkdir(parents=True)
  model = keras.Sequential([keras.Input((None, None, 1)),
                            keras.layers.Conv2D(3, K, padding="same")])
  kernel = np.zeros((K, K, 1, 3), np.float32)
  kernel[..., 2] = GAIN / K ** 2
  kernel[..., 1] = 0.5 * GAIN / K ** 2
  model.layers[0].set_weights([kernel, np.array([0.0, -0.2 * GAIN, -0.6 * GAIN],
                                                np.float32)])
  model.save(path / "best.keras")
  manifest.write_json_atomic(path / schema.MANIFEST_NAME, manifest.make(
      image_size=SIZE, normalization="divide255", per="image", compression="none",
      splits={}, extra={"target_spacing_mm": 1.0}))
  return path


@pytest.fixture(scope="module")
def window(tmp_path_factory):
  root = tmp_path_factory.mktemp("window")
  return export_testlib.export_and_load(_window_model_dir(root / "model"),
                                        root / "serving" / "1")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  root = tmp_path_factory.mktemp("plain")
  model_dir = export_testlib.write_threshold_model_dir(root / "model")
  return export_testlib.export_and_load(model_dir, root / "serving" / "1")


def _squares(shape, seed=0) -> np.ndarray:
  """uint8 slices [S, H, W] with bright squares of several sizes on a dark ground."""
  rng = np.random.default_rng(seed)
  out = np.full(shape, 20, np.uint8)
  for s in range(shape[0]):
    for _ in range(4):
      side = int(rng.integers(4, 14))
      r, c = rng.integers(0, shape[1] - side), rng.integers(0, shape[2] - side)
      out[s, r:r + side, c:c + side] = 240
  return out


def _reference(model, images, spacing, name):
  """Mean probabilities and the three single-factor masks, from the signatures."""
  x = tf.constant(images.astype(np.float32)[..., None])
  probs = [model.module.signatures[name](images=x, spacing=tf.constant(
      [spacing[0] * f, spacing[1] * f], tf.float32))["probabilities"].numpy()
           for f in SCALES]
  return np.mean(probs, axis=0), [p.argmax(-1) for p in probs]


def _ras_nifti(display, spacing_rc):
  """A RAS NIfTI of display-order [S, H, W] data (display: R, I, P)."""
  ras = np.ascontiguousarray(display.transpose(0, 2, 1)[:, ::-1, ::-1])
  affine = np.diag([3.0, spacing_rc[1], spacing_rc[0], 1.0])
  affine[:3, 3] = (-10, 4, 7)
  return nib.Nifti1Image(ras, affine)


def test_scales_are_the_documented_factors():
  assert inference.TTA_SCALES == SCALES
  assert "TTA_SCALES" in inference.__doc__


@pytest.mark.parametrize("volume", [False, True])
def test_tta_is_the_mean_of_three_scaled_calls(window, volume):
  images = _squares((3, 40, 56))
  spacing = (0.7, 0.9)
  name = "segment_volume_spacing" if volume else "segment_spacing"
  expected, singles = _reference(window, images, spacing, name)
  kind = inference.VOLUME if volume else inference.SLICES
  got = window.probabilities(images, spacing, kind=kind, tta=True)
  assert got.shape == (3, 40, 56, 3)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
  mask = inference.labels(got)
  assert mask.dtype == np.uint8
  np.testing.assert_array_equal(mask, expected.argmax(-1))
  # The scales matter for this model: a TTA equal to one call would be no test.
  assert not np.array_equal(singles[0], singles[2])
  assert not np.array_equal(mask, singles[1])
  np.testing.assert_array_equal(
      inference.labels(window.probabilities(images, spacing, kind=kind)), singles[1])


def test_predict_cli_tta_keeps_geometry(window, tmp_path):
  inputs, out = tmp_path / "in", tmp_path / "out"
  inputs.mkdir()
  slice_2d = _squares((1, 38, 50), seed=1)[0]
  Image.fromarray(slice_2d).save(inputs / "slice.png")
  display = _squares((4, 44, 36), seed=2)
  src = _ras_nifti(display, (0.8, 1.1))
  nib.save(src, inputs / "vol.nii.gz")
  proc = subprocess.run(
      [sys.executable, "-m", "export.predict", f"--saved_model={window.path}",
       f"--input={inputs}", f"--output={out}", "--spacing_2d_mm=0.6", "--tta",
       "--nopostprocess"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  mask = np.asarray(Image.open(out / "slice_mask.png"))
  assert mask.shape == slice_2d.shape
  expected, _ = _reference(window, slice_2d[None], (0.6, 0.6), "segment_spacing")
  np.testing.assert_array_equal(mask, expected.argmax(-1)[0])
  np.testing.assert_array_equal(np.load(out / "slice_mask.npy"), mask)
  pred = nib.load(out / "vol_mask.nii.gz")
  assert pred.shape == src.shape and pred.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(pred.affine, nib.load(inputs / "vol.nii.gz").affine)
  back, _ = orientation.to_display(np.asarray(pred.dataobj), pred.affine)
  expected, _ = _reference(window, display, (0.8, 1.1), "segment_volume_spacing")
  np.testing.assert_array_equal(back, expected.argmax(-1))


def test_evaluate_folders_scores_the_tta_masks(window, tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  display = _squares((3, 40, 40), seed=3)
  nib.save(_ras_nifti(display, (0.9, 0.9)), images / "v.nii.gz")
  gt = np.where(display > 128, 2, 0).astype(np.uint8)
  nib.save(_ras_nifti(gt, (0.9, 0.9)), masks / "v.nii.gz")
  expected, _ = _reference(window, display, (0.9, 0.9), "segment_volume_spacing")
  report = evaluate_lib.evaluate_folders(window, images, masks, progress=False, tta=True)
  assert not report["failures"]
  assert report["cases"][0]["counts"] == metrics.counts(expected.argmax(-1), gt).tolist()


def test_a_model_without_target_spacing_refuses_tta(plain, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(_squares((1, 32, 32))[0]).save(inputs / "a.png")
  with pytest.raises(inference.InputError, match="--tta needs a model exported with "
                     "--target_spacing_mm"):
    predict_lib.predict(plain, inputs, tmp_path / "out", progress=False, tta=True)
  assert not (tmp_path / "out").exists()  # refused before any output
  with pytest.raises(inference.InputError, match="--tta needs a model exported"):
    evaluate_lib.evaluate_folders(plain, inputs, inputs, progress=False, tta=True)
  for program, flags in (("spine-predict", [f"--input={inputs}",
                                            f"--output={tmp_path / 'cli'}"]),
                         ("spine-evaluate", [f"--images_dir={inputs}",
                                             f"--masks_dir={inputs}"])):
    module = "export.predict" if program == "spine-predict" else "export.evaluate"
    proc = subprocess.run([sys.executable, "-m", module, f"--saved_model={plain.path}",
                           "--tta"] + flags, cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    errors = [l for l in proc.stderr.splitlines() if l.startswith(f"{program}:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"{program}: error: --tta needs a model exported with --target_spacing_mm"), \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
  assert not (tmp_path / "cli").exists()
