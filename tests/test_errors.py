"""One error path for every binary (`data_prep.cli`): a fault ends in ONE stderr line
`spine-<command>: error: ...` and exit status 1, TensorFlow's start-up lines stay hidden,
a failed checkpoint save is reported and resumed from, and no progress bar writes escape
codes into a file."""
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import export_testlib
import trainer_testdata

REPO = pathlib.Path(__file__).resolve().parents[1]
# No TF_CPP_MIN_LOG_LEVEL: the binaries must be quiet by themselves.
QUIET_ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def _run(args, env=None, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env or QUIET_ENV,
                        capture_output=True, text=True, timeout=300, **kwargs)


def _one_error_line(proc, command: str) -> str:
  """The message of the single `COMMAND: error:` line that must be the whole stderr."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), proc.stderr[-3000:]
  return lines[0][len(f"{command}: error: "):]


# Every binary, with flags that pass absl's checks (required flags given).
BINARIES = {
    "spine-convert": ("data_prep.convert", ["--verify=/nonexistent"]),
    "spine-train": ("trainer.main", ["--data_dir=/nonexistent", "--model_dir=/nonexistent"]),
    "spine-export": ("export.export_saved_model", ["--model_dir=/x", "--export_dir=/x/1"]),
    "spine-predict": ("export.predict", ["--saved_model=/x", "--input=/x", "--output=/x"]),
    "spine-evaluate": ("export.evaluate", ["--saved_model=/x", "--data_dir=/x"]),
    "spine-phantom": ("data_prep.phantom", ["--output_dir=/nonexistent"]),
    "spine-inspect": ("data_prep.inspect_data", ["--data_dir=/x", "--output=/x"]),
    "data_service": ("trainer.data_service", []),
}


@pytest.mark.parametrize("command", sorted(BINARIES))
def test_unknown_flag_is_one_line_naming_the_command(command):
  module, args = BINARIES[command]
  proc = _run(["-m", module, *args, "--no_such_flag=1"])
  message = _one_error_line(proc, command)
  assert "'no_such_flag'" in message and "--help" in message
  assert proc.stdout == ""


@pytest.mark.parametrize("args,expected", [
    # A value absl cannot parse for an integer flag.
    (["--batch_size=eight"], "flag --batch_size=eight: invalid literal for int()"),
    # A required flag left out.
    (["--saved_model=/x", "--output=/x"], "missing --input, a required flag"),
    # app.UsageError raised by main: absl would print the whole usage text.
    (["--saved_model=/x", "--input=/x", "--output=/x", "stray"],
     "unexpected arguments: ['stray']"),
    (["--saved_model=/x", "--input=/x", "--output=/x", "--batch_size=0"],
     "--batch_size must be >= 1, found 0"),
])
def test_flag_and_usage_errors_are_one_line(args, expected):
  proc = _run(["-m", "export.predict", *args])
  assert _one_error_line(proc, "spine-predict").startswith(expected)
  assert "USAGE" not in proc.stdout + proc.stderr and "FATAL" not in proc.stderr


def test_usage_error_after_loading_tensorflow_is_one_line():
  # spine-convert loads TensorFlow before main (its writer); the error comes from main.
  proc = _run(["-m", "data_prep.convert", "--images_dir=/x", "--masks_dir=/x",
               "--output_dir=/x", "--annotated_labels=disc"])
  assert _one_error_line(proc, "spine-convert").startswith(
      "--annotated_labels: expected class ids, found ['disc']")


def test_a_malformed_case_id_regex_is_one_line(tmp_path):
  # re.error is no ValueError: it used to escape as a traceback.
  images = tmp_path / "images"
  images.mkdir()
  proc = _run(["-m", "data_prep.convert", f"--images_dir={images}", f"--masks_dir={images}",
               f"--output_dir={tmp_path / 'out'}", "--case_id_regex=("])
  assert _one_error_line(proc, "spine-convert").startswith(
      "--case_id_regex='(': not a regular expression (missing ), unterminated subpattern")
  assert not (tmp_path / "out").exists()


def test_a_console_script_is_named_by_its_own_name(tmp_path):
  # What pip writes into .venv/bin, with this checkout's modules on the path.
  script = tmp_path / "spine-predict"
  script.write_text("import sys\nfrom export.predict import run\nsys.exit(run())\n")
  proc = _run([str(script), "--saved_model=/x", "--input=/x", "--output=/x", "stray"],
              env=dict(QUIET_ENV, PYTHONPATH=str(REPO)))
  # spine-predict takes Beam's options after `--` (as spine-convert), hence the hint.
  assert _one_error_line(proc, "spine-predict") == (
      "unexpected arguments: ['stray'] (Beam pipeline options after `--` need --runner)")


def test_tensorflow_start_up_lines_are_hidden_unless_asked_for():
  # spine-inspect imports TensorFlow at start; the missing dataset is its only output.
  args = ["-m", "data_prep.inspect_data", "--data_dir=/nonexistent", "--output=/x"]
  message = _one_error_line(_run(args), "spine-inspect")
  assert message.startswith("/nonexistent/dataset.json: no dataset manifest")
  # TF_CPP_MIN_LOG_LEVEL set by the user is obeyed: 0 shows TensorFlow's INFO lines
  # again, the ones logged while it loads included.
  loud = _run(args, env=dict(QUIET_ENV, TF_CPP_MIN_LOG_LEVEL="0"))
  assert loud.returncode == 1 and len(loud.stderr.splitlines()) > 1
  assert any(line.startswith("I0000 ") for line in loud.stderr.splitlines())
  assert loud.stderr.splitlines()[-1] == f"spine-inspect: error: {message}"


# ---------------------------------------------------------------- runs over several inputs

@pytest.fixture(scope="module")
def threshold(tmp_path_factory):
  root = tmp_path_factory.mktemp("threshold")
  return export_testlib.export_and_load(
      export_testlib.write_threshold_model_dir(root / "model"), root / "serving" / "1")


def _png(path, array):
  Image.fromarray(array).save(path)


def test_predict_counts_its_failed_inputs_last(threshold, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  _png(inputs / "a.png", np.full((30, 20), 9, np.uint8))
  _png(inputs / "b.png", np.full((30, 20), 200, np.uint8))
  _png(inputs / "rgb.png", np.zeros((30, 20, 3), np.uint8))
  proc = _run(["-m", "export.predict", f"--saved_model={threshold.path}",
               f"--input={inputs}", f"--output={tmp_path / 'out'}"])
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert lines[-1] == "spine-predict: error: 1 of 3 inputs failed (listed above)"
  assert len(lines) == 2 and lines[0].startswith(f"  {inputs / 'rgb.png'}: ")
  assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal
  assert (tmp_path / "out" / "b_mask.png").is_file()


def test_evaluate_counts_its_failed_cases_last(threshold, tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  for name in ("a", "b"):
    _png(images / f"{name}.png", np.full((30, 20), 200, np.uint8))
    np.save(masks / f"{name}.npy", np.full((30, 20), 2, np.uint8))
  _png(images / "orphan.png", np.full((30, 20), 200, np.uint8))  # no mask
  np.save(masks / "b.npy", np.full((10, 10), 2, np.uint8))  # other shape than its image
  proc = _run(["-m", "export.evaluate", f"--saved_model={threshold.path}",
               f"--images_dir={images}", f"--masks_dir={masks}"])
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert lines[-1] == "spine-evaluate: error: 2 of 3 cases failed (listed above)"
  assert len(lines) == 3 and all(line.startswith("  ") for line in lines[:2])
  assert "\r" not in proc.stderr
  assert "dice" in proc.stdout  # the cases that worked are still scored


# ------------------------------------------------------------ spine-train: checkpoint save

# spine-train whose second checkpoint save writes its shard and then finds the disk full,
# as TensorFlow's SaveV2 op reports it (measured on a full tmpfs).
FULL_DISK_AT_SECOND_SAVE = r"""
import sys
from data_prep import cli  # first, as in the binaries
import tensorflow as tf
from tensorflow.python.ops import io_ops
real_save_v2, calls = io_ops.save_v2, []
def save_v2(prefix, *args, **kwargs):
  calls.append(prefix)
  op = real_save_v2(prefix, *args, **kwargs)
  if len(calls) == 2:
    raise tf.errors.ResourceExhaustedError(
        None, None, "{{function_node __wrapped__SaveV2}} " + prefix.numpy().decode() +
        ".tempstate123; No space left on device [Op:SaveV2]")
  return op
