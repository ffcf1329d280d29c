"""Writing files so that nothing half-written ever looks finished, and progress bars.

`atomic_write` is THE way spineseg writes an output file: the content goes to a hidden
temporary name in the target's folder (same suffix, so PIL and nibabel pick the format
from the name), is made readable by others (0644, like the shards: a serving or QC
account is often another user), and is renamed into place. A crash or a full disk leaves
the old file (or none), never a truncated one; `TMP_PREFIX` names the leftovers of a
`kill -9`, which `remove_stale_temporaries` clears on the next run.

`Progress` is THE progress bar: one line on stderr with count, rate and ETA.

Paths may be local or any URL `tf.io.gfile` opens (`gs://`, `hdfs://`, `s3://` with the
plugin, `ram://`): `path` is THE constructor (a `pathlib.Path` for a local path, a
`RemotePath` with the same methods for a URL: `pathlib.Path("gs://b/x")` would silently
become the local `gs:/b/x`), and `open_file`, `rename`, `remove_tree`, `make_temp_dir`,
`local_copy` do the rest. Local paths keep their plain-Python fast paths; TensorFlow is
imported only when a URL is touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import sys
import time
import uuid
from typing import Any, Callable, Iterator

TMP_PREFIX = ".tmp-spineseg-"
FILE_MODE = 0o644
DIR_MODE = 0o755


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (`scheme://...`) that goes through tf.io.gfile; False for local."""
  return isinstance(path, RemotePath) or "://" in os.fspath(path)


def path(p: str | os.PathLike) -> "pathlib.Path | RemotePath":
  """THE path constructor: `pathlib.Path` for a local path, `RemotePath` for a URL."""
  if isinstance(p, RemotePath):
    return p
  text = os.fspath(p)
  return RemotePath(text) if "://" in text else pathlib.Path(text)


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


