"""train_and_evaluate(config): strategy, data, model, fit, checkpoints, resume.

`--model_dir` layout after a run:
  config.json     the whole TrainConfig (a rerun with other settings is refused)
  dataset.json    copy of the converter manifest (image_size, normalization, labels); with
                  several --data_dir folders, the first one's (they share image_size and
                  normalization, all export needs)
  datasets.json   several folders only: {"datasets": [{"name", "data_dir", "manifest"}],
                  "protocols": the model's protocol heads, sorted (see below)}
  best.keras      best model by whole-split val_dice_mean (last epoch's without a val split;
                  with several folders by val_dice_mean_datasets, the mean over folders)
  history.json    one entry per completed epoch (loss, val Dice, input wait, images/s,
                  lr, seconds)
  checkpoints/    tf.train checkpoints (model, optimizer, epoch, best) for resume
  logs/           TensorBoard: train/, validation/ scalars, images/ prediction overlays
  .lock           flock'ed by the running chief (its pid and host inside): one run per dir

Labelling protocols: the folders' manifests name the protocol their masks follow
(`spine-convert --protocol`). One protocol over all folders: the one-head model of a
single protocol, nothing else changes. Several: one shared body and one output head per
protocol, sorted by name (`unet.build_unet(protocols=...)`); each training slice is scored
on its own protocol's head only (still marginal over the classes its folder does not
annotate), and each folder is validated on its own head. Folders of one named protocol
must annotate the same classes with the same label map (folders converted without
--protocol share the default one, whatever each annotates, as before).

Faults end the run with a `ConfigError` (settings, data, model_dir: before training) or a
`TrainingError` (a non-finite loss, a shard that cannot be read), each one line naming
what to fix; the model_dir then holds the last good epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

from data_prep import fileio
from data_prep import manifest as manifest_lib
from data_prep import schema
from trainer import augment as augment_lib
from trainer import data_service_lib
from trainer import init_from as init_lib
from trainer import run_dir
from trainer import callbacks as callbacks_lib
from trainer import input_pipeline
from trainer import keras_workarounds
from trainer import losses
from trainer import unet
# The settings live in trainer.config; re-exported because callers know them as train.*.
from trainer.config import (AUGMENT_ON, LR_SCHEDULES, OPTIMIZERS, PRECISIONS,  # pylint: disable=unused-import
                            STRATEGIES, ConfigError, TrainConfig, augment_config,
                            check_config, data_dirs, dataset_weights,
                            with_absolute_paths)

# Shards are hashed at start up to this many bytes (about a second per GiB from a page
# cache); bigger datasets are checked only when reading one fails.
_VERIFY_BYTES = 1 << 30

class TrainingError(RuntimeError):
  """A run stopped by a fault the user must act on: a non-finite loss, unreadable data."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One converted dataset of a run: its folder, its name in logs, its manifest."""
  data_dir: str
  name: str
  manifest: manifest_lib.Manifest

  def files(self, split: str) -> list[str]:
    return self.manifest.files(split)

  @property
  def train_slices(self) -> int:
    return self.manifest.num_slices("train")

  @property
  def compression(self) -> str:
    return self.manifest.compression_type


def dataset_names(folders: list[str]) -> list[str]:
  """Names of the --data_dir folders in logs: their basenames, characters other than
  letters, digits, `.`, `-` and `_` replaced by `_`, repeats made unique with `_2`, `_3`."""
  names = []
  for folder in folders:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", pathlib.Path(folder).name) or "data"
    name, n = base, 1
    while name in names:
      n += 1
      name = f"{base}_{n}"
    names.append(name)
  return names


def load_data_manifest(data_dir: str, config: TrainConfig) -> manifest_lib.Manifest:
  """Loads and checks one converted dataset; ConfigError when it cannot be trained on."""
  try:
    manifest = manifest_lib.load(data_dir)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e
  train_files = manifest.files("train")
  if not train_files:
    raise ConfigError(f"{manifest_lib.path_of(data_dir)}: the dataset has no train "
                      "shards; convert with a train split")
  missing = [f for f in (train_files + manifest.files("val"))
             if not fileio.path(f).exists()]
  if missing:
    raise ConfigError(f"{data_dir}: shards listed in dataset.json are missing: "
                      f"{missing[:3]}")
  size, depth = manifest.image_size, config.depth
  if size % 2**depth:
    raise ConfigError(f"--depth={depth}: image_size {size} of {data_dir} is not "
                      f"divisible by 2**depth={2**depth}")
  if config.verify_shards:
    _verify_shards_at_start(data_dir, manifest)
  return manifest


