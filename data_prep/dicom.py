"""DICOM input: a folder holding one DICOM series read as a volume with its geometry.

The series is read with SimpleITK (an optional dependency: `pip install -e ".[dicom]"`),
whose GDCM reader groups the files by Series Instance UID, sorts the slices by position
and returns origin, spacing and direction in DICOM's LPS world. The only geometry written
here is the documented LPS -> RAS convention (negate the first two world axes, as
nibabel's DICOM notes and ITK's NIfTI writer do); from that RAS affine on, a series is
read exactly as a NIfTI volume (`readers.volume_case`): same display order, same
spacing, same way back. The case's `image_path` is the folder, its id the folder name.

A folder counts as a series when it directly holds a file named `*.dcm`, or any other
file that starts with the DICOM preamble ("DICM" at byte 128).
"""
from __future__ import annotations

import contextlib
import functools
import locale
import os
import pathlib
from typing import Sequence

import numpy as np

from data_prep import fileio
from data_prep import readers

DICOM_SUFFIX = ".dcm"
INSTALL_HINT = 'pip install -e ".[dicom]"'
# DICOM Part 10: a 128-byte preamble, then the magic "DICM".
_PREAMBLE_SIZE = 128
_MAGIC = b"DICM"
POSITION_TAG = "0020|0032"  # Image Position (Patient)
# Largest accepted deviation of a slice step from the mean, as a fraction of it: far
# above the rounding of written positions, far below a missing slice (a whole step).
MAX_STEP_DEVIATION = 0.05
# LPS (DICOM, ITK) -> RAS (NIfTI, nibabel): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])



@contextlib.contextmanager
def _locale_kept():
  """Restores the process locale after SimpleITK calls.

  GDCM sets the C locale while it reads or writes files and does not put it back: in a
  Python process that then decodes every subprocess' output as ASCII (seen: a later
  `subprocess.run(..., text=True)` died on a UnicodeDecodeError).
  """
  saved = locale.setlocale(locale.LC_ALL)
  try:
    yield
  finally:
    locale.setlocale(locale.LC_ALL, saved)


def _keeps_locale(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with _locale_kept():
      return fn(*args, **kwargs)
  return wrapper

def is_dicom_file(path: str | os.PathLike) -> bool:
  """A `*.dcm` file, or any other file that starts with the DICOM preamble.

  Scanners often write names without a suffix (`IM0001`) or UIDs (`1.2.840...5.17`)
  whose last dot is no suffix, hence the look at the content.
  """
  path = fileio.path(path)
  if not path.is_file() or path.name.startswith("."):
    return False
  if readers.split_name(path)[1] == DICOM_SUFFIX:
    return True
  try:
    with fileio.open_file(path, "rb") as f:
      head = f.read(_PREAMBLE_SIZE + len(_MAGIC))
  except OSError:
    return False  # unreadable: not claimed as DICOM; the folder may hold other inputs
  return head[_PREAMBLE_SIZE:] == _MAGIC


def holds_series(folder: str | os.PathLike) -> bool:
  """Whether a folder directly holds DICOM files (see `is_dicom_file`)."""
  folder = fileio.path(folder)
  return folder.is_dir() and any(is_dicom_file(p) for p in folder.iterdir())


def ras_affine(origin: Sequence[float], spacing: Sequence[float],
               direction: Sequence[float]) -> np.ndarray:
  """The NIfTI (RAS+) [4, 4] affine of an ITK image's LPS geometry.

  Args:
    origin: world position (LPS, mm) of voxel (0, 0, 0).
    spacing: voxel size (mm) along the image axes i, j, k.
    direction: 9 values, the row-major 3x3 matrix whose columns are the LPS directions of
      i, j, k (SimpleITK's `GetDirection`).

  Returns:
    float64 [4, 4]: maps (i, j, k, 1) to RAS world mm.
  """
  lps = np.eye(4)
  lps[:3, :3] = np.reshape(np.asarray(direction, np.float64), (3, 3)) * np.asarray(
      spacing, np.float64)[None, :]
  lps[:3, 3] = np.asarray(origin, np.float64)
  return LPS_TO_RAS @ lps


def _import_sitk(folder: str):
  try:
    import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise readers.InputError(f"{folder}: reading a DICOM series needs SimpleITK, which is "
                             f"not installed: {INSTALL_HINT}") from None
  return sitk


def _check_even_steps(reader, image, folder: str) -> None:
  """Refuses a series whose slices are not one constant step apart.

  The affine has one slice step (SimpleITK's: the mean); a missing slice would put every
  later one elsewhere. ITK flags any deviation at all, rounding of the written positions
  included, without saying how large, so the step is measured here: each slice's Image
  Position (Patient) along the slice direction (the direction's third column).

  Raises:
    InputError: a slice without Image Position (Patient), or a step off the mean by more
      than `MAX_STEP_DEVIATION`.
  """
  count = image.GetSize()[2]
  if count < 3:
    return  # one step or none: nothing to compare
  positions = []
  for i in range(count):
    text = reader.GetMetaData(i, POSITION_TAG) if reader.HasMetaDataKey(
        i, POSITION_TAG) else "(none)"
    try:
      positions.append([float(v) for v in text.split("\\")])
    except ValueError:
      positions.append([])
    if len(positions[-1]) != 3:
      raise readers.InputError(f"{folder}: expected Image Position (Patient) "
                               f"({POSITION_TAG}) of 3 numbers in every DICOM slice, "
                               f"found {text!r} in {reader.GetFileNames()[i]}")
  normal = np.reshape(image.GetDirection(), (3, 3))[:, 2]
  steps = np.diff(np.asarray(positions) @ normal)
  step = image.GetSpacing()[2]
  worst = float(np.max(np.abs(steps - step)))
  if worst > MAX_STEP_DEVIATION * step:
    raise readers.InputError(
        f"{folder}: expected DICOM slices one constant step apart ({step:.3g} mm on "
        f"average), found steps from {steps.min():.3g} to {steps.max():.3g} mm (missing "
        "or duplicate slices?)")


@_keeps_locale
def read_series(folder: str | os.PathLike) -> readers.Case:
  """Reads the one DICOM series of a folder as a 3D `Case` (display order, RAS affine).

  Args:
    folder: a folder directly holding the files of one series (other files are ignored;
      subfolders are not searched).

  Returns:
    A `readers.Case` of kind "3d" whose `image_path` is the folder and whose `affine` is
    the series geometry in RAS; `original_shape` is [columns, rows, slices] in the
    reader's slice order (sorted along the slice normal).

  Raises:
    InputError: SimpleITK missing, no readable series, several series, multi-component
      pixels, slices not one constant step apart, or an unreadable file; the message
      names the folder.
  """
  folder = str(folder)
  if fileio.is_remote(folder):  # SimpleITK (GDCM) opens local files only
    raise readers.InputError(f"{folder}: DICOM series are read from local folders only; "
                             "copy the series to a local folder (e.g. gsutil cp -r) and "
                             "pass that")
  sitk = _import_sitk(folder)
  # GDCM warns on stderr about every file it cannot parse; the errors below say it once.
  warnings_were_on = sitk.ProcessObject.GetGlobalWarningDisplay()
  sitk.ProcessObject.SetGlobalWarningDisplay(False)
  try:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
      count = sum(1 for p in pathlib.Path(folder).iterdir() if is_dicom_file(p))
      raise readers.InputError(f"{folder}: expected one DICOM series, found no readable "
                               f"DICOM slice among its {count} DICOM file(s)")
    if len(series) > 1:
      raise readers.InputError(
          f"{folder}: expected one DICOM series per folder, found {len(series)} (Series "
          f"Instance UIDs {', '.join(series)}); put each series in its own subfolder "
          "and pass the parent folder")
    reader = sitk.ImageSeriesReader()
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's tags, for _check_even_steps
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0]))
    try:
      image = reader.Execute()
    except RuntimeError as e:  # SimpleITK reports every ITK failure as RuntimeError
      reason = str(e).strip().splitlines()[-1]
      raise readers.InputError(f"{folder}: unreadable DICOM series: {reason}") from e
  finally:
    sitk.ProcessObject.SetGlobalWarningDisplay(warnings_were_on)
  if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
    raise readers.InputError(
        f"{folder}: expected a grayscale 3D series, found {image.GetDimension()}D with "
        f"{image.GetNumberOfComponentsPerPixel()} component(s) per pixel")
  _check_even_steps(reader, image, folder)
  affine = ras_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
  # GetArrayFromImage is [k, j, i]; the affine's voxel order is (i, j, k).
  data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
  case_id = pathlib.Path(folder).resolve().name
  return readers.volume_case(case_id, folder, data, affine)


