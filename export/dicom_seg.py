"""DICOM-SEG output of spine-predict (`--output_format=dicom_seg`) for DICOM series inputs.

One Segmentation instance per series (highdicom, an optional extra: `pip install -e
".[dicom_seg]"`): type BINARY, segment 1 "intervertebral disc" and segment 2
"vertebra" (the model's class ids, `schema.CLASS_NAMES`), each coded (`SEGMENTS`),
one frame per source slice and segment (frames without a labelled pixel are left out,
as highdicom does by default), each segment's frames running through the slices in
order (highdicom sorts them along the normal of its own index convention, which may be
the reverse of the files' order). Every frame references its source image's SOP
Instance UID, and the instance the source's study, series and frame of reference, so a
viewer lays it over the series it came from; its geometry is the source images' own
(Image Position and Orientation, Pixel Spacing copied per frame).

The labels come in the voxel order `dicom.read_series` gives and spine-predict's NIfTI
mask is written in: [columns, rows, slices], slices sorted along the slice normal. Frame
k, pixel (row r, column c) of the SEG is voxel (c, r, k); which file is slice k is
found again here from each file's Image Position (Patient) along that normal, and is
checked against the series' affine, so a SEG never pairs labels with the wrong slice.

The SEG cannot be made, and the input is refused naming its folder, when a slice file
lacks a UID the SEG must reference (`REQUIRED_UIDS`) or its geometry
(`REQUIRED_GEOMETRY`), the files disagree on the study, series or frame of reference,
or their positions do not match the volume's geometry (e.g. slices not one constant
step apart; `dicom.read_series` refuses most of those first).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
from typing import Any

import numpy as np

from data_prep import dicom
from data_prep import readers
from data_prep import schema
from export import portable

EXTRA = "dicom_seg"
SUFFIX = ".seg.dcm"  # spine-predict writes NAME.seg.dcm for the series folder NAME
# The UIDs a SEG references (Type 1 in the source's image modules), per slice file.
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                 "SeriesInstanceUID", "FrameOfReferenceUID")
# The image geometry a SEG copies per frame, or that places a file among the slices.
REQUIRED_GEOMETRY = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient",
                     "ImageOrientationPatient")
# The UIDs that must be one for the whole series: the SEG has one of each.
SHARED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
# Class name (schema.CLASS_NAMES) -> (segment label, SNOMED CT code value, meaning).
# pydicom's `codes.SCT` has "Vertebra" (51282000) but only level-specific discs
# ("L4/L5 disc"), so the generic disc is SNOMED CT's "Intervertebral disc structure".
SEGMENTS = {"disc": ("intervertebral disc", "360499006", "Intervertebral disc"),
            "vertebra": ("vertebra", "51282000", "Vertebra")}
# A slice file may sit this far (in slices) from where the series' affine puts slice k:
# the affine has the mean step, so uneven steps add up; half a step mixes up slices.
MAX_POSITION_ERROR = 0.5
# Image Orientation (Patient) cosines that differ from the affine's axes by more than
# this (far above the 5-8 decimals scanners write) mean another in-plane layout.
MAX_COSINE_ERROR = 1e-3


def require() -> None:
  """Checks that highdicom and SimpleITK (the ".[dicom_seg]" extra) can be imported.

  Raises:
    portable.MissingExtraError: one cannot; one line naming the extra.
  """
  for module in ("highdicom", "SimpleITK"):
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise portable.MissingExtraError(
          f"--output_format=dicom_seg needs {module}, which is not installed ({e}); "
          f'pip install -e ".[{EXTRA}]"') from e


def read_sources(case: readers.Case) -> list[Any]:
  """The headers (no pixel data) of a series' slice files in slice order, checked for a
  SEG before any model runs.

  Args:
    case: the series as `dicom.read_series` read it: every DICOM file directly in its
      folder (`image_path`) is one of its slices; `affine` and `original_shape`
      ([columns, rows, slices]) say where each belongs.

  Returns:
    pydicom Datasets, one per slice k of the volume, in that order.

  Raises:
    InputError: a file pydicom cannot read, one lacking a `REQUIRED_UIDS` or
      `REQUIRED_GEOMETRY` attribute, files disagreeing on a `SHARED_UIDS`, or files not
      matching the volume (`_slice_order`); the message names the folder (and the file).
  """
  import pydicom  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(case.image_path)
  files = sorted(p for p in folder.iterdir() if dicom.is_dicom_file(p))
  sources = []
  for f in files:
    try:
      # force: a `*.dcm` without the preamble, which GDCM reads too
      ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
    except (OSError, pydicom.errors.InvalidDicomError) as e:
      raise readers.InputError(f"{folder}: cannot make a DICOM-SEG: unreadable DICOM "
                               f"file {f.name}: {e}") from e
    missing = [k for k in REQUIRED_UIDS + REQUIRED_GEOMETRY
               if not str(ds.get(k, "") or "").strip()]
    if missing:
      raise readers.InputError(
          f"{folder}: cannot make a DICOM-SEG: {f.name} lacks {', '.join(missing)}, "
          "which a segmentation needs")
    sources.append(ds)
  for key in SHARED_UIDS:
    values = sorted({str(ds[key].value) for ds in sources})
    if len(values) > 1:
      raise readers.InputError(f"{folder}: cannot make a DICOM-SEG: expected one {key} "
                               f"in the series, found {len(values)} ({', '.join(values)})")
  return _slice_order(sources, np.asarray(case.affine, np.float64),
                      tuple(case.original_shape), str(folder))


def _slice_order(sources: list[Any], affine: np.ndarray, shape: tuple[int, ...],
                 folder: str) -> list[Any]:
  """The source datasets in the volume's slice order k (see the module docstring).

  Raises:
    InputError: the files do not match the volume: another count or size, another
      in-plane orientation, or positions off the affine's slices (uneven steps).
  """
  columns, rows, count = shape
  lps = dicom.LPS_TO_RAS @ affine  # the matrix is its own inverse
  axes = lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0)
  if len(sources) != count:
    raise readers.InputError(f"{folder}: cannot make a DICOM-SEG: expected one DICOM "
                             f"file per slice ({count}), found {len(sources)} files")
  for ds in sources:
    if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
      raise readers.InputError(
          f"{folder}: cannot make a DICOM-SEG: expected {rows}x{columns} pixels in "
          f"every slice, found {ds.Rows}x{ds.Columns} in "
          f"{pathlib.Path(ds.filename).name}")
    cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    if np.max(np.abs(cosines - np.r_[axes[:, 0], axes[:, 1]])) > MAX_COSINE_ERROR:
      raise readers.InputError(f"{folder}: cannot make a DICOM-SEG: "
                               f"{pathlib.Path(ds.filename).name} has another Image "
                               "Orientation (Patient) than the series")
  # The slice coordinate k of each file's first pixel; its rank is the file's slice, as
  # GDCM sorted them for SimpleITK (by position along the normal).
  inverse = np.linalg.inv(lps)
  k = np.asarray([(inverse @ np.r_[[float(v) for v in ds.ImagePositionPatient], 1.0])[2]
                  for ds in sources])
  order = np.argsort(k, kind="stable")
  worst = float(np.max(np.abs(k[order] - np.arange(count))))
  if worst > MAX_POSITION_ERROR:
    raise readers.InputError(
        f"{folder}: cannot make a DICOM-SEG: a slice file's Image Position (Patient) "
        f"lies {worst:.2g} slices off the series' evenly spaced slices (expected at "
        f"most {MAX_POSITION_ERROR}): non-uniform slice spacing")
  return [sources[i] for i in order]


def _software_version() -> str:
  try:
    return importlib.metadata.version("spineseg")
  except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
    return "unknown"


def segmentation(sources: list[Any], labels: np.ndarray) -> Any:
  """The DICOM Segmentation of one series.

  Args:
    sources: the series' headers in slice order (`read_sources`).
    labels: uint8 [columns, rows, slices], class ids (`schema.CLASS_NAMES`), in the
      voxel order of `dicom.read_series` (spine-predict's NIfTI mask).

  Returns:
    A `highdicom.seg.Segmentation` (a pydicom Dataset) with a new series and instance.
  """
  import highdicom as hd  # pylint: disable=g-import-not-at-top
  from pydicom.sr.codedict import codes  # pylint: disable=g-import-not-at-top
  frames = np.ascontiguousarray(np.asarray(labels, np.uint8).transpose(2, 1, 0))
  version = _software_version()
  algorithm = hd.AlgorithmIdentificationSequence(
      name="spineseg", family=codes.DCM.ArtificialIntelligence, version=version)
  descriptions = []
  for name, (label, value, meaning) in SEGMENTS.items():
    descriptions.append(hd.seg.SegmentDescription(
        segment_number=schema.CLASS_NAMES.index(name), segment_label=label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept(value, "SCT", meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm))
  return hd.seg.Segmentation(
      source_images=sources, pixel_array=frames,
      segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
      segment_descriptions=descriptions, series_instance_uid=hd.UID(),
      series_number=1, sop_instance_uid=hd.UID(), instance_number=1,
      manufacturer="spineseg", manufacturer_model_name="spineseg U-Net",
      software_versions=version, device_serial_number="none",
      series_description="spineseg segmentation",
      # Empty frames are left out; with no label at all highdicom would warn and keep
      # every frame anyway, so say so.
      omit_empty_frames=bool(frames.any()))


def write(path: str, seg: Any) -> None:
  """Writes a Segmentation as a DICOM Part 10 file (preamble and file meta)."""
  seg.save_as(path, enforce_file_format=True)
