"""spine-train on several converted datasets at once: the weighted mix of the training
input, epochs defined by the first dataset, validation per dataset (a partially labelled
one included), the model_dir record, refusals, and a single --data_dir as before."""
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainer_testdata
from data_prep import manifest as manifest_lib
from data_prep import metrics
from export import serving
from trainer import input_pipeline
from trainer import run_dir
from trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(base_filters=4, depth=2, global_batch_size=2, norm="group", verbose=0)
# B's images are A's kind of slice plus this: a value no slice of A reaches (< 1.1).
OFFSET = 10.0


def _from_b(images: np.ndarray) -> np.ndarray:
  """Per slice of a batch: whether it came from dataset B (by its intensities)."""
  return images.reshape(len(images), -1).mean(axis=1) > OFFSET / 2


def _within_binomial(count: int, n: int, p: float) -> bool:
  """`count` of `n` draws lies within 4.5 standard deviations of Binomial(n, p)."""
  return abs(count - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


@pytest.fixture(name="two_datasets")
def fixture_two_datasets(tmp_path):
  """A: 6 train / 3 val, fully labelled. B: 2 train / 2 val, vertebrae only, offset."""
  a = trainer_testdata.write_dataset(tmp_path / "spine_a", num_train=6, num_val=3)
  b = trainer_testdata.write_dataset(tmp_path / "spine_b", num_train=2, num_val=2, seed=1,
                                     image_offset=OFFSET, annotated=(2,))
  return a, b


def _files(data_dir, split="train"):
  return manifest_lib.load(data_dir).files(split)


def test_pipeline_draws_each_dataset_with_its_weight(two_datasets):
  a, b = two_datasets

  def sources(weights, seed=0):
    return input_pipeline.make_dataset(
        [_files(a), _files(b)], image_size=32, compression=["", ""], global_batch_size=4,
        training=input_pipeline.TrainingOptions(seed=seed, deterministic=True,
                                                weights=weights))

  # B holds a quarter of the train slices but is asked for three quarters of the draws.
  batches = [images.numpy() for images, _ in sources([1.0, 3.0]).take(150)]
  from_b = np.concatenate([_from_b(images) for images in batches])
  assert len(from_b) == 600
  assert _within_binomial(int(from_b.sum()), 600, 0.75), from_b.mean()
  # Mixed within batches, not whole batches of one dataset.
  assert any(0 < _from_b(images).sum() < 4 for images in batches)
  # Seeded and deterministic: the same draws again; another seed draws otherwise.
  again = [images.numpy() for images, _ in sources([1.0, 3.0]).take(150)]
  assert all(np.array_equal(x, y) for x, y in zip(batches, again))
  other = [images.numpy() for images, _ in sources([1.0, 3.0], seed=1).take(150)]
  assert not all(np.array_equal(x, y) for x, y in zip(batches, other))
  # Weight 0: never drawn.
  for images, _ in sources([1.0, 0.0]).take(20):
    assert not _from_b(images.numpy()).any()
  with pytest.raises(ValueError, match="not all 0"):
    sources([0.0, 0.0])
  with pytest.raises(ValueError, match="one of each per dataset"):
    sources([1.0])


def _counts(model, data_dir):
  """Summed `metrics.counts` of `model` over the val split of `data_dir` (NumPy side)."""
  ds = input_pipeline.make_dataset(_files(data_dir, "val"), image_size=32, compression="",
                                   global_batch_size=2)
  total = np.zeros((3, 3), np.int64)
  for images, masks in ds:
    predictions = np.argmax(model(images, training=False).numpy(), axis=-1)
    total += metrics.counts(predictions, masks.numpy()[..., 0])
  return total


def test_run_over_two_datasets(two_datasets, tmp_path, monkeypatch, capsys):
  a, b = two_datasets
  made = []
  make_dataset = input_pipeline.make_dataset

  def keep(*args, **kwargs):
    ds = make_dataset(*args, **kwargs)
    if kwargs.get("training"):
      made.append(ds)
    return ds

  monkeypatch.setattr(input_pipeline, "make_dataset", keep)
  model_dir = tmp_path / "model"
  config = train.TrainConfig(data_dir=f"{a},{b}", model_dir=str(model_dir), epochs=1,
                             dataset_weights="1,3", augment=False, **TINY)
  result = train.train_and_evaluate(config)
  out = capsys.readouterr().out

  # (a) The trainer's own training input mixes A and B 1:3 (not 6:2 by size).
  assert len(made) == 1
  from_b = np.concatenate([_from_b(images.numpy()) for images, _ in made[0].take(200)])
  assert len(from_b) == 400 and _within_binomial(int(from_b.sum()), 400, 0.75)

  # Epoch length: A's 6 train slices / batch 2 = 3 steps (not all 8 slices' 4), said at
  # start with how often each dataset is seen.
  plan = [l for l in out.splitlines() if "steps of 2 slices per epoch" in l]
  assert len(plan) == 1 and plan[0].startswith("spine-train: 3 steps"), out
  assert "spine_a: 6 train slices, share 25%, seen 0.25x per epoch, 0.2x in 1 epochs" in (
      plan[0])
  assert "spine_b: 2 train slices, share 75%, seen 2.25x per epoch, 2.2x in 1 epochs" in (
      plan[0])
  reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
  iterations = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                if k.startswith("optimizer/") and "iteration" in k and "OPTIMIZER" not in k]
  assert iterations and int(iterations[0]) == 3

  # (b) Validation per dataset: B annotates no disc, so its disc is absent, not logged.
  (entry,) = json.loads((model_dir / "history.json").read_text())
  for name in ("spine_a", "spine_b"):
    assert f"epoch 1: validation of {name}: " in out
  assert "val_spine_b_dice_disc" not in entry and "dice_disc absent" in out
  # The figures are those of `data_prep.metrics` over each split with the kept model
  # (one epoch: best.keras holds it), pooled = summed counts, and the model is selected
  # by the mean of the datasets' dice_mean.
  model = keras.models.load_model(model_dir / "best.keras", compile=False)
  counts = {"spine_a": _counts(model, a), "spine_b": _counts(model, b)}
  expected = {f"val_{name}_{k}": v for name, c in counts.items()
              for k, v in metrics.dice(c).items()}
  expected.update({f"val_{k}": v for k, v in metrics.dice(sum(counts.values())).items()})
  expected["val_dice_mean_datasets"] = np.mean([expected["val_spine_a_dice_mean"],
                                                expected["val_spine_b_dice_mean"]])
  assert expected["val_spine_b_dice_disc"] == metrics.ABSENT
  for key, value in expected.items():
    if value == metrics.ABSENT:
      assert key not in entry, key
    else:
      assert entry[key] == pytest.approx(value, abs=1e-6), key
  assert result["best_val_dice_mean"] == pytest.approx(entry["val_dice_mean_datasets"])

  # The model_dir: dataset.json is A's manifest (what export reads), datasets.json both.
  assert manifest_lib.load(model_dir).raw == manifest_lib.load(a).raw
  record = json.loads((model_dir / run_dir.DATASETS_NAME).read_text())
  assert [(d["name"], d["data_dir"]) for d in record["datasets"]] == [
      ("spine_a", a), ("spine_b", b)]
  assert record["datasets"][1]["manifest"] == manifest_lib.load(b).raw
  _, manifest = serving.load_model_dir(str(model_dir))
  assert manifest.image_size == 32

  # Resume: the same command has nothing left to do; other weights or changed data of
  # any folder are refused.
  assert train.train_and_evaluate(config)["initial_epoch"] == 1
  with pytest.raises(train.ConfigError, match="dataset_weights: '1,3' -> '1,1'"):
    train.train_and_evaluate(dataclasses.replace(config, dataset_weights="1,1"))
  changed = dict(manifest_lib.load(b).raw, note="converted again")
  absolute = train.with_absolute_paths(config)
  entries = [dict(record["datasets"][0]), dict(record["datasets"][1], manifest=changed)]
  with pytest.raises(train.ConfigError, match=f"other data than {b} "):
    run_dir.check(absolute, manifest_lib.load(a), {"datasets": entries})


