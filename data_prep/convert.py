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

import json
import sys

from absl import app, flags

from data_prep import cli  # first: it quiets TensorFlow before anything loads it
from data_prep import preprocess, readers, schema, writer

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
_ANNOTATED_LABELS = flags.DEFINE_list(
    "annotated_labels", ["0", "1", "2"], help="Classes these masks outline (background "
    "implied), e.g. 2 for a vertebra-only set: a class missing here is UNKNOWN on the "
    "unlabelled pixels, not background, and no loss punishes predicting it there.")
_REQUIRED_LABELS = flags.DEFINE_list(
    "required_labels", None, help="Keep only slices whose mask contains every one of "
    "these labels (after --label_map); default: 0 and every --annotated_labels class. An "
    "empty value keeps all slices.")
_LABEL_MAP = flags.DEFINE_string(
    "label_map", None, help="Collapse source label ids before filtering, e.g. "
    "'1-5:1,6-12:2' (0 maps to 0 unless listed). Unmapped values are an error.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.2, help="Fraction of cases for val.")
_TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.0, help="Fraction of cases for test.")
_SEED = flags.DEFINE_integer("seed", 0, help="Seed of the split by case.")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", None, help="Shards per split (examples dealt round robin).")
_EXAMPLES_PER_SHARD = flags.DEFINE_integer(
    "examples_per_shard", None,
    help=f"Examples per shard (default {writer.DEFAULT_EXAMPLES_PER_SHARD}).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 256, help="Side of the stored square slices (aspect ratio kept, padded).")
_TARGET_SPACING_MM = flags.DEFINE_float(
    "target_spacing_mm", None, help="Resample every slice to this many mm per pixel "
    "(from its own spacing: NIfTI affine, or --spacing_2d_mm), then centre it in the "
    "--image_size square, padded or cropped; stored in dataset.json and baked into the "
    "exported model. Default: fit each slice by its longer side, whatever its mm.")
_SPACING_2D_MM = flags.DEFINE_string(
    "spacing_2d_mm", None, help="mm per pixel of 2D images (they carry none): "
    f"{readers.SPACING_HELP}. Stored with each example; required for 2D images with "
    "--target_spacing_mm.")
_NORMALIZATION = flags.DEFINE_enum(
    "normalization", "percentile", list(preprocess.NORMALIZATIONS),
    help="Intensity normalization, per image (2D) or per volume (NIfTI).")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, help="Worker processes (default: all cores).")
_RUNNER = flags.DEFINE_string(
    "runner", None, help="Run the conversion as an Apache Beam pipeline on this runner "
    "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...; needs the [beam] "
    "extra); Beam's pipeline options follow `--`, e.g. `-- --direct_num_workers=2 "
    "--direct_running_mode=multi_processing`. Shards and dataset.json are byte-identical "
    "to a local run's. Default: local worker processes (--num_workers), no Beam.")
_COMPRESSION = flags.DEFINE_enum(
    "compression", "none", list(writer.COMPRESSIONS),
    help="TFRecord compression; shard names keep the .tfrecord suffix either way.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, help="Replace the dataset in a non-empty --output_dir.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, help="Read and process everything, report what would be written, "
    "write nothing.")
_STRICT = flags.DEFINE_bool(
    "strict", False, help="Fail on any skipped file (orphan, unreadable, mismatched pair) "
    "instead of reporting it.")
_CASE_ID_REGEX = flags.DEFINE_string(
    "case_id_regex", None, help="Group files into subjects for the split: the first "
    "capture group (or the whole match) of this regex on the file stem, e.g. '^(p\\d+)_'.")

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
        required_labels=required, annotated_labels=annotated,
        label_map=_LABEL_MAP.value,
        val_fraction=_VAL_FRACTION.value, test_fraction=_TEST_FRACTION.value,
        seed=_SEED.value, num_shards=_NUM_SHARDS.value,
        examples_per_shard=_EXAMPLES_PER_SHARD.value, image_size=_IMAGE_SIZE.value,
        normalization=_NORMALIZATION.value, num_workers=_NUM_WORKERS.value,
        compression=_COMPRESSION.value, overwrite=_OVERWRITE.value,
        dry_run=_DRY_RUN.value, strict=_STRICT.value, case_id_regex=_CASE_ID_REGEX.value,
        target_spacing_mm=_TARGET_SPACING_MM.value,
        spacing_2d_mm=readers.parse_spacing_mm(_SPACING_2D_MM.value),
        progress=sys.stderr.isatty(),  # no bar in logs and captured output
        runner=_RUNNER.value, beam_args=beam_args)
  except (readers.InputError, schema.LabelError, writer.ConversionError, ValueError,
          OSError) as e:
    cli.fail(str(e))
  print(writer.format_summary(result))
  if _DRY_RUN.value:
    print(json.dumps(result["splits"], indent=2))
  else:
    print(f"dataset: {_OUTPUT_DIR.value}/dataset.json")


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
