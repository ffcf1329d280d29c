"""spine-train: train the spine U-Net on a converted dataset (one CPU, GPUs or a cluster).

  spine-train --data_dir=/tmp/spine2d_tfr --model_dir=/tmp/unet
  spine-train --data_dir=/tmp/spine2d_tfr,/tmp/vb_tfr --dataset_weights=1,1 \
      --model_dir=/tmp/both

Rerunning the same command after a crash or `kill -9` resumes from the last completed
epoch. Several machines: set TF_CONFIG on each and run the same command. The flags are
generated from `trainer.config.TrainConfig` (defaults: the recommended settings, as in
experiments/default.flags); every one of them is recorded in MODEL_DIR/config.json.
Faults (bad settings or data, a busy model_dir, a non-finite loss, a checkpoint that
cannot be saved) end it with one line `spine-train: error: ...` and exit status 1.
Without --verbose, the progress bar is drawn on a terminal only; redirected output gets
one line per epoch (--verbose=2).
"""
import dataclasses
import sys
import typing

from absl import flags
from absl import logging

from data_prep import cli  # first: it quiets TensorFlow before anything loads it
from trainer import callbacks
from trainer import train


_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per `train.TrainConfig` field: its name, default, help, choices.

  Enum fields (with "choices" metadata) become DEFINE_enum, bools DEFINE_bool (so
  --noaugment works), ints, floats and strings their DEFINE_*; fields without a default
  are required flags.
  """
  hints = typing.get_type_hints(train.TrainConfig)
  for field in dataclasses.fields(train.TrainConfig):
    required = field.default is dataclasses.MISSING
    kwargs = dict(default=None if required else field.default,
                  help=field.metadata["help"], flag_values=flag_values, required=required)
    kind = hints[field.name]
    if "choices" in field.metadata:
      flags.DEFINE_enum(field.name, enum_values=list(field.metadata["choices"]), **kwargs)
    elif kind in _DEFINE:
      _DEFINE[kind](field.name, **kwargs)
    else:
      raise TypeError(f"TrainConfig.{field.name}: no flag type for {kind}")


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> train.TrainConfig:
  """The TrainConfig of parsed flags.

  Raises:
    train.ConfigError: a flag the chosen settings would silently ignore.
  """
  if flag_values["weight_decay"].present and flag_values["optimizer"].value != "adamw":
    raise train.ConfigError(f"--weight_decay applies to --optimizer=adamw only, not "
                            f"--optimizer={flag_values['optimizer'].value}")
  return train.TrainConfig(**{f.name: flag_values[f.name].value
                              for f in dataclasses.fields(train.TrainConfig)})


define_flags()


def main(argv):
  logging.set_verbosity(logging.WARNING)  # TF's per-checkpoint INFO lines drown the bar.
  try:
    if len(argv) > 1:
      raise train.ConfigError(f"unexpected arguments {argv[1:]}; settings are --flags")
    config = config_from_flags()
    if not flags.FLAGS["verbose"].present and not sys.stdout.isatty():
      # Keras' bar redraws itself with escape codes: noise in a log file.
      config = dataclasses.replace(config, verbose=2)
    result = train.train_and_evaluate(config)
  except (train.ConfigError, train.TrainingError, callbacks.CheckpointError) as e:
    cli.fail(str(e))
  except OSError as e:
    # A model_dir that fills up or turns read-only mid-run, and the like.
    cli.fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
  summary = {k: v for k, v in result.items() if k != "history"}
  print(f"spine-train: done: {summary}; model in {config.model_dir}", flush=True)


def run():
  cli.run(main)  # --help lists this module's flags, also as a console script


if __name__ == "__main__":
  run()
