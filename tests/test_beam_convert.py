"""spine-convert on Apache Beam: the local converter's bytes, and Beam stays optional.

Each dataset is converted once per engine (module fixtures: the DirectRunner's worker
start-up is slow) into the same output path, so that even the `output_dir` recorded in
dataset.json agrees, and every file is compared byte for byte.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep import manifest, phantom, schema, shards, writer

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SIZE = 24
# Beam's DirectRunner first tries its Go runner, Prism, downloading the binary from
# GitHub at first use; a prism_location that does not exist sends it at once, online or
# not, to its Python runner, the one with a multi-process mode (what an offline machine
# gets anyway).
NO_PRISM = ["--prism_location=/nonexistent/prism"]
# Two worker processes: examples are built, and shards written, in other processes.
MULTI_PROCESS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing",
                 *NO_PRISM]


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _both_engines(src: pathlib.Path, root: pathlib.Path, **kwargs):
  """Converts `src` locally, then with Beam into the same path; both folders' files."""
  pytest.importorskip("apache_beam")
  out = root / "out"
  common = dict(image_size=SIZE, **kwargs)
  writer.convert_dataset(str(src / "images"), str(src / "masks"), str(out),
                         writer.ConvertOptions(num_workers=1, **common), progress=False)
  out.rename(root / "local")
  writer.convert_dataset(str(src / "images"), str(src / "masks"), str(out),
                         writer.ConvertOptions(runner="DirectRunner",
                                               beam_args=MULTI_PROCESS, **common),
                         progress=False)
  return _files(root / "local"), _files(out), out


def _phantom_with_bad_files(root: pathlib.Path) -> pathlib.Path:
  """Phantom slices plus an orphan, an unreadable image and an unlabelled slice."""
  phantom.write_2d_dataset(root, 5, seed=3)
  first = root / "images" / "phantom-0000.png"
  shutil.copy(first, root / "images" / "orphan.png")  # no mask
  (root / "images" / "broken.png").write_bytes(b"not a png")
  np.save(root / "masks" / "broken.npy", np.zeros((4, 4), np.int64))
  shutil.copy(first, root / "images" / "blank.png")  # its slice is pruned
  np.save(root / "masks" / "blank.npy",
          np.zeros_like(np.load(root / "masks" / "phantom-0000.npy")))
  return root


@pytest.fixture(scope="module")
def phantom_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("beam_phantom")
  src = _phantom_with_bad_files(root / "src")
  # Shards of 2 examples: a new file every other example, the last one part-filled.
  return _both_engines(src, root, examples_per_shard=2, compression="gzip")


@pytest.fixture(scope="module")
def spine2d_runs(tmp_path_factory):
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent")
  # Round robin over 3 shards: val's few slices leave a shard empty.
  return _both_engines(SHARED_DATA / "spine2d", tmp_path_factory.mktemp("beam_spine2d"),
                       num_shards=3, test_fraction=0.2)


def test_phantom_shards_and_manifest_are_the_local_bytes(phantom_runs):
  local, beam, out = phantom_runs
  assert sorted(beam) == sorted(local) and len(local) > 3
  for name in local:
    assert beam[name] == local[name], name
  # And they hold what they should, independently of the local run.
  m = manifest.load(out)
  skipped = {pathlib.Path(f["path"]).name: f["reason"] for f in m.skipped_files}
  assert set(skipped) == {"orphan.png", "broken.png"}
  assert "no mask" in skipped["orphan.png"] or "orphan" in skipped["orphan.png"]
  assert [(s["case_id"], s["reason"].split(";")[0]) for s in m.skipped_slices] == [
      ("blank", "missing label(s) [1, 2] (disc, vertebra)")]
  assert m.totals["slices_written"] == 5
  shards = m.shards()
  assert sum(s.examples for s in shards) == 5 and max(s.examples for s in shards) == 2
  assert writer.verify_dataset(out) == (len(shards), [])


def test_spine2d_shards_and_manifest_are_the_local_bytes(spine2d_runs):
  local, beam, out = spine2d_runs
  assert sorted(beam) == sorted(local)
  for name in local:
    assert beam[name] == local[name], name
  m = manifest.load(out)
  assert m.totals["slices_written"] == 10 and m.totals["slices_skipped"] == 5
  counts = [s.examples for s in m.shards()]
  assert 0 in counts and len(counts) == 9  # empty shards exist in both, alike


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                        text=True, env=env, timeout=300, cwd=REPO)


def test_local_runs_never_import_beam_and_a_label_error_under_beam_is_one_line(tmp_path):
  pytest.importorskip("apache_beam")
  src = tmp_path / "src"
  phantom.write_2d_dataset(src, 3, seed=0)  # its masks outline discs (1) too
  code = f"""
import sys
from data_prep import convert, writer
writer.convert_dataset({str(src / 'images')!r}, {str(src / 'masks')!r},
                       {str(tmp_path / 'local')!r},
                       writer.ConvertOptions(image_size={SIZE}, num_workers=1),
                       progress=False)
print("beam imported by a local run:", "apache_beam" in sys.modules)
convert.run()
"""
  proc = _run(code, f"--images_dir={src}/images", f"--masks_dir={src}/masks",
              f"--output_dir={tmp_path}/out", f"--image_size={SIZE}",
              "--annotated_labels=0,2", "--runner=DirectRunner", "--", *NO_PRISM)
  assert proc.stdout.strip() == "beam imported by a local run: False", proc.stderr
  assert proc.returncode == 1, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"spine-convert: error: {src}/masks/phantom-0000.npy: mask holds "
                         "class(es) [1] (disc)"), last
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists()


