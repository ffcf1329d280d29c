"""Input pipeline and augmentation: eager == tf.data, alignment, counts, sharding."""
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainer_testdata
from data_prep import manifest as manifest_lib
from data_prep import schema
from trainer import augment
from trainer import input_pipeline
from trainer import train


def square_example(size=32):
  """An image that is 1 exactly where the mask is 1 (a square), 0 elsewhere."""
  mask = np.zeros((size, size, 1), np.uint8)
  mask[8:20, 10:24] = 1
  return mask.astype(np.float32), mask


def test_augment_same_eagerly_and_in_tf_data():
  image, mask = trainer_testdata.synthetic_slice(np.random.default_rng(1), 32)
  image, mask = image[..., None], mask[..., None]
  seed = tf.constant([3, 7], tf.int64)
  eager = augment.augment(tf.constant(image), tf.constant(mask), seed)
  ds = tf.data.Dataset.from_tensors((image, mask, seed)).map(augment.augment)
  graph = next(iter(ds))
  np.testing.assert_allclose(eager[0], graph[0], atol=1e-5)
  np.testing.assert_array_equal(eager[1], graph[1])
  assert eager[1].dtype == tf.uint8 and eager[0].shape == (32, 32, 1)
  other = augment.augment(tf.constant(image), tf.constant(mask), tf.constant([4, 7]))
  assert not np.allclose(eager[0], other[0])


def test_augment_batch_same_eagerly_and_in_tf_data_and_independent_per_sample():
  image, mask = trainer_testdata.synthetic_slice(np.random.default_rng(1), 32)
  images = np.repeat(image[None, ..., None], 3, axis=0)
  masks = np.repeat(mask[None, ..., None], 3, axis=0)
  seed = tf.constant([5, 2], tf.int64)
  eager = augment.augment_batch(images, masks, seed)
  graph = next(iter(tf.data.Dataset.from_tensors((images, masks, seed)).map(
      augment.augment_batch)))
  np.testing.assert_allclose(eager[0], graph[0], atol=1e-5)
  np.testing.assert_array_equal(eager[1], graph[1])
  # Same input slice three times: each sample draws its own transform.
  assert not np.allclose(eager[0][0], eager[0][1])
  assert not np.allclose(eager[0][1], eager[0][2])


def test_geometry_keeps_mask_on_the_image_edge():
  image, mask = square_example()
  geometric_only = augment.AugmentConfig(
      max_rotation_deg=30, scale_range=0.2, max_translation=0.1, geometric_prob=1.0,
      gamma_prob=0, contrast_prob=0, bias_field_prob=0, noise_prob=0)
  changed = 0
  # One batch of 8 copies with an image offset per sample: each keeps its own air value.
  images = np.stack([image + 10 * i for i in range(8)])
  out_images, out_masks = augment.augment_batch(images, np.stack([mask] * 8),
                                                tf.constant([0, 1]), geometric_only)
  for s in range(8):
    out_image, out_mask = out_images.numpy()[s, ..., 0] - 10 * s, out_masks.numpy()[s, ..., 0]
    assert out_image.min() > -1e-4 and out_image.max() < 1 + 1e-4
    # Outside the source the mask is IGNORE_LABEL (not anatomy), never a class.
    assert set(np.unique(out_mask)) <= {0, 1, schema.IGNORE_LABEL}
    # Bilinear image > 0.5 <=> nearest mask == 1, up to a few corner pixels.
    agree = np.mean((out_image > 0.5) == (out_mask == 1))
    assert agree > 0.98, (s, agree)
    changed += not np.array_equal(out_mask, mask[..., 0])
  assert changed == 8


