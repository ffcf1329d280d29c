"""TrainConfig: every setting of a training run, its defaults, help and checks.

The one source of defaults: `trainer.main` generates one flag per field (name, default,
help, allowed values) and `config.json` in the model_dir holds all of them. The bare
defaults are the recommended settings (`experiments/default.flags` spells them out; a
test holds the two equal).
"""
from __future__ import annotations

import dataclasses
import math

from data_prep import fileio
from trainer import augment as augment_lib
from trainer import data_service_lib
from trainer import losses
from trainer import unet

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
FREEZE = ("", "encoder")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
AUGMENT_ON = ("auto", "device", "host")
# The two elastic settings had flags before the other ranges; flagfiles spell them so.
_UNPREFIXED_AUGMENT = ("elastic_prob", "elastic_alpha")


class ConfigError(ValueError):
  """A user error in the settings, the data or the model_dir (reported without traceback)."""


def _setting(default, help_text: str, choices: tuple[str, ...] | None = None):
  """A TrainConfig field: its default, its --help text and, for enums, the allowed values."""
  metadata = {"help": help_text}
  if choices is not None:
    metadata["choices"] = tuple(choices)
  return dataclasses.field(default=default, metadata=metadata)


def augment_setting(name: str) -> str:
  """The TrainConfig setting (and flag) of `augment.AugmentConfig` field `name`:
  aug_NAME, or NAME for the elastic probability and displacement."""
  return name if name in _UNPREFIXED_AUGMENT else f"aug_{name}"


def _with_augment_settings(cls):
  """Adds one setting per `augment.AugmentConfig` field to the TrainConfig class body,
  with that field's type, default and help (`augment_setting` names it), so each range
  is written once, in trainer/augment.py."""
  for field in dataclasses.fields(augment_lib.AugmentConfig):
    name = augment_setting(field.name)
    cls.__annotations__[name] = field.type
    setattr(cls, name, _setting(field.default, field.metadata["help"]))
  return cls


