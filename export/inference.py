"""Running an exported SavedModel on files: loading, reading inputs, batching.

Shared by `spine-predict` and `spine-evaluate`. Uses only the SavedModel's signatures
(never the training code): `serving_default` for 2D slices, `segment_volume` for the
slices of one NIfTI volume (normalization statistics over the whole volume, as the
converter computes them). A model trained at a target spacing (`spine-convert
--target_spacing_mm`) gets each input's in-plane spacing through `segment_spacing` /
`segment_volume_spacing` (NIfTI: from the affine, in display order; 2D files: the
caller's `--spacing_2d_mm`, without which a 2D input is refused for such a model).

Test-time augmentation (`--tta`, scale TTA; `tta_probabilities`): for such a model each
input is segmented once per factor of `TTA_SCALES`, sending its true spacing times the
factor (the model sees the field of view zoomed in or out); every call returns
probabilities in the input's own geometry, their mean is taken and its argmax is the mask.
A model without a target spacing ignores the spacing, so TTA would change nothing: it is
refused (`check_tta`).

Ensembles (`--saved_model=A,B,C`; `load_ensemble`): wherever a model is taken, a list of
loaded models is too. Each member segments the input itself (its own image size and
target spacing, resampling inside its graph) and returns probabilities in the input's
geometry; their mean (with TTA: the mean over members and scales) is the prediction.
Every path goes through probabilities (`slice_probabilities`, `volume_probabilities`,
`cases_2d_probabilities`) and takes the argmax once (`labels`): for one model this is
exactly the graph's own `mask` (also the argmax of its probabilities).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow as tf

from data_prep import dicom
from data_prep import fileio
from data_prep import orientation
from data_prep import readers
from export import postprocess as postprocess_lib

INPUT_SUFFIXES = readers.IMAGE_2D_SUFFIXES + (".npy",) + readers.NIFTI_SUFFIXES
REQUIRED_SIGNATURES = ("serving_default", "segment_volume")
# Written by spine-export next to the SavedModel (serving.METADATA_FILE; not imported from
# there, so that predict and evaluate never load Keras).
METADATA_FILE = "assets.extra/spineseg.json"
# Scale TTA: the factors multiplying an input's true in-plane spacing, one model call
# each; the mean of the probabilities is segmented. 1.0 is the plain prediction.
TTA_SCALES = (0.85, 1.0, 1.15)


# One error type for every unusable input, whichever module detects it.
InputError = readers.InputError


def os_reason(error: BaseException) -> str:
  """The OS's own words for an OSError ("No space left on device"), else the error text."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return str(error) or type(error).__name__


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


def _target_spacing(loaded: Any, metadata: dict[str, Any],
                    path: pathlib.Path) -> float | None:
  """mm per pixel the model works at: metadata first, else the graph's variable."""
  if "target_spacing_mm" in metadata:
    value = metadata["target_spacing_mm"]
    if value is None:
      return None
    try:
      value = float(value)
    except (TypeError, ValueError):
      value = float("nan")
    if not 0 < value < float("inf"):
      raise InputError(f"{path / METADATA_FILE}: target_spacing_mm must be a positive "
                       f"number or null, found {metadata['target_spacing_mm']!r}")
    return value
  variable = getattr(loaded, "target_spacing_mm", None)  # exports before the metadata
  if variable is not None and float(variable.numpy()) > 0:
    return float(variable.numpy())
  return None


def load_saved_model(path: str | os.PathLike) -> Any:
  """Loads an exported spineseg SavedModel.

  Besides its signatures the returned object carries `spineseg_metadata` (the dict of
  `assets.extra/spineseg.json`, {} if absent), `spineseg_image_size` (the square side
  in pixels the model was exported for, or None if unknown), so that callers can refuse
  data prepared at another size, and `spineseg_target_spacing_mm` (mm per pixel the
  model was trained at, or None: it fits slices by their longer side), and
  `spineseg_path` (the folder, for messages), and `spineseg_num_classes` (the length of
  the probabilities' last axis).

  Raises:
    InputError: the folder is missing, holds no SavedModel, cannot be loaded, lacks
      the spineseg signatures, or its metadata is corrupt.
  """
  path = fileio.path(path)
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
  loaded.spineseg_path = str(path)
  loaded.spineseg_metadata = _read_metadata(path)
  loaded.spineseg_image_size = _image_size(loaded, loaded.spineseg_metadata, path)
  loaded.spineseg_target_spacing_mm = _target_spacing(loaded, loaded.spineseg_metadata,
                                                      path)
  loaded.spineseg_num_classes = _num_classes(loaded, loaded.spineseg_metadata)
  return loaded


