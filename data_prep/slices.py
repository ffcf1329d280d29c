"""From one `Case` to serialized examples: label map, label-complete filter, normalize, fit.

`process_case` is the unit of work of the converter's worker processes. It reads the case,
collapses labels with the label map, normalizes the intensities once (per image for a 2D
file, per volume for NIfTI) with `preprocess`, keeps the slices whose mask holds every
required label, fits each kept slice into the square and serializes it with
`schema.make_example`. It returns plain picklable data (bytes, lists, numbers), so the
parent process only writes bytes to the shards.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

from data_prep import preprocess, readers, schema

NUM_CLASSES = 3
LABEL_NAMES = {0: "background", 1: "disc", 2: "vertebra"}


class LabelError(ValueError):
  """A mask holds label values the flags do not account for (a configuration error)."""


def parse_label_map(text: str | None) -> dict[int, int]:
  """Parses `--label_map`, e.g. "1-5:1,6-12:2", into {source id: class id}.

  Background 0 maps to 0 unless the map says otherwise.

  Raises:
    ValueError: on a malformed entry, a target outside 0..NUM_CLASSES-1, or a source id
      mapped twice.
  """
  mapping: dict[int, int] = {}
  if not text:
    return mapping
  for entry in text.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\s*-\s*(\d+))?\s*:\s*(\d+)\s*", entry)
    if not m:
      raise ValueError(f"--label_map entry {entry!r}: expected SRC:DST or LO-HI:DST with "
                       "non-negative integers, e.g. 1-5:1,6-12:2")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    dst = int(m.group(3))
    if hi < lo:
      raise ValueError(f"--label_map entry {entry!r}: range end {hi} is below start {lo}")
    if dst >= NUM_CLASSES:
      raise ValueError(f"--label_map entry {entry!r}: target {dst} is not a class id "
                       f"(expected 0..{NUM_CLASSES - 1})")
    for src in range(lo, hi + 1):
      if src in mapping:
        raise ValueError(f"--label_map maps source id {src} twice")
      mapping[src] = dst
  mapping.setdefault(0, 0)
  return mapping


def apply_label_map(mask: np.ndarray, mapping: dict[int, int], source: str) -> np.ndarray:
  """Maps source ids to class ids; with an empty mapping only checks the ids.

  Raises:
    LabelError: values absent from the map (or, without a map, outside the class ids),
      naming the file and the values.
  """
  values = np.unique(mask)
  if not mapping:
    bad = [int(v) for v in values if not 0 <= v < NUM_CLASSES]
    if bad:
      raise LabelError(f"{source}: mask holds values {bad} outside the class ids "
                       f"0..{NUM_CLASSES - 1}; pass --label_map (e.g. 1-5:1,6-12:2)")
    return mask.astype(np.uint8)
  bad = [int(v) for v in values if int(v) not in mapping]
  if bad:
    raise LabelError(f"{source}: mask values {bad} are not covered by --label_map "
                     f"(maps {sorted(mapping)})")
  lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
  for src, dst in mapping.items():
    if src < lut.size:
      lut[src] = dst
  return lut[mask]


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
  class_counts: list = dataclasses.field(default_factory=lambda: [0] * NUM_CLASSES)
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
                 required_labels: Sequence[int], label_map: dict[int, int]) -> CaseResult:
  """Reads one case and turns its kept slices into serialized examples.

  Args:
    image_path: source image (2D file or NIfTI volume).
    mask_path: its label mask.
    image_size: side of the stored square.
    normalization: one of `preprocess.NORMALIZATIONS`.
    required_labels: a slice is kept only if its mask holds every one of these.
    label_map: {source id: class id} from `parse_label_map` (empty: ids must be 0..2).

  Returns:
    A CaseResult. Input problems are reported in `error` (the case is skipped), label
    problems in `fatal`; neither raises, so one bad file never kills a worker pool.
  """
  result = CaseResult(case_id=readers.case_id_of(image_path), image_path=image_path,
                      mask_path=mask_path)
  try:
    case = readers.read_case(image_path, mask_path)
    mask = apply_label_map(case.mask, label_map, mask_path)
  except readers.InputError as e:
    result.error = str(e)
    return result
  except LabelError as e:
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
  geometry = preprocess.fit_geometry(case.image.shape[1], case.image.shape[2], image_size)
  for index in range(case.image.shape[0]):
    missing = missing_labels(mask[index], required_labels)
    if missing:
      present = sorted(set(np.unique(mask[index]).tolist()))
      result.skipped_slices.append(
          (index, f"missing label(s) {missing} "
                  f"({', '.join(LABEL_NAMES.get(m, str(m)) for m in missing)}); "
                  f"present {present}"))
      continue
    normalized = preprocess.apply_normalization(case.image[index], normalization, offset,
                                                scale)
    image = preprocess.fit_image(normalized, geometry, image_size, pad)
    fitted_mask = preprocess.fit_mask(mask[index], geometry, image_size)
    example = schema.make_example(
        image, fitted_mask, case_id=case.case_id, slice_index=index, source=image_path,
        geometry=geometry, spacing=case.spacing, norm_method=normalization,
        norm_offset=offset, norm_scale=scale)
    # deterministic=True: map entries (the feature keys) are otherwise serialized in an
    # order that varies between processes, which breaks byte-identical shards.
    result.examples.append((index, example.SerializeToString(deterministic=True)))
    counts = np.bincount(fitted_mask.ravel(), minlength=NUM_CLASSES)
    result.class_counts = [a + int(b) for a, b in zip(result.class_counts, counts)]
    result.raw_stats = merge_stats(result.raw_stats, _stats(case.image[index]))
    result.stored_stats = merge_stats(result.stored_stats, _stats(image))
  return result
