"""The dataset manifest, `OUTPUT_DIR/dataset.json`, written last by the converter.

Its presence marks a finished dataset: the converter writes shards under temporary names,
renames them, and only then writes the manifest (itself via a temporary name). Readers
(trainer, evaluator, exporter) call `load`, which refuses a directory without one or with
another format version.

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
The converter adds more (flags, class frequencies, intensity statistics, skipped inputs).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from data_prep import fileio
from data_prep import schema

LABELS = schema.labels_dict()
_REQUIRED = ("format_version", "image_size", "num_classes", "normalization", "compression",
             "splits")


def path_of(data_dir: str | os.PathLike) -> "pathlib.Path | fileio.RemotePath":
  return fileio.path(data_dir) / schema.MANIFEST_NAME


def load(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Reads and validates the manifest of a converted dataset.

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
    manifest = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable manifest: {e}") from e
  validate(manifest, str(path))
  return manifest


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
  if manifest["compression"] not in schema.COMPRESSIONS:
    raise ValueError(f"{where}: unknown compression {manifest['compression']!r}; expected "
                     f"one of {sorted(schema.COMPRESSIONS)}")
  target = manifest.get("target_spacing_mm")
  if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                             or not target > 0 or target == float("inf")):
    raise ValueError(f"{where}: target_spacing_mm must be a positive number or null, found "
                     f"{target!r}")
  splits = manifest["splits"]
  unknown = sorted(set(splits) - set(schema.SPLITS)) if isinstance(splits, dict) else None
  if unknown is None or unknown:
    raise ValueError(f"{where}: splits must map {schema.SPLITS} to their shards, found "
                     f"{unknown if unknown else type(splits).__name__}")


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


def shard_paths(data_dir: str | os.PathLike, manifest: dict[str, Any],
                split: str) -> list[str]:
  """Paths of the shards of `split` listed in the manifest (empty if the split has none)."""
  shards = manifest["splits"].get(split, {}).get("shards", [])
  return [str(fileio.path(data_dir) / s["file"]) for s in shards]


def compression_type(manifest: dict[str, Any]) -> str:
  """The tf.data compression type ("" or "GZIP") of a loaded manifest.

  Raises:
    ValueError: for a compression value this reader does not know.
  """
  try:
    return schema.compression_type(manifest["compression"])
  except ValueError as e:
    raise ValueError(f"{schema.MANIFEST_NAME}: {e}") from None


# One atomic writer for every JSON file spineseg writes (see `fileio`).
write_json_atomic = fileio.write_json_atomic


def verify_shards(data_dir: str | os.PathLike, manifest: dict[str, Any],
                  progress: bool = False) -> list[str]:
  """Checks every shard the manifest lists against its recorded size and SHA-256.

  Args:
    data_dir: the converted dataset's folder.
    manifest: its loaded manifest (`load`).
    progress: draw a progress bar over the bytes hashed.

  Returns:
    One message per bad shard (missing, unreadable, or with another SHA-256), each
    starting with the shard's path; empty when every shard is intact. A dry-run
    manifest (no sha256 recorded) yields a message per shard as well.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  problems = []
  entries = [(split, s) for split in schema.SPLITS
             for s in manifest["splits"].get(split, {}).get("shards", [])]
  bar = fileio.Progress(len(entries), "verify", unit="shards", enabled=progress)
  for split, entry in entries:
    path = fileio.path(data_dir) / entry["file"]
    expected = entry.get("sha256")
    if not expected:
      problems.append(f"{path}: no sha256 recorded in {schema.MANIFEST_NAME}")
    elif not path.is_file():
      problems.append(f"{path}: missing ({split} shard listed in {schema.MANIFEST_NAME})")
    else:
      h = hashlib.sha256()
      try:
        with fileio.open_file(path, "rb") as f:
          for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
      except OSError as e:
        problems.append(f"{path}: unreadable: {e.strerror or e}")
      else:
        if h.hexdigest() != expected:
          problems.append(f"{path}: corrupted or truncated: SHA-256 {h.hexdigest()[:12]}... "
                          f"differs from {expected[:12]}... recorded at conversion "
                          f"({path.stat().st_size} bytes now); convert the data again")
    bar.step()
  return problems


def shard_bytes(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> int:
  """Total size in bytes of the shards the manifest lists (missing ones count 0)."""
  total = 0
  for split in schema.SPLITS:
    for s in manifest["splits"].get(split, {}).get("shards", []):
      p = fileio.path(data_dir) / s["file"]
      total += p.stat().st_size if p.is_file() else 0
  return total
