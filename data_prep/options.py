"""Every setting of a conversion, validated once: `ConvertOptions`.

`spine-convert` generates one flag per field (name, default, help text and choices come
from here; `beam_args` come after `--`), both engines (`writer`'s local workers and
`beam_convert`) read the same object, and the manifest's "flags" entry is derived from it
(`manifest_flags`). Constructing one checks everything that can be checked before any
input is read, so a typo fails at once instead of after an hour of conversion.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Optional

from data_prep import preprocess, readers, schema, slices
from data_prep.shards import ConversionError

DEFAULT_EXAMPLES_PER_SHARD = 512  # ~170 MB shards at 256 px: large reads, few files.
COMPRESSIONS = ("none", "gzip")


def _setting(default: Any, text: str, **metadata: Any) -> Any:
  """A field with its flag's help `text` (and "choices" or "parse") as metadata."""
  return dataclasses.field(default=default, metadata=dict(help=text, **metadata))


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  """The settings of one conversion, normalized and checked on construction.

  Labels become sorted tuples (`annotated_labels` with background added,
  `required_labels` defaulting to `annotated_labels`), `target_spacing_mm` a float and
  `spacing_2d_mm` a (row, column) tuple of floats; every other value is kept as given, so
  the manifest records what the caller asked for. Each field's meaning is its flag's
  help text (metadata "help"); the field order is the flags' order.

  Raises (on construction):
    ValueError: contradictory or unknown options (the message names them), a malformed
      protocol name, a Beam runner or option Beam does not know.
    schema.LabelError: a malformed `label_map`.
    re.error: a `case_id_regex` that does not compile.
    ConversionError: a Beam runner without Apache Beam installed.
  """
  annotated_labels: tuple[int, ...] = _setting(
      (0, 1, 2), "Classes these masks outline (background implied), e.g. 2 for a "
      "vertebra-only set: a class missing here is UNKNOWN on the unlabelled pixels, not "
      "background, and no loss punishes predicting it there.")
  required_labels: Optional[tuple[int, ...]] = _setting(
      None, "Keep only slices whose mask contains every one of these labels (after "
      "--label_map); default: 0 and every --annotated_labels class. An empty value keeps "
      "all slices.")
  slices_per_case: Optional[int] = _setting(
      None, "Keep at most this many of each case's slices that pass the label filter, "
      f"chosen deterministically: {slices.PICK_RULE}. For studies of how many labelled "
      "slices a new scanner needs. Default: every one.")
  label_map: Optional[str] = _setting(
      None, "Collapse source label ids before filtering, e.g. '1-5:1,6-12:2' (0 maps to 0 "
      "unless listed). Unmapped values are an error.")
  protocol: str = _setting(
      schema.DEFAULT_PROTOCOL, "Name of the labelling protocol these masks follow (1-32 of "
      "a-z, 0-9, _), recorded in dataset.json and every example: folders whose masks are "
      "drawn alike (e.g. discs between the endplates) share a name, and spine-train gives "
      "each protocol of its --data_dir list its own output head.")
  val_fraction: float = _setting(0.2, "Fraction of cases for val.")
  test_fraction: float = _setting(0.0, "Fraction of cases for test.")
  seed: int = _setting(0, "Seed of the split by case.")
  num_shards: Optional[int] = _setting(
      None, "Shards per split (examples dealt round robin).")
  examples_per_shard: Optional[int] = _setting(
      None, f"Examples per shard (default {DEFAULT_EXAMPLES_PER_SHARD}).")
  image_size: int = _setting(
      256, "Side of the stored square slices (aspect ratio kept, padded).")
  target_spacing_mm: Optional[float] = _setting(
      None, "Resample every slice to this many mm per pixel (from its own spacing: NIfTI "
      "affine, or --spacing_2d_mm), then centre it in the --image_size square, padded or "
      "cropped; stored in dataset.json and baked into the exported model. Default: fit "
      "each slice by its longer side, whatever its mm.")
  spacing_2d_mm: Optional[tuple[float, float]] = _setting(
      None, f"mm per pixel of 2D images (they carry none): {readers.SPACING_HELP}. Stored "
      "with each example; required for 2D images with --target_spacing_mm.",
      parse=readers.parse_spacing_mm)
  resample_masks: bool = _setting(
      False, "A NIfTI label volume on another grid than its image's (a slice more, "
      "another affine) is resampled onto the image's grid, nearest neighbour by the two "
      "affines, when it covers the whole image and no labelled voxel falls outside it. "
      "Default: such a pair is skipped as mismatched.")
  normalization: str = _setting(
      "percentile", "Intensity normalization, per image (2D) or per volume (NIfTI).",
      choices=preprocess.NORMALIZATIONS)
  num_workers: Optional[int] = _setting(
      None, "Worker processes (default: all cores).")
  runner: Optional[str] = _setting(
      None, "Run the conversion as an Apache Beam pipeline on this runner (DirectRunner, "
      "DataflowRunner, FlinkRunner, SparkRunner, ...; needs the [beam] extra); Beam's "
      "pipeline options follow `--`, e.g. `-- --direct_num_workers=2 "
      "--direct_running_mode=multi_processing`. Shards and dataset.json are "
      "byte-identical to a local run's. Default: local worker processes (--num_workers), "
      "no Beam.")
  compression: str = _setting(
      "none", "TFRecord compression; shard names keep the .tfrecord suffix either way.",
      choices=COMPRESSIONS)
  overwrite: bool = _setting(False, "Replace the dataset in a non-empty --output_dir.")
  dry_run: bool = _setting(
      False, "Read and process everything, report what would be written, write nothing.")
  strict: bool = _setting(
      False, "Fail on any skipped file (orphan, unreadable, mismatched pair) instead of "
      "reporting it.")
  case_id_regex: Optional[str] = _setting(
      None, "Group files into subjects for the split: the first capture group (or the "
      "whole match) of this regex on the file stem, e.g. '^(p\\d+)_'.")
  # Not a flag: spine-convert takes Beam's pipeline options from after `--`.
  beam_args: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(flag=False))

  def __post_init__(self):
    def normalize(name, value):  # A frozen dataclass sets its fields only this way.
      object.__setattr__(self, name, value)

    annotated = sorted({0} | set(int(x) for x in self.annotated_labels))
    bad = [x for x in annotated if not 0 <= x < schema.NUM_CLASSES]
    if bad:
      raise ValueError(f"annotated_labels {bad} are not class ids "
                       f"0..{schema.NUM_CLASSES - 1}")
    normalize("annotated_labels", tuple(annotated))
    required = annotated if self.required_labels is None else self.required_labels
    normalize("required_labels", tuple(sorted(set(int(x) for x in required))))
    normalize("beam_args", tuple(self.beam_args))
    if self.runner:  # A missing Beam or a bad Beam option fails before any work too.
      if self.num_workers is not None:
        raise ValueError("num_workers sizes the local worker pool; with a Beam runner give "
                         "the runner's own option instead (e.g. --direct_num_workers=2)")
      if self.dry_run:
        raise ValueError("a dry run writes nothing and runs locally; drop the Beam runner")
      self.pipeline_options()
    elif self.beam_args:
      raise ValueError(f"Beam pipeline options {list(self.beam_args)} need a Beam runner")
    self._check_numbers()
    if self.target_spacing_mm is not None:
      normalize("target_spacing_mm", float(self.target_spacing_mm))
      if not (math.isfinite(self.target_spacing_mm) and self.target_spacing_mm > 0):
        raise ValueError(f"--target_spacing_mm must be a positive number of mm, found "
                         f"{self.target_spacing_mm}")
    if self.spacing_2d_mm is not None:
      normalize("spacing_2d_mm", tuple(float(v) for v in self.spacing_2d_mm))
    schema.parse_label_map(self.label_map)
    schema.check_protocol(self.protocol)
    if self.protocol in schema.RESERVED_PROTOCOLS:  # spine-predict could not select it
      raise ValueError(f"--protocol={self.protocol}: a reserved word of spine-predict "
                       f"--protocol ({', '.join(schema.RESERVED_PROTOCOLS)}); choose "
                       "another name")
    if self.case_id_regex:
      try:
        re.compile(self.case_id_regex)
      except re.error as e:  # not a ValueError: it would escape as a traceback
        raise ValueError(f"--case_id_regex={self.case_id_regex!r}: not a regular "
                         f"expression ({e})") from None

  def _check_numbers(self) -> None:
    if self.image_size < 8:
      raise ValueError(f"image_size must be at least 8, found {self.image_size}")
    if self.normalization not in preprocess.NORMALIZATIONS:
      raise ValueError(f"normalization must be one of {preprocess.NORMALIZATIONS}, found "
                       f"{self.normalization!r}")
    if self.compression not in COMPRESSIONS:
      raise ValueError(f"compression must be one of {COMPRESSIONS}, found "
                       f"{self.compression!r}")
    val, test = self.val_fraction, self.test_fraction
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
      raise ValueError(f"val_fraction ({val}) and test_fraction ({test}) must be in [0, 1) "
                       "and sum to less than 1")
    if self.num_shards is not None and self.examples_per_shard is not None:
      raise ValueError("give num_shards or examples_per_shard, not both")
    if (self.num_shards is not None and self.num_shards < 1) or (
        self.examples_per_shard is not None and self.examples_per_shard < 1):
      raise ValueError("num_shards and examples_per_shard must be positive")
    if self.workers < 1:
      raise ValueError(f"num_workers must be positive, found {self.workers}")
    if self.slices_per_case is not None and self.slices_per_case < 1:
      raise ValueError(f"--slices_per_case must be a positive number of slices, found "
                       f"{self.slices_per_case} (leave it out to keep every slice)")
    bad = [x for x in self.required_labels if not 0 <= x < schema.NUM_CLASSES]
    if bad:
      raise ValueError(f"required_labels {bad} are not class ids "
                       f"0..{schema.NUM_CLASSES - 1}")

  @property
  def workers(self) -> int:
    """Local worker processes: `num_workers`, or all cores (0 and None alike)."""
    return self.num_workers or os.cpu_count() or 1

  @property
  def shard_args(self) -> tuple[Optional[int], Optional[int], str]:
    """(num_shards, examples_per_shard, compression) as `shards.ShardSet` takes them."""
    per_shard = self.examples_per_shard
    if self.num_shards is None and per_shard is None:
      per_shard = DEFAULT_EXAMPLES_PER_SHARD
    return self.num_shards, per_shard, self.compression

  def case_kwargs(self) -> dict[str, Any]:
    """The keyword arguments of `slices.process_case` for every case."""
    return dict(image_size=self.image_size, normalization=self.normalization,
                required_labels=list(self.required_labels),
                label_map=schema.parse_label_map(self.label_map),
                annotated_labels=list(self.annotated_labels),
                target_spacing_mm=self.target_spacing_mm, spacing_2d_mm=self.spacing_2d_mm,
                protocol=self.protocol, slices_per_case=self.slices_per_case,
                resample_masks=self.resample_masks)

  def pipeline_options(self):
    """Beam's PipelineOptions for `runner` and `beam_args` (`beam_convert`)."""
    return beam_engine().pipeline_options(self.runner, self.beam_args)

  def manifest_flags(self, images_dir: Any, masks_dir: Any,
                     output_dir: Any) -> dict[str, Any]:
    """The manifest's "flags" entry: the folders and the options that shape the output.

    Key order and values are those dataset.json has always held (JSON-ready: lists, ""
    for an absent label map or regex, the examples per shard used), so that a
    conversion's manifest bytes stay put; `slices_per_case` and `resample_masks` are added
    only when set.
    """
    given = ({} if self.slices_per_case is None
             else {"slices_per_case": self.slices_per_case})
    if self.resample_masks:
      given["resample_masks"] = True
    return dict(images_dir=str(images_dir), masks_dir=str(masks_dir),
                output_dir=str(output_dir), required_labels=list(self.required_labels),
                annotated_labels=list(self.annotated_labels),
                label_map=self.label_map or "", val_fraction=self.val_fraction,
                test_fraction=self.test_fraction, seed=self.seed,
                num_shards=self.num_shards, examples_per_shard=self.shard_args[1],
                image_size=self.image_size, normalization=self.normalization,
                compression=self.compression, strict=self.strict,
                case_id_regex=self.case_id_regex or "",
                target_spacing_mm=self.target_spacing_mm,
                spacing_2d_mm=list(self.spacing_2d_mm) if self.spacing_2d_mm else None,
                **given)


def beam_engine():
  """The Beam engine (`beam_convert`), imported only when asked for: Beam is optional.

  Raises:
    ConversionError: Apache Beam is not installed.
  """
  try:
    from data_prep import beam_convert  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if (e.name or "").split(".")[0] != "apache_beam":
      raise
    raise ConversionError("a Beam runner needs Apache Beam, which is not installed: "
                          "pip install 'spineseg[beam]' (in a checkout: pip install -e "
                          "'.[beam]')") from None
  return beam_convert
