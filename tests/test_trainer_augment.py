"""Scanner/sequence augmentations (`trainer.augment.random_appearance`): per-region
contrast remapping, blur, low resolution; and the default augmentation kept as it was."""
import dataclasses
import hashlib

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

import trainer_testdata
from data_prep import schema
from trainer import augment
from trainer import config as config_lib

BACKGROUND, DISC, VERTEBRA = 0, 1, 2
EDGE_RADIUS = 3  # ceil(3 * augment.REMAP_EDGE_SIGMA): reach of the boundary blending


def appearance_only(**ranges) -> augment.AugmentConfig:
  """Everything but the scanner/sequence changes switched off."""
  return augment.AugmentConfig(geometric_prob=0, gamma_prob=0, contrast_prob=0,
                               bias_field_prob=0, noise_prob=0, **ranges)


def synthetic_batch(count=6, size=32):
  slices = [trainer_testdata.synthetic_slice(np.random.default_rng(i), size)
            for i in range(count)]
  return (np.stack([s[0] for s in slices])[..., None],
          np.stack([s[1] for s in slices])[..., None])


@pytest.mark.parametrize("seed", [[1, 2], [-7, 2**40 + 5]])
def test_appearance_same_eagerly_in_tf_data_and_compiled(seed):
  images, masks = synthetic_batch(8)
  config = appearance_only(remap_prob=0.4, blur_prob=0.4, lowres_prob=0.4)
  seed = tf.constant(seed, tf.int64)
  eager = augment.augment_batch(images, masks, seed, config)
  graph = next(iter(tf.data.Dataset.from_tensors((images, masks, seed)).map(
      lambda i, m, s: augment.augment_batch(i, m, s, config))))
  # As in an XLA-compiled train step (--augment_on=device --jit_compile), where the
  # random draws run inside XLA too: the negative / > 32-bit seed is the case where
  # XLA's samplers would read the seed otherwise.
  compiled = tf.function(lambda i, m, s: augment.augment_batch(i, m, s, config, True),
                         jit_compile=True)(images, masks, seed)
  for images_out, masks_out in (eager, graph, compiled):
    np.testing.assert_allclose(images_out, eager[0], atol=1e-5)
    np.testing.assert_array_equal(masks_out, masks)
    assert masks_out.dtype == tf.uint8
  changed = [not np.allclose(eager[0][i], images[i]) for i in range(len(images))]
  # Drawn per sample: each one untouched with probability 0.6^3.
  assert any(changed) and not all(changed), changed
  other = augment.augment_batch(images, masks, seed + 1, config)
  assert not np.allclose(other[0], eager[0])


def t2_like_slice(size=48):
  """Discs brighter than vertebrae (as in T2), textured regions, padding rows
  (IGNORE_LABEL) and a partly labelled patch (a set label) in the background."""
  rng = np.random.default_rng(0)
  rows, cols = np.mgrid[:size, :size] / size
  image = 0.2 + 0.3 * rows * cols + rng.normal(0, 0.05, (size, size))
  mask = np.zeros((size, size), np.uint8)
  mask[6:18, 10:38] = VERTEBRA
  mask[18:26, 10:38] = DISC
  mask[26:38, 10:38] = VERTEBRA
  image[mask == VERTEBRA] += 0.3
  image[mask == DISC] += 0.7
  mask[:4, :] = schema.set_label((BACKGROUND, DISC))
  mask[42:, :] = schema.IGNORE_LABEL
  image[42:] = 0.0
  return image.astype(np.float32), mask


def interior(region: np.ndarray) -> np.ndarray:
  """Pixels of `region` farther than the blending reach from any other region."""
  width = 2 * EDGE_RADIUS + 1
  return scipy.ndimage.binary_erosion(region, np.ones((width, width)), border_value=1)