def test_refusals_name_the_folders_and_values(two_datasets, tmp_path):
  a, b = two_datasets
  big = trainer_testdata.write_dataset(tmp_path / "big", num_train=2, num_val=0,
                                       image_size=64)
  zscore = trainer_testdata.write_dataset(tmp_path / "z", num_train=2, num_val=0,
                                          normalization="zscore")
  base = train.TrainConfig(data_dir=f"{a},{b}", model_dir=str(tmp_path / "m"), **TINY)
  with pytest.raises(train.ConfigError, match=f"{big} has image_size 64, {a} has 32"):
    train.train_and_evaluate(dataclasses.replace(base, data_dir=f"{a},{big}"))
  with pytest.raises(train.ConfigError,
                     match=f"{zscore} has normalization 'zscore', {a} has 'percentile'"):
    train.train_and_evaluate(dataclasses.replace(base, data_dir=f"{a},{zscore}"))
  spaced = trainer_testdata.write_dataset(tmp_path / "s", num_train=2, num_val=0)
  manifest_path = pathlib.Path(spaced) / "dataset.json"
  spaced_manifest = json.loads(manifest_path.read_text())
  spaced_manifest["target_spacing_mm"] = 1.1
  manifest_path.write_text(json.dumps(spaced_manifest))
  with pytest.raises(train.ConfigError,
                     match=f"{spaced} has target_spacing_mm 1.1, {a} has None"):
    train.train_and_evaluate(dataclasses.replace(base, data_dir=f"{a},{spaced}"))
  for weights, message in (("1", "1 weight\\(s\\) for the 2 folder\\(s\\)"),
                           ("1,2,3", "3 weight\\(s\\) for the 2 folder\\(s\\)"),
                           ("1,-1", f"weight -1 of {b}: expected a finite number >= 0"),
                           ("1,nan", "weight nan of"),
                           ("0,0", "every weight is 0"),
                           ("1,x", "expected numbers separated by commas")):
    with pytest.raises(train.ConfigError, match=f"--dataset_weights={weights}: {message}"):
      train.check_config(dataclasses.replace(base, dataset_weights=weights))
  with pytest.raises(train.ConfigError, match="an empty entry"):
    train.check_config(dataclasses.replace(base, data_dir=f"{a},,{b}"))
  with pytest.raises(train.ConfigError, match=f"lists {a} more than once"):
    train.check_config(dataclasses.replace(base, data_dir=f"{a},{b},{a}"))
  with pytest.raises(train.ConfigError, match="--steps_per_epoch=-1: expected >= 0"):
    train.check_config(dataclasses.replace(base, steps_per_epoch=-1))
  assert not (tmp_path / "m").exists()  # Refused before anything was written.
  # On the command line: one line, exit 1, no traceback.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  for flags, message in ((f"--data_dir={a},{big}", "has image_size 64"),
                         (f"--data_dir={a},{b} --dataset_weights=1,-2", "weight -2 of")):
    out = subprocess.run([sys.executable, "-m", "trainer.main", *flags.split(),
                          f"--model_dir={tmp_path / 'm'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    errors = [l for l in out.stderr.splitlines() if l.startswith("spine-train: error:")]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], errors


def test_dataset_names_are_basenames_made_unique():
  assert train.dataset_names(["/x/data", "/y/data", "/z/data_2", "/w/my scans"]) == [
      "data", "data_2", "data_2_2", "my_scans"]


def test_single_data_dir_keeps_its_config_keys_and_steps(tmp_path, capsys):
  a = trainer_testdata.write_dataset(tmp_path / "spine_a", num_train=6, num_val=3)
  model_dir = tmp_path / "model"
  config = train.TrainConfig(data_dir=a, model_dir=str(model_dir), epochs=1, **TINY)
  train.train_and_evaluate(config)
  stored = json.loads((model_dir / "config.json").read_text())
  assert stored == dataclasses.asdict(train.with_absolute_paths(config))
  assert stored["data_dir"] == a and stored["dataset_weights"] == ""
  assert stored["steps_per_epoch"] == 0
  assert not (model_dir / run_dir.DATASETS_NAME).exists()
  assert manifest_lib.load(model_dir).raw == manifest_lib.load(a).raw
  (entry,) = json.loads((model_dir / "history.json").read_text())
  assert set(entry) == {"epoch", "seconds", "learning_rate", "loss", "input_wait_fraction",
                        "images_per_second", *(f"val_{k}" for k in metrics.KEYS)}
  out = capsys.readouterr().out
  assert "epoch 1: validation over the whole split: dice_background" in out
  assert "validation of" not in out and "spine-train: 3 steps of 2 slices" in out
  # A model_dir written before the two settings existed resumes; changing one does not.
  del stored["dataset_weights"], stored["steps_per_epoch"]
  (model_dir / "config.json").write_text(json.dumps(stored))
  assert train.train_and_evaluate(config)["initial_epoch"] == 1
  with pytest.raises(train.ConfigError, match="steps_per_epoch: 0 -> 5"):
    train.train_and_evaluate(dataclasses.replace(config, steps_per_epoch=5))
