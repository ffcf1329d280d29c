"""spine-convert as an Apache Beam pipeline: the same shards and manifest, Beam's workers.

`writer.convert_dataset` with `ConvertOptions(runner=...)` (`spine-convert
--runner=DirectRunner -- ...`) hands two jobs to Beam: the per-case work (`shards.work`,
i.e. `slices.process_case`: read, check, slice, normalize, serialize) and the writing of
the staged shards. All the rest stays in the launching process and in `writer`: the
options' checks (`ConvertOptions`), pairing and splitting, the checks and the lock of the
output folder, its temporary folder, the manifest (`_Accumulator`) and the atomic publish.

  cases -> Reshuffle -> process_case -+-> summaries (no example bytes) -> one list -+
                                      |     TMP/cases.json, read back by the launcher <-+
                                      |     layout: the shard of every example <------+
                                      +-> examples keyed by (split, shard) (layout as side
                                          input) -> CoGroupByKey with every shard's staged
                                          path -> one TFRecord file per shard

Byte-identical to the local converter by construction: the layout deals each split's
examples to shards with `shards.ShardSet.add` over the cases in case order, exactly as a
local run does, and each shard's examples are written in (case, slice) order; neither the
number of workers nor the order in which they finish changes a byte. The launcher then
replays the summaries, in case order, through the local loop (checks, statistics, skip
lists), hashes the staged shards and publishes them. Only `options.beam_engine` imports
this module: Beam is an optional extra (`pip install -e ".[beam]"`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.options import pipeline_options as options_lib
from apache_beam.runners import runner as runner_lib

from data_prep import fileio, schema, shards, slices

_CASES_FILE = "cases.json"  # in the temporary folder; never published


def pipeline_options(runner: str, beam_args: Sequence[str]) -> options_lib.PipelineOptions:
  """Beam's options for `runner`, refusing what Beam would only warn about.

  Args:
    runner: a Beam runner name ("DirectRunner", "DataflowRunner", ...).
    beam_args: Beam pipeline options, e.g. ["--direct_num_workers=2"].

  Returns:
    The PipelineOptions of the pipeline.

  Raises:
    ValueError: an unknown runner, an option no Beam options class knows (Beam discards
      those with a warning), a bare word, or a second --runner among the options.
  """
  args = list(beam_args)
  words = [a for a in args if not a.startswith("-")]
  if words:
    raise ValueError(f"Beam pipeline options are --name=value, found {words}")
  if any(a.lstrip("-").split("=", 1)[0] == "runner" for a in args):
    raise ValueError("give the Beam runner as --runner=NAME before `--`, not among the "
                     "Beam pipeline options")
  try:
    runner_lib.create_runner(runner)  # Imports the runner and so its options classes.
  except ValueError as e:
    raise ValueError(f"--runner={runner}: {e}") from None
  options = options_lib.PipelineOptions(args, runner=runner)
  beam_log = logging.getLogger(options_lib.__name__)
  level = beam_log.level
  beam_log.setLevel(logging.ERROR)  # Its "Discarding unparseable args" becomes our error.
  try:
    known = set(options.get_all_options())
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - known)
  finally:
    beam_log.setLevel(level)
  if unknown:
    raise ValueError(f"unknown Beam pipeline option(s) for --runner={runner}: "
                     f"{', '.join('--' + u for u in unknown)}")
  return options


def _process(indexed_task: tuple[int, tuple]) -> tuple[int, slices.CaseResult]:
  index, task = indexed_task
  return index, shards.work(task)


def _summary(indexed: tuple[int, slices.CaseResult]) -> tuple[int, slices.CaseResult]:
  """The result without its example bytes: all the manifest and the layout need."""
  index, result = indexed
  return index, dataclasses.replace(result, examples=[(i, None) for i, _ in result.examples])


def _in_case_order(summaries: list) -> list:
  return sorted(summaries, key=lambda kv: kv[0])


def _layout(summaries: list, split_of_case: dict[str, str], tmp_dir: str,
            shard_args: tuple) -> tuple[dict, dict]:
  """Deals every example to its shard as the local converter does.

  Returns:
    ({case index: (split, [shard index of each example])},
     {(split, shard index): (staged path, TFRecord options)} for every shard, empty
     ones included, as `shards.ShardSet.finish` lists them).
  """
  shard_sets = {s: shards.ShardSet(fileio.path(tmp_dir), s, *shard_args, staged=True)
                for s in schema.SPLITS}
  layout = {}
  for index, result in _in_case_order(summaries):
    split = split_of_case[result.case_id]
    layout[index] = (split, [shard_sets[split].add(None) for _ in result.examples])
  targets = {(split, i): (str(path), shard_set.options)
             for split, shard_set in shard_sets.items()
             for i, (path, _, _) in enumerate(shard_set.finish())}
  return layout, targets


def _save(summaries: list, path: str) -> None:
  fileio.write_json_atomic(path, [dataclasses.asdict(r) for _, r in
                                  _in_case_order(summaries)])


def _keyed_examples(indexed: tuple[int, slices.CaseResult],
                    plan: tuple[dict, dict]) -> Iterator[tuple[tuple, tuple]]:
  index, result = indexed
  split, shard_of_example = plan[0][index]
  for k, ((_, serialized), shard) in enumerate(zip(result.examples, shard_of_example)):
    yield (split, shard), (index, k, serialized)


def _targets(plan: tuple[dict, dict]) -> Iterator[tuple[tuple, tuple]]:
  yield from plan[1].items()


def _write_shard(keyed: tuple[tuple, dict[str, Any]], output_dir: str) -> None:
  """Writes one staged shard, its examples in (case, slice) order like a local run."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _, grouped = keyed
  (path, options), = grouped["target"]
  with shards.output_errors("write the shards", output_dir):
    shard = tf.io.TFRecordWriter(path, options)
    for _, _, serialized in sorted(grouped["examples"], key=lambda e: e[:2]):
      shard.write(serialized)
    shard.close()


