"""One reader contract for every source format: 2D PNG/JPEG/TIFF (+ .npy/PNG masks) and NIfTI.

`read_case(image_path, mask_path)` returns a `Case` whose arrays are [S, H, W] in display
order (see `orientation`): S slices along left-right, rows superior -> inferior, columns
anterior -> posterior. A 2D file is one slice (S = 1) and is taken to be in display order
already (sagittal slices are conventionally shown that way). A NIfTI volume is reoriented
from its affine; `Case.transform`, `Case.affine` and `Case.original_shape` undo that.

Inputs are never modified. Every problem with an input raises `InputError` whose message
names the file and what was expected versus found.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Optional

import numpy as np

from data_prep import fileio
from data_prep import orientation

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_2D_SUFFIXES = (".npy", ".png", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# PIL modes that hold one grayscale channel (8-bit, 16-bit, 32-bit int, 32-bit float).
_GRAY_MODES = ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_MASK_MODES = _GRAY_MODES + ("P", "1")
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class InputError(ValueError):
  """An input file or folder is unusable; the message names it and says why."""


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One subject's image (and mask) in display order.

  Attributes:
    case_id: the file stem (nnU-Net channel suffix removed).
    image: float32 [S, H, W] raw intensities in display order.
    mask: int32 [S, H, W] labels in display order, or None (prediction-time reading).
    spacing: (row mm, column mm) of every slice: from the affine for NIfTI; for 2D files,
      which carry no reliable spacing, the one the caller gives (`--spacing_2d_mm`), else
      (1.0, 1.0).
    image_path: the source image file (a DICOM series: its folder, `dicom.read_series`).
    mask_path: the source mask file, or None.
    kind: "2d" or "3d".
    affine: [4, 4] RAS affine of a volume (NIfTI, or a DICOM series) (None for 2D).
    original_shape: shape of the stored array before reorientation.
    transform: orientation transform for `orientation.from_display` (None for 2D).
    spacing_known: False for a 2D file read without a given spacing: its (1.0, 1.0) is a
      placeholder, not a measurement, and must not be resampled from.
  """
  case_id: str
  image: np.ndarray
  mask: Optional[np.ndarray]
  spacing: tuple[float, float]
  image_path: str
  mask_path: Optional[str] = None
  kind: str = "2d"
  affine: Optional[np.ndarray] = None
  original_shape: tuple[int, ...] = ()
  transform: Optional[np.ndarray] = None
  spacing_known: bool = True


SPACING_HELP = "one value in mm per pixel, or ROW,COLUMN, e.g. 0.9 or 0.9,1.1"


def parse_spacing_mm(text: Optional[str], flag: str = "--spacing_2d_mm"
                     ) -> Optional[tuple[float, float]]:
  """Parses a spacing flag into (row mm, column mm); None or "" gives None.

  Raises:
    ValueError: naming the flag, the value and the expected form.
  """
  if text is None or not str(text).strip():
    return None
  parts = str(text).split(",")
  try:
    values = [float(p) for p in parts]
  except ValueError:
    values = []
  if len(values) not in (1, 2) or not all(np.isfinite(v) and v > 0 for v in values):
    raise ValueError(f"{flag}={text!r}: expected {SPACING_HELP} (positive numbers)")
  return (values[0], values[-1])


def _check_spacing(spacing) -> Optional[tuple[float, float]]:
  if spacing is None:
    return None
  values = tuple(float(v) for v in spacing)
  if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
    raise ValueError(f"expected a positive (row, column) spacing in mm, found {spacing}")
  return values


def split_name(path: str | os.PathLike) -> tuple[str, str]:
  """(stem, suffix) of a file name; ".nii.gz" counts as one suffix."""
  name = pathlib.Path(path).name
  if name.lower().endswith(".nii.gz"):
    return name[:-7], name[-7:].lower()
  stem, dot, suffix = name.rpartition(".")
  return (stem, "." + suffix.lower()) if dot and stem else (name, "")


def is_nifti(path: str | os.PathLike) -> bool:
  return split_name(path)[1] in NIFTI_SUFFIXES


def case_id_of(path: str | os.PathLike) -> str:
  """Case id of an image file: its stem without an nnU-Net `_0000` channel suffix."""
  stem = split_name(path)[0]
  m = _NNUNET_CHANNEL.match(stem)
  return m.group("case") if m and m.group("channel") == "0000" and is_nifti(path) else stem


# ------------------------------------------------------------------------------ 2D

