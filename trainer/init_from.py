"""Fine-tuning: start a run from the weights of another model (`spine-train --init_from`).

A source is one of:
  a spine-train model_dir   its best.keras, else its latest checkpoint (checkpoints/);
  a .keras file             e.g. a model_dir's best.keras given directly;
  a SavedModel folder       written by spine-export (`assets.extra/spineseg.json`): the
                            weights are read from its `variables/` checkpoint;
  `pretrained`              the model that ships with spineseg (export/pretrained.py):
                            a model_dir inside the package.

Weights are matched by Keras variable path (`LAYER/WEIGHT`, e.g. `down0_conv1/kernel`):
a checkpoint's object graph records each variable's path as its `full_name`, so a
model_dir checkpoint and a SavedModel are read without building their graphs. Every
layer of the new model must find its source layer with the same weights and shapes,
except the output heads: a head is loaded when the source has one for the same
labelling protocol (with two one-head models, their only heads are compared) with the
same classes, and re-initialized otherwise, the reason named. Anything else that differs
is refused in one line naming the layer and both shapes.

The source's image size and target spacing (its dataset.json, or the export's metadata)
must be the run's: a model that saw other pixels is another model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
import zlib
from typing import Any

import keras
from google.protobuf import message as message_lib
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from data_prep import fileio
from data_prep import manifest as manifest_lib
from data_prep import schema
from export import pretrained
from trainer.config import ConfigError

# What spine-export writes next to a SavedModel (export/serving.py METADATA_FILE).
_EXPORT_METADATA = "assets.extra/spineseg.json"
# The one-head model's output layer (trainer/unet.py); several heads: schema.head_layer.
_ONE_HEAD = "logits"
# Where a checkpoint's object graph holds the model's variables (`_checkpoint_weights`).
_MODEL_KEYS = ("model/", "optimizer/_trainable_variables/")


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the init weights come from.

  Attributes:
    given: --init_from as typed.
    path: what is read: a .keras file, a checkpoint prefix, or a SavedModel folder.
    kind: "keras", "checkpoint" or "saved_model".
    files: the files whose bytes are read for the weights.
    sha256: SHA-256 of the one file; of several, of their `sha256sum` lines (digest,
      two spaces, path relative to `path`'s folder, sorted by path).
    facts: what the source model saw, where known: image_size, target_spacing_mm,
      labels ({"0": "background", ...}), protocol (of a one-head model); {} when no
      dataset.json or export metadata lies beside the source.
  """
  given: str
  path: str
  kind: str
  files: tuple[str, ...]
  sha256: str
  facts: dict[str, Any]

  def record(self) -> dict[str, str]:
    """What config.json records besides --init_from (compared when a run resumes)."""
    return {"init_from_resolved": self.path, "init_from_sha256": self.sha256}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The init weights of a new model, matched.

  Attributes:
    source: where the weights come from.
    values: {variable path of the new model: the source's array}.
    loaded: names of the layers loaded.
    reinitialized: {head layer name: why it keeps its fresh initialization}.
  """
  source: Source
  values: dict[str, np.ndarray]
  loaded: tuple[str, ...]
  reinitialized: dict[str, str]

  def summary(self) -> str:
    """One line for the log: what was loaded from where and what was not."""
    source = self.source
    heads = "; ".join(f"{name} re-initialized: {why}"
                      for name, why in self.reinitialized.items())
    return (f"spine-train: --init_from={source.given}: {len(self.loaded)} layers loaded "
            f"from {source.path} (sha256 {source.sha256[:12]})" + (f"; {heads}" if heads
                                                                   else ""))


def resolve(given: str) -> Source:
  """Finds the file(s) that `given` names and hashes them (no TensorFlow op runs).

  Raises:
    ConfigError: a missing path, one that is no model_dir, .keras file or spine-export
      SavedModel, or an installation without the shipped model; naming the path.
  """
  flag = f"--init_from={given}"
  if given == pretrained.NAME:  # a folder of that name: ./pretrained
    try:
      return _model_dir(given, pretrained.model_dir())
    except FileNotFoundError as e:
      raise ConfigError(f"{flag}: {e}") from e
  where = fileio.path(given).expanduser().resolve()
  if not where.exists():
    raise ConfigError(f"{flag}: {where} does not exist")
  if where.is_dir() and (where / "saved_model.pb").is_file():
    return _saved_model(given, where)
  if where.is_dir():
    return _model_dir(given, where)
  if where.suffix == ".keras":
    beside = manifest_lib.path_of(where.parent)
    facts = _manifest_facts(given, where.parent) if beside.is_file() else {}
    return _source(given, where, "keras", [where], facts)
  raise ConfigError(f"{flag}: {where} is no .keras file; expected a spine-train "
                    "model_dir, a .keras file or a spine-export SavedModel folder")


def _model_dir(given: str, where) -> Source:
  facts = _manifest_facts(given, where) if manifest_lib.path_of(where).is_file() else {}
  best = where / "best.keras"
  if best.is_file():
    return _source(given, best, "keras", [best], facts)
  prefix = _latest_checkpoint(where / "checkpoints")
  if prefix is None:
    raise ConfigError(f"--init_from={given}: {where} holds neither best.keras nor a "
                      "checkpoint; expected a spine-train model_dir (or a .keras file, or "
                      "a spine-export SavedModel folder)")
  files = sorted(p for p in prefix.parent.glob(prefix.name + ".*"))
  return _source(given, prefix, "checkpoint", files, facts)


def _latest_checkpoint(folder):
  """The prefix named by tf.train's `checkpoint` index file (read as text: no TF)."""
  index = folder / "checkpoint"
  if not index.is_file():
    return None
  for line in index.read_text().splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "model_checkpoint_path":
      name = json.loads(value.strip())
      return fileio.path(name) if name.startswith("/") else folder / name
  return None


def _saved_model(given: str, where) -> Source:
  metadata_path = where / _EXPORT_METADATA
  if not metadata_path.is_file():
    raise ConfigError(f"--init_from={given}: {where} is a SavedModel without "
                      f"{_EXPORT_METADATA}; expected one written by spine-export")
  try:
    metadata = json.loads(metadata_path.read_text())
    facts = {"image_size": int(metadata["image_size"]),
             "target_spacing_mm": metadata.get("target_spacing_mm"),
             "labels": metadata["labels"], "protocol": metadata.get("protocol")}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"--init_from={given}: {metadata_path}: unreadable export metadata "
                      f"({e})") from e
  files = sorted((where / "variables").glob("variables.*"))
  if not files:
    raise ConfigError(f"--init_from={given}: {where / 'variables'}: no variables; the "
                      "export is incomplete")
  return _source(given, where, "saved_model", files, facts)


