"""Labelling protocols: the name in the dataset contract, one output head per protocol in
the trainer (each example's loss on its own head only, each folder validated on its own
head), the refusals, and the export of one protocol's head."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainer_testdata
from test_trainer_unet import expected_params
from data_prep import manifest as manifest_lib
from data_prep import metrics
from data_prep import phantom
from data_prep import schema
from data_prep import writer
from export import serving
from trainer import augment as augment_lib
from trainer import input_pipeline
from trainer import losses
from trainer import run_dir
from trainer import train
from trainer import unet

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(base_filters=4, depth=2, global_batch_size=2, norm="group", verbose=0)
OFFSET = 10.0  # added to B's images: a slice of B is told from one of A by its values


def _example(protocol=None):
  kwargs = {} if protocol is None else {"protocol": protocol}
  return schema.make_example(
      np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8), case_id="c",
      slice_index=0, source="c.png", geometry=schema.Geometry(8, 8, 8, 8, 0, 0),
      spacing=[1.0, 1.0], norm_method="percentile", norm_offset=0.0, norm_scale=1.0,
      **kwargs)


def test_examples_carry_their_protocol_and_old_ones_read_as_the_default():
  thin = _example("thin_discs")
  assert thin.features.feature[schema.PROTOCOL].bytes_list.value == [b"thin_discs"]
  parsed = schema.parse_example(tf.constant(thin.SerializeToString()))
  assert parsed["protocol"].numpy() == b"thin_discs"
  # The default is not written (a default conversion keeps its bytes) and is what an
  # example without the key (every shard written before protocols) reads as.
  default = _example(schema.DEFAULT_PROTOCOL)
  assert schema.PROTOCOL not in default.features.feature
  assert default.SerializeToString(deterministic=True) == _example().SerializeToString(
      deterministic=True)
  parsed = schema.parse_example(tf.constant(default.SerializeToString()))
  assert parsed["protocol"].numpy() == schema.DEFAULT_PROTOCOL.encode()
  for bad in ("Thin", "thin-discs", "", "x" * 33, "a b"):
    with pytest.raises(ValueError, match="lowercase letters, digits or underscores"):
      _example(bad)


def test_manifest_protocol_defaults_and_is_validated():
  raw = manifest_lib.make(image_size=8, normalization="percentile", per="image",
                          compression="none", splits={})
  assert manifest_lib.Manifest("d", raw).protocol == schema.DEFAULT_PROTOCOL
  assert manifest_lib.Manifest("d", dict(raw, protocol="vb_only")).protocol == "vb_only"
  with pytest.raises(ValueError, match=r"d/dataset.json: protocol 'VB'"):
    manifest_lib.Manifest("d", dict(raw, protocol="VB"))


def test_conversion_records_the_protocol_only_when_named(tmp_path):
  phantom.write_2d_dataset(tmp_path / "in", 2, min_size=32, max_size=32)
  images, masks = str(tmp_path / "in" / "images"), str(tmp_path / "in" / "masks")
  options = dict(image_size=32, num_workers=1, val_fraction=0.0)
  writer.convert_dataset(images, masks, str(tmp_path / "default"),
                         writer.ConvertOptions(**options), progress=False)
  writer.convert_dataset(images, masks, str(tmp_path / "thin"),
                         writer.ConvertOptions(protocol="thin_discs", **options),
                         progress=False)
  default = manifest_lib.load(tmp_path / "default")
  thin = manifest_lib.load(tmp_path / "thin")
  assert "protocol" not in default.raw and default.protocol == schema.DEFAULT_PROTOCOL
  assert thin.raw["protocol"] == thin.protocol == "thin_discs"

  def protocols(m):
    return [schema.parse_example(r)["protocol"].numpy().decode()
            for r in tf.data.TFRecordDataset(m.files("train"))]

  assert protocols(default) == [schema.DEFAULT_PROTOCOL] * 2
  assert protocols(thin) == ["thin_discs"] * 2
  # Only the key differs: the same slices.
  assert default.raw["class_pixel_counts"] == thin.raw["class_pixel_counts"]
  with pytest.raises(ValueError, match="protocol 'Thin Discs'"):
    writer.ConvertOptions(protocol="Thin Discs")


def test_one_protocol_builds_todays_model_and_two_add_one_head():
  today = unet.build_unet(base_filters=4, depth=2, norm="group")
  names = [layer.name for layer in today.layers]
  for protocols in ((), ("spine2d",)):
    model = unet.build_unet(base_filters=4, depth=2, norm="group", protocols=protocols)
    assert [layer.name for layer in model.layers] == names
    assert model.count_params() == expected_params(4, 2, 3, "group")
    assert model(np.zeros((2, 32, 32, 1), np.float32)).shape == (2, 32, 32, 3)
  two = unet.build_unet(base_filters=4, depth=2, norm="group", protocols=("a", "b"))
  # One more 1x1 head on the body's 4 channels: 4 x 3 weights + 3 biases.
  assert two.count_params() == expected_params(4, 2, 3, "group") + 15
  assert two(np.zeros((2, 32, 32, 1), np.float32)).shape == (2, 32, 32, 6)
  assert {"logits_a", "logits_b", "logits"} <= {layer.name for layer in two.layers}
  assert serving.model_protocols(two, None) == ["a", "b"]
  with pytest.raises(ValueError, match="sorted, unique"):
    unet.build_unet(base_filters=4, depth=2, protocols=("b", "a"))


def _labels(masks, heads):
  """Labels [N, H, W, 2] of `losses.make_loss(num_heads=...)`."""
  heads = np.broadcast_to(np.asarray(heads)[:, None, None, None], masks.shape)
  return tf.constant(np.concatenate([masks, heads], axis=-1), tf.int32)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_an_example_trains_only_its_own_protocols_head(name):
  keras.utils.set_random_seed(0)
  model = unet.build_unet(base_filters=4, depth=2, norm="group", protocols=("a", "b"))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
  masks = rng.integers(0, 3, (2, 16, 16, 1))
  loss_fn = losses.make_loss(name, num_classes=3, num_heads=2)

  def gradients(heads):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(loss_fn(_labels(masks, heads), model(images)))
    grads = tape.gradient(loss, model.trainable_variables)
    return {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}

  for own, other in ((1, "logits_a"), (0, "logits_b")):
    grads = gradients([own, own])
    for path, grad in grads.items():
      if path.startswith(other + "/"):
        assert not grad.any(), path  # exactly zero: nothing reaches the other head
      elif path.startswith(schema.head_layer("ab"[own]) + "/"):
        assert np.abs(grad).max() > 0, path
  # A mixed batch: each sample's loss is the one-head loss of its own head's logits.
  logits = model(images).numpy()
  single = losses.make_loss(name, num_classes=3)
  mixed = loss_fn(_labels(masks, [0, 1]), tf.constant(logits)).numpy()
  own = np.concatenate([logits[:1, ..., :3], logits[1:, ..., 3:]])
  np.testing.assert_allclose(mixed, single(tf.constant(masks), tf.constant(own)).numpy(),
                             rtol=1e-6)


@pytest.fixture(name="two_protocols", scope="module")
def fixture_two_protocols(tmp_path_factory):
  """A: fully labelled, protocol "full". B: vertebrae only, protocol "vb", offset."""
  root = tmp_path_factory.mktemp("protocols")
  a = trainer_testdata.write_dataset(root / "spine_a", num_train=6, num_val=3,
                                     protocol="full")
  b = trainer_testdata.write_dataset(root / "spine_b", num_train=4, num_val=2, seed=1,
                                     image_offset=OFFSET, annotated=(2,), protocol="vb")
  return root, a, b


def test_the_pipeline_carries_each_examples_head(two_protocols):
  _, a, b = two_protocols
  files = [manifest_lib.load(d).files("train") for d in (a, b)]
  options = input_pipeline.TrainingOptions(
      seed=0, deterministic=True, weights=[1.0, 1.0],
      augment=augment_lib.AugmentConfig(max_rotation_deg=30.0, elastic_prob=1.0))
  ds = input_pipeline.make_dataset(files, image_size=32, compression=["", ""],
                                   global_batch_size=4, training=options,
                                   protocols=["full", "vb"])
  seen = set()
  for images, masks in ds.take(10):
    assert masks.shape == (4, 32, 32, 2)
    from_b = images.numpy().reshape(4, -1).mean(axis=1) > OFFSET / 2
    for sample, is_b in zip(masks.numpy(), from_b):
      # Augmentation moved the mask, never the head index: constant over the slice.
      assert (sample[..., 1] == int(is_b)).all()
      seen.add(bool(is_b))
  assert seen == {False, True}
  # One protocol: masks as ever. An example of a protocol the model lacks fails the read.
  val_b = manifest_lib.load(b).files("val")
  (_, masks), = input_pipeline.make_dataset(val_b, image_size=32, compression="",
                                            global_batch_size=2, protocols=["vb"])
  assert masks.shape == (2, 32, 32, 1)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="none of the model heads full, thin"):
    list(input_pipeline.make_dataset(val_b, image_size=32, compression="",
                                     global_batch_size=2, protocols=["full", "thin"]))


def _counts(model, data_dir, head):
  """Summed `metrics.counts` over the val split of `data_dir`, scored on `head`."""
  ds = input_pipeline.make_dataset(manifest_lib.load(data_dir).files("val"),
                                   image_size=32, compression="", global_batch_size=2)
  total = np.zeros((3, 3), np.int64)
  for images, masks in ds:
    logits = model(images, training=False).numpy()[..., 3 * head:3 * head + 3]
    total += metrics.counts(np.argmax(logits, axis=-1), masks.numpy()[..., 0])
  return total


@pytest.fixture(name="trained", scope="module")
def fixture_trained(two_protocols):
  root, a, b = two_protocols
  config = train.TrainConfig(data_dir=f"{a},{b}", model_dir=str(root / "model"), epochs=1,
                             augment=False, **TINY)
  return config, train.train_and_evaluate(config)


def test_two_protocols_train_with_a_head_each_validated_on_its_own(two_protocols,
                                                                   trained):
  root, a, b = two_protocols
  config, result = trained
  model_dir = pathlib.Path(config.model_dir)
  model = keras.models.load_model(model_dir / "best.keras", compile=False)
  assert serving.model_protocols(model, None) == ["full", "vb"]
  assert model.output.shape[-1] == 6
  record = json.loads((model_dir / run_dir.DATASETS_NAME).read_text())
  assert record["protocols"] == ["full", "vb"]
  # Each folder's figures are those of its own head; the heads disagree, so scoring a
  # folder on the other head would give other counts.
  (entry,) = json.loads((model_dir / "history.json").read_text())
  for name, data_dir, head in (("spine_a", a, 0), ("spine_b", b, 1)):
    own = metrics.dice(_counts(model, data_dir, head))
    for key, value in own.items():
      if value == metrics.ABSENT:
        assert f"val_{name}_{key}" not in entry, key
      else:
        assert entry[f"val_{name}_{key}"] == pytest.approx(value, abs=1e-6), (name, key)
    assert not np.array_equal(_counts(model, data_dir, head),
                              _counts(model, data_dir, 1 - head))
  assert result["best_val_dice_mean"] == pytest.approx(entry["val_dice_mean_datasets"])
  # Resume: the same run has nothing to do; the model_dir refuses other protocols.
  assert train.train_and_evaluate(config)["initial_epoch"] == 1
  other = trainer_testdata.write_dataset(root / "spine_c", num_train=2, num_val=1,
                                         protocol="thin")
  renamed = dict(record["datasets"][1], manifest=manifest_lib.load(other).raw)
  absolute = train.with_absolute_paths(config)
  with pytest.raises(train.ConfigError, match=r"protocol\(s\) \['full', 'vb'\], --data_dir "
                     r"now has \['full', 'thin'\]"):
    run_dir.check(absolute, manifest_lib.load(a),
                  {"datasets": [record["datasets"][0], renamed]})


def test_folders_of_one_protocol_must_label_alike(two_protocols, tmp_path):
  _, a, b = two_protocols
  with pytest.raises(train.ConfigError, match=(
      rf"--dataset_weights=1,0: the labelling protocol\(s\) \['vb'\] of {b} would get "
      "an output head that nothing trains")):
    train.train_and_evaluate(train.TrainConfig(
        data_dir=f"{a},{b}", model_dir=str(tmp_path / "m"), epochs=1, dataset_weights="1,0",
        **TINY))
  vb_only = trainer_testdata.write_dataset(tmp_path / "vb_only", num_train=2, num_val=1,
                                           annotated=(2,), protocol="full")
  config = train.TrainConfig(data_dir=f"{a},{vb_only}", model_dir=str(tmp_path / "m"),
                             epochs=1, **TINY)
  with pytest.raises(train.ConfigError, match=(
      f"{vb_only} and {a} share the labelling protocol 'full' but differ in annotated "
      r"labels \(\[0, 2\] vs \[0, 1, 2\]\)")):
    train.train_and_evaluate(config)
  assert not (tmp_path / "m").exists()
  relabelled = trainer_testdata.write_dataset(tmp_path / "relabelled", num_train=2,
                                              num_val=1, protocol="full")
  raw = json.loads((pathlib.Path(relabelled) / "dataset.json").read_text())
  raw["flags"] = {"label_map": "0:0,1-5:1,6-9:2"}
  (pathlib.Path(relabelled) / "dataset.json").write_text(json.dumps(raw))
  with pytest.raises(train.ConfigError, match=f"{relabelled} and {a} share .* label map"):
    train.train_and_evaluate(dataclasses.replace(config, data_dir=f"{a},{relabelled}"))


def test_export_of_one_protocols_head_segments_with_that_head(trained, tmp_path):
  config, _ = trained
  model_dir = config.model_dir
  with pytest.raises(ValueError, match=r"one head per labelling protocol \(full, vb\); "
                     "pass --protocol=NAME"):
    serving.export(model_dir, tmp_path / "none" / "1")
  with pytest.raises(ValueError, match="--protocol=thin: .* its protocols are full, vb"):
    serving.export(model_dir, tmp_path / "thin" / "1", protocol="thin")
  assert not (tmp_path / "none").exists() and not (tmp_path / "thin").exists()
  out = serving.export(model_dir, tmp_path / "vb" / "1", protocol="vb")
  metadata = json.loads((out / serving.METADATA_FILE).read_text())
  assert (metadata["protocol"], metadata["protocols"]) == ("vb", ["full", "vb"])
  # The SavedModel's probabilities on stored squares are the softmax of the vb head,
  # the disc it never saw outlined folded into background (serving.drawn_classes).
  assert metadata["drawn_classes"] == {"full": [0, 1, 2], "vb": [0, 2]}
  full_model = keras.models.load_model(pathlib.Path(model_dir) / "best.keras",
                                       compile=False)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
  expected = tf.nn.softmax(full_model(images).numpy()[..., 3:], axis=-1).numpy()
  loaded = tf.saved_model.load(str(out))
  module = serving.SegmentationModule(
      serving.load_model_dir(model_dir, "vb")[0], image_size=32,
      norm_method="percentile")
  squares, _ = module.preprocess(tf.constant(images))
  got = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
  reference = tf.nn.softmax(full_model(squares).numpy()[..., 3:], axis=-1).numpy()
  reference[..., 0] += reference[..., 1]
  reference[..., 1] = 0.0
  np.testing.assert_allclose(got.numpy(), reference, atol=1e-5)
  head = serving.load_model_dir(model_dir, "vb")[0]
  np.testing.assert_allclose(tf.nn.softmax(head(images), axis=-1).numpy(), expected,
                             atol=1e-6)
  # A one-protocol model_dir needs no flag and names its protocol.
  one = tmp_path / "one"
  one.mkdir()
  unet.build_unet(base_filters=4, depth=2, norm="group").save(one / "best.keras")
  (one / "dataset.json").write_text((pathlib.Path(model_dir) / "dataset.json").read_text())
  metadata = json.loads((serving.export(one, tmp_path / "one_export" / "1")
                         / serving.METADATA_FILE).read_text())
  assert (metadata["protocol"], metadata["protocols"]) == ("full", ["full"])


def test_spine_export_refuses_a_missing_protocol_in_one_line(trained, tmp_path):
  config, _ = trained
  result = subprocess.run(
      [sys.executable, "-m", "export.export_saved_model", f"--model_dir={config.model_dir}",
       f"--export_dir={tmp_path / 'e' / '1'}"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l.startswith("spine-export: error:")]
  assert errors == [f"spine-export: error: {config.model_dir} has one head per labelling "
                    "protocol (full, vb); pass --protocol=NAME to name the default one"]