def _read_pil(path: str, modes: tuple[str, ...], what: str) -> np.ndarray:
  from PIL import Image  # Imported here so NIfTI-only users never pay for it.
  try:
    with Image.open(fileio.source(path)) as img:
      frames = getattr(img, "n_frames", 1)
      if frames != 1:
        raise InputError(f"{path}: expected a single 2D {what}, found {frames} frames")
      if img.mode not in modes:
        raise InputError(f"{path}: expected a single-channel (grayscale) {what}, found "
                         f"PIL mode {img.mode} with {len(img.getbands())} channel(s)")
      return np.asarray(img)
  except InputError:
    raise
  except Exception as e:  # PIL raises many types for truncated or corrupt files.
    raise InputError(f"{path}: unreadable {what}: {type(e).__name__}: {e}") from e


def _read_mask_2d(path: str) -> np.ndarray:
  if split_name(path)[1] == ".npy":
    try:
      mask = np.load(fileio.source(path), allow_pickle=False)
    except Exception as e:
      raise InputError(f"{path}: unreadable .npy mask: {type(e).__name__}: {e}") from e
  else:
    mask = _read_pil(path, _MASK_MODES, "mask")
  if mask.ndim != 2:
    raise InputError(f"{path}: expected a 2D mask [H, W], found shape {mask.shape}")
  return mask


# ------------------------------------------------------------------------------ 3D

def _load_nifti(path: str, what: str):
  import nibabel as nib  # Imported here so 2D-only workers start faster.
  try:
    with fileio.local_copy(path) as local:  # nibabel reads local files only
      img = nib.load(local)
      data = np.asanyarray(img.dataobj)
  except Exception as e:  # nibabel raises many types for truncated or corrupt files.
    raise InputError(f"{path}: unreadable NIfTI {what}: {type(e).__name__}: {e}") from e
  # Trailing singleton axes (e.g. [X, Y, Z, 1]) carry no data; anything else is 4D.
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise InputError(f"{path}: expected a 3D {what} volume [X, Y, Z], found shape "
                     f"{tuple(img.shape)} (4D or multi-channel volumes are not supported)")
  return img.affine, data


# -------------------------------------------------------------------------- checks

def _as_float_image(data: np.ndarray, path: str) -> np.ndarray:
  if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
    raise InputError(f"{path}: expected numeric intensities, found dtype {data.dtype}")
  image = np.asarray(data, dtype=np.float32)
  if not np.all(np.isfinite(image)):
    bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    raise InputError(f"{path}: expected finite intensities, found {bad} NaN/Inf voxels")
  return image


def _as_int_mask(data: np.ndarray, path: str) -> np.ndarray:
  if data.dtype == bool or np.issubdtype(data.dtype, np.integer):
    return np.asarray(data, dtype=np.int32)
  if np.issubdtype(data.dtype, np.floating):
    # NIfTI label volumes are often stored as float; accept them only if integral.
    finite = np.isfinite(data)
    if finite.all() and np.array_equal(data, np.round(data)):
      return np.asarray(data, dtype=np.int32)
    bad = data[~finite | (data != np.round(np.where(finite, data, 0)))]
    raise InputError(f"{path}: expected an integer label mask, found {data.dtype} with "
                     f"non-integer values such as {bad.ravel()[:3].tolist()}")
  raise InputError(f"{path}: expected an integer label mask, found dtype {data.dtype}")


# ---------------------------------------------------------------------- public API

def volume_case(case_id: str, path: str, data: np.ndarray, affine: np.ndarray) -> Case:
  """A 3D `Case` (no mask) of a volume in stored voxel order and its RAS affine.

  The one way a volume becomes display order, whatever file it came from (NIfTI here,
  a DICOM series in `dicom.read_series`).

  Args:
    case_id: the case id.
    path: the source, for messages and `Case.image_path`.
    data: [X, Y, Z] intensities in stored voxel order.
    affine: [4, 4] voxel-to-world (RAS+) affine.

  Raises:
    InputError: non-numeric or NaN/Inf intensities, or a degenerate affine.
  """
  image = _as_float_image(data, path)
  try:
    display, transform = orientation.to_display(image, affine)
  except ValueError as e:
    raise InputError(f"{path}: {e}") from e
  sizes = orientation.display_voxel_sizes(affine, transform)
  return Case(case_id=case_id, image=np.ascontiguousarray(display), mask=None,
              spacing=(sizes[1], sizes[2]), image_path=path, kind="3d",
              affine=np.asarray(affine, dtype=np.float64), original_shape=data.shape,
              transform=transform)


