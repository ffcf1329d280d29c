"""spine-predict --pipeline=streaming against the sequential loop (export/stream.py).

Models are tiny trained U-Nets (base_filters 4, depth 2; `export_testlib.write_model_dir`)
exported with a target spacing, so that --tta applies; an ensemble is two of them trained
for different numbers of steps (different weights).

What each test proves:
  * streaming writes the same files, byte for byte, as the sequential loop, and lists
    the same files and failures in the same order: a folder mixing 2D slices of several
    sizes (shared batches) and NIfTI volumes of several sizes, with --tta, an ensemble,
    probabilities, overlays, --postprocess and the QC report;
  * with two devices (two logical CPUs) each gets model calls and the bytes are the same;
  * a corrupt input in the middle of a stream: one line naming it, every other input
    written, exit 1 counting it, no temporary left; a worker failing on one input (a
    reader's exception, a writer refusing an array) fails that input only and leaves it
    no half set;
  * a write error stops the streaming run where the sequential one stops;
  * memory is bounded: inputs decoded but not yet written never exceed a bound that
    does not grow with the folder, even when writing is the slow step.
"""
import errno
import os
import pathlib
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
from PIL import Image
import pytest

import export_testlib
from data_prep import fileio
from data_prep import manifest
from data_prep import schema
from export import inference
from export import predict_lib
from export import predict_report
from export import stream

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
S = export_testlib.IMAGE_SIZE
SPACING = 1.0  # the models' target spacing, mm per pixel
AFFINE = np.diag([1.1, 0.9, 1.3, 1.0])


def _export(root: pathlib.Path, steps: int) -> inference.LoadedModel:
  """A tiny trained U-Net exported with a target spacing (so --tta applies)."""
  model_dir = export_testlib.write_model_dir(root / "model", steps=steps)
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, manifest.make(
      image_size=S, normalization="percentile", per="image", compression="none",
      splits={}, extra={"target_spacing_mm": SPACING}))
  return export_testlib.export_and_load(model_dir, root / "serving" / "1")


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
  return _export(tmp_path_factory.mktemp("unet"), steps=2)


@pytest.fixture(scope="module")
def ensemble(unet, tmp_path_factory):
  return inference.Ensemble((unet, _export(tmp_path_factory.mktemp("other"), steps=4)))


