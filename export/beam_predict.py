"""spine-predict as an Apache Beam pipeline: the local command's files, Beam's workers.

`predict_lib.predict(..., engine=engine(runner, beam_args))` (`spine-predict
--runner=DirectRunner -- ...`) hands Beam the model calls and the writing. All the rest
stays in the launching process and in `predict_lib`: the checks (--tta, --protocol, the
report folder), listing the inputs, the output folder, claiming each input's outputs,
the outcomes in order and the --report page.

  inputs -> Reshuffle -> Probe: the batch key of a 2D input, None for the others
                -> one list -> Plan: the model calls of a local run (side input)
         -> keyed by their model call -> GroupByKey -> Segment: `predict_lib.segment`
                -> one list of outcomes -> a hidden file, read back by the launcher

Byte-identical to the local command by construction: the plan groups the inputs into the
model calls a local run makes (`inference.buckets` over the inputs in input order: each
volume alone, 2D inputs by `inference.batch_key`, `batch_size` a call), and each group
is segmented and written by the local sequential steps (`predict_lib.segment`: the same
read, the same stacked batch, the same outputs and atomic writer); neither the number of
workers nor the order in which they finish changes a byte. The launcher then records the
outcomes in the order a local run commits them, so the files listed and the failures are
the local ones too. One difference on purpose: an OS error while writing fails the inputs
of its model call only, and the other workers go on (a local run stops at it).

Each worker process loads the SavedModel(s) once (`_model`), whatever the number of
elements; RunInference's TensorFlow handler is not used: it batches elements as they
come (not the local calls, so not the local bytes) and runs one signature, where an input
here is read, resampled, ensembled, augmented (--tta) and written. Only spine-predict
--runner imports this module: Beam is an optional extra (`pip install -e ".[beam]"`).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import io
import json
import threading
from typing import Any, Callable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options import pipeline_options as options_lib

from data_prep import beam_convert, fileio, readers
from export import inference, predict_lib, predict_report

# Written by the pipeline's last step into the output folder, read and removed by the
# launcher; its hidden temporary name is cleared by the next run if the launcher dies.
# An .npz read with allow_pickle=False: JSON of the outcomes plus the report mosaics.
_OUTCOMES = "beam-outcomes.npz"

# One model (or ensemble) per worker process and folders: loaded by the first DoFn that
# needs it, shared by the others (and threads); the launcher lends its own to in-process
# workers.
_MODELS: dict[tuple[str, ...], inference.Model] = {}
_MODELS_LOCK = threading.Lock()


def engine(runner: str, beam_args: Sequence[str] = ()) -> predict_lib.Engine:
  """The `predict_lib.predict` engine that segments on Beam's `runner`.

  Args:
    runner: a Beam runner name ("DirectRunner", "DataflowRunner", ...).
    beam_args: Beam pipeline options, e.g. ["--direct_num_workers=2"].

  Returns:
    The engine; the pipeline runs when `predict` calls it.

  Raises:
    ValueError: an unknown runner or Beam option (`beam_convert.pipeline_options`),
      before any work.
  """
  return functools.partial(_run, beam_convert.pipeline_options(runner, beam_args))


def _model(paths: tuple[str, ...]) -> inference.Model:
  with _MODELS_LOCK:
    if paths not in _MODELS:
      _MODELS[paths] = inference.load_ensemble(list(paths))
    return _MODELS[paths]


class _WithModel(beam.DoFn):
  """Yields `fn(model, element)` per element, the model loaded once per worker process."""

  def __init__(self, fn: Callable[[inference.Model, Any], Any], paths: tuple[str, ...]):
    super().__init__()
    self._fn, self._paths, self._loaded = fn, paths, None

  def setup(self):
    self._loaded = _model(self._paths)

  def process(self, element):
    yield self._fn(self._loaded, element)


def _probe(spacing_2d: tuple[float, float] | None, model: inference.Model,
           element: tuple[int, tuple[str, Any]]) -> tuple[int, tuple | None]:
  """(input index, its `inference.batch_key`), or None for an input that makes a model
  call alone or none: a volume (not read here), a DICOM series, an unreadable input."""
  index, (path, _) = element
  if fileio.path(path).is_dir() or readers.split_name(path)[1] in readers.NIFTI_SUFFIXES:
    return index, None
  try:
    case = inference.read_input(path, spacing_2d)
    return index, (inference.batch_key(model, case) if case.kind == "2d" else None)
  except Exception:  # pylint: disable=broad-except  # fails again, as locally, in Segment
    return index, None


def _plan(keys: list[tuple[int, tuple | None]],
          batch_size: int) -> dict[int, tuple[int, int]]:
  """{input index: (its model call, its place in the call)}; the calls numbered in the
  order a local run commits them (`predict_lib._feed`): an input alone where it is read,
  a batch of 2D inputs once full, the part-filled ones at the end."""
  calls: list[list[int]] = []

  def batchable() -> Iterator[tuple[int, tuple]]:
    for index, key in sorted(keys, key=lambda k: k[0]):
      if key is None:
        calls.append([index])
      else:
        yield index, key

  for batch, _ in inference.buckets(batchable(), lambda item: item[1], batch_size):
    calls.append([index for index, _ in batch])
  return {index: (c, k) for c, call in enumerate(calls) for k, index in enumerate(call)}


def _by_call(element: tuple[int, tuple], plan: dict[int, tuple[int, int]]
             ) -> tuple[int, tuple[int, tuple]]:
  index, target = element
  call, place = plan[index]
  return call, (place, target)


def _segment(settings: Any, model: inference.Model,
             grouped: tuple[int, list]) -> tuple:
  """(call number, its input paths in order, then `predict_lib.segment`'s written,
  failures and report entries) of one model call's inputs."""
  call, members = grouped
  targets = dict(target for _, target in sorted(members, key=lambda m: m[0]))
  job = dataclasses.replace(settings, model=model)
  return (call, list(targets), *predict_lib.segment(job, targets))