def load_datasets(config: TrainConfig) -> list[Source]:
  """Every --data_dir folder, loaded and checked; they must agree on what the model sees.

  Raises:
    ConfigError: a folder that cannot be trained on, two folders with another
      image_size, normalization method or target spacing (both folders and values
      named), two folders of one labelling protocol that annotate other classes or map
      labels otherwise, or a protocol whose folders all have weight 0.
  """
  folders = data_dirs(config)
  sources = [Source(folder, name, load_data_manifest(folder, config))
             for folder, name in zip(folders, dataset_names(folders))]
  first = sources[0]
  for other in sources[1:]:
    for what, value in (("image_size", lambda m: m.image_size),
                        ("normalization", lambda m: m.norm_method),
                        ("target_spacing_mm", lambda m: m.target_spacing_mm)):
      if value(other.manifest) != value(first.manifest):
        raise ConfigError(
            f"--data_dir: {other.data_dir} has {what} {value(other.manifest)!r}, "
            f"{first.data_dir} has {value(first.manifest)!r}; one model reads one "
            f"{what}: convert them alike")
  _check_protocols(config, sources)
  return sources


def _check_protocols(config: TrainConfig, sources: list[Source]) -> None:
  """Refuses folders that share a protocol name (other than the default) but label
  differently (one head cannot learn two ways of drawing), and a protocol head no folder
  trains (--dataset_weights 0 for all of its folders): ConfigError naming the folders."""
  heads = protocols(sources)
  trained = {s.manifest.protocol
             for s, w in zip(sources, sampling_weights(config, sources)) if w > 0}
  untrained = [h for h in heads if h not in trained]
  if len(heads) > 1 and untrained:
    folders = [s.data_dir for s in sources if s.manifest.protocol in untrained]
    raise ConfigError(
        f"--dataset_weights={config.dataset_weights}: the labelling protocol(s) "
        f"{untrained} of {', '.join(folders)} would get an output head that nothing "
        "trains; give one of their folders a weight > 0, or convert them with the "
        "--protocol of a trained folder")
  first_of: dict[str, Source] = {}
  # Folders converted without a --protocol have declared none: they share one head with
  # whatever classes each annotates, as before protocols existed (marginal losses).
  for source in (s for s in sources if s.manifest.protocol != schema.DEFAULT_PROTOCOL):
    first = first_of.setdefault(source.manifest.protocol, source)
    for what, value in (("annotated labels", lambda m: sorted(m.annotated_labels)),
                        ("label map", lambda m: m.label_map)):
      if value(source.manifest) != value(first.manifest):
        raise ConfigError(
            f"--data_dir: {source.data_dir} and {first.data_dir} share the labelling "
            f"protocol {source.manifest.protocol!r} but differ in {what} "
            f"({value(source.manifest)} vs {value(first.manifest)}); convert them with "
            "the same --annotated_labels and --label_map, or give them other --protocol "
            "names")


def protocols(sources: list[Source]) -> list[str]:
  """The labelling protocols of the folders, sorted: the model's heads in order."""
  return sorted({s.manifest.protocol for s in sources})


def sampling_weights(config: TrainConfig, sources: list[Source]) -> list[float]:
  """The share of training slices drawn from each dataset (sums to 1):
  --dataset_weights normalized, or proportional to each one's train slices."""
  weights = dataset_weights(config) or [float(s.train_slices) for s in sources]
  total = sum(weights)
  return [w / total for w in weights]


