"""Library of spine-evaluate: Dice per case and overall, HD95 for volumes.

Folder mode pairs images and masks by case id (file stem); 2D slices go through
`serving_default`, NIfTI volumes through `segment_volume` (compared in display order,
which is a permutation of the stored voxels) and also get HD95 in mm from the affine's
voxel sizes. Converted mode reads a split's TFRecords and scores the `segment_examples`
masks in the stored square geometry without the padding (exactly the pixels the trainer's
validation counts), pooling the slices of each case. Dice, its keys and the absent rule
are `data_prep.metrics`: the "pooled" row of a split equals the trainer's validation
figures for the same model. Classes absent from a case's ground truth are reported as
`metrics.ABSENT`. "mean" averages the cases where a class is present; "pooled" counts all
voxels of all cases at once.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import numpy as np
import tensorflow as tf

from data_prep import fileio
from data_prep import manifest as manifest_lib
from data_prep import metrics
from data_prep import orientation
from data_prep import readers
from data_prep import schema
from export import inference

def _case_row(case_id: str, kind: str, counts: np.ndarray,
              hd: dict[str, Any] | None) -> dict[str, Any]:
  row = {"case_id": case_id, "kind": kind, "dice": metrics.dice(counts),
         "counts": counts.tolist()}
  if hd is not None:
    row["hd95_mm"] = hd
  return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Overall scores: mean over cases (absent skipped) and pooled over all voxels."""
  if not rows:
    return {}
  keys = list(rows[0]["dice"])
  out = {"mean": {"dice": {k: metrics.mean_present([r["dice"][k] for r in rows])
                           for k in keys}},
         "pooled": {"dice": metrics.dice(np.sum([r["counts"] for r in rows], axis=0))}}
  hd_rows = [r["hd95_mm"] for r in rows if "hd95_mm" in r]
  if hd_rows:
    out["mean"]["hd95_mm"] = {k: metrics.mean_present([h[k] for h in hd_rows])
                              for k in hd_rows[0]}
  return out


@dataclasses.dataclass(frozen=True)
class _FolderJob:
  """The settings of one `evaluate_folders` call that its steps share (see its Args)."""
  model: inference.Model
  label_map: dict[int, int]
  spacing_2d_mm: tuple[float, float] | None
  tta: bool
  postprocess: bool
  within_levels: bool
  protocol: str | None = None
  resample_masks: bool = False


@dataclasses.dataclass
class _Scores:
  """What one `evaluate_folders` run has scored so far.

  Attributes:
    bar: the progress bar, one step per pair scored or failed.
    failures: one message per orphan and per failed pair.
    rows: one `_case_row` per scored case.
    truth_2d: image path -> ground truth [H, W] of a 2D case waiting for its batch.
  """
  bar: fileio.Progress
  failures: list[str]
  rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  truth_2d: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def evaluate_folders(model: inference.Model, images_dir: str, masks_dir: str, *,
                     label_map: dict[int, int] | None = None, batch_size: int = 8,
                     progress: bool = True,
                     spacing_2d_mm: tuple[float, float] | None = None,
                     tta: bool = False, postprocess: bool = False,
                     within_levels: bool = False,
                     protocol: str | None = None,
                     resample_masks: bool = False) -> dict[str, Any]:
  """Scores the model on image/mask pairs of two folders.

  Predictions are in each input's own geometry (a model trained at a target spacing
  resamples with the NIfTI affine's spacing, or `spacing_2d_mm` for 2D files, which such
  a model refuses without it). `model`: one model or an `inference.Ensemble` (the mean
  of the members' probabilities). `tta`: scale test-time augmentation
  (`inference.TTA_SCALES`), only for models with a target spacing. `postprocess`:
  masks cleaned as spine-predict --postprocess (`inference.labels`). `within_levels`:
  each class scored only within the rows its ground truth covers
  (`metrics.within_labelled_levels`), for masks labelled at some levels only.
  `protocol`: the labelling protocol whose head is scored (every model must have it);
  None: each model's default. `resample_masks`: a NIfTI label volume on another grid
  than its image's is resampled onto it (`readers.read_case`) instead of a failed pair.

  Returns:
    {"cases": [row...], "overall": summarize(rows), "failures": [message...],
    "protocol": the protocol scored (`inference.protocol_used`)}; a row holds case_id,
    kind ("2d"/"3d"), dice (per class and means), counts, and for volumes hd95_mm per
    foreground class.

  Raises:
    InputError: a folder is missing or empty, `tta` with a model without a target
      spacing, or a `protocol` a model lacks.
  """
  if tta:
    inference.check_tta(model)
  inference.check_protocol(model, protocol)
  pairs, orphans = readers.pair_files(images_dir, masks_dir)
  job = _FolderJob(model, label_map or {}, spacing_2d_mm, tta, postprocess, within_levels,
                   protocol, resample_masks)
  scores = _Scores(
      fileio.Progress(len(pairs), "spine-evaluate", unit="cases", enabled=progress),
      [f"{path}: {reason}" for path, reason in orphans])
  for case, probs in inference.cases_2d_probabilities(
      model, _score_volumes_pass_on_2d(job, scores, pairs), batch_size, tta, protocol):
    gt = scores.truth_2d.pop(case.image_path)
    pred = _predicted(job, probs, gt)
    scores.rows.append(_case_row(case.case_id, "2d", metrics.counts(pred, gt), None))
    scores.bar.step()
  rows = sorted(scores.rows, key=lambda r: readers.natural_key(r["case_id"]))
  return {"cases": rows, "overall": summarize(rows), "failures": scores.failures,
          "protocol": inference.protocol_used(model, protocol)}


