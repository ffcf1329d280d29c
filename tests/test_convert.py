"""spine-convert end to end: real data, determinism, manifest, and every bad input."""
import errno
import hashlib
import os
import pathlib
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_prep import fileio, manifest, preprocess, readers, schema, writer

SIZE = 48


def _read_examples(data_dir, split, compression="none"):
  m = manifest.load(data_dir)
  paths = m.files(split)
  ds = tf.data.TFRecordDataset(paths, compression_type="GZIP" if compression == "gzip"
                               else "")
  return [{k: v.numpy() for k, v in schema.parse_example(s, m.image_size).items()}
          for s in ds]


def _convert(src, out, log=None, **settings):
  """convert_dataset with `settings` (ConvertOptions fields) on SIZE px, one process."""
  options = writer.ConvertOptions(**dict(dict(image_size=SIZE, num_workers=1), **settings))
  return writer.convert_dataset(str(src / "images"), str(src / "masks"), str(out), options,
                                progress=False, log=log)


def _synthetic_2d(root, n=6, shape=(40, 30), labels=(0, 1, 2), prefix="s"):
  """n PNG slices with .npy masks holding `labels`, in root/images and root/masks."""
  (root / "images").mkdir(parents=True, exist_ok=True)
  (root / "masks").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(len(prefix) + n)
  for i in range(n):
    image = rng.integers(0, 255, shape).astype(np.uint8)
    mask = np.zeros(shape, np.int64)
    for j, label in enumerate(labels):
      mask[j * 5:(j + 1) * 5, :] = label
    Image.fromarray(image).save(root / "images" / f"{prefix}{i}.png")
    np.save(root / "masks" / f"{prefix}{i}.npy", mask)
  return root


def _digest(out):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(out.glob("*.tfrecord"))}


def test_spine2d_label_complete_and_decodes_to_source(shared_data, tmp_path):
  src = shared_data / "spine2d"
  out = tmp_path / "out"
  result = _convert(src, out)
  m = manifest.load(out)
  assert m.totals["slices_written"] == 10
  assert sum(m.num_slices(s) for s in schema.SPLITS) == 10
  skipped = {s["case_id"]: s["reason"] for s in m.skipped_slices}
  assert set(skipped) == {"0", "1", "5", "10", "13"}
  assert "missing label(s) [1, 2]" in skipped["0"] and "missing label(s) [2]" in skipped["1"]
  assert m.normalization == {"method": "percentile", "per": "image",
                             "percentiles": [0.5, 99.5]}
  assert m.compression == "none" and m.image_size == SIZE and result["dry_run"] is False
  freq = m.class_pixel_frequencies["all"]
  assert sum(freq) == pytest.approx(1.0) and all(f > 0 for f in freq)
  for shard in m.shards():
    path = out / pathlib.Path(shard.path).name
    assert shard.path == str(path) and shard.split in schema.SPLITS
    assert shard.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
  seen = []
  for split in ("train", "val"):
    for ex in _read_examples(out, split):
      case_id = ex["case_id"].decode()
      seen.append(case_id)
      image = np.asarray(Image.open(src / "images" / f"{case_id}.png"), np.float32)
      mask = np.load(src / "masks" / f"{case_id}.npy")
      off, scale = preprocess.normalization_params(image, "percentile")
      geo = preprocess.fit_geometry(*image.shape, SIZE)
      expected = preprocess.fit_image(
          preprocess.apply_normalization(image, "percentile", off, scale), geo, SIZE,
          preprocess.pad_value("percentile", off, scale))
      np.testing.assert_array_equal(ex["image"][..., 0], expected)
      np.testing.assert_array_equal(ex["mask"][..., 0], preprocess.fit_mask(mask, geo, SIZE))
      assert list(ex["geometry"]) == [256, 256, SIZE, SIZE, 0, 0]
      assert ex["norm_offset"] == pytest.approx(off) and ex["slice_index"] == 0
  assert sorted(seen, key=int) == ["2", "3", "4", "6", "7", "8", "9", "11", "12", "14"]
  assert len(os.listdir(out)) == 1 + len(m.shards())


