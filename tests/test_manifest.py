"""The dataset manifest as one object: accessors, old manifests, validation, copies.

References are independent of `Manifest`: the JSON file as written, the shard files on
disk, and the records TensorFlow reads from them.
"""
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from data_prep import fileio, manifest, phantom, schema, writer
from trainer import run_dir, train

SIZE = 32


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """4 phantom slices converted gzip'ed, annotated vertebrae only, 2 val cases."""
  root = tmp_path_factory.mktemp("manifest")
  phantom.write_2d_dataset(root / "src", num_cases=4, seed=2, min_size=40, max_size=48)
  for path in (root / "src" / "masks").glob("*.npy"):  # a vertebra-only study
    mask = np.load(path, allow_pickle=False)
    np.save(path, np.where(mask == 1, 0, mask))
  out = root / "data"
  writer.convert_dataset(str(root / "src" / "images"), str(root / "src" / "masks"),
                         str(out), writer.ConvertOptions(
                             image_size=SIZE, val_fraction=0.5, num_shards=2,
                             compression="gzip", annotated_labels=[2], required_labels=[2],
                             normalization="zscore", num_workers=1), progress=False)
  return out


def test_accessors_of_a_converted_dataset(converted):
  m = manifest.load(converted)
  stored = json.loads((converted / schema.MANIFEST_NAME).read_text())
  assert m.raw == stored and m.data_dir == str(converted)
  assert (m.format_version, m.image_size, m.num_classes) == (schema.FORMAT_VERSION, SIZE, 3)
  assert m.labels == {"0": "background", "1": "disc", "2": "vertebra"}
  assert m.annotated_labels == [0, 2]
  assert m.normalization["per"] == "image" and m.norm_method == "zscore"
  assert (m.compression, m.compression_type) == ("gzip", "GZIP")
  assert m.target_spacing_mm is None and m.input_kind == "2d"
  assert m.splits == ("train", "val", "test")
  assert {c["id"] for c in m.cases} == {phantom.case_id(i) for i in range(4)}
  on_disk = sorted(str(p) for p in converted.glob("*.tfrecord*"))
  assert sorted(s.path for s in m.shards()) == on_disk
  for split in ("train", "val"):
    files = m.files(split)
    assert [pathlib.Path(f).name for f in files] == [
        f"{split}-0000{i}-of-00002.tfrecord" for i in range(2)]
    records = sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    assert m.num_slices(split) == records == sum(s.examples for s in m.shards(split)) > 0
    assert m.num_cases(split) == 2
    assert all(s.split == split and len(s.sha256) == 64 for s in m.shards(split))
  assert m.files("test") == [] and m.num_slices("test") == m.num_cases("test") == 0
  assert m.shards("val", "train") == m.shards("val") + m.shards("train")
  assert m.totals["slices_written"] == m.num_slices("train") + m.num_slices("val")
  assert sum(m.class_pixel_frequencies["all"]) == pytest.approx(1.0)
  assert m.intensity_statistics["stored"]["max"] > m.intensity_statistics["stored"]["min"]
  assert m.skipped_files == [] and m.skipped_slices == []
  assert manifest.verify_shards(m.shards()) == []
  assert manifest.shard_bytes(m.shards()) == sum(pathlib.Path(f).stat().st_size
                                                 for f in on_disk)


def test_old_manifest_without_optional_keys():
  # What older converters and hand-written model_dirs hold: no labels, target spacing,
  # annotated labels, cases or statistics.
  raw = {"format_version": schema.FORMAT_VERSION, "image_size": 64, "num_classes": 3,
         "normalization": {"method": "percentile", "per": "image"},
         "compression": "none",
         "splits": {"train": {"cases": 1, "slices": 3,
                              "shards": [{"file": "train-00000-of-00001.tfrecord",
                                          "examples": 3}]}}}
  m = manifest.Manifest("gs://bucket/data", raw)
  assert m.raw is raw and m.target_spacing_mm is None and m.input_kind is None
  assert m.labels == manifest.LABELS and m.annotated_labels == [0, 1, 2]
  assert m.cases == [] and m.totals == {} and m.class_pixel_frequencies == {}
  assert m.skipped_files == [] and m.skipped_slices == [] and m.intensity_statistics == {}
  assert m.splits == ("train",) and m.compression_type == ""
  assert m.files("train") == ["gs://bucket/data/train-00000-of-00001.tfrecord"]
  assert m.shards() == [manifest.Shard("train", m.files("train")[0], 3, None)]
  assert m.files("val") == [] and m.num_slices("train") == 3
  # A shard without a recorded hash cannot be verified: said, not skipped.
  assert manifest.verify_shards(m.shards()) == [
      "gs://bucket/data/train-00000-of-00001.tfrecord: no sha256 recorded in dataset.json"]


@pytest.mark.parametrize("change, message", [
    ({"compression": "zstd"}, "unknown compression 'zstd'"),
    ({"format_version": 99}, "format version 99"),
    ({"normalization": {"per": "image"}}, "normalization must be an object naming"),
    ({"splits": {"train": {"shards": [{"examples": 1}]}}}, "splits.train must be"),
    ({"splits": {"train": []}}, "splits.train must be"),
    ({"splits": {"dev": {}}}, r"found \['dev'\]"),
    ({"target_spacing_mm": 0}, "target_spacing_mm must be a positive number"),
])
def test_invalid_manifests_are_refused_naming_the_file(tmp_path, change, message):
  raw = manifest.make(image_size=SIZE, normalization="zscore", per="image",
                      compression="none", splits={})
  raw.update(change)
  with pytest.raises(ValueError, match=f"{tmp_path}/dataset.json: .*{message}"):
    manifest.Manifest(str(tmp_path), raw)
  fileio.write_json_atomic(tmp_path / schema.MANIFEST_NAME, raw)
  with pytest.raises(ValueError, match=message):
    manifest.load(tmp_path)


def test_model_dir_copy_resumes_and_compares_byte_for_byte(converted, tmp_path):
  # A model_dir's dataset.json as spine-train wrote it before the manifest was an object:
  # the loaded JSON written back.
  model_dir = tmp_path / "m"
  model_dir.mkdir()
  old_bytes = fileio.write_json_atomic(model_dir / schema.MANIFEST_NAME, json.loads(
      (converted / schema.MANIFEST_NAME).read_text())).read_bytes()
  m = manifest.load(converted)
  fileio.write_json_atomic(tmp_path / "again.json", m.raw)
  assert (tmp_path / "again.json").read_bytes() == old_bytes
  copy = manifest.load(model_dir)
  assert copy.raw == m.raw and copy.image_size == SIZE and copy.data_dir == str(model_dir)
  config = train.with_absolute_paths(train.TrainConfig(data_dir=str(converted),
                                                       model_dir=str(model_dir)))
  run_dir.check(config, m)  # the same data: resumes
  other = manifest.Manifest(str(converted), dict(m.raw, note="converted again"))
  with pytest.raises(train.ConfigError, match="trained on another dataset"):
    run_dir.check(config, other)