def _num_classes(loaded: Any, metadata: dict[str, Any]) -> int | None:
  """Classes of the probabilities: metadata first, else the graph's static shape."""
  if isinstance(metadata.get("num_classes"), int):
    return metadata["num_classes"]
  shape = loaded.signatures["serving_default"].structured_outputs["probabilities"].shape
  return int(shape[-1]) if shape.rank and shape[-1] is not None else None


def members(model: Any) -> list[Any]:
  """The models of an ensemble (a list or tuple of loaded models), or [model]."""
  return list(model) if isinstance(model, (list, tuple)) else [model]


def parse_model_list(value: str) -> list[str]:
  """The folders of `--saved_model=A,B,C` (one folder: a list of one).

  Raises:
    InputError: an empty element (",," or a trailing comma), naming the whole value.
  """
  paths = [p.strip() for p in str(value).split(",")]
  if not value or any(not p for p in paths):
    raise InputError(f"--saved_model={value!r}: expected one SavedModel folder or a "
                     "comma-separated list of them (A,B,C), found an empty element")
  return paths


def check_ensemble(models: Sequence[Any]) -> None:
  """Returns if the members can be averaged: they give the same classes.

  Image size and target spacing may differ: each member resamples the input itself.

  Raises:
    InputError: naming the first member whose number of classes differs from the first.
  """
  first = models[0]
  for m in models[1:]:
    if m.spineseg_num_classes != first.spineseg_num_classes:
      raise InputError(f"{m.spineseg_path}: ensemble members must give the same classes: "
                       f"{first.spineseg_num_classes} in {first.spineseg_path}, found "
                       f"{m.spineseg_num_classes}")


def load_ensemble(paths: Sequence[str | os.PathLike]) -> Any:
  """Loads one model (a single path: exactly `load_saved_model`) or an ensemble (a list).

  Raises:
    InputError: as `load_saved_model` for any member, or `check_ensemble`.
  """
  if len(paths) == 1:
    return load_saved_model(paths[0])
  models = [load_saved_model(p) for p in paths]
  check_ensemble(models)
  return models


def list_inputs(path: str | os.PathLike) -> list[pathlib.Path]:
  """The input file itself, or the inputs of a folder (natural order).

  A folder's inputs are its files of `INPUT_SUFFIXES` and its DICOM series (`dicom`):
  the folder itself when it directly holds DICOM files (listed first), and each
  subfolder that does (one level down; a series is one input, a folder).

  Raises:
    InputError: the path does not exist, or a folder holds no supported input.
  """
  path = fileio.path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise InputError(f"{path}: input does not exist")
  entries = [p for p in path.iterdir() if not p.name.startswith(".")]
  inputs = [p for p in entries
            if (p.is_file() and readers.split_name(p)[1] in INPUT_SUFFIXES)
            or (p.is_dir() and dicom.holds_series(p))]
  inputs.sort(key=lambda p: readers.natural_key(p.name))
  if any(dicom.is_dicom_file(p) for p in entries):
    inputs.insert(0, path)
  if not inputs:
    raise InputError(f"{path}: folder holds no input of types {INPUT_SUFFIXES} and no "
                     "DICOM series (*.dcm) in it or its subfolders")
  return inputs


def _read_npy_image(path: str, spacing_2d: tuple[float, float] | None) -> readers.Case:
  try:
    data = np.load(fileio.source(path), allow_pickle=False)
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
                      spacing=spacing_2d or (1.0, 1.0), image_path=path, kind="2d",
                      original_shape=data.shape, spacing_known=spacing_2d is not None)


def read_input(path: str | os.PathLike,
               spacing_2d: tuple[float, float] | None = None) -> readers.Case:
  """Reads a 2D slice (PNG/JPEG/TIFF/.npy), a NIfTI volume or a DICOM series folder.

  The result is in display order. `spacing_2d`: (row, column) mm per pixel of a 2D file;
  None: unknown.

  Raises:
    InputError: naming the file (unreadable, RGB, wrong rank, 2D/4D NIfTI, ...) or the
      series folder (`dicom.read_series`).
  """
  path = str(path)
  if fileio.path(path).is_dir():
    return dicom.read_series(path)
  if readers.split_name(path)[1] not in INPUT_SUFFIXES and dicom.is_dicom_file(path):
    raise InputError(f"{path}: expected the folder of a DICOM series, found one of its "
                     f"files; give the folder {os.path.dirname(path) or '.'}")
  if readers.split_name(path)[1] == ".npy":
    return _read_npy_image(path, spacing_2d)
  return readers.read_image(path, spacing_2d)


