"""Physical scale: slices resampled to `--target_spacing_mm`, in the converter and in serving.

What each test proves:
  * the NumPy and TF resampling twins give the same geometry and pixels (pad, crop, and
    the serving graph's grown canvas), eagerly and inside tf.data;
  * a cropped slice still maps back exactly (negative pads in `schema.Geometry`);
  * a volume's spacing survives conversion (dataset.json cases, every example's SPACING,
    the manifest's target_spacing_mm), and the same phantom anatomy written at 0.5 mm and
    at 1.0 mm with different fields of view fills the same number of stored pixels with
    the target spacing, and not without it (so the comparison can fail);
  * 2D images need `--spacing_2d_mm` with a target spacing (convert, predict, evaluate);
  * export + predict keep the input's geometry (shape, affine) and put the mask where it
    belongs when resampling matters: an "erosion" model whose output depends on how many
    millimetres a pixel covers.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import nibabel as nib
from nibabel import orientations
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import export_testlib
from data_prep import manifest
from data_prep import orientation
from data_prep import phantom
from data_prep import preprocess
from data_prep import readers
from data_prep import schema
from data_prep import slices
from data_prep import writer
from export import evaluate_lib
from export import inference
from export import predict_lib
from export import serving

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


# ------------------------------------------------------------------------ the twins

def _numpy_fit(image, spacing, target, size, grow):
  """The converter's NumPy pipeline (divide255), on the square or the grown canvas."""
  h, w = image.shape
  norm = preprocess.apply_normalization(image, "divide255", 0.0, 255.0)
  if grow:
    rh, rw = preprocess.resampled_size(h, w, spacing, target)
    canvas = preprocess.grown_canvas(rh, rw, size)
    geo = preprocess.place_geometry(h, w, rh, rw, *canvas)
  else:
    canvas = size
    geo = preprocess.spacing_geometry(h, w, spacing, target, size)
  return preprocess.fit_image(norm, geo, canvas, 0.0), geo


def _tf_fit(images, spacing, target, size, grow):
  geo = preprocess.tf_spacing_geometry(tf.shape(images)[1], tf.shape(images)[2], spacing,
                                       target, size, grow=grow)
  norm = preprocess.tf_apply_normalization(images, "divide255", 0.0, 255.0)
  return preprocess.tf_fit_images(norm, geo, size, tf.zeros([1, 1, 1, 1])), geo


@pytest.mark.parametrize("shape,spacing,target,size,grow", [
    ((60, 90), (0.5, 0.5), 1.0, 32, False),     # halved, padded
    ((100, 41), (0.9, 1.3), 1.0, 48, False),    # anisotropic; rows cropped (90 > 48)
    ((37, 200), (1.1, 0.7), 0.8, 64, False),    # columns cropped (175 > 64)
    ((45, 45), None, 1.25, 64, False),          # no spacing: already at the target
    ((300, 120), (0.8, 0.9), 1.0, 64, True),    # serving: canvas 256 x 128
    ((64, 64), (1.0, 1.0), 1.0, 64, True),      # exactly the square
])
def test_resampling_twins_match_eager_and_in_tf_data(shape, spacing, target, size, grow):
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, shape).astype(np.float32)
  expected, geo = _numpy_fit(image, spacing, target, size, grow)
  if spacing is not None:
    want = np.round(np.array(shape) * np.float32(spacing).astype(np.float64) / target)
    assert (geo.resized_height, geo.resized_width) == tuple(want.astype(int))
  if not grow:
    assert expected.shape == (size, size)
  tf_spacing = None if spacing is None else tf.constant(spacing, tf.float32)
  eager, tf_geo = _tf_fit(tf.constant(image[None, :, :, None]), tf_spacing, target, size,
                          grow)
  assert [int(tf_geo[k]) for k in ("resized_height", "resized_width", "pad_top",
                                   "pad_left")] == [geo.resized_height, geo.resized_width,
                                                    geo.pad_top, geo.pad_left]
  # float32 rounding order differs between the resizes: ~1e-5 on values in [0, 1].
  np.testing.assert_allclose(eager.numpy()[0, :, :, 0], expected, atol=2e-5)
  ds = tf.data.Dataset.from_tensors(image[None, :, :, None]).map(
      lambda x: _tf_fit(x, tf_spacing, target, size, grow)[0])
  np.testing.assert_allclose(next(iter(ds)).numpy()[0, :, :, 0], expected, atol=2e-5)