def test_byte_identical_across_runs_and_workers_gzip(shared_data, tmp_path, monkeypatch):
  src = shared_data / "spine2d"
  a = _convert(src, tmp_path / "a", num_workers=1, compression="gzip", num_shards=3,
               test_fraction=0.2)
  # Force the worker pool even for this small job (examples built in other processes).
  monkeypatch.setattr(writer, "_WORKER_START_S", 0.0)
  b = _convert(src, tmp_path / "b", num_workers=2, compression="gzip", num_shards=3,
               test_fraction=0.2)
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  assert a["splits"] == b["splits"]
  assert [s["file"] for s in a["splits"]["train"]["shards"]] == [
      schema.shard_name("train", i, 3) for i in range(3)]
  assert len(_read_examples(tmp_path / "a", "train", "gzip")) == a["splits"]["train"]["slices"]
  assert manifest.load(tmp_path / "a").compression == "gzip"
  c = _convert(src, tmp_path / "c", seed=1, compression="gzip", num_shards=3,
               test_fraction=0.2)
  assert [x["split"] for x in c["cases"]] != [x["split"] for x in a["cases"]]


def test_nifti_single_class_volumes_and_mismatched_pair(shared_data, tmp_path):
  src = shared_data / "spine3d"
  out = tmp_path / "vb"
  m = _convert(src, out, required_labels=[2], val_fraction=0)
  skipped_files = {pathlib.Path(f["path"]).name: f["reason"] for f in m["skipped"]["files"]}
  assert list(skipped_files) == ["vb2_04.nii.gz"]
  assert "(381, 381, 77)" in skipped_files["vb2_04.nii.gz"]
  assert [c["id"] for c in m["cases"]] == ["ivd_11", "vb2_05"]
  assert m["normalization"]["per"] == "volume"
  case = readers.read_case(src / "images" / "vb2_05.nii.gz", src / "masks" / "vb2_05.nii.gz")
  with_label = [i for i in range(case.mask.shape[0]) if (case.mask[i] == 2).any()]
  examples = _read_examples(out, "train")
  assert [int(e["slice_index"]) for e in examples] == with_label
  off, scale = preprocess.normalization_params(case.image, "percentile")  # whole volume
  geo = preprocess.fit_geometry(381, 381, SIZE)
  ex = examples[len(examples) // 2]
  index = int(ex["slice_index"])
  np.testing.assert_array_equal(ex["mask"][..., 0],
                                preprocess.fit_mask(case.mask[index], geo, SIZE))
  np.testing.assert_allclose(ex["image"][..., 0], preprocess.fit_image(
      preprocess.apply_normalization(case.image[index], "percentile", off, scale), geo, SIZE,
      0.0), atol=1e-6)

  # ivd_11 alone (symlinked, never copied) with its single class.
  ivd = tmp_path / "ivd"
  for sub in ("images", "masks"):
    (ivd / sub).mkdir(parents=True)
    (ivd / sub / "ivd_11.nii.gz").symlink_to(src / sub / "ivd_11.nii.gz")
  m = _convert(ivd, tmp_path / "ivd_out", required_labels=[1])
  assert m["splits"]["train"]["cases"] == 1 and m["splits"]["val"]["slices"] == 0
  assert m["totals"]["slices_written"] > 0 and m["class_pixel_counts"]["all"][2] == 0


def test_resample_masks_converts_the_mismatched_pair(shared_data, tmp_path):
  vb = tmp_path / "vb2_04"
  for sub in ("images", "masks"):
    (vb / sub).mkdir(parents=True)
    (vb / sub / "vb2_04.nii.gz").symlink_to(shared_data / "spine3d" / sub / "vb2_04.nii.gz")
  m = _convert(vb, tmp_path / "out", annotated_labels=[2], val_fraction=0,
               resample_masks=True)
  assert m["skipped"]["files"] == [] and [c["id"] for c in m["cases"]] == ["vb2_04"]
  assert m["flags"]["resample_masks"] is True
  assert m["totals"]["slices_written"] == 63  # label slices 11..73 of the image's 76
  with pytest.raises(writer.ConversionError, match="does not match.*--resample_masks"):
    _convert(vb, tmp_path / "plain", annotated_labels=[2], val_fraction=0)
  assert "resample_masks" not in _convert(shared_data / "spine2d", tmp_path / "2d")["flags"]


def test_label_map_grouping_and_shard_sizes(tmp_path):
  src = tmp_path / "src"
  _synthetic_2d(src, n=4, labels=(0, 3, 7), prefix="p1_")
  _synthetic_2d(src, n=4, labels=(0, 4, 9), prefix="p2_")
  _synthetic_2d(src, n=4, labels=(0, 5, 12), prefix="p3_")
  with pytest.raises(schema.LabelError, match=r"s?p\d_0.npy.*\[3, 7\]|values \["):
    schema.apply_label_map(np.array([0, 3, 7]), {}, "p1_0.npy")
  with pytest.raises(writer.ConversionError, match=r"masks/p1_0.npy.*\[7\].*not covered"):
    _convert(src, tmp_path / "bad", label_map="1-5:1")
  assert not (tmp_path / "bad" / "dataset.json").exists()
  m = _convert(src, tmp_path / "out", label_map="1-5:1,6-12:2", case_id_regex=r"^(p\d)_",
               examples_per_shard=3, val_fraction=0.34)
  splits = {}
  for c in m["cases"]:
    splits.setdefault(c["group"], set()).add(c["split"])
  assert all(len(s) == 1 for s in splits.values()) and len(splits) == 3
  assert m["splits"]["val"]["cases"] == 4 and m["splits"]["train"]["cases"] == 8
  assert [s["examples"] for s in m["splits"]["train"]["shards"]] == [3, 3, 2]
  assert m["splits"]["train"]["shards"][0]["file"] == "train-00000-of-00003.tfrecord"
  masks = np.stack([e["mask"] for e in _read_examples(tmp_path / "out", "train")])
  # The padding of the 40x30 slices to squares is stored as the ignore label.
  assert set(np.unique(masks).tolist()) == {0, 1, 2, schema.IGNORE_LABEL}


def test_splits_are_exact_and_deterministic():
  groups = [f"c{i}" for i in range(20)]
  a = writer.assign_splits(groups, 0.2, 0.1, seed=3)
  assert sorted(a.values()).count("val") == 4 and list(a.values()).count("test") == 2
  assert a == writer.assign_splits(list(reversed(groups)), 0.2, 0.1, seed=3)
  assert writer.assign_splits(["only"], 0.5, 0.0, 0) == {"only": "train"}


def test_output_dir_safety_overwrite_and_dry_run(tmp_path):
  src = _synthetic_2d(tmp_path / "src", n=5)
  out = tmp_path / "out"
  dry = _convert(src, out, dry_run=True)
  assert dry["dry_run"] and dry["totals"]["slices_written"] == 5 and not out.exists()
  first = _convert(src, out, num_shards=2)
  with pytest.raises(writer.ConversionError, match="not empty.*--overwrite"):
    _convert(src, out)
  # A failing run with --overwrite leaves the old dataset complete and intact.
  np.save(src / "masks" / "s4.npy", np.full((40, 30), 9, np.int64))
  with pytest.raises(writer.ConversionError, match="s4.npy"):
    _convert(src, out, overwrite=True)
  assert manifest.load(out).raw["splits"] == first["splits"]
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["dataset.json"] + [s["file"] for sp in first["splits"].values() for s in sp["shards"]])
  # A killed run leaves only a hidden temporary folder, removed by the next --overwrite.
  (out / ".spine-convert-tmp-killed").mkdir()
  (out / ".spine-convert-tmp-killed" / "train-00000.part").write_bytes(b"partial")
  # A successful overwrite removes the old shards (other shard count).
  np.save(src / "masks" / "s4.npy", np.zeros((40, 30), np.int64))
  second = _convert(src, out, overwrite=True, num_shards=1)
  assert second["totals"]["slices_written"] == 4
  assert sorted(p.name for p in out.iterdir()) == sorted(["dataset.json"] + [
      s["file"] for sp in ("train", "val") for s in second["splits"][sp]["shards"]])


