"""spine-predict --runner on Apache Beam (export/beam_predict.py) against the local command.

Models and inputs are those of test_predict_stream.py: tiny trained U-Nets exported with a
target spacing (so --tta applies), an ensemble of two of them, and a folder mixing 2D
PNG/.npy slices of several sizes (shared batches) with NIfTI volumes.

What each test proves:
  * Beam's files equal the local command's, byte for byte (the --report page too), and
    list the same files and failures in the same order: in-memory workers with --tta and
    an ensemble; two worker processes that load the model themselves;
  * a corrupt input in the middle (the CLI): one line naming it, the others written,
    exit 1 counting it; a worker failing on one input (a reader's exception, a writer
    refusing an array, a full disk) fails that input only, the others are written, no
    half set is left;
  * an output folder that takes no file: one line, nothing segmented;
  * inputs and outputs on a tf.io.gfile URL (`ram://`) give the local bytes;
  * refused in one line before any work: --pipeline with --runner, Beam options without
    --runner, an unknown Beam option; without Beam, the extra to install.
"""
import errno
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import test_predict_stream as streamtest
from data_prep import fileio
from export import inference
from export import predict_lib
from export import predict_report

beam_predict = pytest.importorskip("export.beam_predict")

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
# As in test_beam_convert: straight to Beam's Python runner, online or not.
NO_PRISM = ["--prism_location=/nonexistent/prism"]
IN_MEMORY = ["--direct_running_mode=in_memory", *NO_PRISM]
MULTI_PROCESS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing",
                 *NO_PRISM]
unet, ensemble = streamtest.unet, streamtest.ensemble  # module fixtures


def _predict_both(model, inputs, tmp_path, beam_args, **options):
  """Predicts `inputs` locally, then on Beam into the same folder (the report names it).

  Returns:
    {engine: (files, written names, failures)}.
  """
  out = tmp_path / "out"
  results = {}
  for name, engine in (("local", None),
                       ("beam", beam_predict.engine("DirectRunner", beam_args))):
    written, failures = predict_lib.predict(
        model, inputs, out, progress=False, pipeline="sequential", engine=engine,
        report=predict_report.Options(str(out / "report")), **options)
    results[name] = (streamtest._files(out), [p.name for p in written], failures)  # pylint: disable=protected-access
    shutil.rmtree(out)
  return results


@pytest.mark.parametrize("which, tta, beam_args", [("ensemble", True, IN_MEMORY),
                                                   ("unet", False, MULTI_PROCESS)])
def test_beam_writes_the_local_bytes(which, tta, beam_args, request, tmp_path):
  model = request.getfixturevalue(which)
  streamtest._mixed_inputs(tmp_path / "in")  # pylint: disable=protected-access
  (tmp_path / "in" / "c5.png").write_bytes(b"not a png")  # fails alike, in its place
  results = _predict_both(model, tmp_path / "in", tmp_path, beam_args, batch_size=2,
                          tta=tta, overlay=True, save_probabilities=True,
                          postprocess=True, spacing_2d_mm=(0.8, 0.8))
  files, written, failures = results["local"]
  assert [pathlib.Path(p).name for p, _ in failures] == ["c5.png"]
  assert len(written) == 6 * 4 + 2 * 3  # 2D: mask png+npy, overlay, probabilities
  assert any(name.startswith("report/") for name in files)
  assert results["beam"][1] == written  # the same files, listed in the same order
  assert results["beam"][2] == failures
  assert results["beam"][0].keys() == files.keys()
  for name, content in files.items():
    assert results["beam"][0][name] == content, name


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "export.predict", *args], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_corrupt_input_in_the_middle(unet, tmp_path):
  streamtest._pngs(tmp_path / "in", 6)  # pylint: disable=protected-access
  (tmp_path / "in" / "in3.png").write_bytes(b"not a png")
  out = tmp_path / "out"
  proc = _run_cli(f"--saved_model={unet.path}", f"--input={tmp_path / 'in'}",
                  f"--output={out}", "--batch_size=2", "--spacing_2d_mm=1",
                  "--runner=DirectRunner", "--", *IN_MEMORY)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  named = [l for l in proc.stderr.splitlines() if "in3.png" in l]
  assert len(named) == 1 and named[0].strip().startswith(str(tmp_path / "in" / "in3.png"))
  assert proc.stderr.splitlines()[-1] == (
      "spine-predict: error: 1 of 6 inputs failed (listed above)")
  assert f"spine-predict: wrote 10 files to {out}" in proc.stdout
  assert sorted(p.name for p in out.iterdir()) == sorted(
      f"in{i}_mask.{ext}" for i in (0, 1, 2, 4, 5) for ext in ("png", "npy"))


