"""Choosing a labelling protocol downstream (issue 19): an export of a model with one
head per protocol carries every head; the plain signatures segment with the default
protocol exactly as a one-head export of it does, each `_protocol` twin with the head its
`protocol` input names; spine-predict and spine-evaluate take --protocol (and
--protocol=list), ensembles and --tta included; ONNX and LiteRT get a file per protocol.
"""
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import trainer_testdata
from data_prep import manifest
from data_prep import options
from data_prep import schema
from export import evaluate_lib
from export import inference
from export import portable
from export import serving
from trainer import unet

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
SIZE = 32
TARGET_MM = 1.0
PROTOCOLS = ("full", "vb")
# Slices of 20 x 30 px sent at (0.8, 1.3) mm: 39 columns at the target spacing, more
# than the square, so the sliding window runs too.
SPACING = (0.8, 1.3)


def _write_model_dir(path, model):
  path.mkdir(parents=True)
  model.save(path / "best.keras")
  manifest.write_json_atomic(path / schema.MANIFEST_NAME, manifest.make(
      image_size=SIZE, normalization="percentile", per="image", compression="none",
      splits={}, extra={"target_spacing_mm": TARGET_MM}))
  return path


@pytest.fixture(name="exports", scope="module")
def fixture_exports(tmp_path_factory):
  """{"model_dir": the two-head model, "all_<P>": its export with default P, "one_<P>":
  the export of a model of P's head alone (what spine-export gave before protocols)}."""
  root = tmp_path_factory.mktemp("heads")
  keras.utils.set_random_seed(0)
  model = unet.build_unet(base_filters=4, depth=2, norm="group", protocols=PROTOCOLS)
  # Heads that disagree: "full" leans to discs (1), "vb" to vertebrae (2).
  for name, favoured in zip(PROTOCOLS, (1, 2)):
    layer = model.get_layer(schema.head_layer(name))
    kernel, bias = layer.get_weights()
    bias[favoured] += 1.0
    layer.set_weights([kernel, bias])
  out = {"model_dir": _write_model_dir(root / "model", model)}
  for name in PROTOCOLS:
    head, _ = serving.protocol_head(model, None, name)
    one = _write_model_dir(root / f"model_{name}", head)
    out[f"one_{name}"] = serving.export(one, root / f"one_{name}" / "1")
    out[f"all_{name}"] = serving.export(out["model_dir"], root / f"all_{name}" / "1",
                                        protocol=name)
  return out


def _examples():
  rng = np.random.default_rng(3)
  return [schema.make_example(
      rng.normal(size=(SIZE, SIZE)).astype(np.float32), np.zeros((SIZE, SIZE), np.uint8),
      case_id="c", slice_index=i, source="c.png",
      geometry=schema.Geometry(20, 30, 21, SIZE, 5, 0), spacing=[1.0, 1.0],
      norm_method="percentile", norm_offset=0.0, norm_scale=1.0).SerializeToString()
          for i in range(2)]


def _inputs():
  """Inputs for each of `serving.SIGNATURES`."""
  rng = np.random.default_rng(7)
  images = rng.gamma(2.0, 100.0, (2, 20, 30, 1)).astype(np.float32)
  spacing = tf.constant(SPACING, tf.float32)
  pngs = [tf.io.encode_png(tf.constant(images[i].astype(np.uint8))) for i in range(2)]
  return {
      "serving_default": {"images": images},
      "segment_spacing": {"images": images, "spacing": spacing},
      "segment_uint8": {"images": images.clip(0, 255).astype(np.uint8)},
      "segment_uint16": {"images": images.astype(np.uint16)},
      "segment_volume": {"images": images},
      "segment_volume_spacing": {"images": images, "spacing": spacing},
      "segment_png": {"png": tf.stack(pngs)},
      "segment_examples": {"examples": tf.constant(_examples())},
  }


@functools.lru_cache(maxsize=None)
def _load(path):
  """The SavedModel at `path`, loaded once per test process (a load and each signature's
  first call cost seconds)."""
  return tf.saved_model.load(str(path))


def _run_all(path, twin_protocol=None):
  """{signature: {output: array}} of every signature (their twins given a protocol)."""
  signatures = _load(path).signatures
  out = {}
  for name, inputs in _inputs().items():
    if twin_protocol is not None:
      name, inputs = name + serving.PROTOCOL_SUFFIX, dict(inputs, protocol=twin_protocol)
    result = signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
    out[name.removesuffix(serving.PROTOCOL_SUFFIX)] = {
        k: v.numpy() for k, v in result.items()}
  return out