def test_elastic_keeps_mask_on_the_image_edge_eagerly_and_in_tf_data():
  image, mask = square_example()
  elastic_only = augment.AugmentConfig(
      geometric_prob=0, elastic_alpha=3.0, elastic_prob=1.0, gamma_prob=0,
      contrast_prob=0, bias_field_prob=0, noise_prob=0)
  images, masks = np.stack([image] * 4), np.stack([mask] * 4)
  seed = tf.constant([9, 9])
  out_images, out_masks = augment.augment_batch(images, masks, seed, elastic_only)
  graph = next(iter(tf.data.Dataset.from_tensors((images, masks, seed)).map(
      lambda i, m, s: augment.augment_batch(i, m, s, elastic_only))))
  np.testing.assert_allclose(out_images, graph[0], atol=1e-5)
  # Also as in an XLA-compiled train step (--augment_on=device --jit_compile); XLA's
  # random draws differ from TF's for the same seed, so hold it to alignment only.
  compiled = tf.function(lambda i, m, s: augment.augment_batch(i, m, s, elastic_only, True),
                         jit_compile=True)(images, masks, seed)
  for out_image, out_mask in zip(np.concatenate([out_images, compiled[0]]),
                                 np.concatenate([out_masks, compiled[1]])):
    assert np.mean((out_image > 0.5) == (out_mask == 1)) > 0.97
    assert not np.array_equal(out_mask, mask)


def test_intensity_augmentation_leaves_mask_and_shape():
  image, mask = trainer_testdata.synthetic_slice(np.random.default_rng(2), 32)
  intensity_only = augment.AugmentConfig(geometric_prob=0, gamma_prob=1, contrast_prob=1,
                                         bias_field_prob=1, noise_prob=1)
  out_image, out_mask = augment.augment(image[..., None], mask[..., None],
                                        tf.constant([0, 0]), intensity_only)
  np.testing.assert_array_equal(out_mask.numpy()[..., 0], mask)
  assert np.all(np.isfinite(out_image)) and not np.allclose(out_image[..., 0], image)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_eval_dataset_reads_every_example_once_in_order(tmp_path, compression):
  data_dir = trainer_testdata.write_dataset(tmp_path, num_train=5, num_val=5,
                                            compression=compression)
  manifest = manifest_lib.load(data_dir)
  files = manifest.files("val")
  batches = list(input_pipeline.make_dataset(
      files, image_size=32, compression=manifest.compression_type,
      global_batch_size=2))
  assert [len(b[0]) for b in batches] == [2, 2, 1]
  assert batches[0][0].dtype == tf.float32 and batches[0][1].dtype == tf.int32
  # The slices trainer_testdata drew, in its order: 5 train slices, then val 0..4.
  rng = np.random.default_rng(0)
  drawn = [trainer_testdata.synthetic_slice(rng, 32) for _ in range(10)][5:]
  images = np.concatenate([b[0].numpy() for b in batches])[..., 0]
  masks = np.concatenate([b[1].numpy() for b in batches])[..., 0]
  np.testing.assert_array_equal(images, np.stack([d[0] for d in drawn]))
  np.testing.assert_array_equal(masks, np.stack([d[1] for d in drawn]))


def test_padding_becomes_ignore_label_and_augmentation_moves_it_in():
  # A 20x32 slice fitted into 32x32: rows 6..25 are the slice, the rest is padding.
  image = np.ones((32, 32), np.float32)
  mask = np.zeros((32, 32), np.uint8)
  mask[6:26, 4:10] = 2
  geometry = schema.Geometry(20, 32, 20, 32, 6, 0)
  example = schema.make_example(image, mask, case_id="c", slice_index=0, source="c.png",
                                geometry=geometry, spacing=[1, 1], norm_method="percentile",
                                norm_offset=0.0, norm_scale=1.0)
  parsed = schema.parse_example(example.SerializeToString(), 32)
  got = parsed["mask"].numpy()[..., 0]
  expected = np.full((32, 32), schema.IGNORE_LABEL, np.uint8)
  expected[6:26] = mask[6:26]
  np.testing.assert_array_equal(got, expected)
  assert parsed["valid"].numpy()[..., 0].sum() == 20 * 32
  # A shift of 8 columns moves 8 columns from outside the square in: ignored too.
  transforms = augment.affine_transforms(tf.constant([32.0, 32.0]), tf.constant([0.0]),
                                         tf.constant([1.0]), tf.constant([[0.0, 8.0]]))
  _, warped = augment.warp(image[None, ..., None], got[None, ..., None], transforms)
  warped = warped.numpy()[0, ..., 0]
  np.testing.assert_array_equal(warped[:, :8], schema.IGNORE_LABEL)
  np.testing.assert_array_equal(warped[:, 8:], got[:, :-8])
  assert (warped == 2).sum() == (got == 2).sum()


