"""The dataset manifest, `OUTPUT_DIR/dataset.json`, written last by the converter.

Its presence marks a finished dataset: the converter writes shards under temporary names,
renames them, and only then writes the manifest (itself via a temporary name). Readers
(trainer, evaluator, exporter, inspector) call `load`, which refuses a directory without
one or with another format version, and receive one `Manifest`: the only code that knows
the keys below (as TFDS's `DatasetInfo` is its readers' one view of a dataset).

Keys every reader may rely on:
  format_version   int, == schema.FORMAT_VERSION
  image_size       int, side of the square slices
  num_classes      int (3: background, disc, vertebra)
  labels           {"0": "background", "1": "disc", "2": "vertebra"}
  normalization    {"method": one of preprocess.NORMALIZATIONS, "per": "image" | "volume"}
  compression      "none" | "gzip" (the TFRecord compression type)
  splits           {split: {"cases": int, "slices": int,
                            "shards": [{"file": name, "examples": int, "sha256": hex}]}}
Optional (absent from older manifests, which mean null):
  target_spacing_mm  float: mm per stored pixel (slices resampled, then centred in the
                     square); null: each slice fitted by its longer side.
  protocol           the labelling protocol the masks follow (`spine-convert
                     --protocol`, schema.check_protocol); absent: schema.DEFAULT_PROTOCOL
                     (the converter writes it only for another name).
The converter adds more (flags, annotated labels, class frequencies, intensity statistics,
cases, skipped inputs); manifests written by hand (tests, benchmarks) may lack them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, NamedTuple, Sequence

from data_prep import fileio
from data_prep import schema

LABELS = schema.labels_dict()
_REQUIRED = ("format_version", "image_size", "num_classes", "normalization", "compression",
             "splits")


def path_of(data_dir: str | os.PathLike) -> "pathlib.Path | fileio.RemotePath":
  return fileio.path(data_dir) / schema.MANIFEST_NAME


class Shard(NamedTuple):
  """One shard a manifest lists."""
  split: str
  path: str  # data_dir / its file name
  examples: int
  sha256: str | None  # None: not recorded (a dry run, or shards written by other tools)


@dataclasses.dataclass(frozen=True)
class Manifest:
  """A validated dataset manifest and the folder whose shards it lists.

  Built by `load`, or directly from a JSON object (tests; a model_dir's copy), which is
  validated here. Accessors return parts of `raw`: treat them as read-only.

  Attributes:
    data_dir: the folder holding dataset.json and the shards (a model_dir for its copy).
    raw: the JSON object exactly as dataset.json holds it: for writing the copy a
      model_dir keeps and for comparing it with one; readers use the accessors.
  """
  data_dir: str
  raw: dict[str, Any]

  def __post_init__(self):
    validate(self.raw, str(path_of(self.data_dir)))

  @property
  def format_version(self) -> int:
    return int(self.raw["format_version"])

  @property
  def image_size(self) -> int:
    """Side of the stored squares in pixels."""
    return int(self.raw["image_size"])

  @property
  def num_classes(self) -> int:
    return int(self.raw["num_classes"])

  @property
  def labels(self) -> dict[str, str]:
    """{"0": "background", ...}: class names by id as a string (`LABELS` when absent)."""
    return self.raw.get("labels", LABELS)

  @property
  def annotated_labels(self) -> list[int]:
    """Class ids the source folder outlines (every class when absent)."""
    return self.raw.get("annotated_labels", list(range(schema.NUM_CLASSES)))

  @property
  def protocol(self) -> str:
    """The labelling protocol of the masks (`schema.DEFAULT_PROTOCOL` when absent)."""
    return self.raw.get("protocol", schema.DEFAULT_PROTOCOL)

  @property
  def label_map(self) -> dict[int, int]:
    """{source id: class id} the converter applied (`schema.parse_label_map` of its
    --label_map; {} when none was given or not recorded)."""
    return schema.parse_label_map(self.raw.get("flags", {}).get("label_map") or "")

  @property
  def normalization(self) -> dict[str, Any]:
    """{"method", "per", ...}: how the stored intensities were normalized."""
    return self.raw["normalization"]

  @property
  def norm_method(self) -> str:
    """One of `preprocess.NORMALIZATIONS`."""
    return self.raw["normalization"]["method"]

  @property
  def compression(self) -> str:
    """The stored name: "none" or "gzip"."""
    return self.raw["compression"]

  @property
  def compression_type(self) -> str:
    """The tf.data compression type of the shards: "" or "GZIP"."""
    return schema.compression_type(self.raw["compression"])

  @property
  def target_spacing_mm(self) -> float | None:
    """mm per stored pixel; None: slices fitted by their longer side (older manifests)."""
    return self.raw.get("target_spacing_mm")

  @property
  def input_kind(self) -> str | None:
    """"2d" or "3d" (None: not recorded)."""
    return self.raw.get("input_kind")

  @property
  def splits(self) -> tuple[str, ...]:
    """The splits the manifest lists, in `schema.SPLITS` order (some may be empty)."""
    return tuple(s for s in schema.SPLITS if s in self.raw["splits"])

  def num_cases(self, split: str) -> int:
    """Cases converted into `split` (0 for a split the manifest does not list)."""
    return int(self.raw["splits"].get(split, {}).get("cases", 0))

  def num_slices(self, split: str) -> int:
    """Slices (examples) stored in `split` (0 for a split the manifest does not list)."""
    return int(self.raw["splits"].get(split, {}).get("slices", 0))

  def shards(self, *splits: str) -> list[Shard]:
    """The shards of `splits` (default: every split in `schema.SPLITS` order)."""
    out = []
    for split in splits or schema.SPLITS:
      for entry in self.raw["splits"].get(split, {}).get("shards", []):
        out.append(Shard(split, str(fileio.path(self.data_dir) / entry["file"]),
                         int(entry.get("examples", 0)), entry.get("sha256") or None))
    return out

  def files(self, split: str) -> list[str]:
    """Paths of the shards of `split` (empty if the split has none)."""
    return [s.path for s in self.shards(split)]

  @property
  def cases(self) -> list[dict[str, Any]]:
    """The converter's per-case records ({"id", "split", "slices_kept", ...}); [] when
    the manifest was written by hand."""
    return self.raw.get("cases", [])

  @property
  def totals(self) -> dict[str, int]:
    """The converter's counts (pairs, slices_written, ...); {} if absent."""
    return self.raw.get("totals", {})

  @property
  def class_pixel_frequencies(self) -> dict[str, list[float]]:
    """{split or "all": fraction of pixels per class}; {} if absent."""
    return self.raw.get("class_pixel_frequencies", {})

  @property
  def intensity_statistics(self) -> dict[str, dict[str, float]]:
    """{"raw" | "stored": {"min", "max", "mean", "std", ...}}; {} if absent."""
    return self.raw.get("intensity_statistics", {})

  @property
  def skipped_files(self) -> list[dict[str, str]]:
    """Inputs the converter skipped ({"path", "reason"}); [] if absent."""
    return self.raw.get("skipped", {}).get("files", [])

  @property
  def skipped_slices(self) -> list[dict[str, Any]]:
    """Slices the converter pruned ({"case_id", "slice_index", "source", "reason"})."""
    return self.raw.get("skipped", {}).get("slices", [])


def load(data_dir: str | os.PathLike) -> Manifest:
  """Reads and validates the manifest of a converted dataset (or of a model_dir's copy).

  Raises:
    FileNotFoundError: the directory holds no manifest (not a converter output, or an
      unfinished conversion).
    ValueError: the manifest is unreadable, lacks a key, or has another format version.
  """
  path = path_of(data_dir)
  if not path.is_file():
    raise FileNotFoundError(
        f"{path}: no dataset manifest; expected the output directory of spine-convert "
        "(a conversion that did not finish leaves none)")
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable manifest: {e}") from e
  return Manifest(str(data_dir), raw)


def validate(manifest: dict[str, Any], where: str = schema.MANIFEST_NAME) -> None:
  """Checks the keys every reader relies on (see the module docstring).

  Raises:
    ValueError: naming `where`, the key, and what was expected versus found.
  """
  if not isinstance(manifest, dict):
    raise ValueError(f"{where}: expected a JSON object, found {type(manifest).__name__}")
  missing = [k for k in _REQUIRED if k not in manifest]
  if missing:
    raise ValueError(f"{where}: manifest lacks keys {missing}")
  if manifest["format_version"] != schema.FORMAT_VERSION:
    raise ValueError(f"{where}: format version {manifest['format_version']}, this spineseg "
                     f"reads version {schema.FORMAT_VERSION}; convert the data again")
  size = manifest["image_size"]
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"{where}: image_size must be a positive integer, found {size!r}")
  if manifest["num_classes"] != schema.NUM_CLASSES:
    raise ValueError(f"{where}: num_classes {manifest['num_classes']!r}, this spineseg "
                     f"segments {schema.NUM_CLASSES} classes {schema.CLASS_NAMES}")
  norm = manifest["normalization"]
  if not isinstance(norm, dict) or not isinstance(norm.get("method"), str):
    raise ValueError(f"{where}: normalization must be an object naming its method, found "
                     f"{norm!r}")
  if manifest["compression"] not in schema.COMPRESSIONS:
    raise ValueError(f"{where}: unknown compression {manifest['compression']!r}; expected "
                     f"one of {sorted(schema.COMPRESSIONS)}")
  target = manifest.get("target_spacing_mm")
  if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                             or not target > 0 or target == float("inf")):
    raise ValueError(f"{where}: target_spacing_mm must be a positive number or null, found "
                     f"{target!r}")
  if "protocol" in manifest:
    try:
      schema.check_protocol(manifest["protocol"])
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
  splits = manifest["splits"]
  unknown = sorted(set(splits) - set(schema.SPLITS)) if isinstance(splits, dict) else None
  if unknown is None or unknown:
    raise ValueError(f"{where}: splits must map {schema.SPLITS} to their shards, found "
                     f"{unknown if unknown else type(splits).__name__}")
  for split, info in splits.items():
    shards = info.get("shards", []) if isinstance(info, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards):
      raise ValueError(f"{where}: splits.{split} must be an object whose shards are "
                       f"[{{\"file\": name, ...}}], found {info!r:.200}")


