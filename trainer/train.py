"""train_and_evaluate(config): strategy, data, model, fit, checkpoints, resume.

`--model_dir` layout after a run:
  config.json     the TrainConfig (a rerun with other settings is refused)
  dataset.json    copy of the converter manifest (image_size, normalization, labels)
  best.keras      best model by whole-split val_mean_dice (last epoch's without a val split)
  history.json    one entry per completed epoch (loss, val Dice, input wait, images/s,
                  lr, seconds)
  checkpoints/    tf.train checkpoints (model, optimizer, epoch, best) for resume
  logs/           TensorBoard: train/, validation/ scalars, images/ prediction overlays
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import tempfile
from typing import Any

from data_prep import manifest as manifest_lib
from trainer import augment as augment_lib
from trainer import callbacks as callbacks_lib
from trainer import input_pipeline
from trainer import keras_workarounds
from trainer import losses
from trainer import unet

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
AUGMENT_ON = ("auto", "device", "host")
# Settings a resumed run may change; any other difference means another experiment.
# (augment_on moves the same augmentation between tf.data and the train step.)
_RESUMABLE_CHANGES = ("epochs", "strategy", "jit_compile", "verbose", "augment_on")
# Train splits whose decoded slices (float32 image + uint8 mask) fit in this many bytes
# are cached in memory after the first epoch: later epochs read and decode nothing.
_CACHE_BYTES = 1 << 30


class ConfigError(ValueError):
  """A user error in the settings or the data directory (reported without traceback)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every hyperparameter of a training run (built from flags in `trainer.main`)."""
  data_dir: str
  model_dir: str
  epochs: int = 30
  global_batch_size: int = 8
  learning_rate: float = 1e-3
  lr_schedule: str = "constant"
  optimizer: str = "adam"
  weight_decay: float = 1e-4          # adamw only
  loss: str = "dice"
  include_background: bool = False    # in the Dice loss
  base_filters: int = 32
  depth: int = 4
  dropout: float = 0.0
  norm: str = "batch"
  mixed_precision: str = "none"
  jit_compile: bool = False
  strategy: str = "auto"
  seed: int = 0
  augment: bool = True
  augment_on: str = "auto"            # device (train step), host (tf.data), auto: device
                                      # with a GPU/TPU, host on CPU only
  elastic_prob: float = 0.0           # share of slices elastically deformed (augment only)
  elastic_alpha: float = 10.0         # its largest displacement in pixels
  num_overlays: int = 4
  verbose: int = 1


def check_config(config: TrainConfig) -> None:
  """Refuses unknown enum values and impossible numbers.

  Raises:
    ConfigError: naming the setting, the value found and what is expected.
  """
  enums = {"strategy": STRATEGIES, "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES,
           "loss": losses.LOSSES, "norm": unet.NORMS, "mixed_precision": PRECISIONS,
           "augment_on": AUGMENT_ON}
  for name, allowed in enums.items():
    if getattr(config, name) not in allowed:
      raise ConfigError(f"--{name}={getattr(config, name)!r}: expected one of {allowed}")
  positive = ("epochs", "global_batch_size", "base_filters", "depth")
  for name in positive:
    if getattr(config, name) < 1:
      raise ConfigError(f"--{name}={getattr(config, name)}: expected a positive integer")
  if not config.learning_rate > 0:
    raise ConfigError(f"--learning_rate={config.learning_rate}: expected > 0")
  if not config.weight_decay >= 0:
    raise ConfigError(f"--weight_decay={config.weight_decay}: expected >= 0")
  if not 0 <= config.dropout < 1:
    raise ConfigError(f"--dropout={config.dropout}: expected 0 <= dropout < 1")
  if not 0 <= config.elastic_prob <= 1:
    raise ConfigError(f"--elastic_prob={config.elastic_prob}: expected 0 <= p <= 1")
  if not config.elastic_alpha >= 0:
    raise ConfigError(f"--elastic_alpha={config.elastic_alpha}: expected >= 0 pixels")
  if config.elastic_prob > 0 and not config.augment:
    raise ConfigError(f"--elastic_prob={config.elastic_prob} with --noaugment: the elastic "
                      "field is part of the augmentation; drop one of the two")


def load_data_manifest(config: TrainConfig) -> dict[str, Any]:
  """Loads and checks the converted dataset; ConfigError when it cannot be trained on."""
  try:
    manifest = manifest_lib.load(config.data_dir)
    input_pipeline.compression_type(manifest)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e
  train_files = manifest_lib.shard_paths(config.data_dir, manifest, "train")
  if not train_files:
    raise ConfigError(f"{manifest_lib.path_of(config.data_dir)}: the dataset has no train "
                      "shards; convert with a train split")
  missing = [f for f in (train_files + manifest_lib.shard_paths(config.data_dir, manifest,
                                                                  "val"))
             if not os.path.exists(f)]
  if missing:
    raise ConfigError(f"{config.data_dir}: shards listed in dataset.json are missing: "
                      f"{missing[:3]}")
  size, depth = manifest["image_size"], config.depth
  if size % 2**depth:
    raise ConfigError(f"--depth={depth}: image_size {size} of {config.data_dir} is not "
                      f"divisible by 2**depth={2**depth}")
  return manifest


def _check_model_dir(config: TrainConfig, manifest: dict[str, Any]) -> None:
  """Refuses to resume into a model_dir written with other settings or other data."""
  model_dir = pathlib.Path(config.model_dir)
  old_config = model_dir / "config.json"
  if old_config.exists():
    # Settings added after a model_dir was written count as their defaults.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    old = {**defaults, **json.loads(old_config.read_text())}
    new = dataclasses.asdict(config)
    differ = sorted(k for k in set(old) | set(new)
                    if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if differ:
      raise ConfigError(
          f"{old_config}: this model_dir was trained with other settings "
          f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in differ)}); "
          "use a new --model_dir")
  old_manifest = model_dir / "dataset.json"
  if old_manifest.exists() and json.loads(old_manifest.read_text()) != manifest:
    raise ConfigError(f"{old_manifest}: this model_dir was trained on another dataset "
                      f"than {config.data_dir}; use a new --model_dir")


def make_strategy(name: str):
  """The tf.distribute strategy for `name` ("auto" picks from TF_CONFIG and the GPUs)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  has_cluster = bool(os.environ.get("TF_CONFIG"))
  if name == "auto":
    if has_cluster:
      name = "multi_worker"
    else:
      name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "one_device"
  if name == "multi_worker":
    if not has_cluster:
      raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                        "(cluster spec and this task)")
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  gpus = tf.config.list_physical_devices("GPU")
  return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def _task(strategy) -> tuple[bool, int]:
  """(is_chief, task id) of this process."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True, 0
  task_type, task_id = resolver.task_type, resolver.task_id or 0
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  is_chief = task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)
  return is_chief, task_id


def _optimizer(config: TrainConfig, steps_per_epoch: int):
  import keras  # pylint: disable=g-import-not-at-top
  lr = config.learning_rate
  if config.lr_schedule == "cosine":
    lr = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=config.epochs * steps_per_epoch, alpha=0.01)
  if config.optimizer == "adamw":
    return keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
  return keras.optimizers.Adam(lr)


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
  """Trains (or resumes training) and returns a summary.

  Returns:
    {"epochs_completed", "initial_epoch", "best_val_mean_dice" (None without val),
     "history": list of per-epoch dicts}.

  Raises:
    ConfigError: contradictory settings, a bad data_dir or a mismatching model_dir.
  """
  check_config(config)
  manifest = load_data_manifest(config)
  _check_model_dir(config, manifest)
  # The strategy first: MultiWorkerMirroredStrategy must exist before other TF work.
  strategy = make_strategy(config.strategy)
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  replicas = strategy.num_replicas_in_sync
  if config.global_batch_size % replicas:
    raise ConfigError(f"--global_batch_size={config.global_batch_size} is not divisible by "
                      f"the {replicas} replicas of --strategy={config.strategy}")
  is_chief, task_id = _task(strategy)
  model_dir = pathlib.Path(config.model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  if is_chief:
    manifest_lib.write_json_atomic(model_dir / "config.json", dataclasses.asdict(config))
    manifest_lib.write_json_atomic(model_dir / "dataset.json", manifest)

  keras.utils.set_random_seed(config.seed)
  policy = "float32" if config.mixed_precision == "none" else config.mixed_precision
  keras.mixed_precision.set_global_policy(policy)

  image_size = manifest["image_size"]
  num_classes = int(manifest["num_classes"])
  compression = input_pipeline.compression_type(manifest)
  train_files = manifest_lib.shard_paths(config.data_dir, manifest, "train")
  val_files = manifest_lib.shard_paths(config.data_dir, manifest, "val")
  train_slices = int(manifest["splits"]["train"]["slices"])
  steps_per_epoch = max(1, math.ceil(train_slices / config.global_batch_size))

  with strategy.scope():
    model = unet.build_unet(num_classes=num_classes, base_filters=config.base_filters,
                            depth=config.depth, dropout=config.dropout, norm=config.norm)
    model.compile(optimizer=_optimizer(config, steps_per_epoch),
                  loss=losses.make_loss(config.loss, num_classes=num_classes,
                                        include_background=config.include_background),
                  jit_compile=config.jit_compile)
    model.optimizer.build(model.trainable_variables)
  epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
  best_var = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
  checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch_var,
                                   best_val_mean_dice=best_var)
  ckpt_dir = model_dir / "checkpoints"
  latest = tf.train.latest_checkpoint(str(ckpt_dir))
  if latest:
    checkpoint.restore(latest).assert_existing_objects_matched()
  initial_epoch = int(epoch_var.numpy())
  if latest:
    print(f"Resuming from {latest}: {initial_epoch} epochs completed", flush=True)
  # Non-chief workers save their (identical) state to a scratch dir: one writer per file.
  save_dir = str(ckpt_dir) if is_chief else tempfile.mkdtemp(prefix=f"ckpt-worker{task_id}-")
  manager = tf.train.CheckpointManager(checkpoint, save_dir, max_to_keep=2)

  wait = callbacks_lib.InputWait(batches_per_step=len(strategy.extended.worker_devices),
                                images_per_step=config.global_batch_size)
  augment = None
  if config.augment:
    augment = augment_lib.AugmentConfig(elastic_prob=config.elastic_prob,
                                        elastic_alpha=config.elastic_alpha)
  augment_on = config.augment_on
  if augment_on == "auto":
    # With an accelerator the step augments almost for free and tf.data only reads and
    # batches (bench/pipeline_bench.py: 18-23x the Python loader). On CPU only, both run on
    # the same cores; tf.data threads overlap the augmentation with the step instead.
    accelerated = any(d.device_type != "CPU" for d in tf.config.list_physical_devices())
    augment_on = "device" if accelerated else "host"
  if augment is not None and augment_on == "device":
    augment_lib.augment_in_train_step(model, augment, seed=config.seed)
    augment = None  # The pipeline only reads and batches.

  def train_fn(input_context):
    # Distinct per worker and per resumed run, so no example order is replayed.
    seed = config.seed + 1000 * input_context.input_pipeline_id + 7919 * initial_epoch
    return input_pipeline.make_dataset(
        train_files, image_size=image_size, compression=compression,
        global_batch_size=config.global_batch_size, training=True,
        input_context=input_context, augment=augment, seed=seed,
        cache=train_slices * image_size**2 * 5 <= _CACHE_BYTES,
        on_batch=wait.batch_ready)

  train_ds = strategy.distribute_datasets_from_function(train_fn)
  history_path = str(model_dir / "history.json")
  previous = callbacks_lib.read_history(history_path, initial_epoch) if is_chief else []
  best_path = str(model_dir / "best.keras") if is_chief else None
  cbs = []
  if val_files:
    val_ds = input_pipeline.make_dataset(
        val_files, image_size=image_size, compression=compression,
        global_batch_size=config.global_batch_size, training=False)
    cbs.append(callbacks_lib.SplitDice(
        val_ds, num_classes=num_classes, labels=manifest.get("labels", manifest_lib.LABELS),
        best_path=best_path, best_value=best_var,
        image_dir=str(model_dir / "logs" / "images") if is_chief else None,
        num_images=config.num_overlays))
  elif is_chief:
    cbs.append(callbacks_lib.SaveLastModel(str(model_dir / "best.keras")))
  cbs.append(wait)
  if is_chief:
    cbs.append(callbacks_lib.HistoryFile(history_path, previous, model.optimizer))
  cbs.append(callbacks_lib.Checkpoint(manager, epoch_var))
  if is_chief:
    cbs.append(callbacks_lib.TensorBoardScalars(str(model_dir / "logs")))
  keras_workarounds.apply(model, strategy, config.global_batch_size // replicas, image_size)
  if initial_epoch < config.epochs:
    model.fit(train_ds, epochs=config.epochs, initial_epoch=initial_epoch,
              steps_per_epoch=steps_per_epoch, callbacks=cbs, shuffle=False,
              verbose=config.verbose if is_chief else 0)
  else:
    print(f"Nothing to do: {initial_epoch} of --epochs={config.epochs} already completed",
          flush=True)
  history = callbacks_lib.read_history(history_path, config.epochs) if is_chief else []
  best = float(best_var.numpy())
  return {"epochs_completed": int(epoch_var.numpy()), "initial_epoch": initial_epoch,
          "best_val_mean_dice": best if val_files and best >= 0 else None,
          "history": history}