def test_a_worker_failing_on_one_input_fails_it_alone(unet, tmp_path, monkeypatch):
  """In-memory workers run in this process, so the patched reader and writer are theirs."""
  streamtest._pngs(tmp_path / "in", 7)  # pylint: disable=protected-access
  real_read = inference.read_input
  real_npy = predict_lib._write_npy  # pylint: disable=protected-access

  def read(path, *args):
    if path.endswith("in1.png"):
      raise RuntimeError("decoder crashed")
    return real_read(path, *args)

  def refuse(path, array):
    if "in4_mask" in path:
      raise ValueError("array refused")
    if "in5_mask" in path:  # a local run stops here; Beam fails this input alone
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real_npy(path, array)

  monkeypatch.setattr(inference, "read_input", read)
  monkeypatch.setattr(predict_lib, "_write_npy", refuse)
  out = tmp_path / "out"
  written, failures = predict_lib.predict(
      unet, tmp_path / "in", out, batch_size=1, spacing_2d_mm=(1.0, 1.0), progress=False,
      engine=beam_predict.engine("DirectRunner", IN_MEMORY))
  assert [(pathlib.Path(p).name, m.split(": ", 1)[1]) for p, m in failures] == [
      ("in1.png", "RuntimeError: decoder crashed"),
      ("in4.png", "ValueError: array refused"),
      ("in5.png", f"not written: cannot write {out / 'in5_mask.npy'}: No space left on "
                  "device")]
  assert all(m.startswith(p) for p, m in failures)
  # in4's and in5's PNGs were complete before their .npy failed: removed, no half set.
  expected = sorted(f"in{i}_mask.{ext}" for i in (0, 2, 3, 6) for ext in ("png", "npy"))
  assert sorted(p.name for p in written) == expected
  assert sorted(p.name for p in out.iterdir()) == expected


def test_an_output_folder_that_takes_no_file_is_one_line(unet, tmp_path, monkeypatch):
  streamtest._pngs(tmp_path / "in", 2)  # pylint: disable=protected-access
  out = tmp_path / "out"
  real_write = fileio.write_file
  calls = []

  def read_only(path, write):
    if pathlib.Path(path).parent == out:
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    real_write(path, write)

  monkeypatch.setattr(fileio, "write_file", read_only)
  monkeypatch.setattr(inference, "read_input", lambda *a: calls.append(a))
  with pytest.raises(predict_lib.OutputError) as e:
    predict_lib.predict(unet, tmp_path / "in", out, spacing_2d_mm=(1.0, 1.0),
                        progress=False, engine=beam_predict.engine("DirectRunner",
                                                                   IN_MEMORY))
  assert str(e.value).startswith(f"{out}: cannot write to the output folder: "
                                 "Permission denied")
  assert "\n" not in str(e.value) and not calls
  assert not list(out.iterdir())


def test_cli_output_under_a_file_is_one_line(unet, tmp_path):
  streamtest._pngs(tmp_path / "in", 1)  # pylint: disable=protected-access
  (tmp_path / "file").write_text("x")
  proc = _run_cli(f"--saved_model={unet.path}", f"--input={tmp_path / 'in'}",
                  f"--output={tmp_path / 'file' / 'out'}", "--spacing_2d_mm=1",
                  "--runner=DirectRunner", "--", *IN_MEMORY)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if "error" in l]  # Beam logs at import
  assert errors == [
      f"spine-predict: error: {tmp_path / 'file' / 'out'}: cannot create the output "
      "folder: Not a directory"], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


