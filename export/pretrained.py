"""The trained model that ships with spineseg: `--saved_model=pretrained`, `--init_from=pretrained`.

The package holds it as a spine-train model directory (`export/pretrained_model/`):
`best.keras` (the weights, float32, without optimizer state), the `dataset.json` and
`datasets.json` of its training data (image size, target spacing, labels, one head per
labelling protocol), its `config.json` and `MODEL_CARD.md`. That is the smallest form
that is exactly the trained model: a SavedModel of it is half as large again (its graph),
and fewer bits per weight would change predictions.

spine-predict and spine-evaluate run SavedModels, so `saved_model()` exports it once into
a cache folder (`$SPINESEG_CACHE`, else `$XDG_CACHE_HOME/spineseg`, else
`~/.cache/spineseg`) named by the SHA-256 of `best.keras`, and reuses that export from
then on; the export is written aside and renamed into place, so a cache folder that
exists is complete. Processes that need it at once (a shell loop run with `&`, Beam
workers on one machine) take turns on a lock file beside it: the first exports, the
others wait and then use that export, so no process replaces a folder another is
reading. spine-train's `--init_from=pretrained` reads the model directory itself
(trainer/init_from.py).

Nothing here imports TensorFlow until an export is needed.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import pathlib
import shutil
import sys
from typing import Iterable

from absl import logging
import numpy as np

from data_prep import fileio

# The name that selects the shipped model (a folder of that name: ./pretrained).
NAME = "pretrained"
MODEL_DIR = pathlib.Path(__file__).resolve().parent / "pretrained_model"
MODEL_FILE = "best.keras"
# The head the plain signatures of the cached export segment with (--protocol picks
# another): the protocol of spine2d, whose discs and vertebrae are both drawn.
DEFAULT_PROTOCOL = "spine2d"
# The environment variable naming the cache folder.
CACHE_ENV = "SPINESEG_CACHE"
# What `pack` copies from the training run beside the weights.
RUN_RECORDS = ("dataset.json", "datasets.json", "config.json")


def model_dir() -> pathlib.Path:
  """The shipped model directory.

  Raises:
    FileNotFoundError: the package was installed without it, naming the path.
  """
  if not (MODEL_DIR / MODEL_FILE).is_file():
    raise FileNotFoundError(
        f"{MODEL_DIR / MODEL_FILE}: missing; this installation of spineseg lacks the "
        "shipped model (reinstall the package, or pass a model of your own)")
  return MODEL_DIR


def cache_dir() -> pathlib.Path:
  """Where exports of the shipped model are kept (see the module docstring)."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
  return base / "spineseg"


def weights_sha256() -> str:
  """SHA-256 of the shipped `best.keras` (names the cached export)."""
  return fileio.sha256(model_dir() / MODEL_FILE)


def saved_model() -> pathlib.Path:
  """The shipped model as a SavedModel version folder, exported on first use.

  Returns:
    `CACHE/pretrained-SHA16/1`, a spine-export SavedModel with every head; its plain
    signatures segment with `DEFAULT_PROTOCOL`.

  Raises:
    FileNotFoundError: see `model_dir`.
    OSError: the cache folder cannot be written, naming it (set $SPINESEG_CACHE).
  """
  target = cache_dir() / f"{NAME}-{weights_sha256()[:16]}" / "1"
  if (target / "saved_model.pb").is_file():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = open(target.parent / ".export.lock", "a")  # pylint: disable=consider-using-with
  except OSError as e:
    raise OSError(e.errno, f"cannot create the model cache ({e.strerror}); set "
                  f"${CACHE_ENV} to a writable folder", str(target.parent)) from e
  with lock:  # the lock is released when the file closes
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"spineseg: waiting for another process that exports the shipped model to "
            f"{target}", file=sys.stderr, flush=True)
      fcntl.flock(lock, fcntl.LOCK_EX)
    if (target / "saved_model.pb").is_file():
      return target  # another process exported it while this one waited
    print(f"spineseg: exporting the shipped model once to {target} (about half a "
          f"minute; ${CACHE_ENV} moves the cache)", file=sys.stderr, flush=True)
    # Imported here: it loads Keras, which predict and evaluate otherwise never need.
    from export import serving  # pylint: disable=g-import-not-at-top
    # Writing a SavedModel logs each step at INFO (absl), as spine-export quiets too:
    # those lines would come between spine-predict's own.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
      # overwrite: a folder of that name without a SavedModel in it (the export itself
      # is renamed into place whole, so it is none of ours).
      return serving.export(model_dir(), target, overwrite=True, protocol=DEFAULT_PROTOCOL)
    finally:
      logging.set_verbosity(verbosity)


def weights_digest(weights: Iterable[np.ndarray]) -> str:
  """SHA-256 of a model's weight values in order (`model.get_weights()`).

  The same for two files exactly when they hold the same numbers: a `.keras` file's own
  bytes also hold the time it was written.
  """
  digest = hashlib.sha256()
  for w in weights:
    w = np.ascontiguousarray(w)
    digest.update(f"{w.dtype.str}{w.shape}".encode())
    digest.update(w.tobytes())
  return digest.hexdigest()


def pack(run_dir: str | os.PathLike, output_dir: str | os.PathLike) -> str:
  """Writes a training run's model as the shipped model directory.

  `best.keras` is saved again without optimizer state (a third of the size, the same
  weights); the run's records (`RUN_RECORDS`) are copied. Other files in `output_dir`
  (MODEL_CARD.md) are kept.

  Args:
    run_dir: a spine-train model_dir.
    output_dir: where to write, e.g. `MODEL_DIR`.

  Returns:
    The `weights_digest` of the packed model.

  Raises:
    FileNotFoundError: `run_dir` lacks best.keras or a record, naming it.
  """
  run_dir, output_dir = pathlib.Path(run_dir), pathlib.Path(output_dir)
  for name in (MODEL_FILE,) + RUN_RECORDS:
    if not (run_dir / name).is_file():
      raise FileNotFoundError(f"{run_dir / name}: missing; expected a spine-train model_dir")
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.models.load_model(run_dir / MODEL_FILE, compile=False)
  output_dir.mkdir(parents=True, exist_ok=True)
  tmp = output_dir / f".{MODEL_FILE}.tmp-{os.getpid()}.keras"
  try:
    model.save(tmp)  # not compiled: no optimizer state
    os.replace(tmp, output_dir / MODEL_FILE)
  finally:
    tmp.unlink(missing_ok=True)
  for name in RUN_RECORDS:
    shutil.copyfile(run_dir / name, output_dir / name)
  return weights_digest(model.get_weights())