def test_a_cropped_slice_maps_back_exactly():
  # 80 x 50 px already at the target spacing into a 64 square: 8 rows cut at the top and
  # at the bottom, 7 columns of padding left and right (negative / positive pads).
  h, w, size = 80, 50, 64
  geo = preprocess.spacing_geometry(h, w, (1.0, 1.0), 1.0, size)
  assert (geo.resized_height, geo.resized_width, geo.pad_top, geo.pad_left) == (80, 50, -8,
                                                                                 7)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ramp = (rows * 1000 + cols).astype(np.float32)
  stored = preprocess.fit_image(ramp, geo, size, -1.0)
  np.testing.assert_array_equal(stored[:, 7:57], ramp[8:72])
  assert (stored[:, :7] == -1).all() and (stored[:, 57:] == -1).all()
  valid = schema.valid_region(tf.constant([h, w, 80, 50, -8, 7]), size, size).numpy()
  assert valid[:, 7:57].all() and not valid[:, :7].any() and not valid[:, 57:].any()
  fields = {k: tf.constant(v) for k, v in
            zip(("resized_height", "resized_width", "pad_top", "pad_left"), (80, 50, -8, 7))}
  back = preprocess.tf_unfit(tf.constant(stored[None, :, :, None]), fields, h, w,
                             fill=tf.constant([-5.0])).numpy()[0, :, :, 0]
  np.testing.assert_array_equal(back[8:72], ramp[8:72])  # what the square kept, exactly
  assert (back[:8] == -5).all() and (back[72:] == -5).all()  # the cut rows: the fill


# ------------------------------------------------------------------- the converter

def _display_nifti(display, spacing_rc, thickness=3.0, codes="RAS"):
  """A NIfTI image of a display-order [S, H, W] array (R, I, P), stored as `codes`."""
  row, col = spacing_rc
  affine = np.eye(4)
  affine[:3, :3] = np.array([[thickness, 0, 0], [0, 0, -row], [0, -col, 0]]).T
  img = nib.Nifti1Image(np.ascontiguousarray(display), affine)
  start = orientations.io_orientation(affine)
  return img.as_reoriented(orientations.ornt_transform(start,
                                                       orientations.axcodes2ornt(codes)))


def _phantom_volume(anatomy, pixels, pad, dtype=np.uint16):
  """Three sagittal slices of `anatomy` rendered at `pixels` px, then `pad` px of air."""
  zeros = tuple(np.zeros((pixels, pixels), np.float32) for _ in range(3))
  images, labels = [], []
  for lr in (-3.0, 0.0, 3.0):
    img, lab = phantom.render(anatomy, pixels, pixels, zeros, lr_mm=lr)
    images.append(np.pad(img * 1000 + 50, ((0, pad), (0, pad))))
    labels.append(np.pad(lab, ((0, pad), (0, pad))))
  return np.stack(images).astype(dtype), np.stack(labels).astype(np.uint8)


def _stored(data_dir):
  """(manifest, {case id: [parsed example, ...]}) of every split of a converted dataset."""
  m = manifest.load(data_dir)
  out = {}
  for split in schema.SPLITS:
    for path in m.files(split):
      for record in tf.data.TFRecordDataset(path):
        f = schema.parse_example(record, m.image_size)
        out.setdefault(f["case_id"].numpy().decode(), []).append(f)
  return m, out