@_keeps_locale
def write_series(folder: str | os.PathLike, slices: np.ndarray,
                 positions: Sequence[Sequence[float]], row_cosine: Sequence[float],
                 column_cosine: Sequence[float], pixel_spacing: tuple[float, float],
                 slice_thickness: float, series_uid: str, *,
                 names: Sequence[str] | None = None) -> list[pathlib.Path]:
  """Writes one MR series, one file per slice, with the given geometry tags (tests, bench).

  The tags are written as given, so a test can compute the true voxel positions from
  them independently of `read_series`.

  Args:
    folder: output folder (created).
    slices: int16-compatible [N, rows, columns] pixel data.
    positions: [N, 3] Image Position (Patient) (0020|0032), LPS mm, of each slice's
      first pixel.
    row_cosine, column_cosine: Image Orientation (Patient) (0020|0037): the LPS directions
      in which the column index and the row index increase.
    pixel_spacing: Pixel Spacing (0028|0030): (between rows, between columns) mm.
    slice_thickness: Slice Thickness (0018|0050), mm.
    series_uid: Series Instance UID (0020|000e); the study and frame of reference UIDs
      are derived from it.
    names: file names (default `slice_0000.dcm`, ...).

  Returns:
    The files written.
  """
  sitk = _import_sitk(str(folder))
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  slices = np.asarray(slices)
  names = names or [f"slice_{i:04d}.dcm" for i in range(len(slices))]
  orientation = "\\".join(f"{v:.8f}" for v in list(row_cosine) + list(column_cosine))
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()  # keep the UIDs below: they make the files one series
  writer.SetImageIO("GDCMImageIO")  # names without ".dcm" too
  written = []
  for i, (pixels, position, name) in enumerate(zip(slices, positions, names)):
    image = sitk.GetImageFromArray(pixels.astype(np.int16))
    # GDCM writes Pixel Spacing from the image's spacing: (x = columns, y = rows).
    image.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0])))
    for tag, value in (("0008|0060", "MR"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.4"),
                       ("0008|0018", f"{series_uid}.{i + 1}"),
                       ("0020|000d", f"{series_uid}.0"), ("0020|000e", series_uid),
                       ("0020|0052", f"{series_uid}.9"),  # Frame of Reference UID
                       ("0020|0013", str(i + 1)), ("0020|0037", orientation),
                       (POSITION_TAG, "\\".join(f"{v:.6f}" for v in position)),
                       ("0018|0050", f"{slice_thickness:g}")):
      image.SetMetaData(tag, value)

    def write(path, image=image):
      writer.SetFileName(path)
      writer.Execute(image)

    written.append(fileio.atomic_write(folder / name, write))
  return written
