"""Deterministic conversion: split by case, sharded writing (temp + rename), manifest last.

`convert_dataset` is the library behind `spine-convert`. Cases are processed in parallel
(`slices.process_case` in "spawn" worker processes: TensorFlow is not fork-safe; small jobs
stay in the parent, see `_WORKER_START_S`) but their results are consumed in case-id
order with at most two cases per worker in flight, so
memory stays bounded by a few cases whatever the dataset size, and the shards are
byte-identical whatever `num_workers` is. With `runner`, an Apache Beam pipeline does
the per-case work and writes the staged shards instead (`beam_convert`); the rest, the
manifest and the publish included, is this module's, so the output is the same bytes.

Splits are drawn over case groups (a volume, a 2D file, or the group `case_id_regex`
extracts): groups are ordered by SHA-256 of "seed:group", the first ones go to test, the
next to val, the rest to train. A case whose slices are all pruned leaves its split that
much smaller.

Everything is written into a hidden temporary folder inside the output directory; only
after every case succeeded are the shards renamed into place, and `dataset.json` (whose
presence marks a finished dataset) is renamed last. Leftovers of a killed run (that folder,
temporary manifests) are removed before the output directory is checked for emptiness. An
OS error on the output (full disk, read-only mount, a path that cannot be a folder) becomes
a ConversionError naming the path, and the run leaves nothing behind: no shards, no
manifest, no temporary folder, and no output folder it created itself.

Besides the keys `manifest` documents, `dataset.json` holds: input_kind ("2d" | "3d"),
flags, class_pixel_counts / class_pixel_frequencies (per split and "all", over the stored
squares), intensity_statistics ("raw" intensities and "stored" normalized squares of the
kept slices: min/max/mean/std), cases (id, group, split, source files, display shape
[S, H, W], spacing, kept slice indices, normalization offset/scale), skipped {"files":
[{path, reason}], "slices": [{case_id, slice_index, source, reason}]} and totals.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import multiprocessing
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

from data_prep import fileio
from data_prep import manifest as manifest_lib
from data_prep import options as options_lib
from data_prep import preprocess, readers, schema, shards, slices
from data_prep.options import ConvertOptions  # convert_dataset's settings
from data_prep.shards import ConversionError  # the converter's one error type

_TMP_PREFIX = ".spine-convert-tmp-"
# What killed runs leave in an output folder: the temporary folder, and temporary
# manifests (earlier versions named them `.dataset.json.*.tmp`; fileio.TMP_PREFIX files are
# always removed by fileio.remove_stale_temporaries).
_STALE_PATTERNS = (_TMP_PREFIX + "*", f".{schema.MANIFEST_NAME}.*.tmp")
# How many unusable files an "every slice was pruned" error names before "and N more".
_MAX_LISTED = 10


def assign_splits(groups: Sequence[str], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
  """Maps each case group to "train", "val" or "test", deterministically from `seed`.

  Each non-zero fraction gets at least one group when there are two groups or more, and
  train keeps at least one.
  """
  order = sorted(set(groups),
                 key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
  n = len(order)

  def count(fraction: float) -> int:
    return 0 if fraction <= 0 or n < 2 else max(1, int(n * fraction + 0.5))

  n_test = min(count(test_fraction), max(n - 1, 0))
  n_val = min(count(val_fraction), max(n - 1 - n_test, 0))
  return {g: ("test" if i < n_test else "val" if i < n_test + n_val else "train")
          for i, g in enumerate(order)}


def group_of(case_id: str, case_id_regex: Optional[str]) -> str:
  """The split group of a case: the regex's first group (or whole match), else the id."""
  if not case_id_regex:
    return case_id
  m = re.search(case_id_regex, case_id)
  if not m:
    raise ConversionError(f"case id {case_id!r} does not match --case_id_regex "
                          f"{case_id_regex!r}")
  return m.group(1) if m.groups() else m.group(0)


# A "spawn" worker is a fresh interpreter that imports TensorFlow (via schema/preprocess):
# 7.5 s and 620 MB each on the loaded 2-core dev machine (bench/convert_bench.py). Cases
# therefore run in the parent until the estimated remaining work exceeds what a pool of W
# workers could save, start-up * W / (W - 1), with a safety factor of 2 for imperfect
# scaling (measured: 1200 slices took 17.6 s in the parent, 23.2 s with 2 workers).
# Where a case ran never changes the output.
_WORKER_START_S = 7.5


