"""`spine-export --litert`: model.tflite in LiteRT equals the SavedModel's serving_default.

The LiteRT model is a separate graph (`SegmentationModule(..., float64=False)`: LiteRT has
no float64 kernels): integer fit geometry and percentile ranks, float32 group statistics
summed in stages. The reference is TensorFlow running the SavedModel (float64 geometry
and statistics); LiteRT's interpreter is the independent implementation under test. The
model is an untrained group-norm U-Net on a 512 px square, so that each group statistic
sums ~260k values, as on the real 384 px canvases.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import export_testlib
from data_prep import phantom
from data_prep import preprocess
from export import inference
from export import portable
from export import stable_norm

interpreter = pytest.importorskip("ai_edge_litert.interpreter")

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
PROB_TOL = 1e-4  # the bound; measured <= 7e-6 (spine2d: 4.7e-6)
MASK_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(model dir, export folder with model.tflite written by the CLI, SavedModel, runner)."""
  model_dir, export_dir = export_testlib.export_portable(
      tmp_path_factory.mktemp("litert"), "--litert")
  lite = interpreter.Interpreter(model_path=str(export_dir / "model.tflite"))
  return (model_dir, export_dir, inference.load_saved_model(export_dir),
          lite.get_signature_runner("serving_default"))


def _compare(exported, images: np.ndarray) -> None:
  _, _, saved, runner = exported
  ref = saved.module.signatures["serving_default"](images=tf.constant(images))
  out = runner(images=images)
  assert out["mask"].dtype == np.uint8 and out["mask"].shape == images.shape[:3]
  assert out["probabilities"].shape == images.shape[:3] + (3,)
  agreement = np.mean(out["mask"] == ref["mask"].numpy())
  assert agreement >= MASK_AGREEMENT, agreement
  np.testing.assert_allclose(out["probabilities"], ref["probabilities"].numpy(),
                             rtol=0, atol=PROB_TOL)


def test_litert_signature_inputs_and_outputs(exported):
  lite = interpreter.Interpreter(model_path=str(exported[1] / "model.tflite"))
  assert lite.get_signature_list() == {
      "serving_default": {"inputs": ["images"], "outputs": ["mask", "probabilities"]}}
  (inp,) = lite.get_input_details()
  assert inp["dtype"] == np.float32 and list(inp["shape_signature"]) == [-1, -1, -1, 1]


def test_litert_equals_saved_model_on_spine2d(exported, shared_data):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for n in (3, 4, 7, 11):  # slices of different scanners
    image = np.asarray(Image.open(shared_data / "spine2d" / "images" / f"{n}.png"))
    _compare(exported, image.astype(np.float32)[None, ..., None])


def test_litert_equals_saved_model_on_phantom_batch(exported):
  rng = np.random.default_rng(5)
  # Not square: padding and the unfit crop; 256 -> 512 is an exact 2x resize, 300 -> 512
  # is not (LiteRT's bilinear resize takes TF's source coordinates: no gap, unlike ONNX).
  for height, width in ((256, 192), (300, 220)):
    images = np.stack([phantom.make_slice(rng, height, width)[0] for _ in range(2)])
    _compare(exported, images.astype(np.float32)[..., None])


def test_integer_fit_geometry_equals_float64_fit():
  size = 384
  table = preprocess.fit_rounding_exceptions(size)
  assert len(table)  # float64 and exact rounding do differ at some ties (e.g. 55 of 2816)
  fit = tf.function(lambda h, w: preprocess.tf_fit_geometry(h, w, size, float64=False))
  rng = np.random.default_rng(0)
  pairs = [(int(s), int(m)) for s, m, _ in table[:40]] + [(2816, 99), (384, 384), (1, 9000)]
  pairs += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(40)]
  for h, w in pairs:
    want = preprocess.fit_geometry(h, w, size)  # the float64 NumPy original
    got = {k: int(v) for k, v in fit(tf.constant(h), tf.constant(w)).items()}
    assert got == {"resized_height": want.resized_height,
                   "resized_width": want.resized_width, "pad_top": want.pad_top,
                   "pad_left": want.pad_left}, (h, w)


def test_integer_percentile_ranks_equal_numpy():
  rng = np.random.default_rng(1)
  for shape in ((2, 201, 1, 1), (1, 37, 53, 1), (1, 400, 301, 1)):
    x = rng.gamma(2.0, 300.0, shape).astype(np.float32)
    offset, scale = preprocess.tf_normalization_params(x, "percentile", float64=False)
    for i in range(shape[0]):
      want = preprocess.normalization_params(x[i], "percentile")  # NumPy, float64
      np.testing.assert_allclose([offset[i, 0, 0, 0], scale[i, 0, 0, 0]], want, rtol=2e-6)


def test_float32_group_norm_is_close_to_float64():
  # export_testlib.group_norm_case: a big flat group with an offset. Measured
  # against float64: Keras' own single float32 reduction 2.2e-4, the staged sums 1.3e-6.
  x, model, want = export_testlib.group_norm_case()
  staged = stable_norm.with_stable_statistics(model, float64=False)
  assert isinstance(staged.layers[0], stable_norm.Float32GroupNormalization)
  np.testing.assert_allclose(staged(x).numpy(), want, rtol=0, atol=1e-5)


def test_existing_tflite_is_refused(exported):
  model_dir, export_dir = exported[:2]
  before = (export_dir / "model.tflite").stat().st_mtime_ns
  with pytest.raises(FileExistsError, match="--overwrite"):
    portable.to_litert(model_dir, export_dir)
  assert (export_dir / "model.tflite").stat().st_mtime_ns == before


def test_missing_litert_is_one_line_before_any_export(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # its import raises ImportError
  with pytest.raises(portable.MissingExtraError, match=r'pip install -e "\.\[litert\]"'):
    portable.to_litert(tmp_path, tmp_path)
  script = ("import sys; sys.modules['ai_edge_litert'] = None\n"
            "from export import export_saved_model; export_saved_model.run()\n")
  export_dir = tmp_path / "export" / "1"
  proc = subprocess.run(
      [sys.executable, "-c", script, f"--model_dir={tmp_path}", f"--export_dir={export_dir}",
       "--litert"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("spine-export: error:")]
  assert len(lines) == 1 and 'pip install -e ".[litert]"' in lines[0], proc.stderr[-2000:]
  assert not export_dir.parent.exists()
