"""Running an exported SavedModel on files: loading, reading inputs, batching.

Shared by `spine-predict` and `spine-evaluate`. Uses only the SavedModel's signatures
(never the training code): `serving_default` for 2D slices, `segment_volume` for the
slices of one NIfTI volume (normalization statistics over the whole volume, as the
converter computes them).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Iterable

import numpy as np
import tensorflow as tf

from data_prep import orientation
from data_prep import readers

INPUT_SUFFIXES = readers.IMAGE_2D_SUFFIXES + (".npy",) + readers.NIFTI_SUFFIXES
REQUIRED_SIGNATURES = ("serving_default", "segment_volume")
# Written by spine-export next to the SavedModel (serving.METADATA_FILE; not imported from
# there, so that predict and evaluate never load Keras).
METADATA_FILE = "assets.extra/spineseg.json"


# One error type for every unusable input, whichever module detects it.
InputError = readers.InputError


def os_reason(error: BaseException) -> str:
  """The OS's own words for an OSError ("No space left on device"), else the error text."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return str(error) or type(error).__name__


def exit_if_failures(program: str, messages: list[str]) -> None:
  """Lists failed inputs on stderr and exits 1; returns when there are none."""
  if not messages:
    return
  print(f"{program}: {len(messages)} input(s) failed:", file=sys.stderr)
  for message in messages:
    print(f"  {message}", file=sys.stderr)
  sys.exit(1)


def _read_metadata(path: pathlib.Path) -> dict[str, Any]:
  """The export metadata of a SavedModel folder ({} for exports that predate it)."""
  meta_path = path / METADATA_FILE
  if not meta_path.is_file():
    return {}
  try:
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{meta_path}: unreadable export metadata: {os_reason(e)}; "
                     "re-export the model with spine-export") from e
  if not isinstance(metadata, dict):
    raise InputError(f"{meta_path}: expected a JSON object, found "
                     f"{type(metadata).__name__}; re-export the model with spine-export")
  return metadata


def _image_size(loaded: Any, metadata: dict[str, Any], path: pathlib.Path) -> int | None:
  """The square side the model was exported for: metadata first, else the graph."""
  if "image_size" in metadata:
    try:
      return int(metadata["image_size"])
    except (TypeError, ValueError):
      raise InputError(f"{path / METADATA_FILE}: image_size must be an integer, found "
                       f"{metadata['image_size']!r}") from None
  # Older exports: segment_examples returns [N, S, S, 3] squares with S static.
  if "segment_examples" in loaded.signatures:
    shape = loaded.signatures["segment_examples"].structured_outputs["probabilities"].shape
    if shape.rank == 4 and shape[1] is not None:
      return int(shape[1])
  return None


def load_saved_model(path: str | os.PathLike) -> Any:
  """Loads an exported spineseg SavedModel.

  Besides its signatures the returned object carries `spineseg_metadata` (the dict of
  `assets.extra/spineseg.json`, {} if absent) and `spineseg_image_size` (the square side
  in pixels the model was exported for, or None if unknown), so that callers can refuse
  data prepared at another size.

  Raises:
    InputError: the folder is missing, holds no SavedModel, cannot be loaded, lacks
      the spineseg signatures, or its metadata is corrupt.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise InputError(f"{path}: SavedModel directory does not exist")
  if not ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()):
    raise InputError(f"{path}: not a SavedModel (no saved_model.pb); expected the "
                     "version folder written by spine-export, e.g. models/spineseg/1")
  try:
    loaded = tf.saved_model.load(str(path))
  except Exception as e:  # TF raises many types for a corrupt or incompatible model.
    raise InputError(f"{path}: cannot load SavedModel: {type(e).__name__}: {e}") from e
  missing = [s for s in REQUIRED_SIGNATURES if s not in loaded.signatures]
  if missing:
    raise InputError(f"{path}: SavedModel lacks signatures {missing}; found "
                     f"{sorted(loaded.signatures)} (export it with spine-export)")
  loaded.spineseg_metadata = _read_metadata(path)
  loaded.spineseg_image_size = _image_size(loaded, loaded.spineseg_metadata, path)
  return loaded


def list_inputs(path: str | os.PathLike) -> list[pathlib.Path]:
  """The input file itself, or the supported files of a folder (natural order).

  Raises:
    InputError: the path does not exist, or a folder holds no supported file.
  """
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise InputError(f"{path}: input does not exist")
  files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
           and readers.split_name(p)[1] in INPUT_SUFFIXES]
  if not files:
    raise InputError(f"{path}: folder holds no input of types {INPUT_SUFFIXES}")
  return sorted(files, key=lambda p: readers.natural_key(p.name))


def _read_npy_image(path: str) -> readers.Case:
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:  # NumPy raises several types for a corrupt file.
    raise InputError(f"{path}: unreadable .npy image: {type(e).__name__}: {e}") from e
  if data.ndim == 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 2:
    raise InputError(f"{path}: expected a 2D grayscale slice [H, W] (or [H, W, 1]), "
                     f"found shape {data.shape}")
  if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
    raise InputError(f"{path}: expected numeric intensities, found dtype {data.dtype}")
  image = data.astype(np.float32)
  if not np.all(np.isfinite(image)):
    raise InputError(f"{path}: expected finite intensities, found NaN/Inf")
  return readers.Case(case_id=readers.split_name(path)[0], image=image[None], mask=None,
                      spacing=(1.0, 1.0), image_path=path, kind="2d",
                      original_shape=data.shape)


def read_input(path: str | os.PathLike) -> readers.Case:
  """Reads a 2D slice (PNG/JPEG/TIFF/.npy) or a NIfTI volume, in display order.

  Raises:
    InputError: naming the file (unreadable, RGB, wrong rank, 2D/4D NIfTI, ...).
  """
  path = str(path)
  if readers.split_name(path)[1] == ".npy":
    return _read_npy_image(path)
  return readers.read_image(path)


def segment_slices(model: Any, images: np.ndarray) -> np.ndarray:
  """Label masks uint8 [N, H, W] of raw slices [N, H, W] sharing one size."""
  x = tf.constant(np.asarray(images, dtype=np.float32)[..., None])
  return model.signatures["serving_default"](images=x)["mask"].numpy()


def segment_volume(model: Any, volume: np.ndarray) -> np.ndarray:
  """Label mask uint8 [S, H, W] of one volume's display-order slices [S, H, W]."""
  x = tf.constant(np.asarray(volume, dtype=np.float32)[..., None])
  return model.signatures["segment_volume"](images=x)["mask"].numpy()


def orientation_back(case: readers.Case, mask: np.ndarray) -> np.ndarray:
  """A display-order [S, H, W] prediction of a NIfTI case, in the file's voxel order."""
  return orientation.from_display(mask, case.transform)


def segment_cases_2d(model: Any, cases: Iterable[readers.Case],
                     batch_size: int) -> Iterable[tuple[readers.Case, np.ndarray]]:
  """Yields (case, mask [H, W]) for 2D cases, batching slices of equal size together.

  Slices of one size wait in a bucket until it holds `batch_size` (a signature call
  takes one size); leftovers are flushed at the end. Order of the results is therefore
  not the input order.
  """
  buckets: dict[tuple[int, int], list[readers.Case]] = {}

  def flush(key):
    batch = buckets.pop(key)
    masks = segment_slices(model, np.stack([c.image[0] for c in batch]))
    yield from zip(batch, masks)

  for case in cases:
    key = case.image.shape[1:]
    buckets.setdefault(key, []).append(case)
    if len(buckets[key]) >= batch_size:
      yield from flush(key)
  for key in list(buckets):
    yield from flush(key)