@dataclasses.dataclass(frozen=True)
@_with_augment_settings
class TrainConfig:
  """Every setting that shapes a training run: the one source of defaults and help.

  `trainer.main` generates one flag per field (name, default, help, allowed values), and
  `config.json` holds all of them. The bare defaults are the recommended settings;
  `experiments/default.flags` spells them out (a test holds the two equal). Fields added
  later count as their defaults when an older model_dir is resumed, so a new field's
  default must reproduce what the trainer did before it existed. The augmentation ranges
  (--elastic_prob, --elastic_alpha, --aug_*) are added from `augment.AugmentConfig`.
  """
  data_dir: str = dataclasses.field(metadata={
      "help": "Output directory of spine-convert; several, comma-separated, train one "
              "model on all of them (same image_size and normalization; see "
              "--dataset_weights and --steps_per_epoch). Folders converted with other "
              "spine-convert --protocol names get one output head per protocol."})
  model_dir: str = dataclasses.field(metadata={
      "help": "Where checkpoints, best.keras, logs and the run record go; rerun the same "
              "command to resume. One run at a time (MODEL_DIR/.lock)."})
  epochs: int = _setting(300, "Total epochs (a resumed run continues to this many).")
  dataset_weights: str = _setting(
      "", "With several --data_dir: comma-separated sampling weights, one per folder; each "
      "training slice comes from folder i with probability w_i / sum(w) (0: validated on, "
      "never trained on). Empty: proportional to each folder's train slices.")
  steps_per_epoch: int = _setting(
      0, "Training steps per epoch; 0: the FIRST --data_dir's train slices / "
      "global_batch_size, rounded up (one pass over it, as with a single folder), so "
      "adding a large dataset changes what each step sees, not the run time. The start "
      "line says how often each dataset is seen per epoch and per run.")
  global_batch_size: int = _setting(
      4, "Batch over all replicas; must divide by their number.")
  learning_rate: float = _setting(1e-3, "Peak learning rate.")
  lr_schedule: str = _setting("cosine", "constant, or cosine decay over all epochs.",
                              LR_SCHEDULES)
  warmup_epochs: int = _setting(
      0, "Warm-up: epochs over which the learning rate rises linearly to --learning_rate "
      "(from 1/steps of it) before --lr_schedule; cosine then decays over the remaining "
      "epochs. 0: none.")
  optimizer: str = _setting("adamw", "adam, or adamw (decoupled weight decay).",
                            OPTIMIZERS)
  weight_decay: float = _setting(
      1e-4, "Decoupled weight decay of --optimizer=adamw (refused with adam).")
  loss: str = _setting("dice_ce", "Soft Dice over the foreground classes, or Dice + "
                       "--ce_weight x cross-entropy.", losses.LOSSES)
  dice_smooth: float = _setting(
      1.0, "Added to numerator and denominator of the soft Dice loss (> 0).")
  ce_weight: float = _setting(1.0, "Weight of the cross-entropy term of --loss=dice_ce.")
  include_background: bool = _setting(
      False, "Count the background class in the Dice loss mean (it dominates the pixels).")
  base_filters: int = _setting(32, "Filters of the first U-Net level.")
  depth: int = _setting(4, "Number of 2x downsamplings.")
  dropout: float = _setting(0.0, "SpatialDropout2D rate (0: none).")
  norm: str = _setting("group", "Normalization layer.", unet.NORMS)
  init_from: str = _setting(
      "", "Fine-tune: start from the weights of a spine-train model_dir (its best.keras, "
      "else its latest checkpoint), a .keras file or a spine-export SavedModel folder "
      "(`pretrained`: the model that ships with spineseg). Layers must match "
      "by name and shape (same --base_filters, --depth, --norm, image size and target "
      "spacing); an output head is loaded when its protocol and classes match, else "
      "re-initialized. config.json records the file read and its SHA-256. Empty: random "
      "initialization.")
  freeze: str = _setting(
      "", "With --init_from: encoder: the contracting path (down* blocks and the bottom "
      "block) is not trained for the first --freeze_epochs epochs. Empty: nothing "
      "frozen.", FREEZE)
  freeze_epochs: int = _setting(
      0, "Epochs the --freeze layers stay frozen (> 0 with --freeze); trained after.")
  mixed_precision: str = _setting(
      "none", "Keras mixed precision policy (logits stay float32).", PRECISIONS)
  jit_compile: bool = _setting(
      False, "XLA-compile the train step (passed explicitly: Keras turns XLA off under a "
      "distribution strategy otherwise).")
  strategy: str = _setting(
      "auto", "auto: multi_worker if TF_CONFIG is set, mirrored if >1 GPU, else "
      "one_device.", STRATEGIES)
  data_service: str = _setting(
      "", "grpc://HOST:PORT of a tf.data service dispatcher (`python -m "
      "trainer.data_service`): its workers read, parse and (--augment_on=host) augment "
      "the training slices, reading the shards at the same paths; each pass gives every "
      "slice once. Empty: this machine's CPUs do it.")
  seed: int = _setting(0, "Seed of weights, shuffling and augmentation.")
  deterministic: bool = _setting(
      False, "Bit-identical reruns of the same command on the same machine: deterministic "
      "TF ops and tf.data order (slower input pipeline).")
  augment: bool = _setting(
      True, "Joint geometric + intensity augmentation of the training slices.")
  augment_on: str = _setting(
      "auto", "device: augment inside the train step (tf.data only reads and batches); "
      "host: in the tf.data pipeline on the CPU; auto: device with a GPU/TPU, else host.",
      AUGMENT_ON)
  shuffle_buffer: int = _setting(512, "Training records in the shuffle buffer.")
  cache_bytes: int = _setting(
      1 << 30, "Cache the decoded train split in memory after the first epoch when it "
      "fits in this many bytes (float32 image + uint8 mask per pixel); 0: never.")
  verify_shards: bool = _setting(
      True, "Check the SHA-256 of the train and val shards against dataset.json at start "
      "(done for each --data_dir folder up to 1 GiB of its shards).")
  checkpoints_kept: int = _setting(2, "Latest checkpoints kept in MODEL_DIR/checkpoints.")
  num_overlays: int = _setting(
      4, "Validation slices drawn as prediction overlays in TensorBoard each epoch.")
  verbose: int = _setting(1, "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line "
                          "per epoch. Unset, spine-train draws the bar (1) on a terminal "
                          "and writes one line per epoch (2) when its output is not one.")