io_ops.save_v2 = save_v2
from trainer import main
sys.argv = ["spine-train"] + sys.argv[1:]
main.run()
"""


def test_failed_checkpoint_save_is_one_line_and_a_rerun_resumes(tmp_path):
  data_dir = trainer_testdata.write_dataset(tmp_path / "data", num_train=2, num_val=1,
                                            image_size=16, train_shards=1)
  model_dir = (tmp_path / "model").resolve()
  flags = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--epochs=2",
           "--base_filters=2", "--depth=2", "--global_batch_size=2", "--norm=group",
           "--noaugment", "--num_overlays=0"]
  failed = _run(["-c", FULL_DISK_AT_SECOND_SAVE, *flags])
  checkpoints = model_dir / "checkpoints"
  assert _one_error_line(failed, "spine-train") == (
      f"{checkpoints}: cannot save the checkpoint of epoch 2: No space left on device; "
      "a rerun of the same command resumes from ckpt-1")
  # Keras' progress bar, when stdout is a file: one plain line per epoch.
  assert "\x1b[" not in failed.stdout and "\b" not in failed.stdout
  assert "1/1 - " in failed.stdout
  assert tf.train.latest_checkpoint(str(checkpoints)) == str(checkpoints / "ckpt-1")
  assert (checkpoints / "ckpt-2_temp").is_dir()  # the half-written save is still there

  again = _run(["-m", "trainer.main", *flags])
  assert again.returncode == 0 and again.stderr == "", again.stderr[-3000:]
  assert ("removed leftovers of an interrupted run" in again.stdout
          and "checkpoints/ckpt-2_temp" in again.stdout)
  assert f"Resuming from {checkpoints / 'ckpt-1'}: 1 epochs completed" in again.stdout
  assert tf.train.latest_checkpoint(str(checkpoints)) == str(checkpoints / "ckpt-2")
  assert not (checkpoints / "ckpt-2_temp").exists()