def spacing_for(model: Any, case: readers.Case) -> tuple[float, float] | None:
  """The spacing to send with a case's slices, or None when the model needs none.

  `model`: one model or an ensemble, which needs the spacing if ANY member has a target
  spacing (members without one ignore it).

  Raises:
    InputError: a model (member) works at a target spacing and the case is a 2D file
      whose spacing was not given (`--spacing_2d_mm`): guessing would mis-scale it.
  """
  for m in members(model):
    target = getattr(m, "spineseg_target_spacing_mm", None)
    if target is None:
      continue  # fitted by the longer side: the spacing changes nothing
    if not case.spacing_known:
      where = f" ({m.spineseg_path})" if isinstance(model, (list, tuple)) else ""
      raise InputError(f"{case.image_path}: a 2D image carries no pixel spacing and the "
                       f"model{where} works at {target:g} mm per pixel; pass "
                       f"--spacing_2d_mm ({readers.SPACING_HELP})")
    return tuple(float(v) for v in case.spacing)
  return None


def check_tta(model: Any) -> None:
  """Returns if `model` (every member of an ensemble) can take scale TTA: it works at a
  target spacing.

  Raises:
    InputError: a model has no target spacing, so it ignores the spacing it is sent
      and every TTA call would give the same answer; names that model's folder.
  """
  for m in members(model):
    if getattr(m, "spineseg_target_spacing_mm", None) is None:
      path = getattr(m, "spineseg_path", None)
      where = f" ({path} has none)" if path else ""
      raise InputError("--tta needs a model exported with --target_spacing_mm "
                       "(spine-convert --target_spacing_mm, then spine-train and "
                       "spine-export): a model without one ignores the spacing that "
                       f"scale TTA varies{where}")


def tta_probabilities(model: Any, images: np.ndarray, spacing: tuple[float, float], *,
                      volume: bool = False) -> np.ndarray:
  """Scale TTA: mean probabilities float32 [N, H, W, C] of raw slices [N, H, W].

  One call of `segment_spacing` (`volume`: `segment_volume_spacing`, the slices of one
  volume) per factor of `TTA_SCALES`, with `spacing` (row, column mm) times the factor;
  each returns probabilities in the input's geometry, so the mean has it too.

  Raises:
    InputError: the model has no target spacing (`check_tta`) or lacks the signature.
  """
  check_tta(model)
  name = "segment_volume_spacing" if volume else "segment_spacing"
  if name not in model.signatures:
    raise InputError(f"{getattr(model, 'spineseg_path', 'the SavedModel')}: --tta needs "
                     f"the {name} signature; re-export the model with spine-export")
  x = tf.constant(np.asarray(images, dtype=np.float32)[..., None])
  total = None
  for factor in TTA_SCALES:
    scaled = tf.constant([float(v) * factor for v in spacing], tf.float32)
    p = model.signatures[name](images=x, spacing=scaled)["probabilities"].numpy()
    total = p if total is None else total + p
  return total / np.float32(len(TTA_SCALES))


def labels(probabilities: np.ndarray, postprocess: bool = False) -> np.ndarray:
  """Label mask uint8 [...] of probabilities [..., C]: the argmax (first on ties, as the
  graph's own `mask`).

  `postprocess`: then `postprocess.remove_small_components` on the mask of one slice
  [H, W] or one volume [S, H, W] (3D components; give slices of several 2D inputs one
  at a time).
  """
  mask = np.argmax(probabilities, axis=-1).astype(np.uint8)
  if postprocess:
    mask = postprocess_lib.remove_small_components(mask, probabilities.shape[-1])
  return mask


def _probabilities(model: Any, plain: str, with_spacing: str, images: np.ndarray,
                   spacing: tuple[float, float] | None, tta: bool = False) -> np.ndarray:
  """Mean probabilities float32 [N, H, W, C] over the members (and TTA scales)."""
  if tta and spacing is None:  # a caller that skipped `spacing_for`
    check_tta(model)
    raise InputError("--tta needs each input's spacing (NIfTI: the affine; 2D: "
                     "--spacing_2d_mm)")
  x = tf.constant(np.asarray(images, dtype=np.float32)[..., None])

  def one(m):
    if tta:
      return tta_probabilities(m, images, spacing,
                               volume=with_spacing == "segment_volume_spacing")
    # Exports before spacing inputs had no target spacing either: nothing to resample.
    if spacing is None or with_spacing not in m.signatures:
      return m.signatures[plain](images=x)["probabilities"].numpy()
    return m.signatures[with_spacing](
        images=x, spacing=tf.constant(spacing, tf.float32))["probabilities"].numpy()

  return member_mean(model, one)


