"""A head answers only for the classes its protocol draws (issue 19).

A head trained only on folders that outline some classes (vertebral bodies only) learned
them against "everything else"; how it splits the rest among background and the classes
it never saw outlined is arbitrary (a vertebral-body head measured on a real volume
called 96% of it disc). The export folds those classes into background, per head.
"""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from data_prep import manifest
from data_prep import schema
from export import serving
from trainer import unet

SIZE = 32


def _manifest(protocol, annotated):
  return manifest.make(image_size=SIZE, normalization="percentile", per="image",
                       compression="none", splits={},
                       extra={"protocol": protocol, "annotated_labels": annotated})


def _model_dir(path, model, manifests):
  """A spine-train output: best.keras, dataset.json (the first folder's) and, for
  several folders, datasets.json as the trainer writes it."""
  path.mkdir(parents=True)
  model.save(path / "best.keras")
  manifest.write_json_atomic(path / schema.MANIFEST_NAME, manifests[0])
  if len(manifests) > 1:
    record = {"datasets": [{"name": f"d{i}", "data_dir": f"/data/d{i}", "manifest": m}
                           for i, m in enumerate(manifests)]}
    (path / "datasets.json").write_text(json.dumps(record))
  return path


def _disc_leaning(model, layer_name):
  """Makes `layer_name` favour class 1 (disc), so an unfolded mask is mostly disc."""
  layer = model.get_layer(layer_name)
  kernel, bias = layer.get_weights()
  bias[1] += 5.0
  layer.set_weights([kernel, bias])


def _images():
  return tf.constant(np.random.default_rng(0).uniform(0, 200, (2, SIZE, SIZE, 1)),
                     tf.float32)


def test_a_vertebra_only_head_never_outputs_discs(tmp_path):
  keras.utils.set_random_seed(0)
  model = unet.build_unet(base_filters=4, depth=2, norm="group", protocols=("full", "vb"))
  _disc_leaning(model, schema.head_layer("vb"))
  model_dir = _model_dir(tmp_path / "run", model,
                         [_manifest("full", [0, 1, 2]), _manifest("vb", [0, 2])])
  export_dir = serving.export(model_dir, tmp_path / "export" / "1", protocol="full")
  meta = json.loads((export_dir / serving.METADATA_FILE).read_text())
  assert meta["drawn_classes"] == {"full": [0, 1, 2], "vb": [0, 2]}
  loaded = tf.saved_model.load(str(export_dir))
  images = _images()
  twin = loaded.signatures["serving_default_protocol"]
  vb = twin(images=images, protocol=tf.constant("vb"))
  # The raw vb head's softmax, for comparison: mostly disc before the fold.
  head = keras.Model(model.input, model.get_layer(schema.head_layer("vb")).output)
  raw = tf.nn.softmax(head(images / 200.0)).numpy()  # any input: only the bias matters
  assert (raw.argmax(-1) == 1).mean() > 0.5
  probs = vb["probabilities"].numpy()
  assert not np.any(vb["mask"].numpy() == 1)
  assert np.all(probs[..., 1] == 0.0)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # The full head draws every class: its twin equals the plain signature, bit for bit.
  full = twin(images=images, protocol=tf.constant("full"))
  plain = loaded.signatures["serving_default"](images=images)
  np.testing.assert_array_equal(full["probabilities"].numpy(),
                                plain["probabilities"].numpy())


def test_a_one_head_model_of_vertebra_only_folders_never_outputs_discs(tmp_path):
  keras.utils.set_random_seed(0)
  model = unet.build_unet(base_filters=4, depth=2, norm="group")
  _disc_leaning(model, "logits")
  model_dir = _model_dir(tmp_path / "run", model, [_manifest("default", [0, 2])])
  export_dir = serving.export(model_dir, tmp_path / "export" / "1")
  out = tf.saved_model.load(str(export_dir)).signatures["serving_default"](
      images=_images())
  assert not np.any(out["mask"].numpy() == 1)
  assert np.all(out["probabilities"].numpy()[..., 1] == 0.0)


def test_a_default_head_over_full_and_partial_folders_keeps_every_class(tmp_path):
  keras.utils.set_random_seed(0)
  model = unet.build_unet(base_filters=4, depth=2, norm="group")
  _disc_leaning(model, "logits")
  model_dir = _model_dir(tmp_path / "run", model, [_manifest("default", [0, 1, 2]),
                                                   _manifest("default", [0, 2])])
  assert serving.drawn_classes(model_dir, manifest.load(model_dir), ["default"]) == [
      [0, 1, 2]]
  export_dir = serving.export(model_dir, tmp_path / "export" / "1")
  out = tf.saved_model.load(str(export_dir)).signatures["serving_default"](
      images=_images())
  assert np.any(out["mask"].numpy() == 1)