def epoch_plan(config: TrainConfig, sources: list[Source],
               shares: list[float]) -> tuple[int, str]:
  """Steps per epoch (--steps_per_epoch, or the first dataset's train slices / batch),
  and the start line saying how often each dataset is seen per epoch and per run."""
  batch = config.global_batch_size
  steps = config.steps_per_epoch or max(1, math.ceil(sources[0].train_slices / batch))
  seen = []
  for source, share in zip(sources, shares):
    per_epoch = steps * batch * share / max(1, source.train_slices)
    seen.append(f"{source.name}: {source.train_slices} train slices, share "
                f"{100 * share:.0f}%, seen {per_epoch:.2f}x per epoch, "
                f"{per_epoch * config.epochs:.1f}x in {config.epochs} epochs")
  rule = (f"--steps_per_epoch={config.steps_per_epoch}" if config.steps_per_epoch else
          f"--steps_per_epoch=0: {sources[0].name}'s train slices / batch")
  line = (f"spine-train: {steps} steps of {batch} slices per epoch ({rule}); "
          + "; ".join(seen))
  return steps, line


def _training_shards(manifest: manifest_lib.Manifest) -> list[manifest_lib.Shard]:
  """The train and val shards that record a SHA-256.

  Test shards are not read by training, and shards without a hash (written by tools
  other than spine-convert) cannot be checked.
  """
  return [s for s in manifest.shards("train", "val") if s.sha256]


def _shard_problems(manifest: manifest_lib.Manifest) -> list[str]:
  return manifest_lib.verify_shards(_training_shards(manifest))


def _describe(problems: list[str]) -> str:
  more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
  return "; ".join(problems[:3]) + more


def _verify_shards_at_start(data_dir: str, manifest: manifest_lib.Manifest) -> None:
  """Refuses damaged train/val shards before any TF work (ConfigError naming them)."""
  size = manifest_lib.shard_bytes(_training_shards(manifest))
  if size > _VERIFY_BYTES:
    print(f"spine-train: {size / 2**30:.1f} GiB of shards: not checking their SHA-256 "
          "at start (a shard that cannot be read will be named)", flush=True)
    return
  problems = _shard_problems(manifest)
  if problems:
    raise ConfigError(f"{len(problems)} damaged shard(s) in {data_dir}: "
                      f"{_describe(problems)} (--noverify_shards skips this check)")


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
  warmup = config.warmup_epochs * steps_per_epoch
  if config.lr_schedule == "cosine" and not warmup:
    lr = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=config.epochs * steps_per_epoch, alpha=0.01)
  elif warmup:
    # Linear over the warm-up steps from 1/steps of the peak (so no step is wasted at
    # 0), then cosine over the rest (or alpha=1: the constant peak, (1 - 1) * cosine + 1
    # == 1 exactly).
    cosine = config.lr_schedule == "cosine"
    lr = keras.optimizers.schedules.CosineDecay(
        config.learning_rate / warmup, decay_steps=max(1, config.epochs * steps_per_epoch - warmup),
        alpha=0.01 if cosine else 1.0, warmup_target=config.learning_rate,
        warmup_steps=warmup)
  if config.optimizer == "adamw":
    return keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
  return keras.optimizers.Adam(lr)


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
  """Trains (or resumes training) and returns a summary.

  Returns:
    {"epochs_completed", "initial_epoch", "best_val_dice_mean" (None without val; with
     several --data_dir folders the best val_dice_mean_datasets, the figure the model
     is selected by), "history": list of per-epoch dicts}.

  Raises:
    ConfigError: contradictory settings, a bad data_dir (damaged shards included), a
      mismatching, busy (locked) or unwritable model_dir; raised before training.
    TrainingError: the loss became non-finite, or a shard could not be read; the
      model_dir keeps the last good epoch.
  """
  config = with_absolute_paths(config)
  check_config(config)
  if config.data_service:
    try:
      data_service_lib.check_reachable(config.data_service)
    except ValueError as e:
      raise ConfigError(f"--data_service={config.data_service}: {e}") from None
  sources = load_datasets(config)
  manifest = sources[0].manifest
  record = _datasets_record(sources)
  init = init_lib.resolve(config.init_from) if config.init_from else None
  init_record = init.record() if init else {}
  run_dir.check(config, manifest, record, init_record)
  # The strategy first: MultiWorkerMirroredStrategy must exist before other TF work.
  strategy = make_strategy(config.strategy)
  replicas = strategy.num_replicas_in_sync
  if config.global_batch_size % replicas:
    raise ConfigError(f"--global_batch_size={config.global_batch_size} is not divisible by "
                      f"the {replicas} replicas of --strategy={config.strategy}")
  is_chief, task_id = _task(strategy)
  # Read and matched before the model_dir is touched: a bad source leaves nothing there.
  init_plan = _init_plan(config, sources, init) if init else None
  model_dir = fileio.path(config.model_dir)
  run_dir.prepare(model_dir)
  with contextlib.ExitStack() as stack:
    if is_chief:
      # Only the chief writes the model_dir; other workers of its run share it.
      stack.enter_context(run_dir.lock(model_dir))
      # Again under the lock: another run may have written the folder since the check.
      run_dir.check(config, manifest, record, init_record)
      run_dir.remove_leftovers(model_dir)
      fileio.write_json_atomic(model_dir / "config.json",
                               {**dataclasses.asdict(config), **init_record})
      fileio.write_json_atomic(model_dir / "dataset.json", manifest.raw)
      if record is not None:
        fileio.write_json_atomic(model_dir / run_dir.DATASETS_NAME, record)
      save_dir = str(model_dir / "checkpoints")
    else:
      # Non-chief workers save their (identical) state to a scratch dir: one writer per
      # file.
      save_dir = tempfile.mkdtemp(prefix=f"ckpt-worker{task_id}-")
      stack.callback(shutil.rmtree, save_dir, ignore_errors=True)
    return _fit(config, sources, strategy, is_chief, save_dir, init_plan)


