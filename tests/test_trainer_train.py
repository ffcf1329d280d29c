"""spine-train end to end on a tiny U-Net: outputs, refusals, resume after kill -9, the
one-run lock, determinism, and the faults that must end a run with one line."""
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

import trainer_testdata
from data_prep import fileio
from data_prep import manifest as manifest_lib
from data_prep import overlay
from data_prep import schema
from trainer import augment
from trainer import callbacks
from trainer import config as config_lib
from trainer import input_pipeline
from trainer import main as main_lib
from trainer import run_dir
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
  for key in ("loss", "val_dice_disc", "val_dice_vertebra", "val_dice_mean",
              "input_wait_fraction", "learning_rate"):
    assert all(np.isfinite(e[key]) for e in history), key
  assert result["best_val_dice_mean"] == pytest.approx(max(e["val_dice_mean"]
                                                           for e in history))
  # Every setting, paths made absolute.
  assert json.loads((model_dir / "config.json").read_text()) == dataclasses.asdict(
      train.with_absolute_paths(config))
  assert json.loads((model_dir / "dataset.json").read_text())["image_size"] == 32
  for sub in ("train", "validation", "images"):
    assert os.listdir(model_dir / "logs" / sub), sub
  # One overlay summary per epoch: each val slice | its truth | the prediction.
  shown = _image_summaries(model_dir / "logs" / "images")
  assert [(tag, step) for tag, step, _ in shown] == [("val_overlay", 1), ("val_overlay", 2)]
  val = input_pipeline.make_dataset(
      manifest_lib.load(data_dir).files("val"),
      image_size=32, compression="", global_batch_size=3)
  images, masks = next(iter(val))
  for _, _, pngs in shown:
    assert pngs.shape == (3, 32, 96, 3)
    for png, image, mask in zip(pngs, images.numpy()[..., 0], masks.numpy()[..., 0]):
      np.testing.assert_array_equal(png[:, :64],
                                    overlay.side_by_side(image, mask, mask)[:, :64])
  model = keras.models.load_model(model_dir / "best.keras", compile=False)
  assert model.input.name == "image"
  assert model(np.zeros((1, 32, 32, 1), np.float32)).shape == (1, 32, 32, 3)


def _image_summaries(log_dir):
  """(tag, step, uint8 [K, H, W, 3]) of each TensorBoard image summary under log_dir,
  read as TensorBoard's image plugin reads them (width, height, then one PNG each)."""
  found = []
  for path in sorted(log_dir.glob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "images":
          data = tf.make_ndarray(value.tensor)
          pngs = np.stack([tf.io.decode_png(png).numpy() for png in data[2:]])
          assert (int(data[0]), int(data[1])) == (pngs.shape[2], pngs.shape[1])
          found.append((value.tag, event.step, pngs))
  return found


def test_overlay_images_are_written_whole_and_exact(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 6, 9, 3), dtype=np.uint8)
  writer = tf.summary.create_file_writer(str(tmp_path))
  callbacks.write_images(writer, "val_overlay_a", images, step=3)
  writer.close()
  [(tag, step, read)] = _image_summaries(tmp_path)
  assert (tag, step) == ("val_overlay_a", 3)
  np.testing.assert_array_equal(read, images)  # All 5, not tf.summary.image's default 3.


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
  with pytest.raises(train.ConfigError, match="aug_noise_std=0.1 with --noaugment"):
    train.check_config(dataclasses.replace(base, aug_noise_std=0.1, augment=False))
  with pytest.raises(train.ConfigError, match="aug_gamma_min=2.0 > --aug_gamma_max=1.5"):
    train.check_config(dataclasses.replace(base, aug_gamma_min=2.0))
  with pytest.raises(train.ConfigError, match="aug_noise_prob=2"):
    train.check_config(dataclasses.replace(base, aug_noise_prob=2.0))
  for name in ("dice_smooth", "checkpoints_kept", "shuffle_buffer"):
    with pytest.raises(train.ConfigError, match=f"--{name}=0: expected > 0"):
      train.check_config(dataclasses.replace(base, **{name: 0}))
  # A model_dir written before a setting existed resumes while that setting keeps its
  # default, and is refused when it changes.
  old_dir = tmp_path / "old"
  old_dir.mkdir()
  same = train.with_absolute_paths(dataclasses.replace(base, model_dir=str(old_dir)))
  old = dataclasses.asdict(same)
  added = ["elastic_prob", "elastic_alpha", "dice_smooth", "ce_weight", "shuffle_buffer",
           "cache_bytes", "checkpoints_kept", "deterministic", "verify_shards"]
  added += [k for k in old if k.startswith("aug_")]
  for key in added:
    del old[key]
  (old_dir / "config.json").write_text(json.dumps(old))
  check_model_dir = run_dir.check
  manifest = manifest_lib.Manifest(data_dir, manifest)
  check_model_dir(same, manifest)
  with pytest.raises(train.ConfigError, match="elastic_prob: 0.0 -> 0.5"):
    check_model_dir(dataclasses.replace(same, elastic_prob=0.5), manifest)
  with pytest.raises(train.ConfigError, match="shuffle_buffer: 512 -> 64"):
    check_model_dir(dataclasses.replace(same, shuffle_buffer=64), manifest)
  monkeypatch.setattr(train, "make_strategy",
                      lambda name: types.SimpleNamespace(num_replicas_in_sync=4))
  with pytest.raises(train.ConfigError, match="not divisible by the 4 replicas"):
    train.train_and_evaluate(dataclasses.replace(base, global_batch_size=6))