def _assert_bitwise_equal(got, want):
  assert got.keys() == want.keys()
  for name in want:
    assert got[name].keys() == want[name].keys(), name
    for key in want[name]:
      np.testing.assert_array_equal(got[name][key], want[name][key], err_msg=name + key)


def test_default_and_twins_equal_the_one_head_exports_bit_for_bit(exports):
  one = {p: _run_all(exports[f"one_{p}"]) for p in PROTOCOLS}
  assert not np.array_equal(one["full"]["serving_default"]["mask"],
                            one["vb"]["serving_default"]["mask"])  # the heads differ
  for default in PROTOCOLS:
    _assert_bitwise_equal(_run_all(exports[f"all_{default}"]), one[default])
    for p in PROTOCOLS:
      _assert_bitwise_equal(_run_all(exports[f"all_{default}"], p), one[p])


def test_signatures_and_metadata_name_every_protocol(exports):
  twins = [s + "_protocol" for s in serving.SIGNATURES]
  loaded = _load(exports["all_vb"])
  assert sorted(loaded.signatures) == sorted(list(serving.SIGNATURES) + twins)
  twin = loaded.signatures["segment_volume_spacing_protocol"]
  assert sorted(twin.structured_input_signature[1]) == ["images", "protocol", "spacing"]
  metadata = json.loads((exports["all_vb"] / serving.METADATA_FILE).read_text())
  assert metadata["protocol"] == "vb" and metadata["protocols"] == ["full", "vb"]
  assert metadata["signatures"] == list(serving.SIGNATURES) + twins
  # A one-head model: no twins, as before protocols.
  one = _load(exports["one_vb"])
  assert sorted(one.signatures) == sorted(serving.SIGNATURES)
  metadata = json.loads((exports["one_vb"] / serving.METADATA_FILE).read_text())
  assert (metadata["protocol"], metadata["protocols"]) == ("vb", ["vb"])
  assert metadata["signatures"] == list(serving.SIGNATURES)
  assert inference.PROTOCOL_SUFFIX == serving.PROTOCOL_SUFFIX


def test_an_unknown_protocol_fails_in_the_graph_listing_the_names(exports):
  twin = _load(exports["all_full"]).signatures["serving_default_protocol"]
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"unknown protocol: expected one of full, vb; found\] \[thin"):
    twin(images=tf.zeros([1, 20, 30, 1]), protocol=tf.constant("thin"))


def test_loaded_models_know_their_protocols_and_segment_with_any(exports):
  all_full = inference.load_saved_model(exports["all_full"])
  all_vb = inference.load_saved_model(exports["all_vb"])
  one_full = inference.load_saved_model(exports["one_full"])
  assert (all_full.protocols, all_full.protocol) == (("full", "vb"), "full")
  assert (one_full.protocols, one_full.protocol) == (("full",), "full")
  images = _inputs()["serving_default"]["images"][..., 0]
  for kind, spacing in ((inference.SLICES, SPACING), (inference.VOLUME, None)):
    want = all_vb.probabilities(images, spacing, kind=kind)
    got = all_full.probabilities(images, spacing, kind=kind, protocol="vb")
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(all_full.probabilities(images, spacing, kind=kind), want)
  examples = tf.constant(_examples())
  np.testing.assert_array_equal(
      all_full.probabilities(examples, kind=inference.EXAMPLES, protocol="vb"),
      all_vb.probabilities(examples, kind=inference.EXAMPLES))
  # TTA goes through the twin of the spacing signature.
  np.testing.assert_array_equal(
      all_full.probabilities(images, SPACING, tta=True, protocol="vb"),
      all_vb.probabilities(images, SPACING, tta=True))
  with pytest.raises(inference.InputError, match=(
      f"--protocol=thin: the SavedModel {all_full.path} has no head for it; its "
      "protocols are full, vb")):
    all_full.probabilities(images, SPACING, protocol="thin")
  # An ensemble: the protocol's head of every member, refused naming a member without.
  ensemble = inference.Ensemble((all_full, all_vb))
  np.testing.assert_array_equal(ensemble.probabilities(images, SPACING, protocol="vb"),
                                all_vb.probabilities(images, SPACING))
  with pytest.raises(inference.InputError, match=(
      f"the SavedModel {one_full.path} has no head for it; its protocols are full$")):
    inference.Ensemble((all_full, one_full)).probabilities(images, SPACING, protocol="vb")
  assert inference.protocol_used(ensemble, None) == (
      f"{all_full.path}: full, {all_vb.path}: vb")
  assert inference.describe_protocols(ensemble) == [
      f"{all_full.path}: full (default), vb", f"{all_vb.path}: full, vb (default)"]