def _manifest_facts(given: str, folder) -> dict[str, Any]:
  """What the source's dataset.json says it saw (see `Source.facts`)."""
  try:
    manifest = manifest_lib.load(folder)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"--init_from={given}: {e}") from e
  return {"image_size": manifest.image_size,
          "target_spacing_mm": manifest.target_spacing_mm,
          "labels": manifest.labels, "protocol": manifest.protocol}


def _source(given: str, path, kind: str, files: list, facts: dict[str, Any]) -> Source:
  digests = [(fileio.sha256(f), f) for f in files]
  if len(digests) == 1:
    sha = digests[0][0]
  else:
    base = path.parent if kind == "checkpoint" else path
    lines = sorted(f"{d}  {f.relative_to(base)}\n" for d, f in digests)
    sha = hashlib.sha256("".join(lines).encode()).hexdigest()
  return Source(given, str(path), kind, tuple(str(f) for f in files), sha, facts)


def check_data(source: Source, image_size: int, target_spacing_mm: float | None) -> None:
  """Refuses a source trained on another image size or target spacing than the run's.

  Raises:
    ConfigError: naming the source, both values and the run's data.
  """
  facts = source.facts
  if not facts:
    print(f"spine-train: --init_from={source.given}: no dataset.json beside "
          f"{source.path}; its image size and spacing cannot be checked", flush=True)
    return
  for what, ours in (("image_size", image_size), ("target_spacing_mm", target_spacing_mm)):
    if facts[what] != ours:
      raise ConfigError(f"--init_from={source.given}: {source.path} was trained with "
                        f"{what} {facts[what]!r}, --data_dir has {ours!r}; fine-tune on "
                        "data converted alike")


