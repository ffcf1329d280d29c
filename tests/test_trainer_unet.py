"""The U-Net: shapes, parameter count, float32 logits, reload without custom objects."""
import keras
import numpy as np
import pytest

from trainer import unet


def expected_params(base, depth, classes, norm):
  """Convs without bias when normalized; BN has 4 numbers per channel, GN 2."""
  per_channel_norm = {"batch": 4, "group": 2, "none": 1}[norm]

  def block(cin, cout):
    return 9 * cin * cout + per_channel_norm * cout + 9 * cout * cout + per_channel_norm * cout

  total, cin = 0, 1
  for level in range(depth + 1):
    total += block(cin, base * 2**level)
    cin = base * 2**level
  for level in reversed(range(depth)):
    f = base * 2**level
    total += 4 * cin * f + f + block(2 * f, f)
    cin = f
  return total + cin * classes + classes


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_shape_and_parameter_count(norm):
  model = unet.build_unet(num_classes=3, base_filters=4, depth=2, norm=norm)
  assert model.input.name == "image"
  out = model(np.zeros((2, 32, 48, 1), np.float32))
  assert out.shape == (2, 32, 48, 3)
  assert model.count_params() == expected_params(4, 2, 3, norm)


def test_logits_float32_under_mixed_precision():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = unet.build_unet(base_filters=4, depth=2, dropout=0.1)
    assert model.layers[1].compute_dtype == "bfloat16"
    assert model.output.dtype == "float32"
  finally:
    keras.mixed_precision.set_global_policy("float32")


def test_saved_model_loads_without_custom_objects(tmp_path):
  model = unet.build_unet(base_filters=4, depth=2, norm="group")
  x = np.random.default_rng(0).normal(size=(1, 16, 16, 1)).astype(np.float32)
  model.save(tmp_path / "m.keras")
  loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
  np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="unknown norm"):
    unet.build_unet(norm="layer")
  with pytest.raises(ValueError):
    unet.build_unet(depth=0)
