"""spine-train end to end on a tiny U-Net: outputs, refusals, resume after kill -9."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainer_testdata
from trainer import callbacks
from trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(base_filters=4, depth=2, global_batch_size=2, norm="group", verbose=0)


def test_few_steps_end_to_end(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=3)
  config = train.TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "model"),
                             epochs=2, loss="dice_ce", optimizer="adamw",
                             lr_schedule="cosine", **TINY)
  result = train.train_and_evaluate(config)
  model_dir = tmp_path / "model"
  assert result["epochs_completed"] == 2 and result["initial_epoch"] == 0
  history = json.loads((model_dir / "history.json").read_text())
  assert [e["epoch"] for e in history] == [1, 2]
  for key in ("loss", "val_disc_dice", "val_vertebra_dice", "val_mean_dice",
              "input_wait_fraction", "learning_rate"):
    assert all(np.isfinite(e[key]) for e in history), key
  assert result["best_val_mean_dice"] == pytest.approx(max(e["val_mean_dice"]
                                                           for e in history))
  assert json.loads((model_dir / "config.json").read_text()) == dataclasses.asdict(config)
  assert json.loads((model_dir / "dataset.json").read_text())["image_size"] == 32
  for sub in ("train", "validation", "images"):
    assert os.listdir(model_dir / "logs" / sub), sub
  model = keras.models.load_model(model_dir / "best.keras", compile=False)
  assert model.input.name == "image"
  assert model(np.zeros((1, 32, 32, 1), np.float32)).shape == (1, 32, 32, 3)


def test_refusals(tmp_path, monkeypatch):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=2, num_val=0)
  base = train.TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "m"), **TINY)
  with pytest.raises(train.ConfigError, match="optimizer"):
    train.check_config(dataclasses.replace(base, optimizer="sgd"))
  with pytest.raises(train.ConfigError, match="no dataset manifest"):
    train.train_and_evaluate(dataclasses.replace(base, data_dir=str(tmp_path)))
  with pytest.raises(train.ConfigError, match="not divisible by 2\\*\\*depth"):
    train.train_and_evaluate(dataclasses.replace(base, depth=6))
  manifest = json.loads((tmp_path / "data" / "dataset.json").read_text())
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "dataset.json").write_text(json.dumps(dict(manifest, format_version=99)))
  with pytest.raises(train.ConfigError, match="format version 99"):
    train.train_and_evaluate(dataclasses.replace(base, data_dir=str(bad)))
  (bad / "dataset.json").write_text(json.dumps(dict(manifest, splits={})))
  with pytest.raises(train.ConfigError, match="no train shards"):
    train.train_and_evaluate(dataclasses.replace(base, data_dir=str(bad)))
  with pytest.raises(train.ConfigError, match="weight_decay=-1"):
    train.check_config(dataclasses.replace(base, weight_decay=-1.0))
  with pytest.raises(train.ConfigError, match="elastic_prob=1.5"):
    train.check_config(dataclasses.replace(base, elastic_prob=1.5))
  with pytest.raises(train.ConfigError, match="--noaugment"):
    train.check_config(dataclasses.replace(base, elastic_prob=0.5, augment=False))
  # A model_dir written before a setting existed resumes while that setting keeps its
  # default, and is refused when it changes.
  old_dir = tmp_path / "old"
  old_dir.mkdir()
  same = dataclasses.replace(base, model_dir=str(old_dir))
  old = dataclasses.asdict(same)
  del old["elastic_prob"], old["elastic_alpha"]
  (old_dir / "config.json").write_text(json.dumps(old))
  check_model_dir = train._check_model_dir  # pylint: disable=protected-access
  check_model_dir(same, manifest)
  with pytest.raises(train.ConfigError, match="elastic_prob: 0.0 -> 0.5"):
    check_model_dir(dataclasses.replace(same, elastic_prob=0.5), manifest)
  monkeypatch.setattr(train, "make_strategy",
                      lambda name: types.SimpleNamespace(num_replicas_in_sync=4))
  with pytest.raises(train.ConfigError, match="not divisible by the 4 replicas"):
    train.train_and_evaluate(dataclasses.replace(base, global_batch_size=6))


def _command(data_dir, model_dir, epochs):
  return [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}",
          f"--model_dir={model_dir}", f"--epochs={epochs}", "--base_filters=4", "--depth=2",
          "--global_batch_size=2", "--norm=group", "--noaugment"]


def test_resume_after_kill_continues_from_saved_epoch(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=2)
  model_dir = tmp_path / "model"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(_command(data_dir, model_dir, 500), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
      if latest and int(latest.rsplit("-", 1)[1]) >= 2:
        break
      time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  saved = int(tf.train.latest_checkpoint(str(model_dir / "checkpoints")).rsplit("-", 1)[1])
  assert 2 <= saved < 500
  # The same command (with a nearer end, to keep the test short) continues.
  out = subprocess.run(_command(data_dir, model_dir, saved + 1), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"{saved} epochs completed" in out.stdout
  history = json.loads((model_dir / "history.json").read_text())
  assert [e["epoch"] for e in history] == list(range(1, saved + 2))
  # The optimizer state came back too: Adam's step counter went on from the kill.
  reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
  iterations = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                if k.startswith("optimizer/") and "iteration" in k and "OPTIMIZER" not in k]
  assert iterations and int(iterations[0]) == 2 * (saved + 1)
  # A rerun with other settings is refused, without traceback.
  out = subprocess.run(_command(data_dir, model_dir, saved + 1) + ["--loss=dice_ce"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "loss: 'dice' -> 'dice_ce'" in out.stderr
  assert "Traceback" not in out.stderr
  # So is a flag that the chosen optimizer would silently ignore.
  out = subprocess.run(_command(data_dir, model_dir, saved + 1) + ["--weight_decay=0.01"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "--optimizer=adamw only" in out.stderr


def test_input_wait_counts_only_time_before_the_batch_was_ready():
  wait = callbacks.InputWait(images_per_step=8)
  wait.on_epoch_begin(0)
  wait.on_train_batch_begin(0)
  time.sleep(0.05)
  wait.batch_ready()  # The step had to wait ~50 ms of its ~100 ms.
  time.sleep(0.05)
  wait.on_train_batch_end(0)
  wait.batch_ready()  # Ready before the next step begins: no wait.
  wait.on_train_batch_begin(1)
  time.sleep(0.05)
  wait.on_train_batch_end(1)
  logs = {}
  wait.on_epoch_end(0, logs)
  assert 0.15 < logs["input_wait_fraction"] < 0.5
  # 2 steps of 8 images in ~150 ms (sleeps only lengthen it): at most ~107 images/s.
  assert 0 < logs["images_per_second"] <= 16 / 0.15