def split_list(text: str) -> list[str]:
  """The entries of a comma-separated setting, stripped (empty entries kept as "")."""
  return [part.strip() for part in text.split(",")]


def resolve_data_dirs(text: str) -> str:
  """Every folder of a --data_dir list absolute and resolved (empty entries left as "")."""
  return ",".join(str(fileio.path(p).expanduser().resolve()) if p else ""
                  for p in split_list(text))


def data_dirs(config: TrainConfig) -> list[str]:
  """The folders of --data_dir, in order (one for a single folder)."""
  return split_list(config.data_dir)


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
  """`config` with data_dir (each folder) and model_dir absolute and resolved
  (`d64/` == `./d64`)."""
  return dataclasses.replace(
      config, data_dir=resolve_data_dirs(config.data_dir),
      model_dir=str(fileio.path(config.model_dir).expanduser().resolve()))


def dataset_weights(config: TrainConfig) -> list[float] | None:
  """The parsed --dataset_weights (None when empty: proportional to the train slices).

  Raises:
    ConfigError: a value that is not a finite number >= 0, all zero, or not one weight
      per --data_dir folder.
  """
  if not config.dataset_weights.strip():
    return None
  flag = f"--dataset_weights={config.dataset_weights}"
  try:
    weights = [float(w) for w in split_list(config.dataset_weights)]
  except ValueError:
    raise ConfigError(f"{flag}: expected numbers separated by commas") from None
  folders = data_dirs(config)
  if len(weights) != len(folders):
    raise ConfigError(f"{flag}: {len(weights)} weight(s) for the {len(folders)} folder(s) "
                      "of --data_dir; expected one per folder")
  for weight, folder in zip(weights, folders):
    if not (math.isfinite(weight) and weight >= 0):
      raise ConfigError(f"{flag}: weight {weight:g} of {folder}: expected a finite "
                        "number >= 0")
  if not any(weights):
    raise ConfigError(f"{flag}: every weight is 0; expected at least one > 0")
  return weights


def augment_config(config: TrainConfig) -> augment_lib.AugmentConfig | None:
  """The AugmentConfig of the run (None with --noaugment); every one of its fields set."""
  if not config.augment:
    return None
  return augment_lib.AugmentConfig(**{
      f.name: getattr(config, augment_setting(f.name))
      for f in dataclasses.fields(augment_lib.AugmentConfig)})