def _mixed_inputs(folder: pathlib.Path) -> None:
  """2D PNGs and .npy of three sizes (several share a batch), and NIfTI volumes of two
  sizes, interleaved in the folder's natural order."""
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True)
  sizes = [(30, 26), (30, 26), (41, 33), (30, 26), (20, 44), (41, 33), (30, 26)]
  for i, shape in enumerate(sizes):
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    if i == 2:
      np.save(folder / f"c{i}.npy", pixels.astype(np.float32))
    else:
      Image.fromarray(pixels).save(folder / f"c{i}.png")
    if i in (1, 4):
      shape3 = (5, 28, 34) if i == 1 else (3, 36, 30)
      volume = rng.integers(0, 2000, shape3).astype(np.int16)
      nib.save(nib.Nifti1Image(volume, AFFINE), folder / f"c{i}v.nii.gz")


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  """Every file under `folder` by relative path, with the folder's path blanked out (the
  report names the output folder)."""
  return {str(p.relative_to(folder)): p.read_bytes().replace(str(folder).encode(), b"OUT")
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _predict_both(model, inputs: pathlib.Path, tmp_path: pathlib.Path, **options):
  """Runs both pipelines; returns {pipeline: (files, written names, failures)}."""
  results = {}
  for pipeline in stream.PIPELINES:
    out = tmp_path / pipeline
    written, failures = predict_lib.predict(
        model, inputs, out, progress=False, pipeline=pipeline,
        report=predict_report.Options(str(out / "report")), **options)
    results[pipeline] = (_files(out), [p.name for p in written], failures)
  return results


@pytest.mark.parametrize("which, tta", [("unet", False), ("unet", True),
                                        ("ensemble", True)])
def test_streaming_writes_the_sequential_bytes(which, tta, request, tmp_path):
  model = request.getfixturevalue(which)
  _mixed_inputs(tmp_path / "in")
  results = _predict_both(model, tmp_path / "in", tmp_path, batch_size=2, tta=tta,
                          overlay=True, save_probabilities=True, postprocess=True,
                          spacing_2d_mm=(0.8, 0.8))
  files, written, failures = results["sequential"]
  assert not failures
  assert len(written) == 7 * 4 + 2 * 3  # 2D: mask png+npy, overlay, probabilities
  assert any(name.startswith("report/") for name in files)
  assert results["streaming"][1] == written  # the same files, listed in the same order
  assert results["streaming"][2] == failures
  assert results["streaming"][0].keys() == files.keys()
  for name, content in files.items():
    assert results["streaming"][0][name] == content, name


_TWO_DEVICES = r"""
import pathlib, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from export import inference, predict_lib, stream
used = []
real = stream._on_device
def record(device, fn):
  used.append(device)
  return real(device, fn)
stream._on_device = record
model = inference.load_saved_model(sys.argv[1])
inputs, out = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
predict_lib.predict(model, inputs, out / "sequential", progress=False, batch_size=2,
                    spacing_2d_mm=(0.8, 0.8), save_probabilities=True,
                    pipeline="sequential")
used.clear()
predict_lib.predict(model, inputs, out / "streaming", progress=False, batch_size=2,
                    spacing_2d_mm=(0.8, 0.8), save_probabilities=True,
                    pipeline="streaming",
                    devices=[d.name for d in tf.config.list_logical_devices("CPU")])
print("DEVICES", sorted(set(used)))
"""


def test_two_devices_share_the_calls_and_write_the_same_bytes(unet, tmp_path):
  _mixed_inputs(tmp_path / "in")
  proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES, unet.path,
                         str(tmp_path / "in"), str(tmp_path / "out")], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "DEVICES ['/device:CPU:0', '/device:CPU:1']" in proc.stdout, proc.stdout
  sequential = _files(tmp_path / "out" / "sequential")
  assert len(sequential) == 7 * 3 + 2 * 2
  assert _files(tmp_path / "out" / "streaming") == sequential


def _pngs(folder: pathlib.Path, count: int) -> None:
  rng = np.random.default_rng(1)
  folder.mkdir(parents=True)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (S, S), dtype=np.uint8)).save(
        folder / f"in{i}.png")


def _no_temporaries(folder: pathlib.Path) -> bool:
  return not [p for p in folder.rglob("*") if p.name.startswith(fileio.TMP_PREFIX)]


def test_cli_corrupt_input_in_the_middle_of_a_stream(unet, tmp_path):
  _pngs(tmp_path / "in", 6)
  (tmp_path / "in" / "in3.png").write_bytes(b"not a png")
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "export.predict", f"--saved_model={unet.path}",
       f"--input={tmp_path / 'in'}", f"--output={out}", "--batch_size=2",
       "--spacing_2d_mm=1", "--pipeline=streaming"], cwd=REPO, env=ENV,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  named = [l for l in proc.stderr.splitlines() if "in3.png" in l]
  assert len(named) == 1 and named[0].strip().startswith(str(tmp_path / "in" / "in3.png"))
  assert proc.stderr.splitlines()[-1] == (
      "spine-predict: error: 1 of 6 inputs failed (listed above)")
  assert sorted(p.name for p in out.iterdir()) == sorted(
      f"in{i}_mask.{ext}" for i in (0, 1, 2, 4, 5) for ext in ("png", "npy"))
  assert _no_temporaries(out)


