r"""Benchmark of spine-convert: throughput, memory bound, and the on-disk image encoding.

Generates phantom 2D slices (data_prep.phantom), then
  1. converts N slices with 1 worker and with all cores, letting the library choose
     ("auto": small jobs stay in the parent) and forcing the worker pool ("pool"); wall
     clock includes the start-up of the "spawn" workers, each of which imports TensorFlow;
     and the same conversions as an Apache Beam pipeline ("beam": spine-convert
     --runner=DirectRunner -- --direct_num_workers=2 --direct_running_mode=multi_processing),
     whose shards must be the local ones byte for byte;
  2. converts N/4 and N slices and reports the peak RSS of the parent and of the largest
     worker process (memory must not grow with the dataset);
  3. splits one case's work into read+normalize+fit versus building+serializing the
     tf.Example (why examples are built in the workers, not in the parent);
  4. compares raw float32 bytes with 16-bit PNG for a stored image: bytes per slice and
     decode rate in tf.data (backs the encoding comment in data_prep/schema.py).

  .venv/bin/python bench/convert_bench.py            # ~2-3 minutes on 2 cores
  .venv/bin/python bench/convert_bench.py --num_slices=480 --image_size=128
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zlib

from absl import app, flags

_NUM_SLICES = flags.DEFINE_integer("num_slices", 240, help="Slices of the large dataset.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, help="--image_size of the conversion.")
_WORK_DIR = flags.DEFINE_string("work_dir", None, help="Scratch folder (default: a temp dir).")

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs one conversion in a fresh interpreter so that its peak RSS is its own.
_CHILD = r"""
import json, resource, sys, time
from data_prep import writer
src, out, workers, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if sys.argv[5] == "pool":  # start the worker pool whatever the job size
  writer._WORKER_START_S = 0.0
engine = {"num_workers": workers}
if sys.argv[5] == "beam":  # the DirectRunner's worker processes instead of ours
  engine = {"runner": "DirectRunner", "beam_args": [
      f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing",
      "--prism_location=/nonexistent/prism"]}  # not Prism: see README, Scaling out
t = time.perf_counter()
m = writer.convert_dataset(src + "/images", src + "/masks", out,
                           writer.ConvertOptions(required_labels=[], image_size=size,
                                                 **engine),
                           progress=False)
elapsed = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "slices": m["totals"]["slices_written"],
                  "parent_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}))
"""


def _convert(src: pathlib.Path, out: pathlib.Path, workers: int, size: int,
             mode: str) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(_REPO))
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), str(workers),
                         str(size), mode], capture_output=True, text=True, env=env,
                        check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["shard_mb"] = sum(p.stat().st_size for p in out.glob("*.tfrecord")) / 2 ** 20
  return result


def _shards(out: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(out.glob("*.tfrecord"))}


def _split_costs(src: pathlib.Path, size: int, n: int = 20) -> tuple[float, float]:
  """ms per slice for read+normalize+fit, and for make_example+serialize."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from data_prep import preprocess, readers, schema  # pylint: disable=g-import-not-at-top
  pairs = readers.pair_files(src / "images", src / "masks")[0][:n]
  prep = build = 0.0
  for _, image_path, mask_path in pairs:
    t0 = time.perf_counter()
    case = readers.read_case(image_path, mask_path)
    off, scale = preprocess.normalization_params(case.image, "percentile")
    geo = preprocess.fit_geometry(*case.image.shape[1:], size)
    image = preprocess.fit_image(preprocess.apply_normalization(
        case.image[0], "percentile", off, scale), geo, size, 0.0)
    mask = preprocess.fit_mask(case.mask[0], geo, size)
    t1 = time.perf_counter()
    schema.make_example(image, mask.astype(np.uint8), case_id=case.case_id, slice_index=0,
                        source=image_path, geometry=geo, spacing=case.spacing,
                        norm_method="percentile", norm_offset=off, norm_scale=scale
                        ).SerializeToString(deterministic=True)
    prep += t1 - t0
    build += time.perf_counter() - t1
  return 1000 * prep / len(pairs), 1000 * build / len(pairs)