@contextlib.contextmanager
def _os_errors(url: str) -> Iterator[None]:
  """tf.errors as the OSErrors callers already handle (NotFoundError: FileNotFoundError)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    yield
  except tf.errors.NotFoundError as e:
    raise FileNotFoundError(2, e.message, url) from None
  except tf.errors.AlreadyExistsError as e:
    raise FileExistsError(17, e.message, url) from None
  except tf.errors.PermissionDeniedError as e:
    raise PermissionError(13, e.message, url) from None
  except tf.errors.OpError as e:
    raise OSError(5, e.message, url) from None


class _Stat:
  def __init__(self, size: int):
    self.st_size = size


class RemotePath:
  """A `scheme://...` path with the `pathlib.Path` methods spineseg uses, on tf.io.gfile.

  There are no symlinks and no relative URLs: `is_symlink` is False, `resolve`,
  `expanduser` and `absolute` return the path itself. Errors are OSErrors (as
  `_os_errors`), so callers handle both kinds of path alike.
  """

  def __init__(self, url: str):
    scheme, _, rest = url.partition("://")
    # Empty parts go ("a//b" is "a/b"), but not a leading "/": file:///abs/path.
    rest = ("/" if rest.startswith("/") else "") + "/".join(
        part for part in rest.split("/") if part)
    self._scheme, self._rest = scheme, rest
    self._url = f"{scheme}://{rest}"

  def __fspath__(self) -> str:
    return self._url

  def __str__(self) -> str:
    return self._url

  def __repr__(self) -> str:
    return f"RemotePath({self._url!r})"

  def __eq__(self, other) -> bool:
    return isinstance(other, RemotePath) and other._url == self._url

  def __hash__(self) -> int:
    return hash(self._url)

  def __lt__(self, other) -> bool:
    return str(self) < str(other)

  def __truediv__(self, other: str | os.PathLike) -> "RemotePath":
    return RemotePath(f"{self._url}/{os.fspath(other)}")

  @property
  def name(self) -> str:
    return self._rest.rpartition("/")[2]

  @property
  def parent(self) -> "RemotePath":
    head = self._rest.rpartition("/")[0]
    return RemotePath(f"{self._scheme}://{head}") if head else self

  @property
  def suffix(self) -> str:
    return pathlib.PurePosixPath(self.name).suffix

  @property
  def stem(self) -> str:
    return pathlib.PurePosixPath(self.name).stem

  def with_name(self, name: str) -> "RemotePath":
    return self.parent / name

  def relative_to(self, other: "RemotePath") -> pathlib.PurePosixPath:
    prefix = str(other) + "/"
    if not self._url.startswith(prefix):
      raise ValueError(f"{self} is not in {other}")
    return pathlib.PurePosixPath(self._url[len(prefix):])

  def resolve(self) -> "RemotePath":
    return self

  expanduser = absolute = resolve

  def exists(self) -> bool:
    return _gfile().exists(self._url)

  def is_dir(self) -> bool:
    return _gfile().isdir(self._url)

  def is_file(self) -> bool:
    return self.exists() and not self.is_dir()

  def is_symlink(self) -> bool:
    return False

  def iterdir(self) -> list["RemotePath"]:
    with _os_errors(self._url):
      return [self / name.rstrip("/") for name in _gfile().listdir(self._url)]

  def glob(self, pattern: str) -> list["RemotePath"]:
    with _os_errors(self._url):
      return [RemotePath(p) for p in _gfile().glob(f"{self._url}/{pattern}")]

  def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
    if self.exists():
      if exist_ok and self.is_dir():
        return
      raise FileExistsError(17, "File exists", self._url)
    if not parents and not self.parent.is_dir() and self.parent != self:
      raise FileNotFoundError(2, "No such file or directory", str(self.parent))
    with _os_errors(self._url):
      _gfile().makedirs(self._url)

  def rmdir(self) -> None:
    if self.iterdir():
      raise OSError(39, "Directory not empty", self._url)
    with _os_errors(self._url):
      _gfile().rmtree(self._url)

  def unlink(self, missing_ok: bool = False) -> None:
    try:
      with _os_errors(self._url):
        _gfile().remove(self._url)
    except FileNotFoundError:
      if not missing_ok:
        raise

  def stat(self) -> _Stat:
    with _os_errors(self._url):
      return _Stat(_gfile().stat(self._url).length)

  def open(self, mode: str = "r", encoding: str | None = None):  # pylint: disable=unused-argument
    with _os_errors(self._url):
      return _gfile().GFile(self._url, mode)

  def read_bytes(self) -> bytes:
    with _os_errors(self._url), self.open("rb") as f:
      return f.read()

  def read_text(self, encoding: str | None = "utf-8", errors: str = "strict") -> str:
    return self.read_bytes().decode(encoding or "utf-8", errors)

  def write_bytes(self, data: bytes) -> None:
    with _os_errors(self._url), self.open("wb") as f:
      f.write(data)

  def write_text(self, text: str, encoding: str | None = "utf-8") -> None:
    self.write_bytes(text.encode(encoding or "utf-8"))


def open_file(p: str | os.PathLike, mode: str = "r"):
  """`open` for local paths (UTF-8 text), `tf.io.gfile.GFile` for URLs."""
  if is_remote(p):
    return RemotePath(os.fspath(p)).open(mode)
  return open(p, mode, encoding=None if "b" in mode else "utf-8")  # pylint: disable=consider-using-with


def sha256(p: str | os.PathLike) -> str:
  """SHA-256 of a file's bytes (local or URL), as `sha256sum` prints it.

  Raises:
    OSError: the file cannot be read.
  """
  digest = hashlib.sha256()
  with open_file(p, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Renames `src` to `dst`, replacing a file (or an empty folder) there.

  Local paths: os.replace, atomic. URLs: gfile.rename per file, atomic where the file
  system renames atomically (HDFS); object stores such as `gs://` or `s3://` copy then
  delete, so a reader may briefly see both names, though never a partial object. A URL
  folder moves file by file (not every gfile file system renames folders: `ram://` does
  not), its deepest files first, so its own top-level files (a SavedModel's
  saved_model.pb) arrive last; a reader may see it incomplete until then.
  """
  if not (is_remote(src) or is_remote(dst)):
    os.replace(src, dst)
    return
  src, dst = os.fspath(src), os.fspath(dst)
  gfile = _gfile()
  with _os_errors(dst):
    if gfile.isdir(dst) and not gfile.listdir(dst):
      gfile.rmtree(dst)  # as os.replace, which replaces an empty folder
    if not gfile.isdir(src):
      gfile.rename(src, dst, overwrite=True)
      return
    moves = []
    for folder, _, files in gfile.walk(src):
      rel = folder[len(src):].strip("/")
      gfile.makedirs(f"{dst}/{rel}" if rel else dst)
      moves += [(rel.count("/") + bool(rel), f"{rel}/{name}" if rel else name)
                for name in files]
    for _, rel in sorted(moves, key=lambda m: (-m[0], m[1])):
      # `ram://` lists by name prefix: folder `a` also "holds" `.x` when `a.x` exists.
      if gfile.exists(f"{src}/{rel}"):
        gfile.rename(f"{src}/{rel}", f"{dst}/{rel}", overwrite=True)
  remove_tree(src)