def test_exports_of_one_head_of_several_offer_that_one_only(exports, tmp_path):
  # spine-export before the twins: one head, its metadata naming all the model's
  # protocols; before protocols: no names at all.
  old, older = tmp_path / "old" / "1", tmp_path / "older" / "1"
  for path, edit in ((old, {"protocols": ["full", "vb"]}),
                     (older, {"protocol": None, "protocols": None})):
    shutil.copytree(exports["one_vb"], path)
    metadata = json.loads((path / serving.METADATA_FILE).read_text())
    metadata.update(edit)
    (path / serving.METADATA_FILE).write_text(json.dumps(
        {k: v for k, v in metadata.items() if v is not None}))
  loaded = inference.load_saved_model(old)
  assert (loaded.protocols, loaded.protocol) == (("vb",), "vb")
  images = np.ones((1, 20, 30), np.float32)
  with pytest.raises(inference.InputError, match="its protocols are vb$"):
    loaded.probabilities(images, SPACING, protocol="full")
  loaded = inference.load_saved_model(older)
  assert (loaded.protocols, loaded.protocol) == ((), None)
  assert inference.describe_protocols(loaded) == [
      f"{older}: no protocol names recorded (exported before protocols)"]
  with pytest.raises(inference.InputError, match="its export records no protocol names"):
    loaded.probabilities(images, SPACING, protocol="vb")
  one_vb = inference.load_saved_model(exports["one_vb"])
  np.testing.assert_array_equal(loaded.probabilities(images, SPACING),
                                one_vb.probabilities(images, SPACING))


def _png(path, array):
  Image.fromarray(array).save(path)


@pytest.fixture(name="folders", scope="module")
def fixture_folders(tmp_path_factory):
  """images/ and masks/ of two 2D slices."""
  root = tmp_path_factory.mktemp("slices")
  rng = np.random.default_rng(5)
  for sub in ("images", "masks"):
    (root / sub).mkdir()
  for i in range(2):
    _png(root / "images" / f"s{i}.png", rng.integers(0, 255, (20, 30), np.uint8))
    _png(root / "masks" / f"s{i}.png", rng.integers(0, 3, (20, 30), np.uint8))
  return root


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300, check=False)


def _one_error_line(proc, command):
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), proc.stderr
  return lines[0][len(f"{command}: error: "):]


def test_spine_predict_writes_the_chosen_heads_masks_and_names_it(exports, folders,
                                                                 tmp_path):
  out = tmp_path / "out"
  proc = _cli("export.predict", f"--saved_model={exports['all_full']}",
              f"--input={folders / 'images'}", f"--output={out}", "--spacing_2d_mm=1",
              "--protocol=vb", "--report", "--nopostprocess")
  assert proc.returncode == 0, proc.stderr[-3000:]
  vb = inference.load_saved_model(exports["all_vb"])
  for i in range(2):
    image = np.asarray(Image.open(folders / "images" / f"s{i}.png"), np.float32)
    want = inference.labels(vb.probabilities(image[None], (1.0, 1.0))[0])
    np.testing.assert_array_equal(np.load(out / f"s{i}_mask.npy"), want)
  assert "<td>protocol</td><td>vb</td>" in (out / "report" / "index.html").read_text()
  message = _one_error_line(
      _cli("export.predict", f"--saved_model={exports['all_full']}",
           f"--input={folders / 'images'}", f"--output={tmp_path / 'x'}",
           "--spacing_2d_mm=1", "--protocol=thin"), "spine-predict")
  assert message == (f"--protocol=thin: the SavedModel {exports['all_full']} has no "
                     "head for it; its protocols are full, vb")
  assert not (tmp_path / "x").exists()
  listed = _cli("export.predict", f"--saved_model={exports['all_full']},"
                f"{exports['one_vb']}", "--protocol=list")  # no --input, --output needed
  assert listed.returncode == 0, listed.stderr[-3000:]
  assert listed.stdout.splitlines() == [f"{exports['all_full']}: full (default), vb",
                                        f"{exports['one_vb']}: vb (default)"]


