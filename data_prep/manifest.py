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
The converter adds more (flags, class frequencies, intensity statistics, skipped inputs).
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

from data_prep import schema

LABELS = {"0": "background", "1": "disc", "2": "vertebra"}
_REQUIRED = ("format_version", "image_size", "num_classes", "normalization", "compression",
             "splits")


def path_of(data_dir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(data_dir) / schema.MANIFEST_NAME


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
  missing = [k for k in _REQUIRED if k not in manifest]
  if missing:
    raise ValueError(f"{path}: manifest lacks keys {missing}")
  if manifest["format_version"] != schema.FORMAT_VERSION:
    raise ValueError(f"{path}: format version {manifest['format_version']}, this spineseg "
                     f"reads version {schema.FORMAT_VERSION}; convert the data again")
  return manifest


def shard_paths(data_dir: str | os.PathLike, manifest: dict[str, Any],
                split: str) -> list[str]:
  """Paths of the shards of `split` listed in the manifest (empty if the split has none)."""
  shards = manifest["splits"].get(split, {}).get("shards", [])
  return [str(pathlib.Path(data_dir) / s["file"]) for s in shards]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON to a temporary file in the same directory, then renames it into place."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the manifest is as readable as the shards.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