def test_without_beam_a_runner_is_one_error_naming_the_extra(tmp_path, monkeypatch):
  import data_prep  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if it were not installed
  monkeypatch.delitem(sys.modules, "data_prep.beam_convert", raising=False)
  monkeypatch.delattr(data_prep, "beam_convert", raising=False)
  src = tmp_path / "src"
  phantom.write_2d_dataset(src, 1, seed=0)
  with pytest.raises(writer.ConversionError) as e:
    writer.convert_dataset(str(src / "images"), str(src / "masks"), str(tmp_path / "out"),
                           writer.ConvertOptions(runner="DirectRunner"), progress=False)
  assert str(e.value) == (
      "a Beam runner needs Apache Beam, which is not installed: pip install "
      "'spineseg[beam]' (in a checkout: pip install -e '.[beam]')")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(runner="DirectRunner", beam_args=["--direct_num_worker=2"]),
     "unknown Beam pipeline option(s) for --runner=DirectRunner: --direct_num_worker"),
    (dict(runner="DirectRunner", beam_args=["--runner=FlinkRunner"]),
     "give the Beam runner as --runner=NAME before `--`"),
    (dict(runner="DirectRunner", beam_args=["2"]),
     "Beam pipeline options are --name=value, found ['2']"),
    (dict(runner="NoSuchRunner"), "--runner=NoSuchRunner: Unexpected pipeline runner"),
    (dict(runner="DirectRunner", num_workers=2), "num_workers sizes the local worker pool"),
    (dict(runner="DirectRunner", dry_run=True), "a dry run writes nothing"),
    (dict(beam_args=["--direct_num_workers=2"]), "need a Beam runner"),
])
def test_contradictory_or_unknown_beam_options_are_refused_before_any_work(
    tmp_path, kwargs, message):
  if kwargs.get("runner"):
    pytest.importorskip("apache_beam")
  with pytest.raises(ValueError) as e:
    writer.convert_dataset(str(tmp_path / "none"), str(tmp_path / "none"),
                           str(tmp_path / "out"), writer.ConvertOptions(**kwargs),
                           progress=False)
  assert message in str(e.value)
  assert not (tmp_path / "out").exists()


def test_a_failure_inside_the_pipeline_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
  pytest.importorskip("apache_beam")
  from data_prep import beam_convert  # pylint: disable=g-import-not-at-top
  src = tmp_path / "src"
  phantom.write_2d_dataset(src, 2, seed=0)

  def full_disk(keyed, output_dir):
    with shards.output_errors("write the shards", output_dir):
      raise OSError(28, "No space left on device")

  monkeypatch.setattr(beam_convert, "_write_shard", full_disk)
  out = tmp_path / "out"
  with pytest.raises(writer.ConversionError) as e:  # in-process DirectRunner
    writer.convert_dataset(str(src / "images"), str(src / "masks"), str(out),
                           writer.ConvertOptions(image_size=SIZE, runner="DirectRunner",
                                                 beam_args=NO_PRISM),
                           progress=False)
  assert str(e.value) == (f"{out}: cannot write the shards: No space left on device (the "
                          "disk is full) [while running 'WriteShards']")
  assert not out.exists()


def test_beam_reads_and_writes_tf_io_gfile_urls(monkeypatch, tmp_path):
  """Sources and output on `ram://` (tf.io.gfile), Beam in memory: the local bytes.

  The in-memory DirectRunner runs its workers in this process, the one `ram://` file
  system they can share; a stray local path would land under the empty working folder.
  """
  pytest.importorskip("apache_beam")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_prep import fileio  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  root = f"ram://beam-gfile-{os.getpid()}"
  phantom.write_2d_dataset(f"{root}/src", 3, seed=5)
  out = f"{root}/out"
  common = dict(image_size=SIZE, examples_per_shard=2)

  def files():
    return {name: tf.io.gfile.GFile(f"{out}/{name}", "rb").read()
            for name in sorted(tf.io.gfile.listdir(out))}

  try:
    writer.convert_dataset(f"{root}/src/images", f"{root}/src/masks", out,
                           writer.ConvertOptions(
                               runner="DirectRunner",
                               beam_args=["--direct_running_mode=in_memory", *NO_PRISM],
                               **common),
                           progress=False)
    beam = files()
    fileio.remove_tree(out)
    writer.convert_dataset(f"{root}/src/images", f"{root}/src/masks", out,
                           writer.ConvertOptions(num_workers=1, **common), progress=False)
    local = files()
  finally:
    if tf.io.gfile.exists(root):
      tf.io.gfile.rmtree(root)
  assert sorted(beam) == sorted(local) and schema.MANIFEST_NAME in local
  assert len(local) >= 3  # dataset.json and shards of 2 examples
  for name in local:
    assert beam[name] == local[name], name
  assert not list(tmp_path.iterdir())  # nothing went to a local "ram:" folder