def test_bad_inputs_are_reported(tmp_path):
  src = _synthetic_2d(tmp_path / "src", n=4)
  with pytest.raises(readers.InputError, match="nope.*does not exist"):
    writer.convert_dataset(str(tmp_path / "nope"), str(src / "masks"), str(tmp_path / "o"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(readers.InputError, match="empty.*is empty"):
    writer.convert_dataset(str(src / "images"), str(tmp_path / "empty"), str(tmp_path / "o"))
  other = _synthetic_2d(tmp_path / "other", n=2, prefix="x")
  with pytest.raises(writer.ConversionError, match="no image/mask pairs.*x0"):
    writer.convert_dataset(str(src / "images"), str(other / "masks"), str(tmp_path / "o"))
  with pytest.raises(writer.ConversionError, match="every slice was pruned"):
    _convert(_synthetic_2d(tmp_path / "bg", n=2, labels=(0,)), tmp_path / "o")
  assert not (tmp_path / "o").exists() or not (tmp_path / "o" / "dataset.json").exists()
  with pytest.raises(writer.ConversionError, match=r"s0.npy.*\[5\].*--label_map"):
    np.save(src / "masks" / "s0.npy", np.full((40, 30), 5, np.int64))
    _convert(src, tmp_path / "o2")
  # A corrupt image is skipped with its reason, or fails the run under --strict.
  np.save(src / "masks" / "s0.npy", np.zeros((40, 30), np.int64))
  (src / "images" / "s1.png").write_bytes(b"garbage")
  (src / "masks" / "lonely.npy").write_bytes(b"x")
  m = _convert(src, tmp_path / "o3")
  reasons = {pathlib.Path(f["path"]).name: f["reason"] for f in m["skipped"]["files"]}
  assert "unreadable image" in reasons["s1.png"] and "no image named" in reasons["lonely.npy"]
  with pytest.raises(writer.ConversionError, match="--strict.*lonely.npy"):
    _convert(src, tmp_path / "o4", strict=True)
  (src / "masks" / "lonely.npy").unlink()
  with pytest.raises(writer.ConversionError, match="--strict.*s1.png.*unreadable"):
    _convert(src, tmp_path / "o5", strict=True)
  # 2D and NIfTI inputs are not mixed.
  nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.int16), np.eye(4)),
           str(src / "images" / "v.nii.gz"))
  nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.int16), np.eye(4)),
           str(src / "masks" / "v.nii.gz"))
  with pytest.raises(writer.ConversionError, match="mixes 2D images and NIfTI"):
    _convert(src, tmp_path / "o6")
  for bad in (dict(num_shards=2, examples_per_shard=3), dict(val_fraction=0.7,
                                                              test_fraction=0.3),
              dict(normalization="minmax"), dict(required_labels=[3])):
    with pytest.raises(ValueError):
      _convert(src, tmp_path / "o7", **bad)


