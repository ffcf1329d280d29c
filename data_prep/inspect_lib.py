"""A QC report of a converted dataset: what the trainer will see, on one HTML page.

`write_report` reads the shards through `schema.parse_example` (as the trainer does: the
mask holds IGNORE_LABEL on the padding), draws one sample slice per case (its middle kept
slice) or every slice with the disc and vertebra outlines and the padding striped, and
puts them on `index.html` beside the PNG mosaics, with the tables of `dataset.json`
(splits, kept and pruned slices with reasons, class pixel frequencies, intensity
statistics, annotated labels) and a plot of each case's normalized intensities.

Intensities "after normalization" are the stored values inside each slice (padding
excluded), read from the shards. "Before normalization" per case is what the stored
offset and scale say about the raw image (percentile: P0.5 and P99.5; zscore: mean and
std), and the dataset-wide raw statistics are dataset.json's `intensity_statistics.raw`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf

from data_prep import fileio
from data_prep import html_report
from data_prep import manifest as manifest_lib
from data_prep import overlay
from data_prep import schema
from data_prep import slices

# Fine histogram bins per case over the dataset's stored range; the plot re-bins them over
# the central 99.8% of all pixels so that one outlier does not squash every curve.
HIST_BINS = 1024
PLOT_POINTS = 80
MOSAIC_COLUMNS = 8
DEFAULT_MAX_TILES = 64
SUMMARY = "summary.json"


class InspectError(ValueError):
  """A dataset that cannot be inspected: the message names the file and the problem."""


@dataclasses.dataclass
class CaseData:
  """What the shards hold for one case (pixels inside the slices, padding excluded)."""
  split: str
  slices_read: int = 0
  stats: list = dataclasses.field(default_factory=list)  # slices._stats accumulator
  histogram: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(HIST_BINS, np.int64))
  # Pixels per class id, then pixels of a set label (class unknown: partial annotation).
  class_pixels: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(schema.NUM_CLASSES + 1, np.int64))
  padding_pixels: int = 0


@dataclasses.dataclass
class Inspection:
  """The dataset read back: manifest, per-case data and the tiles to show per split."""
  data_dir: str
  manifest: manifest_lib.Manifest
  cases: dict[str, CaseData]
  # split -> [(case id, slice index, uint8 RGB tile)], sorted by case and slice.
  tiles: dict[str, list[tuple[str, int, np.ndarray]]]
  hist_range: tuple[float, float]
  warnings: list[str]
  seconds: float


def sample_slices(manifest: manifest_lib.Manifest) -> dict[str, int]:
  """{case id: its middle kept slice}: the one slice per case shown by default."""
  picked = {}
  for case in manifest.cases:
    kept = sorted(case.get("slices_kept") or [])
    if kept:
      picked[case["id"]] = kept[len(kept) // 2]
  return picked


def _hist_range(manifest: manifest_lib.Manifest) -> tuple[float, float]:
  stored = manifest.intensity_statistics.get("stored", {})
  lo, hi = float(stored.get("min", 0.0)), float(stored.get("max", 1.0))
  return (lo, hi) if hi > lo else (lo, lo + 1.0)


def inspect(data_dir: str | os.PathLike, *, all_slices: bool = False,
            progress: bool = False) -> Inspection:
  """Reads every shard of a converted dataset once.

  Args:
    data_dir: the output folder of spine-convert.
    all_slices: keep a tile of every slice, not only the middle kept slice of each case.
    progress: draw a progress bar over the slices.

  Returns:
    The inspection (tiles are full-size RGB outline views: memory grows with
    `all_slices` as slices x image_size^2 x 3 bytes).

  Raises:
    InspectError: no or an invalid manifest, a missing, truncated or corrupt shard.
  """
  start = time.monotonic()
  try:
    manifest = manifest_lib.load(data_dir)
  except (FileNotFoundError, ValueError) as e:
    raise InspectError(str(e)) from None
  compression = manifest.compression_type
  size = manifest.image_size
  lo, hi = _hist_range(manifest)
  sample = sample_slices(manifest)
  split_of = {c["id"]: c["split"] for c in manifest.cases}
  cases: dict[str, CaseData] = {}
  tiles: dict[str, list] = {s: [] for s in schema.SPLITS}
  warnings: list[str] = []
  total = sum(manifest.num_slices(s) for s in schema.SPLITS)
  bar = fileio.Progress(total, "inspect", unit="slices", enabled=progress)
  for split in schema.SPLITS:
    for path in manifest.files(split):
      if not fileio.path(path).is_file():
        raise InspectError(f"{path}: {split} shard listed in {schema.MANIFEST_NAME} is "
                           "missing; convert the data again")
      ds = tf.data.TFRecordDataset(path, compression_type=compression).map(
          lambda s: schema.parse_example(s, size))
      try:
        for ex in ds.as_numpy_iterator():
          cid = ex["case_id"].decode("utf-8")
          index = int(ex["slice_index"])
          if split_of.get(cid, split) != split:
            warnings.append(f"case {cid} slice {index} is in a {split} shard, but "
                            f"{schema.MANIFEST_NAME} puts the case in {split_of[cid]}")
          case = cases.setdefault(cid, CaseData(split))
          _add_slice(case, ex, lo, hi)
          # A case the manifest does not list (hand-written manifests): its first slice.
          if all_slices or sample.setdefault(cid, index) == index:
            tiles[split].append((cid, index, overlay.outline_rgb(ex["image"][..., 0],
                                                                 ex["mask"][..., 0])))
          bar.step()
      except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        first = str(e.message).strip().splitlines()[0]
        raise InspectError(f"{path}: corrupt or truncated shard ({first}); run "
                           f"spine-convert --verify={data_dir}, then convert again") from None
  for t in tiles.values():
    t.sort(key=lambda x: (x[0], x[1]))
  warnings += _compare_with_manifest(manifest, cases)
  return Inspection(str(data_dir), manifest, cases, tiles, (lo, hi), warnings,
                    time.monotonic() - start)


def _add_slice(case: CaseData, ex: dict[str, Any], lo: float, hi: float) -> None:
  valid = ex["valid"][..., 0]
  values = ex["image"][..., 0][valid]
  mask = ex["mask"][..., 0][valid]
  case.slices_read += 1
  case.padding_pixels += int((~valid).sum())
  if values.size:
    # The converter's own [count, sum, sum_sq, min, max] accumulator and its merge.
    acc = slices._stats(values)  # pylint: disable=protected-access
    case.stats = slices.merge_stats(case.stats, acc)
    idx = np.clip(((values - lo) / (hi - lo) * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    case.histogram += np.bincount(idx, minlength=HIST_BINS)
  exact = np.bincount(np.minimum(mask, schema.NUM_CLASSES), minlength=schema.NUM_CLASSES + 1)
  case.class_pixels += exact[:schema.NUM_CLASSES + 1]


def _compare_with_manifest(manifest: manifest_lib.Manifest,
                           cases: dict[str, CaseData]) -> list[str]:
  """Differences between the slices the manifest lists and those the shards hold."""
  out = []
  if not manifest.cases:  # written by hand (tests, benchmarks): nothing to compare
    return out
  listed = {c["id"]: len(c.get("slices_kept") or []) for c in manifest.cases}
  for cid, n in sorted(listed.items()):
    read = cases[cid].slices_read if cid in cases else 0
    if read != n:
      out.append(f"case {cid}: {schema.MANIFEST_NAME} lists {n} kept slices, the shards "
                 f"hold {read}")
  for cid in sorted(set(cases) - set(listed)):
    out.append(f"case {cid}: in the shards but not in {schema.MANIFEST_NAME}")
  return out


def plot_series(insp: Inspection) -> tuple[dict[str, tuple[list[float], list[float]]], str]:
  """Per-case intensity curves: {case id (split): (bin centres, fraction of pixels)}.

  The fine histograms are cut to the bins holding the central 99.8% of all pixels and
  merged into about PLOT_POINTS bins.

  Returns:
    (series, y-axis label).
  """
  total = sum((c.histogram for c in insp.cases.values()), np.zeros(HIST_BINS, np.int64))
  if not total.sum():
    return {}, "fraction of pixels"
  cdf = np.cumsum(total) / total.sum()
  first = int(np.searchsorted(cdf, 0.001))
  last = int(np.searchsorted(cdf, 0.999))
  group = max(1, -(-(last - first + 1) // PLOT_POINTS))
  lo, hi = insp.hist_range
  width = (hi - lo) / HIST_BINS
  series = {}
  for cid in sorted(insp.cases, key=lambda c: (schema.SPLITS.index(insp.cases[c].split), c)):
    case = insp.cases[cid]
    n = case.histogram.sum()
    if not n:
      continue
    xs, ys = [], []
    for b in range(first, last + 1, group):
      xs.append(lo + (b + min(group, last + 1 - b) / 2) * width)
      ys.append(float(case.histogram[b:min(b + group, last + 1)].sum() / n))
    series[f"{cid} ({case.split})"] = (xs, ys)
  return series, f"fraction of the case's pixels per bin of {group * width:.3g}"


def _mosaics(insp: Inspection, max_tiles: int) -> dict[str, list[tuple[str, list]]]:
  """split -> [(PNG name, tiles on it)], at most `max_tiles` per PNG."""
  out = {}
  for split, tiles in insp.tiles.items():
    if not tiles:
      continue
    chunks = [tiles[i:i + max_tiles] for i in range(0, len(tiles), max_tiles)]
    names = ([f"mosaic_{split}.png"] if len(chunks) == 1 else
             [f"mosaic_{split}_{k + 1:03d}.png" for k in range(len(chunks))])
    out[split] = list(zip(names, chunks))
  return out


def _png_writer(tiles: list, kinds: dict[str, str]):
  def write(path: str) -> None:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    captions = [cid if kinds.get(cid) == "2d" else f"{cid} #{i}" for cid, i, _ in tiles]
    grid = overlay.tile_mosaic([t for _, _, t in tiles], MOSAIC_COLUMNS, captions=captions)
    Image.fromarray(grid).save(path, format="PNG", optimize=True)
  return write


def _hex(color) -> str:
  return "#%02x%02x%02x" % tuple(color)


def case_rows(insp: Inspection) -> tuple[list[str], list[list]]:
  """The per-case table: manifest fields and what the shards hold."""
  pruned: dict[str, list[str]] = {}
  for s in insp.manifest.skipped_slices:
    pruned.setdefault(str(s["case_id"]), []).append(s["reason"])
  header = ["case", "split", "kind", "shape", "spacing (mm)", "slices kept", "pruned",
            "norm offset", "norm scale", "stored mean", "stored std", "stored range"
            ] + [f"{n} %" for n in schema.CLASS_NAMES] + ["unknown %", "padding %"]
  rows = []
  for case in insp.manifest.cases:
    data = insp.cases.get(case["id"])
    norm = case.get("normalization", {})
    row = [case["id"], case["split"], case.get("kind", ""),
           "x".join(str(v) for v in case.get("shape", [])),
           "x".join(f"{v:.3g}" for v in case.get("spacing", [])),
           len(case.get("slices_kept") or []), len(pruned.get(case["id"], [])),
           norm.get("offset"), norm.get("scale")]
    if data is None:  # every slice pruned: nothing in the shards
      row += [None] * (len(header) - len(row))
    else:
      st = slices.describe_stats(data.stats)
      inside = max(int(data.class_pixels.sum()), 1)
      row += [st.get("mean"), st.get("std"),
              f"{html_report.format_value(st.get('min'))}.."
              f"{html_report.format_value(st.get('max'))}" if st else None]
      row += [100.0 * float(v) / inside for v in data.class_pixels]
      row += [100.0 * data.padding_pixels / max(inside + data.padding_pixels, 1)]
    rows.append(row)
  return header, rows


def _norm_note(method: str) -> str:
  meaning = {
      "percentile": "offset = the raw P0.5 and offset + scale = the raw P99.5 of the case "
                    "(before normalization); stored = (raw - offset) / scale clipped to "
                    "[0, 1]",
      "zscore": "offset = the raw mean and scale = the raw standard deviation of the case "
                "(before normalization); stored = (raw - offset) / scale",
      "divide255": "offset 0 and scale 255 for every case; stored = raw / 255",
  }.get(method, f"normalization {method!r}: stored = (raw - offset) / scale")
  return (f"Normalization {method}: {meaning}. The stored statistics and class "
          "percentages are read from the shards, over the pixels inside each slice "
          "(padding excluded, its share is the last column); 'unknown' are pixels whose "
          "class the partial annotation leaves open.")


def build_page(insp: Inspection, *, max_tiles_per_mosaic: int = DEFAULT_MAX_TILES,
               all_slices: bool = False) -> dict[str, Any]:
  """The report's files: {relative name: content or writer} (index.html included)."""
  m = insp.manifest
  kinds = {c["id"]: c.get("kind", "") for c in m.cases}
  page = html_report.Page(f"spine-inspect: {insp.data_dir}")
  page.paragraph(f"{fileio.path(insp.data_dir).absolute()}/{schema.MANIFEST_NAME}: format "
                 f"{m.format_version}, {m.input_kind or '?'} input, "
                 f"{m.image_size} px squares, target spacing "
                 f"{m.target_spacing_mm or 'none (fit by the longer side)'}, "
                 f"compression {m.compression}; {len(insp.cases)} cases read in "
                 f"{insp.seconds:.1f} s.", "note")
  for w in insp.warnings:
    page.paragraph(f"warning: {w}", "warn")

  page.heading("Totals")
  totals = m.totals
  page.table(list(totals), [list(totals.values())])
  labels = m.labels
  page.paragraph("Annotated labels: " + ", ".join(f"{a} {labels.get(str(a), '?')}"
                                                  for a in m.annotated_labels)
                 + "; normalization: " + ", ".join(f"{k} {v}" for k, v in
                                                   m.normalization.items()))

  files: dict[str, Any] = {}
  page.heading("Slices with outlines")
  page.legend([(_hex(overlay.COLORS[1]), "disc outline"),
               (_hex(overlay.COLORS[2]), "vertebra outline"),
               (_hex(overlay.PADDING_STRIPE), "padding (striped, darkened)")])
  page.paragraph("Every slice of every case." if all_slices else
                 "One slice per case: its middle kept slice (spine-inspect --all shows "
                 "every slice). Tiles are the stored squares as the trainer reads them; "
                 "captions name the case (and slice index for volumes).", "note")
  for split, chunks in _mosaics(insp, max_tiles_per_mosaic).items():
    count = sum(len(t) for _, t in chunks)
    page.heading(f"{split}: {count} slices", level=3, anchor=f"mosaic-{split}")
    for name, tiles in chunks:
      files[name] = _png_writer(tiles, kinds)
      page.image(name, f"{split} slices with outlines",
                 caption=f"{name}: " + ", ".join(
                     cid if kinds.get(cid) == "2d" else f"{cid} #{i}"
                     for cid, i, _ in tiles))

  page.heading("Normalized intensities per case")
  series, y_label = plot_series(insp)
  if series:
    page.svg(html_report.line_plot(series, "stored (normalized) intensity", y_label),
             caption="histogram of each case's stored intensities inside its slices "
                     "(padding excluded), central 99.8% of all pixels; a case from "
                     "another scanner or with a failed normalization stands apart")

  page.heading("Splits")
  freqs = m.class_pixel_frequencies
  rows = []
  for split in [s for s in schema.SPLITS if s in m.splits]:
    rows.append([split, m.num_cases(split), m.num_slices(split), len(m.shards(split))]
                + list(freqs.get(split, [None] * schema.NUM_CLASSES)))
  rows.append(["all", sum(m.num_cases(s) for s in m.splits), totals.get("slices_written"),
               len(m.shards())] + list(freqs.get("all", [None] * schema.NUM_CLASSES)))
  page.table(["split", "cases", "slices", "shards"]
             + [f"{n} pixel frequency" for n in schema.CLASS_NAMES], rows,
             caption="class pixel frequencies from dataset.json (padding counted as "
                     "background there)")

  page.heading("Intensity statistics")
  stats = m.intensity_statistics
  page.table(["", "min", "max", "mean", "std"],
             [[name, *(stats.get(k, {}).get(q) for q in ("min", "max", "mean", "std"))]
              for name, k in (("raw (before normalization)", "raw"),
                              ("stored (after normalization, padding included)",
                               "stored"))],
             caption="over every kept slice, from dataset.json")

  page.heading("Cases")
  page.paragraph(_norm_note(m.norm_method), "note")
  header, rows = case_rows(insp)
  page.table(header, rows)

  page.heading(f"Pruned slices ({len(m.skipped_slices)})")
  page.table(["case", "slice", "source", "reason"],
             [[s.get("case_id"), s.get("slice_index"), s.get("source"), s.get("reason")]
              for s in m.skipped_slices])
  page.heading(f"Skipped files ({len(m.skipped_files)})")
  page.table(["file", "reason"], [[f.get("path"), f.get("reason")]
                                  for f in m.skipped_files])

  summary = {"data_dir": str(insp.data_dir), "warnings": insp.warnings,
             "seconds_reading": round(insp.seconds, 3),
             "mosaics": {split: [{"file": n, "tiles": [[c, i] for c, i, _ in t]}
                                 for n, t in chunks]
                         for split, chunks in _mosaics(insp, max_tiles_per_mosaic).items()},
             "cases": [dict(zip(header, row)) for row in rows],
             # Exact counts from the shards, inside the slices: per class id, then set
             # labels (unknown class), then the padding.
             "pixels": {cid: {"classes": c.class_pixels[:schema.NUM_CLASSES].tolist(),
                              "unknown": int(c.class_pixels[schema.NUM_CLASSES]),
                              "padding": c.padding_pixels, "slices": c.slices_read}
                        for cid, c in sorted(insp.cases.items())}}
  files[SUMMARY] = json.dumps(summary, indent=2, sort_keys=True) + "\n"
  files[html_report.INDEX] = page.html()
  return files


