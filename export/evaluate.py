"""Scores an exported SavedModel: per-case and overall Dice (and HD95 for volumes).

  spine-evaluate --saved_model=models/spineseg/1 --images_dir=imgs --masks_dir=masks
  spine-evaluate --saved_model=models/spineseg/1 --data_dir=converted --split=val \
      --output_json=val_scores.json

Folder mode pairs images and masks by case id (file stem); 2D slices go through
`serving_default`, NIfTI volumes through `segment_volume` and also get HD95 in mm (from
the affine's voxel sizes). Converted mode reads the split's TFRecords and scores the
`segment_examples` masks in the stored square geometry, pooling the slices of each case.
Classes absent from a case's ground truth are reported as "absent". "mean" rows average
the cases where the class is present; "pooled" rows count all voxels of all cases at once.
A case that cannot be scored (an image without mask, an unreadable pair) is listed after
the scores of the others, and the run exits 1 with `spine-evaluate: error: N of M cases
failed`.
--tta (folder mode, off by default; about 3x the time): scale test-time augmentation as
spine-predict --tta, for a model with a target spacing.
--saved_model=A,B (both modes): an ensemble, as spine-predict's. --postprocess (folder
mode; on by default there, as in spine-predict, so the score is that of the masks
spine-predict writes; --nopostprocess scores the raw argmax).

  spine-evaluate --saved_model=a/1,b/1 --images_dir=imgs --masks_dir=masks --postprocess

--within_labelled_levels (folder mode): each class is scored only between the first and
last rows its ground truth labels, for masks labelled at some levels only (a diagnostic
of annotation protocols; data_prep.metrics.within_labelled_levels).
--protocol=NAME (both modes): for models exported with one output head per labelling
protocol, score that protocol's head (default: each model's default); the JSON's
"protocol" and the line after the table name it. --protocol=list prints each model's
protocols and exits.
"""
from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags

from data_prep import cli  # first: it quiets TensorFlow before anything loads it
from export import model_flags

_SAVED_MODEL = model_flags.define_saved_model()
_IMAGES_DIR = flags.DEFINE_string("images_dir", None, help="Folder of images (mode 1).")
_MASKS_DIR = flags.DEFINE_string(
    "masks_dir", None, help="Folder of ground-truth masks paired by file stem (mode 1).")