def test_binary_fails_with_one_clear_line(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-m", "data_prep.convert", f"--images_dir={tmp_path}/none",
       f"--masks_dir={tmp_path}", f"--output_dir={tmp_path}/out"],
      capture_output=True, text=True, env=env, timeout=120,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert proc.returncode == 1
  assert f"spine-convert: error: {tmp_path}/none: images directory does not exist" in (
      proc.stderr)
  assert "Traceback" not in proc.stderr


def test_options_normalize_once_and_the_manifest_flags_derive_from_them():
  o = writer.ConvertOptions(annotated_labels=[2], label_map="1-5:1", val_fraction=0,
                            target_spacing_mm=1, spacing_2d_mm=[0.5, 1], num_workers=1)
  assert (o.annotated_labels, o.required_labels, o.spacing_2d_mm) == ((0, 2), (0, 2),
                                                                      (0.5, 1.0))
  # dataset.json's "flags", key order included: earlier datasets hold exactly these.
  assert list(o.manifest_flags("i", "m", pathlib.Path("o")).items()) == [
      ("images_dir", "i"), ("masks_dir", "m"), ("output_dir", "o"),
      ("required_labels", [0, 2]), ("annotated_labels", [0, 2]), ("label_map", "1-5:1"),
      ("val_fraction", 0), ("test_fraction", 0.0), ("seed", 0), ("num_shards", None),
      ("examples_per_shard", writer.options_lib.DEFAULT_EXAMPLES_PER_SHARD),
      ("image_size", 256), ("normalization", "percentile"), ("compression", "none"),
      ("strict", False), ("case_id_regex", ""), ("target_spacing_mm", 1.0),
      ("spacing_2d_mm", [0.5, 1.0])]
  flags = writer.ConvertOptions(required_labels=[], num_shards=2).manifest_flags("", "", "")
  assert (flags["required_labels"], flags["examples_per_shard"]) == ([], None)
  with pytest.raises(AttributeError):  # frozen: checked once, never changed after
    o.seed = 1
  with pytest.raises(ValueError, match=r"image_size must be at least 8, found 4"):
    writer.ConvertOptions(image_size=4)


