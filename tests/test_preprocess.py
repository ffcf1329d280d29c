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


def test_unfit_inverts_fit_geometry():
  geo = preprocess.tf_fit_geometry(tf.constant(30), tf.constant(60), 64)
  maps = tf.zeros([1, 64, 64, 3])
  assert preprocess.tf_unfit(maps, geo, 30, 60).shape == (1, 30, 60, 3)
