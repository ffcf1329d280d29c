"""The sliding window (export/serving.py) in the ONNX and LiteRT conversions.

The portable tests (test_export_onnx.py, test_export_litert.py) use a model without a
target spacing, whose canvas is always the square: no tile is ever cut there. This one
has a target spacing, so a slice larger than the square is segmented as overlapping
tiles (reshapes, a transpose, pads and a per-pixel blend): both converted models must
equal the SavedModel on such slices, one only one tile wide among them (a lone tile
along an axis reads a second tile with share 0), and on one within the square (one tile).
"""
import numpy as np
import keras
import pytest
import tensorflow as tf

from data_prep import manifest
from data_prep import schema
from export import portable
from export import serving

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")
interpreter = pytest.importorskip("ai_edge_litert.interpreter")

SIZE = 32
PROB_TOL = 1e-4  # measured <= 2.4e-7 in both runtimes


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(SavedModel, ONNX Runtime session, LiteRT runner) of a group-norm model at 1 mm."""
  root = tmp_path_factory.mktemp("window_portable")
  model_dir = root / "model"
  model_dir.mkdir()
  keras.utils.set_random_seed(3)
  keras.Sequential([keras.Input((None, None, 1)),
                    keras.layers.Conv2D(4, 3, padding="same"),
                    keras.layers.GroupNormalization(groups=2),
                    keras.layers.Conv2D(3, 1)]).save(model_dir / "best.keras")
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, manifest.make(
      image_size=SIZE, normalization="percentile", per="image", compression="none",
      splits={}, extra={"target_spacing_mm": 1.0}))
  export_dir = serving.export(model_dir, root / "export" / "1")
  portable.to_onnx(export_dir)
  portable.to_litert(model_dir, export_dir)
  session = ort.InferenceSession(str(export_dir / portable.ONNX_FILE),
                                 providers=["CPUExecutionProvider"])
  lite = interpreter.Interpreter(model_path=str(export_dir / "model.tflite"))
  return (tf.saved_model.load(str(export_dir)), session,
          lite.get_signature_runner("serving_default"))


@pytest.mark.parametrize("shape", [(2, 45, 70, 1),    # a 64 x 96 canvas: 3 x 5 tiles
                                   (1, 100, 30, 1),   # 128 x 32: 7 x 1 tiles
                                   (2, 20, 30, 1)])   # the square: one tile
def test_converted_models_equal_the_saved_model(converted, shape):
  saved, session, runner = converted
  images = np.random.default_rng(shape[1]).gamma(2.0, 100.0, shape).astype(np.float32)
  ref = saved.signatures["serving_default"](images=tf.constant(images))
  ref = ref["probabilities"].numpy()
  names = [o.name for o in session.get_outputs()]
  onnx = dict(zip(names, session.run(None, {"images": images})))["probabilities"]
  lite = runner(images=images)["probabilities"]
  for got in (onnx, lite):
    assert got.shape == images.shape[:3] + (3,)
    np.testing.assert_allclose(got, ref, rtol=0, atol=PROB_TOL)