def member_mean(model: Any, probabilities_of) -> np.ndarray:
  """The mean of `probabilities_of(member)` over an ensemble's members (THE ensemble
  rule of predict and evaluate); one model: its own probabilities."""
  total = None
  for m in members(model):
    p = probabilities_of(m)
    total = p if total is None else total + p  # one running sum: memory of two outputs
  if isinstance(model, (list, tuple)):
    total = total / np.float32(len(model))  # .numpy() arrays may be read-only
  return total


def slice_probabilities(model: Any, images: np.ndarray,
                        spacing: tuple[float, float] | None = None,
                        tta: bool = False) -> np.ndarray:
  """Probabilities float32 [N, H, W, C] of raw slices [N, H, W] sharing one size.

  `model`: one model or an ensemble (mean over members). `spacing`: their (row, column)
  mm per pixel (`spacing_for`); None: `serving_default`, which takes them to be at the
  model's target spacing. `tta`: scale TTA over `TTA_SCALES` (needs target-spacing
  models and a spacing).
  """
  return _probabilities(model, "serving_default", "segment_spacing", images, spacing, tta)


def volume_probabilities(model: Any, volume: np.ndarray,
                         spacing: tuple[float, float] | None = None,
                         tta: bool = False) -> np.ndarray:
  """Probabilities float32 [S, H, W, C] of one volume's display-order slices [S, H, W].

  As `slice_probabilities`, through `segment_volume` (statistics over the volume).
  Memory: 12 bytes per voxel for 3 classes (twice that while an ensemble sums).
  """
  return _probabilities(model, "segment_volume", "segment_volume_spacing", volume,
                        spacing, tta)


def segment_slices(model: Any, images: np.ndarray,
                   spacing: tuple[float, float] | None = None,
                   tta: bool = False) -> np.ndarray:
  """Label masks uint8 [N, H, W]: `labels` of `slice_probabilities` (same arguments)."""
  return labels(slice_probabilities(model, images, spacing, tta))


def segment_volume(model: Any, volume: np.ndarray,
                   spacing: tuple[float, float] | None = None,
                   tta: bool = False) -> np.ndarray:
  """Label mask uint8 [S, H, W]: `labels` of `volume_probabilities` (same arguments)."""
  return labels(volume_probabilities(model, volume, spacing, tta))


def orientation_back(case: readers.Case, mask: np.ndarray) -> np.ndarray:
  """A display-order [S, H, W] prediction of a NIfTI case, in the file's voxel order."""
  return orientation.from_display(mask, case.transform)


def segment_cases_2d(model: Any, cases: Iterable[readers.Case], batch_size: int,
                     tta: bool = False) -> Iterable[tuple[readers.Case, np.ndarray]]:
  """Yields (case, mask [H, W]): `labels` of `cases_2d_probabilities` (same arguments)."""
  for case, probs in cases_2d_probabilities(model, cases, batch_size, tta):
    yield case, labels(probs)


def cases_2d_probabilities(
    model: Any, cases: Iterable[readers.Case], batch_size: int,
    tta: bool = False) -> Iterable[tuple[readers.Case, np.ndarray]]:
  """Yields (case, probabilities [H, W, C]) for 2D cases, batching equal sizes together.

  Slices of one size and spacing wait in a bucket until it holds `batch_size` (a
  signature call takes one size and one spacing); leftovers are flushed at the end.
  Order of the results is therefore not the input order. Check each case with
  `spacing_for` before: here an unknown spacing fails the whole batch. `model`: one model
  or an ensemble; `tta`: scale TTA (`slice_probabilities`).
  """
  buckets: dict[tuple, list[readers.Case]] = {}

  def flush(key):
    batch = buckets.pop(key)
    probs = slice_probabilities(model, np.stack([c.image[0] for c in batch]), key[2], tta)
    yield from zip(batch, probs)

  for case in cases:
    key = tuple(case.image.shape[1:]) + (spacing_for(model, case),)
    buckets.setdefault(key, []).append(case)
    if len(buckets[key]) >= batch_size:
      yield from flush(key)
  for key in list(buckets):
    yield from flush(key)
