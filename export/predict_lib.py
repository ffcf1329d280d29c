"""Library of spine-predict: segment files with a SavedModel and write masks/overlays.

Outputs for an input `NAME.ext` in the output folder, always in the input's own geometry
(a model trained at a target spacing resamples inside the graph and maps back):
  2D:     NAME_mask.png (uint8 labels 0/1/2) and NAME_mask.npy
  NIfTI:  NAME_mask.nii.gz (or .nii): labels with the input's shape, affine, voxel order
  DICOM-SEG (`output_format="dicom_seg"`, DICOM series only): NAME.seg.dcm instead of
          the NIfTI mask (`dicom_seg`)
  overlay (optional): NAME_overlay.png, the slice (or a volume's middle sagittal slice)
          with discs and vertebrae tinted (`data_prep.overlay`).
  probabilities (optional): NAME_probabilities.npy float32 [H, W, 3] (2D) or
          NAME_probabilities.nii.gz float32 [X, Y, Z, 3] (a volume, the mask's voxel
          order and affine): the mean over TTA scales and ensemble members, before
          the optional clean-up (`postprocess`), whose argmax is the plain mask.
  report (optional, `predict_report`): a QC page of the run in its own folder
          (spine-predict: OUTPUT/report/), written at the end.

An input's outputs appear all together or not at all: they are written to hidden
temporaries first and renamed into place only when every one of them is complete. A bad
input is a failure of that input only; an OS error while writing (full disk, read-only
folder, ...) stops the run, since every later input would fail the same way.

The steps (read, model, outputs, write) run one after another or overlapping in threads
(`pipeline`, `stream`): the same model calls with the same batches, and the same bytes.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import pathlib
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from data_prep import fileio
from data_prep import html_report
from data_prep import overlay as overlay_lib
from data_prep import readers
from export import dicom_seg
from export import inference
from export import predict_report
from export import stream

# One output of one input: the final path and a function writing the content to a path.
Item = tuple[pathlib.Path, Callable[[str], None]]
# --output_format: the mask as NIfTI (any volume), or as DICOM-SEG (DICOM series only).
OUTPUT_FORMATS = ("nifti", "dicom_seg")


class OutputError(OSError):
  """The output folder is unusable, or writing an output failed and the run stopped.

  Attributes:
    written: the files completely written before the stop.
    failures: (input path, message) for every input not written: the bad inputs, the one
      whose write failed, and those never tried; each message starts with the input.
  """

  def __init__(self, message: str, written: Iterable[pathlib.Path] = (),
               failures: Iterable[tuple[str, str]] = ()):
    super().__init__(message)
    self.written = list(written)
    self.failures = list(failures)

  def __str__(self) -> str:
    return str(self.args[0])


class _WriteFailed(Exception):
  """Internal: an OS error while writing `output` for `input_path` (stops the run)."""

  def __init__(self, input_path: str, output: pathlib.Path, error: OSError):
    super().__init__(f"cannot write {output}: {inference.os_reason(error)}")
    self.input_path = input_path


def _write_png(path: str, array: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(array).save(path, format="PNG")


def _write_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, array, allow_pickle=False)


def _write_nifti(path: str, image: Any) -> None:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  nib.save(image, path)


def write_together(input_path: str, items: list[Item]) -> None:
  """Writes all of one input's outputs, or none of them.

  Each file goes to its `fileio.temporary_path` (same folder and suffix: PIL and nibabel
  pick the format from the name), is made readable (0644), and only when all are complete
  are they renamed into place. On any error the temporaries and the files already renamed
  are removed, so the input is left with no outputs rather than a half set.

  Raises:
    _WriteFailed: an OSError while writing or renaming, naming the final file.
  """
  temps: list[pathlib.Path] = []
  renamed: list[pathlib.Path] = []
  current = items[0][0] if items else None
  try:
    for final, write in items:
      current = final
      tmp = fileio.temporary_path(final)
      temps.append(tmp)
      fileio.write_file(tmp, write)
    for (final, _), tmp in zip(items, temps):
      current = final
      fileio.rename(tmp, final)
      renamed.append(final)
  except BaseException as e:
    for p in temps + renamed:
      try:
        p.unlink()
      except OSError:
        pass  # never renamed / never created; the original error is what matters
    if isinstance(e, OSError):
      raise _WriteFailed(input_path, current, e) from e
    raise


def _nifti_like(mask: np.ndarray, case: readers.Case) -> Any:
  """A uint8 label image with the source's shape, affine and header.

  A DICOM series (no NIfTI header to copy) gets its RAS affine as the scanner
  transform, qform and sform alike.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  if not readers.is_nifti(case.image_path):
    out = nib.Nifti1Image(mask.astype(np.uint8).reshape(case.original_shape), case.affine)
    out.set_qform(case.affine, code=1)
    out.set_sform(case.affine, code=1)
    out.header.set_xyzt_units("mm")
    return out
  with fileio.local_copy(case.image_path) as local:  # nibabel reads local files only
    src = nib.load(local)
  header = src.header.copy()
  header.set_data_dtype(np.uint8)
  # Trailing singleton axes of the source (e.g. [X, Y, Z, 1]) are restored exactly.
  out = nib.Nifti1Image(mask.astype(np.uint8).reshape(src.shape), src.affine, header)
  out.header.set_slope_inter(1.0, 0.0)
  return out