def _build_model(config: TrainConfig, num_classes: int, heads: list[str]):
  return unet.build_unet(num_classes=num_classes, base_filters=config.base_filters,
                         depth=config.depth, dropout=config.dropout, norm=config.norm,
                         protocols=heads)


def _model_heads(sources: list[Source]) -> list[str]:
  """The protocol heads of the run's model: none (one head) for a single protocol."""
  heads = protocols(sources)
  return heads if len(heads) > 1 else []


def _init_plan(config: TrainConfig, sources: list[Source],
               init: init_lib.Source) -> init_lib.Plan:
  """The --init_from weights matched to the run's model (ConfigError if they do not fit).

  Matched against a throwaway build of the run's model: the real one is built later,
  under the strategy and after the seeds are set, so its fresh weights stay those of a
  run without --init_from.
  """
  manifest = sources[0].manifest
  init_lib.check_data(init, manifest.image_size, manifest.target_spacing_mm)
  weights = init_lib.read_weights(init)
  model = _build_model(config, manifest.num_classes, _model_heads(sources))
  return init_lib.plan(init, weights, model, protocol=protocols(sources)[0],
                       labels=manifest.labels)


def _datasets_record(sources: list[Source]) -> dict[str, Any] | None:
  """What `datasets.json` holds with several folders (None for one: no such file)."""
  if len(sources) == 1:
    return None
  return {"datasets": [{"name": s.name, "data_dir": s.data_dir, "manifest": s.manifest.raw}
                       for s in sources],
          "protocols": protocols(sources)}


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a run trains on, decided once from its folders (`_plan`).

  Attributes:
    image_size, num_classes: of the folders (all alike; `check_sources`).
    steps_per_epoch: per epoch (`epoch_plan`).
    trained: (source, sampling share) of the folders with a share above 0.
    heads: the model's protocol heads, sorted; () for one head.
    has_val: whether any folder has a val split.
  """
  image_size: int
  num_classes: int
  steps_per_epoch: int
  trained: list[tuple[Source, float]]
  heads: list[str]
  has_val: bool


@dataclasses.dataclass
class _State:
  """The run's resumable state: what a checkpoint saves besides model and optimizer."""
  epoch: Any  # tf.Variable int64: epochs completed
  best: Any  # tf.Variable float64: best val dice_mean so far (-1: none yet)
  manager: Any  # tf.train.CheckpointManager
  initial_epoch: int


