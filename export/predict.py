"""Segments new scans with an exported SavedModel (no training code needed).

  spine-predict --saved_model=models/spineseg/1 --input=scans/ --output=masks/ --overlay
  spine-predict --saved_model=pretrained --input=scans/ --output=masks/  # shipped model

Input: one 2D slice (PNG/JPEG/TIFF/.npy), one NIfTI volume, one folder `NAME` holding
one DICOM series (*.dcm or files with the DICOM preamble; needs `pip install -e
".[dicom]"`), or a folder of them (files, and subfolders that each hold one series). A
model trained at a target spacing (spine-convert --target_spacing_mm) resamples each input
from its own spacing (NIfTI, DICOM: the geometry; 2D: --spacing_2d_mm, required) and maps
back. `--output` is a folder; for each input `NAME.ext` it receives
  2D:     NAME_mask.png (uint8 labels 0/1/2) and NAME_mask.npy
  NIfTI:  NAME_mask.nii.gz (or .nii): labels with the input's shape, affine, voxel order
  DICOM:  NAME_mask.nii.gz: labels in the series' voxel order (columns, rows, slices
          sorted by position) with its geometry as the affine (LPS turned RAS). A
          folder holding several series fails naming it: one series per folder.
          --output_format=dicom_seg: NAME.seg.dcm instead, a DICOM Segmentation of
          the series (needs `pip install -e ".[dicom_seg]"`); other inputs fail.
  --overlay: NAME_overlay.png (the slice, or the volume's middle sagittal slice, with
          discs in orange and vertebrae in blue).
  --save_probabilities: the mean class probabilities, float32, last axis the classes
          (0 background, 1 disc, 2 vertebra), before --postprocess:
          2D: NAME_probabilities.npy [H, W, 3];
          NIfTI: NAME_probabilities.nii.gz [X, Y, Z, 3], the input's voxel order and
          affine.
A bad input is reported with its file name; the others are still processed, and the run
exits non-zero listing the failures, then `spine-predict: error: N of M inputs failed`. Existing outputs are kept unless --overwrite. An
input's outputs appear all together or not at all; an OS error while writing (full disk,
read-only folder) stops the run with one line naming the file and the reason, followed by
every input not written (with --runner: only the inputs of that model call fail, the
other workers go on).
--tta (off by default; about 3x the time): scale test-time augmentation for a model
trained at a target spacing: the input is segmented with its spacing times 0.85, 1.0 and
1.15 and the mean probabilities decide; a model without a target spacing refuses it.
--saved_model=A,B,C: an ensemble; the mean of the members' probabilities decides (each
member resamples the input itself, so image sizes and target spacings may differ).
--postprocess (on by default; --nopostprocess): per class, connected components smaller
than 10% of that class's largest are set to background (3D for a volume, per slice for 2D).
--report: a QC page in OUTPUT/report/ (index.html + PNG mosaics): outlines, class sizes
(mm^3 for volumes), and flags for empty, thin, fragmented or implausibly small classes
(for the input's superior-inferior field of view).
--protocol=NAME: for models exported with one output head per labelling protocol
(spine-convert --protocol), segment with that protocol's head (default: each model's
default); --protocol=list prints each model's protocols and exits.
--pipeline=streaming (default): reading, the model and writing overlap (threads; one
model replica per local GPU); --pipeline=sequential: one input after another. Same bytes.

  spine-predict --saved_model=a/1,b/1 --input=scans/ --output=out/ --save_probabilities

  # The same on Apache Beam (pip install -e ".[beam]"); Beam's pipeline options follow
  # `--`. The same files, byte for byte, and the same failures.
  spine-predict --saved_model=models/spineseg/1 --input=scans/ --output=masks/ \
      --runner=DirectRunner -- --direct_num_workers=2 \
      --direct_running_mode=multi_processing
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags

from data_prep import cli  # first: it quiets TensorFlow before anything loads it
from export import model_flags

_SAVED_MODEL = model_flags.define_saved_model(" (one model time per member)")
# --input and --output are required but for --protocol=list (checked in main).
_INPUT = flags.DEFINE_string(
    "input", None, help="An image/.npy/NIfTI file, a folder holding one DICOM series, or "
    "a folder of them (series in subfolders). Required (not with --protocol=list).")
_OUTPUT = flags.DEFINE_string("output", None, help="Output folder (created if needed). "
                              "Required (not with --protocol=list).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, help="2D slices per model call.")
_OVERLAY = flags.DEFINE_bool("overlay", False, help="Also write PNG overlays.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, help="Replace existing outputs.")
_OUTPUT_FORMAT = flags.DEFINE_enum(
    "output_format", "nifti", ["nifti", "dicom_seg"], help="How a volume's mask is "
    "written. nifti: NAME_mask.nii.gz. dicom_seg: for a DICOM series NAME.seg.dcm, one "
    "DICOM Segmentation (BINARY; segments 1 intervertebral disc, 2 vertebra) "
    "referencing the series' images; any other input fails. Needs pip install -e "
    "\".[dicom_seg]\" (highdicom).")
_SPACING_2D_MM = model_flags.define_spacing_2d("2D inputs")
_TTA = model_flags.define_tta()
_SAVE_PROBABILITIES = flags.DEFINE_bool(
    "save_probabilities", False, help="Also write the mean class probabilities (float32, "
    "last axis 3 classes) beside each mask: NAME_probabilities.npy [H, W, 3] for 2D, "
    "NAME_probabilities.nii.gz [X, Y, Z, 3] for a volume. 12 bytes per voxel in memory "
    "and on disk before compression (a 512x512x300 volume: 0.9 GB).")
_POSTPROCESS = flags.DEFINE_bool(
    "postprocess", True, help="Remove islands: per class, connected components smaller "
    "than 10 percent of the class's largest become background (3D for a volume, per "
    "slice for 2D). Probabilities are saved before it. On by default: it raised every "
    "measured volume's Dice (docs/inference.md, Predict options); --nopostprocess turns it off.")
_REPORT = flags.DEFINE_bool(
    "report", False, help="Also write a QC page of the run to OUTPUT/report/ (index.html "
    "and one PNG mosaic per input): per input the outlined slice (a volume: its middle "
    "sagittal slice and neighbours), the predicted size of each class and flags for "
    "outputs that look wrong. An existing report needs --overwrite.")
_PROTOCOL = model_flags.define_protocol(
    "predicting", "--report names the protocol used.")
_PIPELINE = flags.DEFINE_enum(
    "pipeline", "streaming", ["streaming", "sequential"], help="streaming: inputs are "
    "read and decoded a few ahead of the model and written behind it, in threads, with "
    "one model replica per local GPU; memory stays bounded whatever the number of "
    "inputs. sequential: read, segment and write one input after the other. Both write "
    "the same bytes and report the same failures.")
_RUNNER = flags.DEFINE_string(
    "runner", None, help="Segment on Apache Beam with this runner (DirectRunner, "
    "DataflowRunner, FlinkRunner, SparkRunner, ...; needs the [beam] extra); Beam's "
    "pipeline options follow `--`, e.g. `-- --direct_num_workers=2 "
    "--direct_running_mode=multi_processing`. The files, the failures and --report are "
    "a local run's, byte for byte, except that a write error fails only the inputs it "
    "hits instead of stopping the run. Not with --pipeline (a local setting). Default: "
    "this process, no Beam.")
_REPORT_MIN_SLICES = flags.DEFINE_integer(
    "report_min_slices", 3, help="--report flags a volume's class found in fewer "
    "sagittal slices than this.", lower_bound=1)
_REPORT_MAX_COMPONENTS = flags.DEFINE_integer(
    "report_max_components", 30, help="--report flags a class in more connected pieces "
    "than this (a whole spine has 23 discs and 24 vertebrae).", lower_bound=1)

# After the last model_flags flag: --help lists those as this command's own.
flags.adopt_module_key_flags(model_flags)


def _beam_engine(runner: str, beam_args: list[str]):
  """The Beam engine of `predict_lib.predict` (`beam_predict`), or one line and exit 1:
  Beam not installed, an unknown runner or Beam option."""
  from data_prep import options  # pylint: disable=g-import-not-at-top
  try:
    options.beam_engine()  # imports Beam, or says which extra installs it
    from export import beam_predict  # pylint: disable=g-import-not-at-top
    return beam_predict.engine(runner, beam_args)
  except (options.ConversionError, ValueError) as e:
    cli.fail(str(e))


def main(argv):
  beam_args = argv[1:]  # what follows `--`: Beam's pipeline options
  if beam_args and not _RUNNER.value:
    raise app.UsageError(f"unexpected arguments: {beam_args} (Beam pipeline options after "
                         "`--` need --runner)")
  if _RUNNER.value and _PIPELINE.present:
    cli.fail("--pipeline chooses how this process runs the steps; with --runner Beam's "
             "workers run them: drop --pipeline")
  if _BATCH_SIZE.value < 1:
    raise app.UsageError(f"--batch_size must be >= 1, found {_BATCH_SIZE.value}")
  from data_prep import fileio, readers, schema  # pylint: disable=g-import-not-at-top
  if _PROTOCOL.value != schema.LIST_PROTOCOLS:
    for flag in (_INPUT, _OUTPUT):
      if flag.value is None:  # absl's own wording (data_prep/cli.py)
        raise app.UsageError(f"missing --{flag.name}, a required flag (--help lists the "
                             "flags)")
  try:
    spacing_2d = readers.parse_spacing_mm(_SPACING_2D_MM.value)
  except ValueError as e:  # one line, as every other fault
    cli.fail(str(e))
  # Imported here so that --help and flag errors do not pay for loading TensorFlow.
  from export import inference, portable, predict_lib, predict_report  # pylint: disable=g-import-not-at-top
  # Before the model loads: a bad Beam option must not cost it.
  engine = _beam_engine(_RUNNER.value, beam_args) if _RUNNER.value else None
  report = None
  if _REPORT.value:
    report = predict_report.Options(
        str(fileio.path(_OUTPUT.value) / "report"), min_slices=_REPORT_MIN_SLICES.value,
        max_components=_REPORT_MAX_COMPONENTS.value)
  try:
    model = inference.load_ensemble(inference.parse_model_list(_SAVED_MODEL.value))
    if _PROTOCOL.value == schema.LIST_PROTOCOLS:
      print("\n".join(inference.describe_protocols(model)))
      return
    written, failures = predict_lib.predict(
        model, _INPUT.value, _OUTPUT.value, batch_size=_BATCH_SIZE.value,
        overlay=_OVERLAY.value, overwrite=_OVERWRITE.value, spacing_2d_mm=spacing_2d,
        tta=_TTA.value, save_probabilities=_SAVE_PROBABILITIES.value,
        postprocess=_POSTPROCESS.value, report=report, protocol=_PROTOCOL.value,
        output_format=_OUTPUT_FORMAT.value, pipeline=_PIPELINE.value, engine=engine,
        progress=sys.stderr.isatty())  # no bar in logs and captured output
    # The inputs counted again only to say "N of M failed" (a folder listing).
    total = len(inference.list_inputs(_INPUT.value)) if failures else 0
  except predict_lib.OutputError as e:
    if e.written:
      print(f"spine-predict: wrote {len(e.written)} files to {_OUTPUT.value}", flush=True)
    # The error first: its message ends with ":" and announces the inputs listed below.
    print(f"{cli.command_name()}: error: {e}", file=sys.stderr)
    for _, message in e.failures:
      print(f"  {message}", file=sys.stderr)
    sys.exit(1)
  except (inference.InputError, portable.MissingExtraError) as e:
    cli.fail(str(e))
  except OSError as e:  # e.g. an unreadable input folder: one line, not a traceback
    cli.fail(f"{e.filename or _INPUT.value}: {inference.os_reason(e)}")
  print(f"spine-predict: wrote {len(written)} files to {_OUTPUT.value}")
  if report is not None:
    print(f"spine-predict: QC report: {fileio.path(report.folder) / 'index.html'}")
  cli.fail_if_any([message for _, message in failures], total)

def run():
  cli.run(main)  # --help lists this module's flags, also as a console script


if __name__ == "__main__":
  run()
