"""`spine-predict --report`: a QC page of what one run segmented.

For every input the page shows an outline mosaic (a 2D slice; for a volume its middle
sagittal slice and `NEIGHBOURS` slices on each side, `neighbour_step` apart), the predicted
size of each class (mm^3 for a volume, mm^2 for a 2D slice with a known spacing, else
pixels) and the flags of outputs that look wrong:
  - `empty`: a foreground class was not predicted at all;
  - `few slices`: in a volume, a class appears in fewer than `min_slices` sagittal slices
    (a real disc or vertebral body spans many at any usual slice thickness);
  - `fragmented`: a class falls into more than `max_components` connected components
    (face-connected, in 3D for a volume): a whole spine has 23 discs and 24 vertebrae, so
    more pieces than a spine has means speckle;
  - `small for field of view`: a class is predicted smaller than the least a sagittal
    lumbar field of view of that superior-inferior extent holds (`minimum_sizes`), as when
    a model trained on other centres finds a tenth of the vertebral bodies. Skipped, with a
    note, when a 2D input's pixel spacing is unknown.
Flagged inputs are listed first. The page is written by `data_prep.html_report` (one
folder: index.html plus one PNG mosaic per input; no server, no network).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from data_prep import html_report
from data_prep import overlay
from data_prep import readers
from data_prep import schema

# Slices shown on each side of a volume's middle sagittal slice.
NEIGHBOURS = 2
MIN_SLICES = 3
MAX_COMPONENTS = 30
FOREGROUND = tuple(c for c in range(1, schema.NUM_CLASSES))

# The least plausible size of each class per mm of the input's superior-inferior extent
# (image rows x row spacing): a quarter of the smallest labelled case of ../shared/data,
# rounded down. The image's extent, not the labels', so a field of view reaching beyond the
# lumbar spine (sacrum, thorax: 221-381 mm here) is in the measurement. Measured per case:
#   volumes, 1 mm voxels, mm^3 per mm (each volume labels one class only):
#     disc:     ivd_11 136.8 (30229 mm^3 / 221 mm), ivd_20 265.3 -> 136.8 / 4 = 34
#     vertebra: vb1_08 506.5 (182855 mm^3 / 361 mm), vb1_02/03/06/07 526-531,
#               vb2_05 575, vb1_10 698, vb2_04 734, vb1_17 1002 -> 506.5 / 4 = 126
#   spine2d slices (256 rows, at the 1.1 mm the project declares for them: 282 mm),
#   mm^2 per mm, the 12 slices holding the class (parasagittal ones hold least):
#     disc:     slice 4 1.719 (484 mm^2), 1 2.19, 13 2.90, 11 3.02, others 5.0-7.3
#               -> 1.719 / 4 = 0.42
#     vertebra: slice 11 5.277 (1486 mm^2), 4 6.54, others 12.3-17.5 -> 5.277 / 4 = 1.31
MIN_SIZE_PER_MM = {"3d": {1: 34.0, 2: 126.0}, "2d": {1: 0.42, 2: 1.31}}
# The narrowest left-right extent of those volumes (vb1_10: 50 slices of 1 mm): a thinner
# sagittal slab holds at most proportionally less of a disc or vertebral body, so its
# minimum is scaled down by width / 50 mm (never up: a wider slab adds only lateral tissue).
MIN_SIZE_REFERENCE_WIDTH_MM = 50.0


@dataclasses.dataclass(frozen=True)
class Options:
  """`spine-predict --report`: where the page goes and when an output is flagged."""
  folder: str
  min_slices: int = MIN_SLICES
  max_components: int = MAX_COMPONENTS

  def __post_init__(self):
    if self.min_slices < 1 or self.max_components < 1:
      raise ValueError(f"report: min_slices and max_components must be >= 1, found "
                       f"{self.min_slices} and {self.max_components}")


@dataclasses.dataclass
class Entry:
  """What the page shows of one input.

  Attributes:
    input_path: the segmented file or DICOM folder.
    kind: "2d" or "3d".
    mosaic: uint8 RGB [H, W, 3] outline tiles of the shown slices.
    size: {class id: predicted size in `unit`}.
    unit: "mm^3", "mm^2" or "px".
    slices: {class id: sagittal slices holding the class} (a 2D input: 0 or 1).
    components: {class id: connected components}.
    flags: readable warnings; empty when nothing looks wrong.
    notes: checks that could not be made, and why (not warnings).
  """
  input_path: str
  kind: str
  mosaic: np.ndarray
  size: dict[int, float]
  unit: str
  slices: dict[int, int]
  components: dict[int, int]
  flags: list[str]
  notes: list[str] = dataclasses.field(default_factory=list)


def shown_slices(num_slices: int, neighbours: int = NEIGHBOURS) -> list[int]:
  """Display-order indices of the middle slice and its neighbours, in order.

  The step between them is about a twelfth of the volume (at least 1), so that the tiles
  differ: neighbouring 1 mm slices look alike.
  """
  mid = num_slices // 2
  step = max(1, round(num_slices / 12))
  picked = {mid + k * step for k in range(-neighbours, neighbours + 1)}
  return sorted(i for i in picked if 0 <= i < num_slices)


def _unit_and_element(case: readers.Case) -> tuple[str, float]:
  if case.kind == "3d":
    affine = np.asarray(case.affine, dtype=np.float64)
    return "mm^3", float(abs(np.linalg.det(affine[:3, :3])))
  if case.spacing_known:
    return "mm^2", float(case.spacing[0] * case.spacing[1])
  return "px", 1.0


def minimum_sizes(case: readers.Case) -> tuple[dict[int, float], float] | None:
  """The least plausible predicted size of each class for the input's field of view.

  `MIN_SIZE_PER_MM` times the superior-inferior extent (rows x row spacing; display order
  puts superior -> inferior along the rows), for a volume also times min(1, left-right
  extent / `MIN_SIZE_REFERENCE_WIDTH_MM`).

  Args:
    case: the input as read (`image` [S, H, W] in display order).

  Returns:
    ({class id: minimum size in the entry's unit, mm^3 or mm^2}, superior-inferior extent
    in mm), or None for a 2D input whose pixel spacing is unknown.
  """
  if case.kind == "2d" and not case.spacing_known:
    return None
  row_mm, col_mm = case.spacing
  extent = case.image.shape[1] * row_mm
  scale = extent
  if case.kind == "3d":
    # Slice thickness from the voxel volume: right for any voxel order of the affine.
    _, voxel = _unit_and_element(case)
    width = case.image.shape[0] * voxel / (row_mm * col_mm)
    scale *= min(1.0, width / MIN_SIZE_REFERENCE_WIDTH_MM)
  return {c: v * scale for c, v in MIN_SIZE_PER_MM[case.kind].items()}, extent


def summarize(case: readers.Case, mask: np.ndarray, *, min_slices: int = MIN_SLICES,
              max_components: int = MAX_COMPONENTS,
              neighbours: int = NEIGHBOURS) -> Entry:
  """The report entry of one input.

  Args:
    case: the input as read (`image` [S, H, W] in display order; a 2D input has S = 1).
    mask: its predicted labels, [S, H, W] (or [H, W] for a 2D input), display order.
    min_slices: a volume's class in fewer sagittal slices than this is flagged.
    max_components: a class in more connected components than this is flagged.
    neighbours: slices shown on each side of a volume's middle slice.

  Raises:
    ValueError: the mask's shape differs from the image's.
  """
  mask = np.asarray(mask)
  if mask.ndim == 2:
    mask = mask[None]
  if mask.shape != case.image.shape:
    raise ValueError(f"{case.image_path}: report: mask {mask.shape} and image "
                     f"{case.image.shape} differ in shape")
  unit, element = _unit_and_element(case)
  size, slices, components, flags, notes = {}, {}, {}, [], []
  minimum, extent = minimum_sizes(case) or (None, None)
  if minimum is None:
    notes.append("size for the field of view not checked: pixel spacing unknown "
                 "(--spacing_2d_mm)")
  for c in FOREGROUND:
    sel = mask == c
    name = schema.CLASS_NAMES[c]
    size[c] = float(sel.sum()) * element
    slices[c] = int(sel.any(axis=(1, 2)).sum())
    # Face connectivity: diagonal contacts between slices do not join two pieces.
    components[c] = int(ndimage.label(sel if case.kind == "3d" else sel[0])[1])
    if not slices[c]:
      flags.append(f"empty: no {name} predicted")
      continue
    if case.kind == "3d" and slices[c] < min_slices:
      flags.append(f"few slices: {name} in {slices[c]} sagittal slice(s), expected "
                   f">= {min_slices}")
    if components[c] > max_components:
      flags.append(f"fragmented: {name} in {components[c]} pieces, expected "
                   f"<= {max_components}")
    if minimum is not None and size[c] < minimum[c]:
      flags.append(f"small for field of view: {name} {size[c]:.0f} {unit}, expected "
                   f">= {minimum[c]:.0f} {unit} for {extent:.0f} mm superior-inferior")
  picked = shown_slices(mask.shape[0], neighbours) if case.kind == "3d" else [0]
  tiles = [overlay.outline_rgb(case.image[i], mask[i]) for i in picked]
  captions = [f"slice {i}" for i in picked] if case.kind == "3d" else None
  mosaic = overlay.tile_mosaic(tiles, len(tiles), captions=captions)
  return Entry(str(case.image_path), case.kind, mosaic, size, unit, slices, components,
               flags, notes)


def _png_writer(array: np.ndarray):
  def write(path: str) -> None:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(array).save(path, format="PNG", optimize=True)
  return write


def build_page(entries: Sequence[Entry], failures: Sequence[tuple[str, str]], *,
               title: str, settings: dict[str, Any]) -> dict[str, Any]:
  """The report folder's files: {name: content} for `html_report.write_report_folder`."""
  page = html_report.Page(title)
  flagged = [e for e in entries if e.flags]
  page.paragraph(f"{len(entries)} input(s) segmented, {len(flagged)} flagged, "
                 f"{len(failures)} failed.", "warn" if flagged or failures else None)
  page.table(["setting", "value"], [[k, str(v)] for k, v in settings.items()])
  page.legend([(f"rgb{overlay.COLORS[c]}", schema.CLASS_NAMES[c]) for c in FOREGROUND])
  page.heading("Summary")
  header = ["#", "input", "kind", "unit"]
  for c in FOREGROUND:
    name = schema.CLASS_NAMES[c]
    header += [f"{name} size", f"{name} slices", f"{name} pieces"]
  header += ["flags", "notes"]
  order = sorted(range(len(entries)), key=lambda i: (not entries[i].flags, i))
  rows = []
  for i in order:
    e = entries[i]
    row = [i + 1, e.input_path, e.kind, e.unit]
    for c in FOREGROUND:
      row += [round(e.size[c], 1), e.slices[c], e.components[c]]
    row += ["; ".join(e.flags), "; ".join(e.notes)]
    rows.append(row)
  page.table(header, rows, caption="flagged inputs first")
  if failures:
    page.heading("Failed inputs")
    page.table(["input", "error"], [list(f) for f in failures])
  files: dict[str, Any] = {}
  page.heading("Inputs")
  for i in order:
    e = entries[i]
    name = f"{i + 1:04d}_{pathlib.Path(e.input_path).name}.png"
    name = html_report.check_relative_name(name.replace(" ", "_"))
    files[name] = _png_writer(e.mosaic)
    page.heading(f"{i + 1}. {e.input_path}", level=3)
    if e.flags:
      page.paragraph("; ".join(e.flags), "warn")
    if e.notes:
      page.paragraph("; ".join(e.notes), "note")
    what = "middle sagittal slice and neighbours" if e.kind == "3d" else "the slice"
    page.image(name, f"outlines of {e.input_path}",
               caption=f"{what}: discs and vertebrae outlined")
  files[html_report.INDEX] = page.html()
  return files


def write(output: str | os.PathLike, entries: Sequence[Entry],
          failures: Sequence[tuple[str, str]], *, title: str, settings: dict[str, Any],
          overwrite: bool) -> pathlib.Path:
  """Writes the report folder (all at once; see `html_report.write_report_folder`)."""
  files = build_page(entries, failures, title=title, settings=settings)
  return html_report.write_report_folder(output, files, overwrite=overwrite)