def read_weights(source: Source) -> dict[str, np.ndarray]:
  """{Keras variable path: value} of every weight of the source model.

  Raises:
    ConfigError: a truncated or corrupt file, naming it and the reason.
  """
  if source.kind == "keras":
    return _keras_weights(source)
  prefix = (source.path if source.kind == "checkpoint"
            else str(fileio.path(source.path) / "variables" / "variables"))
  return _checkpoint_weights(source, prefix)


def _keras_weights(source: Source) -> dict[str, np.ndarray]:
  flag = f"--init_from={source.given}"
  try:
    with zipfile.ZipFile(fileio.source(source.path)) as archive:
      bad = archive.testzip()  # reads every member: catches a cut inside the weights
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
    raise ConfigError(f"{flag}: {source.path}: unreadable Keras model (truncated or "
                      f"corrupt: {e})") from e
  if bad is not None:
    raise ConfigError(f"{flag}: {source.path}: unreadable Keras model (member {bad} "
                      "fails its CRC check)")
  try:
    with fileio.local_copy(source.path) as local:  # Keras opens local files only
      model = keras.models.load_model(local, compile=False)
  except Exception as e:  # Keras raises many types (unknown layer, bad config, ...).
    first = (str(e).strip().splitlines() or [""])[0]
    raise ConfigError(f"{flag}: {source.path}: cannot load the Keras model: "
                      f"{type(e).__name__}: {first}") from e
  return {w.path: np.asarray(w.numpy()) for w in model.weights}