def write_report(data_dir: str | os.PathLike, output: str | os.PathLike, *,
                 all_slices: bool = False, max_tiles_per_mosaic: int = DEFAULT_MAX_TILES,
                 overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
  """Reads a converted dataset and writes its QC report folder.

  Args:
    data_dir: the output folder of spine-convert.
    output: the report folder (index.html, mosaic_<split>*.png, summary.json); absent or
      empty, or an earlier report with `overwrite`.
    all_slices: show every slice, not one per case.
    max_tiles_per_mosaic: tiles per PNG; more tiles make more PNGs.
    overwrite: replace an earlier report in `output`.
    progress: draw a progress bar while reading the shards.

  Returns:
    {"output", "files", "tiles", "cases", "warnings", "seconds"}.

  Raises:
    InspectError: a dataset that cannot be read (see `inspect`).
    FileExistsError: `output` may not be written (checked before reading).
    ValueError: max_tiles_per_mosaic < 1.
    OSError: the report cannot be written (nothing is left behind).
  """
  if max_tiles_per_mosaic < 1:
    raise ValueError(f"max_tiles_per_mosaic must be >= 1, found {max_tiles_per_mosaic}")
  start = time.monotonic()
  html_report.check_output_folder(output, overwrite)  # before the slow part
  insp = inspect(data_dir, all_slices=all_slices, progress=progress)
  files = build_page(insp, max_tiles_per_mosaic=max_tiles_per_mosaic, all_slices=all_slices)
  out = html_report.write_report_folder(output, files, overwrite=overwrite)
  return {"output": str(out), "files": sorted(files),
          "tiles": sum(len(t) for t in insp.tiles.values()), "cases": len(insp.cases),
          "warnings": insp.warnings, "seconds": time.monotonic() - start}