def _pool_pays_off(remaining_s: float, num_workers: int) -> bool:
  return remaining_s > 2.0 * _WORKER_START_S * num_workers / (num_workers - 1)


def _results(tasks: list, num_workers: int):
  """Yields results in task order; with a pool, at most 2 tasks per worker in flight."""
  start, i = time.monotonic(), 0
  while i < len(tasks):
    if num_workers > 1 and len(tasks) - i > 1:
      if _WORKER_START_S <= 0 or (i > 0 and _pool_pays_off(
          (time.monotonic() - start) / i * (len(tasks) - i), num_workers)):
        break
    yield shards.work(tasks[i])
    i += 1
  rest = iter(tasks[i:])
  if i == len(tasks):
    return
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(min(num_workers, len(tasks) - i)) as pool:
    pending: collections.deque = collections.deque()
    for task in rest:
      pending.append(pool.apply_async(shards.work, (task,)))
      if len(pending) >= 2 * num_workers:
        break
    while pending:
      result = pending.popleft().get()
      nxt = next(rest, None)
      if nxt is not None:
        pending.append(pool.apply_async(shards.work, (nxt,)))
      yield result


def _missing_dirs(path: pathlib.Path) -> list[pathlib.Path]:
  """`path` and its ancestors that do not exist yet, deepest first."""
  missing = []
  while not path.exists() and not path.is_symlink() and path != path.parent:
    missing.append(path)
    path = path.parent
  return missing


def _prepare_output(output_dir: pathlib.Path, overwrite: bool,
                    log: Callable[[str], None]) -> None:
  """Creates `output_dir` or checks it may be written, after removing dead temporaries."""
  if output_dir.exists() and not output_dir.is_dir():
    raise ConversionError(f"{output_dir}: --output_dir is an existing file; expected a "
                          "directory (or a path that does not exist yet)")
  if output_dir.is_dir():
    # Before the emptiness check: a folder holding only a killed run's hidden leftovers
    # looks empty to `ls` and must not be refused as "not empty".
    removed = fileio.remove_stale_temporaries(output_dir, _STALE_PATTERNS)
    if removed:
      log(f"{output_dir}: removed leftovers of an interrupted conversion: "
          f"{', '.join(p.name for p in removed)}")
    entries = sorted(p.name for p in output_dir.iterdir()
                     if p.name != fileio.FolderLock.REMOTE_LOCK_NAME)
    if entries and not overwrite:
      shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more"
                                        if len(entries) > 3 else "")
      raise ConversionError(f"{output_dir}: output directory is not empty (it holds "
                            f"{shown}); pass --overwrite to replace the dataset in it")
  output_dir.mkdir(parents=True, exist_ok=True)


def _publish(output_dir: pathlib.Path, tmp_dir: pathlib.Path,
             staged: list[tuple[pathlib.Path, str]], manifest: dict) -> None:
  """Replaces an old dataset by the staged shards; the manifest goes last.

  The manifest is written inside `tmp_dir` first, so every write that needs disk space is
  done before the old dataset is touched; what follows are deletions and renames. Should a
  rename still fail, the shards already moved are deleted again: a dataset without its
  manifest would only be refused by every reader.
  """
  staged_manifest = fileio.write_json_atomic(tmp_dir / schema.MANIFEST_NAME, manifest)
  final = manifest_lib.path_of(output_dir)
  if final.exists():  # First, so a half-replaced dataset never looks finished.
    final.unlink()
  for split in schema.SPLITS:
    for p in output_dir.glob(schema.shard_pattern(split)):
      p.unlink()
  placed = []
  try:
    for tmp, name in staged:
      fileio.rename(tmp, output_dir / name)
      placed.append(output_dir / name)
    fileio.rename(staged_manifest, final)
  except BaseException:
    for p in placed:
      try:
        p.unlink()
      except OSError:
        pass  # The error being raised says what is wrong with this folder.
    raise


