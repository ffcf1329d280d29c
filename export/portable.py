"""The exported model for runtimes other than TensorFlow: ONNX (tf2onnx).

`to_onnx` converts the SavedModel's `serving_default` signature (raw float32 slices in,
preprocessing in the graph) into `model.onnx` beside it, in the export folder:

  inputs   images         float32 [N, H, W, 1]  raw pixels, any H and W (one size per call)
  outputs  probabilities  float32 [N, H, W, 3]  at the slices' own geometry
           mask           uint8   [N, H, W]     argmax of the probabilities

the same contract as the SavedModel's signature (see export/serving.py); statistics are
per image. The converter is an optional extra: `pip install -e ".[onnx]"`.

LiteRT is not offered: see README "Serving beyond TensorFlow" for the measured reason.
"""
from __future__ import annotations

import logging
import os
import pathlib

from data_prep import fileio

ONNX_FILE = "model.onnx"
# Opset 17: the newest that tf2onnx 1.17 maps every op of the graph to; ORT >= 1.13 runs it.
ONNX_OPSET = 17
SIGNATURE = "serving_default"


class MissingExtraError(ImportError):
  """An optional converter is not installed; the message names the pip extra."""

  def __str__(self) -> str:
    return str(self.args[0])


def require_onnx() -> None:
  """Checks that tf2onnx (the ".[onnx]" extra) can be imported.

  Raises:
    MissingExtraError: it cannot; one line naming the extra.
  """
  try:
    import tf2onnx  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise MissingExtraError(
        f"ONNX export needs tf2onnx, which is not installed ({e}); "
        'pip install -e ".[onnx]"') from e


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

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(data)

  return fileio.atomic_write(out, write)
