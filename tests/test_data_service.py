"""--data_service: spine-train's input pipeline on an in-process tf.data service (a
dispatcher and two workers); every slice once per pass; one-line refusals."""
import collections
import gc
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import trainer_testdata
from trainer import augment
from trainer import data_service_lib
from trainer import input_pipeline
from trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
TINY = dict(base_filters=4, depth=2, global_batch_size=2, norm="group", verbose=0)


@pytest.fixture(scope="module")
def service():
  servers = data_service_lib.start(workers=2)
  yield servers
  # The trainer's last iterator (a job's consumer) may still wait in a reference cycle;
  # a worker whose job still has a consumer takes minutes to stop.
  gc.collect()
  servers.stop()


def _fingerprints(ds):
  """Counter of the slices' image bytes (the synthetic slices are all distinct)."""
  return collections.Counter(image[i].tobytes() for image, _ in ds.as_numpy_iterator()
                             for i in range(len(image)))


def _local_pass(data_dir):
  """Every train slice of `data_dir` once: the evaluation pipeline, run here."""
  source = train.Source(data_dir, "d", train.load_data_manifest(
      data_dir, train.TrainConfig(data_dir=data_dir, model_dir="")))
  return source, _fingerprints(input_pipeline.make_dataset(
      source.files("train"), image_size=32, compression=source.compression,
      global_batch_size=1))


def test_each_pass_through_the_service_gives_every_slice_once(service, tmp_path):
  first, first_slices = _local_pass(trainer_testdata.write_dataset(
      tmp_path / "a", num_train=9, train_shards=3, seed=1))
  second, second_slices = _local_pass(trainer_testdata.write_dataset(
      tmp_path / "b", num_train=4, train_shards=2, seed=2, image_offset=5.0))
  assert len(first_slices) == 9 and set(first_slices.values()) == {1}
  # Batch 1: a finite stream drops no partial batch at each worker's end.
  common = dict(image_size=32, global_batch_size=1)

  def options(**kwargs):
    return input_pipeline.TrainingOptions(seed=3, data_service=service.address, **kwargs)

  one = input_pipeline.make_dataset(first.files("train"), compression=first.compression,
                                    training=options(passes=1), **common)
  assert _fingerprints(one) == first_slices
  two = input_pipeline.make_dataset(first.files("train"), compression=first.compression,
                                    training=options(passes=2), **common)
  assert _fingerprints(two) == first_slices + first_slices
  # Two datasets mixed by weight on the workers: each slice of both, once.
  mixed = input_pipeline.make_dataset(
      [first.files("train"), second.files("train")],
      compression=[first.compression, second.compression],
      training=options(weights=[1, 1], passes=1), **common)
  assert _fingerprints(mixed) == first_slices + second_slices
  # Augmented on the workers (--augment_on=host): still 9 slices, each moved.
  augmented = _fingerprints(input_pipeline.make_dataset(
      first.files("train"), compression=first.compression,
      training=options(passes=1, augment=augment.AugmentConfig(geometric_prob=1.0)),
      **common))
  assert sum(augmented.values()) == 9 and not set(augmented) & set(first_slices)


def test_spine_train_through_the_service(service, tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=2)
  # Host augmentation: the workers augment (their keyed seeds) as well as read and parse.
  result = train.train_and_evaluate(train.TrainConfig(
      data_dir=data_dir, model_dir=str(tmp_path / "model"), epochs=2, augment_on="host",
      data_service=service.address, **TINY))
  assert result["epochs_completed"] == 2
  assert [e["epoch"] for e in result["history"]] == [1, 2]
  assert all(np.isfinite(e["loss"]) and 0 <= e["input_wait_fraction"] <= 1
             for e in result["history"])
  assert result["best_val_dice_mean"] is not None


@pytest.mark.parametrize("address", ["localhost", "http://localhost:5050", "h:0",
                                     "h:70000", "grpc://:5050", "h:50 50"])
def test_malformed_address_is_refused(address):
  config = train.TrainConfig(data_dir="d", model_dir="m", data_service=address)
  with pytest.raises(train.ConfigError, match=r"^--data_service=.*: not a dispatcher "
                     r"address; expected grpc://HOST:PORT"):
    train.check_config(config)


def test_well_formed_addresses_and_contradictions(tmp_path):
  for address in ("grpc://gpu-1.lab:5050", "10.0.0.7:5050", "[::1]:5050"):
    assert data_service_lib.check_address(address).startswith("grpc://")
  with pytest.raises(train.ConfigError, match="--deterministic with --data_service"):
    train.check_config(train.TrainConfig(data_dir="d", model_dir="m",
                                         data_service="h:5050", deterministic=True))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]  # Bound, not listening: nothing answers there.
    with pytest.raises(train.ConfigError, match=f"localhost:{port}: no dispatcher answers"):
      train.train_and_evaluate(train.TrainConfig(
          data_dir=str(tmp_path), model_dir=str(tmp_path / "m"),
          data_service=f"localhost:{port}"))


def test_spine_train_bad_address_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "trainer.main", f"--data_dir={tmp_path}",
                        f"--model_dir={tmp_path / 'm'}", "--data_service=grpc://gpu-1"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("spine-train: error:")]
  assert errors == [
      "spine-train: error: --data_service=grpc://gpu-1: not a dispatcher address; "
      "expected grpc://HOST:PORT (the address `python -m trainer.data_service` prints)"]


def test_entry_point_prints_the_address_and_stops_on_ctrl_c():
  proc = subprocess.Popen([sys.executable, "-m", "trainer.data_service", "--port=0",
                           "--workers=1", "--host=localhost"], cwd=REPO, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    address = line.split("--data_service=")[1].split(";")[0]
    assert data_service_lib.check_address(address) == address, line
    data_service_lib.check_reachable(address)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0 and "data_service: stopped" in stdout
