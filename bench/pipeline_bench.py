"""Input pipeline and training-feed benchmark, printed as one table.

  python bench/pipeline_bench.py            # ~4-5 minutes on 2 CPU cores

Measures, on the same synthetic 256x256 slices:
  * a plain Python loader reading PNG + .npy files one by one (the original approach:
    PIL decode, float32 / 255, np.load of the int64 mask, np.stack into batches),
  * `trainer.input_pipeline.make_dataset` without augmentation, not cached and cached
    (spine-train caches train splits up to 1 GiB; cached and unaugmented is what feeds
    --augment_on=device), and cached with host-side augmentation (--augment_on=host),
  * training steps/s of a small U-Net fed from one batch held in memory (the ceiling:
    no input or augmentation work at all) versus fed by the pipeline with the
    augmentation in the train step (device) or in tf.data (host),
  * the share of step time spent waiting for input (`trainer.callbacks.InputWait`, as
    spine-train logs it) with host augmentation in this process's tf.data versus on a
    tf.data service (`--data_service`): a dispatcher and 2 workers started in this same
    process (`trainer.data_service_lib.start`), so on one machine they share its cores
    and the rows show the service's overhead; its gain needs workers on other machines.
Goals (issue 3): the pipeline >= 10x the Python loader; pipeline-fed training
>= 0.95 of the ceiling. On a CPU-only machine "device" is that same CPU, so the device
rows there include the augmentation's compute in every step.
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
from trainer import callbacks
from trainer import data_service_lib
from trainer import input_pipeline
from trainer import losses
from trainer import unet

_SLICES = flags.DEFINE_integer("slices", 96, help="Distinct synthetic slices written.")
_SIZE = flags.DEFINE_integer("image_size", 256, help="Side of the square slices.")
_BATCH = flags.DEFINE_integer("batch", 8, help="Batch size of pipeline and training.")
_READ = flags.DEFINE_integer("pipeline_slices", 1536, help="Slices read per pipeline run.")
_STEPS = flags.DEFINE_integer("train_steps", 30,
                              help="Timed training steps per feed, over all rounds.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, help="Training rounds; the best is reported.")
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


def pipeline_rate(files, size, batch, slices, augment, cache=False) -> float:
  """Slices/s drawn from `make_dataset` (after a warm-up pass over the data)."""
  ds = input_pipeline.make_dataset(
      files, image_size=size, compression="", global_batch_size=batch,
      training=input_pipeline.TrainingOptions(augment=augment, seed=0, cache=cache))
  it = iter(ds)
  for _ in range(_SLICES.value // batch + 3):  # Warm-up: fill buffers, trace, cache.
    next(it)
  steps = slices // batch
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - start)


def trainer(ds, augment=None):
  """A `model.fit` on ds, warmed up; returns steps -> steps/s. augment: in the train step."""
  model = unet.build_unet(base_filters=_FILTERS.value, depth=4)
  model.compile(optimizer="adam", loss=losses.make_loss("dice_ce", num_classes=3),
                jit_compile=False)
  if augment is not None:
    augment_lib.augment_in_train_step(model, augment, seed=0)
  model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # Trace and warm up.

  def rate(steps):
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps / (time.perf_counter() - start)

  return rate


def train_rates(feeds: dict, steps: int, rounds: int) -> dict:
  """Best steps/s of each feed over rounds taken in turn, so that a load change on a
  shared machine hits every feed alike rather than whichever ran last."""
  rates = {name: trainer(*args) for name, args in feeds.items()}
  best = dict.fromkeys(feeds, 0.0)
  for _ in range(rounds):
    for name, rate in rates.items():
      best[name] = max(best[name], rate(max(1, steps // rounds)))
  return best


def input_wait(make_feed, steps: int) -> float:
  """Share of step time waiting for input in the second of two `steps`-step epochs (the
  first traces and fills buffers); make_feed(on_batch) builds the dataset. One fit: a
  second one would open a new iterator while the callback still holds the first one's
  prefetched batches."""
  wait = callbacks.InputWait()
  model = unet.build_unet(base_filters=_FILTERS.value, depth=4)
  model.compile(optimizer="adam", loss=losses.make_loss("dice_ce", num_classes=3))
  history = model.fit(make_feed(wait.batch_ready), steps_per_epoch=steps, epochs=2,
                      verbose=0, callbacks=[wait])
  return history.history["input_wait_fraction"][1]


def main(argv):
  del argv
  size, batch, config = _SIZE.value, _BATCH.value, augment_lib.AugmentConfig()
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    files = write_data(root, _SLICES.value, size)
    loader = python_loader(root, _SLICES.value, batch)
    plain = pipeline_rate(files, size, batch, _READ.value, None)
    cached = pipeline_rate(files, size, batch, _READ.value, None, cache=True)
    host = pipeline_rate(files, size, batch, _READ.value, config, cache=True)

    def feed(augment):
      return input_pipeline.make_dataset(
          files, image_size=size, compression="", global_batch_size=batch,
          training=input_pipeline.TrainingOptions(augment=augment, seed=0, cache=True))

    one = next(iter(feed(None)))
    rates = train_rates({"ceiling": (tf.data.Dataset.from_tensors(one).repeat(),),
                         "device": (feed(None), config), "host": (feed(config),)},
                        _STEPS.value, _ROUNDS.value)
    ceiling, device_fed, host_fed = rates["ceiling"], rates["device"], rates["host"]
    service = data_service_lib.start(workers=2)
    try:
      common = dict(image_size=size, compression="", global_batch_size=batch)
      local = input_pipeline.TrainingOptions(augment=config, seed=0, cache=True)
      remote = input_pipeline.TrainingOptions(augment=config, seed=0,
                                              data_service=service.address)
      local_wait = input_wait(lambda mark: input_pipeline.make_dataset(
          files, training=local, on_batch=mark, **common), _STEPS.value)
      service_wait = input_wait(lambda mark: input_pipeline.make_dataset(
          files, training=remote, on_batch=mark, **common), _STEPS.value)
    finally:
      service.stop()
  print(f"\npipeline_bench: {_SLICES.value} slices {size}x{size}, batch {batch}, "
        f"{os.cpu_count()} CPU cores, TF {tf.__version__}, load average "
        f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}")
  print("| feed | rate | ratio |")
  print("| --- | ---: | ---: |")
  rows = [
      ("Python loader (PIL PNG decode, /255, np.load .npy, np.stack; one by one)",
       loader, "slices/s", loader),
      ("tf.data pipeline, no augmentation, not cached (first epoch; splits > 1 GiB)",
       plain, "slices/s", loader),
      ("tf.data pipeline, no augmentation, cached: what feeds --augment_on=device", cached,
       "slices/s", loader),
      ("tf.data pipeline, cached, host augmentation (--augment_on=host)", host, "slices/s",
       loader),
      (f"U-Net (base {_FILTERS.value}) training, one in-memory batch, no augmentation "
       "(ceiling)", ceiling, "steps/s", ceiling),
      ("U-Net training, pipeline + augmentation in the train step (device)", device_fed,
       "steps/s", ceiling),
      ("U-Net training, pipeline with host augmentation", host_fed, "steps/s", ceiling),
  ]
  rows += [
      ("U-Net training, host augmentation: step time waiting for input", local_wait,
       "share", local_wait),
      ("U-Net training, host augmentation on a tf.data service (--data_service; "
       "dispatcher + 2 workers in this process): step time waiting for input",
       service_wait, "share", local_wait),
  ]
  for name, rate, unit, base in rows:
    if unit == "share":
      print(f"| {name} | {100 * rate:.1f}% | {f'{rate / base:.2f}' if base else '-'} |")
      continue
    print(f"| {name} | {rate:.{0 if unit == 'slices/s' else 2}f} {unit} | "
          f"{rate / base:.2f} |")


if __name__ == "__main__":
  app.run(main)