def test_training_dataset_batches_repeats_and_shards_per_worker(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path, num_train=6, train_shards=2)
  manifest = manifest_lib.load(data_dir)
  files = manifest.files("train")
  ticks = []
  ds = input_pipeline.make_dataset(files, image_size=32, compression="",
                                   global_batch_size=4,
                                   training=input_pipeline.TrainingOptions(
                                       seed=0, augment=augment.AugmentConfig()),
                                   on_batch=lambda: ticks.append(1))
  batches = list(ds.take(5))  # 20 examples > 6: the dataset repeats.
  assert all(b[0].shape == (4, 32, 32, 1) for b in batches)
  assert len(ticks) >= 5
  # Two workers of one replica each: per-replica batch 2, disjoint files.
  seen = []
  for worker in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
    ds = input_pipeline.make_dataset(files, image_size=32, compression="",
                                     global_batch_size=4,
                                     training=input_pipeline.TrainingOptions(),
                                     input_context=context)
    images = np.concatenate([b[0].numpy() for b in ds.take(4)])
    assert images.shape == (8, 32, 32, 1)
    own = input_pipeline.make_dataset([files[worker]], image_size=32, compression="",
                                      global_batch_size=8)
    expected = {round(float(x.sum()), 3) for b in own for x in b[0].numpy()}
    seen.append({round(float(x.sum()), 3) for x in images})
    assert seen[-1] <= expected and len(expected) == 3
  assert not seen[0] & seen[1]


def test_missing_shard_is_reported(tmp_path):
  with pytest.raises(ValueError, match="missing"):
    input_pipeline.make_dataset([str(tmp_path / "nope.tfrecord")], image_size=32,
                                compression="", global_batch_size=1)


def test_warp_matches_image_projective_transform():
  rng = np.random.default_rng(3)
  images = rng.random((3, 24, 20, 1)).astype(np.float32) + 2.0
  masks = rng.integers(0, 3, (3, 24, 20, 1)).astype(np.int32)
  transforms = augment.affine_transforms(tf.constant([24.0, 20.0]),
                                         tf.constant([0.3, -0.2, 0.05]),
                                         tf.constant([1.1, 0.9, 1.0]),
                                         tf.constant([[2.5, -1.0], [0.0, 3.2], [-4.0, 1.5]]))
  out_images, out_masks = augment.warp(images, masks, transforms)
  low = images.min(axis=(1, 2, 3), keepdims=True)
  reference = tf.raw_ops.ImageProjectiveTransformV3(
      images=images - low, transforms=transforms, output_shape=[24, 20], fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT") + low
  ref_masks = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(masks, tf.float32), transforms=transforms, output_shape=[24, 20],
      fill_value=float(schema.IGNORE_LABEL), interpolation="NEAREST", fill_mode="CONSTANT")
  np.testing.assert_allclose(out_images, reference, atol=1e-4)
  assert np.mean(out_masks.numpy() == ref_masks.numpy().astype(np.int32)) > 0.995
  assert out_masks.dtype == tf.int32


def test_bias_field_upsampling_is_bilinear_resize():
  coarse = tf.random.stateless_uniform([2, 4, 4], seed=[1, 1])
  matrix = augment._bilinear_matrix  # pylint: disable=protected-access
  ours = tf.einsum("hk,bkl,wl->bhw", matrix(32, 4), coarse, matrix(24, 4))
  np.testing.assert_allclose(ours, tf.image.resize(coarse[..., None], [32, 24])[..., 0],
                             atol=1e-5)