def test_phantom_at_two_spacings_converts_to_the_same_mm_per_pixel(tmp_path):
  # One anatomy, 120 mm square: at 0.5 mm (240 px, RAS), and at 1.0 mm (120 px) with 60 px
  # of air added (a 180 mm field of view, stored I,P,R). Longer-side fitting into 192 px
  # would give 0.625 and 0.9375 mm per pixel: 2.25x the vertebra pixels in one of them.
  anatomy = phantom.sample_anatomy(np.random.default_rng(5), 120.0, 120.0)
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  for name, pixels, pad, spacing, codes in (("fine", 240, 0, 0.5, "RAS"),
                                            ("coarse", 120, 60, 1.0, "IPR")):
    vol, lab = _phantom_volume(anatomy, pixels, pad)
    nib.save(_display_nifti(vol, (spacing, spacing), codes=codes), images / f"{name}.nii.gz")
    nib.save(_display_nifti(lab, (spacing, spacing), codes=codes), masks / f"{name}.nii.gz")

  def vertebra_pixels(target):
    out = tmp_path / f"out-{target}"
    writer.convert_dataset(images, masks, out,
                           writer.ConvertOptions(required_labels=[], image_size=192,
                                                 val_fraction=0.0, num_workers=1,
                                                 target_spacing_mm=target),
                           progress=False, log=lambda _: None)
    m, stored = _stored(out)
    return m, stored, {cid: sum(int(np.sum(f["mask"].numpy() == 2)) for f in examples)
                       for cid, examples in stored.items()}

  m, stored, counts = vertebra_pixels(1.0)
  assert m.target_spacing_mm == 1.0 and m.raw["flags"]["target_spacing_mm"] == 1.0
  spacing = {c["id"]: c["spacing"] for c in m.cases}
  assert spacing == {"fine": [0.5, 0.5], "coarse": [1.0, 1.0]}
  for cid, examples in stored.items():
    assert len(examples) == 3
    for f in examples:  # the ORIGINAL slice spacing, in every example
      np.testing.assert_allclose(f["spacing"].numpy(), spacing[cid])
      # 120 mm (coarse: 180 mm) at 1 mm per pixel, centred in the square.
      geo = f["geometry"].numpy().tolist()
      assert geo[2:4] == ([120, 120] if cid == "fine" else [180, 180])
  assert counts["coarse"] > 1000
  assert counts["fine"] == pytest.approx(counts["coarse"], rel=0.03)
  # Without a target spacing the same inputs disagree: the test above can fail.
  m, _, counts = vertebra_pixels(None)
  assert m.target_spacing_mm is None
  assert counts["fine"] / counts["coarse"] == pytest.approx(2.25, rel=0.1)


