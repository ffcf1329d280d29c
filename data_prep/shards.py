"""The pieces both conversion engines share: the error type, the shard layout, the task.

`writer` (the local converter) and `beam_convert` (the same conversion on Apache Beam)
deal examples to shards with the one `ShardSet`, run each case through the one `work`,
and report output problems through `output_errors` as one-line `ConversionError`s, so the
two engines write the same bytes and the same messages. This module imports neither.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pathlib
from typing import Any, Iterator, Optional

from data_prep import fileio, schema, slices


class ConversionError(RuntimeError):
  """A fatal problem with the inputs or the output directory; the message says what."""


_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is mounted read-only",
}


@contextlib.contextmanager
def output_errors(doing: str, where: os.PathLike | str) -> Iterator[None]:
  """Turns OS and TensorFlow I/O errors on the output into one-line ConversionErrors.

  Args:
    doing: what was being done, e.g. "write the shards" ("cannot write the shards").
    where: the path the message names: the output directory the user chose, not the
      temporary file that failed (it is gone by the time the message is read).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    yield
  except OSError as e:
    hint = _ERRNO_HINTS.get(e.errno)
    detail = e.strerror or str(e)
    raise ConversionError(f"{where}: cannot {doing}: {detail}"
                          f"{f' ({hint})' if hint else ''}") from None
  except tf.errors.OpError as e:  # TFRecordWriter reports disk errors this way
    raise ConversionError(f"{where}: cannot {doing}: {e.message}") from None
  except fileio.FolderBusy as e:
    raise ConversionError(str(e)) from None


class ShardSet:
  """Writes one split's examples into temporary shard files, named only at the end.

  `staged=True`: the files are written by someone else (the Beam pipeline,
  `beam_convert`); `add` and `finish` then only deal examples to shards and count them,
  by the very same rule, so both engines lay out the shards alike.
  """

  def __init__(self, tmp_dir: Optional[pathlib.Path], split: str,
               num_shards: Optional[int], examples_per_shard: Optional[int],
               compression: str, staged: bool = False):
    self.tmp_dir, self.split, self.staged = tmp_dir, split, staged
    self.num_shards, self.per_shard = num_shards, examples_per_shard
    self.options = "GZIP" if compression == "gzip" else ""
    self.counts: list[int] = [0] * (num_shards or 0)
    self.writers: dict[int, Any] = {}
    self.total = 0

  def _writer(self, index: int):
    import tensorflow as tf  # Only the parent writes; workers never touch TF I/O.
    if index not in self.writers:
      with output_errors("write the shards", self._out()):
        self.writers[index] = tf.io.TFRecordWriter(str(self._tmp(index)), self.options)
    return self.writers[index]

  def _out(self) -> Optional[pathlib.Path]:
    """The output directory (errors name it, not the temporary folder removed after)."""
    return None if self.tmp_dir is None else self.tmp_dir.parent

  def _tmp(self, index: int) -> Optional[pathlib.Path]:
    if self.tmp_dir is None:  # dry run
      return None
    return self.tmp_dir / f"{self.split}-{index:05d}.part"

  def add(self, serialized: Optional[bytes]) -> int:
    """Deals the next example to its shard (written unless staged); returns the index."""
    if self.num_shards:  # Round robin: every shard gets a similar mix of cases.
      index = self.total % self.num_shards
    else:
      index = self.total // self.per_shard
      if index >= len(self.counts):
        if index - 1 in self.writers and not self.staged:
          with output_errors("write the shards", self._out()):
            self.writers.pop(index - 1).close()
        self.counts.append(0)
    self.counts[index] += 1
    self.total += 1
    if self.tmp_dir is not None and not self.staged:
      writer = self._writer(index)
      with output_errors("write the shards", self._out()):
        writer.write(serialized)
    return index

  def finish(self) -> list[tuple[pathlib.Path, str, int]]:
    """Closes the files; returns (temporary path, final name, examples) per shard."""
    if self.tmp_dir is not None and self.num_shards and not self.staged:
      for index in range(self.num_shards):  # Empty shards still exist as empty files.
        self._writer(index)
    with output_errors("write the shards", self._out()):
      for w in self.writers.values():
        w.close()
    self.writers = {}
    n = len(self.counts) if self.total else 0
    return [(self._tmp(i), schema.shard_name(self.split, i, n), self.counts[i])
            for i in range(n)]


def work(args) -> slices.CaseResult:
  """Runs one (image path, mask path, kwargs) conversion task: `slices.process_case`."""
  image_path, mask_path, kwargs = args
  return slices.process_case(image_path, mask_path, **kwargs)