def _probabilities_like(probs: np.ndarray, label_image: Any) -> Any:
  """A float32 image of probabilities [X, Y, Z, C] (the input's voxel order) with the
  mask's affine and header (so both carry the same qform/sform as the input)."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  header = label_image.header.copy()
  header.set_data_dtype(np.float32)
  out = nib.Nifti1Image(np.asarray(probs, np.float32), label_image.affine, header)
  out.header.set_slope_inter(1.0, 0.0)
  return out


def output_paths(input_path: str | os.PathLike, output_dir: str | os.PathLike,
                 overlay: bool, probabilities: bool = False,
                 output_format: str = "nifti") -> dict[str, pathlib.Path]:
  """The files `predict` writes for one input, keyed by kind.

  `probabilities`: also "probabilities": `NAME_probabilities.npy` for 2D,
  `NAME_probabilities.nii.gz` (the mask's suffix) for a volume.

  A DICOM series (a folder `NAME`) is written as NIfTI: `NAME_mask.nii.gz`; with
  `output_format="dicom_seg"` as "seg": `NAME.seg.dcm` instead.

  Raises:
    InputError: "dicom_seg" for an input that is no DICOM series (a file).
  """
  if output_format == "dicom_seg" and not fileio.path(input_path).is_dir():
    raise inference.InputError(f"{input_path}: not a DICOM series: "
                               "--output_format=dicom_seg needs DICOM input")
  if fileio.path(input_path).is_dir():
    stem, suffix = fileio.path(input_path).resolve().name, ".nii.gz"
  else:
    stem, suffix = readers.split_name(input_path)
  out = fileio.path(output_dir)
  if output_format == "dicom_seg":
    paths = {"seg": out / f"{stem}{dicom_seg.SUFFIX}"}
  elif suffix in readers.NIFTI_SUFFIXES:
    paths = {"nifti": out / f"{stem}_mask{suffix}"}
  else:
    paths = {"png": out / f"{stem}_mask.png", "npy": out / f"{stem}_mask.npy"}
  if overlay:
    paths["overlay"] = out / f"{stem}_overlay.png"
  if probabilities:
    volume = suffix in readers.NIFTI_SUFFIXES
    paths["probabilities"] = out / f"{stem}_probabilities{suffix if volume else '.npy'}"
  return paths


def prepare_output_dir(output_dir: str | os.PathLike) -> pathlib.Path:
  """Creates the output folder and clears temporaries of killed runs.

  Raises:
    OutputError: the path is an existing file, or the folder cannot be created.
  """
  out = fileio.path(output_dir)
  if out.exists() and not out.is_dir():
    raise OutputError(f"{out}: expected an output folder, found an existing file")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OutputError(f"{out}: cannot create the output folder: "
                      f"{inference.os_reason(e)}") from e
  fileio.remove_stale_temporaries(out)
  return out


@dataclasses.dataclass(frozen=True)
class _Job:
  """The settings of one `predict` call that its steps share (see `predict`'s Args)."""
  model: inference.Model
  batch_size: int
  spacing_2d_mm: tuple[float, float] | None
  tta: bool
  postprocess: bool
  report: predict_report.Options | None
  protocol: str | None = None


@dataclasses.dataclass
class _Run:
  """What one `predict` run has done so far; only its methods change it.

  Attributes:
    bar: the progress bar, one step per input written or failed.
    targets: input path -> its output files (`output_paths`), for the inputs to segment,
      in input order.
    written: the files completely written.
    failures: (input path, message) per failed input, in the order they failed.
    finished: the inputs written or failed.
    entries: input path -> its report entry, for the inputs written.
  """
  bar: fileio.Progress
  targets: dict[str, dict[str, pathlib.Path]] = dataclasses.field(default_factory=dict)
  written: list[pathlib.Path] = dataclasses.field(default_factory=list)
  failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  finished: set[str] = dataclasses.field(default_factory=set)
  entries: dict[str, predict_report.Entry] = dataclasses.field(default_factory=dict)

  def fail(self, path: str, message: str) -> None:
    self.failures.append((path, message))
    self.finished.add(path)
    self.bar.step()

  def done(self, path: str, files: list[pathlib.Path],
           entry: predict_report.Entry | None) -> None:
    self.written.extend(files)
    self.finished.add(path)
    if entry is not None:
      self.entries[path] = entry
    self.bar.step()

  def unfinished(self) -> list[str]:
    """The inputs to segment that were neither written nor failed, in input order."""
    return [p for p in self.targets if p not in self.finished]

  def end_progress_line(self) -> None:
    # A bar stopped short has no newline yet: the error lines must not join it.
    if self.bar.enabled and self.bar.done < self.bar.total:
      sys.stderr.write("\n")


# Segments a run's inputs elsewhere (`predict(engine=...)`, e.g. `beam_predict`): called
# with the run's settings, its record (`targets`, the inputs to segment; each recorded
# with `fail` or `done` in the order the sequential loop would) and the output folder.
Engine = Callable[[_Job, _Run, pathlib.Path], None]


def predict(model: inference.Model, input_path: str | os.PathLike,
            output_dir: str | os.PathLike, *, batch_size: int = 8, overlay: bool = False,
            overwrite: bool = False, progress: bool = True,
            spacing_2d_mm: tuple[float, float] | None = None, tta: bool = False,
            save_probabilities: bool = False, postprocess: bool = False,
            report: predict_report.Options | None = None, protocol: str | None = None,
            output_format: str = "nifti", pipeline: str = "streaming",
            devices: Sequence[str | None] | None = None,
            engine: Engine | None = None
            ) -> tuple[list[pathlib.Path], list[tuple[str, str]]]:
  """Segments every input and writes the masks.

  Args:
    model: a model from `inference.load_saved_model`, or an `inference.Ensemble` (from
      `inference.load_ensemble`): the mean of the members' probabilities decides.
    input_path: a file or a folder of files.
    output_dir: folder for the outputs (created).
    batch_size: 2D slices per signature call.
    overlay: also write PNG overlays.
    overwrite: replace existing outputs (otherwise such an input is a failure).
    progress: print a progress bar on stderr.
    spacing_2d_mm: (row, column) mm per pixel of the 2D inputs; a model trained at a
      target spacing refuses 2D inputs without it (NIfTI volumes carry theirs).
    tta: scale test-time augmentation (`inference.TTA_SCALES`, about 3x the model time);
      only for a model with a target spacing.
    save_probabilities: also write the mean probabilities (`output_paths`), float32 with
      a last axis of classes, before any `postprocess` (their argmax is the plain mask).
    postprocess: clean each mask with `postprocess.remove_small_components` (a volume in
      3D, a 2D input per slice); the overlay shows the cleaned mask.
    report: write a QC page of the inputs written (`predict_report`) to
      `report.folder` at the end (checked before any work: an existing report needs
      `overwrite`); None: no page.
    protocol: the labelling protocol whose head segments (every model must have it;
      `inference.check_protocol`); None: each model's default. The report names it.
    output_format: one of `OUTPUT_FORMATS`: "nifti", or "dicom_seg": a DICOM series'
      mask as `NAME.seg.dcm` (`dicom_seg`); any other input fails ("not a DICOM
      series").
    pipeline: one of `stream.PIPELINES`: "streaming" overlaps reading, the model and
      writing (threads, bounded memory); "sequential" does one step after another. The
      outputs, the files listed and the failures are the same.
    devices: "streaming" only: the devices of the model replicas (one thread each),
      e.g. ["/GPU:0", "/GPU:1"]; None: every local GPU, else the default device.
    engine: segments the inputs elsewhere (`Engine`, e.g. `beam_predict`), in place
      of `pipeline` and `devices`; None: in this process.

  Returns:
    (written, failures): the files written, and (input path, message) per failed input;
    each message starts with the file it is about.

  Raises:
    InputError: `input_path` does not exist or holds no supported file, `tta` with a
      model without a target spacing, or a `protocol` a model lacks.
    OutputError: the output folder or the report folder is unusable, or an OS error
      while writing stopped the run; it carries what was written and every input not
      written.
    portable.MissingExtraError: "dicom_seg" without highdicom installed.
    ValueError: an unknown `output_format` or `pipeline`.
  """
  if pipeline not in stream.PIPELINES:
    raise ValueError(f"pipeline must be one of {stream.PIPELINES}, found {pipeline!r}")
  if output_format not in OUTPUT_FORMATS:
    raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, found "
                     f"{output_format!r}")
  if output_format == "dicom_seg":
    dicom_seg.require()  # before any work: one line naming the extra
  if report is not None:
    try:  # before any work: a refused report must not cost a whole run
      html_report.check_output_folder(report.folder, overwrite)
    except FileExistsError as e:
      raise OutputError(f"--report: {e}") from e
  if tta:
    inference.check_tta(model)  # before any output: refused, not silently a no-op
  inference.check_protocol(model, protocol)
  files = inference.list_inputs(input_path)
  output_dir = prepare_output_dir(output_dir)
  job = _Job(model, batch_size, spacing_2d_mm, tta, postprocess, report, protocol)
  run = _Run(fileio.Progress(len(files), "spine-predict", unit="inputs",
                             enabled=progress))
  _claim_outputs(run, files, output_dir, overlay, save_probabilities, overwrite,
                 output_format)
  if engine is None:
    _segment_inputs(job, run, len(files), stream.Stages(pipeline, devices))
  else:
    engine(job, run, output_dir)
  if report is not None:
    _write_report(job, run, files, input_path, output_dir, overwrite)
  return run.written, run.failures


def segment(job: _Job, targets: dict[str, dict[str, pathlib.Path]]
            ) -> tuple[list[pathlib.Path], list[tuple[str, str]],
                       dict[str, predict_report.Entry]]:
  """Segments and writes some inputs of a run, one after the other, in this process.

  The steps of `predict` with the "sequential" pipeline, for an `Engine`'s workers: an
  `Engine` that hands each the inputs of one model call of the whole run (a volume, a
  batch of 2D inputs: `inference.buckets`) gets the run's bytes.

  Args:
    job: the run's settings, its `model` this process's.
    targets: input path -> its output files (`output_paths`), in the run's order.

  Returns:
    (written, failures, report entries) as `predict` records them; an OS error while
    writing fails the input it hit and every later one of `targets`, as it stops a run.
  """
  run = _Run(fileio.Progress(len(targets), "spine-predict", enabled=False),
             targets=dict(targets))
  try:
    _segment_inputs(job, run, len(targets), stream.Stages("sequential"))
  except OutputError:
    pass  # `run.failures` holds the inputs it left unwritten
  return run.written, run.failures, run.entries


def _claim_outputs(run: _Run, files: list[pathlib.Path], output_dir: pathlib.Path,
                   overlay: bool, probabilities: bool, overwrite: bool,
                   output_format: str) -> None:
  """Fills `run.targets` with the inputs whose outputs are free; fails the others.

  An input fails when one of its outputs is another input's (e.g. `a.png` and `a.npy`)
  or exists already without `overwrite`, or when the format cannot hold it.
  """
  claimed: dict[pathlib.Path, str] = {}
  for f in files:
    try:
      paths = output_paths(f, output_dir, overlay, probabilities, output_format)
    except inference.InputError as e:
      run.fail(str(f), str(e))
      continue
    clash = [claimed[p] for p in paths.values() if p in claimed]
    existing = [str(p) for p in paths.values() if p.exists()]
    if clash:
      run.fail(str(f), f"{f}: its outputs clash with those of {clash[0]}")
    elif existing and not overwrite:
      run.fail(str(f), f"{f}: output {existing[0]} exists; pass --overwrite")
    else:
      run.targets[str(f)] = paths
      claimed.update({p: str(f) for p in paths.values()})


def _segment_inputs(job: _Job, run: _Run, num_inputs: int,
                    stages: stream.Stages) -> None:
  """Segments and writes every input of `run.targets`, recording each in `run`.

  Volumes go to the model as they are read; 2D inputs wait for a batch of their size
  (`inference.batches_2d`). `stages` decides where each step runs (`stream`); the
  outcomes are recorded in the same order either way.

  Raises:
    OutputError: an OS error while writing stopped the run (`_WriteFailed`).
  """
  try:
    try:
      _feed(job, run, stages)
    finally:
      stages.close()  # every step submitted is done; raises what stopped the run
  except _WriteFailed as e:
    run.end_progress_line()
    reason = str(e)
    run.failures.append((e.input_path, f"{e.input_path}: not written: {reason}"))
    run.finished.add(e.input_path)
    run.failures.extend((p, f"{p}: not written: the run stopped at the write error "
                         "before this input") for p in run.unfinished())
    raise OutputError(f"{reason}; the run stopped, "
                      f"{len(run.failures)} of {num_inputs} input(s) not written:",
                      run.written, run.failures) from e
  except Exception as e:  # not one input's fault: name every input it left unwritten
    run.end_progress_line()
    error = f"{type(e).__name__}: {e}"
    run.failures.extend((p, f"{p}: not written: the run failed: {error}")
                        for p in run.unfinished())


def _feed(job: _Job, run: _Run, stages: stream.Stages) -> None:
  """Sends every volume, and every batch of 2D slices, to the model, and each input's
  outputs to be finished and committed (`stages`), in input order."""
  cases_2d = _volumes_pass_on_2d(job, run, stages)
  for batch, spacing in inference.batches_2d(job.model, cases_2d, job.batch_size):
    if stages.stopped.is_set():  # a write error stopped the run: no more model calls
      return
    call = stages.model(functools.partial(_slices_probabilities, job, batch, spacing),
                        uses=len(batch))
    for i, case in enumerate(batch):
      path = case.image_path
      finish = functools.partial(_finish_slice, job, case, call, i, run.targets[path])
      stages.finish(finish, functools.partial(_commit_prepared, run, path), call)


def _volumes_pass_on_2d(job: _Job, run: _Run,
                        stages: stream.Stages) -> Iterable[readers.Case]:
  """Reads every input of `run.targets` (`stages.read`): sends each volume (NIfTI, DICOM)
  to the model at once, and yields each 2D case for batching. An unreadable input is a
  failure of that input only. Stops when a commit stopped the run."""
  reads = stages.read(functools.partial(_read, job), run.targets.items())
  for (path, paths), read in zip(run.targets.items(), reads):
    if stages.stopped.is_set():
      return
    try:
      case, spacing, sources = read.result()
    except inference.InputError as e:
      stages.record(functools.partial(_record_failure, run, path, str(e)))
      continue
    except Exception as e:  # a reader's own fault on one input: that input only
      stages.record(functools.partial(_record_failure, run, path,
                                      f"{path}: {type(e).__name__}: {e}"))
      continue
    if case.kind != "3d":
      yield case
      continue
    call = stages.model(functools.partial(
        job.model.probabilities, case.image, spacing, kind=inference.VOLUME, tta=job.tta,
        protocol=job.protocol), uses=1)
    stages.finish(functools.partial(_finish_volume, job, case, sources, call, paths),
                  functools.partial(_commit_prepared, run, path), call)


def _read(job: _Job, target: tuple[str, dict[str, pathlib.Path]]
          ) -> tuple[readers.Case, tuple[float, float] | None, Any]:
  """(the case, the spacing to send with it, its DICOM-SEG sources or None) of one input.

  Raises:
    InputError: the input is unreadable, lacks the spacing the model needs, or is a
      series that cannot carry the DICOM-SEG asked for (checked here: a refused series
      must not cost a model run).
  """
  path, paths = target
  case = inference.read_input(path, job.spacing_2d_mm)
  spacing = inference.spacing_for(job.model, case)
  sources = dicom_seg.read_sources(case) if "seg" in paths and case.kind == "3d" else None
  return case, spacing, sources


def _slices_probabilities(job: _Job, batch: list[readers.Case],
                          spacing: tuple[float, float] | None) -> np.ndarray:
  """The model's probabilities [N, H, W, C] of one batch of same-size 2D cases."""
  return job.model.probabilities(np.stack([c.image[0] for c in batch]), spacing,
                                 tta=job.tta, protocol=job.protocol)


def _finish_volume(job: _Job, case: readers.Case, sources: Any, call: stream.Call,
                   paths: dict[str, pathlib.Path]
                   ) -> tuple[list[Item], predict_report.Entry | None]:
  items, mask = _volume_outputs(job, case, sources, call.result(), paths)
  return items, _report_entry(job, case, mask)


def _finish_slice(job: _Job, case: readers.Case, call: stream.Call, index: int,
                  paths: dict[str, pathlib.Path]
                  ) -> tuple[list[Item], predict_report.Entry | None]:
  items, mask = _slice_outputs(job, case, call.result()[index], paths)
  return items, _report_entry(job, case, mask)


def _record_failure(run: _Run, path: str, message: str, _: None) -> None:
  run.fail(path, message)


def _commit_prepared(run: _Run, path: str, prepared: concurrent.futures.Future) -> None:
  """Commits one input's prepared (outputs, report entry), or records why it has none.

  A failure to segment it (the model call, its outputs) is this input's only.

  Raises:
    _WriteFailed: an OS error while writing, which stops the run.
  """
  try:
    items, entry = prepared.result()
  except inference.InputError as e:  # e.g. a series that cannot carry a DICOM-SEG
    run.fail(path, str(e))
    return
  except Exception as e:  # Keep going in folder mode; report at the end.
    run.fail(path, f"{path}: {type(e).__name__}: {e}")
    return
  _commit(run, path, items, entry)


def _volume_outputs(job: _Job, case: readers.Case, sources: Any, probs: np.ndarray,
                    paths: dict[str, pathlib.Path]) -> tuple[list[Item], np.ndarray]:
  """A volume's outputs from its probabilities [S, H, W, C]: (its outputs to write, its
  display-order mask [S, H, W]). `sources`: its DICOM-SEG sources (`_read`), or None.
  """
  mask = inference.labels(probs, job.postprocess)
  label_image = _nifti_like(inference.orientation_back(case, mask), case)
  if sources is None:
    items = [(paths["nifti"], lambda p, im=label_image: _write_nifti(p, im))]
  else:  # the very voxels the NIfTI mask would hold, mapped to the slice files
    seg = dicom_seg.segmentation(sources, np.asarray(label_image.dataobj))
    items = [(paths["seg"], lambda p, s=seg: dicom_seg.write(p, s))]
  if "probabilities" in paths:
    prob_image = _probabilities_like(inference.orientation_back(case, probs), label_image)
    items.append((paths["probabilities"], lambda p, im=prob_image: _write_nifti(p, im)))
  if "overlay" in paths:
    mid = case.image.shape[0] // 2
    rgb = overlay_lib.overlay_rgb(case.image[mid], mask[mid])
    items.append((paths["overlay"], lambda p, a=rgb: _write_png(p, a)))
  return items, mask


def _slice_outputs(job: _Job, case: readers.Case, probs: np.ndarray,
                   paths: dict[str, pathlib.Path]) -> tuple[list[Item], np.ndarray]:
  """The outputs of a 2D case from its probabilities [H, W, C], and its mask [H, W]."""
  mask = inference.labels(probs, job.postprocess)
  items = [(paths["png"], lambda p: _write_png(p, mask)),
           (paths["npy"], lambda p: _write_npy(p, mask))]
  if "probabilities" in paths:
    items.append((paths["probabilities"],
                  lambda p: _write_npy(p, probs.astype(np.float32))))
  if "overlay" in paths:
    rgb = overlay_lib.overlay_rgb(case.image[0], mask)
    items.append((paths["overlay"], lambda p: _write_png(p, rgb)))
  return items, mask


def _report_entry(job: _Job, case: readers.Case,
                  mask: np.ndarray) -> predict_report.Entry | None:
  """The report's entry of a case (None without `job.report`)."""
  if job.report is None:
    return None
  return predict_report.summarize(case, mask, min_slices=job.report.min_slices,
                                  max_components=job.report.max_components)


def _commit(run: _Run, path: str, items: list[Item],
            entry: predict_report.Entry | None) -> None:
  """Writes one input's outputs together (`write_together`) and records the outcome.

  Raises:
    _WriteFailed: an OS error while writing, which stops the run.
  """
  try:
    write_together(path, items)
  except _WriteFailed:
    raise
  except Exception as e:  # e.g. an array a writer refuses: this input only
    run.fail(path, f"{path}: {type(e).__name__}: {e}")
    return
  run.done(path, [final for final, _ in items], entry)


def _write_report(job: _Job, run: _Run, files: list[pathlib.Path],
                  input_path: str | os.PathLike, output_dir: pathlib.Path,
                  overwrite: bool) -> None:
  """Writes the QC page of the inputs written, in input order, with the failures.

  Raises:
    OutputError: an OS error while writing the page (the masks are written).
  """
  order = {str(f): i for i, f in enumerate(files)}  # the page lists inputs in input order
  settings = {"models": ", ".join(m.path for m in job.model.members),
              "protocol": (inference.protocol_used(job.model, job.protocol)
                           or "not recorded by the export"),
              "input": str(input_path), "output": str(output_dir), "tta": job.tta,
              "postprocess": job.postprocess, "min slices": job.report.min_slices,
              "max pieces": job.report.max_components}
  try:
    predict_report.write(
        job.report.folder, [run.entries[p] for p in sorted(run.entries, key=order.get)],
        sorted(run.failures, key=lambda f: order.get(f[0], len(order))),
        title="spine-predict report", settings=settings, overwrite=overwrite)
  except OSError as e:  # the masks are written; say so with the reason
    raise OutputError(f"{job.report.folder}: report not written: "
                      f"{inference.os_reason(e)}", run.written, []) from e