def _checkpoint_weights(source: Source, prefix: str) -> dict[str, np.ndarray]:
  try:
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    weights = {}
    for node in graph.nodes:
      for attribute in node.attributes:
        # The model's own variables, stored once: under model/ (a SavedModel; the
        # non-trainable ones of a training checkpoint) or, in a training checkpoint,
        # where the optimizer tracks the trainable ones (Keras 3's optimizer attribute
        # `_trainable_variables`). Not the optimizer's slots, and not the dropout
        # layers' random-number states (no weights; the new run seeds its own).
        if (attribute.checkpoint_key.startswith(_MODEL_KEYS)
            and "seed_generator" not in attribute.full_name):
          weights[attribute.full_name] = np.asarray(
              reader.get_tensor(attribute.checkpoint_key))
  # A cut file: OpError (DataLoss, OutOfRange), IndexError ("Read less bytes than
  # requested"), or an object graph that does not parse.
  except (tf.errors.OpError, ValueError, IndexError, message_lib.DecodeError) as e:
    message = getattr(e, "message", None) or str(e)
    first = (message.strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError(f"--init_from={source.given}: {prefix}: unreadable checkpoint "
                      f"(truncated or corrupt: {first})") from e
  if not weights:
    raise ConfigError(f"--init_from={source.given}: {prefix}: no model weights in it")
  return weights


def _heads(layer_names, one_head_protocol: str | None) -> dict[str, str | None]:
  """{head layer name: its protocol} of a model's layers (None: not known)."""
  heads = {}
  for name in layer_names:
    if name.startswith(schema.HEAD_LAYER_PREFIX):
      heads[name] = name[len(schema.HEAD_LAYER_PREFIX):]
    elif name == _ONE_HEAD:
      heads[name] = one_head_protocol
  return heads


def plan(source: Source, weights: dict[str, np.ndarray], model, *, protocol: str,
         labels: dict[str, str]) -> Plan:
  """Matches the source's weights to `model`'s layers.

  Args:
    source: the resolved source.
    weights: `read_weights(source)`.
    model: the new Keras model (its layer names and weight shapes are read only).
    protocol: the labelling protocol of `model`'s head when it has one ("logits").
    labels: the run's class names by id (dataset.json "labels").

  Returns:
    The Plan: every non-head weight of `model` and the matching heads.

  Raises:
    ConfigError: one line naming a layer that is missing on one side or has another
      weight shape (both shapes named).
  """
  flag = f"--init_from={source.given}"
  by_layer: dict[str, dict[str, np.ndarray]] = {}
  for path, value in weights.items():
    layer, _, weight = path.rpartition("/")
    by_layer.setdefault(layer, {})[weight] = value
  ours = {layer.name: layer for layer in model.layers if layer.weights}
  new_heads = _heads(ours, protocol)
  old_heads = _heads(by_layer, source.facts.get("protocol"))
  values, loaded, reinitialized = {}, [], {}
  for name, layer in ours.items():
    if name in new_heads:
      old, why = _matching_head(name, new_heads, old_heads, layer, by_layer,
                                labels, source.facts.get("labels"))
      if why:
        reinitialized[name] = why
        continue
    else:
      old = name
      if old not in by_layer:
        raise ConfigError(f"{flag}: layer {name} of this run's model is not in "
                          f"{source.path} (another --depth or --norm?)")
    for w in layer.weights:
      key = w.path.rpartition("/")[2]
      found = by_layer[old].get(key)
      if found is None or found.shape != tuple(w.shape):
        shape = "no such weight" if found is None else f"shape {found.shape}"
        raise ConfigError(f"{flag}: layer {name}: {key} has {shape} in {source.path}, "
                          f"shape {tuple(w.shape)} in this run's model (another "
                          "--base_filters, --depth or --norm?)")
      values[w.path] = found
    loaded.append(name)
  extra = sorted(set(by_layer) - set(ours) - set(old_heads))
  if extra:
    raise ConfigError(f"{flag}: layer {extra[0]} of {source.path} has no counterpart in "
                      "this run's model (another --depth or --norm?)")
  return Plan(source, values, tuple(loaded), reinitialized)


def _matching_head(name, new_heads, old_heads, layer, by_layer, labels, old_labels):
  """(source layer name, None) of the head that `name` loads from, or (None, reason)."""
  protocol = new_heads[name]
  if len(new_heads) == 1 and len(old_heads) == 1 and set(new_heads) == {_ONE_HEAD} == set(
      old_heads):
    old = _ONE_HEAD  # Two one-head models: their only heads, whatever their protocols.
  else:
    found = [old for old, p in old_heads.items() if p == protocol]
    if not found:
      return None, (f"the source has no head for the labelling protocol {protocol!r} "
                    f"(it has {sorted(str(p) for p in old_heads.values())})")
    old = found[0]
  kernel = by_layer[old].get("kernel")
  ours = tuple(layer.kernel.shape)
  if kernel is None or kernel.shape != ours:
    classes = None if kernel is None else kernel.shape[-1]
    return None, f"{classes} classes in the source, {ours[-1]} now"
  if old_labels is not None and old_labels != labels:
    return None, f"the source's classes {old_labels} differ from {labels}"
  return old, None


def apply(values: dict[str, np.ndarray], model) -> None:
  """Assigns `Plan.values` to `model`'s variables of the same paths (all of them)."""
  assigned = 0
  for variable in model.weights:
    if variable.path in values:
      variable.assign(values[variable.path])
      assigned += 1
  if assigned != len(values):  # Two builds of one config name their layers alike.
    raise RuntimeError(f"init weights: {assigned} of {len(values)} variables assigned")


def encoder_layers(model) -> list:
  """The layers of the U-Net's contracting path (`down*` blocks and `bottom`, unet.py)."""
  return [layer for layer in model.layers
          if layer.name.startswith(("down", "bottom_")) and layer.weights]


def set_trainable(layers, trainable: bool) -> None:
  """Sets `trainable` on each of `layers` (the next traced train step follows it)."""
  for layer in layers:
    layer.trainable = trainable


class Unfreeze(keras.callbacks.Callback):
  """Makes `layers` trainable again when epoch `epoch` (0-based) begins.

  Keras traces the train step once per `fit`, over the trainable weights of that
  moment; the step is traced anew here so that the gradients reach the unfrozen layers.
  (The optimizer was built with every weight, so it has their slots.)
  """

  def __init__(self, layers, epoch: int):
    super().__init__()
    self._layers = layers
    self._epoch = epoch

  def on_epoch_begin(self, epoch, logs=None):
    if epoch == self._epoch:
      set_trainable(self._layers, True)
      self.model.make_train_function(force=True)