def test_spine_evaluate_scores_the_chosen_head_and_says_so(exports, folders, tmp_path):
  args = [f"--saved_model={exports['all_full']}", f"--images_dir={folders / 'images'}",
          f"--masks_dir={folders / 'masks'}", "--spacing_2d_mm=1"]
  out_json = tmp_path / "scores.json"
  proc = _cli("export.evaluate", *args, "--protocol=vb", f"--output_json={out_json}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "spine-evaluate: protocol vb" in proc.stdout.splitlines()
  report = json.loads(out_json.read_text())
  want = evaluate_lib.json_safe(evaluate_lib.evaluate_folders(
      inference.load_saved_model(exports["all_vb"]), str(folders / "images"),
      str(folders / "masks"), spacing_2d_mm=(1.0, 1.0), postprocess=True,
      progress=False))
  assert report["protocol"] == want["protocol"] == "vb"
  assert report["cases"] == want["cases"]
  default = evaluate_lib.evaluate_folders(
      inference.load_saved_model(exports["all_full"]), str(folders / "images"),
      str(folders / "masks"), spacing_2d_mm=(1.0, 1.0), progress=False)
  assert default["protocol"] == "full" and default["cases"] != report["cases"]
  message = _one_error_line(_cli("export.evaluate", *args, "--protocol=thin"),
                            "spine-evaluate")
  assert message == (f"--protocol=thin: the SavedModel {exports['all_full']} has no "
                     "head for it; its protocols are full, vb")
  listed = _cli("export.evaluate", f"--saved_model={exports['all_vb']}",
                "--protocol=list")
  assert listed.returncode == 0, listed.stderr[-3000:]
  assert listed.stdout.splitlines() == [f"{exports['all_vb']}: full, vb (default)"]


def test_evaluate_split_scores_the_chosen_head(exports, tmp_path):
  data_dir = pathlib.Path(trainer_testdata.write_dataset(tmp_path / "data", num_train=1,
                                                         num_val=2))
  raw = json.loads((data_dir / schema.MANIFEST_NAME).read_text())
  raw["target_spacing_mm"] = TARGET_MM  # the squares are what the model was made for
  (data_dir / schema.MANIFEST_NAME).write_text(json.dumps(raw))
  all_full = inference.load_saved_model(exports["all_full"])
  got = evaluate_lib.evaluate_split(all_full, str(data_dir), "val", protocol="vb")
  want = evaluate_lib.evaluate_split(inference.load_saved_model(exports["one_vb"]),
                                     str(data_dir), "val")
  assert got["protocol"] == want["protocol"] == "vb" and got["cases"] == want["cases"]
  assert evaluate_lib.evaluate_split(all_full, str(data_dir), "val")["protocol"] == "full"


def test_folders_may_not_be_named_like_the_protocol_words():
  for word in ("list", "all"):
    with pytest.raises(ValueError, match=f"--protocol={word}: a reserved word"):
      options.ConvertOptions(protocol=word)


def test_onnx_and_litert_get_a_file_per_protocol_equal_to_its_twin(exports, tmp_path):
  ort = pytest.importorskip("onnxruntime")
  pytest.importorskip("tf2onnx")
  interpreter = pytest.importorskip("ai_edge_litert.interpreter")
  export_dir = tmp_path / "1"
  shutil.copytree(exports["all_full"], export_dir)
  assert portable.to_onnx(export_dir) == export_dir / "model.onnx"
  litert = portable.to_litert(exports["model_dir"], export_dir)
  assert litert == export_dir / "model.tflite"
  files = {"full": ("model.onnx", "model.tflite"),
           "vb": ("model_vb.onnx", "model_vb.tflite")}
  onnx_paths = portable.protocol_paths(export_dir, portable.ONNX_FILE)
  litert_paths = portable.protocol_paths(export_dir, portable.LITERT_FILE)
  assert {p: (onnx_paths[p].name, litert_paths[p].name) for p in onnx_paths} == files
  twin = tf.saved_model.load(str(export_dir)).signatures["serving_default_protocol"]
  images = _inputs()["serving_default"]["images"]
  for protocol, (onnx_file, litert_file) in files.items():
    want = twin(images=tf.constant(images), protocol=protocol)["probabilities"].numpy()
    session = ort.InferenceSession(str(export_dir / onnx_file),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"images": images})))["probabilities"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=onnx_file)
    runner = interpreter.Interpreter(
        model_path=str(export_dir / litert_file)).get_signature_runner("serving_default")
    got = runner(images=images)["probabilities"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=litert_file)
  with pytest.raises(FileExistsError, match="model_vb.onnx: exists"):
    (export_dir / "model.onnx").unlink()
    portable.to_onnx(export_dir)
