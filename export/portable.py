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
"""
from __future__ import annotations

import importlib
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


def to_onnx(export_dir: str | os.PathLike, *,
            overwrite: bool = False) -> "pathlib.Path | fileio.RemotePath":
  """Converts the SavedModel in `export_dir` to `<export_dir>/model.onnx`.

  The file is written atomically (a failed conversion leaves no partial model).

  Args:
    export_dir: a spine-export version folder.
    overwrite: replace an existing model.onnx.

  Returns:
    The path of model.onnx.

  Raises:
    MissingExtraError: tf2onnx is not installed.
    FileExistsError: model.onnx exists and `overwrite` is False.
    FileNotFoundError: `export_dir` holds no SavedModel.
    ValueError: the SavedModel has no `serving_default` signature.
  """
  require_onnx()
  export_dir = fileio.path(export_dir)
  out = onnx_path(export_dir)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out}: exists; pass --overwrite to replace it")
  if not (export_dir / "saved_model.pb").is_file():
    raise FileNotFoundError(f"{export_dir}: no saved_model.pb; expected a spine-export "
                            "version folder")
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  import tf2onnx
  # pylint: enable=g-import-not-at-top
  logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # logs every rewrite at INFO
  loaded = tf.saved_model.load(str(export_dir))
  if SIGNATURE not in loaded.signatures:
    raise ValueError(f"{export_dir}: the SavedModel has no {SIGNATURE!r} signature; "
                     f"found {sorted(loaded.signatures)}")
  signature = loaded.signatures[SIGNATURE]
  spec = (tf.TensorSpec([None, None, None, 1], tf.float32, name="images"),)

  # A tf.function with named inputs and a dict of outputs: the ONNX model gets the
  # signature's names (images -> probabilities, mask).
  @tf.function(input_signature=spec)
  def serve(images):
    return signature(images=images)

  proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec,
                                           opset=ONNX_OPSET)
  for value in list(proto.graph.input) + list(proto.graph.output):
    for dim, name in zip(value.type.tensor_type.shape.dim, ("N", "H", "W")):
      dim.dim_param = name  # tf2onnx names them unk__NNN
  data = proto.SerializeToString()

  return fileio.write_bytes_atomic(out, data)


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
              overwrite: bool = False,
              protocol: str | None = None) -> "pathlib.Path | fileio.RemotePath":
  """Writes `<export_dir>/model.tflite`: `serving_default` of `model_dir`, for LiteRT.

  LiteRT's builtin kernels have no float64 arithmetic and the Python interpreters link
  no Flex (TF Select) delegate, so the SavedModel's graph cannot be converted as it is.
  This one is rebuilt from `model_dir` with `SegmentationModule(..., float64=False)`:
  the same preprocessing and weights, integer geometry and percentile ranks (equal to
  the float64 ones), float32 group statistics summed in stages (probabilities within
  5e-5 of the SavedModel for a trained spine2d model, README). Builtin ops only; inputs
  and outputs as the ONNX model (any H and W: resize the input tensor, or call the
  signature runner).

  Args:
    model_dir: the trained model directory `export_dir` was exported from.
    export_dir: a spine-export version folder.
    overwrite: replace an existing model.tflite.
    protocol: the protocol head `export_dir` was exported with (`serving.export`).

  Returns:
    The path of model.tflite.

  Raises:
    MissingExtraError: ai-edge-litert is not installed.
    FileExistsError: model.tflite exists and `overwrite` is False.
    FileNotFoundError, ValueError: see `serving.load_model_dir`; ValueError also when
      the converter refuses the graph (its first line).
  """
  require_litert()
  out = litert_path(export_dir)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out}: exists; pass --overwrite to replace it")
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tensorflow.python.framework import convert_to_constants
  from export import serving
  # pylint: enable=g-import-not-at-top
  model, manifest = serving.load_model_dir(model_dir, protocol)
  module = serving.SegmentationModule(
      model, image_size=manifest.image_size, norm_method=manifest.norm_method,
      num_classes=manifest.num_classes, target_spacing_mm=manifest.target_spacing_mm,
      float64=False)
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
      input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="images")])
  # Through a SavedModel of that one signature: the .tflite then has a signature runner
  # with the names images -> probabilities, mask (from_concrete_functions loses them).
  with tempfile.TemporaryDirectory(prefix=".litert-") as tmp:
    tf.saved_model.save(holder, tmp, signatures={
        SIGNATURE: holder.serve.get_concrete_function()})
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
      data = converter.convert()
    except Exception as e:  # ConverterError and MLIR failures: one line, not a dump
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"{model_dir}: LiteRT cannot convert this model: "
                       f"{first_line}") from e

  return fileio.write_bytes_atomic(out, data)
