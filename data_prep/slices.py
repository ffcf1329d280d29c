"""From one `Case` to serialized examples: label map, label-complete filter, normalize, fit.

`process_case` is the unit of work of the converter's worker processes. It reads the case,
collapses labels with the label map, normalizes the intensities once (per image for a 2D
file, per volume for NIfTI) with `preprocess`, keeps the slices whose mask holds every
required label (at most `slices_per_case` of them, `pick_slices`), fits each kept slice
into the square and serializes it with `schema.make_example`. It returns plain picklable
data (bytes, lists, numbers), so the parent process only writes bytes to the shards.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np

from data_prep import preprocess, readers, schema

# The rule `pick_slices` follows, as spine-convert --slices_per_case's help states it.
PICK_RULE = (
    "the slices that pass the label filter, in display order, are positions 0..M-1; the "
    "fractions 1/2; 1/4, 3/4; 1/8, 3/8, 5/8, 7/8; ... are taken level by level (within a "
    "level the one nearest 1/2 first, the smaller on a tie), each naming position "
    "floor(fraction * M), one already taken passed over; the first N positions named are "
    "kept (all M when N >= M). So N=1 keeps the middle labelled slice, a larger N keeps "
    "every smaller N's slices, and N=3, 7, 15 are evenly spread")


def _bisection_positions(count: int) -> Iterator[int]:
  """Positions 0..count-1, each once, in `PICK_RULE`'s order."""
  seen: set[int] = set()
  denominator = 2
  while len(seen) < count:
    # The fractions up to this level lie count/denominator apart: once that is <= 1,
    # every position has been named and the loop ends.
    numerators = sorted(range(1, denominator, 2),
                        key=lambda n: (abs(2 * n - denominator), n))
    for numerator in numerators:
      position = numerator * count // denominator
      if position not in seen:
        seen.add(position)
        yield position
    denominator *= 2


def pick_slices(candidates: Sequence[int], limit: Optional[int]) -> list[int]:
  """The slices of one case that `--slices_per_case=limit` keeps (`PICK_RULE`).

  The picks spread over the labelled range, the middle one first, so that a study of "how
  many labelled slices are needed" labels the same slices again when it asks for more.

  Args:
    candidates: the case's slice indices that pass the label filter, in display order.
    limit: at most this many are kept (a positive number); None keeps every one.

  Returns:
    The kept indices, in display order.
  """
  if limit is None or limit >= len(candidates):
    return list(candidates)
  positions = _bisection_positions(len(candidates))
  return sorted(candidates[next(positions)] for _ in range(limit))


def missing_labels(mask_slice: np.ndarray, required: Sequence[int]) -> list[int]:
  """Required labels that do not occur in one 2D mask slice."""
  present = set(np.unique(mask_slice).tolist())
  return [label for label in required if label not in present]


@dataclasses.dataclass
class CaseResult:
  """What one case contributes: examples in slice order, skips, and statistics."""
  case_id: str
  image_path: str
  mask_path: str
  error: Optional[str] = None       # the reason the whole case was skipped
  fatal: Optional[str] = None       # a configuration error that must stop the run
  examples: list = dataclasses.field(default_factory=list)  # [(slice_index, bytes)]
  skipped_slices: list = dataclasses.field(default_factory=list)  # [(index, reason)]
  kind: str = ""
  shape: tuple = ()                 # display-order [S, H, W] of the source
  spacing: tuple = ()
  norm_offset: float = 0.0
  norm_scale: float = 1.0
  class_counts: list = dataclasses.field(default_factory=lambda: [0] * schema.NUM_CLASSES)
  # Sums over kept slices for dataset-level statistics: count, sum, sum of squares,
  # min, max of the raw intensities, then of the stored (normalized, fitted) images.
  raw_stats: list = dataclasses.field(default_factory=list)
  stored_stats: list = dataclasses.field(default_factory=list)


def _stats(x: np.ndarray) -> list[float]:
  x = x.astype(np.float64, copy=False)
  return [float(x.size), float(x.sum()), float(np.square(x).sum()), float(x.min()),
          float(x.max())]


def merge_stats(a: list[float], b: list[float]) -> list[float]:
  """Combines two [count, sum, sum_sq, min, max] accumulators (either may be empty)."""
  if not a:
    return list(b)
  if not b:
    return list(a)
  return [a[0] + b[0], a[1] + b[1], a[2] + b[2], min(a[3], b[3]), max(a[4], b[4])]


def describe_stats(acc: list[float]) -> dict[str, float]:
  """{"min", "max", "mean", "std"} of an accumulator ({} when empty)."""
  if not acc or acc[0] == 0:
    return {}
  n, s, ss, lo, hi = acc
  mean = s / n
  return {"min": lo, "max": hi, "mean": mean, "std": float(np.sqrt(max(ss / n - mean ** 2,
                                                                       0.0)))}


