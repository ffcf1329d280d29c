"""Every path may be a tf.io.gfile URL: the whole line convert -> train -> export ->
predict -> evaluate -> inspect on TensorFlow's in-memory `ram://` file system, in one
process, plus the `fileio` path helpers on `ram://` and on local folders.

A stray local access fails the line test: it runs from an empty temporary cwd (where
`pathlib.Path("ram://x")`, i.e. the relative `ram:/x`, would land) that must stay empty,
and `open` refuses any path naming `ram:`.
"""
import builtins
import json
import os
import pathlib
import uuid

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from data_prep import fileio
from data_prep import inspect_lib
from data_prep import phantom
from data_prep import readers
from data_prep import writer
from export import evaluate_lib
from export import inference
from export import predict_lib
from export import predict_report
from export import serving
from trainer import train

gfile = tf.io.gfile


@pytest.fixture
def ram():
  """A fresh `ram://` folder (the file system is process-wide), removed after."""
  root = f"ram://spineseg-{uuid.uuid4().hex[:8]}"
  yield root
  fileio.remove_tree(root)


@pytest.fixture
def no_local_ram(tmp_path, monkeypatch):
  """An empty cwd, and an `open` that refuses `ram:` paths (the local-file trap)."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  real_open = builtins.open

  def guarded_open(file, *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and "ram:" in str(os.fspath(file)):
      raise AssertionError(f"local open() of a ram:// path: {file}")
    return real_open(file, *args, **kwargs)
  monkeypatch.setattr(builtins, "open", guarded_open)
  yield cwd
  monkeypatch.undo()
  assert not list(cwd.iterdir()), f"local files appeared in the cwd: {list(cwd.iterdir())}"
  assert not (tmp_path / "ram:").exists()


def test_whole_line_on_ram_filesystem(ram, no_local_ram):
  raw, raw3d = f"{ram}/raw", f"{ram}/raw3d"
  data, model_dir = f"{ram}/data", f"{ram}/model"
  export_dir, out = f"{ram}/serving/spineseg/1", f"{ram}/out"
  phantom.write_2d_dataset(raw, num_cases=4, min_size=48, max_size=64)
  phantom.write_3d_dataset(raw3d, num_cases=1, size=32, num_slices=3)
  assert sorted(gfile.listdir(f"{raw}/images")) == [f"{c}.png" for c in
                                                     sorted(phantom.case_id(i)
                                                            for i in range(4))]

  result = writer.convert_dataset(
      f"{raw}/images", f"{raw}/masks", data,
      writer.ConvertOptions(image_size=32, val_fraction=0.25, num_workers=1), progress=False)
  assert gfile.exists(f"{data}/dataset.json")
  stored = json.loads(gfile.GFile(f"{data}/dataset.json").read())
  assert stored["splits"] == result["splits"]
  shards = gfile.glob(f"{data}/train-*.tfrecord*")
  assert shards and not gfile.glob(f"{data}/.spine*")  # staging and marker lock gone
  assert writer.verify_dataset(data, progress=False)[1] == []
  # A second conversion into the non-empty folder is refused, as locally.
  with pytest.raises(writer.ConversionError, match="not empty"):
    writer.convert_dataset(f"{raw}/images", f"{raw}/masks", data,
                           writer.ConvertOptions(image_size=32, num_workers=1),
                           progress=False)

  config = train.TrainConfig(data_dir=data, model_dir=model_dir, epochs=1, base_filters=4,
                             depth=2, global_batch_size=2, norm="group", verbose=0)
  first = train.train_and_evaluate(config)
  assert first["epochs_completed"] == 1
  for name in ("best.keras", "config.json", "dataset.json", "history.json",
               "checkpoints/checkpoint"):
    assert gfile.exists(f"{model_dir}/{name}"), name
  assert gfile.glob(f"{model_dir}/logs/train/*")  # TensorBoard events
  assert not gfile.exists(f"{model_dir}/.lock")  # the marker lock is released
  # A rerun resumes from the ram:// checkpoint (its one epoch is done: nothing to fit).
  again = train.train_and_evaluate(config)
  assert again["initial_epoch"] == 1 and again["history"] == first["history"]

  serving.export(model_dir, export_dir)
  assert gfile.exists(f"{export_dir}/saved_model.pb")
  assert gfile.exists(f"{export_dir}/{serving.METADATA_FILE}")
  assert not [p for p in gfile.listdir(f"{ram}/serving/spineseg") if p.startswith(".")]

  model = inference.load_saved_model(export_dir)
  written, failures = predict_lib.predict(
      model, f"{raw}/images", out, batch_size=4, overlay=True, progress=False,
      report=predict_report.Options(f"{out}/report"))
  assert failures == []
  names = sorted(gfile.listdir(out))
  cid = phantom.case_id(0)
  for name in (f"{cid}_mask.png", f"{cid}_mask.npy", f"{cid}_overlay.png", "report"):
    assert name in names, names
  assert gfile.exists(f"{out}/report/index.html")
  # The written mask reads back (from bytes) with the input's shape, in both formats.
  image = readers.read_image(f"{raw}/images/{cid}.png", None).image[0]
  mask_npy = readers._read_mask_2d(f"{out}/{cid}_mask.npy")
  mask_png = readers._read_mask_2d(f"{out}/{cid}_mask.png")
  assert mask_npy.shape == image.shape and np.array_equal(mask_npy, mask_png)
  assert set(np.unique(mask_npy)) <= {0, 1, 2}

  # A NIfTI volume on ram:// in, a NIfTI mask on ram:// out, geometry kept.
  volume = sorted(gfile.glob(f"{raw3d}/images/*.nii.gz"))[0]
  written3d, failures = predict_lib.predict(model, volume, f"{ram}/out3d", progress=False)
  assert failures == [] and len(written3d) == 1
  with fileio.local_copy(volume) as local_in, fileio.local_copy(written3d[0]) as local_out:
    src, got = nib.load(local_in), nib.load(local_out)
    assert got.shape == src.shape and np.allclose(got.affine, src.affine)

  report = evaluate_lib.evaluate_split(model, data, "val", batch_size=4)
  assert len(report["cases"]) == stored["splits"]["val"]["cases"] and not report["failures"]
  inspect_lib.write_report(data, f"{ram}/inspect")
  assert gfile.exists(f"{ram}/inspect/index.html")


# --------------------------------------------------------------------- fileio helpers

@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path, ram):
  return str(tmp_path) if request.param == "local" else ram


def test_path_keeps_urls_whole():
  p = fileio.path("ram://a//b/c.nii.gz")
  assert isinstance(p, fileio.RemotePath) and str(p) == "ram://a/b/c.nii.gz"
  assert (p.name, p.suffix, str(p.parent), str(p.parent / "d")) == (
      "c.nii.gz", ".gz", "ram://a/b", "ram://a/b/d")
  assert str(p.resolve()) == str(p) and fileio.is_remote(p) and not fileio.is_remote("a/b")
  assert isinstance(fileio.path("rel/x"), pathlib.Path)
  assert str(pathlib.Path("ram://a/b")) == "ram:/a/b"  # the trap `path` avoids
  local = fileio.path("file:///tmp//x/y.json")  # an absolute path after the scheme
  assert (str(local), str(local.parent), local.name) == (
      "file:///tmp/x/y.json", "file:///tmp/x", "y.json")


def test_file_urls_reach_the_local_disk(tmp_path):
  url = f"file://{tmp_path}/sub/out.json"
  fileio.path(url).parent.mkdir(parents=True, exist_ok=True)
  fileio.write_json_atomic(url, {"a": 1})
  assert json.loads((tmp_path / "sub" / "out.json").read_text()) == {"a": 1}


def test_atomic_write_rename_listing_and_remove(root):
  folder = fileio.path(root) / "sub"
  folder.mkdir(parents=True)
  target = folder / "x.json"
  fileio.write_json_atomic(target, {"a": 1})
  fileio.write_json_atomic(target, {"a": 2})  # replaces
  assert json.loads(target.read_text()) == {"a": 2}
  assert [p.name for p in folder.iterdir()] == ["x.json"]  # no temporary left

  def broken(path):
    with builtins.open(path, "w") as f:
      f.write("half")
    raise RuntimeError("disk gone")
  with pytest.raises(RuntimeError):
    fileio.atomic_write(target, broken)
  assert json.loads(target.read_text()) == {"a": 2}  # the old file, whole
  assert [p.name for p in folder.iterdir()] == ["x.json"]

  fileio.rename(target, folder / "y.json")
  assert not target.exists() and (folder / "y.json").is_file()
  assert [p.name for p in folder.glob("*.json")] == ["y.json"]
  assert (folder / "y.json").stat().st_size == len('{\n  "a": 2\n}\n')
  (folder / (fileio.TMP_PREFIX + "1-z")).write_bytes(b"left over")
  assert [p.name for p in fileio.remove_stale_temporaries(folder)] == [
      fileio.TMP_PREFIX + "1-z"]
  with pytest.raises(FileNotFoundError):
    (folder / "missing").read_bytes()
  fileio.remove_tree(folder)
  assert not folder.exists()
  fileio.remove_tree(folder)  # a missing folder is no error


def test_local_copy_and_source_read_urls(ram):
  arr = np.arange(6, dtype=np.int16).reshape(2, 3)
  fileio.atomic_write(f"{ram}/a.npy", lambda p: np.save(p, arr))
  assert np.array_equal(np.load(fileio.source(f"{ram}/a.npy"), allow_pickle=False), arr)
  with fileio.local_copy(f"{ram}/a.npy") as local:
    assert not fileio.is_remote(local) and np.array_equal(np.load(local), arr)
  assert not os.path.exists(local)


def test_remote_lock_refuses_a_live_holder_and_takes_over_a_dead_one(ram):
  fileio.path(ram).mkdir(parents=True, exist_ok=True)
  with fileio.FolderLock(ram, "test", lock_file=".lock") as lock:
    assert gfile.exists(f"{ram}/.lock") and lock.path.read_text().split()[0] == str(
        os.getpid())
    with pytest.raises(fileio.FolderBusy, match=f"pid {os.getpid()}"):
      with fileio.FolderLock(ram, "test", lock_file=".lock"):
        pass
  assert not gfile.exists(f"{ram}/.lock")
  # A marker of a dead process on this host (a killed run) is taken over.
  import socket  # pylint: disable=g-import-not-at-top
  dead = 2**22 + 12345  # above the default pid_max
  fileio.write_text_atomic(f"{ram}/.lock", f"{dead} {socket.gethostname()} x\n")
  with fileio.FolderLock(ram, "test", lock_file=".lock"):
    pass
  # Another host's marker is refused: the file is named, to be deleted by hand.
  fileio.write_text_atomic(f"{ram}/.lock", "1 some-other-host x\n")
  with pytest.raises(fileio.FolderBusy, match="delete ram://"):
    with fileio.FolderLock(ram, "test", lock_file=".lock"):
      pass


def test_a_remote_dicom_series_is_refused_in_one_line(ram):
  from data_prep import dicom  # pylint: disable=g-import-not-at-top
  fileio.path(f"{ram}/series").mkdir(parents=True)
  (fileio.path(f"{ram}/series") / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM")
  assert dicom.holds_series(f"{ram}/series")  # found, so it is not silently skipped
  with pytest.raises(readers.InputError, match="local folders only"):
    inference.read_input(f"{ram}/series")