@pytest.mark.parametrize("pipeline", stream.PIPELINES)
def test_a_worker_failing_on_one_input_fails_it_alone(unet, pipeline, tmp_path,
                                                      monkeypatch):
  _pngs(tmp_path / "in", 6)
  real_read = inference.read_input
  real_npy = predict_lib._write_npy  # pylint: disable=protected-access

  def read(path, *args):
    if path.endswith("in1.png"):
      raise RuntimeError("decoder crashed")
    return real_read(path, *args)

  def refuse(path, array):
    if "in4_mask" in path:
      raise ValueError("array refused")
    real_npy(path, array)

  monkeypatch.setattr(inference, "read_input", read)
  monkeypatch.setattr(predict_lib, "_write_npy", refuse)
  out = tmp_path / "out"
  written, failures = predict_lib.predict(unet, tmp_path / "in", out, batch_size=2,
                                          spacing_2d_mm=(1.0, 1.0), progress=False,
                                          pipeline=pipeline)
  assert [(pathlib.Path(p).name, m.split(": ", 1)[1]) for p, m in failures] == [
      ("in1.png", "RuntimeError: decoder crashed"),
      ("in4.png", "ValueError: array refused")]
  assert all(m.startswith(p) for p, m in failures)
  # in4's PNG was complete before its .npy was refused: removed, no half set.
  expected = sorted(f"in{i}_mask.{ext}" for i in (0, 2, 3, 5) for ext in ("png", "npy"))
  assert sorted(p.name for p in written) == expected
  assert sorted(p.name for p in out.iterdir()) == expected
  assert _no_temporaries(out)


def test_write_error_stops_streaming_where_sequential_stops(unet, tmp_path, monkeypatch):
  _pngs(tmp_path / "in", 8)
  real_npy = predict_lib._write_npy  # pylint: disable=protected-access

  def full_disk(path, array):
    if "in3_mask.npy" in path:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real_npy(path, array)

  monkeypatch.setattr(predict_lib, "_write_npy", full_disk)
  results = {}
  for pipeline in stream.PIPELINES:
    out = tmp_path / pipeline
    with pytest.raises(predict_lib.OutputError) as info:
      predict_lib.predict(unet, tmp_path / "in", out, batch_size=3, progress=False,
                          spacing_2d_mm=(1.0, 1.0), pipeline=pipeline)
    failures = [(pathlib.Path(p).name, m.replace(str(out), "OUT"))
                for p, m in info.value.failures]
    results[pipeline] = (str(info.value).replace(str(out), "OUT"), failures,
                         _files(out), sorted(p.name for p in info.value.written))
    assert _no_temporaries(out)
  assert [name for name, _ in results["sequential"][1]] == [f"in{i}.png"
                                                            for i in range(3, 8)]
  assert results["streaming"] == results["sequential"]


def test_inputs_in_flight_stay_bounded(unet, tmp_path, monkeypatch):
  count = 24
  _pngs(tmp_path / "in", count)
  alive, peak, lock = [0], [0], threading.Lock()
  real_read = predict_lib._read  # pylint: disable=protected-access
  real_commit = predict_lib._commit  # pylint: disable=protected-access

  def read(*args):
    result = real_read(*args)
    with lock:
      alive[0] += 1
      peak[0] = max(peak[0], alive[0])
    return result

  def slow_commit(*args):
    time.sleep(0.05)  # writing is the slow step: an unbounded reader would run ahead
    real_commit(*args)
    with lock:
      alive[0] -= 1

  monkeypatch.setattr(predict_lib, "_read", read)
  monkeypatch.setattr(predict_lib, "_commit", slow_commit)
  written, failures = predict_lib.predict(unet, tmp_path / "in", tmp_path / "out",
                                          batch_size=1, spacing_2d_mm=(1.0, 1.0),
                                          progress=False, pipeline="streaming",
                                          devices=[None])
  assert not failures and len(written) == 2 * count
  # Read ahead (+1 submitted beyond them, +1 held waiting for a slot) and the calls whose
  # outputs are not written: independent of `count`.
  assert peak[0] <= stream.READ_AHEAD + 2 + stream.CALLS_PER_DEVICE
