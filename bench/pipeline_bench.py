"""Input pipeline and training-feed benchmark, printed as one table.

  python bench/pipeline_bench.py            # ~2-3 minutes on 2 CPU cores

Measures, on the same synthetic 256x256 slices:
  * a plain Python loader reading PNG + .npy files one by one (the original approach),
  * `trainer.input_pipeline.make_dataset` without and with augmentation (slices/s),
  * training steps/s of a small U-Net fed by the pipeline (augmented) versus fed from
    one batch held in memory (the ceiling: no input work at all).
Goals (issue 3): augmented pipeline >= 10x the Python loader; pipeline-fed training
>= 0.95 of the ceiling.
"""
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app
from absl import flags
from PIL import Image

import tensorflow as tf  # pylint: disable=g-import-not-at-top

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from data_prep import schema  # pylint: disable=g-import-not-at-top
from trainer import augment as augment_lib
from trainer import input_pipeline
from trainer import losses
from trainer import unet

_SLICES = flags.DEFINE_integer("slices", 96, help="Distinct synthetic slices written.")
_SIZE = flags.DEFINE_integer("image_size", 256, help="Side of the square slices.")
_BATCH = flags.DEFINE_integer("batch", 8, help="Batch size of pipeline and training.")
_READ = flags.DEFINE_integer("pipeline_slices", 1536, help="Slices read per pipeline run.")
_STEPS = flags.DEFINE_integer("train_steps", 15, help="Timed training steps per feed.")
_FILTERS = flags.DEFINE_integer("base_filters", 8, help="U-Net width for the training rows.")


def write_data(root: pathlib.Path, count: int, size: int) -> list[str]:
  """Synthetic slices as PNG + .npy (raw) and as 4 TFRecord shards; returns the shards."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir()
  (root / "masks").mkdir()
  geometry = schema.Geometry(size, size, size, size, 0, 0)
  writers = [tf.io.TFRecordWriter(str(root / schema.shard_name("train", i, 4)))
             for i in range(4)]
  for i in range(count):
    image = np.clip(rng.normal(90, 40, (size, size)), 0, 255).astype(np.uint8)
    mask = rng.integers(0, 3, (size, size)).astype(np.int64)
    Image.fromarray(image).save(root / "images" / f"{i}.png")
    np.save(root / "masks" / f"{i}.npy", mask)
    example = schema.make_example(image / 255.0, mask, case_id=str(i), slice_index=0,
                                  source=f"{i}.png", geometry=geometry, spacing=[1, 1],
                                  norm_method="divide255", norm_offset=0, norm_scale=255)
    writers[i % 4].write(example.SerializeToString())
  for w in writers:
    w.close()
  return [str(root / schema.shard_name("train", i, 4)) for i in range(4)]


def python_loader(root: pathlib.Path, count: int, batch: int, passes: int = 2) -> float:
  """Slices/s of the one-by-one loader: PNG decode, /255, np.load, batch with np.stack."""
  start = time.perf_counter()
  done = 0
  for _ in range(passes):
    images, masks = [], []
    for i in range(count):
      images.append(np.asarray(Image.open(root / "images" / f"{i}.png"), np.float32) / 255)
      masks.append(np.load(root / "masks" / f"{i}.npy"))
      if len(images) == batch:
        np.stack(images)[..., None], np.stack(masks)[..., None]
        images, masks = [], []
        done += batch
  return done / (time.perf_counter() - start)


def pipeline_rate(files, size, batch, slices, augment) -> float:
  ds = input_pipeline.make_dataset(files, image_size=size, compression="",
                                   global_batch_size=batch, training=True,
                                   augment=augment, seed=0)
  it = iter(ds)
  for _ in range(3):  # Warm-up: fill buffers, trace functions.
    next(it)
  steps = slices // batch
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - start)


def train_rate(ds, size, steps) -> float:
  model = unet.build_unet(base_filters=_FILTERS.value, depth=4)
  model.compile(optimizer="adam", loss=losses.make_loss("dice_ce", num_classes=3),
                jit_compile=False)
  model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # Trace and warm up.
  start = time.perf_counter()
  model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
  return steps / (time.perf_counter() - start)


def main(argv):
  del argv
  size, batch = _SIZE.value, _BATCH.value
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    files = write_data(root, _SLICES.value, size)
    loader = python_loader(root, _SLICES.value, batch)
    plain = pipeline_rate(files, size, batch, _READ.value, None)
    augmented = pipeline_rate(files, size, batch, _READ.value, augment_lib.AugmentConfig())
    fed = input_pipeline.make_dataset(files, image_size=size, compression="",
                                      global_batch_size=batch, training=True,
                                      augment=augment_lib.AugmentConfig(), seed=0)
    one = next(iter(fed))
    ceiling_ds = tf.data.Dataset.from_tensors(one).repeat()
    ceiling = train_rate(ceiling_ds, size, _STEPS.value)
    piped = train_rate(fed, size, _STEPS.value)
  cores = os.cpu_count()
  print(f"\npipeline_bench: {_SLICES.value} slices {size}x{size}, batch {batch}, "
        f"{cores} CPU cores, TF {tf.__version__}")
  print("| feed | rate | ratio |")
  print("| --- | ---: | ---: |")
  print(f"| Python loader (PNG + .npy, one by one) | {loader:.0f} slices/s | 1.00 |")
  print(f"| tf.data pipeline, no augmentation | {plain:.0f} slices/s | {plain / loader:.2f} |")
  print(f"| tf.data pipeline, augmented | {augmented:.0f} slices/s | "
        f"{augmented / loader:.2f} |")
  print(f"| U-Net (base {_FILTERS.value}) training, in-memory batch (ceiling) | "
        f"{ceiling:.2f} steps/s | 1.00 |")
  print(f"| U-Net training fed by the augmented pipeline | {piped:.2f} steps/s | "
        f"{piped / ceiling:.2f} |")


if __name__ == "__main__":
  app.run(main)
