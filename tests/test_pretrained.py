"""The model that ships with spineseg: export/pretrained_model/ (export/pretrained.py)."""
import fcntl
import json
import os
import pathlib
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from data_prep import phantom
from data_prep import schema
from export import pretrained

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared" / "data"
# Floors below the Dice the shipped model reaches (MODEL_CARD.md; measured when packed).
# The phantom is no MRI: the model finds some of its vertebrae (0.22) but not its discs,
# drawn as uniform bright bands (0.00), so only the vertebrae have a floor (a model that
# segments nothing scores 0). The spine2d val slices are real ones it never trained on.
PHANTOM_FLOOR = {"vertebra": 0.15}
SPINE2D_VAL_FLOOR = {"disc": 0.75, "vertebra": 0.75}


def _run(args, env_extra, cwd=REPO_ROOT):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env_extra)
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)


def test_shipped_model_is_small_and_its_card_names_its_weights():
  keras_file = pretrained.model_dir() / pretrained.MODEL_FILE
  assert keras_file.stat().st_size <= 10 * 2**20
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.models.load_model(keras_file, compile=False)
  card = (pretrained.MODEL_DIR / "MODEL_CARD.md").read_text()
  recorded = re.search(r"Weights\s+sha256: `([0-9a-f]{64})`", card)
  assert recorded, "MODEL_CARD.md must record the weights sha256"
  assert recorded.group(1) == pretrained.weights_digest(model.get_weights())
  manifest = json.loads((pretrained.MODEL_DIR / "dataset.json").read_text())
  assert manifest["labels"] == {"0": "background", "1": "disc", "2": "vertebra"}
  heads = {layer.name for layer in model.layers}
  assert {schema.head_layer(p) for p in ("spine2d", "ivd", "vb1")} <= heads


def test_weights_digest_tells_values_apart():
  a = [np.zeros((2, 3), np.float32), np.ones(3, np.float32)]
  assert pretrained.weights_digest(a) == pretrained.weights_digest([w.copy() for w in a])
  b = [a[0], a[1] * np.float32(1 + 2**-23)]  # one bit of one weight
  assert pretrained.weights_digest(a) != pretrained.weights_digest(b)
  assert pretrained.weights_digest(a) != pretrained.weights_digest([a[0].reshape(3, 2), a[1]])


def _dice(json_path):
  """{"disc": ..., "vertebra": ...}: spine-evaluate's Dice pooled over the cases."""
  pooled = json.loads(pathlib.Path(json_path).read_text())["overall"]["pooled"]["dice"]
  return {name: pooled[f"dice_{name}"] for name in ("disc", "vertebra")}


def test_segments_phantom_and_shared_slices_in_a_fresh_process(tmp_path):
  cache = tmp_path / "cache"
  vol = tmp_path / "phantom"
  phantom.write_3d_dataset(vol, num_cases=1, seed=3, size=160, num_slices=16)
  first = _run(["export.evaluate", "--saved_model=pretrained",
                f"--images_dir={vol / 'images'}", f"--masks_dir={vol / 'masks'}",
                f"--output_json={tmp_path / 'phantom.json'}"], {"SPINESEG_CACHE": str(cache)})
  assert first.returncode == 0, first.stderr
  assert "exporting the shipped model once" in first.stderr
  # Only our line: TensorFlow's INFO lines of writing a SavedModel stay quiet.
  assert not re.search(r"^I\d{4} ", first.stderr, re.MULTILINE), first.stderr
  [export] = cache.glob("pretrained-*/1")
  assert (export / "saved_model.pb").is_file()
  dice = _dice(tmp_path / "phantom.json")
  for name, floor in PHANTOM_FLOOR.items():
    assert dice[name] >= floor, dice
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} absent: the shared slices are not scored")
  manifest = json.loads((pretrained.MODEL_DIR / "dataset.json").read_text())
  val = [c["id"] for c in manifest["cases"] if c["split"] == "val"]
  for kind, suffix in (("images", ".png"), ("masks", ".npy")):
    (tmp_path / "s2d" / kind).mkdir(parents=True)
    for case in val:
      name = case + suffix
      (tmp_path / "s2d" / kind / name).symlink_to(SHARED / "spine2d" / kind / name)
  second = _run(["export.evaluate", "--saved_model=pretrained", "--spacing_2d_mm=1.1",
                 f"--images_dir={tmp_path / 's2d' / 'images'}",
                 f"--masks_dir={tmp_path / 's2d' / 'masks'}",
                 f"--output_json={tmp_path / 's2d.json'}"], {"SPINESEG_CACHE": str(cache)})
  assert second.returncode == 0, second.stderr
  assert "exporting" not in second.stderr  # the cached export is reused
  dice = _dice(tmp_path / "s2d.json")
  for name, floor in SPINE2D_VAL_FLOOR.items():
    assert dice[name] >= floor, dice