def read_image(path: str | os.PathLike,
               spacing_2d: Optional[tuple[float, float]] = None) -> Case:
  """Reads one image (2D file or NIfTI volume) without a mask, for prediction.

  Args:
    path: the image file.
    spacing_2d: (row mm, column mm) of a 2D file's pixels (ignored for NIfTI, whose
      affine says); None: unknown (`Case.spacing_known` False).

  Raises:
    InputError: unreadable file, wrong dimensionality, multi-channel, NaN/Inf values.
    ValueError: a spacing_2d that is not two positive numbers.
  """
  path = str(path)
  spacing_2d = _check_spacing(spacing_2d)
  case_id = case_id_of(path)
  if is_nifti(path):
    affine, data = _load_nifti(path, "image")
    return volume_case(case_id, path, data, affine)
  if split_name(path)[1] not in IMAGE_2D_SUFFIXES:
    raise InputError(f"{path}: unsupported image type; expected one of "
                     f"{IMAGE_2D_SUFFIXES + NIFTI_SUFFIXES}")
  data = _read_pil(path, _GRAY_MODES, "image")
  if data.ndim != 2:
    raise InputError(f"{path}: expected a 2D grayscale image, found shape {data.shape}")
  image = _as_float_image(data, path)
  return Case(case_id=case_id, image=image[None], mask=None,
              spacing=spacing_2d or (1.0, 1.0), image_path=path, kind="2d",
              original_shape=data.shape, spacing_known=spacing_2d is not None)


RESAMPLE_HINT = ("--resample_masks resamples a label volume onto its image's grid by "
                 "their affines")


def resample_to_grid(labels: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                     target_affine: np.ndarray, path: str, image_path: str) -> np.ndarray:
  """A label volume on another grid: nearest neighbour in world coordinates.

  Each voxel of the target grid takes the label of the `labels` voxel nearest to its
  centre; a pure shift of whole voxels, the common case (a label volume with a slice more
  than its image), comes out as an exact copy.

  Args:
    labels: int [X, Y, Z] labels in stored voxel order.
    affine: their [4, 4] voxel-to-world affine.
    shape: the target (image) grid's shape.
    target_affine: the target grid's [4, 4] voxel-to-world affine.
    path: the label file, for messages.
    image_path: the image file, for messages.

  Returns:
    The labels on the target grid, `shape`, of `labels`' dtype.

  Raises:
    InputError: the label volume does not cover the whole image grid, or a labelled
      voxel lies outside the image (it would be lost); the message says how many.
  """
  to_labels = np.linalg.inv(affine) @ target_affine  # image voxel -> label voxel
  corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                      for k in (0, shape[2] - 1)], dtype=np.float64)
  at = (corners @ to_labels.T)[:, :3]
  if (at < -0.5).any() or (at > np.array(labels.shape) - 0.5).any():
    raise InputError(f"{path}: label volume {labels.shape} does not cover the whole of "
                     f"image {image_path} {tuple(shape)} in world coordinates; nothing "
                     "to resample from outside it")
  labelled = np.argwhere(labels != 0)
  if labelled.size:
    back = (np.c_[labelled, np.ones(len(labelled))] @ np.linalg.inv(to_labels).T)[:, :3]
    outside = int(((back < -0.5) | (back > np.array(shape) - 0.5)).any(axis=1).sum())
    if outside:
      raise InputError(f"{path}: {outside} labelled voxels lie outside image {image_path} "
                       f"{tuple(shape)}; resampling would drop them")
  out = np.empty(shape, dtype=labels.dtype)
  jj, kk = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
  for i in range(shape[0]):  # one plane at a time: a volume of indices would be large
    points = np.stack([np.full(jj.shape, i), jj, kk, np.ones(jj.shape)], -1)
    src = np.rint(points @ to_labels.T)[..., :3].astype(np.int64)
    src = np.clip(src, 0, np.array(labels.shape) - 1)  # corners checked: rounding only
    out[i] = labels[src[..., 0], src[..., 1], src[..., 2]]
  return out