def remove_tree(p: str | os.PathLike) -> None:
  """Deletes a folder and everything in it; a missing folder or a failure is ignored."""
  if is_remote(p):
    try:
      with _os_errors(os.fspath(p)):
        _gfile().rmtree(os.fspath(p))
    except OSError:
      pass
  else:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(p, ignore_errors=True)


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> "pathlib.Path | RemotePath":
  """A new folder named `prefix...` in `parent` (tempfile.mkdtemp locally)."""
  if is_remote(parent):
    folder = path(parent) / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder
  import tempfile  # pylint: disable=g-import-not-at-top
  return pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def source(p: str | os.PathLike):
  """What `PIL.Image.open` and `np.load` read: the path itself when local, else the
  URL's bytes as an `io.BytesIO`."""
  if not is_remote(p):
    return p
  import io  # pylint: disable=g-import-not-at-top
  return io.BytesIO(RemotePath(os.fspath(p)).read_bytes())


@contextlib.contextmanager
def local_copy(p: str | os.PathLike) -> Iterator[str]:
  """A local path holding the file `p`, for libraries that read only local files
  (nibabel's .nii.gz, Keras' .keras archives): `p` itself, or a temporary copy under
  the system's temp folder, same name, removed after."""
  if not is_remote(p):
    yield os.fspath(p)
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix=TMP_PREFIX)
  try:
    local = os.path.join(folder, path(p).name)
    with _os_errors(os.fspath(p)):
      _gfile().copy(os.fspath(p), local, overwrite=True)
    yield local
  finally:
    remove_tree(folder)


def temporary_path(p: str | os.PathLike) -> "pathlib.Path | RemotePath":
  """The hidden temporary name `atomic_write` uses for `p` (same folder and suffix)."""
  p = path(p)
  return p.with_name(f"{TMP_PREFIX}{os.getpid()}-{p.name}")