def _predicted(job: _FolderJob, probs: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """The mask scored against `gt`: `inference.labels` of `probs`, within the labelled
  levels with `job.within_levels`."""
  pred = inference.labels(probs, job.postprocess)
  return metrics.within_labelled_levels(pred, gt) if job.within_levels else pred


def _score_volumes_pass_on_2d(job: _FolderJob, scores: _Scores,
                              pairs: list[tuple[str, str, str]]
                              ) -> Iterable[readers.Case]:
  """Reads every pair: scores each volume at once (Dice and HD95), and yields each 2D
  case for batching, its ground truth kept in `scores.truth_2d`. A failing pair is a
  failure of that pair only."""
  for case_id, image_path, mask_path in pairs:
    try:
      case = readers.read_case(image_path, mask_path, spacing_2d=job.spacing_2d_mm,
                               resample_masks=job.resample_masks)
      gt = schema.apply_label_map(case.mask, job.label_map, mask_path)
      spacing = inference.spacing_for(job.model, case)
      if case.kind == "2d":
        scores.truth_2d[image_path] = gt[0]
        yield case
        continue
      pred = _predicted(job, job.model.probabilities(
          case.image, spacing, kind=inference.VOLUME, tta=job.tta,
          protocol=job.protocol), gt)
      spacing = orientation.display_voxel_sizes(case.affine, case.transform)
      scores.rows.append(_case_row(case_id, "3d", metrics.counts(pred, gt),
                                   metrics.hd95_per_class(pred, gt, spacing)))
    except Exception as e:  # Keep going; failures are listed at the end.
      scores.failures.append(str(e) if image_path in str(e) or mask_path in str(e)
                             else f"{image_path}: {type(e).__name__}: {e}")
    scores.bar.step()


def evaluate_split(model: inference.Model, data_dir: str, split: str, *,
                   batch_size: int = 8, protocol: str | None = None) -> dict[str, Any]:
  """Scores the model on a converted split in the stored square geometry.

  Slices are pooled per case id; padding pixels (IGNORE_LABEL after parsing) are not
  counted. No HD95: a converted split holds the kept slices only, not whole volumes.
  `model`: one model or an `inference.Ensemble` (the mean of the members' square
  probabilities; every member must match the dataset's image size and target spacing).
  `protocol`: as `evaluate_folders`; the result has "protocol" too.

  Raises:
    FileNotFoundError, ValueError: no manifest, the split has no shards, or a model
      was exported for another image size or target spacing than the dataset's.
    InputError: a `protocol` a model lacks.
  """
  inference.check_protocol(model, protocol)
  manifest = manifest_lib.load(data_dir)
  shards = manifest.files(split)
  if not shards:
    raise ValueError(f"{manifest_lib.path_of(data_dir)}: split {split!r} has no shards; "
                     f"found splits {sorted(manifest.splits)}")
  size = manifest.image_size
  for member in model.members:
    _check_split_model(member, manifest, data_dir, size)

  def parse(serialized):
    f = schema.parse_example(serialized, size)
    return serialized, f["mask"][..., 0], f["case_id"]

  ds = tf.data.TFRecordDataset(
      shards, compression_type=manifest.compression_type).map(parse)
  counts: dict[str, np.ndarray] = {}
  slices: dict[str, int] = {}
  for serialized, gt, case_ids in ds.batch(batch_size):
    probs = model.probabilities(serialized, kind=inference.EXAMPLES, protocol=protocol)
    pred = inference.labels(probs)  # as spine-predict's mean
    for p, g, cid in zip(pred, gt.numpy(), case_ids.numpy()):
      cid = cid.decode("utf-8")
      counts[cid] = counts.get(cid, 0) + metrics.counts(p, g)
      slices[cid] = slices.get(cid, 0) + 1
  rows = [_case_row(cid, "3d" if slices[cid] > 1 else "2d", c, None)
          for cid, c in sorted(counts.items())]
  return {"cases": rows, "overall": summarize(rows), "failures": [],
          "protocol": inference.protocol_used(model, protocol)}


def _check_split_model(model, manifest: manifest_lib.Manifest, data_dir: str,
                       size: int) -> None:
  """Refuses a model that cannot score the converted squares of `data_dir` as stored."""
  where = model.path
  if "segment_examples" not in model.module.signatures:
    raise ValueError(f"{where}: the SavedModel lacks the segment_examples signature")
  model_size = model.image_size
  if model_size is not None and int(model_size) != size:
    raise ValueError(f"{manifest_lib.path_of(data_dir)}: the dataset holds {size} px "
                     f"squares, the SavedModel {where} was exported for {model_size} px; "
                     "evaluate it on a dataset converted with --image_size="
                     f"{model_size}, or use --images_dir/--masks_dir")
  model_target = model.target_spacing_mm
  data_target = manifest.target_spacing_mm
  if (model_target is None) != (data_target is None) or (
      model_target is not None and abs(model_target - data_target) > 1e-6):
    def say(t):
      return "no target spacing" if t is None else f"{t:g} mm per pixel"
    raise ValueError(f"{manifest_lib.path_of(data_dir)}: the dataset was converted at "
                     f"{say(data_target)}, the SavedModel {where} was trained at "
                     f"{say(model_target)}; convert it with the model's "
                     "--target_spacing_mm, or use --images_dir/--masks_dir")


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return "inf" if math.isinf(v) else f"{v:.4f}"
  return str(v)


def format_table(report: dict[str, Any]) -> str:
  """A plain-text table: one row per case, then the mean and pooled rows."""
  cols = list(metrics.KEYS)
  hd_cols = [f"hd95_{schema.CLASS_NAMES[c]}" for c in schema.FOREGROUND]
  header = ["case", "kind"] + cols + [f"{c} (mm)" for c in hd_cols]
  lines = []
  for r in report["cases"]:
    hd = r.get("hd95_mm", {})
    lines.append([r["case_id"], r["kind"]] + [_fmt(r["dice"][c]) for c in cols]
                 + [_fmt(hd.get(c, "-")) for c in hd_cols])
  overall = report.get("overall", {})
  for name in ("mean", "pooled"):
    if name in overall:
      hd = overall[name].get("hd95_mm", {})
      lines.append([name.upper(), ""] + [_fmt(overall[name]["dice"][c]) for c in cols]
                   + [_fmt(hd.get(c, "-")) for c in hd_cols])
  widths = [max(len(x) for x in col) for col in zip(header, *lines)]
  return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths))
                   for line in [header] + lines)


def json_safe(obj: Any) -> Any:
  if isinstance(obj, float) and math.isinf(obj):
    return "inf"  # Strict JSON has no Infinity.
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [json_safe(v) for v in obj]
  return obj
