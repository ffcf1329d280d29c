"""The exported model for runtimes other than TensorFlow: ONNX (tf2onnx) and LiteRT.

`to_onnx` converts the SavedModel's `serving_default` signature (raw float32 slices in,
preprocessing in the graph) into `model.onnx` beside it, in the export folder:

  inputs   images         float32 [N, H, W, 1]  raw pixels, any H and W (one size per call)
  outputs  probabilities  float32 [N, H, W, 3]  at the slices' own geometry
           mask           uint8   [N, H, W]     argmax of the probabilities

the same contract as the SavedModel's signature (see export/serving.py); statistics are
per image. The converter is an optional extra: `pip install -e ".[onnx]"`.

`to_litert` writes `model.tflite` with the same contract (LiteRT signature
`serving_default`), rebuilt from the model directory without float64 ops; see its
docstring and README "Serving beyond TensorFlow". Extra: `pip install -e ".[litert]"`.

Protocols. Neither runtime takes a string input easily, so an export of a model with one
head per labelling protocol gets one file per protocol (`protocol_paths`): `model.onnx` /
`model.tflite` segment with the export's default protocol (metadata "protocol"), and
`model_NAME.onnx` / `model_NAME.tflite` with each other protocol NAME of its metadata
"protocols", each equal to the SavedModel's `serving_default_protocol` given NAME.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import tempfile

from data_prep import fileio

ONNX_FILE = "model.onnx"
# Opset 17: the newest that tf2onnx 1.17 maps every op of the graph to; ORT >= 1.13 runs it.
ONNX_OPSET = 17
SIGNATURE = "serving_default"


class MissingExtraError(ImportError):
  """An optional converter is not installed; the message names the pip extra."""

  def __str__(self) -> str:
    return str(self.args[0])


def _require(module: str, what: str, package: str, extra: str) -> None:
  """Imports `module`, or raises MissingExtraError: one line naming the pip extra."""
  try:
    for name in (module.partition(".")[0], module):  # the package, then its module
      importlib.import_module(name)
  except ImportError as e:
    raise MissingExtraError(
        f"{what} export needs {package}, which is not installed ({e}); "
        f'pip install -e ".[{extra}]"') from e


def require_onnx() -> None:
  """Checks that tf2onnx (the ".[onnx]" extra) can be imported.

  Raises:
    MissingExtraError: it cannot; one line naming the extra.
  """
  _require("tf2onnx", "ONNX", "tf2onnx", "onnx")


def onnx_path(export_dir: str | os.PathLike) -> "pathlib.Path | fileio.RemotePath":
  """Where `to_onnx` writes the ONNX model of `export_dir` (a local path or a URL)."""
  return fileio.path(export_dir) / ONNX_FILE


def protocol_paths(export_dir: str | os.PathLike, file_name: str
                   ) -> "dict[str | None, pathlib.Path | fileio.RemotePath]":
  """The files of one runtime for each protocol of the export in `export_dir`.

  Args:
    export_dir: a spine-export version folder.
    file_name: the default protocol's file, ONNX_FILE or LITERT_FILE.

  Returns:
    {the default protocol: `export_dir/file_name`, then for each other protocol NAME
    with a `_protocol` twin (metadata "signatures"): `export_dir/model_NAME.EXT`}; an
    export recording no protocols: {None: `export_dir/file_name`}.
  """
  from export import serving  # pylint: disable=g-import-not-at-top
  export_dir = fileio.path(export_dir)
  meta_path = export_dir / serving.METADATA_FILE
  metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
  default = metadata.get("protocol")
  paths = {default: export_dir / file_name}
  if "serving_default" + serving.PROTOCOL_SUFFIX in metadata.get("signatures", []):
    stem, ext = file_name.split(".", 1)
    paths.update({name: export_dir / f"{stem}_{name}.{ext}"
                  for name in metadata["protocols"] if name != default})
  return paths


def _check_free(paths, overwrite: bool) -> None:
  """Raises FileExistsError for the first of `paths` that exists, unless `overwrite`."""
  for out in paths:
    if out.exists() and not overwrite:
      raise FileExistsError(f"{out}: exists; pass --overwrite to replace it")


def to_onnx(export_dir: str | os.PathLike, *,
            overwrite: bool = False) -> "pathlib.Path | fileio.RemotePath":
  """Converts the SavedModel in `export_dir` to `<export_dir>/model.onnx`.

  An export of several protocol heads also gets `model_NAME.onnx` per other protocol
  (`protocol_paths`). Each file is written atomically (a failed conversion leaves no
  partial model).

  Args:
    export_dir: a spine-export version folder.
    overwrite: replace existing ONNX files.

  Returns:
    The path of model.onnx.

  Raises:
    MissingExtraError: tf2onnx is not installed.
    FileExistsError: an ONNX file exists and `overwrite` is False.
    FileNotFoundError: `export_dir` holds no SavedModel.
    ValueError: the SavedModel has no `serving_default` signature.
  """
  require_onnx()
  export_dir = fileio.path(export_dir)
  _check_free([onnx_path(export_dir)], overwrite)
  if not (export_dir / "saved_model.pb").is_file():
    raise FileNotFoundError(f"{export_dir}: no saved_model.pb; expected a spine-export "
                            "version folder")
  paths = protocol_paths(export_dir, ONNX_FILE)
  _check_free(paths.values(), overwrite)
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from export import serving
  # pylint: enable=g-import-not-at-top
  logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # logs every rewrite at INFO
  loaded = tf.saved_model.load(str(export_dir))
  if SIGNATURE not in loaded.signatures:
    raise ValueError(f"{export_dir}: the SavedModel has no {SIGNATURE!r} signature; "
                     f"found {sorted(loaded.signatures)}")
  default = next(iter(paths))
  # The default's signature as before protocols; another protocol's is the twin with
  # its name a constant. Every one converted before any is written.
  models = {protocol: _onnx_bytes(loaded.signatures[SIGNATURE]) if protocol == default
            else _onnx_bytes(loaded.signatures[SIGNATURE + serving.PROTOCOL_SUFFIX],
                             protocol)
            for protocol in paths}
  for protocol, out in paths.items():
    fileio.write_bytes_atomic(out, models[protocol])
  return paths[default]


def _onnx_bytes(signature, protocol: str | None = None) -> bytes:
  """The ONNX model (serialized) of a signature taking `images` (and `protocol`, given
  here as a constant)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  import tf2onnx
  # pylint: enable=g-import-not-at-top
  spec = (tf.TensorSpec([None, None, None, 1], tf.float32, name="images"),)

  # A tf.function with named inputs and a dict of outputs: the ONNX model gets the
  # signature's names (images -> probabilities, mask).
  @tf.function(input_signature=spec, autograph=False)
  def serve(images):
    if protocol is None:
      return signature(images=images)
    # Made in the graph: a tensor captured from outside would become an ONNX input.
    return signature(images=images, protocol=tf.constant(protocol))

  proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec,
                                           opset=ONNX_OPSET)
  for value in list(proto.graph.input) + list(proto.graph.output):
    for dim, name in zip(value.type.tensor_type.shape.dim, ("N", "H", "W")):
      dim.dim_param = name  # tf2onnx names them unk__NNN
  return proto.SerializeToString()


