"""Keras callbacks of the trainer: whole-split validation Dice, input wait, checkpoints,
and a stop at the first non-finite loss."""
from __future__ import annotations

import collections
import json
import math
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from tensorflow.core.framework import summary_pb2

from data_prep import fileio
from data_prep import metrics
from data_prep import overlay
from trainer import losses


class SplitDice(keras.callbacks.Callback):
  """Dice per class over the WHOLE validation split, after every epoch.

  Counts (`data_prep.metrics.tf_counts`, padding excluded) are summed over all batches
  before dividing, with the same `data_prep.metrics.dice` that `spine-evaluate` uses: the
  keys `metrics.KEYS` go to the epoch logs with a `val_` prefix (absent classes are
  printed as "absent" and not logged), and the model with the best `val_dice_mean` is
  saved. Validation runs the model in cross-replica context on one device of each worker:
  the split is small next to training, and every worker gets the same numbers without
  collectives.

  Several datasets (`dataset` a {name: val split} mapping): each split is scored on its
  own, logged as `val_<name>_<key>` and printed in a line of its own; `val_<key>` are
  the figures pooled over all splits (summed counts: `spine-evaluate` over their union),
  and the model is selected by `val_dice_mean_datasets` (`SELECTION_KEY`), the mean over
  datasets of each one's `dice_mean` (absent ones skipped), so a small dataset counts as
  much as a large one. A class a dataset does not annotate is absent from its figures.
  With protocol heads (`heads`: {name: head index}), each dataset is scored on its own
  protocol's head (`losses.head_logits`).
  """

  SELECTION_KEY = "dice_mean_datasets"

  def __init__(self, dataset: tf.data.Dataset | Mapping[str, tf.data.Dataset], *,
               num_classes: int, best_path: str | None, best_value: tf.Variable,
               image_dir: str | None = None, num_images: int = 4,
               heads: Mapping[str, int] | None = None):
    super().__init__()
    self._heads = heads
    self._several = isinstance(dataset, Mapping)
    self._datasets = dict(dataset) if self._several else {"": dataset}
    self._num_classes = num_classes
    self._best_path = best_path
    self._best = best_value
    self._writer = tf.summary.create_file_writer(image_dir) if image_dir else None
    self._num_images = num_images
    self._step = None

  def _counts(self, dataset: tf.data.Dataset, head: int | None = None):
    if self._step is None:
      model, num_classes = self.model, self._num_classes

      @tf.function
      def step(images, masks, head=None):
        logits = model(images, training=False)
        if head is not None:
          logits = losses.head_logits(logits, tf.fill(tf.shape(images)[:1], head),
                                      num_classes)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return metrics.tf_counts(masks[..., 0], predictions, num_classes), predictions

      self._step = step
    total = np.zeros((self._num_classes, 3), np.int64)
    shown = []
    args = () if head is None else (tf.constant(head, tf.int32),)
    for images, masks in dataset:
      counts, predictions = self._step(images, masks, *args)
      total += counts.numpy()
      if len(shown) < self._num_images:
        shown.append((images.numpy(), masks.numpy()[..., 0], predictions.numpy()))
    return total, shown

  def on_epoch_end(self, epoch, logs=None):
    logs = logs if logs is not None else {}
    pooled = np.zeros((self._num_classes, 3), np.int64)
    means = []
    for name, dataset in self._datasets.items():
      total, shown = self._counts(dataset, self._heads[name] if self._heads else None)
      pooled += total
      if self._several:
        summary = metrics.dice(total)
        self._log(logs, f"val_{name}_", summary)
        means.append(summary["dice_mean"])
        print(f"epoch {epoch + 1}: validation of {name}: {metrics.format_dice(summary)}",
              flush=True)
      if self._writer is not None and shown:
        tag = f"val_overlay_{name}" if self._several else "val_overlay"
        write_images(self._writer, tag, _overlays(shown, self._num_images), epoch + 1)
    summary = metrics.dice(pooled)
    self._log(logs, "val_", summary)
    if self._several:
      selected, key = metrics.mean_present(means), f"val_{self.SELECTION_KEY}"
      if selected != metrics.ABSENT:
        logs[key] = selected
      shown_mean = f"{selected:.4f}" if selected != metrics.ABSENT else selected
      print(f"epoch {epoch + 1}: validation pooled over {len(self._datasets)} datasets: "
            f"{metrics.format_dice(summary)}; {self.SELECTION_KEY} (mean of their "
            f"dice_mean) {shown_mean}", flush=True)
    else:
      selected, key = summary["dice_mean"], "val_dice_mean"
      print(f"epoch {epoch + 1}: validation over the whole split: "
            f"{metrics.format_dice(summary)}", flush=True)
    if selected != metrics.ABSENT and selected > float(self._best.numpy()):
      self._best.assign(selected)
      if self._best_path:
        _save_model(self.model, self._best_path)
        print(f"epoch {epoch + 1}: new best {key} {selected:.4f}, "
              f"saved {self._best_path}", flush=True)

  @staticmethod
  def _log(logs, prefix: str, summary) -> None:
    for key, value in summary.items():
      if value != metrics.ABSENT:
        logs[f"{prefix}{key}"] = value

  def on_train_end(self, logs=None):
    if self._writer is not None:
      self._writer.close()