_LABEL_MAP = flags.DEFINE_string(
    "label_map", None,
    help="Mask value -> class, the grammar of spine-convert --label_map: e.g. "
    "'128:1,255:2' or '1-5:1,6-12:2' (mode 1; 0 is background unless listed). Without it "
    "masks must hold 0 background, 1 disc, 2 vertebra.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, help="spine-convert output (mode 2).")
_SPLIT = flags.DEFINE_string("split", "val", help="Split of --data_dir to score.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, help="Write the scores here.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, help="Slices per model call.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, help="Replace an existing JSON.")
_SPACING_2D_MM = model_flags.define_spacing_2d("2D images in --images_dir")
_TTA = model_flags.define_tta(" (--images_dir only)")
_POSTPROCESS = flags.DEFINE_bool(
    "postprocess", None, help="Score cleaned masks, as spine-predict --postprocess "
    "(--images_dir only; on by default there, as in spine-predict; --nopostprocess "
    "scores the raw argmax): per class, connected components smaller than 10 percent of "
    "the class's largest become background. A converted split (--data_dir) is scored "
    "without it, as the trainer's validation does.")
_PROTOCOL = model_flags.define_protocol(
    "scoring", "The JSON ('protocol') and the line after the table name the protocol scored.")
_WITHIN_LEVELS = flags.DEFINE_bool(
    "within_labelled_levels", False, help="Score each class only between the first "
    "and last image rows (superior -> inferior) its ground truth labels in a case; "
    "predictions of it above or below become background (--images_dir only). For masks "
    "labelled at some levels only, e.g. vertebral bodies T11-L5, where a predicted "
    "sacrum is unknown, not wrong. A diagnostic: the default scores every pixel.")

_RESAMPLE_MASKS = flags.DEFINE_bool(
    "resample_masks", False, help="Score a NIfTI label volume on another grid than its "
    "image's (a slice more, another affine) on the image's grid, resampled as "
    "spine-convert --resample_masks does (nearest neighbour by the two affines; refused "
    "when a label would be lost). --images_dir only. Default: such a pair is a failure.")

# After the last model_flags flag: --help lists those as this command's own.
flags.adopt_module_key_flags(model_flags)


def _unwritable(path: pathlib.Path) -> str | None:
  """Why `path` cannot be written (as one line), or None: creates its folder, probes it."""
  from data_prep import fileio  # pylint: disable=g-import-not-at-top
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = fileio.temporary_path(path)
    with fileio.open_file(probe, "w") as f:
      f.write("")  # gfile creates a file at its first write
    probe.unlink()
  except OSError as e:
    return f"cannot write {path}: {e.strerror or e}"
  return None


def _list_protocols() -> None:
  """--protocol=list: prints each model's protocols (the default marked)."""
  from export import inference  # pylint: disable=g-import-not-at-top
  try:
    model = inference.load_ensemble(inference.parse_model_list(_SAVED_MODEL.value))
  except ValueError as e:  # InputError names the folder
    cli.fail(str(e))
  print("\n".join(inference.describe_protocols(model)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from data_prep import schema  # pylint: disable=g-import-not-at-top
  if _PROTOCOL.value == schema.LIST_PROTOCOLS:  # before the modes: it needs none
    _list_protocols()
    return
  folders = _IMAGES_DIR.value or _MASKS_DIR.value
  if bool(folders) == bool(_DATA_DIR.value):
    raise app.UsageError("give either --images_dir and --masks_dir, or --data_dir")
  if folders and not (_IMAGES_DIR.value and _MASKS_DIR.value):
    raise app.UsageError("--images_dir and --masks_dir go together")
  if _DATA_DIR.value and _LABEL_MAP.value:
    raise app.UsageError("--label_map applies to --masks_dir only")
  if _DATA_DIR.value and _SPACING_2D_MM.value:
    raise app.UsageError("--spacing_2d_mm applies to --images_dir only (a converted "
                         "dataset stores its spacing)")
  if _DATA_DIR.value and _TTA.value:
    raise app.UsageError("--tta applies to --images_dir only (a converted split is "
                         "scored in its stored squares, at the model's target spacing)")
  if _DATA_DIR.value and _WITHIN_LEVELS.value:
    raise app.UsageError("--within_labelled_levels applies to --images_dir only")
  if _DATA_DIR.value and _RESAMPLE_MASKS.value:
    raise app.UsageError("--resample_masks applies to --images_dir only (a converted "
                         "dataset was resampled, or not, by spine-convert)")
  if _DATA_DIR.value and _POSTPROCESS.value:  # given explicitly (None: the default)
    raise app.UsageError("--postprocess applies to --images_dir only (a converted split "
                         "is scored in its padded squares, not the input's geometry)")
  from data_prep import readers  # pylint: disable=g-import-not-at-top
  try:
    spacing_2d = readers.parse_spacing_mm(_SPACING_2D_MM.value)
  except ValueError as e:
    cli.fail(str(e))
  if _BATCH_SIZE.value < 1:
    raise app.UsageError(f"--batch_size must be >= 1, found {_BATCH_SIZE.value}")
  from data_prep import fileio  # pylint: disable=g-import-not-at-top
  out_json = fileio.path(_OUTPUT_JSON.value) if _OUTPUT_JSON.value else None
  if out_json and out_json.is_dir():  # --overwrite would not help: say what is wrong
    cli.fail(f"--output_json={out_json}: expected a file, found a folder")
  if out_json and out_json.exists() and not _OVERWRITE.value:
    raise app.UsageError(f"{out_json} exists; pass --overwrite to replace it")
  if out_json:
    # Before the (long) evaluation: a JSON that cannot be written is found out now.
    problem = _unwritable(out_json)
    if problem:
      cli.fail(problem)
  # Imported here so that --help and flag errors do not pay for loading TensorFlow.
  from data_prep import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from export import evaluate_lib, inference  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    label_map = schema.parse_label_map(_LABEL_MAP.value)
  except schema.LabelError as e:
    raise app.UsageError(str(e))
  try:
    model = inference.load_ensemble(inference.parse_model_list(_SAVED_MODEL.value))
    if folders:
      report = evaluate_lib.evaluate_folders(
          model, _IMAGES_DIR.value, _MASKS_DIR.value, label_map=label_map,
          batch_size=_BATCH_SIZE.value, spacing_2d_mm=spacing_2d,
          tta=_TTA.value, postprocess=_POSTPROCESS.value is not False,
          within_levels=_WITHIN_LEVELS.value, protocol=_PROTOCOL.value,
          resample_masks=_RESAMPLE_MASKS.value,
          progress=sys.stderr.isatty())  # no bar in logs and captured output
    else:
      report = evaluate_lib.evaluate_split(model, _DATA_DIR.value, _SPLIT.value,
                                           batch_size=_BATCH_SIZE.value,
                                           protocol=_PROTOCOL.value)
  except ValueError as e:  # InputError is a ValueError; ours name the file.
    cli.fail(str(e))
  except OSError as e:  # e.g. an unreadable folder: one line, not a traceback
    cli.fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
  except tf.errors.OpError as e:  # the graph refused the data (e.g. another square size)
    first_line = (e.message.strip().splitlines() or [type(e).__name__])[0]
    cli.fail(f"the SavedModel {_SAVED_MODEL.value} failed on the data: "
             f"{type(e).__name__}: {first_line}")
  print(evaluate_lib.format_table(report))
  if report["protocol"] is not None:
    print(f"spine-evaluate: protocol {report['protocol']}")
  if out_json:
    try:
      manifest_lib.write_json_atomic(out_json, evaluate_lib.json_safe(report))
    except OSError as e:  # atomic: the old file (or none) is left, never half a JSON
      cli.fail(f"cannot write {out_json}: {e.strerror or e}")
    print(f"spine-evaluate: wrote {out_json}")
  # Each failure is one case (an orphan file, or a pair that could not be scored).
  cli.fail_if_any(report["failures"], len(report["cases"]) + len(report["failures"]),
                  unit="cases")


def run():
  cli.run(main)  # --help lists this module's flags, also as a console script


if __name__ == "__main__":
  run()
