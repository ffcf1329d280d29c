"""Export: the SavedModel reloads in a TensorFlow-only process and matches the Keras model.

Reference outputs are computed here with the converter's NumPy preprocessing
(`data_prep.preprocess`), the Keras model, a float32 softmax, and a NumPy crop-and-resize
back to the original geometry (`_unfit`: not the graph's `tf_unfit`, so a wrong crop in
the graph cannot hide behind the same wrong reference). Tolerance: 1e-4 absolute on
probabilities (the NumPy and TF bilinear resizes differ by ~5e-5 in float32 rounding);
masks must agree wherever the top two probabilities differ by more than 1e-3.
"""
import errno
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import export_testlib
from data_prep import manifest
from data_prep import preprocess
from data_prep import schema
from export import serving
from trainer import unet
S = export_testlib.IMAGE_SIZE
REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

# Runs in a fresh interpreter with -I (no PYTHONPATH, no script dir) and refuses any
# project import, so the SavedModel must be self-contained.
CHECK_SCRIPT = r'''
import pathlib, sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("data_prep", "export", "trainer", "tests"):
      raise ImportError(f"the SavedModel must not need {name}")
sys.meta_path.insert(0, Block())
import numpy as np, tensorflow as tf
model, d = tf.saved_model.load(sys.argv[1]), pathlib.Path(sys.argv[2])
inp = np.load(d / "inputs.npz", allow_pickle=False)
blobs = lambda prefix: [p.read_bytes() for p in sorted(d.glob(prefix + "*.bin"))]
calls = {
    "default": ("serving_default", {"images": inp["images"]}),
    "uint8": ("segment_uint8", {"images": inp["images_u8"]}),
    "uint16": ("segment_uint16", {"images": inp["images_u16"]}),
    "volume": ("segment_volume", {"images": inp["volume"]}),
    "spacing": ("segment_spacing", {"images": inp["images"], "spacing": inp["spacing"]}),
    "volume_spacing": ("segment_volume_spacing", {"images": inp["volume"],
                                                  "spacing": inp["spacing"]}),
    "png": ("segment_png", {"png": blobs("png")}),
    "examples": ("segment_examples", {"examples": blobs("example")}),
}
out = {}
for key, (name, kwargs) in calls.items():
  result = model.signatures[name](**{k: tf.constant(v) for k, v in kwargs.items()})
  for k, v in result.items():
    out[f"{key}/{k}"] = v.numpy().astype(str) if v.dtype == tf.string else v.numpy()
np.savez(d / "outputs.npz", **out)
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  model_dir = export_testlib.write_model_dir(root / "model")
  export_dir = serving.export(model_dir, root / "serving" / "1")
  model = keras.models.load_model(model_dir / "best.keras", compile=False)
  return model_dir, export_dir, model


def _reference_squares(images, per_image):
  method = "percentile"
  h, w = images.shape[1:3]
  geo = preprocess.fit_geometry(h, w, S)
  stats = [preprocess.normalization_params(x if per_image else images, method)
           for x in images]
  squares = np.stack([
      preprocess.fit_image(preprocess.apply_normalization(x, method, off, sc), geo, S,
                           preprocess.pad_value(method, off, sc))
      for x, (off, sc) in zip(images, stats)])
  return squares, geo


def _probs(model, squares):
  logits = model(squares[..., None].astype(np.float32), training=False)
  return tf.nn.softmax(tf.cast(logits, tf.float32)).numpy()


def _unfit(probs, geo):
  """NumPy reference of the graph's unfit: crop the padding, resize each class map back."""
  top, left = geo.pad_top, geo.pad_left
  crop = np.asarray(probs)[:, top:top + geo.resized_height, left:left + geo.resized_width]
  return np.stack([
      np.stack([preprocess.resize_bilinear(p[..., c], geo.original_height,
                                           geo.original_width)
                for c in range(p.shape[-1])], axis=-1)
      for p in crop])


def _reference(model, images, per_image=True):
  squares, geo = _reference_squares(np.asarray(images, np.float32), per_image)
  return _unfit(_probs(model, squares), geo)


def _assert_matches(probs, mask, ref_probs):
  assert probs.dtype == np.float32 and mask.dtype == np.uint8
  assert probs.shape == ref_probs.shape and mask.shape == ref_probs.shape[:-1]
  np.testing.assert_allclose(probs, ref_probs, atol=1e-4)
  top2 = np.sort(ref_probs, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 1e-3
  assert clear.mean() > 0.5  # the comparison below must not be vacuous
  np.testing.assert_array_equal(mask[clear], ref_probs.argmax(-1)[clear])


def test_signatures_in_fresh_tensorflow_only_process(exported, tmp_path):
  _, export_dir, model = exported
  rng = np.random.default_rng(1)
  images_u8 = rng.integers(0, 256, (2, 200, 310, 1)).astype(np.uint8)
  images_u16 = (images_u8[:, :48, :40].astype(np.uint16) * 11)
  volume = rng.gamma(2.0, 100.0, (5, 40, 60, 1)).astype(np.float32)
  pngs = [images_u8[0, :50, :70], images_u16[1]]
  for i, p in enumerate(pngs):
    (tmp_path / f"png{i}.bin").write_bytes(tf.io.encode_png(p).numpy())
  ex_images, ex_geos = [], []
  for i, (h, w) in enumerate([(20, 30), (S, S), (45, 17)]):
    geo = preprocess.fit_geometry(h, w, S)
    image = rng.random((S, S)).astype(np.float32)
    example = schema.make_example(
        image, np.zeros((S, S), np.uint8), case_id=f"case{i}", slice_index=i,
        source=f"s{i}.png", geometry=geo, spacing=[1.0, 1.0], norm_method="percentile",
        norm_offset=0.0, norm_scale=1.0)
    (tmp_path / f"example{i}.bin").write_bytes(example.SerializeToString())
    ex_images.append(image)
    ex_geos.append(geo)
  np.savez(tmp_path / "inputs.npz", images=images_u8.astype(np.float32),
           images_u8=images_u8, images_u16=images_u16, volume=volume,
           spacing=np.array([0.5, 0.7], np.float32))
  script = tmp_path / "check.py"
  script.write_text(CHECK_SCRIPT)
  proc = subprocess.run([sys.executable, "-I", str(script), str(export_dir), str(tmp_path)],
                        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = np.load(tmp_path / "outputs.npz", allow_pickle=False)

  # Any size: a 200x310 batch comes back 200x310, uint8 and float32 inputs agree.
  ref = _reference(model, images_u8[..., 0])
  _assert_matches(out["default/probabilities"], out["default/mask"], ref)
  np.testing.assert_array_equal(out["uint8/probabilities"], out["default/probabilities"])
  _assert_matches(out["uint16/probabilities"], out["uint16/mask"],
                  _reference(model, images_u16[..., 0]))
  # The volume shares one set of statistics over all its slices.
  _assert_matches(out["volume/probabilities"], out["volume/mask"],
                  _reference(model, volume[..., 0], per_image=False))
  # A model without a target spacing ignores the spacing input: the same outputs.
  for name in ("probabilities", "mask"):
    np.testing.assert_array_equal(out[f"spacing/{name}"], out[f"default/{name}"])
    np.testing.assert_array_equal(out[f"volume_spacing/{name}"], out[f"volume/{name}"])

  # PNGs of different sizes: each in its own geometry, zero-padded to the largest.
  np.testing.assert_array_equal(out["png/height"], [50, 48])
  np.testing.assert_array_equal(out["png/width"], [70, 40])
  for i, p in enumerate(pngs):
    h, w = p.shape[:2]
    _assert_matches(out["png/probabilities"][i:i + 1, :h, :w],
                    out["png/mask"][i:i + 1, :h, :w], _reference(model, p[None, ..., 0]))
    assert not out["png/mask"][i, h:].any() and not out["png/mask"][i, :, w:].any()

  # Examples: the stored square geometry, and each slice's original geometry.
  sq = _probs(model, np.stack(ex_images))
  _assert_matches(out["examples/probabilities"], out["examples/mask"], sq)
  np.testing.assert_array_equal(out["examples/case_id"], ["case0", "case1", "case2"])
  np.testing.assert_array_equal(out["examples/slice_index"], [0, 1, 2])
  for i, geo in enumerate(ex_geos):
    h, w = geo.original_height, geo.original_width
    assert (out["examples/original_height"][i], out["examples/original_width"][i]) == (h, w)
    _assert_matches(_unfit(out["examples/probabilities"][i:i + 1], geo),
                    out["examples/original_mask"][i:i + 1, :h, :w], _unfit(sq[i:i + 1], geo))


def test_saved_model_cli_lists_signatures(exported):
  _, export_dir, _ = exported
  cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
  proc = subprocess.run([str(cli), "show", "--all", "--dir", str(export_dir)], env=ENV,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in serving.SIGNATURES:
    assert f"signature_def['{name}']" in proc.stdout
  assert "outputs['probabilities']" in proc.stdout and "outputs['mask']" in proc.stdout


def test_rgb_png_is_refused(exported):
  _, export_dir, _ = exported
  loaded = tf.saved_model.load(str(export_dir))
  rgb = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(tf.errors.InvalidArgumentError, match="1-channel grayscale"):
    loaded.signatures["segment_png"](png=tf.stack([rgb]))


def test_no_overwrite_without_flag_and_atomic_replace(exported):
  model_dir, export_dir, _ = exported
  before = sorted(p.name for p in export_dir.iterdir())
  with pytest.raises(FileExistsError, match="--overwrite"):
    serving.export(model_dir, export_dir)
  assert sorted(p.name for p in export_dir.iterdir()) == before
  # A failing export (missing model) leaves no temporary folder behind.
  with pytest.raises(FileNotFoundError, match="best.keras"):
    serving.export(export_dir.parent, export_dir.parent / "2")
  assert sorted(p.name for p in export_dir.parent.iterdir()) == ["1"]


def test_model_dir_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    serving.load_model_dir(tmp_path / "missing")
  (tmp_path / "best.keras").write_text("")
  with pytest.raises(FileNotFoundError, match="dataset.json"):
    serving.load_model_dir(tmp_path)


@pytest.mark.parametrize("damage", ["truncated_half", "truncated_tail", "flipped_byte"])
def test_corrupt_best_keras_is_not_reported_as_missing(exported, tmp_path, damage):
  model_dir, _, _ = exported
  copy = tmp_path / "model"
  shutil.copytree(model_dir, copy)
  model_path = copy / serving.MODEL_FILE
  data = model_path.read_bytes()
  if damage == "truncated_half":
    data = data[:len(data) // 2]
  elif damage == "truncated_tail":
    data = data[:-10]  # only the end of the zip directory is cut
  else:
    # A byte inside the (stored, uncompressed) weights: the archive opens, a CRC fails.
    middle = len(data) // 2
    data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
  model_path.write_bytes(data)
  with pytest.raises(ValueError) as info:
    serving.load_model_dir(copy)
  message = str(info.value)
  assert message.startswith(f"{model_path}: unreadable Keras model (truncated or corrupt")
  assert message.endswith("retrain or restore it")
  assert "not found" not in message.lower()


def test_export_is_readable_by_other_accounts(exported):
  _, export_dir, _ = exported
  entries = [export_dir] + sorted(export_dir.rglob("*"))
  assert len(entries) > 5 and any(p.name == "saved_model.pb" for p in entries)
  modes = {str(p.relative_to(export_dir)): stat.S_IMODE(p.lstat().st_mode)
           for p in entries}
  expected = {str(p.relative_to(export_dir)): 0o755 if p.is_dir() else 0o644
              for p in entries}
  assert modes == expected


@pytest.mark.parametrize("failure", ["read_only", "full_disk"])
def test_export_write_errors_name_the_folder_and_leave_nothing(exported, tmp_path,
                                                               monkeypatch, failure):
  model_dir, _, _ = exported
  target = tmp_path / "models" / "1"
  if failure == "read_only":
    def make_temp_dir(parent, prefix):  # pylint: disable=unused-argument
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(parent))
    monkeypatch.setattr(serving.fileio, "make_temp_dir", make_temp_dir)
    reason = "Read-only file system"
  else:
    real_save = tf.saved_model.save

    def save(obj, export_dir, **kwargs):
      real_save(obj, export_dir, **kwargs)  # half a SavedModel, then the disk is full
      raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
    monkeypatch.setattr(serving.tf.saved_model, "save", save)
    reason = "No space left on device"
  with pytest.raises(serving.ExportError) as info:
    serving.export(model_dir, target)
  assert str(info.value) == f"{target}: cannot write the SavedModel: {reason}"
  assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_export_cli_unwritable_export_dir_is_one_line(exported, tmp_path, where):
  model_dir, _, _ = exported
  if where == "under_a_file":
    (tmp_path / "a_file").write_text("keep")
    export_dir = tmp_path / "a_file" / "1"
  else:
    export_dir = pathlib.Path("/proc/spineseg/1")
  proc = subprocess.run(
      [sys.executable, "-m", "export.export_saved_model", f"--model_dir={model_dir}",
       f"--export_dir={export_dir}"], cwd=REPO, env=ENV, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("spine-export: error:")]
  assert len(lines) == 1 and str(export_dir) in lines[0], proc.stderr[-2000:]
  if where == "under_a_file":
    assert (tmp_path / "a_file").read_text() == "keep"


def test_cli_refuses_unversioned_export_dir(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "export.export_saved_model", f"--model_dir={tmp_path}",
       f"--export_dir={tmp_path}/latest"], cwd=REPO, env=ENV, capture_output=True,
      text=True, timeout=120)
  assert proc.returncode != 0
  assert "version number" in proc.stderr and "latest" in proc.stderr


def test_png_decoding_keeps_8_and_16_bit_values(exported):
  # Percentile/zscore are scale-invariant, so the signature test cannot see an 8-bit PNG
  # decoded as 16-bit (v * 257); "divide255" would. Check the decoder's numbers directly.
  _, _, model = exported
  module = serving.SegmentationModule(model, image_size=S, norm_method="divide255")
  u8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  u16 = (np.arange(256, dtype=np.uint16) * 250).reshape(16, 16, 1)
  for image in (u8, u16):
    decoded = module._decode_png(tf.io.encode_png(image)).numpy()  # pylint: disable=protected-access
    np.testing.assert_array_equal(decoded, image.astype(np.float32))


def test_mixed_precision_model_serves_float32(tmp_path):
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = unet.build_unet(base_filters=4, depth=2)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  model.save(model_dir / "best.keras")
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, manifest.make(
      image_size=S, normalization="zscore", per="image", compression="none", splits={}))
  loaded = tf.saved_model.load(str(serving.export(model_dir, tmp_path / "out" / "1")))
  out = loaded.signatures["serving_default"](images=tf.random.uniform([2, 50, 40, 1]))
  assert out["probabilities"].dtype == tf.float32
  assert out["probabilities"].shape == (2, 50, 40, 3)
  np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-3)


TARGET_MM = 0.8


@pytest.fixture(scope="module")
def exported_at_spacing(tmp_path_factory):
  """The U-Net of `exported`, its dataset converted at TARGET_MM mm per pixel."""
  root = tmp_path_factory.mktemp("export_spacing")
  model_dir = export_testlib.write_model_dir(root / "model")
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, manifest.make(
      image_size=S, normalization="percentile", per="image", compression="none",
      splits={}, extra={"target_spacing_mm": TARGET_MM}))
  export_dir = serving.export(model_dir, root / "serving" / "1")
  model = keras.models.load_model(model_dir / "best.keras", compile=False)
  return tf.saved_model.load(str(export_dir)), model


def _tile_weights(size):
  """The blending weight of a tile pixel, written out (not read from serving): a
  separable Gaussian of sigma size / 8 centred on the tile."""
  axis = np.arange(size) - (size - 1) / 2.0
  gauss = np.exp(-0.5 * (axis / (size / 8.0)) ** 2)
  return np.outer(gauss, gauss)


def _tiled_probs(model, canvas, size=S):
  """NumPy reference of the sliding window: the Keras model on every size x size tile of
  the canvas [N, H, W] at origins 0, size/2, ..., side - size per axis, one tile at a
  time, the tiles' probabilities blended by `_tile_weights` over their summed weights."""
  n, h, w = canvas.shape
  weight = _tile_weights(size)
  acc, total = np.zeros((n, h, w, 3)), np.zeros((h, w))
  for r in range(0, h - size + 1, size // 2):
    for c in range(0, w - size + 1, size // 2):
      acc[:, r:r + size, c:c + size] += (_probs(model, canvas[:, r:r + size, c:c + size])
                                         * weight[..., None])
      total[r:r + size, c:c + size] += weight
  return (acc / total[..., None]).astype(np.float32)


def _spacing_reference(model, images, spacing, per_image=True, tiled=True):
  """NumPy twin of the spacing signatures: the converter's resampling on the serving
  canvas (`grown_canvas`), the Keras model tile-wise (`_tiled_probs`; `tiled=False`: once
  on the whole canvas, what the graph did before it had a sliding window), then a NumPy
  crop-and-resize back."""
  method = "percentile"
  images = np.asarray(images, np.float32)
  h, w = images.shape[1:3]
  rh, rw = preprocess.resampled_size(h, w, spacing, TARGET_MM)
  canvas = preprocess.grown_canvas(rh, rw, S)
  geo = preprocess.place_geometry(h, w, rh, rw, *canvas)
  stats = [preprocess.normalization_params(x if per_image else images, method)
           for x in images]
  squares = np.stack([
      preprocess.fit_image(preprocess.apply_normalization(x, method, off, sc), geo, canvas,
                           preprocess.pad_value(method, off, sc))
      for x, (off, sc) in zip(images, stats)])
  probs = _tiled_probs(model, squares) if tiled else _probs(model, squares)
  return _unfit(probs, geo), geo, canvas


def test_spacing_signatures_match_the_converter_resampling(exported_at_spacing):
  loaded, model = exported_at_spacing
  rng = np.random.default_rng(4)
  # 45 x 70 px at 0.5 x 0.6 mm: 28 x 53 px at 0.8 mm (0.6 in float32 is 0.60000002:
  # 52.500002 px rounds up), wider than the 32 px square: a 32 x 64 canvas, not a crop.
  images = rng.integers(0, 256, (2, 45, 70, 1)).astype(np.float32)
  ref, geo, canvas = _spacing_reference(model, images[..., 0], (0.5, 0.6))
  assert (geo.resized_height, geo.resized_width) == (28, 53) and canvas == (32, 64)
  out = loaded.signatures["segment_spacing"](images=tf.constant(images),
                                             spacing=tf.constant([0.5, 0.6]))
  _assert_matches(out["probabilities"].numpy(), out["mask"].numpy(), ref)
  # A volume: statistics over all slices; 50 x 40 px at 1.2 x 1.0 mm -> 75 x 50 px.
  volume = rng.gamma(2.0, 100.0, (3, 50, 40, 1)).astype(np.float32)
  ref, geo, canvas = _spacing_reference(model, volume[..., 0], (1.2, 1.0), per_image=False)
  assert canvas == (96, 64)
  out = loaded.signatures["segment_volume_spacing"](images=tf.constant(volume),
                                                    spacing=tf.constant([1.2, 1.0]))
  _assert_matches(out["probabilities"].numpy(), out["mask"].numpy(), ref)
  # Without a spacing the pixels are taken to be at the target: no resampling.
  ref, geo, _ = _spacing_reference(model, images[..., 0], (TARGET_MM, TARGET_MM))
  assert (geo.resized_height, geo.resized_width) == (45, 70)
  out = loaded.signatures["serving_default"](images=tf.constant(images))
  _assert_matches(out["probabilities"].numpy(), out["mask"].numpy(), ref)


def test_keras_3_tfsm_layer_serves_the_export(exported):
  # Keras 3 users load the SavedModel as a layer (no spineseg code): the same
  # probabilities as the Keras model on the reference preprocessing.
  _, export_dir, model = exported
  images = np.random.default_rng(5).random((2, 40, 28)).astype(np.float32) * 300
  layer = keras.layers.TFSMLayer(str(export_dir), call_endpoint="serving_default")
  out = layer(images[..., None])
  _assert_matches(np.asarray(out["probabilities"]), np.asarray(out["mask"]),
                  _reference(model, images))
  inputs = keras.Input((None, None, 1))
  wrapped = keras.Model(inputs, layer(inputs)["mask"])
  np.testing.assert_array_equal(wrapped.predict(images[..., None], verbose=0),
                                np.asarray(out["mask"]))


# ------------------------------------------------------------------- sliding window

@pytest.fixture(scope="module")
def canvas_dependent(tmp_path_factory):
  """A tiny model at TARGET_MM whose output depends on the size of its input: a group
  normalization (statistics over the whole image) between two convolutions. Run once on
  a grown canvas it differs from the tiles (the fault of issue 19)."""
  root = tmp_path_factory.mktemp("canvas_dependent")
  model_dir = root / "model"
  model_dir.mkdir()
  keras.utils.set_random_seed(7)
  model = keras.Sequential([keras.Input((None, None, 1)),
                            keras.layers.Conv2D(4, 3, padding="same"),
                            keras.layers.GroupNormalization(groups=2),
                            keras.layers.Conv2D(3, 1)])
  model.save(model_dir / "best.keras")
  manifest.write_json_atomic(model_dir / schema.MANIFEST_NAME, manifest.make(
      image_size=S, normalization="percentile", per="image", compression="none",
      splits={}, extra={"target_spacing_mm": TARGET_MM}))
  export_dir = serving.export(model_dir, root / "serving" / "1")
  return tf.saved_model.load(str(export_dir)), model


def test_a_grown_canvas_is_segmented_tile_wise(canvas_dependent):
  loaded, model = canvas_dependent
  rng = np.random.default_rng(8)
  # Pixels at the target: 45 x 70 px on a 64 x 96 canvas, 3 x 5 tiles of 32 px.
  images = rng.gamma(2.0, 100.0, (2, 45, 70, 1)).astype(np.float32)
  ref, _, canvas = _spacing_reference(model, images[..., 0], (TARGET_MM, TARGET_MM))
  assert canvas == (64, 96)
  single, _, _ = _spacing_reference(model, images[..., 0], (TARGET_MM, TARGET_MM),
                                    tiled=False)
  assert np.abs(single - ref).max() > 0.05  # the old single pass would fail below
  out = loaded.signatures["serving_default"](images=tf.constant(images))
  _assert_matches(out["probabilities"].numpy(), out["mask"].numpy(), ref)
  # A volume, resampled: 50 x 40 px at 1.0 x 1.2 mm -> 62 x 60 px on 64 x 64, 3 x 3
  # tiles per slice, 27 in all: two model calls of VOLUME_CHUNK tiles.
  volume = rng.gamma(2.0, 100.0, (3, 50, 40, 1)).astype(np.float32)
  ref, _, canvas = _spacing_reference(model, volume[..., 0], (1.0, 1.2), per_image=False)
  assert canvas == (64, 64) and 3 * 9 > serving.VOLUME_CHUNK
  out = loaded.signatures["segment_volume_spacing"](images=tf.constant(volume),
                                                    spacing=tf.constant([1.0, 1.2]))
  _assert_matches(out["probabilities"].numpy(), out["mask"].numpy(), ref)


def test_a_slice_within_the_square_is_one_pass_unchanged(canvas_dependent):
  loaded, model = canvas_dependent
  images = np.random.default_rng(9).gamma(2.0, 100.0, (2, 20, 30, 1)).astype(np.float32)
  ref, _, canvas = _spacing_reference(model, images[..., 0], (TARGET_MM, TARGET_MM),
                                      tiled=False)
  assert canvas == (S, S)
  out = loaded.signatures["serving_default"](images=tf.constant(images))
  _assert_matches(out["probabilities"].numpy(), out["mask"].numpy(), ref)
  # Bit for bit the runner's own call on the square (no blending rounding). Each path
  # against its own runner: the chunked one pads the batch to VOLUME_CHUNK, and a CPU's
  # convolution kernels may round a batch of 16 and one of 2 an ulp apart (CI, stop 31).
  module = serving.SegmentationModule(model, image_size=S, norm_method="percentile",
                                      target_spacing_mm=TARGET_MM)
  square, _ = module.preprocess(tf.constant(images))
  for chunked, runner in ((False, module._probabilities_square),
                          (True, module._probabilities_chunked)):
    whole = tf.function(lambda x, c=chunked: module._probabilities(x, c))(square)
    once = tf.function(runner)(square)
    np.testing.assert_array_equal(whole.numpy(), once.numpy())