def _metadata(plugin: str) -> bytes:
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
  ).SerializeToString()


def write_images(writer, tag: str, images: np.ndarray, step: int) -> None:
  """Writes uint8 [K, H, W, 3] images, all K of them, as one TensorBoard image summary."""
  with writer.as_default():
    tf.summary.image(tag, images, step=step, max_outputs=len(images))
  writer.flush()


class TensorBoardScalars(keras.callbacks.Callback):
  """Epoch logs as TensorBoard scalars: `train/` and `validation/` (keys with val_).

  Written with `tf.summary.write` and the scalars-plugin metadata, so no `tensorboard`
  package is needed to produce them (only to view them).
  """

  def __init__(self, log_dir: str):
    super().__init__()
    self._writers = {name: tf.summary.create_file_writer(os.path.join(log_dir, name))
                     for name in ("train", "validation")}

  def on_epoch_end(self, epoch, logs=None):
    for key, value in (logs or {}).items():
      name = "validation" if key.startswith("val_") else "train"
      tag = "epoch_" + (key[4:] if name == "validation" else key)
      try:
        value = float(value)
      except (TypeError, ValueError):
        continue
      with self._writers[name].as_default():
        tf.summary.write(tag, tf.constant(value, tf.float32), step=epoch + 1,
                         metadata=_metadata("scalars"))
    for writer in self._writers.values():
      writer.flush()

  def on_train_end(self, logs=None):
    # Closed here, not by garbage collection at interpreter exit (no TF resource is left
    # to finalize then).
    for writer in self._writers.values():
      writer.close()


def _overlays(shown, limit):
  """Image | truth overlay | prediction overlay (`data_prep.overlay`), uint8 [K, H, 3W, 3]."""
  rows = []
  for images, truth, pred in shown:
    for image, t, p in zip(images, truth, pred):
      rows.append(overlay.side_by_side(image[..., 0], t, p))
      if len(rows) == limit:
        return np.stack(rows)
  return np.stack(rows)


def _save_model(model: keras.Model, path: str) -> None:
  """model.save through `fileio.atomic_write`: a kill mid-save leaves the old file."""
  fileio.atomic_write(path, model.save)