def test_2d_images_need_their_spacing_with_a_target_spacing(tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  image = np.full((40, 30), 90, np.uint8)
  image[10:20, 5:25] = 250
  Image.fromarray(image).save(images / "a.png")
  np.save(masks / "a.npy", (image > 100).astype(np.int64) * 2)
  with pytest.raises(writer.ConversionError, match="pass --spacing_2d_mm"):
    writer.convert_dataset(images, masks, tmp_path / "out",
                           writer.ConvertOptions(required_labels=[], image_size=32,
                                                 num_workers=1, target_spacing_mm=1.0),
                           progress=False)
  assert not (tmp_path / "out").exists()
  # The worker refuses too (process_case is also a library function).
  result = slices.process_case(str(images / "a.png"), str(masks / "a.npy"), image_size=32,
                               normalization="percentile", required_labels=[],
                               label_map={}, target_spacing_mm=1.0)
  assert result.fatal and "--spacing_2d_mm" in result.fatal and str(images) in result.fatal
  # With it: 0.5 x 1.0 mm pixels become 20 x 30 px at 1 mm, stored with the spacing.
  writer.convert_dataset(images, masks, tmp_path / "out",
                         writer.ConvertOptions(required_labels=[], image_size=32,
                                               val_fraction=0.0, num_workers=1,
                                               target_spacing_mm=1.0,
                                               spacing_2d_mm=(0.5, 1.0)),
                         progress=False)
  m, stored = _stored(tmp_path / "out")
  (f,) = stored["a"]
  np.testing.assert_allclose(f["spacing"].numpy(), [0.5, 1.0])
  assert f["geometry"].numpy().tolist() == [40, 30, 20, 30, 6, 1]
  assert m.raw["flags"]["spacing_2d_mm"] == [0.5, 1.0]
  assert int(np.sum(f["mask"].numpy() == 2)) == 5 * 20  # 10 x 20 px at 0.5 x 1.0 mm
  assert writer.cropped_cases(m) == ([], 32, 32.0)
  assert "warning" not in writer.format_summary(m.raw)
  # A square smaller than the resampled slice (30 px wide at 1 mm) crops it: said, with
  # the --image_size that keeps it whole.
  writer.convert_dataset(images, masks, tmp_path / "small",
                         writer.ConvertOptions(required_labels=[], image_size=16,
                                               val_fraction=0.0, num_workers=1,
                                               target_spacing_mm=1.0,
                                               spacing_2d_mm=(0.5, 1.0)),
                         progress=False)
  m, _ = _stored(tmp_path / "small")
  assert writer.cropped_cases(m) == (["a"], 30, 30.0)
  warning = writer.format_summary(m.raw).splitlines()[-1]
  assert warning.startswith("  warning: 1 case is larger than the square (16 px at 1 mm = "
                            "16 mm), centre-cropped, their edges never trained on: a;")
  assert "a; they need 30 px (30 mm): --image_size=32 keeps them whole" in warning
  # The binary says it in one line and exits non-zero.
  proc = subprocess.run(
      [sys.executable, "-m", "data_prep.convert", f"--images_dir={images}",
       f"--masks_dir={masks}", f"--output_dir={tmp_path / 'cli'}", "--target_spacing_mm=1",
       "--num_workers=1"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("spine-convert: error:")]
  assert len(lines) == 1 and "--spacing_2d_mm" in lines[0] and str(images) in lines[0]


def test_spacing_flag_grammar():
  assert readers.parse_spacing_mm("0.9") == (0.9, 0.9)
  assert readers.parse_spacing_mm(" 0.5,1.25 ") == (0.5, 1.25)
  assert readers.parse_spacing_mm(None) is None and readers.parse_spacing_mm("") is None
  for bad in ("0", "-1", "a", "1,2,3", "nan", "1,"):
    with pytest.raises(ValueError, match="--spacing_2d_mm"):
      readers.parse_spacing_mm(bad)
  with pytest.raises(ValueError, match="target_spacing_mm"):
    manifest.make(image_size=32, normalization="divide255", per="image",
                  compression="none", splits={}, extra={"target_spacing_mm": -1.0})


# ----------------------------------------------------------- export and prediction

SIZE = 32
TARGET = 1.0
K = 5          # the erosion window, in target pixels
GAIN = 1000.0  # logit per unit of window mean: a window with one dark pixel scores -20


def _erosion_model_dir(path: pathlib.Path) -> pathlib.Path:
  """A model whose output depends on physical scale: class 2 where a K x K window of the
  target-spacing image is fully bright (divide255: 1.0), i.e. a bright square eroded by
  K // 2 target pixels on every side; class 0 elsewhere; class 1 never."""
  path.mkdir(parents=True)
  model = keras.Sequential([keras.Input((None, None, 1)),
                            keras.layers.Conv2D(3, K, padding="same")])
  kernel = np.zeros((K, K, 1, 3), np.float32)
  kernel[..., 2] = GAIN / K ** 2
  model.layers[0].set_weights([kernel, np.array([0.0, -GAIN, -GAIN * 0.98], np.float32)])
  model.save(path / "best.keras")
  manifest.write_json_atomic(path / schema.MANIFEST_NAME, manifest.make(
      image_size=SIZE, normalization="divide255", per="image", compression="none",
      splits={}, extra={"target_spacing_mm": TARGET}))
  return path


@pytest.fixture(scope="module")
def erosion(tmp_path_factory):
  root = tmp_path_factory.mktemp("erosion")
  return export_testlib.export_and_load(_erosion_model_dir(root / "model"),
                                        root / "serving" / "1")


def _square(shape, rows, cols):
  image = np.zeros(shape, np.uint8)
  image[rows[0]:rows[1], cols[0]:cols[1]] = 255
  return image


def _box_mask(shape, rows, cols):
  mask = np.zeros(shape, np.uint8)
  mask[rows[0]:rows[1], cols[0]:cols[1]] = 2
  return mask


# A 10 x 10 mm bright square. At 1 mm it is 10 target pixels; eroded by 2 on each side, 6
# remain, centred on the square: 12 rows of 0.5 mm, 24 columns of 0.25 mm.
SLICE_2D = ((40, 40), (10, 30), (10, 30))            # 0.5 x 0.5 mm
EXPECTED_2D = ((14, 26), (14, 26))
SLICE_3D = ((40, 80), (10, 30), (20, 60))            # 0.5 x 0.25 mm
EXPECTED_3D = ((14, 26), (28, 52))


def _expected_3d() -> np.ndarray:
  """EXPECTED_3D's box less its 4 corners: upsampling the 6 x 6 block bilinearly, the edge
  rows keep weight 0.75 and the edge columns 0.625, so a corner holds 0.47 < 0.5."""
  mask = _box_mask(SLICE_3D[0], *EXPECTED_3D)
  (r0, r1), (c0, c1) = EXPECTED_3D
  for r in (r0, r1 - 1):
    for c in (c0, c1 - 1):
      mask[r, c] = 0
  return mask


def test_export_records_the_target_spacing(erosion, tmp_path):
  assert erosion.target_spacing_mm == TARGET
  assert erosion.metadata["target_spacing_mm"] == TARGET
  for name in ("segment_spacing", "segment_volume_spacing"):
    assert name in erosion.module.signatures
  # Without assets.extra the loader reads it from the graph's variable.
  bare = tmp_path / "bare"
  shutil.copytree(erosion.path, bare)
  (bare / serving.METADATA_FILE).unlink()
  assert inference.load_saved_model(bare).target_spacing_mm == TARGET


def test_2d_prediction_resamples_and_maps_back(erosion):
  shape, rows, cols = SLICE_2D
  image = _square(shape, rows, cols)
  x = tf.constant(image[None, :, :, None].astype(np.float32))
  signatures = erosion.module.signatures
  out = signatures["segment_spacing"](images=x, spacing=tf.constant([0.5, 0.5]))
  assert out["probabilities"].shape == (1, 40, 40, 3)
  np.testing.assert_array_equal(out["mask"].numpy()[0], _box_mask(shape, *EXPECTED_2D))
  # serving_default takes the pixels to be at the target spacing already: 20 px = 20 mm,
  # eroded by 2 px, a different mask (so the one above is not the model's only answer).
  plain = signatures["serving_default"](images=x)["mask"].numpy()[0]
  np.testing.assert_array_equal(plain, _box_mask(shape, (12, 28), (12, 28)))
  # So do the other pixel signatures (on a canvas grown to 64 x 64 for 40 px).
  u8 = signatures["segment_uint8"](images=tf.constant(image[None, :, :, None]))
  np.testing.assert_array_equal(u8["mask"].numpy()[0], plain)
  png = signatures["segment_png"](png=tf.stack([tf.io.encode_png(image[..., None])]))
  np.testing.assert_array_equal(png["mask"].numpy()[0], plain)
  with pytest.raises(tf.errors.InvalidArgumentError, match="positive"):
    signatures["segment_spacing"](images=x, spacing=tf.constant([0.5, 0.0]))


def test_predict_cli_keeps_geometry_and_puts_the_mask_in_place(erosion, tmp_path):
  inputs, out = tmp_path / "in", tmp_path / "out"
  inputs.mkdir()
  shape, rows, cols = SLICE_2D
  Image.fromarray(_square(shape, rows, cols)).save(inputs / "slice.png")
  shape3, rows3, cols3 = SLICE_3D
  display = np.stack([_square(shape3, rows3, cols3)] * 3)
  src = _display_nifti(display, (0.5, 0.25), codes="IPR")  # scanner order on disk
  nib.save(src, inputs / "vol.nii.gz")
  proc = subprocess.run(
      [sys.executable, "-m", "export.predict", f"--saved_model={erosion.path}",
       f"--input={inputs}", f"--output={out}", "--spacing_2d_mm=0.5"], cwd=REPO, env=ENV,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  mask = np.asarray(Image.open(out / "slice_mask.png"))
  np.testing.assert_array_equal(mask, _box_mask(shape, *EXPECTED_2D))
  pred = nib.load(out / "vol_mask.nii.gz")
  assert pred.shape == src.shape and pred.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(pred.affine, src.affine)
  back, _ = orientation.to_display(np.asarray(pred.dataobj), pred.affine)
  np.testing.assert_array_equal(back, np.stack([_expected_3d()] * 3))


def test_2d_inputs_without_spacing_are_refused_for_such_a_model(erosion, tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  shape, rows, cols = SLICE_2D
  Image.fromarray(_square(shape, rows, cols)).save(images / "a.png")
  np.save(masks / "a.npy", _box_mask(shape, *EXPECTED_2D).astype(np.int64))
  _, failures = predict_lib.predict(erosion, images, tmp_path / "out", progress=False)
  assert len(failures) == 1
  assert failures[0][1].startswith(str(images / "a.png")) and "--spacing_2d_mm" in \
      failures[0][1]
  report = evaluate_lib.evaluate_folders(erosion, images, masks, progress=False)
  assert not report["cases"] and "--spacing_2d_mm" in report["failures"][0]
  report = evaluate_lib.evaluate_folders(erosion, images, masks, progress=False,
                                         spacing_2d_mm=(0.5, 0.5))
  assert report["cases"][0]["dice"]["dice_vertebra"] == 1.0


def test_evaluate_volume_and_converted_examples_in_original_geometry(erosion, tmp_path):
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  # 100 rows x 40 columns at 0.5 mm: 50 x 20 px at 1 mm, cropped to 32 rows in the square.
  shape, rows, cols = (100, 40), (40, 60), (10, 30)
  display = np.stack([_square(shape, rows, cols)] * 2)
  truth = np.stack([_box_mask(shape, (44, 56), (14, 26))] * 2)
  nib.save(_display_nifti(display, (0.5, 0.5)), images / "v.nii.gz")
  nib.save(_display_nifti(truth, (0.5, 0.5)), masks / "v.nii.gz")
  report = evaluate_lib.evaluate_folders(erosion, images, masks, progress=False)
  assert not report["failures"]
  assert report["cases"][0]["dice"]["dice_vertebra"] == 1.0
  # The converter's cropped examples through segment_examples: the original geometry
  # comes back, the mask in place, the 9 + 9 cut rows background.
  result = slices.process_case(str(images / "v.nii.gz"), str(masks / "v.nii.gz"),
                               image_size=SIZE, normalization="divide255",
                               required_labels=[], label_map={}, target_spacing_mm=TARGET)
  assert not result.error and not result.fatal and len(result.examples) == 2
  out = erosion.module.signatures["segment_examples"](
      examples=tf.constant([b for _, b in result.examples]))
  f = schema.parse_example(result.examples[0][1], SIZE)
  assert f["geometry"].numpy().tolist() == [100, 40, 50, 20, -9, 6]
  np.testing.assert_array_equal(out["original_height"].numpy(), [100, 100])
  np.testing.assert_array_equal(out["original_width"].numpy(), [40, 40])
  np.testing.assert_array_equal(out["original_mask"].numpy(), truth)
  # A dataset converted at another spacing is refused by name.
  data_dir = tmp_path / "data"
  writer.convert_dataset(images, masks, data_dir,
                         writer.ConvertOptions(required_labels=[], image_size=SIZE,
                                               normalization="divide255", val_fraction=0.0,
                                               num_workers=1, target_spacing_mm=0.5),
                         progress=False)
  with pytest.raises(ValueError, match="converted at 0.5 mm per pixel, the SavedModel .* was "
                                       "trained at 1 mm per pixel"):
    evaluate_lib.evaluate_split(erosion, data_dir, "train")
