"""Running an exported SavedModel on files: loading, reading inputs, batching.

Shared by `spine-predict` and `spine-evaluate`. Uses only the SavedModel's signatures
(never the training code): `serving_default` for 2D slices, `segment_volume` for the
slices of one NIfTI volume (normalization statistics over the whole volume, as the
converter computes them).
"""
from __future__ import annotations

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


# One error type for every unusable input, whichever module detects it.
InputError = readers.InputError


def exit_if_failures(program: str, messages: list[str]) -> None:
  """Lists failed inputs on stderr and exits 1; returns when there are none."""
  if not messages:
    return
  print(f"{program}: {len(messages)} input(s) failed:", file=sys.stderr)
  for message in messages:
    print(f"  {message}", file=sys.stderr)
  sys.exit(1)


def load_saved_model(path: str | os.PathLike) -> Any:
  """Loads an exported spineseg SavedModel.

  Raises:
    InputError: the folder is missing, holds no SavedModel, cannot be loaded, or lacks
      the spineseg signatures.
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


class Progress:
  """A one-line text progress bar on stderr (silent when disabled)."""

  def __init__(self, total: int, label: str, enabled: bool = True):
    self._total, self._label, self._enabled, self._done = total, label, enabled, 0

  def step(self, n: int = 1) -> None:
    self._done += n
    if self._enabled:
      width = 30
      filled = int(width * self._done / max(self._total, 1))
      sys.stderr.write(f"\r{self._label} [{'#' * filled}{'.' * (width - filled)}] "
                       f"{self._done}/{self._total}")
      if self._done >= self._total:
        sys.stderr.write("\n")
      sys.stderr.flush()
