r"""Benchmark of spine-predict's pipelines: inputs per minute, sequential vs streaming.

Builds an UNTRAINED U-Net (weights do not change the cost), exports it with
spine-export's library, writes phantom inputs (`data_prep.phantom`: NIfTI volumes of mixed
in-plane sizes, RAS and scanner order alternating; PNG slices of mixed sizes), and runs
`predict_lib.predict` on each folder with --pipeline=sequential and =streaming
(--postprocess on, as spine-predict's default). Each row: wall seconds of one run after
a warm-up run on the same folder, inputs per minute, the ratio to the sequential run of
the same folder, and the fraction of the wall time the model was busy (time inside
`probabilities` calls, summed over devices, / wall). A third row per folder runs it on
Apache Beam (`--runner=DirectRunner`, 2 worker processes, each loading the model;
`export/beam_predict.py`): one run, whose start-up (a run on one input of the folder:
workers starting, TensorFlow imported, the model loaded) is given apart; its inputs per
minute and ratio leave the start-up out (issue 22 goal: within 2x of the local command). A second table gives the peak
Python heap (tracemalloc: NumPy arrays included, TensorFlow's own buffers not) of a
streaming run on few and on many tiny slices: bounded memory keeps the two alike.
Issue 22 goals on 2 CPU cores: streaming >= 1.5x the sequential inputs/minute on 32
phantom volumes, the model busy >= 90% of the wall time.

  .venv/bin/python bench/predict_bench.py                   # ~3-5 minutes on 2 cores
  .venv/bin/python bench/predict_bench.py --volumes=32 --slices=128 --base_filters=16
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_VOLUMES = flags.DEFINE_integer("volumes", 32, help="Phantom NIfTI volumes.")
_VOLUME_SIZE = flags.DEFINE_integer("volume_size", 96, help="Nominal in-plane side of "
                                    "the volumes (each side varies by -25%..+25%).")
_VOLUME_SLICES = flags.DEFINE_integer("volume_slices", 12, help="Slices per volume.")
_SLICES = flags.DEFINE_integer("slices", 64, help="Phantom 2D PNG slices.")
_SLICE_SIZES = flags.DEFINE_string(
    "slice_sizes", "128,160",
    help="MIN,MAX side of the 2D slices (multiples of 16: a few sizes share batches).")
_MEMORY_INPUTS = flags.DEFINE_string("memory_inputs", "10,200", help="FEW,MANY tiny "
                                     "slices for the peak-memory table; empty: skip it.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, help="Model input square side.")
_BASE_FILTERS = flags.DEFINE_integer("base_filters", 8, help="U-Net base filters.")
_DEPTH = flags.DEFINE_integer("depth", 3, help="U-Net depth.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, help="2D slices per model call.")
_BEAM = flags.DEFINE_bool("beam", True, help="Also the Beam DirectRunner row (needs "
                          "the [beam] extra).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, help="Scratch folder (default: temp).")


class _Timed:
  """A model (or ensemble) whose `probabilities` calls add up their seconds: the time
  the model is busy. Thread-safe: with several devices, calls overlap and each counts."""

  def __init__(self, model):
    self._model, self._lock, self.busy_s = model, threading.Lock(), 0.0

  @property
  def members(self):
    return self._model.members

  def probabilities(self, *args, **kwargs):
    start = time.perf_counter()
    try:
      return self._model.probabilities(*args, **kwargs)
    finally:
      with self._lock:
        self.busy_s += time.perf_counter() - start


def _export(work: pathlib.Path):
  import keras  # pylint: disable=g-import-not-at-top
  from data_prep import manifest, schema  # pylint: disable=g-import-not-at-top
  from export import inference, serving  # pylint: disable=g-import-not-at-top
  from trainer import unet  # pylint: disable=g-import-not-at-top
  model_dir = work / "model"
  model_dir.mkdir(parents=True, exist_ok=True)
  keras.utils.set_random_seed(0)
  unet.build_unet(base_filters=_BASE_FILTERS.value, depth=_DEPTH.value,
                  norm="group").save(model_dir / "best.keras")
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, manifest.make(
      image_size=_IMAGE_SIZE.value, normalization="percentile", per="image",
      compression="none", splits={}))
  return inference.load_saved_model(serving.export(model_dir, work / "serving" / "1",
                                                   overwrite=True))


def _run(model, inputs: pathlib.Path, out: pathlib.Path, pipeline: str) -> tuple:
  """(wall seconds, model-busy seconds) of one predict run, after a warm-up run."""
  from export import predict_lib  # pylint: disable=g-import-not-at-top
  timed = _Timed(model)
  for _ in range(2):  # the first run warms up tracing, thread pools and the file cache
    timed.busy_s = 0.0
    start = time.perf_counter()
    _, failures = predict_lib.predict(timed, inputs, out, batch_size=_BATCH_SIZE.value,
                                      overwrite=True, progress=False, postprocess=True,
                                      pipeline=pipeline)
    wall = time.perf_counter() - start
  if failures:
    raise RuntimeError(f"bench inputs failed: {failures[:3]}")
  return wall, timed.busy_s


# Beam's Python DirectRunner with two worker processes (the Prism runner it would try
# first needs a download; see docs/scaling_out.md).
BEAM_ARGS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing",
             "--prism_location=/nonexistent/prism"]


def _run_beam(model, inputs: pathlib.Path, out: pathlib.Path) -> tuple[float, float]:
  """(wall seconds, start-up seconds) of one predict run on Beam; the start-up is the
  wall time of a run on the folder's first input alone."""
  from export import beam_predict, predict_lib  # pylint: disable=g-import-not-at-top
  # The worker processes import spineseg as this process does.
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [str(pathlib.Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
  one = out.parent / "beam-one-input"
  one.mkdir(parents=True, exist_ok=True)
  first = sorted(inputs.iterdir())[0]
  shutil.copy(first, one / first.name)
  walls = []
  for folder in (one, inputs):
    start = time.perf_counter()
    _, failures = predict_lib.predict(
        model, folder, out, batch_size=_BATCH_SIZE.value, overwrite=True, progress=False,
        postprocess=True, engine=beam_predict.engine("DirectRunner", BEAM_ARGS))
    walls.append(time.perf_counter() - start)
    if failures:
      raise RuntimeError(f"bench inputs failed: {failures[:3]}")
  return walls[1], walls[0]


def _peak_heap_mb(model, folder: pathlib.Path, count: int, out: pathlib.Path) -> float:
  from data_prep import phantom  # pylint: disable=g-import-not-at-top
  from export import predict_lib  # pylint: disable=g-import-not-at-top
  phantom.write_2d_dataset(folder, count, min_size=64, max_size=64)
  tracemalloc.start()
  try:
    predict_lib.predict(model, folder / "images", out, batch_size=_BATCH_SIZE.value,
                        overwrite=True, progress=False, pipeline="streaming")
    return tracemalloc.get_traced_memory()[1] / 2**20
  finally:
    tracemalloc.stop()


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)  # SavedModel writing logs every step at INFO
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_prep import phantom  # pylint: disable=g-import-not-at-top
  from export import stream  # pylint: disable=g-import-not-at-top

  work = pathlib.Path(_WORK_DIR.value or tempfile.mkdtemp(prefix="predict_bench."))
  model = _export(work)
  low, high = (int(v) for v in _SLICE_SIZES.value.split(","))
  phantom.write_3d_dataset(work / "volumes", _VOLUMES.value, size=_VOLUME_SIZE.value,
                           num_slices=_VOLUME_SLICES.value, overwrite=True)
  phantom.write_2d_dataset(work / "slices", _SLICES.value, min_size=low, max_size=high,
                           overwrite=True)
  folders = {f"{_VOLUMES.value} NIfTI volumes (~{_VOLUME_SIZE.value}^2 x "
             f"{_VOLUME_SLICES.value}, mixed sizes)": work / "volumes" / "images",
             f"{_SLICES.value} PNG slices ({low}-{high} px, mixed sizes)":
                 work / "slices" / "images"}
  rows = []
  for name, folder in folders.items():
    count = len(list(folder.iterdir()))
    base = None
    for pipeline in stream.PIPELINES:
      wall, busy = _run(model, folder, work / "out" / pipeline, pipeline)
      rate = count / wall * 60
      base = base or rate
      rows.append(f"| {name} | {pipeline} | {wall:.2f} | {rate:.1f} | {rate / base:.2f} "
                  f"| {busy / wall:.0%} |")
    if _BEAM.value:
      wall, start_up = _run_beam(model, folder, work / "out" / "beam")
      cells = "within start-up noise | |"  # the work took less than start-up varies
      if wall > start_up:
        rate = count / (wall - start_up) * 60
        cells = f"{rate:.1f} | {rate / base:.2f} |"
      rows.append(f"| {name} | Beam DirectRunner (2 workers) | {wall:.2f} (start-up "
                  f"{start_up:.2f}) | {cells} n/a |")

  print(f"\nU-Net base_filters={_BASE_FILTERS.value} depth={_DEPTH.value} group norm, "
        f"untrained, image {_IMAGE_SIZE.value}; batch {_BATCH_SIZE.value}; "
        "postprocess on; "
        f"{os.cpu_count()} CPU cores, TF {tf.__version__}; streaming devices: "
        f"{stream.local_devices()}\n")
  print("| inputs | pipeline | wall s | inputs/min | ratio vs sequential | model busy |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  print("\n".join(rows))
  if _BEAM.value:
    print("\nBeam: inputs/min and ratio without the start-up (a run on one input); the "
          "model runs in the workers, so its busy time is not measured.")
  if _MEMORY_INPUTS.value:
    print("\n| streaming, tiny 64x64 PNG slices | peak Python heap MiB |")
    print("| --- | ---: |")
    for count in (int(v) for v in _MEMORY_INPUTS.value.split(",")):
      mb = _peak_heap_mb(model, work / f"memory{count}", count, work / "out" / "memory")
      print(f"| {count} inputs | {mb:.1f} |")
  if _WORK_DIR.value is None:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
