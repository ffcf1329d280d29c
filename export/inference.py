"""Running an exported SavedModel on files: loading, reading inputs, batching.

Shared by `spine-predict` and `spine-evaluate`. Uses only the SavedModel's signatures
(never the training code): `serving_default` for 2D slices, `segment_volume` for the
slices of one NIfTI volume (normalization statistics over the whole volume, as the
converter computes them). A model trained at a target spacing (`spine-convert
--target_spacing_mm`) gets each input's in-plane spacing through `segment_spacing` /
`segment_volume_spacing` (NIfTI: from the affine, in display order; 2D files: the
caller's `--spacing_2d_mm`, without which a 2D input is refused for such a model).

A loaded model is a `LoadedModel` (the SavedModel and its metadata, read once); an
ensemble (`--saved_model=A,B,C`; `load_ensemble`) is an `Ensemble` of them. Both answer
`probabilities(inputs, spacing, kind=SLICES | VOLUME | EXAMPLES, tta=...)`, the one way
predict and evaluate run a model: an ensemble's is the mean of its members' (each member
segments the input itself, at its own image size and target spacing, resampling inside
its graph, and returns probabilities in the input's geometry). Every path takes the
argmax of the probabilities once (`labels`): for one model this is exactly the graph's
own `mask` (also the argmax of its probabilities).

Test-time augmentation (`--tta`, scale TTA): for a model with a target spacing each
input is segmented once per factor of `TTA_SCALES`, sending its true spacing times the
factor (the model sees the field of view zoomed in or out); every call returns
probabilities in the input's own geometry, their mean is taken and its argmax is the mask
(with an ensemble: the mean over members and scales). A model without a target spacing
ignores the spacing, so TTA would change nothing: it is refused (`check_tta`).

Labelling protocols (`spine-convert --protocol`): an export of a model with one head per
protocol lists the names in its metadata ("protocols", head order; "protocol": the
default) and has a `_protocol` twin of every signature (export/serving.py).
`probabilities(..., protocol=NAME)` segments with that protocol's head: the plain
signature for the model's default (None: the default), the twin otherwise. A name a model
lacks is refused naming its folder and listing its protocols (`check_protocol`); an
ensemble needs the protocol in every member. TTA goes through the same calls, so it is
per protocol too.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np
import tensorflow as tf

from data_prep import dicom
from data_prep import fileio
from data_prep import orientation
from data_prep import readers
from export import postprocess as postprocess_lib
from export import pretrained

INPUT_SUFFIXES = readers.IMAGE_2D_SUFFIXES + (".npy",) + readers.NIFTI_SUFFIXES
REQUIRED_SIGNATURES = ("serving_default", "segment_volume")
# Written by spine-export next to the SavedModel (serving.METADATA_FILE; not imported from
# there, so that predict and evaluate never load Keras).
METADATA_FILE = "assets.extra/spineseg.json"
# Scale TTA: the factors multiplying an input's true in-plane spacing, one model call
# each; the mean of the probabilities is segmented. 1.0 is the plain prediction.
TTA_SCALES = (0.85, 1.0, 1.15)
# The twin of signature S taking a `protocol` input: S + PROTOCOL_SUFFIX (serving's
# constant, not imported from there for the reason of METADATA_FILE).
PROTOCOL_SUFFIX = "_protocol"
# What `LoadedModel.probabilities` is given, and its signatures for that: (without a
# spacing, with one; None: the kind takes no spacing).
SLICES, VOLUME, EXAMPLES = "slices", "volume", "examples"
_SIGNATURES = {SLICES: ("serving_default", "segment_spacing"),
               VOLUME: ("segment_volume", "segment_volume_spacing"),
               EXAMPLES: ("segment_examples", None)}


# One error type for every unusable input, whichever module detects it.
InputError = readers.InputError


def os_reason(error: BaseException) -> str:
  """The OS's own words for an OSError ("No space left on device"), else the error text."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return str(error) or type(error).__name__


def _read_metadata(path: pathlib.Path) -> dict[str, Any]:
  """The export metadata of a SavedModel folder ({} for exports that predate it)."""
  meta_path = path / METADATA_FILE
  if not meta_path.is_file():
    return {}
  try:
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{meta_path}: unreadable export metadata: {os_reason(e)}; "
                     "re-export the model with spine-export") from e
  if not isinstance(metadata, dict):
    raise InputError(f"{meta_path}: expected a JSON object, found "
                     f"{type(metadata).__name__}; re-export the model with spine-export")
  return metadata