def test_a_process_that_waits_for_the_cache_lock_uses_the_export_made_meanwhile(
    tmp_path, monkeypatch, capfd):
  from export import serving  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("SPINESEG_CACHE", str(tmp_path))
  exports = []
  monkeypatch.setattr(serving, "export", lambda *args, **kwargs: exports.append(args))
  target = tmp_path / f"pretrained-{pretrained.weights_sha256()[:16]}" / "1"
  target.parent.mkdir(parents=True)
  result = {}
  with open(target.parent / ".export.lock", "a") as other:  # another process exporting
    fcntl.flock(other, fcntl.LOCK_EX)
    waiter = threading.Thread(target=lambda: result.update(path=pretrained.saved_model()))
    waiter.start()
    waiter.join(timeout=2)
    assert waiter.is_alive() and not exports  # it waits instead of exporting too
    target.mkdir()
    (target / "saved_model.pb").write_bytes(b"the other process's export")
  waiter.join(timeout=30)
  assert result == {"path": target} and not exports  # used, not exported again
  said = capfd.readouterr().err  # what the waiting process told its user: no export
  assert "waiting for another process" in said and "exporting" not in said, said


def test_unwritable_cache_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  result = _run(["export.predict", "--saved_model=pretrained", f"--input={tmp_path}",
                 f"--output={tmp_path / 'out'}"], {"SPINESEG_CACHE": str(blocker / "c")})
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  # TensorFlow's own start-up lines may come first; ours is the one error line.
  lines = [l for l in result.stderr.splitlines() if l.startswith("spine-predict")]
  assert len(lines) == 1 and "SPINESEG_CACHE" in lines[0] and str(blocker) in lines[0], lines


def test_init_from_pretrained_loads_every_head(tmp_path):
  raw = tmp_path / "raw"
  phantom.write_2d_dataset(raw, num_cases=2, seed=0)
  data = tmp_path / "data"
  convert = _run(["data_prep.convert", f"--images_dir={raw / 'images'}",
                  f"--masks_dir={raw / 'masks'}", f"--output_dir={data}",
                  "--flagfile=experiments/multi_scanner/convert_2d.flags",
                  "--protocol=spine2d", "--val_fraction=0"], {})
  assert convert.returncode == 0, convert.stderr
  model_dir = tmp_path / "model"
  train = _run(["trainer.main", f"--data_dir={data}", f"--model_dir={model_dir}",
                "--init_from=pretrained", "--base_filters=16", "--epochs=1",
                "--steps_per_epoch=1", "--global_batch_size=1", "--verbose=0"], {})
  assert train.returncode == 0, train.stderr
  config = json.loads((model_dir / "config.json").read_text())
  assert config["init_from"] == "pretrained"
  assert config["init_from_resolved"] == str(pretrained.MODEL_DIR / pretrained.MODEL_FILE)
  assert config["init_from_sha256"] == pretrained.weights_sha256()
  start = [l for l in train.stdout.splitlines() if "--init_from=pretrained" in l]
  assert start and "layers loaded" in start[0], train.stdout
  assert "re-initialized" not in start[0]  # the spine2d head (and every other) is loaded