LITERT_FILE = "model.tflite"


def require_litert() -> None:
  """Checks that ai-edge-litert (the ".[litert]" extra) can be imported.

  Raises:
    MissingExtraError: it cannot; one line naming the extra.
  """
  _require("ai_edge_litert.interpreter", "LiteRT", "ai-edge-litert", "litert")


def litert_path(export_dir: str | os.PathLike) -> "pathlib.Path | fileio.RemotePath":
  """Where `to_litert` writes the LiteRT model of `export_dir` (a local path or a URL)."""
  return fileio.path(export_dir) / LITERT_FILE


def to_litert(model_dir: str | os.PathLike, export_dir: str | os.PathLike, *,
              overwrite: bool = False) -> "pathlib.Path | fileio.RemotePath":
  """Writes `<export_dir>/model.tflite`: `serving_default` of `model_dir`, for LiteRT.

  LiteRT's builtin kernels have no float64 arithmetic and the Python interpreters link
  no Flex (TF Select) delegate, so the SavedModel's graph cannot be converted as it is.
  This one is rebuilt from `model_dir` with `SegmentationModule(..., float64=False)`:
  the same preprocessing and weights, integer geometry and percentile ranks (equal to
  the float64 ones), float32 group statistics summed in stages (probabilities within
  5e-5 of the SavedModel for a trained spine2d model, README). Builtin ops only; inputs
  and outputs as the ONNX model (any H and W: resize the input tensor, or call the
  signature runner). An export of several protocol heads also gets
  `model_NAME.tflite` per other protocol (`protocol_paths`), each rebuilt from that
  protocol's head.

  Args:
    model_dir: the trained model directory `export_dir` was exported from.
    export_dir: a spine-export version folder.
    overwrite: replace existing LiteRT files.

  Returns:
    The path of model.tflite.

  Raises:
    MissingExtraError: ai-edge-litert is not installed.
    FileExistsError: a LiteRT file exists and `overwrite` is False.
    FileNotFoundError, ValueError: see `serving.load_model_dir`; ValueError also when
      the converter refuses the graph (its first line).
  """
  require_litert()
  _check_free([litert_path(export_dir)], overwrite)
  paths = protocol_paths(export_dir, LITERT_FILE)
  _check_free(paths.values(), overwrite)
  # Every protocol converted before any is written: a refused one leaves no file.
  models = {protocol: _litert_bytes(model_dir, protocol) for protocol in paths}
  for protocol, out in paths.items():
    fileio.write_bytes_atomic(out, models[protocol])
  return litert_path(export_dir)