def test_beam_reads_and_writes_tf_io_gfile_urls(unet, tmp_path, monkeypatch):
  """Inputs and outputs on `ram://` (tf.io.gfile), in-memory workers: the local bytes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  streamtest._mixed_inputs(tmp_path / "in")  # pylint: disable=protected-access
  root = f"ram://beam-predict-{os.getpid()}"
  for p in sorted((tmp_path / "in").iterdir()):
    tf.io.gfile.makedirs(f"{root}/in")
    tf.io.gfile.copy(str(p), f"{root}/in/{p.name}")
  shutil.rmtree(tmp_path / "in")
  out = f"{root}/out"

  def files():
    return {name: tf.io.gfile.GFile(f"{out}/{name}", "rb").read()
            for name in sorted(tf.io.gfile.listdir(out))}

  try:
    runs = {}
    for name, engine in (("beam", beam_predict.engine("DirectRunner", IN_MEMORY)),
                         ("local", None)):
      written, failures = predict_lib.predict(
          unet, f"{root}/in", out, batch_size=2, spacing_2d_mm=(0.8, 0.8), overlay=True,
          progress=False, engine=engine)
      runs[name] = (files(), [str(p) for p in written], failures)
      fileio.remove_tree(out)
  finally:
    if tf.io.gfile.exists(root):
      tf.io.gfile.rmtree(root)
  local, beam = runs["local"], runs["beam"]
  assert not local[2] and len(local[0]) == 7 * 3 + 2 * 2
  assert beam[1:] == local[1:]
  assert beam[0].keys() == local[0].keys()
  for name in local[0]:
    assert beam[0][name] == local[0][name], name
  assert not list(tmp_path.iterdir())  # nothing went to a local "ram:" folder


@pytest.mark.parametrize("args, message", [
    (["--runner=DirectRunner", "--pipeline=streaming"],
     "spine-predict: error: --pipeline chooses how this process runs the steps; with "
     "--runner Beam's workers run them: drop --pipeline"),
    (["--", "--direct_num_workers=2"],
     "unexpected arguments: ['--direct_num_workers=2'] (Beam pipeline options after `--` "
     "need --runner)"),
    (["--runner=DirectRunner", "--", "--direct_num_worker=2"],
     "spine-predict: error: unknown Beam pipeline option(s) for --runner=DirectRunner: "
     "--direct_num_worker"),
])
def test_contradictory_or_unknown_beam_options_are_one_line(tmp_path, args, message):
  proc = _run_cli(f"--saved_model={tmp_path / 'none'}", f"--input={tmp_path}",
                  f"--output={tmp_path / 'out'}", *args)
  assert proc.returncode != 0
  assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists()


def test_without_beam_a_runner_is_one_error_naming_the_extra(monkeypatch, capsys):
  import data_prep  # pylint: disable=g-import-not-at-top
  from export import predict  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if it were not installed
  monkeypatch.delitem(sys.modules, "data_prep.beam_convert", raising=False)
  monkeypatch.delattr(data_prep, "beam_convert", raising=False)
  with pytest.raises(SystemExit) as e:
    predict._beam_engine("DirectRunner", [])  # pylint: disable=protected-access
  assert e.value.code == 1
  assert capsys.readouterr().err.strip().endswith(
      "error: a Beam runner needs Apache Beam, which is not installed: pip install "
      "'spineseg[beam]' (in a checkout: pip install -e '.[beam]')")


def test_the_plan_is_the_local_model_calls():
  """Inputs alone where they are read, batches once full, part-filled ones at the end."""
  a, b = (8, 8, None), (9, 9, None)
  keys = [(3, a), (0, a), (1, None), (2, b), (4, a), (5, None), (6, b), (7, a)]
  plan = beam_predict._plan(keys, 2)  # pylint: disable=protected-access
  calls = {}
  for index, (call, place) in plan.items():
    calls.setdefault(call, {})[place] = index
  assert [[c[k] for k in sorted(c)] for _, c in sorted(calls.items())] == [
      [1], [0, 3], [5], [2, 6], [4, 7]]
  np.testing.assert_equal(sorted(plan), list(range(8)))


def test_outcomes_cross_from_the_workers_without_pickle(tmp_path):
  # The launcher reads what the workers wrote into the output folder: an .npz it opens
  # with allow_pickle=False, never a pickle.
  entry = predict_report.Entry(
      input_path="a.nii.gz", kind="3d", mosaic=np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
      size={1: 12.5, 2: np.float64(3.0)}, unit="mm^3", slices={1: np.int64(2), 2: 0},
      components={1: np.int64(1), 2: 0}, flags=["few slices"], notes=[])
  outcomes = [(1, ["b.png"], [], [("b.png", "b.png: unreadable")], {}),
              (0, ["a.nii.gz"], [tmp_path / "a_mask.nii.gz"], [], {"a.nii.gz": entry})]
  path = str(tmp_path / "outcomes.npz")
  beam_predict._save(outcomes, path)
  with np.load(path, allow_pickle=False) as arrays:
    assert "outcomes" in arrays
  loaded = beam_predict._load(path)
  assert [o[:4] for o in loaded] == [o[:4] for o in outcomes]
  got = loaded[1][4]["a.nii.gz"]
  np.testing.assert_array_equal(got.mosaic, entry.mosaic)
  assert (got.size, got.slices, got.components) == ({1: 12.5, 2: 3.0}, {1: 2, 2: 0},
                                                    {1: 1, 2: 0})
  assert (got.kind, got.unit, got.flags) == ("3d", "mm^3", ["few slices"])