def write_file(p: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Calls `write(local_path)` to make the file `p`, readable by others (0644).

  A local `p` is written in place; for a URL, `write` gets a local temporary file (PIL,
  numpy, nibabel and Keras write only local files), copied to `p` after.
  """
  if not is_remote(p):
    write(os.fspath(p))
    os.chmod(p, FILE_MODE)
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix=TMP_PREFIX)
  try:
    local = os.path.join(folder, path(p).name)
    write(local)
    with _os_errors(os.fspath(p)):
      _gfile().copy(local, os.fspath(p), overwrite=True)
  finally:
    remove_tree(folder)


def atomic_write(p: str | os.PathLike,
                 write: Callable[[str], None]) -> "pathlib.Path | RemotePath":
  """Calls `write(tmp_path)`, then renames the temporary file to `p`.

  Args:
    p: the final file, local or a URL (`write` gets a local path either way: see
      `write_file`).
    write: writes the whole content to the path it receives.

  Returns:
    `p` as `path(p)`.

  Raises:
    Whatever `write` or the file system raises; the temporary file is removed first.
  """
  target = path(p)
  tmp = temporary_path(target)
  try:
    write_file(tmp, write)
    rename(tmp, target)
  except BaseException:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass
    raise
  return target


def write_json_atomic(path: str | os.PathLike, obj: Any) -> "pathlib.Path | RemotePath":
  """Writes `obj` as indented, key-sorted JSON with `atomic_write`."""
  return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> "pathlib.Path | RemotePath":
  """Writes `text` (UTF-8) with `atomic_write`."""
  return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> "pathlib.Path | RemotePath":
  """Writes `data` with `atomic_write`."""
  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)
  return atomic_write(path, write)


def remove_stale_temporaries(folder: str | os.PathLike,
                             patterns: tuple[str, ...] = ()) -> list[pathlib.Path]:
  """Deletes leftovers of killed runs in `folder`: `TMP_PREFIX*` files plus `patterns`.

  Returns:
    The paths removed (callers may name them).
  """
  folder = path(folder)
  removed = []
  if not folder.is_dir():
    return removed
  for pattern in (TMP_PREFIX + "*",) + tuple(patterns):
    for p in sorted(folder.glob(pattern)):
      if p.is_dir() and not p.is_symlink():
        remove_tree(p)
      else:
        p.unlink(missing_ok=True)
      removed.append(p)
  return removed


def make_readable(root: str | os.PathLike) -> None:
  """chmod a tree to 0755 folders / 0644 files (mkdtemp and mkstemp create 0700/0600).

  A URL is left alone: who may read an object store is the store's setting."""
  if is_remote(root):
    return
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

  A URL folder (no flock there) gets a best-effort marker file instead, in both modes
  (`lock_file`, or `REMOTE_LOCK_NAME`): present means busy, and its holder is named.
  It is checked, then written, then read back, so two runs starting in the same second
  on two machines can both pass; and a killed run leaves it behind. A marker of a dead
  process on this same host is taken over; any other is refused with its file named,
  to be deleted by hand once that run is known to be over.
  """

  REMOTE_LOCK_NAME = ".spineseg-lock"

  def __init__(self, folder: str | os.PathLike, what: str, lock_file: str | None = None):
    self.folder, self.what = path(folder), what
    if is_remote(self.folder):
      self.path = self.folder / (lock_file or self.REMOTE_LOCK_NAME)
    else:
      self.path = self.folder / lock_file if lock_file else self.folder
    self._fd: int | None = None
    self._marker: str | None = None

  def _enter_remote(self) -> "FolderLock":
    import socket  # pylint: disable=g-import-not-at-top
    host = socket.gethostname()
    if self.path.exists():
      holder = self.path.read_text().split()
      alive = True
      if len(holder) >= 2 and holder[1] == host and holder[0].isdigit():
        try:
          os.kill(int(holder[0]), 0)
        except ProcessLookupError:
          alive = False
        except PermissionError:
          pass
      if alive:
        who = f" (pid {holder[0]} on {' '.join(holder[1:2])})" if len(holder) >= 2 else ""
        raise FolderBusy(f"{self.folder} is in use by another {self.what}{who}; wait for it "
                         f"to end, or delete {self.path} if it is known to be over")
    marker = f"{os.getpid()} {host} {uuid.uuid4().hex}\n"
    write_text_atomic(self.path, marker)
    if self.path.read_text() != marker:
      raise FolderBusy(f"{self.folder} is in use by another {self.what} (it wrote "
                       f"{self.path} at the same time); wait for it to end")
    self._marker = marker
    return self

  def __enter__(self) -> "FolderLock":
    import fcntl  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    if is_remote(self.folder):
      return self._enter_remote()
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
    if self._marker is not None:
      self._marker = None
      try:
        self.path.unlink(missing_ok=True)
      except OSError:
        pass  # Best effort, like the lock itself; the next run names the file.
    if self._fd is not None:
      os.close(self._fd)  # Closing the descriptor releases the flock.
      self._fd = None