def check_config(config: TrainConfig) -> None:
  """Refuses unknown enum values and impossible numbers.

  Raises:
    ConfigError: naming the setting, the value found and what is expected.
  """
  for field in dataclasses.fields(TrainConfig):
    allowed = field.metadata.get("choices")
    if allowed and getattr(config, field.name) not in allowed:
      raise ConfigError(f"--{field.name}={getattr(config, field.name)!r}: expected one of "
                        f"{allowed}")
    if field.name.endswith("_prob") and not 0 <= getattr(config, field.name) <= 1:
      raise ConfigError(f"--{field.name}={getattr(config, field.name)}: expected a share, "
                        "0 <= p <= 1")
  folders = data_dirs(config)
  if not all(folders):
    raise ConfigError(f"--data_dir={config.data_dir}: an empty entry in the list; expected "
                      "folders separated by single commas")
  twice = sorted({f for f in folders if folders.count(f) > 1})
  if twice:
    raise ConfigError(f"--data_dir lists {twice[0]} more than once; expected each folder "
                      "once (--dataset_weights weighs a folder more)")
  dataset_weights(config)
  _check_fine_tuning(config)
  if config.data_service:
    try:
      data_service_lib.check_address(config.data_service)
    except ValueError as e:
      raise ConfigError(f"--data_service={config.data_service}: {e}") from None
    if config.deterministic:
      raise ConfigError("--deterministic with --data_service: the service hands the "
                        "shards to whichever worker asks first, so the order of slices "
                        "cannot repeat; drop one of the two")
  positive = ("epochs", "global_batch_size", "base_filters", "depth", "shuffle_buffer",
              "checkpoints_kept", "learning_rate", "dice_smooth", "aug_gamma_min")
  for name in positive:
    if not getattr(config, name) > 0:
      raise ConfigError(f"--{name}={getattr(config, name)}: expected > 0")
  not_negative = ("steps_per_epoch", "warmup_epochs", "weight_decay", "ce_weight", "cache_bytes",
                  "num_overlays", "elastic_alpha", "aug_max_rotation_deg", "aug_brightness",
                  "aug_bias_field_strength", "aug_noise_std", "aug_contrast_min",
                  "aug_blur_max_sigma")
  for name in not_negative:
    if not getattr(config, name) >= 0:
      raise ConfigError(f"--{name}={getattr(config, name)}: expected >= 0")
  below_one = ("dropout", "aug_scale_range", "aug_max_translation", "aug_cut_max")
  for name in below_one:
    if not 0 <= getattr(config, name) < 1:
      raise ConfigError(f"--{name}={getattr(config, name)}: expected 0 <= value < 1")
  if config.aug_elastic_grid < 2:
    raise ConfigError(f"--aug_elastic_grid={config.aug_elastic_grid}: expected >= 2")
  if not config.aug_lowres_max_factor >= 1:
    raise ConfigError(f"--aug_lowres_max_factor={config.aug_lowres_max_factor}: "
                      "expected >= 1")
  for low, high in (("aug_gamma_min", "aug_gamma_max"),
                    ("aug_contrast_min", "aug_contrast_max")):
    if getattr(config, low) > getattr(config, high):
      raise ConfigError(f"--{low}={getattr(config, low)} > --{high}="
                        f"{getattr(config, high)}: expected min <= max")
  if not config.augment:
    # Ranges of an augmentation that does not run would be recorded but mean nothing.
    # (--elastic_alpha has never been refused here; left so, so no command that ran
    # before is refused now.)
    defaults = augment_lib.AugmentConfig()
    changed = [augment_setting(f.name) for f in dataclasses.fields(augment_lib.AugmentConfig)
               if f.name != "elastic_alpha"
               and getattr(config, augment_setting(f.name)) != getattr(defaults, f.name)]
    if changed:
      raise ConfigError(f"--{changed[0]}={getattr(config, changed[0])} with --noaugment: "
                        "it is part of the augmentation; drop one of the two")


def _check_fine_tuning(config: TrainConfig) -> None:
  """Refuses --freeze without weights to keep and freeze settings that contradict."""
  if config.freeze and not config.init_from:
    raise ConfigError(f"--freeze={config.freeze} without --init_from: a randomly "
                      "initialized encoder would stay random; add --init_from or drop "
                      "--freeze")
  if config.freeze and config.freeze_epochs <= 0:
    raise ConfigError(f"--freeze={config.freeze} with --freeze_epochs="
                      f"{config.freeze_epochs}: expected > 0 epochs")
  if config.freeze_epochs and not config.freeze:
    raise ConfigError(f"--freeze_epochs={config.freeze_epochs} without --freeze: "
                      "expected --freeze=encoder, or no --freeze_epochs")
  if config.warmup_epochs and config.lr_schedule == "cosine" and (
      config.warmup_epochs >= config.epochs):
    raise ConfigError(f"--warmup_epochs={config.warmup_epochs} with --epochs="
                      f"{config.epochs}: expected fewer warm-up epochs than epochs (cosine "
                      "decays over the rest)")