def _log_to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def verify_dataset(data_dir: str | os.PathLike,
                   progress: bool = False) -> tuple[int, list[str]]:
  """Checks a converted dataset: its manifest loads and every shard matches its SHA-256.

  Args:
    data_dir: the output folder of a conversion.
    progress: draw a progress bar on stderr while hashing.

  Returns:
    (number of shards the manifest lists, one message per bad shard naming its path);
    the list is empty when the dataset is intact.

  Raises:
    ConversionError: no manifest, or one that cannot be read or has another version.
  """
  try:
    manifest = manifest_lib.load(data_dir)
  except (OSError, ValueError) as e:
    raise ConversionError(str(e)) from None
  shards = manifest.shards()
  return len(shards), manifest_lib.verify_shards(shards, progress)


def _nothing_to_write(pairs: list, orphans: list, acc: "_Accumulator",
                      required_labels: Sequence[int]) -> str:
  """The error for a run that kept no slice, with the reasons it kept none."""
  lines = [f"every slice was pruned or skipped ({len(pairs)} pairs: {len(acc.failed)} "
           f"unusable, {len(acc.skipped_slices)} slices without labels {required_labels}); "
           "nothing to write. Check --required_labels and --label_map"]
  files = [(f["path"], f["reason"]) for f in acc.failed] + list(orphans)
  for path, why in files[:_MAX_LISTED]:
    lines.append(f"  skipped file {path}: {why}")
  if len(files) > _MAX_LISTED:
    lines.append(f"  ... and {len(files) - _MAX_LISTED} more skipped files")
  # Slice reasons end in what the slice holds ("; present [0, 1]"): group by the rest.
  by_reason = collections.Counter(s["reason"].split("; ")[0] for s in acc.skipped_slices)
  for why, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
    lines.append(f"  {n} slice{'s' if n != 1 else ''} skipped: {why}")
  return "\n".join(lines)


class _Plan(NamedTuple):
  """What a conversion will do, decided from the inputs before the output is touched."""
  pairs: list[tuple[str, str, str]]  # (case id, image path, mask path), in case order
  orphans: list[tuple[str, str]]     # (path, why) of every file without its partner
  kind: str                          # "2d" or "3d"
  groups: dict[str, str]             # {case id: split group}
  split_of: dict[str, str]           # {split group: split}


def _plan(images_dir: str, masks_dir: str, options: ConvertOptions) -> _Plan:
  """Pairs images and masks by case id and draws the split of every case group.

  Raises:
    readers.InputError: missing or empty input directories.
    ConversionError: no pairs, --strict with unpaired files, 2D images mixed with
      volumes, a target spacing for 2D images of unknown spacing, or a case id that
      `case_id_regex` does not match.
  """
  pairs, orphans = readers.pair_files(images_dir, masks_dir)
  if options.strict and orphans:
    raise ConversionError(f"--strict: {len(orphans)} unpaired file(s), first "
                          f"{orphans[0][0]}: {orphans[0][1]}")
  if not pairs:
    example = f", e.g. {orphans[0][0]}: {orphans[0][1]}" if orphans else ""
    raise ConversionError(f"no image/mask pairs found between {images_dir} and "
                          f"{masks_dir} ({len(orphans)} unpaired files{example})")
  kinds = {"3d" if readers.is_nifti(p[1]) else "2d" for p in pairs}
  if len(kinds) > 1:
    raise ConversionError(f"{images_dir}: mixes 2D images and NIfTI volumes; convert them "
                          "separately (their normalization differs: per image vs volume)")
  if (options.target_spacing_mm is not None and kinds == {"2d"}
      and options.spacing_2d_mm is None):
    raise ConversionError(
        f"{images_dir}: --target_spacing_mm={options.target_spacing_mm} resamples every "
        "slice to that spacing, but 2D images carry no pixel spacing; pass --spacing_2d_mm "
        "(mm per pixel of these images, ROW[,COLUMN])")
  groups = {cid: group_of(cid, options.case_id_regex) for cid, _, _ in pairs}
  split_of = assign_splits(list(groups.values()), options.val_fraction,
                           options.test_fraction, options.seed)
  return _Plan(pairs, orphans, kinds.pop(), groups, split_of)