def _litert_bytes(model_dir: str | os.PathLike, protocol: str | None) -> bytes:
  """The LiteRT model (serialized) of `protocol`'s head (None: the only one)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tensorflow.python.framework import convert_to_constants
  from export import serving
  # pylint: enable=g-import-not-at-top
  model, manifest = serving.load_model_dir(model_dir, protocol)
  module = serving.SegmentationModule(
      model, image_size=manifest.image_size, norm_method=manifest.norm_method,
      num_classes=manifest.num_classes, target_spacing_mm=manifest.target_spacing_mm,
      float64=False, drawn=serving.drawn_classes(model_dir, manifest,
                                                [protocol or manifest.protocol]))
  # Weights frozen into constants first: left as resource variables, the converter keeps
  # VAR_HANDLE/READ_VARIABLE ops that LiteRT's interpreter leaves uninitialized (NaN
  # probabilities, measured). tf2onnx freezes with the same TF function.
  serve = module.serve_float32.get_concrete_function()
  frozen = convert_to_constants.convert_variables_to_constants_v2(serve)
  holder = tf.Module()
  # The frozen function returns a flat list; give back the names of the outputs.
  holder.serve = tf.function(
      lambda images: tf.nest.pack_sequence_as(serve.structured_outputs,
                                              tf.nest.flatten(frozen(images))),
      input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="images")],
      autograph=False)
  # Through a SavedModel of that one signature: the .tflite then has a signature runner
  # with the names images -> probabilities, mask (from_concrete_functions loses them).
  with tempfile.TemporaryDirectory(prefix=".litert-") as tmp:
    tf.saved_model.save(holder, tmp, signatures={
        SIGNATURE: holder.serve.get_concrete_function()})
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
      return converter.convert()
    except Exception as e:  # ConverterError and MLIR failures: one line, not a dump
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"{model_dir}: LiteRT cannot convert this model: "
                       f"{first_line}") from e
