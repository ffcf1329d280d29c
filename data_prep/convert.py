r"""spine-convert: raw spine MRI folders -> sharded, label-complete TFRecords + dataset.json.

2D slices (PNG/JPEG/TIFF images with .npy or PNG masks) or NIfTI volumes (images and
label volumes of the same stem, nnU-Net `case_0000.nii.gz` naming accepted); see
`writer.convert_dataset` for what is written and how.

  spine-convert --images_dir=../shared/data/spine2d/images \
      --masks_dir=../shared/data/spine2d/masks --output_dir=/tmp/spine2d_tfrecords

  spine-convert --images_dir=../shared/data/spine3d/images \
      --masks_dir=../shared/data/spine3d/masks --output_dir=/tmp/vb2 \
      --required_labels=2 --image_size=128

  spine-convert --verify=/tmp/vb2   # check a converted dataset against its SHA-256s

  # The same conversion as an Apache Beam pipeline (pip install -e ".[beam]"); Beam's
  # pipeline options follow `--`. Same shards and dataset.json, byte for byte.
  spine-convert --images_dir=../shared/data/spine2d/images \
      --masks_dir=../shared/data/spine2d/masks --output_dir=/tmp/spine2d_beam \
      --runner=DirectRunner -- --direct_num_workers=2 \
      --direct_running_mode=multi_processing

Output errors (full disk, read-only mount, --output_dir naming a file) are reported in one
line and leave nothing behind; a rerun after a killed conversion removes its hidden
leftovers itself.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from typing import Any, Optional

from absl import app, flags

from data_prep import cli  # first: it quiets TensorFlow before anything loads it
from data_prep import readers, schema, writer
from data_prep import options as options_lib

# Required unless --verify (checked in main: absl's required=True cannot be conditional).
_IMAGES_DIR = flags.DEFINE_string(
    "images_dir", None, help="Folder of images: 2D PNG/JPEG/TIFF or NIfTI volumes "
    "(required to convert).")
_MASKS_DIR = flags.DEFINE_string(
    "masks_dir", None, help="Folder of masks with the same stems, .npy/PNG or NIfTI "
    "(required to convert).")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, help="Where shards and dataset.json go; must be empty or absent "
    "unless --overwrite (required to convert).")
_VERIFY = flags.DEFINE_string(
    "verify", None, help="Convert nothing: check the converted dataset in this folder "
    "(its manifest loads, every listed shard exists and matches its SHA-256). Exits 1 "
    "naming each bad shard. Takes no other flag.")

# The conversion flags are generated from `options.ConvertOptions`, the settings of
# `writer.convert_dataset`: each flag's name, default, help and choices live there.
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def _not_none(hint: Any) -> Any:
  """X of Optional[X]; any other type hint unchanged."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _option_fields() -> list[dataclasses.Field]:
  """The `ConvertOptions` fields that are flags (Beam's options come after `--`)."""
  return [f for f in dataclasses.fields(options_lib.ConvertOptions)
          if f.metadata.get("flag", True)]


def _define_option_flags() -> dict[str, flags.FlagHolder]:
  """Defines one flag per `ConvertOptions` field: its name, default, help and choices.

  Fields with "choices" become DEFINE_enum, label tuples comma-separated lists, a field
  with a "parse" function (the 2D spacing) a string that function reads, the others the
  DEFINE_* of their type.

  Returns:
    {field name: its flag}.
  """
  hints = typing.get_type_hints(options_lib.ConvertOptions)
  holders = {}
  for field in _option_fields():
    kind, default = _not_none(hints[field.name]), field.default
    kwargs = dict(help=field.metadata["help"])
    if "choices" in field.metadata:
      holder = flags.DEFINE_enum(field.name, default, list(field.metadata["choices"]),
                                 **kwargs)
    elif "parse" in field.metadata:
      holder = flags.DEFINE_string(field.name, default, **kwargs)
    elif typing.get_origin(kind) is tuple:
      holder = flags.DEFINE_list(
          field.name, None if default is None else [str(x) for x in default], **kwargs)
    else:
      holder = _DEFINE[kind](field.name, default, **kwargs)
    holders[field.name] = holder
  return holders


def _options(required_labels: Optional[list[int]], annotated_labels: list[int],
             beam_args: list[str]) -> options_lib.ConvertOptions:
  """The ConvertOptions of the parsed flags (labels parsed by main)."""
  values = {}
  for field in _option_fields():
    value = _OPTION_FLAGS[field.name].value
    parse = field.metadata.get("parse")
    values[field.name] = parse(value) if parse else value
  return options_lib.ConvertOptions(**dict(
      values, required_labels=required_labels, annotated_labels=annotated_labels,
      beam_args=beam_args))


_OPTION_FLAGS = _define_option_flags()
_REQUIRED_LABELS = _OPTION_FLAGS["required_labels"]
_ANNOTATED_LABELS = _OPTION_FLAGS["annotated_labels"]
_RUNNER = _OPTION_FLAGS["runner"]

flags.mark_flags_as_mutual_exclusive(["num_shards", "examples_per_shard"])


def _verify(data_dir: str) -> None:
  try:
    count, problems = writer.verify_dataset(data_dir, progress=sys.stderr.isatty())
  except writer.ConversionError as e:
    cli.fail(str(e))
  for problem in problems:  # one line per bad shard, each naming its file
    print(f"{cli.command_name()}: error: {problem}", file=sys.stderr)
  if problems:
    sys.exit(1)
  print(f"{data_dir}: {count} shards verified, all intact")


def main(argv: list[str]) -> None:
  beam_args = argv[1:]  # what follows `--`: Beam's pipeline options
  if beam_args and not _RUNNER.value:
    raise app.UsageError(f"unexpected arguments: {beam_args} (Beam pipeline options after "
                         "`--` need --runner)")
  own = [f for f in flags.FLAGS.get_flags_for_module(__name__) if f.name != "verify"]
  if _VERIFY.value is not None:
    given = [f"--{f.name}" for f in own if f.present]
    if given:
      cli.fail(f"--verify checks an existing dataset and takes no conversion flags; "
               f"found {', '.join(given)}")
    _verify(_VERIFY.value)
    return
  missing = [f"--{h.name}" for h in (_IMAGES_DIR, _MASKS_DIR, _OUTPUT_DIR) if not h.value]
  if missing:
    cli.fail(f"missing {', '.join(missing)}: --images_dir, --masks_dir and --output_dir "
             "are required to convert (or pass only --verify=DIR to check a converted "
             "dataset)")
  try:
    required = (None if _REQUIRED_LABELS.value is None
                else [int(x) for x in _REQUIRED_LABELS.value if x.strip()])
  except ValueError as e:
    raise app.UsageError(f"--required_labels: expected integers, found "
                         f"{_REQUIRED_LABELS.value}") from e
  try:
    annotated = [int(x) for x in _ANNOTATED_LABELS.value if x.strip()]
  except ValueError as e:
    raise app.UsageError(f"--annotated_labels: expected class ids, found "
                         f"{_ANNOTATED_LABELS.value}") from e
  try:
    result = writer.convert_dataset(
        _IMAGES_DIR.value, _MASKS_DIR.value, _OUTPUT_DIR.value,
        _options(required, annotated, beam_args),
        progress=sys.stderr.isatty())  # no bar in logs and captured output
  except (readers.InputError, schema.LabelError, writer.ConversionError, ValueError,
          OSError) as e:
    cli.fail(str(e))
  print(writer.format_summary(result))
  if result["dry_run"]:
    print(json.dumps(result["splits"], indent=2))
  else:
    print(f"dataset: {_OUTPUT_DIR.value}/dataset.json")


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
