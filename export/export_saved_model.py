"""Exports a trained model directory as a self-contained SavedModel for serving.

  spine-export --model_dir=runs/seed --export_dir=models/spineseg/1
  spine-export --model_dir=runs/seed --export_dir=models/spineseg/1 --onnx  # + model.onnx
  spine-export --model_dir=runs/seed --export_dir=models/spineseg/1 --litert  # + .tflite
  spine-export --model_dir=runs/heads --export_dir=models/thin_discs/1 --protocol=thin_discs

`--export_dir` is a numbered version folder (TF Serving's layout: base path / version).
The SavedModel needs only TensorFlow to load; see `export/serving.py` for its signatures.
`--onnx` also writes `model.onnx` (its `serving_default`, for ONNX Runtime) into the
version folder; see `export/portable.py`. `--litert` also writes `model.tflite` (the same
signature rebuilt without float64 ops, for LiteRT), there too.
A model trained on several labelling protocols (one output head each) is exported with
every head: `--protocol=NAME` names the DEFAULT protocol, the one the signatures segment
with, and each signature S gets a twin `S_protocol` with a `protocol` string input that
picks any head (export/serving.py). The metadata (assets.extra/spineseg.json) records
"protocol" (the default), "protocols" (every name, in head order) and "signatures" (the
twins included). `--onnx` / `--litert` then write `model.onnx` / `model.tflite` for the
default and `model_NAME.onnx` / `model_NAME.tflite` for each other protocol NAME.
"""
from __future__ import annotations

import json
import pathlib

from absl import app
from absl import flags
from absl import logging

from data_prep import cli  # first: it quiets TensorFlow before anything loads it

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, help="Trained model directory holding best.keras and dataset.json.",
    required=True)
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None,
    help="Version folder to write, e.g. models/spineseg/1 (last component a positive "
    "integer, as TF Serving expects).", required=True)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, help="Replace an existing non-empty --export_dir.")
_ONNX = flags.DEFINE_bool(
    "onnx", False, help="Also write model.onnx (the serving_default signature, converted "
    'by tf2onnx) into --export_dir; needs pip install -e ".[onnx]".')
_PROTOCOL = flags.DEFINE_string(
    "protocol", None, help="The default labelling protocol (spine-convert --protocol) of "
    "a model trained with one head per protocol (required there; an error lists the "
    "names): the plain signatures segment with its head, their _protocol twins with any "
    "head named in their protocol input. Every head is exported. A one-protocol model "
    "needs none.")
_LITERT = flags.DEFINE_bool(
    "litert", False, help="Also write model.tflite (the serving_default signature for "
    "LiteRT, builtin ops only) into --export_dir; needs pip install -e \".[litert]\".")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  version = pathlib.Path(_EXPORT_DIR.value).name
  if not version.isdigit() or int(version) < 1:
    raise app.UsageError(
        f"--export_dir={_EXPORT_DIR.value}: the last folder must be a version number "
        f"(e.g. {_EXPORT_DIR.value}/1), found {version!r}")
  logging.set_verbosity(logging.WARNING)  # SavedModel writing logs every step at INFO
  # Imported here so that --help and flag errors do not pay for loading TensorFlow.
  from export import portable  # pylint: disable=g-import-not-at-top
  onnx = litert = None
  try:
    if _ONNX.value:
      portable.require_onnx()  # before the export: a missing extra costs nothing
    if _LITERT.value:
      portable.require_litert()
    from export import serving  # pylint: disable=g-import-not-at-top
    out = serving.export(_MODEL_DIR.value, _EXPORT_DIR.value, overwrite=_OVERWRITE.value,
                         protocol=_PROTOCOL.value)
    if _ONNX.value:
      onnx = portable.to_onnx(out, overwrite=_OVERWRITE.value)
    if _LITERT.value:
      litert = portable.to_litert(_MODEL_DIR.value, out, overwrite=_OVERWRITE.value)
  # Ours name the path; raw OS errors get it added.
  except (OSError, ValueError, portable.MissingExtraError) as e:
    if isinstance(e, OSError) and e.strerror:
      message = f"{e.filename or _EXPORT_DIR.value}: {e.strerror}"
    else:
      message = str(e)
    cli.fail(message)
  head = f"protocol {_PROTOCOL.value}, " if _PROTOCOL.value else ""
  # A model of several heads also has the _protocol twins, and a file of each other
  # protocol beside model.onnx / model.tflite.
  signatures = json.loads((out / serving.METADATA_FILE).read_text())["signatures"]
  print(f"spine-export: wrote SavedModel to {out} ({head}signatures: "
        f"{', '.join(signatures)})")
  for written, file_name in ((onnx, portable.ONNX_FILE), (litert, portable.LITERT_FILE)):
    if written is None:
      continue
    print(f"spine-export: wrote {written} (serving_default: images -> probabilities, "
          "mask)")
    for protocol, path in list(portable.protocol_paths(out, file_name).items())[1:]:
      print(f"spine-export: wrote {path} (the same for protocol {protocol})")


def run():
  cli.run(main)  # --help lists this module's flags, also as a console script


if __name__ == "__main__":
  run()