def test_remap_is_affine_per_region_can_invert_contrast_and_keeps_mean_and_std():
  image, mask = t2_like_slice()
  count = 16
  images = np.repeat(image[None, ..., None], count, 0)
  masks = np.repeat(mask[None, ..., None], count, 0)
  out, out_masks = augment.augment_batch(images, masks, tf.constant([4, 2]),
                                         appearance_only(remap_prob=1.0))
  out = out.numpy()[..., 0]
  np.testing.assert_array_equal(out_masks, masks)
  # Set labels and padding are background here: one map for the three of them.
  regions = {k: (mask == k) | ((k == BACKGROUND) & (mask >= schema.SET_LABEL))
             for k in (BACKGROUND, DISC, VERTEBRA)}
  assert interior(regions[BACKGROUND])[mask >= schema.SET_LABEL].sum() > 100
  disc_row = 18  # First disc row: its upper neighbours are vertebra.
  inverted, blended, slopes_differ = 0, 0, 0
  for s in range(count):
    np.testing.assert_allclose(out[s].mean(), image.mean(), atol=1e-5)
    np.testing.assert_allclose(out[s].std(), image.std(), rtol=1e-4)
    lines = {}
    for k, region in regions.items():
      inside = interior(region)
      slope, intercept = np.polyfit(image[inside], out[s][inside], 1)
      residual = out[s][inside] - (slope * image[inside] + intercept)
      assert np.abs(residual).max() < 1e-4 * image.std(), (s, k)
      lines[k] = (slope, intercept)
    # Near boundaries every pixel is a blend of the regions' maps (the edge weights sum
    # to one), so it lies between their lines...
    mapped = np.stack([a * image + b for a, b in lines.values()])
    assert np.all(out[s] >= mapped.min(0) - 1e-4) and np.all(out[s] <= mapped.max(0) + 1e-4)
    # ... and right at a disc/vertebra boundary really mixes them (no painted edge).
    centre = slice(14, 34)
    on_disc_map = mapped[DISC, disc_row, centre]
    gap = np.abs(mapped[VERTEBRA, disc_row, centre] - on_disc_map)
    if gap.min() > 0.05:
      blended += np.all(np.abs(out[s, disc_row, centre] - on_disc_map) > 0.1 * gap)
    slopes_differ += abs(lines[DISC][0] - lines[VERTEBRA][0]) > 0.2
    inverted += out[s][mask == DISC].mean() < out[s][mask == VERTEBRA].mean()
  assert image[mask == DISC].mean() > image[mask == VERTEBRA].mean()
  # T2 -> T1-like (discs darker than vertebrae) in some samples, not all.
  assert 0 < inverted < count, inverted
  assert slopes_differ > count // 2 and blended > 0


def numpy_gaussian_gain(sigma: float, frequency: float, radius: int) -> float:
  """Amplitude kept by a cosine under the sampled, truncated, normalized Gaussian."""
  t = np.arange(-radius, radius + 1)
  taps = np.exp(-0.5 * (t / max(sigma, 1e-3)) ** 2)
  return float(np.sum(taps * np.cos(2 * np.pi * frequency * t)) / taps.sum())


def test_gaussian_blur_matches_scipy_and_damps_a_frequency_as_expected():
  rng = np.random.default_rng(0)
  sigmas = [0.0, 0.7, 1.5]
  images = rng.random((3, 30, 26, 1)).astype(np.float32)
  out = augment.gaussian_blur(images, tf.constant(sigmas), radius=5).numpy()
  for i, sigma in enumerate(sigmas):
    expected = scipy.ndimage.gaussian_filter(images[i, ..., 0], sigma, mode="nearest",
                                             radius=5)
    np.testing.assert_allclose(out[i, ..., 0], expected, atol=1e-5)
  # A cosine of frequency f keeps exp(-4 pi^2 sigma^2 f^2) of its energy (continuous
  # Gaussian; the sampled one within a little aliasing).
  frequency = 0.2
  wave = np.cos(2 * np.pi * frequency * np.arange(40))[:, None] * np.ones((1, 40))
  waves = np.repeat(wave[None, ..., None], 2, 0).astype(np.float32)
  blurred = augment.gaussian_blur(waves, tf.constant([0.7, 1.5]), radius=5).numpy()
  inner = (slice(10, 30), slice(10, 30), 0)
  for i, sigma in enumerate([0.7, 1.5]):
    energy = np.sum(blurred[i][inner] ** 2) / np.sum(waves[i][inner] ** 2)
    assert energy == pytest.approx(numpy_gaussian_gain(sigma, frequency, 5) ** 2, rel=1e-4)
    assert energy == pytest.approx(np.exp(-4 * np.pi**2 * sigma**2 * frequency**2),
                                   rel=0.02)