def _encodings(src: pathlib.Path, size: int, n: int = 64) -> list[tuple]:
  """(encoding, KiB per image, decodes/s) for raw float32, gzip'd raw, and PNG-16."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_prep import preprocess, readers  # pylint: disable=g-import-not-at-top
  images = []
  for _, image_path, mask_path in readers.pair_files(src / "images", src / "masks")[0][:n]:
    case = readers.read_case(image_path, mask_path)
    off, scale = preprocess.normalization_params(case.image, "percentile")
    geo = preprocess.fit_geometry(*case.image.shape[1:], size)
    images.append(preprocess.fit_image(preprocess.apply_normalization(
        case.image[0], "percentile", off, scale), geo, size, 0.0))
  raw = [im.astype("<f4").tobytes() for im in images]
  # PNG needs integers: quantize [0, 1] to 16 bits (a precision loss raw bytes avoid).
  png = [tf.io.encode_png((np.clip(im, 0, 1) * 65535).astype(np.uint16)[..., None]).numpy()
         for im in images]

  def rate(blobs, decode, repeats=20):
    ds = tf.data.Dataset.from_tensor_slices(blobs).repeat(repeats).map(decode).batch(32)
    for _ in ds.take(1):  # warm up tracing
      pass
    t = time.perf_counter()
    count = sum(int(b.shape[0]) for b in ds)
    return count / (time.perf_counter() - t)

  raw_rate = rate(raw, lambda b: tf.reshape(tf.io.decode_raw(b, tf.float32), [size, size]))
  png_rate = rate(png, lambda b: tf.cast(tf.io.decode_png(b, dtype=tf.uint16), tf.float32)
                  / 65535.0)
  gz = [zlib.compress(b, 6) for b in raw]
  gz_rate = rate(gz, lambda b: tf.reshape(tf.io.decode_raw(
      tf.io.decode_compressed(b, "ZLIB"), tf.float32), [size, size]))

  def kib(blobs):
    return sum(len(b) for b in blobs) / len(blobs) / 1024

  return [("raw float32", kib(raw), raw_rate), ("raw float32 + zlib", kib(gz), gz_rate),
          ("PNG uint16 (quantized)", kib(png), png_rate)]


def main(argv: list[str]) -> None:
  del argv
  from data_prep import phantom  # pylint: disable=g-import-not-at-top
  n, size, cores = _NUM_SLICES.value, _IMAGE_SIZE.value, os.cpu_count() or 1
  work = pathlib.Path(_WORK_DIR.value or tempfile.mkdtemp(prefix="convert_bench_"))
  small, large = work / "small", work / "large"
  phantom.write_2d_dataset(small, max(n // 4, 1), seed=0, overwrite=True)
  phantom.write_2d_dataset(large, n, seed=0, overwrite=True)
  # mode "auto": the library decides whether the pool pays off; "pool": always start it;
  # "beam": Beam's DirectRunner with 2 worker processes.
  runs = [("large", large, 1, "auto"), ("large", large, cores, "auto"),
          ("large", large, cores, "pool"), ("large", large, 2, "beam"),
          ("small", small, 1, "auto"), ("small", small, cores, "pool"),
          ("small", small, 2, "beam")]
  print(f"spine-convert on phantom slices (192..320 px) -> {size} px, {cores} cores")
  print(f"{'dataset':>8} {'slices':>6} {'workers':>7} {'mode':>5} {'seconds':>8} "
        f"{'slices/s':>9} {'parent MB':>9} {'worker MB':>9} {'shards MB':>9}")
  results = {}
  for name, src, workers, mode in runs:
    r = _convert(src, work / f"out_{name}_{workers}_{mode}", workers, size, mode)
    results[(name, workers, mode)] = r
    print(f"{name:>8} {r['slices']:>6} {workers:>7} {mode:>5} {r['seconds']:>8.1f} "
          f"{r['slices'] / r['seconds']:>9.1f} {r['parent_mb']:>9.0f} "
          f"{r['worker_mb'] if mode in ('pool', 'beam') else '-':>9} {r['shard_mb']:>9.1f}")
  one, many = results[("large", 1, "auto")], results[("large", cores, "pool")]
  print(f"speed-up of a {cores}-worker pool over 1 worker: "
        f"{one['seconds'] / many['seconds']:.2f}x (pool start-up included)")
  beam = results[("large", 2, "beam")]
  same = all(_shards(work / f"out_{name}_2_beam") == _shards(work / f"out_{name}_1_auto")
             for name in ("large", "small"))
  print(f"Beam DirectRunner (2 workers) over the local converter (1 worker): "
        f"{one['seconds'] / beam['seconds']:.2f}x; shards byte-identical: "
        f"{'yes' if same else 'NO'}")
  prep_ms, build_ms = _split_costs(large, size)
  print(f"\nper slice: read+normalize+fit {prep_ms:.1f} ms, make_example+serialize "
        f"{build_ms:.1f} ms ({100 * build_ms / (prep_ms + build_ms):.0f}% of the work, "
        "done in the workers)")
  print(f"\nstored image encoding at {size} px (64 phantom slices):")
  print(f"{'encoding':>24} {'KiB/image':>10} {'decodes/s':>10}")
  for name, kib, rate in _encodings(large, size):
    print(f"{name:>24} {kib:>10.1f} {rate:>10.0f}")


if __name__ == "__main__":
  app.run(main)