def process_case(image_path: str, mask_path: str, *, image_size: int, normalization: str,
                 required_labels: Sequence[int], label_map: dict[int, int],
                 annotated_labels: Sequence[int] = tuple(range(schema.NUM_CLASSES)),
                 target_spacing_mm: Optional[float] = None,
                 spacing_2d_mm: Optional[tuple[float, float]] = None,
                 protocol: str = schema.DEFAULT_PROTOCOL,
                 slices_per_case: Optional[int] = None,
                 resample_masks: bool = False) -> CaseResult:
  """Reads one case and turns its kept slices into serialized examples.

  Args:
    image_path: source image (2D file or NIfTI volume).
    mask_path: its label mask.
    image_size: side of the stored square.
    normalization: one of `preprocess.NORMALIZATIONS`.
    required_labels: a slice is kept only if its mask holds every one of these.
    label_map: {source id: class id} from `schema.parse_label_map` (empty: ids
      must be 0..2).
    annotated_labels: the classes this folder outlines (background implied); a mask
      holding another class is a label error. Stored with every example.
    target_spacing_mm: resample every slice to this many mm per pixel before fitting
      it into the square (`preprocess.spacing_geometry`); None: fit by the longer side.
    spacing_2d_mm: (row, column) mm per pixel of 2D files (NIfTI: from the affine).
    protocol: the labelling protocol of the masks, stored with every example.
    slices_per_case: keep at most this many of the slices that pass the label filter,
      chosen by `pick_slices`; the others are reported as skipped. None: all of them.
    resample_masks: a label volume on another grid than its image's is resampled onto
      the image's (`readers.read_case`) instead of skipped as a mismatched pair.

  Returns:
    A CaseResult. Input problems are reported in `error` (the case is skipped), label
    problems in `fatal`; neither raises, so one bad file never kills a worker pool.
  """
  result = CaseResult(case_id=readers.case_id_of(image_path), image_path=image_path,
                      mask_path=mask_path)
  try:
    case = readers.read_case(image_path, mask_path, spacing_2d=spacing_2d_mm,
                             resample_masks=resample_masks)
    if target_spacing_mm is not None and not case.spacing_known:
      result.fatal = (f"{image_path}: --target_spacing_mm={target_spacing_mm} needs the "
                      f"pixel spacing of 2D images, which carry none; pass --spacing_2d_mm")
      return result
    mask = schema.apply_label_map(case.mask, label_map, mask_path)
    stray = sorted(set(np.unique(mask).tolist()) - {0} - set(annotated_labels))
    if stray:
      raise schema.LabelError(
          f"{mask_path}: mask holds class(es) {stray} "
          f"({', '.join(schema.CLASS_NAMES[c] for c in stray)}) that --annotated_labels="
          f"{','.join(str(c) for c in annotated_labels)} says this folder does not outline")
  except readers.InputError as e:
    result.error = str(e)
    return result
  except schema.LabelError as e:
    result.fatal = str(e)
    return result
  result.kind = case.kind
  result.shape = tuple(int(d) for d in case.image.shape)
  result.spacing = tuple(float(s) for s in case.spacing)
  # Statistics over the whole 2D image or the whole volume: the exported model computes
  # the same over whatever it receives, before any slice is dropped.
  offset, scale = preprocess.normalization_params(case.image, normalization)
  result.norm_offset, result.norm_scale = offset, scale
  pad = preprocess.pad_value(normalization, offset, scale)
  if target_spacing_mm is None:
    geometry = preprocess.fit_geometry(case.image.shape[1], case.image.shape[2], image_size)
  else:  # Every stored pixel covers target_spacing_mm; what overflows the square is cut.
    geometry = preprocess.spacing_geometry(case.image.shape[1], case.image.shape[2],
                                           case.spacing, target_spacing_mm, image_size)
  missing = [missing_labels(mask[index], required_labels)
             for index in range(case.image.shape[0])]
  picked = set(pick_slices([i for i, m in enumerate(missing) if not m], slices_per_case))
  for index in range(case.image.shape[0]):
    if missing[index]:
      present = sorted(set(np.unique(mask[index]).tolist()))
      result.skipped_slices.append(
          (index, f"missing label(s) {missing[index]} "
                  f"({', '.join(schema.CLASS_NAMES[m] for m in missing[index])}); "
                  f"present {present}"))
      continue
    if index not in picked:
      result.skipped_slices.append(
          (index, f"not among the {slices_per_case} labelled slices --slices_per_case "
                  "keeps"))
      continue
    normalized = preprocess.apply_normalization(case.image[index], normalization, offset,
                                                scale)
    image = preprocess.fit_image(normalized, geometry, image_size, pad)
    fitted_mask = preprocess.fit_mask(mask[index], geometry, image_size)
    example = schema.make_example(
        image, fitted_mask, case_id=case.case_id, slice_index=index, source=image_path,
        geometry=geometry, spacing=case.spacing, norm_method=normalization,
        norm_offset=offset, norm_scale=scale, annotated=annotated_labels,
        protocol=protocol)
    # deterministic=True: map entries (the feature keys) are otherwise serialized in an
    # order that varies between processes, which breaks byte-identical shards.
    result.examples.append((index, example.SerializeToString(deterministic=True)))
    counts = np.bincount(fitted_mask.ravel(), minlength=schema.NUM_CLASSES)
    result.class_counts = [a + int(b) for a, b in zip(result.class_counts, counts)]
    result.raw_stats = merge_stats(result.raw_stats, _stats(case.image[index]))
    result.stored_stats = merge_stats(result.stored_stats, _stats(image))
  return result