def test_random_blur_is_a_gaussian_of_a_sigma_in_range_per_sample():
  frequency, size, count, max_sigma = 0.2, 40, 8, 1.5
  wave = np.cos(2 * np.pi * frequency * np.arange(size))
  image = (wave[:, None] + wave[None, :]).astype(np.float32)
  images = np.repeat(image[None, ..., None], count, 0)
  masks = np.ones_like(images, np.uint8)
  out, out_masks = augment.augment_batch(
      images, masks, tf.constant([3, 3]),
      appearance_only(blur_prob=1.0, blur_max_sigma=max_sigma))
  out = out.numpy()[..., 0]
  np.testing.assert_array_equal(out_masks, masks)
  radius = 5  # ceil(3 * max_sigma)
  grid = np.linspace(0.0, max_sigma, 3001)
  gains = np.array([numpy_gaussian_gain(s, frequency, radius) for s in grid])
  inner = (slice(10, 30), slice(10, 30))
  sigmas = []
  for s in range(count):
    # Away from the borders the blurred cosines are the cosines times the gain.
    gain = np.sum(out[s][inner] * image[inner]) / np.sum(image[inner] ** 2)
    assert gains[-1] - 1e-4 <= gain <= 1 + 1e-6
    sigma = float(np.interp(gain, gains[::-1], grid[::-1]))
    sigmas.append(sigma)
    expected = scipy.ndimage.gaussian_filter(image, sigma, mode="nearest", radius=radius)
    np.testing.assert_allclose(out[s], expected, atol=2e-4)
  assert len(set(np.round(sigmas, 3))) == count and max(sigmas) - min(sigmas) > 0.5, sigmas


@pytest.mark.parametrize("coarse", [(13, 7), (32, 28), (1, 5), (16, 14)])
def test_downsample_upsample_is_area_then_bilinear_resize(coarse):
  images = np.random.default_rng(1).random((2, 32, 28, 1)).astype(np.float32)
  out = augment.downsample_upsample(images, tf.constant([coarse] * 2, tf.float32))
  expected = tf.image.resize(tf.image.resize(images, coarse, method="area"), [32, 28],
                             method="bilinear")
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_random_lowres_draws_a_coarse_size_per_axis_and_sample():
  size, count, max_factor = 32, 8, 4.0
  rng = np.random.default_rng(2)
  row_profile, col_profile = rng.random(size), rng.random(size)
  # out = A_rows x A_cols^T and both operators keep constants: the rows' and the
  # columns' profiles come out separately.
  image = (row_profile[:, None] + col_profile[None, :]).astype(np.float32)
  images = np.repeat(image[None, ..., None], count, 0)
  masks = np.zeros_like(images, np.uint8)
  out, out_masks = augment.augment_batch(
      images, masks, tf.constant([8, 1]),
      appearance_only(lowres_prob=1.0, lowres_max_factor=max_factor))
  out = out.numpy()[..., 0]
  np.testing.assert_array_equal(out_masks, masks)

  def resized(profile, n):
    line = tf.constant(profile[None, :, None, None], tf.float32)
    back = tf.image.resize(tf.image.resize(line, [n, 1], method="area"), [size, 1],
                           method="bilinear")
    return back.numpy()[0, :, 0, 0]

  candidates = {n: (resized(row_profile, n), resized(col_profile, n))
                for n in range(1, size + 1)}
  drawn = []
  for s in range(count):
    rows = out[s][:, 0] - out[s][0, 0]
    cols = out[s][0, :] - out[s][0, 0]
    row_n = [n for n, (r, _) in candidates.items() if np.allclose(r - r[0], rows, atol=1e-5)]
    col_n = [n for n, (_, c) in candidates.items() if np.allclose(c - c[0], cols, atol=1e-5)]
    assert len(row_n) == 1 and len(col_n) == 1, (s, row_n, col_n)
    drawn.append((row_n[0], col_n[0]))
  sizes = np.array(drawn)
  assert sizes.min() >= round(size / max_factor) and sizes.max() <= size, drawn
  assert np.any(sizes[:, 0] != sizes[:, 1]) and len(set(drawn)) > count // 2, drawn