def _command(data_dir, model_dir, epochs):
  return [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}",
          f"--model_dir={model_dir}", f"--epochs={epochs}", "--base_filters=4", "--depth=2",
          "--global_batch_size=2", "--norm=group", "--noaugment"]


def _errors(stderr):
  """The `spine-train: error:` lines of a run's stderr."""
  return [l for l in stderr.splitlines() if l.startswith("spine-train: error:")]


def test_resume_after_kill_continues_from_saved_epoch(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=2)
  model_dir = tmp_path / "model"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  endless = 100000  # Ends only by the kill below.
  proc = subprocess.Popen(_command(data_dir, model_dir, endless), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
      if latest and int(latest.rsplit("-", 1)[1]) >= 2:
        break
      time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    # A second run on the same model_dir is refused while the first holds it.
    second = subprocess.run(_command(data_dir, model_dir, endless), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    assert proc.poll() is None, "the first run ended before the second one was refused"
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert len(_errors(second.stderr)) == 1
    assert str(model_dir.resolve()) in second.stderr and f"pid {proc.pid} " in second.stderr
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  saved = int(tf.train.latest_checkpoint(str(model_dir / "checkpoints")).rsplit("-", 1)[1])
  assert 2 <= saved < endless
  # The same command (with a nearer end, to keep the test short) continues: the killed
  # run's lock went with its process.
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
  out = subprocess.run(_command(data_dir, model_dir, saved + 1) + ["--loss=dice"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "loss: 'dice_ce' -> 'dice'" in out.stderr
  assert "Traceback" not in out.stderr and len(_errors(out.stderr)) == 1
  # So is a flag that the chosen optimizer would silently ignore.
  out = subprocess.run(_command(data_dir, model_dir, saved + 1) +
                       ["--optimizer=adam", "--weight_decay=0.01"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "--optimizer=adamw only" in out.stderr
  assert len(_errors(out.stderr)) == 1


def test_input_wait_counts_only_time_before_the_batch_was_ready():
  # Exact timestamps from a fake clock: no sleeping, nothing for a loaded machine to skew.
  now = [0.0]
  wait = callbacks.InputWait(images_per_step=8, clock=lambda: now[0])
  def at(t, event, *args):
    now[0] = t
    event(*args)
  wait.on_epoch_begin(0)
  at(10.0, wait.on_train_batch_begin, 0)
  at(10.3, wait.batch_ready)            # The step waited 0.3 s of its 0.4 s.
  at(10.4, wait.on_train_batch_end, 0)
  at(10.5, wait.batch_ready)            # Ready before the next step begins: no wait.
  at(11.0, wait.on_train_batch_begin, 1)
  at(11.6, wait.on_train_batch_end, 1)
  logs = {}
  wait.on_epoch_end(0, logs)
  assert logs["input_wait_fraction"] == pytest.approx(0.3 / (0.4 + 0.6))
  # 2 steps of 8 images from the first begin (10.0) to the last end (11.6).
  assert logs["images_per_second"] == pytest.approx(16 / 1.6)
  # A step takes `batches_per_step` batches (one per local replica) and waits for the
  # last of them; a step that found nothing queued counts no wait.
  wait = callbacks.InputWait(batches_per_step=2, clock=lambda: now[0])
  wait.on_epoch_begin(1)
  at(20.0, wait.batch_ready)
  at(21.0, wait.on_train_batch_begin, 0)
  at(21.2, wait.batch_ready)            # The second replica's batch: 0.2 s of wait.
  at(21.5, wait.on_train_batch_end, 0)
  at(22.0, wait.on_train_batch_begin, 1)
  at(22.1, wait.on_train_batch_end, 1)
  at(22.2, wait.on_train_batch_begin, 2)
  at(22.4, wait.batch_ready)
  at(22.6, wait.batch_ready)            # 0.4 s of wait.
  at(23.0, wait.on_train_batch_end, 2)
  logs = {}
  wait.on_epoch_end(1, logs)
  assert logs["input_wait_fraction"] == pytest.approx((0.2 + 0.4) / (0.5 + 0.1 + 0.8))
  assert "images_per_second" not in logs  # No images_per_step given.


def _parse_flags(*args):
  """spine-train's generated flags, parsed into a TrainConfig (a fresh FlagValues)."""
  flag_values = flags.FlagValues()
  main_lib.define_flags(flag_values)
  flag_values(["spine-train", "--data_dir=d", "--model_dir=m", *args])
  return flag_values, main_lib.config_from_flags(flag_values)


def test_flags_are_generated_from_the_config_and_default_flags_are_its_defaults():
  defaults = train.TrainConfig(data_dir="d", model_dir="m")
  flag_values, config = _parse_flags()
  assert config == defaults
  for field in dataclasses.fields(train.TrainConfig):
    assert flag_values[field.name].help.endswith(field.metadata["help"]), field.name
    if "choices" in field.metadata:
      assert flag_values[field.name].parser.enum_values == list(field.metadata["choices"])
  with pytest.raises(flags.IllegalFlagValueError):
    _parse_flags("--optimizer=sgd")
  assert not _parse_flags("--noaugment")[1].augment
  with pytest.raises(train.ConfigError, match="--optimizer=adamw only"):
    _parse_flags("--optimizer=adam", "--weight_decay=0.01")
  # The recommended settings, spelled out in default.flags, are exactly the bare defaults.
  _, config = _parse_flags(f"--flagfile={REPO}/experiments/default.flags")
  assert config == defaults


@pytest.mark.parametrize("name,expected", [
    # The research script: 30 epochs of Adam 1e-5, batch 2, Dice, batch norm, no
    # augmentation, the default U-Net size.
    ("seed_unet", dict(epochs=30, optimizer="adam", learning_rate=1e-5,
                       lr_schedule="constant", global_batch_size=2, loss="dice",
                       norm="batch", augment=False)),
    # What `make demo` was tuned with (tools/demo.sh converts at 96 px: depth 3 fits).
    ("demo", dict(epochs=40, global_batch_size=8, learning_rate=3e-3,
                  lr_schedule="cosine", optimizer="adam", loss="dice_ce", base_filters=8,
                  depth=3, norm="batch", augment=True, seed=0)),
])
def test_experiment_flag_files_keep_their_meaning(name, expected):
  _, config = _parse_flags(f"--flagfile={REPO}/experiments/{name}.flags")
  assert config == dataclasses.replace(train.TrainConfig(data_dir="d", model_dir="m"),
                                       **expected)


def test_augment_config_is_built_from_every_aug_setting():
  base = train.TrainConfig(data_dir="d", model_dir="m")
  # The defaults are AugmentConfig's (written once, there).
  assert train.augment_config(base) == augment.AugmentConfig()
  assert train.augment_config(dataclasses.replace(base, augment=False)) is None
  changed = {f.name: (f.default + 1 if isinstance(f.default, int) else f.default / 2 + 0.01)
             for f in dataclasses.fields(train.TrainConfig) if f.name.startswith("aug_")}
  config = dataclasses.replace(base, elastic_prob=0.5, elastic_alpha=3.0, **changed)
  train.check_config(config)
  built, default = train.augment_config(config), augment.AugmentConfig()
  # A field AugmentConfig gains without a TrainConfig setting would stay at its default.
  same = [f.name for f in dataclasses.fields(augment.AugmentConfig)
          if getattr(built, f.name) == getattr(default, f.name)]
  assert not same, f"AugmentConfig fields not set from TrainConfig: {same}"
  assert (built.gamma_min, built.gamma_max, built.elastic_alpha) == (
      changed["aug_gamma_min"], changed["aug_gamma_max"], 3.0)


def test_augment_settings_keep_their_flag_names_defaults_and_help():
  # Users' flagfiles spell these; renaming an AugmentConfig field must not rename a flag.
  expected = ["max_rotation_deg", "scale_range", "max_translation", "geometric_prob",
              "elastic_grid", "gamma_min", "gamma_max", "gamma_prob", "contrast_min",
              "contrast_max", "brightness", "contrast_prob", "bias_field_strength",
              "bias_field_prob", "noise_std", "noise_prob", "remap_prob", "blur_prob",
              "blur_max_sigma", "lowres_prob", "lowres_max_factor", "cut_prob", "cut_max"]
  fields = {f.name: f for f in dataclasses.fields(train.TrainConfig)}
  names = [n for n in fields if n.startswith(("aug_", "elastic_"))]
  assert sorted(names) == sorted(["elastic_prob", "elastic_alpha"] +
                                 [f"aug_{n}" for n in expected])
  defaults = train.TrainConfig(data_dir="d", model_dir="m")
  # What a default run has recorded in config.json (a resumed run compares it).
  assert (defaults.elastic_prob, defaults.elastic_alpha, defaults.aug_gamma_min,
          defaults.aug_contrast_max, defaults.aug_elastic_grid) == (0.0, 10.0, 0.7, 1.25, 6)
  for field in dataclasses.fields(augment.AugmentConfig):
    setting = fields[config_lib.augment_setting(field.name)]
    assert (setting.default, setting.metadata["help"]) == (
        field.default, field.metadata["help"]), field.name


def test_resume_check_compares_folders_not_spellings(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  trainer_testdata.write_dataset(tmp_path / "d64", num_train=2, num_val=0)
  manifest = manifest_lib.load(tmp_path / "d64")
  config = train.TrainConfig(data_dir="d64/", model_dir="m", epochs=1, **TINY)
  train.train_and_evaluate(config)
  root = tmp_path.resolve()
  stored = json.loads((root / "m" / "config.json").read_text())
  assert stored["data_dir"] == str(root / "d64") and stored["model_dir"] == str(root / "m")
  # The same folders spelled otherwise resume (nothing is left to do) instead of refusing.
  result = train.train_and_evaluate(dataclasses.replace(
      config, data_dir=str(tmp_path / "d64"), model_dir="./m/"))
  assert result["initial_epoch"] == 1
  check_model_dir = run_dir.check
  for spelling in ("d64", "./d64/", str(root / "d64")):
    check_model_dir(train.with_absolute_paths(
        dataclasses.replace(config, data_dir=spelling)), manifest)
  # Older versions stored the path as typed: still the same folder.
  (root / "m" / "config.json").write_text(json.dumps(dict(stored, data_dir="d64/")))
  check_model_dir(train.with_absolute_paths(config), manifest)
  # A copy of the data elsewhere is another data_dir.
  shutil.copytree(root / "d64", root / "copy")
  with pytest.raises(train.ConfigError, match="data_dir: .*d64' -> .*copy'"):
    check_model_dir(train.with_absolute_paths(
        dataclasses.replace(config, data_dir="copy")), manifest)


def test_unusable_model_dir_is_refused_in_one_line(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=2, num_val=0)
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  config = train.TrainConfig(data_dir=data_dir, model_dir=str(blocker), epochs=1, **TINY)
  with pytest.raises(train.ConfigError, match="file: a file is there; expected a folder"):
    train.train_and_evaluate(config)
  with pytest.raises(train.ConfigError, match="sub: cannot create it: Not a directory"):
    train.train_and_evaluate(dataclasses.replace(config, model_dir=str(blocker / "sub")))


def test_a_held_lock_refuses_the_run(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=2, num_val=0)
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  with open(model_dir / ".lock", "w") as holder:
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("4242 otherhost\n")
    holder.flush()
    config = train.TrainConfig(data_dir=data_dir, model_dir=str(model_dir), epochs=1,
                               **TINY)
    with pytest.raises(train.ConfigError,
                       match=f"{re.escape(str(model_dir.resolve()))} is in use by another "
                       "spine-train \\(pid 4242 on otherhost"):
      train.train_and_evaluate(config)
  assert not (model_dir / "config.json").exists()  # Refused before writing anything.


def test_leftovers_of_killed_runs_are_removed_at_start(tmp_path, capsys):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=2, num_val=0)
  model_dir = tmp_path / "model"
  leftovers = [f"{fileio.TMP_PREFIX}123-best.keras", f"{fileio.TMP_PREFIX}123-config.json",
               ".tmp-4567-best.keras", ".config.json.k2j4x9.tmp", ".history.json.a8b7c6.tmp",
               "checkpoints/ckpt-3_temp", "checkpoints/checkpoint.tmp5f3e0a"]
  others = ["notes.txt", "checkpoints/readme.txt"]
  (model_dir / "checkpoints" / "ckpt-3_temp").mkdir(parents=True)
  (model_dir / "checkpoints" / "ckpt-3_temp" / "part-00000-of-00001.index").write_text("")
  for name in leftovers[:-2] + leftovers[-1:] + others:
    (model_dir / name).write_text("half written")
  config = train.TrainConfig(data_dir=data_dir, model_dir=str(model_dir), epochs=1, **TINY)
  assert train.train_and_evaluate(config)["epochs_completed"] == 1
  assert not [name for name in leftovers if (model_dir / name).exists()]
  assert all((model_dir / name).exists() for name in others)
  lines = [l for l in capsys.readouterr().out.splitlines() if "removed leftovers" in l]
  assert len(lines) == 1 and all(name in lines[0] for name in leftovers), lines
  # The run's own writes left no temporary behind.
  assert not list(model_dir.rglob(f"{fileio.TMP_PREFIX}*"))


def test_damaged_shard_is_named_at_start_and_when_reading_fails(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=0)
  shard = (tmp_path / "data" / schema.shard_name("train", 1, 2)).resolve()
  shard.write_bytes(shard.read_bytes()[:-100])  # Cut inside its last record.
  model_dir = tmp_path / "model"
  config = train.TrainConfig(data_dir=data_dir, model_dir=str(model_dir), epochs=1, **TINY)
  with pytest.raises(train.ConfigError, match=f"{re.escape(str(shard))}: corrupted or "
                     "truncated.*--noverify_shards"):
    train.train_and_evaluate(config)
  assert not model_dir.exists()  # Refused before anything was written.
  # Unchecked at start, the read fails mid-run: named too, not a bare TF traceback.
  with pytest.raises(train.TrainingError, match=f"reading .*data failed: "
                     f"{re.escape(str(shard))}: corrupted or truncated"):
    train.train_and_evaluate(dataclasses.replace(config, verify_shards=False))
  assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")) is None


def test_non_finite_loss_stops_before_saving_that_epoch(tmp_path, monkeypatch):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=2)
  model_dir = tmp_path / "model"
  config = train.TrainConfig(data_dir=data_dir, model_dir=str(model_dir), epochs=1, **TINY)
  train.train_and_evaluate(config)
  ckpt_dir = str(model_dir / "checkpoints")
  latest = tf.train.latest_checkpoint(ckpt_dir)
  saved = {name: (model_dir / name).read_bytes() for name in ("history.json", "best.keras")}
  make_dataset = input_pipeline.make_dataset

  def poisoned(*args, **kwargs):
    ds = make_dataset(*args, **kwargs)
    if kwargs.get("training"):
      ds = ds.map(lambda image, mask: (image + np.inf, mask))
    return ds

  monkeypatch.setattr(input_pipeline, "make_dataset", poisoned)
  with pytest.raises(train.TrainingError, match=r"epoch 2, step 1: the training loss is "
                     r"(nan|inf).*keeps ckpt-1 \(epoch 1\), best.keras and history.json"):
    train.train_and_evaluate(dataclasses.replace(config, epochs=3))
  assert tf.train.latest_checkpoint(ckpt_dir) == latest
  for name, content in saved.items():
    assert (model_dir / name).read_bytes() == content, name


def test_non_finite_loss_ends_spine_train_with_one_error_line(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=2,
                                            train_image_value=np.inf)
  model_dir = tmp_path / "model"
  out = subprocess.run(_command(data_dir, model_dir, 3), cwd=REPO,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                       capture_output=True, text=True, timeout=180)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  errors = _errors(out.stderr)
  assert len(errors) == 1 and "epoch 1, step 1: the training loss is" in errors[0], errors
  assert "spine-train: done" not in out.stdout
  assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")) is None
  assert not (model_dir / "history.json").exists()
  assert not (model_dir / "best.keras").exists()


def test_deterministic_runs_are_bit_identical(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=6, num_val=2)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  runs = [tmp_path / "run1", tmp_path / "run2"]
  # Augmentation in tf.data and dropout: every seeded random source takes part.
  procs = [subprocess.Popen(
      [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}",
       f"--model_dir={run}", "--epochs=2", "--base_filters=4", "--depth=2",
       "--global_batch_size=2", "--dropout=0.1", "--augment_on=host", "--deterministic",
       "--verbose=0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for run in runs]
  try:
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  readers = [tf.train.load_checkpoint(str(run / "checkpoints")) for run in runs]
  names = sorted(k for k in readers[0].get_variable_to_shape_map()
                 if k != "_CHECKPOINTABLE_OBJECT_GRAPH")
  # The weights (stored through the optimizer, which tracks them), its moments and step.
  assert any("_trainable_variables" in n for n in names) and len(names) > 20, names
  for name in names:
    first, second = (np.asarray(r.get_tensor(name)) for r in readers)
    assert first.tobytes() == second.tobytes(), name
  models = [keras.models.load_model(run / "best.keras", compile=False) for run in runs]
  for first, second in zip(*(m.get_weights() for m in models)):
    assert first.tobytes() == second.tobytes()
  timing = ("seconds", "images_per_second", "input_wait_fraction")
  histories = [[{k: v for k, v in e.items() if k not in timing}
                for e in json.loads((run / "history.json").read_text())] for run in runs]
  assert len(histories[0]) == 2 and histories[0] == histories[1]
