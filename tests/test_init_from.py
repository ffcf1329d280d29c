"""spine-train --init_from (fine-tuning) on a tiny U-Net: weights loaded layer by layer
from each kind of source, heads re-initialized when they differ, one-line refusals that
leave the model_dir unwritten, config.json's record, resume, and --freeze=encoder."""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import trainer_testdata
from export import serving
from trainer import init_from
from trainer import train
from trainer import unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(base_filters=4, depth=2, global_batch_size=2, norm="group", verbose=0,
            augment=False, epochs=1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A trained one-head model_dir (1 epoch), its data, and a SavedModel export of it."""
  root = tmp_path_factory.mktemp("init")
  data = trainer_testdata.write_dataset(root / "data", num_train=2, num_val=1)
  model_dir = root / "src"
  train.train_and_evaluate(train.TrainConfig(data_dir=data, model_dir=str(model_dir),
                                             **TINY))
  export_dir = serving.export(model_dir, root / "export" / "1")
  return {"root": root, "data": data, "model_dir": model_dir, "export": export_dir,
          "model": keras.models.load_model(model_dir / "best.keras", compile=False)}


def _config(data, model_dir, **kwargs):
  return train.TrainConfig(data_dir=str(data), model_dir=str(model_dir),
                           **{**TINY, **kwargs})


def _checkpoint_only(source, tmp_path):
  """A copy of the source model_dir without best.keras: its latest checkpoint is read."""
  copy = tmp_path / "ckpt_only"
  shutil.copytree(source["model_dir"], copy)
  (copy / "best.keras").unlink()
  return copy


def _loaded(given, num_classes=3, labels=None, protocols=()):
  """A fresh tiny U-Net after init from `given`, and the plan."""
  src = init_from.resolve(str(given))
  model = unet.build_unet(num_classes=num_classes, base_filters=4, depth=2, norm="group",
                          protocols=protocols)
  plan = init_from.plan(src, init_from.read_weights(src), model,
                        protocol="default",
                        labels=labels or {"0": "background", "1": "disc", "2": "vertebra"})
  init_from.apply(plan.values, model)
  return model, plan


@pytest.mark.parametrize("kind", ["model_dir", "keras_file", "checkpoint", "saved_model"])
def test_loaded_weights_equal_the_source_layer_by_layer(source, tmp_path, kind):
  given = {"model_dir": lambda: source["model_dir"],
           "keras_file": lambda: source["model_dir"] / "best.keras",
           "checkpoint": lambda: _checkpoint_only(source, tmp_path),
           "saved_model": lambda: source["export"]}[kind]()
  model, plan = _loaded(given)
  fresh = unet.build_unet(num_classes=3, base_filters=4, depth=2, norm="group")
  layers = [layer for layer in model.layers if layer.weights]
  assert len(plan.loaded) == len(layers) and not plan.reinitialized
  # The checkpoint is of the last epoch, best.keras of the best: here the same (1 epoch).
  for layer in layers:
    want = source["model"].get_layer(layer.name).get_weights()
    got = layer.get_weights()
    assert len(got) == len(want) > 0, layer.name
    for a, b, c in zip(got, want, fresh.get_layer(layer.name).get_weights()):
      np.testing.assert_array_equal(a, b, err_msg=layer.name)
      assert not np.array_equal(a, c) or not a.any(), layer.name  # not left fresh


def test_changed_head_is_reinitialized_and_the_rest_loaded(source):
  fresh = {}
  for case, kwargs in {"classes": dict(num_classes=4),
                       "labels": dict(labels={"0": "background", "1": "disc",
                                              "2": "bone"})}.items():
    model, plan = _loaded(source["model_dir"], **kwargs)
    assert list(plan.reinitialized) == ["logits"], case
    assert ("3 classes in the source, 4 now" if case == "classes" else "bone") in (
        plan.reinitialized["logits"])
    assert "logits" not in plan.loaded and len(plan.loaded) == len(
        [layer for layer in model.layers if layer.weights]) - 1
    np.testing.assert_array_equal(model.get_layer("up0_conv2").get_weights()[0],
                                  source["model"].get_layer("up0_conv2").get_weights()[0])
    fresh[case] = model.get_layer("logits").get_weights()[1]
  assert not fresh["labels"].any()  # the bias as initialized (zeros), not the source's
  assert source["model"].get_layer("logits").get_weights()[1].any()
  # Two protocol heads: the one of the source's protocol (default) is loaded from its
  # one head, the other protocol's is re-initialized.
  model, plan = _loaded(source["model_dir"], protocols=("a", "default"))
  assert list(plan.reinitialized) == ["logits_a"]
  assert "labelling protocol 'a'" in plan.reinitialized["logits_a"]
  np.testing.assert_array_equal(model.get_layer("logits_default").get_weights()[0],
                                source["model"].get_layer("logits").get_weights()[0])
  # End to end: a run on data of two protocols starts from the source.
  # (Trained one epoch, so only the plan's summary line is checked here.)
  assert "logits_a re-initialized" in plan.summary()


def test_other_architecture_is_one_line_exit_1_and_nothing_written(source, tmp_path):
  model_dir = tmp_path / "ft"
  out = subprocess.run(
      [sys.executable, "-m", "trainer.main", f"--data_dir={source['data']}",
       f"--model_dir={model_dir}", f"--init_from={source['model_dir']}", "--epochs=1",
       "--base_filters=8", "--depth=2", "--global_batch_size=2", "--norm=group",
       "--noaugment", "--verbose=0"],
      cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
      text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("spine-train: error:")]
  assert len(errors) == 1, out.stderr[-2000:]
  assert ("layer down0_conv1: kernel has shape (3, 3, 1, 4) in "
          f"{source['model_dir'] / 'best.keras'}, shape (3, 3, 1, 8) in this run's model"
          in errors[0]), errors
  assert not model_dir.exists()


def test_bad_sources_are_one_line_and_leave_the_model_dir_unwritten(source, tmp_path):
  truncated = tmp_path / "cut.keras"
  data = (source["model_dir"] / "best.keras").read_bytes()
  truncated.write_bytes(data[:len(data) // 2])
  cut_ckpt = _checkpoint_only(source, tmp_path)
  [shard] = cut_ckpt.glob("checkpoints/ckpt-*.data-*")
  shard.write_bytes(shard.read_bytes()[:100])
  big = trainer_testdata.write_dataset(tmp_path / "big", num_train=2, num_val=0,
                                       image_size=64)
  cases = [
      (source["data"], tmp_path / "missing", "does not exist"),
      (source["data"], truncated, "cut.keras: unreadable Keras model (truncated"),
      (source["data"], cut_ckpt, "unreadable checkpoint (truncated or corrupt"),
      # the shipped model (export/pretrained_model) saw 336 px squares
      (source["data"], "pretrained", "was trained with image_size 336, --data_dir has 32"),
      (source["data"], tmp_path, "holds neither best.keras nor a checkpoint"),
      (big, source["model_dir"], "was trained with image_size 32, --data_dir has 64"),
      (big, source["export"], "was trained with image_size 32, --data_dir has 64"),
  ]
  for i, (data_dir, given, expected) in enumerate(cases):
    model_dir = tmp_path / f"ft{i}"
    with pytest.raises(train.ConfigError) as e:
      train.train_and_evaluate(_config(data_dir, model_dir, init_from=str(given)))
    assert expected in str(e.value) and "\n" not in str(e.value), (given, str(e.value))
    assert f"--init_from={given}" in str(e.value)
    assert not model_dir.exists(), given


def _sha256(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_config_records_the_source_and_resume_uses_own_checkpoints(source, tmp_path,
                                                                    capsys):
  model_dir = tmp_path / "ft"
  config = _config(source["data"], model_dir, init_from=str(source["model_dir"]))
  train.train_and_evaluate(config)
  recorded = json.loads((model_dir / "config.json").read_text())
  best = source["model_dir"] / "best.keras"
  assert recorded["init_from"] == str(source["model_dir"])
  assert recorded["init_from_resolved"] == str(best)
  assert recorded["init_from_sha256"] == _sha256(best)
  assert "23 layers loaded from" in capsys.readouterr().out
  # The same command with more epochs resumes this run's checkpoint, not the source.
  result = train.train_and_evaluate(dataclasses.replace(config, epochs=2))
  out = capsys.readouterr().out
  assert result["initial_epoch"] == 1 and result["epochs_completed"] == 2
  assert "the --init_from weights are not applied again" in out
  assert "layers loaded from" not in out
  # Another source, none, or a model_dir started without one: refused in one line.
  other = _checkpoint_only(source, tmp_path)
  for changed in (str(other), ""):
    with pytest.raises(train.ConfigError, match="this model_dir was started from "
                       "--init_from=") as e:
      train.train_and_evaluate(dataclasses.replace(config, epochs=3, init_from=changed))
    assert "\n" not in str(e.value)
  assert len(json.loads((model_dir / "history.json").read_text())) == 2
  with pytest.raises(train.ConfigError, match="started from no --init_from, this run has "
                     f"{best}"):
    train.train_and_evaluate(_config(source["data"], source["model_dir"],
                                     init_from=str(best)))


def test_checkpoint_and_export_sources_record_their_files_hash(source, tmp_path):
  ckpt_dir = _checkpoint_only(source, tmp_path)
  src = init_from.resolve(str(ckpt_dir))
  assert src.kind == "checkpoint" and src.path == str(ckpt_dir / "checkpoints" / "ckpt-1")
  lines = sorted(f"{_sha256(ckpt_dir / 'checkpoints' / f)}  {f}\n"
                 for f in os.listdir(ckpt_dir / "checkpoints") if f.startswith("ckpt-1."))
  assert len(lines) == 2 and src.sha256 == hashlib.sha256(
      "".join(lines).encode()).hexdigest()
  exported = init_from.resolve(str(source["export"]))
  assert exported.kind == "saved_model" and exported.facts["image_size"] == 32


def test_freeze_encoder_keeps_it_for_the_frozen_epochs_then_trains_it(source, tmp_path):
  model_dir = tmp_path / "ft"
  train.train_and_evaluate(_config(source["data"], model_dir,
                                   init_from=str(source["model_dir"]), epochs=2,
                                   freeze="encoder", freeze_epochs=1))
  start = {w.path: w.numpy() for w in source["model"].weights}

  def weights(epoch):
    ckpt = init_from.Source("", str(model_dir / "checkpoints" / f"ckpt-{epoch}"),
                            "checkpoint", (), "", {})
    return init_from.read_weights(ckpt)

  encoder = {w.path for layer in init_from.encoder_layers(source["model"])
             for w in layer.weights}
  assert "down0_conv1/kernel" in encoder and "bottom_conv2/kernel" in encoder
  assert "up0_conv1/kernel" not in encoder
  first, second = weights(1), weights(2)
  assert set(first) == set(start)
  for path in start:
    if path in encoder:
      np.testing.assert_array_equal(first[path], start[path], err_msg=path)
      assert not np.array_equal(second[path], first[path]), path
    elif path.endswith("kernel"):
      assert not np.array_equal(first[path], start[path]), path


def test_fine_tuning_settings_are_refused_when_contradictory(source, tmp_path):
  base = _config(source["data"], tmp_path / "m")
  for kwargs, expected in (
      (dict(freeze="encoder", freeze_epochs=1), "without --init_from"),
      (dict(freeze="encoder", init_from="x"), "--freeze_epochs=0: expected > 0"),
      (dict(freeze_epochs=2), "--freeze_epochs=2 without --freeze"),
      (dict(warmup_epochs=1), "--warmup_epochs=1 with --epochs=1"),
      (dict(warmup_epochs=-1), "--warmup_epochs=-1: expected >= 0")):
    with pytest.raises(train.ConfigError, match=expected):
      train.check_config(dataclasses.replace(base, **kwargs))


def test_warmup_rises_linearly_then_follows_the_schedule():
  config = train.TrainConfig(data_dir="d", model_dir="m", epochs=4, warmup_epochs=2,
                             learning_rate=1e-3)
  for schedule, after in (("cosine", 1e-3 * (0.99 * 0.5 * (1 + np.cos(np.pi / 4)) + 0.01)),
                          ("constant", 1e-3)):
    got = _learning_rates(dataclasses.replace(config, lr_schedule=schedule), 6)
    np.testing.assert_allclose(got[:4], [2.5e-4, 2.5e-4 + 7.5e-4 / 4, 2.5e-4 + 7.5e-4 / 2,
                                         2.5e-4 + 7.5e-4 * 3 / 4], rtol=1e-6)
    np.testing.assert_allclose(got[4], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(got[5], after, rtol=1e-5)
  # No warm-up: the schedule of before (cosine from the peak at step 0).
  np.testing.assert_allclose(
      _learning_rates(dataclasses.replace(config, warmup_epochs=0), 1), [1e-3], rtol=1e-6)


def _learning_rates(config, steps):
  """The optimizer's learning rate at steps 0 .. steps - 1 (2 steps per epoch)."""
  optimizer = train._optimizer(config, steps_per_epoch=2)
  rates = []
  for step in range(steps):
    optimizer.iterations.assign(step)
    rates.append(float(optimizer.learning_rate))
  return rates


def test_fine_tuned_model_exports_every_signature_onnx_litert_and_ensembles(source,
                                                                           tmp_path):
  from data_prep import phantom  # pylint: disable=g-import-not-at-top
  from export import inference, portable, predict_lib  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / "ft"
  train.train_and_evaluate(_config(source["data"], model_dir,
                                   init_from=str(source["model_dir"])))
  out = serving.export(model_dir, tmp_path / "ft_export" / "1")
  metadata = json.loads((out / serving.METADATA_FILE).read_text())
  source_metadata = json.loads((source["export"] / serving.METADATA_FILE).read_text())
  assert metadata["signatures"] == source_metadata["signatures"]
  assert portable.to_onnx(out).is_file()
  assert portable.to_litert(model_dir, out).is_file()
  # An ensemble of the source and the fine-tuned model segments like any other.
  phantom.write_2d_dataset(tmp_path / "scans", num_cases=2, seed=0, min_size=32,
                           max_size=48)
  model = inference.load_ensemble([source["export"], out])
  written, failures = predict_lib.predict(model, tmp_path / "scans" / "images",
                                          tmp_path / "masks", progress=False)
  assert not failures and len(written) == 4  # a PNG and a .npy mask per slice