def _save(outcomes: list, path: str) -> None:
  """Writes the `_segment` outcomes as an .npz: no pickle crosses from the workers."""
  mosaics, records = {}, []
  for call, paths, written, failures, entries in outcomes:
    shown = {}
    for input_path, entry in entries.items():
      fields = dataclasses.asdict(entry)
      mosaics[f"mosaic{len(mosaics)}"] = fields.pop("mosaic")
      fields["mosaic"] = f"mosaic{len(mosaics) - 1}"
      shown[input_path] = fields
    records.append({"call": call, "paths": paths, "written": [str(f) for f in written],
                    "failures": failures, "entries": shown})
  # NumPy scalars (counts, sizes) as plain numbers.
  text = json.dumps(records, default=lambda v: v.item() if isinstance(v, np.generic) else v)
  record = np.frombuffer(text.encode(), np.uint8)
  buffer = io.BytesIO()
  np.savez(buffer, outcomes=record, **mosaics)
  fileio.write_bytes_atomic(path, buffer.getvalue())


def _load(path: str) -> list:
  """The outcomes `_save` wrote, as `_segment` returned them."""
  with fileio.open_file(path, "rb") as f, np.load(io.BytesIO(f.read()),
                                                   allow_pickle=False) as arrays:
    records = json.loads(arrays["outcomes"].tobytes().decode())
    outcomes = []
    for r in records:
      entries = {}
      for input_path, fields in r["entries"].items():
        for name in ("size", "slices", "components"):  # JSON made the class ids text
          fields[name] = {int(c): v for c, v in fields[name].items()}
        fields["mosaic"] = arrays[fields["mosaic"]]
        entries[input_path] = predict_report.Entry(**fields)
      outcomes.append((r["call"], r["paths"], [fileio.path(f) for f in r["written"]],
                       [tuple(f) for f in r["failures"]], entries))
  return outcomes


def _check_writable(out: pathlib.Path) -> None:
  """Refuses an output folder that takes no file, before any worker starts.

  Raises:
    OutputError: naming the folder and the reason.
  """
  probe = fileio.temporary_path(out / "beam-write-check")
  try:
    fileio.write_file(probe, lambda p: open(p, "wb").close())
    probe.unlink()
  except OSError as e:
    raise predict_lib.OutputError(f"{out}: cannot write to the output folder: "
                                  f"{inference.os_reason(e)}") from e


def _run(options: options_lib.PipelineOptions, job: Any, run: Any,
         out: pathlib.Path) -> None:
  """The `predict_lib.Engine`: segments `run.targets` on Beam, records them in `run`.

  Raises:
    OutputError: the output folder takes no file, or the pipeline failed (the last
      line of Beam's error); the inputs written before are complete.
  """
  targets = list(run.targets.items())
  if not targets:
    return
  _check_writable(out)
  paths = tuple(m.path for m in job.model.members)
  settings = dataclasses.replace(job, model=None)  # workers get theirs: `_model`
  outcomes_path = str(out / (fileio.TMP_PREFIX + _OUTCOMES))
  pipeline = beam.Pipeline(options=options)
  inputs = (pipeline
            | "Inputs" >> beam.Create(list(enumerate(targets)))
            | "Spread" >> beam.Reshuffle())  # Created elements may stay in one bundle.
  plan = (inputs
          | "Probe" >> beam.ParDo(_WithModel(
              functools.partial(_probe, job.spacing_2d_mm), paths))
          | "AllKeys" >> beam.combiners.ToList()
          | "Plan" >> beam.Map(_plan, job.batch_size))
  _ = (inputs
       | "KeyByCall" >> beam.Map(_by_call, beam.pvalue.AsSingleton(plan))
       | "GroupByCall" >> beam.GroupByKey()
       | "Segment" >> beam.ParDo(_WithModel(functools.partial(_segment, settings), paths))
       | "AllOutcomes" >> beam.combiners.ToList()
       | "SaveOutcomes" >> beam.Map(_save, outcomes_path))
  with _MODELS_LOCK:
    _MODELS[paths] = job.model  # in-process workers need not load it again
  try:
    pipeline.run().wait_until_finish()
  except Exception as e:  # pylint: disable=broad-except  # workers' errors come as text
    raise predict_lib.OutputError(
        f"{out}: the Beam pipeline failed: {beam_convert.last_line(e)}") from None
  finally:
    with _MODELS_LOCK:
      _MODELS.pop(paths, None)
  outcomes = _load(outcomes_path)
  fileio.path(outcomes_path).unlink()
  _record(run, outcomes)


def _record(run: Any, outcomes: list) -> None:
  """Records every input's outcome in `run`, in the order a local run commits them."""
  for _, paths, written, failures, entries in sorted(outcomes, key=lambda o: o[0]):
    messages = dict(failures)
    for path in paths:
      if path in messages:
        run.fail(path, messages[path])
        continue
      own = {str(p) for p in run.targets[path].values()}
      run.done(path, [f for f in written if str(f) in own], entries.get(path))