def make(*, image_size: int, normalization: str, per: str, compression: str,
         splits: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Builds a manifest with the keys every reader relies on (plus `extra` keys).

  The converter adds its statistics and skip lists as `extra`; tests and benchmarks that
  write shards by hand use the same function, so no one spells the contract twice.

  Args:
    image_size: side of the stored squares.
    normalization: one of `preprocess.NORMALIZATIONS`.
    per: "image" (2D) or "volume" (NIfTI): what the statistics were computed over.
    compression: "none" or "gzip".
    splits: {split: {"cases", "slices", "shards": [{"file", "examples", "sha256"}]}}.
    extra: more top-level keys ("normalization" is merged into the normalization entry).

  Raises:
    ValueError: the result would not pass `validate`.
  """
  manifest = {
      "format_version": schema.FORMAT_VERSION,
      "image_size": int(image_size),
      "num_classes": schema.NUM_CLASSES,
      "labels": schema.labels_dict(),
      "normalization": {"method": normalization, "per": per},
      "compression": compression,
      "splits": splits,
  }
  for key, value in (extra or {}).items():
    if key == "normalization":
      manifest["normalization"].update(value)
    else:
      manifest[key] = value
  validate(manifest, "manifest.make")
  return manifest


# One atomic writer for every JSON file spineseg writes (see `fileio`).
write_json_atomic = fileio.write_json_atomic


def verify_shards(shards: Sequence[Shard], progress: bool = False) -> list[str]:
  """Checks shards against the SHA-256 their manifest records.

  Args:
    shards: `Manifest.shards` (of every split, or of those to check).
    progress: draw a progress bar over the shards hashed.

  Returns:
    One message per bad shard (missing, unreadable, or with another SHA-256), each
    starting with the shard's path; empty when every shard is intact. A dry-run
    manifest (no sha256 recorded) yields a message per shard as well.
  """
  problems = []
  bar = fileio.Progress(len(shards), "verify", unit="shards", enabled=progress)
  for shard in shards:
    path = fileio.path(shard.path)
    expected = shard.sha256
    if not expected:
      problems.append(f"{path}: no sha256 recorded in {schema.MANIFEST_NAME}")
    elif not path.is_file():
      problems.append(f"{path}: missing ({shard.split} shard listed in "
                      f"{schema.MANIFEST_NAME})")
    else:
      try:
        digest = fileio.sha256(path)
      except OSError as e:
        problems.append(f"{path}: unreadable: {e.strerror or e}")
      else:
        if digest != expected:
          problems.append(f"{path}: corrupted or truncated: SHA-256 {digest[:12]}... "
                          f"differs from {expected[:12]}... recorded at conversion "
                          f"({path.stat().st_size} bytes now); convert the data again")
    bar.step()
  return problems


def shard_bytes(shards: Sequence[Shard]) -> int:
  """Total size in bytes of `shards` (`Manifest.shards`; missing ones count 0)."""
  total = 0
  for shard in shards:
    p = fileio.path(shard.path)
    total += p.stat().st_size if p.is_file() else 0
  return total