def test_elastic_field_upsampling_is_bicubic_resize():
  coarse = tf.random.stateless_uniform([2, 6, 6, 2], seed=[1, 2], minval=-1, maxval=1)
  matrix = augment._cubic_matrix  # pylint: disable=protected-access
  # 64 px: every sample position falls on TF's 1/1024 table of kernel weights, so the
  # two agree exactly (elsewhere TF's quantized weights differ by up to ~1e-3).
  ours = tf.einsum("hk,bklc,wl->bhwc", matrix(64, 6), coarse, matrix(64, 6))
  np.testing.assert_allclose(ours, tf.image.resize(coarse, [64, 64], method="bicubic"),
                             atol=1e-5)


def test_cached_training_dataset_repeats_and_reshuffles(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path, num_train=6, train_shards=2)
  manifest = manifest_lib.load(data_dir)
  files = manifest.files("train")
  ds = input_pipeline.make_dataset(files, image_size=32, compression="",
                                   global_batch_size=6,
                                   training=input_pipeline.TrainingOptions(seed=0, cache=True))
  epochs = [b[0].numpy() for b in ds.take(3)]
  sums = [[round(float(x.sum()), 3) for x in e] for e in epochs]
  # Every pass holds the same 6 slices, in a new order.
  assert sorted(sums[0]) == sorted(sums[1]) == sorted(sums[2]) and len(set(sums[0])) == 6
  assert sums[0] != sums[1] or sums[1] != sums[2]


def test_augment_in_train_step_aligns_and_only_trains():
  image, mask = square_example()
  images = np.stack([image] * 4)
  masks = np.stack([mask.astype(np.int32)] * 4)
  inputs = keras.Input((32, 32, 1))
  model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
  model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
  seen_images = tf.Variable(tf.zeros(images.shape))
  seen_masks = tf.Variable(tf.zeros(masks.shape, tf.int32))

  def recorder(data):  # Stands in for Keras' step: records what the step receives.
    seen_images.assign(data[0])
    seen_masks.assign(data[1])
    return {"loss": tf.constant(0.0)}

  model.train_step = recorder
  geometric_only = augment.AugmentConfig(
      max_rotation_deg=30, scale_range=0.2, max_translation=0.1, geometric_prob=1.0,
      gamma_prob=0, contrast_prob=0, bias_field_prob=0, noise_prob=0)
  augment.augment_in_train_step(model, geometric_only, seed=1)
  model.fit(images, masks, batch_size=4, epochs=1, verbose=0)
  out_images, out_masks = seen_images.numpy(), seen_masks.numpy()
  for out_image, out_mask in zip(out_images, out_masks):
    assert not np.array_equal(out_mask, masks[0])
    assert np.mean((out_image > 0.5) == (out_mask == 1)) > 0.98
  assert not np.array_equal(out_masks[0], out_masks[1])  # Per-sample transforms.
  # Evaluation sees the data as given: its loss is that of the unaugmented batch.
  expected = keras.losses.sparse_categorical_crossentropy(masks, model(images))
  assert model.evaluate(images, masks, batch_size=4, verbose=0) == pytest.approx(
      float(np.mean(expected)), rel=1e-5)


def test_spine_train_with_device_augmentation(tmp_path, monkeypatch):
  # Count the augmentations the train step really runs, and what they change.
  calls = tf.Variable(0, dtype=tf.int64)
  changed = tf.Variable(0.0)
  original = augment.augment_batch

  def spy(images, masks, seed, config, static_shapes=False):
    out_images, out_masks = original(images, masks, seed, config, static_shapes)
    calls.assign_add(1)
    changed.assign_add(tf.reduce_mean(tf.abs(out_images - images)))
    return out_images, out_masks

  monkeypatch.setattr(augment, "augment_batch", spy)
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=0)
  config = train.TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "model"),
                             epochs=1, base_filters=4, depth=2, global_batch_size=2,
                             norm="group", verbose=0, augment_on="device",
                             elastic_prob=0.5)
  result = train.train_and_evaluate(config)
  assert result["epochs_completed"] == 1 and np.isfinite(result["history"][0]["loss"])
  assert int(calls.numpy()) == 2  # 4 slices, batch 2: both steps augmented in the step
  assert float(changed.numpy()) > 0
  with pytest.raises(train.ConfigError, match="augment_on"):
    train.check_config(dataclasses.replace(config, augment_on="gpu"))