def read_case(image_path: str | os.PathLike, mask_path: str | os.PathLike,
              spacing_2d: Optional[tuple[float, float]] = None,
              resample_masks: bool = False) -> Case:
  """Reads an image and its label mask into one display-order `Case`.

  `spacing_2d` as for `read_image`. `resample_masks`: a NIfTI label volume on another
  grid than its image's (shape or affine) is resampled onto the image's grid
  (`resample_to_grid`) instead of refused.

  Raises:
    InputError: either file is unusable, or the two disagree in shape or affine (and
      `resample_masks` is off, or the label volume cannot be resampled without loss).
  """
  case = read_image(image_path, spacing_2d)
  mask_path = str(mask_path)
  if case.kind == "3d":
    if not is_nifti(mask_path):
      raise InputError(f"{mask_path}: expected a NIfTI label volume for the NIfTI image "
                       f"{case.image_path}")
    affine, data = _load_nifti(mask_path, "label")
    labels = _as_int_mask(data, mask_path)
    same_grid = (data.shape == case.original_shape
                 and np.allclose(affine, case.affine, atol=1e-3))
    if not same_grid and resample_masks:
      labels = resample_to_grid(labels, affine, case.original_shape, case.affine,
                                mask_path, case.image_path)
      affine = case.affine
    elif data.shape != case.original_shape:
      raise InputError(f"{mask_path}: label volume shape {data.shape} does not match image "
                       f"{case.image_path} shape {case.original_shape} ({RESAMPLE_HINT})")
    elif not same_grid:
      raise InputError(f"{mask_path}: label affine does not match image {case.image_path}:"
                       f"\nexpected\n{np.round(case.affine, 4)}\nfound\n{np.round(affine, 4)}"
                       f"\n({RESAMPLE_HINT})")
    mask = np.ascontiguousarray(orientation.to_display(labels, affine)[0])
  else:
    if is_nifti(mask_path) or split_name(mask_path)[1] not in MASK_2D_SUFFIXES:
      raise InputError(f"{mask_path}: unsupported mask type for the 2D image "
                       f"{case.image_path}; expected one of {MASK_2D_SUFFIXES}")
    data = _read_mask_2d(mask_path)
    if data.shape != case.original_shape:
      raise InputError(f"{mask_path}: mask shape {data.shape} does not match image "
                       f"{case.image_path} shape {case.original_shape}")
    mask = _as_int_mask(data, mask_path)[None]
  return dataclasses.replace(case, mask=mask, mask_path=mask_path)


def _list_files(folder: str, what: str) -> list[pathlib.Path]:
  path = fileio.path(folder)
  if not path.is_dir():
    raise InputError(f"{folder}: {what} directory does not exist")
  files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
  if not files:
    raise InputError(f"{folder}: {what} directory is empty")
  return files


def pair_files(images_dir: str | os.PathLike, masks_dir: str | os.PathLike):
  """Pairs images with masks by case id (file stem), never by list order.

  An image `X.png` pairs with mask `X.npy` / `X.png`; a NIfTI image `X.nii.gz` (or the
  nnU-Net name `X_0000.nii.gz`) pairs with `X.nii.gz` / `X.nii`.

  Returns:
    (pairs, orphans): pairs is a list of (case_id, image_path, mask_path) sorted by case
    id; orphans a sorted list of (path, reason) for files that found no partner or were
    ambiguous.

  Raises:
    InputError: a directory is missing or empty.
  """
  images = _list_files(str(images_dir), "images")
  masks = _list_files(str(masks_dir), "masks")
  orphans: list[tuple[str, str]] = []
  by_id: dict[str, list[pathlib.Path]] = {}
  for p in images:
    suffix = split_name(p)[1]
    if suffix not in IMAGE_2D_SUFFIXES + NIFTI_SUFFIXES:
      orphans.append((str(p), f"unsupported image type {suffix or '(none)'}"))
      continue
    by_id.setdefault(case_id_of(p), []).append(p)
  mask_by_stem: dict[str, list[pathlib.Path]] = {}
  for p in masks:
    stem, suffix = split_name(p)
    if suffix not in MASK_2D_SUFFIXES + NIFTI_SUFFIXES:
      orphans.append((str(p), f"unsupported mask type {suffix or '(none)'}"))
      continue
    mask_by_stem.setdefault(stem, []).append(p)
  pairs = []
  for case_id, imgs in by_id.items():
    found = mask_by_stem.pop(case_id, [])
    if len(imgs) > 1 or len(found) > 1:
      for p in imgs + found:
        orphans.append((str(p), f"case id {case_id!r} is ambiguous: "
                                f"{[q.name for q in imgs + found]}"))
    elif not found:
      orphans.append((str(imgs[0]), f"no mask named {case_id}.* in {masks_dir}"))
    else:
      pairs.append((case_id, str(imgs[0]), str(found[0])))
  for stem, found in mask_by_stem.items():
    for p in found:
      orphans.append((str(p), f"no image named {stem}.* in {images_dir}"))
  pairs.sort(key=lambda t: natural_key(t[0]))
  orphans.sort()
  return pairs, orphans


def natural_key(text: str) -> tuple:
  """Sort key that orders "2" before "10" (deterministic, human friendly)."""
  return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
               for t in re.split(r"(\d+)", text) if t)
