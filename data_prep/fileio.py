"""Writing files so that nothing half-written ever looks finished, and progress bars.

`atomic_write` is THE way spineseg writes an output file: the content goes to a hidden
temporary name in the target's folder (same suffix, so PIL and nibabel pick the format
from the name), is made readable by others (0644, like the shards: a serving or QC
account is often another user), and is renamed into place. A crash or a full disk leaves
the old file (or none), never a truncated one; `TMP_PREFIX` names the leftovers of a
`kill -9`, which `remove_stale_temporaries` clears on the next run.

`Progress` is THE progress bar: one line on stderr with count, rate and ETA.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

TMP_PREFIX = ".tmp-spineseg-"
FILE_MODE = 0o644
DIR_MODE = 0o755


def temporary_path(path: str | os.PathLike) -> pathlib.Path:
  """The hidden temporary name `atomic_write` uses for `path` (same folder and suffix)."""
  path = pathlib.Path(path)
  return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
  """Calls `write(tmp_path)`, then renames the temporary file to `path`.

  Args:
    path: the final file.
    write: writes the whole content to the path it receives.

  Returns:
    `path` as a pathlib.Path.

  Raises:
    Whatever `write` or the file system raises; the temporary file is removed first.
  """
  path = pathlib.Path(path)
  tmp = temporary_path(path)
  try:
    write(str(tmp))
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  """Writes `obj` as indented, key-sorted JSON with `atomic_write`."""
  text = json.dumps(obj, indent=2, sort_keys=True) + "\n"

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return atomic_write(path, write)


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes `text` with `atomic_write`."""
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return atomic_write(path, write)


def remove_stale_temporaries(folder: str | os.PathLike,
                             patterns: tuple[str, ...] = ()) -> list[pathlib.Path]:
  """Deletes leftovers of killed runs in `folder`: `TMP_PREFIX*` files plus `patterns`.

  Returns:
    The paths removed (callers may name them).
  """
  import shutil  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  removed = []
  if not folder.is_dir():
    return removed
  for pattern in (TMP_PREFIX + "*",) + tuple(patterns):
    for p in sorted(folder.glob(pattern)):
      if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
      else:
        p.unlink(missing_ok=True)
      removed.append(p)
  return removed


def make_readable(root: str | os.PathLike) -> None:
  """chmod a tree to 0755 folders / 0644 files (mkdtemp and mkstemp create 0700/0600)."""
  root = pathlib.Path(root)
  os.chmod(root, DIR_MODE)
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      os.chmod(os.path.join(dirpath, d), DIR_MODE)
    for f in filenames:
      os.chmod(os.path.join(dirpath, f), FILE_MODE)


class Progress:
  """A one-line progress bar on stderr: `label [####....] done/total unit, rate, ETA`.

  Redrawn at most every 0.2 s (and always at the end); silent when disabled.
  """

  def __init__(self, total: int, label: str, *, unit: str = "", enabled: bool = True,
               stream=None):
    self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
    self.done = 0
    self._stream = stream or sys.stderr
    self._start = self._last = time.monotonic()

  def step(self, n: int = 1, extra: str = "") -> None:
    """Advances by `n`; `extra` is appended to the line (e.g. "512 slices")."""
    self.done += n
    now = time.monotonic()
    finished = self.done >= self.total
    if not self.enabled or (not finished and now - self._last < 0.2):
      return
    self._last = now
    elapsed = max(now - self._start, 1e-9)
    eta = (self.total - self.done) * elapsed / self.done if self.done else 0.0
    width = 30
    filled = int(width * min(self.done, self.total) / max(self.total, 1))
    unit = f" {self.unit}" if self.unit else ""
    self._stream.write(
        f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
        f"{unit}{', ' + extra if extra else ''} ETA {int(eta) // 60}:{int(eta) % 60:02d} ")
    if finished:
      self._stream.write("\n")
    self._stream.flush()


class FolderBusy(RuntimeError):
  """Another process holds the lock; the message names the folder (and the holder)."""


class FolderLock:
  """An exclusive, non-blocking `flock` held while a program writes into a folder.

  Two modes: lock the folder itself (`lock_file=None`: nothing is created, for outputs
  that must stay empty until published, like spine-convert's), or a lock file in it
  (created, with the holder's pid and host written in, so a refused run can name who holds
  it: spine-train's `MODEL_DIR/.lock`). The lock belongs to the open descriptor, so the
  kernel drops it when the holder exits in any way, `kill -9` included: a dead run never
  leaves a folder locked. (flock is advisory and, on some network file systems, local to
  one machine.) Use as a context manager.
  """

  def __init__(self, folder: str | os.PathLike, what: str, lock_file: str | None = None):
    self.folder, self.what = pathlib.Path(folder), what
    self.path = self.folder / lock_file if lock_file else self.folder
    self._fd: int | None = None

  def __enter__(self) -> "FolderLock":
    import fcntl  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    is_file = self.path != self.folder
    fd = (os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE) if is_file
          else os.open(self.path, os.O_RDONLY))
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode("utf-8", "replace").split() if is_file else []
      os.close(fd)
      who = f" (pid {holder[0]} on {' '.join(holder[1:])}, holding {self.path})" if holder else ""
      raise FolderBusy(f"{self.folder} is in use by another {self.what}{who}; wait for it "
                       "to end or choose another folder") from None
    if is_file:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing the descriptor releases the flock.
      self._fd = None