class SaveLastModel(keras.callbacks.Callback):
  """Saves the model after every epoch (used as `best.keras` when there is no val split)."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def on_epoch_end(self, epoch, logs=None):
    _save_model(self.model, self._path)


class InputWait(keras.callbacks.Callback):
  """Training throughput and how much of each step was spent waiting for input.

  The pipeline calls `batch_ready()` when a batch leaves it (before prefetch). A step
  that begins before its batch was ready waited `ready - begin`; the epoch's figure is
  the summed wait over the summed step time. `batches_per_step` is the number of
  per-replica batches one step takes from this worker's pipeline. `clock` (seconds) is
  injectable so tests can feed exact timestamps.
  With `images_per_step` (the global batch), the epoch also logs `images_per_second`:
  images over the time from its first step's begin to its last step's end (callbacks
  between epochs, checkpoints and validation excluded; Keras waits for each step's
  result before `on_train_batch_end`, so this is device time, not dispatch time).
  """

  def __init__(self, batches_per_step: int = 1, images_per_step: int | None = None,
               clock: Callable[[], float] = time.perf_counter):
    super().__init__()
    self._clock = clock
    self._per_step = batches_per_step
    self._images_per_step = images_per_step
    self._ready = collections.deque()
    self._lock = threading.Lock()
    self._begin = 0.0
    self._wait = 0.0
    self._total = 0.0
    self._first = None
    self._last = 0.0
    self._steps = 0

  def batch_ready(self) -> None:
    with self._lock:
      self._ready.append(self._clock())

  def on_epoch_begin(self, epoch, logs=None):
    self._wait = 0.0
    self._total = 0.0
    self._first = None
    self._steps = 0

  def on_train_batch_begin(self, batch, logs=None):
    self._begin = self._clock()
    if self._first is None:
      self._first = self._begin

  def on_train_batch_end(self, batch, logs=None):
    end = self._clock()
    ready = None
    with self._lock:
      for _ in range(self._per_step):
        if self._ready:
          ready = self._ready.popleft()
    if ready is not None:
      self._wait += min(max(0.0, ready - self._begin), end - self._begin)
    self._total += end - self._begin
    self._last = end
    self._steps += 1

  def on_epoch_end(self, epoch, logs=None):
    fraction = self._wait / self._total if self._total > 0 else 0.0
    rate = ""
    if logs is not None:
      logs["input_wait_fraction"] = fraction
    if self._images_per_step and self._first is not None and self._last > self._first:
      images_per_second = self._steps * self._images_per_step / (self._last - self._first)
      rate = f"{images_per_second:.1f} images/s, "
      if logs is not None:
        logs["images_per_second"] = images_per_second
    print(f"epoch {epoch + 1}: {rate}{100 * fraction:.1f}% of step time waiting for input"
          f"{' (input-bound: the accelerator starves)' if fraction > 0.1 else ''}",
          flush=True)


class NonFiniteLoss(RuntimeError):
  """The training loss became NaN or infinite (the message names epoch and step)."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
  """Raises `NonFiniteLoss` after the first training step whose loss is not finite.

  Raising, not `stop_training` (Keras' TerminateOnNaN): after `stop_training` Keras still
  runs `on_epoch_end`, and the checkpoint and history would record the broken epoch; an
  exception skips every epoch-end callback, so the model_dir keeps the last good epoch.
  `logs["loss"]` is the running mean of the epoch's step losses, which turns non-finite
  at the first non-finite step and stays so.
  """

  def __init__(self):
    super().__init__()
    self._epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      raise NonFiniteLoss(f"epoch {self._epoch + 1}, step {batch + 1}: the training loss "
                          f"is {float(loss)}")


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved (full disk, read-only folder, ...); the message names
  the folder, the reason and the checkpoint that a rerun resumes from."""


class Checkpoint(keras.callbacks.Callback):
  """Saves model, optimizer, completed epoch count and best Dice after every epoch.

  `tf.train.CheckpointManager` writes the files first (under `ckpt-N_temp/`, renamed when
  complete) and the `checkpoint` index last, so a `kill -9` or a failure mid-save leaves
  the previous checkpoint as the latest; a failed save raises `CheckpointError`.
  """

  def __init__(self, manager: tf.train.CheckpointManager, epoch: tf.Variable):
    super().__init__()
    self._manager = manager
    self._epoch = epoch

  def on_epoch_end(self, epoch, logs=None):
    self._epoch.assign(epoch + 1)
    try:
      self._manager.save(checkpoint_number=epoch + 1)
    except (tf.errors.OpError, OSError) as e:
      # A full disk surfaces as ResourceExhaustedError from the SaveV2 op.
      kept = self._manager.latest_checkpoint
      resume = (f"a rerun of the same command resumes from {os.path.basename(kept)}"
                if kept else "no checkpoint was saved before it: a rerun starts afresh")
      raise CheckpointError(f"{self._manager.directory}: cannot save the checkpoint of "
                            f"epoch {epoch + 1}: {_save_failure(e)}; {resume}") from None


def _save_failure(error: BaseException) -> str:
  """The reason of a failed save in the OS's words where there are some ("No space left on
  device"), without TF's function-node prefix, temporary file name and op suffix."""
  if isinstance(error, OSError):
    return error.strerror or str(error)
  lines = (error.message or "").strip().splitlines() or [type(error).__name__]
  text = re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:\w+\]$", "", lines[0])
  where, semicolon, reason = text.rpartition("; ")
  return reason if semicolon and "/" in where else text


class HistoryFile(keras.callbacks.Callback):
  """Appends each epoch's logs to `history.json` (entries from a resumed run are kept)."""

  def __init__(self, path: str, previous: list[dict[str, Any]], optimizer):
    super().__init__()
    self._path = path
    self._entries = list(previous)
    self._optimizer = optimizer
    self._start = 0.0

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    entry = {"epoch": epoch + 1, "seconds": time.perf_counter() - self._start,
             "learning_rate": float(np.asarray(self._optimizer.learning_rate))}
    for key, value in (logs or {}).items():
      try:
        entry[key] = float(value)
      except (TypeError, ValueError):
        pass
    self._entries.append(entry)
    fileio.write_json_atomic(self._path, self._entries)


def read_history(path: str, completed_epochs: int) -> list[dict[str, Any]]:
  """Entries of an earlier run's history.json for the epochs a checkpoint holds."""
  if not fileio.path(path).exists():
    return []
  try:
    entries = json.loads(fileio.path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    print(f"warning: {path}: unreadable ({e}); starting a new history", file=sys.stderr)
    return []
  return [e for e in entries if e.get("epoch", 0) <= completed_epochs]