_FLAGS_OF_OPTIONS = """
import dataclasses
from absl import flags
from data_prep import convert, options
fields = [f for f in dataclasses.fields(options.ConvertOptions) if f.name != "beam_args"]
for f in fields:
  flag = flags.FLAGS[f.name]
  default = list(map(str, f.default)) if isinstance(f.default, tuple) else f.default
  # (absl puts an enum's choices before its help: "<none|gzip>: TFRecord ...")
  assert flag.default == default and flag.help.endswith(f.metadata["help"]), f.name
flags.FLAGS(["spine-convert", "--label_map=1:1", "--val_fraction=0.3", "--seed=3",
             "--spacing_2d_mm=0.5,1", "--compression=gzip", "--num_shards=2", "--strict",
             "--normalization=zscore", "--case_id_regex=^(p)", "--runner=",
             "--protocol=thin_discs"])
print(convert._options([2], [1], []) == options.ConvertOptions(
    label_map="1:1", val_fraction=0.3, seed=3, spacing_2d_mm=(0.5, 1.0),
    compression="gzip", num_shards=2, strict=True, normalization="zscore",
    case_id_regex="^(p)", required_labels=[2], annotated_labels=[1], runner="",
    protocol="thin_discs"),
    len(fields))
"""


def test_every_option_is_a_flag_with_its_default_and_help():
  proc = _binary([], code=_FLAGS_OF_OPTIONS)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["True", "22"]


def test_label_map_parsing_and_regex_errors(tmp_path):
  assert schema.parse_label_map("1-3:1, 7:2") == {0: 0, 1: 1, 2: 1, 3: 1, 7: 2}
  for bad, match in (("1-3", "expected SRC:DST"), ("5-2:1", "below start"),
                     ("1:3", "not a class id"), ("1:1,1:2", "twice")):
    with pytest.raises(ValueError, match=match):
      schema.parse_label_map(bad)
  src = _synthetic_2d(tmp_path / "src", n=2)
  with pytest.raises(writer.ConversionError, match="'s0' does not match --case_id_regex"):
    _convert(src, tmp_path / "out", case_id_regex=r"^p\d")


# ---------------------------------------------------------------- verify, errors, leftovers

_REPO = pathlib.Path(__file__).resolve().parents[1]
# TensorFlow's C++ start-up lines reach stderr even with TF_CPP_MIN_LOG_LEVEL=3; they are
# not ours, so the "one line" checks look at everything else.
_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|"
                       r"[IWEF]\d{4} \S+\s+\d+ \S+:\d+\]|To enable the following instr)")