def _fit(config: TrainConfig, sources: list[Source], strategy, is_chief: bool,
         save_dir: str, init: init_lib.Plan | None) -> dict[str, Any]:
  """The run itself (model, data, callbacks, fit); see `train_and_evaluate`."""
  model_dir = fileio.path(config.model_dir)
  _seed_process(config)
  plan = _plan(config, sources)
  with strategy.scope():
    model = _compiled_model(config, plan)
  state = _restore(config, model, model_dir, save_dir, init)
  wait = callbacks_lib.InputWait(batches_per_step=len(strategy.extended.worker_devices),
                                 images_per_step=config.global_batch_size)
  augment = _host_augment(config, model)
  train_ds = strategy.distribute_datasets_from_function(
      _train_input(config, plan, augment, state.initial_epoch, wait))
  history_path = str(model_dir / "history.json")
  previous = callbacks_lib.read_history(history_path, state.initial_epoch) if is_chief else []
  cbs = _callbacks(config, sources, plan, model, state, wait, is_chief, previous)
  keras_workarounds.apply(model, strategy,
                          config.global_batch_size // strategy.num_replicas_in_sync,
                          plan.image_size, label_channels=2 if plan.heads else 1)
  if state.initial_epoch < config.epochs:
    _run_fit(config, sources, model, train_ds, cbs, plan, state, save_dir, is_chief)
  else:
    print(f"Nothing to do: {state.initial_epoch} of --epochs={config.epochs} already "
          "completed", flush=True)
  history = callbacks_lib.read_history(history_path, config.epochs) if is_chief else []
  best = float(state.best.numpy())
  return {"epochs_completed": int(state.epoch.numpy()),
          "initial_epoch": state.initial_epoch,
          "best_val_dice_mean": best if plan.has_val and best >= 0 else None,
          "history": history}


def _seed_process(config: TrainConfig) -> None:
  """Seeds, op determinism and the precision policy: process-wide, set before anything
  draws a random number."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # The seeds already fix the weights, shuffling and augmentation; op determinism also
  # fixes the reduction order of kernels and makes tf.data keep its element order
  # (make_dataset is told too).
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)
  policy = "float32" if config.mixed_precision == "none" else config.mixed_precision
  keras.mixed_precision.set_global_policy(policy)


def _plan(config: TrainConfig, sources: list[Source]) -> _Plan:
  """Sampling, steps and heads of the run; prints the epoch plan and the heads."""
  shares = sampling_weights(config, sources)
  steps_per_epoch, text = epoch_plan(config, sources, shares)
  print(text, flush=True)
  heads = _model_heads(sources)
  if heads:
    print(f"spine-train: {len(heads)} protocol heads: " + "; ".join(
        f"{h} ({', '.join(s.name for s in sources if s.manifest.protocol == h)})"
        for h in heads), flush=True)
  # Datasets of weight 0 are validated on only: nothing of them is read for training.
  return _Plan(image_size=sources[0].manifest.image_size,
               num_classes=sources[0].manifest.num_classes,
               steps_per_epoch=steps_per_epoch,
               trained=[(s, w) for s, w in zip(sources, shares) if w > 0],
               heads=heads, has_val=any(s.files("val") for s in sources))


def _compiled_model(config: TrainConfig, plan: _Plan):
  """The U-Net, compiled with its loss and optimizer (optimizer built); call in scope."""
  model = _build_model(config, plan.num_classes, plan.heads)
  model.compile(optimizer=_optimizer(config, plan.steps_per_epoch),
                loss=losses.make_loss(config.loss, num_classes=plan.num_classes,
                                      include_background=config.include_background,
                                      smooth=config.dice_smooth,
                                      ce_weight=config.ce_weight,
                                      num_heads=max(1, len(plan.heads))),
                jit_compile=config.jit_compile)
  model.optimizer.build(model.trainable_variables)
  return model


def _restore(config: TrainConfig, model, model_dir: pathlib.Path, save_dir: str,
             init: init_lib.Plan | None) -> _State:
  """Resumes from the last checkpoint of `model_dir` if any, else applies --init_from."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
  best_var = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
  # The key `best_val_mean_dice` predates the metric's rename; kept so old runs resume.
  checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch_var,
                                   best_val_mean_dice=best_var)
  latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
  if latest:
    checkpoint.restore(latest).assert_existing_objects_matched()
  initial_epoch = int(epoch_var.numpy())
  if latest:
    print(f"Resuming from {latest}: {initial_epoch} epochs completed", flush=True)
  _start_fine_tuning(config, model, init, resumed=bool(latest), initial_epoch=initial_epoch)
  manager = tf.train.CheckpointManager(checkpoint, save_dir,
                                       max_to_keep=config.checkpoints_kept)
  return _State(epoch=epoch_var, best=best_var, manager=manager,
                initial_epoch=initial_epoch)