# AugmentConfig() on four slices, seed [11, 3], computed with trainer/augment.py as it was
# before the scanner/sequence changes were added.
REFERENCE_MASKS_SHA256 = "aba0b3f0513bc36bc012a78b20521ce0f6b4b8d2e3d11b6a1dc217377776e920"
REFERENCE_SUMS = [207.512501709, 258.656885035, 225.241789844, 205.84304802]
REFERENCE_PIXELS_5_7 = [0.96506834, 0.8759237, 0.8722046, 0.12578392]
REFERENCE_PIXELS_12_18 = [0.8066754, 0.8225208, 0.9077526, 0.113391876]


def test_default_augmentation_is_unchanged():
  rng = np.random.default_rng(4)
  slices = [trainer_testdata.synthetic_slice(rng, 24) for _ in range(4)]
  images = np.stack([s[0] for s in slices])[..., None]
  masks = np.stack([s[1] for s in slices])[..., None]
  seed = tf.constant([11, 3], tf.int64)
  config = augment.AugmentConfig()
  assert config.remap_prob == config.blur_prob == config.lowres_prob == 0
  out, out_masks = augment.augment_batch(images, masks, seed, config)
  out = out.numpy()
  assert hashlib.sha256(out_masks.numpy().tobytes()).hexdigest() == REFERENCE_MASKS_SHA256
  np.testing.assert_allclose(out.astype(np.float64).sum(axis=(1, 2, 3)), REFERENCE_SUMS,
                             rtol=1e-6)
  np.testing.assert_allclose(out[:, 5, 7, 0], REFERENCE_PIXELS_5_7, atol=1e-6)
  np.testing.assert_allclose(out[:, 12, 18, 0], REFERENCE_PIXELS_12_18, atol=1e-6)
  # Bit for bit: the stages and seeds that existed before, run by hand.
  geo_seed, int_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  by_hand, _ = augment.random_geometry(images, masks, geo_seed, config)
  by_hand = augment.random_intensity(by_hand, int_seed, config)
  np.testing.assert_array_equal(out, by_hand)


def test_train_config_wires_and_checks_the_appearance_settings():
  base = config_lib.TrainConfig(data_dir="d", model_dir="m")
  built = config_lib.augment_config(base)
  assert built.remap_prob == built.blur_prob == built.lowres_prob == 0  # Off by default.
  config = dataclasses.replace(base, aug_remap_prob=0.3, aug_blur_prob=0.2,
                               aug_blur_max_sigma=2.0, aug_lowres_prob=0.1,
                               aug_lowres_max_factor=2.5)
  config_lib.check_config(config)
  built = config_lib.augment_config(config)
  assert (built.remap_prob, built.blur_prob, built.blur_max_sigma, built.lowres_prob,
          built.lowres_max_factor) == (0.3, 0.2, 2.0, 0.1, 2.5)
  for name, value, expected in (("aug_remap_prob", 1.5, "0 <= p <= 1"),
                                ("aug_lowres_prob", -0.1, "0 <= p <= 1"),
                                ("aug_blur_max_sigma", -0.5, ">= 0"),
                                ("aug_lowres_max_factor", 0.5, ">= 1")):
    with pytest.raises(config_lib.ConfigError, match=f"--{name}=.*{expected}"):
      config_lib.check_config(dataclasses.replace(config, **{name: value}))
  with pytest.raises(config_lib.ConfigError, match="aug_remap_prob=0.3 with --noaugment"):
    config_lib.check_config(dataclasses.replace(base, aug_remap_prob=0.3, augment=False))