@contextlib.contextmanager
def _staging(out: pathlib.Path, options: ConvertOptions,
             log: Callable[[str], None]) -> Iterator[Optional[pathlib.Path]]:
  """Holds the output folder, locked, with a temporary folder for the shards inside.

  Yields the temporary folder (None for a dry run, which touches nothing). Leaving
  removes it and releases the lock; leaving on an error also removes the (empty) folders
  this run created, so that a failed run leaves no trace.

  Raises:
    ConversionError: the output folder may not be written (an existing file, not empty
      without --overwrite, another conversion holds it, an OS error).
  """
  if options.dry_run:
    yield None
    return
  created = _missing_dirs(out)
  try:
    with contextlib.ExitStack() as stack:
      with shards.output_errors("prepare the output directory", out):
        lock = fileio.FolderLock(out, "spine-convert")
        existed = out.is_dir()
        # Locked before the leftover clean-up: a live run's temporaries are not leftovers.
        if existed:
          stack.enter_context(lock)
        _prepare_output(out, options.overwrite, log)
        if not existed:
          stack.enter_context(lock)
        tmp_dir = fileio.make_temp_dir(out, _TMP_PREFIX)
      stack.callback(fileio.remove_tree, tmp_dir)
      yield tmp_dir
  except BaseException:
    for folder in created:
      try:
        folder.rmdir()
      except OSError:
        break
    raise


def _consume(plan: _Plan, tmp_dir: Optional[pathlib.Path], options: ConvertOptions,
             progress: bool) -> tuple[dict[str, shards.ShardSet], "_Accumulator"]:
  """Processes every case, in case order, dealing its examples to its split's shards.

  Returns:
    ({split: its shards, not yet closed}, the statistics and skip lists of every case).

  Raises:
    ConversionError: a fatal case error (a label error, ...), a skipped file under
      --strict, or no slice kept at all (the message lists why).
  """
  beam = bool(options.runner)
  shard_sets = {s: shards.ShardSet(tmp_dir, s, *options.shard_args, staged=beam)
                for s in schema.SPLITS}
  kwargs = options.case_kwargs()
  tasks = [(img, msk, kwargs) for _, img, msk in plan.pairs]
  bar = fileio.Progress(len(tasks), "convert", unit="cases", enabled=progress)
  acc = _Accumulator(plan.split_of, plan.groups)
  if beam:  # The pipeline writes the staged shards; its results come back in task order.
    results = options_lib.beam_engine().run(
        tasks, {cid: plan.split_of[g] for cid, g in plan.groups.items()}, tmp_dir, options)
  else:
    results = _results(tasks, min(options.workers, len(tasks)))
  for result in results:
    if result.fatal:
      raise ConversionError(result.fatal)
    if result.error and options.strict:
      raise ConversionError(f"--strict: {result.error}")
    split = plan.split_of[plan.groups[result.case_id]]
    for _, serialized in result.examples:
      shard_sets[split].add(serialized)
    acc.add(result, split)
    bar.step(extra=f"{acc.slices_written} slices")
  if acc.slices_written == 0:
    raise ConversionError(_nothing_to_write(plan.pairs, plan.orphans, acc,
                                            list(options.required_labels)))
  return shard_sets, acc


def _close_shards(shard_sets: dict[str, shards.ShardSet], acc: "_Accumulator",
                  dry_run: bool) -> tuple[dict[str, Any], list[tuple[pathlib.Path, str]]]:
  """Closes and hashes the shards.

  Returns:
    (the manifest's "splits", [(staged path, final name)] of the shards to publish; none
    for a dry run, whose shard entries have no sha256).
  """
  staged, split_info = [], {}
  for split, shard_set in shard_sets.items():
    entries = []
    for tmp, name, count in shard_set.finish():
      entry = {"file": name, "examples": count}
      if not dry_run:
        with shards.output_errors("read back the shards", tmp):
          entry["sha256"] = fileio.sha256(tmp)
        staged.append((tmp, name))
      entries.append(entry)
    split_info[split] = {"cases": acc.cases_per_split[split],
                         "slices": shard_set.total, "shards": entries}
  return split_info, staged