def _host_augment(config: TrainConfig, model) -> augment_lib.AugmentConfig | None:
  """The augmentation tf.data applies (None: none, or the train step does it)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  augment = augment_config(config)
  augment_on = config.augment_on
  if augment_on == "auto":
    # With an accelerator the step augments almost for free and tf.data only reads and
    # batches (bench/pipeline_bench.py: 18-23x the Python loader). On CPU only, both run on
    # the same cores; tf.data threads overlap the augmentation with the step instead.
    accelerated = any(d.device_type != "CPU" for d in tf.config.list_physical_devices())
    augment_on = "device" if accelerated else "host"
  if augment is not None and augment_on == "device":
    augment_lib.augment_in_train_step(model, augment, seed=config.seed)
    return None  # The pipeline only reads and batches.
  return augment


def _train_input(config: TrainConfig, plan: _Plan, augment, initial_epoch: int, wait):
  """The dataset function of `distribute_datasets_from_function` for training."""
  trained = plan.trained
  if len(trained) == 1:
    # One dataset: no sampling op at all, the pipeline of a single --data_dir.
    files, compression = trained[0][0].files("train"), trained[0][0].compression
    mix = {}
  else:
    files = [s.files("train") for s, _ in trained]
    compression = [s.compression for s, _ in trained]
    mix = {"weights": [w for _, w in trained]}
  service = {}
  if config.data_service:
    # One job shared by every trainer process of the run (each batch goes to one of
    # them), so each must build the same dataset: no per-worker seed below. Named per
    # run and resume (tf.data: no two training jobs on one name); a rerun from the same
    # epoch may join what is left of its job, the same dataset and so the same stream.
    service = {"data_service": config.data_service,
               "job_name": f"spine-train {fileio.path(config.model_dir)} from epoch "
                           f"{initial_epoch}"}
  train_slices = sum(s.train_slices for s, _ in trained)

  def train_fn(input_context):
    # Distinct per worker and per resumed run, so no example order is replayed.
    worker = 0 if service else input_context.input_pipeline_id
    seed = config.seed + 1000 * worker + 7919 * initial_epoch
    options = input_pipeline.TrainingOptions(
        augment=augment, seed=seed, shuffle_buffer=config.shuffle_buffer,
        # Decoded slices: float32 image + uint8 mask (+ uint8 head index with several
        # heads), 5 or 6 bytes per pixel; every trained dataset together must fit.
        # (The service's workers read every pass instead.)
        cache=not service and (train_slices * plan.image_size**2
                               * (6 if plan.heads else 5) <= config.cache_bytes),
        deterministic=config.deterministic, **mix, **service)
    return input_pipeline.make_dataset(
        files, image_size=plan.image_size, compression=compression,
        global_batch_size=config.global_batch_size, training=options,
        input_context=input_context, on_batch=wait.batch_ready, protocols=plan.heads)

  return train_fn


def _callbacks(config: TrainConfig, sources: list[Source], plan: _Plan, model,
               state: _State, wait, is_chief: bool, previous: list) -> list:
  """The run's callbacks, in the order they must see each epoch's end."""
  model_dir = fileio.path(config.model_dir)
  # First: a non-finite loss stops the run before any other callback sees the step.
  cbs = [callbacks_lib.StopOnNonFiniteLoss()]
  if plan.has_val:
    val = {s.name: input_pipeline.make_dataset(
        s.files("val"), image_size=plan.image_size, compression=s.compression,
        global_batch_size=config.global_batch_size)
           for s in sources if s.files("val")}
    # One folder: the split itself, logged and selected exactly as before several existed.
    val_ds = next(iter(val.values())) if len(sources) == 1 else val
    cbs.append(callbacks_lib.SplitDice(
        val_ds, num_classes=plan.num_classes,
        best_path=str(model_dir / "best.keras") if is_chief else None,
        best_value=state.best,
        heads=({s.name: plan.heads.index(s.manifest.protocol) for s in sources}
               if plan.heads else None),
        image_dir=str(model_dir / "logs" / "images") if is_chief else None,
        num_images=config.num_overlays))
  elif is_chief:
    cbs.append(callbacks_lib.SaveLastModel(str(model_dir / "best.keras")))
  cbs.append(wait)
  if is_chief:
    cbs.append(callbacks_lib.HistoryFile(str(model_dir / "history.json"), previous,
                                         model.optimizer))
  cbs.append(callbacks_lib.Checkpoint(state.manager, state.epoch))
  if config.freeze and state.initial_epoch < config.freeze_epochs:
    cbs.append(init_lib.Unfreeze(init_lib.encoder_layers(model), config.freeze_epochs))
  if is_chief:
    cbs.append(callbacks_lib.TensorBoardScalars(str(model_dir / "logs")))
  return cbs


def _run_fit(config: TrainConfig, sources: list[Source], model, train_ds, cbs: list,
             plan: _Plan, state: _State, save_dir: str, is_chief: bool) -> None:
  """`model.fit` from the initial epoch; its faults become one-line TrainingErrors."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    model.fit(train_ds, epochs=config.epochs, initial_epoch=state.initial_epoch,
              steps_per_epoch=plan.steps_per_epoch, callbacks=cbs, shuffle=False,
              verbose=config.verbose if is_chief else 0)
  except callbacks_lib.NonFiniteLoss as e:
    model_dir = fileio.path(config.model_dir)
    kept = tf.train.latest_checkpoint(save_dir)
    kept = (f"{model_dir} keeps {pathlib.Path(kept).name} (epoch {int(state.epoch.numpy())}),"
            " best.keras and history.json" if kept else "no epoch had completed")
    raise TrainingError(f"{e}; stopped before saving anything of that epoch ({kept}). "
                        "Lower --learning_rate or check the data for extreme or "
                        "non-finite values") from None
  except (tf.errors.DataLossError, tf.errors.NotFoundError) as e:
    raise TrainingError(_read_failure(sources, e)) from None