def test_cut_field_of_view_pads_a_band_of_the_labelled_extent_on_one_side():
  image, mask = t2_like_slice()  # rows 42: are padding (IGNORE_LABEL)
  images = np.stack([image] * 5)[..., None]
  masks = np.stack([mask] * 5)[..., None]
  side = tf.constant([0, 1, 2, 3, 1])
  share = tf.constant([0.25, 0.25, 0.5, 0.5, 0.0])
  out, out_masks = augment.cut_field_of_view(images, masks, side, share)
  out, out_masks = out.numpy()[..., 0], out_masks.numpy()[..., 0]
  low = image.min()
  cut = np.zeros((5,) + mask.shape, bool)
  cut[0, :11] = True         # top: a quarter of the 42 labelled rows, 0..10
  cut[1, 31:] = True         # bottom: rows after 41 - 10.5 (padding rows included)
  cut[2, :, :24] = True      # left: half of the 48 columns
  cut[3, :, 24:] = True      # right
  for i in range(5):
    np.testing.assert_array_equal(out_masks[i][cut[i]], schema.IGNORE_LABEL)
    np.testing.assert_array_equal(out_masks[i][~cut[i]], mask[~cut[i]])
    np.testing.assert_array_equal(out[i][cut[i]], low)
    np.testing.assert_array_equal(out[i][~cut[i]], image[~cut[i]])
  # The band is measured on the labelled extent, not the square: the bottom cut reaches
  # into the anatomy although the square's last rows are padding already.
  assert (out_masks[1][31:42] == schema.IGNORE_LABEL).all()
  # Nothing but padding: unchanged.
  empty = np.full((1,) + mask.shape + (1,), schema.IGNORE_LABEL, np.uint8)
  same, same_mask = augment.cut_field_of_view(images[:1], empty, tf.constant([1]),
                                              tf.constant([0.2]))
  np.testing.assert_array_equal(same, images[:1])
  np.testing.assert_array_equal(same_mask, empty)


def test_cut_is_drawn_per_sample_and_the_same_eagerly_in_tf_data_and_compiled():
  images, masks = synthetic_batch(8)
  config = appearance_only(cut_prob=0.5, cut_max=0.4)
  seed = tf.constant([-3, 2**40 + 1], tf.int64)
  eager = augment.augment_batch(images, masks, seed, config)
  graph = next(iter(tf.data.Dataset.from_tensors((images, masks, seed)).map(
      lambda i, m, s: augment.augment_batch(i, m, s, config))))
  compiled = tf.function(lambda i, m, s: augment.augment_batch(i, m, s, config, True),
                         jit_compile=True)(images, masks, seed)
  for out in (graph, compiled):
    np.testing.assert_allclose(out[0], eager[0], atol=1e-5)
    np.testing.assert_array_equal(out[1], eager[1])
  out_masks = eager[1].numpy()
  cut = [(out_masks[i] == schema.IGNORE_LABEL).sum() > (masks[i] == schema.IGNORE_LABEL).sum()
         for i in range(len(images))]
  assert any(cut) and not all(cut), cut


def test_cut_max_is_below_one():
  base = config_lib.TrainConfig(data_dir="d", model_dir="m", aug_cut_prob=0.3)
  config_lib.check_config(base)
  with pytest.raises(config_lib.ConfigError, match="--aug_cut_max=1.0: expected 0 <= value < 1"):
    config_lib.check_config(dataclasses.replace(base, aug_cut_max=1.0))