def convert_dataset(images_dir: str, masks_dir: str, output_dir: str,
                    options: Optional[ConvertOptions] = None, *, progress: bool = True,
                    log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
  """Converts paired image/mask folders into sharded TFRecords plus `dataset.json`.

  Four steps: plan (pair the inputs, split by case), staging (lock the output folder,
  make its temporary folder), consume (process the cases, write the shards) and publish
  (rename the shards into place, the manifest last).

  Args:
    images_dir, masks_dir: source folders (2D images + .npy/PNG masks, or NIfTI).
    output_dir: destination; must be empty or absent unless `options.overwrite`.
    options: every conversion setting (`ConvertOptions`, validated when built; with
      `runner`, an Apache Beam pipeline does the per-case work and writes the shards,
      `beam_convert`); default: `ConvertOptions()`.
    progress: draw a progress bar on stderr.
    log: receives one-line notices (leftovers of a killed run removed); default stderr.

  Returns:
    The manifest (as written to `dataset.json`, plus "dry_run").

  Raises:
    readers.InputError: missing or empty input directories.
    ConversionError: no pairs, everything pruned (the message lists why), a label error,
      --strict violations, or an output directory that may not be written (an existing
      file, a full disk, a read-only file system, ...).
  """
  if options is None:
    options = ConvertOptions()
  plan = _plan(images_dir, masks_dir, options)
  out = fileio.path(output_dir)
  with _staging(out, options, log or _log_to_stderr) as tmp_dir:
    shard_sets, acc = _consume(plan, tmp_dir, options, progress)
    split_info, staged = _close_shards(shard_sets, acc, options.dry_run)
    manifest = acc.manifest(options.manifest_flags(images_dir, masks_dir, output_dir),
                            split_info, plan.orphans, plan.kind, options.image_size,
                            options.normalization, options.compression,
                            options.protocol)
    if not options.dry_run:
      with shards.output_errors("write the dataset", out):
        _publish(out, tmp_dir, staged, manifest)
  return dict(manifest, dry_run=options.dry_run)


class _Accumulator:
  """Collects per-case results into the manifest's statistics and skip lists."""

  def __init__(self, split_of: dict[str, str], groups: dict[str, str]):
    self.split_of, self.groups = split_of, groups
    self.cases: list[dict] = []
    self.failed: list[dict] = []
    self.skipped_slices: list[dict] = []
    self.cases_per_split = {s: 0 for s in schema.SPLITS}
    self.class_counts = {s: [0] * schema.NUM_CLASSES for s in schema.SPLITS}
    self.raw: list[float] = []
    self.stored: list[float] = []
    self.slices_written = 0

  def add(self, r: slices.CaseResult, split: str) -> None:
    if r.error:
      self.failed.append({"path": r.image_path, "reason": r.error})
      return
    self.skipped_slices += [{"case_id": r.case_id, "slice_index": i,
                             "source": r.image_path, "reason": why}
                            for i, why in r.skipped_slices]
    if r.examples:
      self.cases_per_split[split] += 1
    self.slices_written += len(r.examples)
    self.class_counts[split] = [a + b for a, b in zip(self.class_counts[split],
                                                       r.class_counts)]
    self.raw = slices.merge_stats(self.raw, r.raw_stats)
    self.stored = slices.merge_stats(self.stored, r.stored_stats)
    self.cases.append({
        "id": r.case_id, "group": self.groups[r.case_id], "split": split,
        "kind": r.kind, "image": r.image_path, "mask": r.mask_path,
        "shape": list(r.shape), "spacing": list(r.spacing),
        "slices_kept": [i for i, _ in r.examples],
        "normalization": {"offset": r.norm_offset, "scale": r.norm_scale}})

  def manifest(self, flags, split_info, orphans, kind, image_size, normalization,
               compression, protocol) -> dict[str, Any]:
    def freqs(counts):
      total = sum(counts)
      return [c / total if total else 0.0 for c in counts]

    all_counts = [sum(c) for c in zip(*self.class_counts.values())]
    return manifest_lib.make(
        image_size=image_size, normalization=normalization,
        per="volume" if kind == "3d" else "image", compression=compression,
        splits=split_info, extra={
        "normalization": {"percentiles": list(preprocess.PERCENTILES)},
        "input_kind": kind,
        # mm per stored pixel (None: slices fitted by their longer side, any mm/pixel).
        "target_spacing_mm": flags["target_spacing_mm"],
        "annotated_labels": flags["annotated_labels"],
        # Only another protocol is written: a default conversion keeps its bytes.
        **({} if protocol == schema.DEFAULT_PROTOCOL else {"protocol": protocol}),
        "flags": flags,
        "class_pixel_counts": dict(self.class_counts, all=all_counts),
        "class_pixel_frequencies": {**{s: freqs(c) for s, c in self.class_counts.items()},
                                    "all": freqs(all_counts)},
        "intensity_statistics": {"raw": slices.describe_stats(self.raw),
                                 "stored": slices.describe_stats(self.stored)},
        "cases": self.cases,
        "skipped": {"files": [{"path": p, "reason": why} for p, why in orphans]
                             + self.failed,
                    "slices": self.skipped_slices},
        "totals": {"pairs": len(self.cases) + len(self.failed),
                   "cases_converted": sum(self.cases_per_split.values()),
                   "slices_written": self.slices_written,
                   "slices_skipped": len(self.skipped_slices),
                   "files_skipped": len(orphans) + len(self.failed)},
    })


def cropped_cases(manifest: manifest_lib.Manifest) -> tuple[list[str], int, float]:
  """Converted cases whose slices the square crops at the target spacing.

  With `--target_spacing_mm` a slice larger than `image_size` pixels at that spacing is
  centre-cropped (`preprocess.spacing_geometry`): training never sees its edges.

  Returns:
    (ids of the cases with kept slices that were cropped, the smallest square side that
    holds all of them, that side in mm); ([], image_size, side in mm) when none was, or
    without a target spacing.
  """
  size, target = manifest.image_size, manifest.target_spacing_mm
  if not target:
    return [], size, 0.0
  cropped, needed = [], size
  for case in manifest.cases:
    if not case.get("slices_kept") or not case.get("spacing"):
      continue
    _, height, width = case["shape"]
    rows, cols = preprocess.resampled_size(height, width, case["spacing"], target)
    if max(rows, cols) > size:
      cropped.append(case["id"])
      needed = max(needed, rows, cols)
  return cropped, needed, needed * float(target)


def format_summary(result: dict[str, Any]) -> str:
  """A short human-readable summary of a conversion (`convert_dataset`'s result)."""
  manifest = manifest_lib.Manifest(result["flags"]["output_dir"], result)
  t = manifest.totals
  lines = [f"{'would write' if result.get('dry_run') else 'wrote'} "
           f"{t['slices_written']} slices from {t['cases_converted']} cases "
           f"({t['slices_skipped']} slices pruned, {t['files_skipped']} files skipped)"]
  if manifest.protocol != schema.DEFAULT_PROTOCOL:
    lines.append(f"  labelling protocol: {manifest.protocol}")
  for split in manifest.splits:
    lines.append(f"  {split:5s}: {manifest.num_cases(split)} cases, "
                 f"{manifest.num_slices(split)} slices, "
                 f"{len(manifest.shards(split))} shards")
  freq = ", ".join(f"{manifest.labels[str(i)]} {f:.3f}"
                   for i, f in enumerate(manifest.class_pixel_frequencies["all"]))
  lines.append(f"  class pixel frequencies: {freq}")
  for f in manifest.skipped_files:
    lines.append(f"  skipped file {f['path']}: {f['reason']}")
  cropped, needed, needed_mm = cropped_cases(manifest)
  if cropped:
    size, target = manifest.image_size, manifest.target_spacing_mm
    names = ", ".join(cropped[:5]) + (f" and {len(cropped) - 5} more" if len(cropped) > 5
                                      else "")
    side = -(-needed // 16) * 16  # spine-train's default depth 4 needs a multiple of 16
    lines.append(
        f"  warning: {len(cropped)} {'cases are' if len(cropped) > 1 else 'case is'} larger "
        f"than the square ({size} px at {target:g} mm = {size * target:g} mm), "
        "centre-cropped, their edges never "
        f"trained on: {names}; they need {needed} px ({needed_mm:g} mm): "
        f"--image_size={side} keeps them whole")
  return "\n".join(lines)