def _binary(args, code=None):
  """Runs spine-convert (or `code` that ends by running it) with `args`."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  cmd = [sys.executable, "-c", code, *args] if code else [
      sys.executable, "-m", "data_prep.convert", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                        cwd=_REPO)
  proc.errors = [l for l in proc.stderr.splitlines() if l and not _TF_NOISE.match(l)]
  return proc


def test_verify_names_each_truncated_or_flipped_shard(tmp_path):
  src = _synthetic_2d(tmp_path / "src", n=6)
  out = tmp_path / "out"
  m = _convert(src, out, num_shards=2)
  shards = [out / s["file"] for sp in schema.SPLITS for s in m["splits"][sp]["shards"]]
  assert len(shards) == 4
  ok = _binary([f"--verify={out}"])
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip() == f"{out}: 4 shards verified, all intact" and not ok.errors
  truncated, flipped = shards[0], shards[2]
  truncated.write_bytes(truncated.read_bytes()[:-100])
  data = bytearray(flipped.read_bytes())
  data[len(data) // 2] ^= 0x01  # one bit: same size, other content
  flipped.write_bytes(bytes(data))
  bad = _binary([f"--verify={out}"])
  assert bad.returncode == 1 and "verified" not in bad.stdout
  assert len(bad.errors) == 2, bad.stderr
  assert bad.errors[0].startswith(f"spine-convert: error: {truncated}: corrupted or trunc")
  assert bad.errors[1].startswith(f"spine-convert: error: {flipped}: corrupted or trunc")
  count, problems = writer.verify_dataset(out)
  assert count == 4 and len(problems) == 2
  with pytest.raises(writer.ConversionError, match=r"nope/dataset.json: no dataset manif"):
    writer.verify_dataset(tmp_path / "nope")


def test_verify_takes_no_conversion_flags_and_convert_needs_its_folders(tmp_path):
  mixed = _binary([f"--verify={tmp_path}", f"--images_dir={tmp_path}", "--overwrite"])
  assert mixed.returncode == 1 and mixed.errors == [
      "spine-convert: error: --verify checks an existing dataset and takes no conversion "
      "flags; found --images_dir, --overwrite"]
  partial = _binary([f"--images_dir={tmp_path}"])
  assert partial.returncode == 1 and len(partial.errors) == 1
  assert partial.errors[0].startswith(
      "spine-convert: error: missing --masks_dir, --output_dir: ")


def test_every_slice_pruned_error_gives_the_reasons(tmp_path):
  src = _synthetic_2d(tmp_path / "src", n=3, labels=(0,))  # background only
  _synthetic_2d(src, n=2, labels=(0, 1), prefix="d")  # discs, no vertebra
  for i in range(12):
    (src / "images" / f"z{i:02d}.png").write_bytes(b"not a png")
    np.save(src / "masks" / f"z{i:02d}.npy", np.zeros((4, 4), np.int64))
  with pytest.raises(writer.ConversionError) as info:
    _convert(src, tmp_path / "out")
  lines = str(info.value).splitlines()
  assert lines[0].startswith("every slice was pruned or skipped (17 pairs: 12 unusable, "
                             "5 slices without labels [0, 1, 2])")
  listed = [l for l in lines if l.startswith("  skipped file ")]
  assert len(listed) == 10 and all("unreadable image" in l for l in listed)
  assert "images/z00.png" in listed[0] and "  ... and 2 more skipped files" in lines
  assert "  3 slices skipped: missing label(s) [1, 2] (disc, vertebra)" in lines
  assert "  2 slices skipped: missing label(s) [2] (vertebra)" in lines
  assert not (tmp_path / "out").exists()


_FAULTY_RUN = """
import errno, sys
import tensorflow as tf
from data_prep import convert, fileio
fault = sys.argv.pop(1)

class FullDisk(tf.io.TFRecordWriter):
  def write(self, record):
    raise OSError(errno.ENOSPC, "No space left on device")

def read_only(path, obj):
  raise OSError(errno.EROFS, "Read-only file system", str(path))

if fault == "ENOSPC":
  tf.io.TFRecordWriter = FullDisk
else:
  fileio.write_json_atomic = read_only