def _start_fine_tuning(config: TrainConfig, model, plan: init_lib.Plan | None, *,
                       resumed: bool, initial_epoch: int) -> None:
  """Loads the --init_from weights into a fresh run (a resumed one has its own), and
  freezes the encoder for the first --freeze_epochs (`init_lib.Unfreeze` ends that).

  The optimizer was built with every weight, frozen ones included, so its state is the
  same whether or not the encoder is frozen and resumes either way."""
  if plan is None:
    return
  if resumed:
    print(f"spine-train: resuming this run's checkpoints; the --init_from weights are "
          "not applied again", flush=True)
  else:
    init_lib.apply(plan.values, model)
    print(plan.summary(), flush=True)
  if config.freeze and initial_epoch < config.freeze_epochs:
    init_lib.set_trainable(init_lib.encoder_layers(model), False)
    print(f"spine-train: --freeze={config.freeze}: the encoder is frozen until epoch "
          f"{config.freeze_epochs} ends", flush=True)


def _read_failure(sources: list[Source], error) -> str:
  """One line for a shard that failed to read mid-run, naming it when a hash tells."""
  for source in sources:
    problems = _shard_problems(source.manifest)
    if problems:
      return f"reading {source.data_dir} failed: {_describe(problems)}"
  first = (error.message or str(error)).strip().splitlines()[0]
  folders = ", ".join(s.data_dir for s in sources)
  return (f"reading the shards of {folders} failed ({type(error).__name__}: {first}); "
          "their SHA-256 match dataset.json, so check the disk or convert the data again")
