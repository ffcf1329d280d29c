r"""Benchmark of spine-export: seconds per SavedModel export, AutoGraph on versus off.

The serving signatures (export/serving.py) are traced with AutoGraph off: their graphs
hold no Python control flow on tensors, and AutoGraph re-parsed the source of every
function each signature traced. This bench exports the same untrained U-Net (weights do
not change the cost) both ways, a one-head model and a model of `--protocols` heads
(every signature twice: plain and `_protocol` twin), each export in a fresh process as
spine-export runs it, and checks that both exports segment a batch bit for bit alike.

  .venv/bin/python bench/export_bench.py                  # about 5 minutes on 2 cores
  .venv/bin/python bench/export_bench.py --base_filters=8 --depth=3 --image_size=128
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, help="Model input square side.")
_BASE_FILTERS = flags.DEFINE_integer("base_filters", 32, help="U-Net base filters.")
_DEPTH = flags.DEFINE_integer("depth", 4, help="U-Net depth.")
_PROTOCOLS = flags.DEFINE_integer("protocols", 2, help="Heads of the second model.")
_SPACING_MM = flags.DEFINE_float("target_spacing_mm", 1.1,
                                 help="The models' target spacing (sliding window on).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, help="Scratch folder (default: temp).")
_ONE = flags.DEFINE_list("one", None, help="Internal: MODEL_DIR,OUT,PROTOCOL,on|off: one "
                         "export in this process.")


@contextlib.contextmanager
def _with_autograph(serving, tf):
  """serving.export as before AutoGraph was turned off: every signature (and twin)
  traced through AutoGraph."""
  base = serving.SegmentationModule
  converted = {
      name: tf.function(value.python_function, input_signature=value.input_signature,
                        autograph=True)
      for name, value in vars(base).items()
      if isinstance(value, tf.types.experimental.PolymorphicFunction)}
  signature = serving._signature  # pylint: disable=protected-access
  serving.SegmentationModule = type("AutoGraphModule", (base,), converted)
  serving._signature = lambda *specs: tf.function(  # pylint: disable=protected-access
      input_signature=list(specs), autograph=True)
  try:
    yield
  finally:
    serving.SegmentationModule = base
    serving._signature = signature  # pylint: disable=protected-access


def _export(model_dir: str, out: str, protocol: str, autograph: bool) -> None:
  """One export in this process (as spine-export runs it); prints its seconds."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from export import serving  # pylint: disable=g-import-not-at-top
  with _with_autograph(serving, tf) if autograph else contextlib.nullcontext():
    start = time.perf_counter()
    serving.export(model_dir, out, protocol=protocol or None, overwrite=True)
    print(f"EXPORT_SECONDS {time.perf_counter() - start:.3f}")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)  # SavedModel writing logs every step at INFO
  if _ONE.value:
    _export(*_ONE.value[:3], _ONE.value[3] == "on")
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from data_prep import manifest, schema  # pylint: disable=g-import-not-at-top
  from trainer import unet  # pylint: disable=g-import-not-at-top

  size = _IMAGE_SIZE.value
  work = pathlib.Path(_WORK_DIR.value or tempfile.mkdtemp(prefix="export_bench."))

  def model_dir(name, protocols=()):
    path = work / name
    path.mkdir(parents=True, exist_ok=True)
    unet.build_unet(base_filters=_BASE_FILTERS.value, depth=_DEPTH.value, norm="group",
                    protocols=protocols).save(path / "best.keras")
    manifest.write_json_atomic(path / schema.MANIFEST_NAME, manifest.make(
        image_size=size, normalization="percentile", per="image", compression="none",
        splits={}, extra={"target_spacing_mm": _SPACING_MM.value}))
    return path

  names = tuple(f"p{i}" for i in range(_PROTOCOLS.value))
  models = {"one head": (model_dir("one"), ""),
            f"{len(names)} heads (with twins)": (model_dir("heads", names), names[0])}

  rng = np.random.default_rng(0)
  images = tf.constant(rng.gamma(2.0, 100.0, (2, size + 40, size - 30, 1)), tf.float32)
  spacing = tf.constant([0.9, 1.3], tf.float32)
  rows = []
  for label, (path, protocol) in models.items():
    seconds, outputs = {}, {}
    for autograph in ("on", "off"):
      out = work / f"{path.name}_{autograph}" / "1"
      # A fresh process per export, as spine-export: AutoGraph caches what it converted.
      run = subprocess.run(
          [sys.executable, __file__, f"--one={path},{out},{protocol},{autograph}"],
          capture_output=True, text=True, check=True)
      seconds[autograph] = float(run.stdout.split("EXPORT_SECONDS")[-1])
      signatures = tf.saved_model.load(str(out)).signatures
      outputs[autograph] = [
          signatures["serving_default"](images=images)["probabilities"].numpy(),
          signatures["segment_volume_spacing"](images=images, spacing=spacing)[
              "probabilities"].numpy()]
    same = all(np.array_equal(a, b) for a, b in zip(outputs["on"], outputs["off"]))
    rows.append((label, seconds["on"], seconds["off"], seconds["on"] / seconds["off"],
                 same))

  print(f"\nspine-export of an untrained U-Net (base_filters={_BASE_FILTERS.value}, "
        f"depth={_DEPTH.value}, group norm, {size} px at {_SPACING_MM.value} mm), "
        f"{os.cpu_count()} CPUs, TF {tf.__version__}, seconds of `serving.export` in a "
        "fresh process\n")
  print("| model | AutoGraph on (s) | AutoGraph off (s) | speed-up | outputs bit for bit |")
  print("| --- | ---: | ---: | ---: | --- |")
  for label, on, off, ratio, same in rows:
    print(f"| {label} | {on:.1f} | {off:.1f} | {ratio:.2f}x | {'equal' if same else 'DIFFER'} |")
  if not all(row[-1] for row in rows):
    raise SystemExit("the two exports segment differently")


if __name__ == "__main__":
  app.run(main)