def last_line(error: Exception) -> str:
  """The line of Beam's error that says what failed (it ends a worker's traceback)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return (lines[-1] if lines else type(error).__name__).removeprefix("RuntimeError: ")


def run(tasks: list, split_of_case: dict[str, str], tmp_dir: pathlib.Path,
        options: Any) -> Iterator[slices.CaseResult]:
  """Runs the pipeline; yields every case's result, without example bytes, in task order.

  Args:
    tasks: `shards.work` arguments, in case order.
    split_of_case: {case id: split}.
    tmp_dir: the run's temporary folder inside the output folder; the shards are staged
      there under the names `shards.ShardSet` gives them.
    options: the conversion's `options.ConvertOptions` (not imported here: `options`
      imports this module lazily, and Bazel refuses a cycle of deps): `runner` and
      `beam_args` (`pipeline_options`), and the shard layout (`shard_args`).

  Raises:
    shards.ConversionError: the pipeline failed (the last line of Beam's error).
  """
  out, cases_path = str(tmp_dir.parent), str(tmp_dir / _CASES_FILE)
  pipeline = beam.Pipeline(options=options.pipeline_options())
  results = (pipeline
             | "Cases" >> beam.Create(list(enumerate(tasks)))
             | "Spread" >> beam.Reshuffle()  # Created elements may stay in one bundle.
             | "ProcessCase" >> beam.Map(_process))
  summaries = (results
               | "Summaries" >> beam.Map(_summary)
               | "AllSummaries" >> beam.combiners.ToList())
  _ = summaries | "SaveSummaries" >> beam.Map(_save, cases_path)
  plan = summaries | "Layout" >> beam.Map(_layout, split_of_case, str(tmp_dir),
                                         options.shard_args)
  examples = results | "KeyByShard" >> beam.FlatMap(_keyed_examples,
                                                    beam.pvalue.AsSingleton(plan))
  targets = plan | "Shards" >> beam.FlatMap(_targets)
  _ = ({"target": targets, "examples": examples}
       | "GroupByShard" >> beam.CoGroupByKey()
       | "WriteShards" >> beam.Map(_write_shard, out))
  try:
    pipeline.run().wait_until_finish()
  except Exception as e:  # pylint: disable=broad-except  # workers' errors come as text
    line = last_line(e)  # Our own ConversionErrors already name the output folder.
    raise shards.ConversionError(line if line.startswith(out) else
                                 f"{out}: the Beam pipeline failed: {line}") from None
  with fileio.open_file(cases_path) as f:
    for fields in json.load(f):
      yield slices.CaseResult(**fields)