def _image_size(loaded: Any, metadata: dict[str, Any], path: pathlib.Path) -> int | None:
  """The square side the model was exported for: metadata first, else the graph."""
  if "image_size" in metadata:
    try:
      return int(metadata["image_size"])
    except (TypeError, ValueError):
      raise InputError(f"{path / METADATA_FILE}: image_size must be an integer, found "
                       f"{metadata['image_size']!r}") from None
  # Older exports: segment_examples returns [N, S, S, 3] squares with S static.
  if "segment_examples" in loaded.signatures:
    shape = loaded.signatures["segment_examples"].structured_outputs["probabilities"].shape
    if shape.rank == 4 and shape[1] is not None:
      return int(shape[1])
  return None


def _target_spacing(loaded: Any, metadata: dict[str, Any],
                    path: pathlib.Path) -> float | None:
  """mm per pixel the model works at: metadata first, else the graph's variable."""
  if "target_spacing_mm" in metadata:
    value = metadata["target_spacing_mm"]
    if value is None:
      return None
    try:
      value = float(value)
    except (TypeError, ValueError):
      value = float("nan")
    if not 0 < value < float("inf"):
      raise InputError(f"{path / METADATA_FILE}: target_spacing_mm must be a positive "
                       f"number or null, found {metadata['target_spacing_mm']!r}")
    return value
  variable = getattr(loaded, "target_spacing_mm", None)  # exports before the metadata
  if variable is not None and float(variable.numpy()) > 0:
    return float(variable.numpy())
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """An exported spineseg SavedModel and what its metadata says, read once at loading.

  Attributes:
    module: the object `tf.saved_model.load` returned (its signatures).
    path: the SavedModel folder, for messages.
    metadata: the dict of `assets.extra/spineseg.json`, {} if absent.
    image_size: the square side in pixels the model was exported for, or None if unknown
      (callers refuse data prepared at another size).
    target_spacing_mm: mm per pixel the model was trained at, or None: it fits slices by
      their longer side.
    num_classes: the length of the probabilities' last axis, or None if unknown.
    protocols: the labelling protocols it can segment with (metadata "protocols" where
      the export has `_protocol` twins, else its one "protocol"); () for exports that
      predate protocols.
    protocol: the default protocol (the plain signatures'), None when unrecorded.
  """
  module: Any
  path: str
  metadata: dict[str, Any]
  image_size: int | None
  target_spacing_mm: float | None
  num_classes: int | None
  protocols: tuple[str, ...] = ()
  protocol: str | None = None

  @property
  def members(self) -> tuple[LoadedModel, ...]:
    """The models whose probabilities are averaged: this one alone."""
    return (self,)

  def probabilities(self, inputs: Any, spacing: tuple[float, float] | None = None, *,
                    kind: str = SLICES, tta: bool = False,
                    protocol: str | None = None) -> np.ndarray:
    """Probabilities float32 [N, H, W, C] of one batch of inputs; see `_SIGNATURES`.

    Args:
      inputs: SLICES: raw slices [N, H, W] sharing one size; VOLUME: one volume's
        display-order slices [S, H, W] (statistics over the volume; memory: 12 bytes per
        voxel for 3 classes); EXAMPLES: serialized converted examples [N] (tf.string),
        answered in their stored squares.
      spacing: the (row, column) mm per pixel of the slices (`spacing_for`); None: the
        signature without spacing, which takes them to be at the target spacing.
        EXAMPLES take none (an example stores its geometry).
      kind: SLICES, VOLUME or EXAMPLES.
      tta: scale TTA: the mean over one call per factor of `TTA_SCALES`, each sent
        `spacing` times the factor (every call returns probabilities in the input's
        geometry, so the mean has it too).
      protocol: the labelling protocol whose head segments (`check_protocol`); None:
        the model's default.

    Raises:
      InputError: `tta` for a model without a target spacing (`check_tta`), without a
        spacing, or lacking the spacing signature; a `protocol` the model lacks.
      ValueError: an unknown `kind`, or EXAMPLES with a spacing or `tta`.
    """
    plain, with_spacing = _signature_names(self, kind, spacing, tta, protocol)
    signatures = self.module.signatures
    extra = {}  # the default's head: the plain signatures, as before protocols
    if protocol is not None and protocol != self.protocol:
      plain, with_spacing = (name and name + PROTOCOL_SUFFIX
                             for name in (plain, with_spacing))
      extra = {"protocol": tf.constant(protocol)}

    def call(name, **inputs):
      return signatures[name](**inputs, **extra)["probabilities"].numpy()

    if kind == EXAMPLES:
      return call(plain, examples=inputs)
    x = tf.constant(np.asarray(inputs, dtype=np.float32)[..., None])
    if tta:
      if with_spacing not in signatures:
        raise InputError(f"{self.path}: --tta needs the {with_spacing} signature; "
                         "re-export the model with spine-export")
      total = None
      for factor in TTA_SCALES:
        scaled = tf.constant([float(v) * factor for v in spacing], tf.float32)
        p = call(with_spacing, images=x, spacing=scaled)
        total = p if total is None else total + p
      return total / np.float32(len(TTA_SCALES))
    # Exports before spacing inputs had no target spacing either: nothing to resample.
    if spacing is None or with_spacing not in signatures:
      return call(plain, images=x)
    return call(with_spacing, images=x, spacing=tf.constant(spacing, tf.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
  """Models whose mean probabilities are the prediction (`--saved_model=A,B,C`).

  Each member segments the input itself (its own image size and target spacing,
  resampling inside its graph), so only the classes must agree.

  Attributes:
    members: the loaded models, in the order given.

  Raises:
    InputError: at construction, naming the first member whose number of classes
      differs from the first member's.
    ValueError: no members.
  """
  members: tuple[LoadedModel, ...]

  def __post_init__(self):
    if not self.members:
      raise ValueError("an ensemble needs at least one model")
    first = self.members[0]
    for m in self.members[1:]:
      if m.num_classes != first.num_classes:
        raise InputError(f"{m.path}: ensemble members must give the same classes: "
                         f"{first.num_classes} in {first.path}, found {m.num_classes}")

  def probabilities(self, inputs: Any, spacing: tuple[float, float] | None = None, *,
                    kind: str = SLICES, tta: bool = False,
                    protocol: str | None = None) -> np.ndarray:
    """The mean of the members' `LoadedModel.probabilities` (same arguments): THE
    ensemble rule of predict and evaluate (with TTA: the mean over members and scales;
    `protocol`: that head of every member, None: each member's default).

    Raises:
      InputError, ValueError: as `LoadedModel.probabilities`, checked for every member
        before any call.
    """
    _signature_names(self, kind, spacing, tta, protocol)
    total = None
    for m in self.members:
      p = m.probabilities(inputs, spacing, kind=kind, tta=tta, protocol=protocol)
      total = p if total is None else total + p  # one running sum: memory of two outputs
    return total / np.float32(len(self.members))  # .numpy() arrays may be read-only


# One model or an ensemble: whatever predict and evaluate are given.
Model = LoadedModel | Ensemble


def load_saved_model(path: str | os.PathLike) -> LoadedModel:
  """Loads an exported spineseg SavedModel with its metadata (`LoadedModel`).

  `pretrained` (`pretrained.NAME`; a folder of that name: ./pretrained) is the model
  that ships with spineseg, exported into its cache on first use (export/pretrained.py).

  Raises:
    InputError: the folder is missing, holds no SavedModel, cannot be loaded, lacks
      the spineseg signatures, or its metadata is corrupt; the shipped model cannot be
      found or exported.
  """
  if str(path) == pretrained.NAME:
    try:
      path = pretrained.saved_model()
    except (OSError, ValueError) as e:  # ValueError: serving cannot load best.keras
      where = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.strerror else e
      raise InputError(f"--saved_model={pretrained.NAME}: {where}") from e
  path = fileio.path(path)
  if not path.is_dir():
    raise InputError(f"{path}: SavedModel directory does not exist")
  if not ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()):
    raise InputError(f"{path}: not a SavedModel (no saved_model.pb); expected the "
                     "version folder written by spine-export, e.g. models/spineseg/1")
  try:
    loaded = tf.saved_model.load(str(path))
  except Exception as e:  # TF raises many types for a corrupt or incompatible model.
    raise InputError(f"{path}: cannot load SavedModel: {type(e).__name__}: {e}") from e
  missing = [s for s in REQUIRED_SIGNATURES if s not in loaded.signatures]
  if missing:
    raise InputError(f"{path}: SavedModel lacks signatures {missing}; found "
                     f"{sorted(loaded.signatures)} (export it with spine-export)")
  metadata = _read_metadata(path)
  protocols, protocol = _protocols(loaded, metadata, path)
  return LoadedModel(module=loaded, path=str(path), metadata=metadata,
                     image_size=_image_size(loaded, metadata, path),
                     target_spacing_mm=_target_spacing(loaded, metadata, path),
                     num_classes=_num_classes(loaded, metadata),
                     protocols=protocols, protocol=protocol)


def _protocols(loaded: Any, metadata: dict[str, Any],
               path: pathlib.Path) -> tuple[tuple[str, ...], str | None]:
  """(the protocols the export can segment with, its default): see `LoadedModel`.

  Exports of one head of a model of several (before the `_protocol` twins) list every
  protocol in their metadata but can segment with their "protocol" only.
  """
  protocol, names = metadata.get("protocol"), metadata.get("protocols", [])
  if protocol is None:
    return (), None
  listed = isinstance(names, list) and all(isinstance(n, str) for n in names)
  if not (isinstance(protocol, str) and listed and (not names or protocol in names)):
    raise InputError(f"{path / METADATA_FILE}: expected a protocol name and a list of "
                     f"protocols holding it, found {protocol!r} and {names!r}; re-export "
                     "the model with spine-export")
  if "serving_default" + PROTOCOL_SUFFIX in loaded.signatures:
    return tuple(names), protocol
  return (protocol,), protocol


def _num_classes(loaded: Any, metadata: dict[str, Any]) -> int | None:
  """Classes of the probabilities: metadata first, else the graph's static shape."""
  if isinstance(metadata.get("num_classes"), int):
    return metadata["num_classes"]
  shape = loaded.signatures["serving_default"].structured_outputs["probabilities"].shape
  return int(shape[-1]) if shape.rank and shape[-1] is not None else None


def parse_model_list(value: str) -> list[str]:
  """The folders of `--saved_model=A,B,C` (one folder: a list of one).

  Raises:
    InputError: an empty element (",," or a trailing comma), naming the whole value.
  """
  paths = [p.strip() for p in str(value).split(",")]
  if not value or any(not p for p in paths):
    raise InputError(f"--saved_model={value!r}: expected one SavedModel folder or a "
                     "comma-separated list of them (A,B,C), found an empty element")
  return paths


def load_ensemble(paths: Sequence[str | os.PathLike]) -> Model:
  """Loads one model (a single path: exactly `load_saved_model`) or an `Ensemble`.

  Raises:
    InputError: as `load_saved_model` for any member, or `Ensemble` (other classes).
  """
  if len(paths) == 1:
    return load_saved_model(paths[0])
  return Ensemble(tuple(load_saved_model(p) for p in paths))


def list_inputs(path: str | os.PathLike) -> list[pathlib.Path]:
  """The input file itself, or the inputs of a folder (natural order).

  A folder's inputs are its files of `INPUT_SUFFIXES` and its DICOM series (`dicom`):
  the folder itself when it directly holds DICOM files (listed first), and each
  subfolder that does (one level down; a series is one input, a folder).

  Raises:
    InputError: the path does not exist, or a folder holds no supported input.
  """
  path = fileio.path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise InputError(f"{path}: input does not exist")
  entries = [p for p in path.iterdir() if not p.name.startswith(".")]
  inputs = [p for p in entries
            if (p.is_file() and readers.split_name(p)[1] in INPUT_SUFFIXES)
            or (p.is_dir() and dicom.holds_series(p))]
  inputs.sort(key=lambda p: readers.natural_key(p.name))
  if any(dicom.is_dicom_file(p) for p in entries):
    inputs.insert(0, path)
  if not inputs:
    raise InputError(f"{path}: folder holds no input of types {INPUT_SUFFIXES} and no "
                     "DICOM series (*.dcm) in it or its subfolders")
  return inputs


def _read_npy_image(path: str, spacing_2d: tuple[float, float] | None) -> readers.Case:
  try:
    data = np.load(fileio.source(path), allow_pickle=False)
  except Exception as e:  # NumPy raises several types for a corrupt file.
    raise InputError(f"{path}: unreadable .npy image: {type(e).__name__}: {e}") from e
  if data.ndim == 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 2:
    raise InputError(f"{path}: expected a 2D grayscale slice [H, W] (or [H, W, 1]), "
                     f"found shape {data.shape}")
  if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
    raise InputError(f"{path}: expected numeric intensities, found dtype {data.dtype}")
  image = data.astype(np.float32)
  if not np.all(np.isfinite(image)):
    raise InputError(f"{path}: expected finite intensities, found NaN/Inf")
  return readers.Case(case_id=readers.split_name(path)[0], image=image[None], mask=None,
                      spacing=spacing_2d or (1.0, 1.0), image_path=path, kind="2d",
                      original_shape=data.shape, spacing_known=spacing_2d is not None)


def read_input(path: str | os.PathLike,
               spacing_2d: tuple[float, float] | None = None) -> readers.Case:
  """Reads a 2D slice (PNG/JPEG/TIFF/.npy), a NIfTI volume or a DICOM series folder.

  The result is in display order. `spacing_2d`: (row, column) mm per pixel of a 2D file;
  None: unknown.

  Raises:
    InputError: naming the file (unreadable, RGB, wrong rank, 2D/4D NIfTI, ...) or the
      series folder (`dicom.read_series`).
  """
  path = str(path)
  if fileio.path(path).is_dir():
    return dicom.read_series(path)
  if readers.split_name(path)[1] not in INPUT_SUFFIXES and dicom.is_dicom_file(path):
    raise InputError(f"{path}: expected the folder of a DICOM series, found one of its "
                     f"files; give the folder {os.path.dirname(path) or '.'}")
  if readers.split_name(path)[1] == ".npy":
    return _read_npy_image(path, spacing_2d)
  return readers.read_image(path, spacing_2d)


def spacing_for(model: Model, case: readers.Case) -> tuple[float, float] | None:
  """The spacing to send with a case's slices, or None when the model needs none.

  `model`: one model or an ensemble, which needs the spacing if ANY member has a target
  spacing (members without one ignore it).

  Raises:
    InputError: a model (member) works at a target spacing and the case is a 2D file
      whose spacing was not given (`--spacing_2d_mm`): guessing would mis-scale it.
  """
  for m in model.members:
    if m.target_spacing_mm is None:
      continue  # fitted by the longer side: the spacing changes nothing
    if not case.spacing_known:
      where = f" ({m.path})" if isinstance(model, Ensemble) else ""
      raise InputError(f"{case.image_path}: a 2D image carries no pixel spacing and the "
                       f"model{where} works at {m.target_spacing_mm:g} mm per pixel; pass "
                       f"--spacing_2d_mm ({readers.SPACING_HELP})")
    return tuple(float(v) for v in case.spacing)
  return None


def check_tta(model: Model) -> None:
  """Returns if `model` (every member of an ensemble) can take scale TTA: it works at a
  target spacing.

  Raises:
    InputError: a model has no target spacing, so it ignores the spacing it is sent
      and every TTA call would give the same answer; names that model's folder.
  """
  for m in model.members:
    if m.target_spacing_mm is None:
      raise InputError("--tta needs a model exported with --target_spacing_mm "
                       "(spine-convert --target_spacing_mm, then spine-train and "
                       "spine-export): a model without one ignores the spacing that "
                       f"scale TTA varies ({m.path} has none)")


def check_protocol(model: Model, protocol: str | None) -> None:
  """Returns if every model (ensemble member) can segment with `protocol` (None: each
  member's default, always).

  Raises:
    InputError: a model lacks it; names that model's folder and lists its protocols.
  """
  if protocol is None:
    return
  for m in model.members:
    if protocol not in m.protocols:
      have = (f"its protocols are {', '.join(m.protocols)}" if m.protocols else
              "its export records no protocol names (re-export it with spine-export)")
      raise InputError(f"--protocol={protocol}: the SavedModel {m.path} has no head for "
                       f"it; {have}")


def protocol_used(model: Model, protocol: str | None) -> str | None:
  """The name of the protocol `model` segments with for `protocol` (None: each member's
  default), for reports: the name; None when no export records one; for an ensemble
  whose members' defaults differ, "FOLDER: NAME" per member joined by ", "."""
  if protocol is not None:
    return protocol
  names = [m.protocol for m in model.members]
  if len(set(names)) == 1:
    return names[0]
  return ", ".join(f"{m.path}: {m.protocol or 'unrecorded'}" for m in model.members)


def describe_protocols(model: Model) -> list[str]:
  """One line per model (ensemble member): its folder and protocols, the default
  marked (`--protocol=list`)."""
  lines = []
  for m in model.members:
    names = [f"{n} (default)" if n == m.protocol else n for n in m.protocols]
    lines.append(f"{m.path}: {', '.join(names)}" if names else
                 f"{m.path}: no protocol names recorded (exported before protocols)")
  return lines


def _signature_names(model: Model, kind: str, spacing: tuple[float, float] | None,
                     tta: bool, protocol: str | None = None) -> tuple[str, str | None]:
  """The signatures of `kind` (`_SIGNATURES`), once the request is checked.

  Raises:
    InputError: `tta` for a model without a target spacing, or without a spacing; a
      `protocol` a model lacks (`check_protocol`).
    ValueError: an unknown `kind`, or EXAMPLES with a spacing or `tta`.
  """
  check_protocol(model, protocol)
  if kind not in _SIGNATURES:
    raise ValueError(f"kind must be one of {sorted(_SIGNATURES)}, found {kind!r}")
  if kind == EXAMPLES and (spacing is not None or tta):
    raise ValueError("converted examples store their geometry: no spacing, no --tta")
  if tta:
    check_tta(model)
    if spacing is None:  # a caller that skipped `spacing_for`
      raise InputError("--tta needs each input's spacing (NIfTI: the affine; 2D: "
                       "--spacing_2d_mm)")
  return _SIGNATURES[kind]


def labels(probabilities: np.ndarray, postprocess: bool = False) -> np.ndarray:
  """Label mask uint8 [...] of probabilities [..., C]: the argmax (first on ties, as the
  graph's own `mask`).

  `postprocess`: then `postprocess.remove_small_components` on the mask of one slice
  [H, W] or one volume [S, H, W] (3D components; give slices of several 2D inputs one
  at a time).
  """
  mask = np.argmax(probabilities, axis=-1).astype(np.uint8)
  if postprocess:
    mask = postprocess_lib.remove_small_components(mask, probabilities.shape[-1])
  return mask


def orientation_back(case: readers.Case, mask: np.ndarray) -> np.ndarray:
  """A display-order [S, H, W] prediction of a NIfTI case, in the file's voxel order."""
  return orientation.from_display(mask, case.transform)


def batch_key(model: Model, case: readers.Case) -> tuple:
  """What 2D cases must share to go to the model in one call: (rows, columns, the
  spacing sent with them, `spacing_for`).

  Raises:
    InputError: as `spacing_for`.
  """
  return tuple(case.image.shape[1:]) + (spacing_for(model, case),)


def batches_2d(model: Model, cases: Iterable[readers.Case],
               batch_size: int) -> Iterable[tuple[list[readers.Case], Any]]:
  """Groups 2D cases into model calls: yields (cases, their spacing) per batch.

  The batches are those of `buckets` with `batch_key`: a signature call takes one size
  and one spacing. The batches are a function of the cases' order alone, so every caller
  (sequential, streaming, Beam) sends the model the same batches. Check each case with
  `spacing_for` before: here an unknown spacing raises.
  """
  for batch, key in buckets(cases, functools.partial(batch_key, model), batch_size):
    yield batch, key[2]


def buckets(items: Iterable[Any], key: Callable[[Any], Hashable],
            size: int) -> Iterable[tuple[list[Any], Hashable]]:
  """Yields (items, their key): items of one key wait in a bucket until it holds `size`;
  leftovers are flushed at the end, in the order their buckets opened."""
  open_buckets: dict[Hashable, list[Any]] = {}
  for item in items:
    k = key(item)
    open_buckets.setdefault(k, []).append(item)
    if len(open_buckets[k]) >= size:
      yield open_buckets.pop(k), k
  for k in list(open_buckets):
    yield open_buckets.pop(k), k


def cases_2d_probabilities(
    model: Model, cases: Iterable[readers.Case], batch_size: int,
    tta: bool = False,
    protocol: str | None = None) -> Iterable[tuple[readers.Case, np.ndarray]]:
  """Yields (case, probabilities [H, W, C]) for 2D cases, batched by `batches_2d`.

  Order of the results is therefore not the input order; an unknown spacing fails the
  whole batch. `model`: one model or an ensemble; `tta`: scale TTA, `protocol`: the head
  (`LoadedModel.probabilities`).
  """
  for batch, spacing in batches_2d(model, cases, batch_size):
    probs = model.probabilities(np.stack([c.image[0] for c in batch]), spacing, tta=tta,
                                protocol=protocol)
    yield from zip(batch, probs)
