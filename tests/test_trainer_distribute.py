"""Distribution: 2 replicas equal 1 replica; a two-process MultiWorkerMirroredStrategy run.

Both run in subprocesses: logical devices and the multi-worker cluster must be set up
before TensorFlow initializes, which pytest's own process has long done.
"""
import json
import os
import socket
import subprocess
import sys

import trainer_testdata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

_TWO_REPLICAS = r"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from trainer import losses, unet

rng = np.random.default_rng(0)
images = rng.normal(size=(4, 16, 16, 1)).astype(np.float32)
masks = rng.integers(0, 3, size=(4, 16, 16, 1)).astype(np.int32)
keras.utils.set_random_seed(1)
init = unet.build_unet(base_filters=4, depth=2, norm="group").get_weights()

def one_step(strategy):
  with strategy.scope():
    model = unet.build_unet(base_filters=4, depth=2, norm="group")
    model.set_weights(init)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=losses.make_loss("dice_ce", num_classes=3))
  ds = tf.data.Dataset.from_tensor_slices((images, masks)).batch(4)
  loss = model.fit(ds, epochs=1, verbose=0, shuffle=False).history["loss"][0]
  return loss, model.get_weights()

one = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"))
two_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert two_strategy.num_replicas_in_sync == 2
two = one_step(two_strategy)
print("losses", one[0], two[0])
assert abs(one[0] - two[0]) < 1e-5, (one[0], two[0])
moved = max(float(np.abs(a - b).max()) for a, b in zip(one[1], init))
diff = max(float(np.abs(a - b).max()) for a, b in zip(one[1], two[1]))
print("moved", moved, "diff", diff)
assert moved > 1e-3 and diff < 1e-5 * max(1.0, moved), (moved, diff)

# The whole trainer on the same 2 replicas: split Dice, checkpoints, best model, refusal.
import sys
from trainer import train
train.make_strategy = lambda name: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
config = train.TrainConfig(data_dir=sys.argv[1], model_dir=sys.argv[2], epochs=1,
                           base_filters=4, depth=2, global_batch_size=4, verbose=0)
result = train.train_and_evaluate(config)
assert result["epochs_completed"] == 1 and result["best_val_dice_mean"] is not None, result
try:
  train.train_and_evaluate(train.TrainConfig(**dict(
      config.__dict__, global_batch_size=3, model_dir=sys.argv[2] + "_b")))
  raise AssertionError("batch 3 on 2 replicas was accepted")
except train.ConfigError as e:
  assert "not divisible by the 2 replicas" in str(e)
print("OK")
"""


def test_two_replicas_match_one_replica_on_the_same_global_batch(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=2)
  out = subprocess.run([sys.executable, "-c", _TWO_REPLICAS, data_dir,
                        str(tmp_path / "model")], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=180)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_two_process_multi_worker_run_completes(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=4, num_val=2)
  model_dir = tmp_path / "model"
  workers = [f"localhost:{p}" for p in _free_ports(2)]
  procs = []
  for index in range(2):
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}",
         f"--model_dir={model_dir}", "--epochs=2", "--base_filters=4", "--depth=2",
         "--global_batch_size=2", "--norm=group", "--strategy=multi_worker"],
        cwd=REPO, env=dict(ENV, TF_CONFIG=json.dumps(tf_config)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=240)[0])
  finally:
    for proc in procs:
      proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  assert "epochs_completed': 2" in outputs[0] and "epochs_completed': 2" in outputs[1]
  # Only the chief (worker 0) writes the run record and the best model.
  history = json.loads((model_dir / "history.json").read_text())
  assert [e["epoch"] for e in history] == [1, 2]
  assert (model_dir / "best.keras").is_file()
  assert (model_dir / "checkpoints" / "checkpoint").is_file()
