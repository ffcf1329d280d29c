"""NumPy and TensorFlow preprocessing twins agree, eagerly and inside tf.data."""
import numpy as np
import pytest
import tensorflow as tf

from data_prep import preprocess


@pytest.mark.parametrize("shape,size", [((37, 53), 32), ((64, 40), 48), ((20, 20), 64),
                                        ((256, 256), 128), ((200, 310), 96)])
def test_resize_matches_tensorflow(shape, size):
  rng = np.random.default_rng(0)
  x = rng.random(shape).astype(np.float32)
  geo = preprocess.fit_geometry(*shape, size)
  ours = preprocess.resize_bilinear(x, geo.resized_height, geo.resized_width)
  ref = tf.image.resize(x[None, :, :, None], [geo.resized_height, geo.resized_width],
                        method="bilinear", antialias=False)[0, :, :, 0].numpy()
  np.testing.assert_allclose(ours, ref, atol=5e-5)  # float32 rounding order differs
  labels = rng.integers(0, 3, shape).astype(np.uint8)
  ours_m = preprocess.resize_nearest(labels, geo.resized_height, geo.resized_width)
  ref_m = tf.image.resize(labels[None, :, :, None], [geo.resized_height, geo.resized_width],
                          method="nearest")[0, :, :, 0].numpy()
  np.testing.assert_array_equal(ours_m, ref_m)


def test_fit_geometry_keeps_aspect_and_centres():
  geo = preprocess.fit_geometry(100, 50, 64)
  assert (geo.resized_height, geo.resized_width) == (64, 32)
  assert (geo.pad_top, geo.pad_left) == (0, 16)
  geo = preprocess.fit_geometry(10, 15, 64)
  assert (geo.resized_height, geo.resized_width, geo.pad_top, geo.pad_left) == (43, 64, 10, 0)


def test_normalization_values_by_hand():
  x = np.arange(201, dtype=np.float32)  # percentiles 0.5 / 99.5 are exactly 1 and 199
  off, scale = preprocess.normalization_params(x, "percentile")
  assert (off, scale) == pytest.approx((1.0, 198.0))
  y = preprocess.apply_normalization(x, "percentile", off, scale)
  assert y.min() == 0.0 and y.max() == 1.0 and y[100] == pytest.approx(99 / 198)
  assert preprocess.normalization_params(x, "divide255") == (0.0, 255.0)
  off, scale = preprocess.normalization_params(np.array([1.0, 3.0]), "zscore")
  assert (off, scale) == pytest.approx((2.0, 1.0))
  with pytest.raises(ValueError, match="unknown normalization"):
    preprocess.normalization_params(x, "minmax")


def _numpy_pipeline(image, method, size):
  off, scale = preprocess.normalization_params(image, method)
  norm = preprocess.apply_normalization(image, method, off, scale)
  geo = preprocess.fit_geometry(*image.shape, size)
  return preprocess.fit_image(norm, geo, size, preprocess.pad_value(method, off, scale))


def _tf_pipeline(images, method, size):
  off, scale = preprocess.tf_normalization_params(images, method)
  norm = preprocess.tf_apply_normalization(images, method, off, scale)
  pad = preprocess.tf_apply_normalization(tf.zeros_like(off), method, off, scale)
  geo = preprocess.tf_fit_geometry(tf.shape(images)[1], tf.shape(images)[2], size)
  return preprocess.tf_fit_images(norm, geo, size, pad)


@pytest.mark.parametrize("method", preprocess.NORMALIZATIONS)
def test_tf_twin_matches_numpy_eager_and_in_tf_data(method):
  rng = np.random.default_rng(1)
  image = (rng.gamma(2.0, 200.0, (45, 70)) + 20).astype(np.uint16)
  expected = _numpy_pipeline(image, method, 64)
  eager = _tf_pipeline(tf.constant(image[None, :, :, None]), method, 64)[0, :, :, 0]
  np.testing.assert_allclose(eager.numpy(), expected, rtol=1e-4, atol=1e-4)
  ds = tf.data.Dataset.from_tensors(image[None, :, :, None]).map(
      lambda x: _tf_pipeline(x, method, 64))
  in_data = next(iter(ds))[0, :, :, 0].numpy()
  np.testing.assert_allclose(in_data, expected, rtol=1e-4, atol=1e-4)


def test_volume_statistics_span_the_batch():
  vol = np.stack([np.full((8, 8), 10.0), np.full((8, 8), 30.0)])[..., None]
  off, scale = preprocess.tf_normalization_params(tf.constant(vol), "zscore", per_image=False)
  np.testing.assert_allclose(off.numpy().ravel(), [20.0, 20.0])
  np.testing.assert_allclose(scale.numpy().ravel(), [10.0, 10.0])


def _square_with_border(geo, size, channels, border=-100.0):
  """[1, size, size, C] maps: `border` in the padding, known values inside the image.

  Channel 0 holds the row index within the unpadded area, channel 1 the column index,
  channel 2 a constant 7: all linear, so their bilinear resampling is known in closed form.
  """
  maps = np.full((1, size, size, channels), border, np.float32)
  rh, rw = int(geo["resized_height"]), int(geo["resized_width"])
  top, left = int(geo["pad_top"]), int(geo["pad_left"])
  rows, cols = np.meshgrid(np.arange(rh), np.arange(rw), indexing="ij")
  maps[0, top:top + rh, left:left + rw, 0] = rows
  maps[0, top:top + rh, left:left + rw, 1] = cols
  maps[0, top:top + rh, left:left + rw, 2] = 7.0
  return maps


def test_unfit_returns_exactly_the_unpadded_area():
  # 32x64 into 64: no resize (scale 1), 16 rows of padding above and below.
  geo = preprocess.tf_fit_geometry(tf.constant(32), tf.constant(64), 64)
  assert [int(geo[k]) for k in ("resized_height", "resized_width", "pad_top",
                                "pad_left")] == [32, 64, 16, 0]
  maps = _square_with_border(geo, 64, 3)
  out = preprocess.tf_unfit(tf.constant(maps), geo, 32, 64).numpy()
  np.testing.assert_array_equal(out, maps[:, 16:48, :, :])
  assert out.min() > -100  # not one padded pixel leaked in


@pytest.mark.parametrize("shape", [(30, 60), (60, 30), (45, 17), (64, 64), (20, 100)])
def test_unfit_values_match_a_closed_form(shape):
  # A linear ramp r resampled bilinearly with half-pixel centres (tf.image.resize,
  # antialias=False) gives clip((i + 0.5) * r_in / r_out - 0.5, 0, r_in - 1) at output
  # pixel i: computed here without preprocess or tf.image.
  h, w = shape
  size = 64
  geo = preprocess.tf_fit_geometry(tf.constant(h), tf.constant(w), size)
  rh, rw = int(geo["resized_height"]), int(geo["resized_width"])
  out = preprocess.tf_unfit(tf.constant(_square_with_border(geo, size, 3)), geo, h,
                            w).numpy()[0]
  assert out.shape == (h, w, 3)
  row_src = np.clip((np.arange(h) + 0.5) * rh / h - 0.5, 0, rh - 1)
  col_src = np.clip((np.arange(w) + 0.5) * rw / w - 0.5, 0, rw - 1)
  np.testing.assert_allclose(out[..., 0], np.repeat(row_src[:, None], w, 1), atol=1e-4)
  np.testing.assert_allclose(out[..., 1], np.repeat(col_src[None, :], h, 0), atol=1e-4)
  np.testing.assert_allclose(out[..., 2], 7.0, atol=1e-5)
