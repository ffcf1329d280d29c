"""The model_dir of a run: one run at a time, leftovers of killed runs, resume checks.

  .lock           flock'ed by the running chief (its pid and host inside): one run per dir
A rerun into a model_dir resumes it only with the same settings (`RESUMABLE_CHANGES`
aside) and the same dataset (`dataset.json`: the first --data_dir's manifest; with
several folders `datasets.json` records every one), and so the same labelling protocols
(the model's heads); anything else is refused with the differences named.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any

from data_prep import fileio
from data_prep import manifest as manifest_lib
from data_prep import schema
from trainer.config import ConfigError, TrainConfig, resolve_data_dirs

# Settings a resumed run may change; any other difference means another experiment.
# (augment_on moves the same augmentation between tf.data and the train step; model_dir
# is the folder config.json was read from, so another value means it was moved; the
# last three change no number of the run.)
RESUMABLE_CHANGES = ("epochs", "strategy", "jit_compile", "augment_on", "model_dir",
                      "verbose", "num_overlays", "verify_shards")
# config.json's record of --init_from: compared as the file read and its hash (below),
# not as typed, so a rerun from another folder spelling it otherwise still resumes.
INIT_KEYS = ("init_from_resolved", "init_from_sha256")
LOCK_NAME = ".lock"
# With several --data_dir folders: {"datasets": [{"name", "data_dir", "manifest"}, ...]}.
DATASETS_NAME = schema.DATASETS_NAME
# What killed runs leave in a model_dir, by subfolder (fileio.TMP_PREFIX* is always
# included): temporaries of the writers before `fileio` (`.tmp-PID-best.keras`,
# `.config.json.XXXX.tmp`, ...), and of tf.train.Checkpoint (a save's `ckpt-N_temp/`
# folder, the `checkpoint` index written by temporary name and rename).
_LEFTOVERS = {
    ".": (".tmp-*-best.keras", ".config.json.*.tmp", ".dataset.json.*.tmp",
          ".history.json.*.tmp"),
    "checkpoints": ("ckpt-*_temp*", "checkpoint.tmp*"),
}

def check(config: TrainConfig, manifest: manifest_lib.Manifest,
          datasets: dict[str, Any] | None = None,
          init: dict[str, str] | None = None) -> None:
  """Refuses to resume into a model_dir written with other settings or other data.

  Args:
    config: the run's settings, paths absolute.
    manifest: the manifest of the (first) --data_dir; `dataset.json` must hold it.
    datasets: with several folders, the `datasets.json` record of the run
      ({"datasets": [{"name", "data_dir", "manifest"}, ...]}, in --data_dir order);
      else None.
    init: the run's --init_from record (`init_from.Source.record`; {} or None without).

  Raises:
    ConfigError: naming the differing settings, protocols, the folder whose data
      changed, or another --init_from source (or none) than the model_dir was started
      from.
  """
  model_dir = fileio.path(config.model_dir)
  old_config = model_dir / "config.json"
  if old_config.is_file():
    # Settings added after a model_dir was written count as their defaults.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    old = {**defaults, **_read_json(old_config)}
    # Same folder, however it was spelled (older versions stored paths as typed).
    if isinstance(old.get("data_dir"), str):
      old["data_dir"] = resolve_data_dirs(old["data_dir"])
    if isinstance(old.get("model_dir"), str):
      old["model_dir"] = str(fileio.path(old["model_dir"]).expanduser().resolve())
    new = dataclasses.asdict(config)
    _check_init(old_config, old, init or {})
    differ = sorted(k for k in set(old) | set(new)
                    if k not in (*RESUMABLE_CHANGES, "init_from", *INIT_KEYS)
                    and old.get(k) != new.get(k))
    if differ:
      raise ConfigError(
          f"{old_config}: this model_dir was trained with other settings "
          f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in differ)}); "
          "use a new --model_dir")
  _check_protocols(model_dir, _protocols(model_dir, manifest.raw, datasets))
  old_manifest = model_dir / "dataset.json"
  if old_manifest.is_file() and _read_json(old_manifest) != manifest.raw:
    raise ConfigError(f"{old_manifest}: this model_dir was trained on another dataset "
                      f"than {config.data_dir.split(',')[0]}; use a new --model_dir")
  old_datasets = model_dir / DATASETS_NAME
  if datasets is not None and old_datasets.is_file():
    recorded = _read_json(old_datasets)
    recorded = recorded.get("datasets", []) if isinstance(recorded, dict) else []
    for i, entry in enumerate(datasets["datasets"]):
      if i >= len(recorded) or recorded[i].get("manifest") != entry["manifest"]:
        raise ConfigError(f"{old_datasets}: this model_dir was trained on other data than "
                          f"{entry['data_dir']} (its dataset.json changed since); use a "
                          "new --model_dir")


def _check_init(old_config: pathlib.Path, old: dict[str, Any],
                init: dict[str, str]) -> None:
  """Refuses resuming with other --init_from weights than the run started from (or with
  none, or from a run that had none): its checkpoints and the weights would mix."""
  recorded = {k: old.get(k) for k in INIT_KEYS if old.get(k) is not None}
  if recorded == init:
    return
  was = (f"--init_from={old.get('init_from')} ({recorded.get('init_from_resolved')}, "
         f"sha256 {str(recorded.get('init_from_sha256'))[:12]})" if recorded
         else "no --init_from")
  now = (f"{init['init_from_resolved']} (sha256 {init['init_from_sha256'][:12]})"
         if init else "no --init_from")
  raise ConfigError(f"{old_config}: this model_dir was started from {was}, this run has "
                    f"{now}; resuming would mix the two: rerun with the same --init_from "
                    "(the same file) or use a new --model_dir")


def _protocols(where: pathlib.Path, manifest: Any, datasets: Any) -> list[str]:
  """The labelling protocols of a run's records, sorted: those of its folders' manifests
  (datasets.json's with several folders, else dataset.json's)."""
  try:
    if isinstance(datasets, dict) and "datasets" in datasets:
      raws = [entry["manifest"] for entry in datasets["datasets"]]
    else:
      raws = [manifest]
    return sorted({manifest_lib.Manifest(str(where), raw).protocol for raw in raws})
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{where}: unreadable run record ({e}); restore it or use a new "
                      "--model_dir") from e


def _check_protocols(model_dir: pathlib.Path, new: list[str]) -> None:
  """Refuses a run whose protocol heads differ from the model_dir's (ConfigError): its
  model would have other output layers than the checkpoint."""
  old_manifest = model_dir / "dataset.json"
  if not old_manifest.is_file():
    return
  old_datasets = model_dir / DATASETS_NAME
  old = _protocols(model_dir, _read_json(old_manifest),
                   _read_json(old_datasets) if old_datasets.is_file() else None)
  if old != new:
    raise ConfigError(f"{model_dir}: this model_dir was trained with the labelling "
                      f"protocol(s) {old}, --data_dir now has {new}; use a new --model_dir")


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: unreadable ({e}); restore it or use a new --model_dir") from e


def prepare(model_dir: pathlib.Path) -> None:
  """Creates model_dir; ConfigError when it is a file or cannot be created."""
  if model_dir.exists() and not model_dir.is_dir():
    raise ConfigError(f"--model_dir={model_dir}: a file is there; expected a folder")
  try:
    model_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--model_dir={model_dir}: cannot create it: {e.strerror} "
                      f"({e.filename})") from e


@contextlib.contextmanager
def lock(model_dir: pathlib.Path):
  """Holds `fileio.FolderLock` on MODEL_DIR/.lock for the run; a second run is refused.

  Raises:
    ConfigError: another process holds the lock (its pid and host are named), or the
      folder cannot be written.
  """
  try:
    with fileio.FolderLock(model_dir, "spine-train", lock_file=LOCK_NAME):
      yield
  except fileio.FolderBusy as e:
    raise ConfigError(f"--model_dir={e}") from None
  except OSError as e:
    raise ConfigError(f"--model_dir={model_dir}: cannot write there: {e.strerror}") from e


def remove_leftovers(model_dir: pathlib.Path) -> None:
  """Deletes temporaries of killed runs (`_LEFTOVERS`), naming them in one line."""
  removed = []
  for sub, patterns in _LEFTOVERS.items():
    removed += fileio.remove_stale_temporaries(model_dir / sub, patterns)
  if removed:
    names = ", ".join(str(p.relative_to(model_dir)) for p in removed)
    print(f"spine-train: removed leftovers of an interrupted run from {model_dir}: {names}",
          flush=True)
