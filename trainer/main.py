"""spine-train: train the spine U-Net on a converted dataset (one CPU, GPUs or a cluster).

  spine-train --data_dir=/tmp/spine2d_tfr --model_dir=/tmp/unet \
      --flagfile=experiments/default.flags

Rerunning the same command after a crash or `kill -9` resumes from the last completed
epoch. Several machines: set TF_CONFIG on each and run the same command.
"""
import sys

from absl import app
from absl import flags
from absl import logging

from trainer import losses
from trainer import train
from trainer import unet

_DATA_DIR = flags.DEFINE_string("data_dir", None, help="Output directory of spine-convert.",
                                required=True)
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, required=True,
    help="Where checkpoints, best.keras, logs and the run record go; rerun to resume.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, help="Total epochs (a resumed run continues).")
_BATCH = flags.DEFINE_integer(
    "global_batch_size", 8, help="Batch over all replicas; must divide by their number.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, help="Peak learning rate.")
_SCHEDULE = flags.DEFINE_enum("lr_schedule", "constant", train.LR_SCHEDULES,
                              help="constant, or cosine decay over all epochs.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", train.OPTIMIZERS,
                               help="adam, or adamw (decoupled weight decay).")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-4,
                                   help="Decoupled weight decay of --optimizer=adamw.")
_LOSS = flags.DEFINE_enum("loss", "dice", losses.LOSSES,
                          help="Soft Dice over foreground classes, or Dice + cross-entropy.")
_BASE_FILTERS = flags.DEFINE_integer("base_filters", 32, help="Filters of the first level.")
_DEPTH = flags.DEFINE_integer("depth", 4, help="Number of 2x downsamplings.")
_DROPOUT = flags.DEFINE_float("dropout", 0.0, help="SpatialDropout2D rate (0: none).")
_NORM = flags.DEFINE_enum("norm", "batch", unet.NORMS, help="Normalization layer.")
_PRECISION = flags.DEFINE_enum("mixed_precision", "none", train.PRECISIONS,
                               help="Keras mixed precision policy (logits stay float32).")
_JIT = flags.DEFINE_bool("jit_compile", False,
                         help="XLA-compile the train step (passed explicitly: Keras turns "
                         "XLA off under a distribution strategy otherwise).")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "auto", train.STRATEGIES,
    help="auto: multi_worker if TF_CONFIG is set, mirrored if >1 GPU, else one_device.")
_SEED = flags.DEFINE_integer("seed", 0, help="Seed of weights, shuffling and augmentation.")
_AUGMENT = flags.DEFINE_bool("augment", True,
                             help="Joint geometric + intensity augmentation of training data.")
_AUGMENT_ON = flags.DEFINE_enum(
    "augment_on", "auto", train.AUGMENT_ON,
    help="device: augment inside the train step (keeps tf.data to reading and batching); "
    "host: in the tf.data pipeline on the CPU; auto: device with a GPU/TPU, else host.")

_ELASTIC_PROB = flags.DEFINE_float(
    "elastic_prob", 0.0, help="Share of training slices also deformed by a smooth random "
    "elastic field (same field for image and mask); 0: off.")
_ELASTIC_ALPHA = flags.DEFINE_float(
    "elastic_alpha", 10.0, help="Largest displacement of the elastic field, in pixels of "
    "the stored squares.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # TF's per-checkpoint INFO lines drown the bar.
  if flags.FLAGS["weight_decay"].present and _OPTIMIZER.value != "adamw":
    raise app.UsageError(f"--weight_decay applies to --optimizer=adamw only, not "
                         f"--optimizer={_OPTIMIZER.value}")
  config = train.TrainConfig(
      data_dir=_DATA_DIR.value, model_dir=_MODEL_DIR.value, epochs=_EPOCHS.value,
      global_batch_size=_BATCH.value, learning_rate=_LR.value,
      lr_schedule=_SCHEDULE.value, optimizer=_OPTIMIZER.value,
      weight_decay=_WEIGHT_DECAY.value, loss=_LOSS.value,
      base_filters=_BASE_FILTERS.value, depth=_DEPTH.value, dropout=_DROPOUT.value,
      norm=_NORM.value, mixed_precision=_PRECISION.value, jit_compile=_JIT.value,
      strategy=_STRATEGY.value, seed=_SEED.value, augment=_AUGMENT.value,
      augment_on=_AUGMENT_ON.value, elastic_prob=_ELASTIC_PROB.value,
      elastic_alpha=_ELASTIC_ALPHA.value)
  try:
    train.check_config(config)
    result = train.train_and_evaluate(config)
  except train.ConfigError as e:
    print(f"spine-train: error: {e}", file=sys.stderr)
    sys.exit(1)
  summary = {k: v for k, v in result.items() if k != "history"}
  print(f"spine-train: done: {summary}; model in {config.model_dir}", flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