convert.run()
"""


@pytest.mark.parametrize("fault", ["proc", "file", "ENOSPC", "EROFS"])
def test_output_os_errors_are_one_line_and_leave_nothing(tmp_path, fault):
  src = _synthetic_2d(tmp_path / "src", n=3)
  out = {"proc": pathlib.Path("/proc/xyz/spine"), "file": tmp_path / "a_file",
         "ENOSPC": tmp_path / "empty", "EROFS": tmp_path / "new" / "out"}[fault]
  if fault == "file":
    out.write_text("keep me")
  if fault == "ENOSPC":
    out.mkdir()
  args = [f"--images_dir={src}/images", f"--masks_dir={src}/masks", f"--output_dir={out}",
          f"--image_size={SIZE}", "--num_workers=1"]
  proc = _binary([fault, *args], code=_FAULTY_RUN) if fault.startswith("E") else (
      _binary(args))
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert len(proc.errors) == 1, proc.stderr
  expected = {"proc": f"{out}: cannot prepare the output directory: No such file",
              "file": f"{out}: --output_dir is an existing file",
              "ENOSPC": f"{out}: cannot write the shards: No space left on device (the disk",
              "EROFS": f"{out}: cannot write the dataset: Read-only file system (the file "}
  assert proc.errors[0].startswith(f"spine-convert: error: {expected[fault]}")
  if fault == "file":
    assert out.read_text() == "keep me"
  elif fault == "ENOSPC":
    assert list(out.iterdir()) == []  # no shard, no manifest, no temporary folder
  elif fault == "EROFS":
    assert not (tmp_path / "new").exists()  # the folders this run created are gone too
  else:
    assert not pathlib.Path("/proc/xyz").exists()


def test_failed_publish_and_failed_overwrite_leave_no_half_dataset(tmp_path, monkeypatch):
  src = _synthetic_2d(tmp_path / "src", n=4)
  out = tmp_path / "out"
  out.mkdir()
  real_replace = os.replace

  def replace(a, b):
    if pathlib.Path(b).name == schema.MANIFEST_NAME:  # the shards are already in place
      raise OSError(errno.EROFS, "Read-only file system", str(b))
    real_replace(a, b)
  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(writer.ConversionError, match="out: cannot write the dataset: Read-onl"):
    _convert(src, out)
  assert list(out.iterdir()) == []
  monkeypatch.setattr(os, "replace", real_replace)
  first = _convert(src, out, num_shards=1)
  before = {p.name: p.read_bytes() for p in out.iterdir()}

  class FullDisk(tf.io.TFRecordWriter):
    def write(self, record):
      raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(tf.io, "TFRecordWriter", FullDisk)
  with pytest.raises(writer.ConversionError, match="No space left on device"):
    _convert(src, out, overwrite=True, num_shards=2)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old dataset intact
  assert manifest.load(out).raw["splits"] == first["splits"]


def test_leftovers_of_a_killed_run_are_removed_before_the_emptiness_check(tmp_path, capsys):
  src = _synthetic_2d(tmp_path / "src", n=3)
  out = tmp_path / "out"
  out.mkdir()

  def plant():
    (out / ".spine-convert-tmp-abc123").mkdir()
    (out / ".spine-convert-tmp-abc123" / "train-00000.part").write_bytes(b"partial")
    (out / ".dataset.json.4242.tmp").write_text("{")
    (out / f"{fileio.TMP_PREFIX}4242-dataset.json").write_text("{")
  plant()
  m = _convert(src, out)  # `ls` shows an empty folder: no "not empty" refusal
  err = capsys.readouterr().err
  assert f"{out}: removed leftovers of an interrupted conversion: " in err
  for name in (".spine-convert-tmp-abc123", ".dataset.json.4242.tmp",
               f"{fileio.TMP_PREFIX}4242-dataset.json"):
    assert name in err
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["dataset.json"] + [s["file"] for sp in m["splits"].values() for s in sp["shards"]])
  # Next to a real dataset the leftovers go too, and the refusal names what is there.
  plant()
  notes = []
  with pytest.raises(writer.ConversionError, match=r"not empty \(it holds dataset.json, "):
    _convert(src, out, log=notes.append)
  assert len(notes) == 1 and not list(out.glob(".*"))


def test_a_second_convert_into_a_busy_folder_is_refused_and_spares_its_temporaries(
    tmp_path):
  from data_prep import fileio, phantom
  phantom.write_2d_dataset(tmp_path / "in", 1, min_size=32, max_size=32)
  images, masks = tmp_path / "in" / "images", tmp_path / "in" / "masks"
  out = tmp_path / "out"
  out.mkdir()
  live = out / ".spine-convert-tmp-live"  # a running conversion's staging folder
  live.mkdir()
  with fileio.FolderLock(out, "spine-convert"):
    with pytest.raises(writer.ConversionError, match="another spine-convert"):
      writer.convert_dataset(str(images), str(masks), str(out), progress=False)
  assert live.is_dir()  # not taken for a leftover while its owner holds the folder
