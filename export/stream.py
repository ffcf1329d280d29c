"""Where spine-predict's steps run: one after another, or overlapping in threads.

`predict_lib` drives one loop, in input order, and hands each step to a `Stages`:
  read:    decode an input (PNG, NIfTI, DICOM) and check it (`Stages.read`);
  model:   one model call per volume or per batch of 2D slices (`Stages.model`), on one
           replica per device;
  finish:  an input's outputs made from the probabilities: labels, clean-up, overlay,
           report entry (`Stages.finish`);
  commit:  the outputs written and the outcome recorded (`Stages.finish`, `record`).
"sequential" stages run each step at once, in the caller's thread: today's loop.
"streaming" stages run reads a few inputs ahead, model calls in one thread per device,
finishing in a small pool, and commits in ONE thread in submission order, so that while
the model works on one input the next ones are decoded and the previous ones written.
Both get the same calls with the same batches in the same order, and commits happen in
the same order, so the outputs, the files listed and the failures are identical; a
commit that stops the run (`Stages.close` raises its error) skips every later commit, as
the sequential loop would never have reached them.

Memory stays bounded whatever the number of inputs: at most `READ_AHEAD` inputs are
decoded ahead of the model, and at most `CALLS_PER_DEVICE` model calls per device are
computed or their outputs not yet written (`Stages.model` waits for a slot).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import tensorflow as tf

PIPELINES = ("sequential", "streaming")
# Inputs decoded ahead of the model: enough to hide a slow decode behind a fast call.
READ_AHEAD = 4
READ_WORKERS = 2
FINISH_WORKERS = 2
# Model calls per device in flight (computing, or outputs not yet written): one computing
# while the previous one's outputs are written.
CALLS_PER_DEVICE = 2


def local_devices() -> list[str | None]:
  """Every local GPU (one model replica each), or [None]: TensorFlow's default device."""
  return [d.name for d in tf.config.list_logical_devices("GPU")] or [None]


class _Inline(concurrent.futures.Executor):
  """An executor that runs each call when it is submitted, in the caller's thread."""

  def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    try:
      future.set_result(fn(*args, **kwargs))
    except BaseException as e:  # pylint: disable=broad-exception-caught
      future.set_exception(e)  # raised where the result is asked for, as in a thread
    return future


class Call:
  """A model call in flight: its future, and the finish steps still to use it.

  Its device slot is given back (and its probabilities dropped) when the last of its
  `uses` commits is done.
  """

  def __init__(self, future: concurrent.futures.Future, uses: int,
               release: Callable[[], None]):
    self._future, self._uses, self._release = future, uses, release

  def result(self) -> Any:
    """The call's result (waits for it); raises the call's error."""
    return self._future.result()

  def used(self) -> None:
    """One use is committed (only the commit thread calls it)."""
    self._uses -= 1
    if self._uses == 0:
      self._future = None  # the probabilities can go before the next call's arrive
      self._release()


class Stages:
  """The executors of one predict run (see the module docstring).

  Attributes:
    stopped: set once a commit raised: nothing is committed after it.
  """

  def __init__(self, pipeline: str, devices: Sequence[str | None] | None = None):
    """Args:
      pipeline: one of `PIPELINES`.
      devices: the model's devices, one replica (a thread) each, for "streaming";
        None: `local_devices()`. "sequential" uses the default device.

    Raises:
      ValueError: an unknown pipeline, or no devices.
    """
    if pipeline not in PIPELINES:
      raise ValueError(f"pipeline must be one of {PIPELINES}, found {pipeline!r}")
    self.stopped = threading.Event()
    self._error: BaseException | None = None
    self._next_device = 0
    if pipeline == "sequential":
      self._devices, self._ahead = [None], 0
      self._read = self._finish = self._commit = _Inline()
      self._models = [_Inline()]
      self._slots = threading.Semaphore(1)  # released before the next call: never waits
      return
    self._devices = list(local_devices() if devices is None else devices)
    if not self._devices:
      raise ValueError("streaming needs at least one device")
    self._ahead = READ_AHEAD
    pool = concurrent.futures.ThreadPoolExecutor
    self._read = pool(READ_WORKERS, "spine-read")
    self._models = [pool(1, f"spine-model-{i}") for i in range(len(self._devices))]
    self._finish = pool(FINISH_WORKERS, "spine-finish")
    self._commit = pool(1, "spine-commit")  # one thread: commits in submission order
    self._slots = threading.Semaphore(CALLS_PER_DEVICE * len(self._devices))

  def read(self, fn: Callable[[Any], Any],
           items: Iterable[Any]) -> Iterator[concurrent.futures.Future]:
    """Yields the futures of `fn(item)` in the order of `items`, reading ahead.

    Stops submitting once `stopped`.
    """
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    for item in items:
      if self.stopped.is_set():
        return
      pending.append(self._read.submit(fn, item))
      if len(pending) > self._ahead:
        yield pending.popleft()
    while pending:
      yield pending.popleft()

  def model(self, fn: Callable[[], Any], uses: int) -> Call:
    """Runs the model call `fn()` on the next device, round robin.

    Waits for a free slot first (bounded memory). `uses`: the finish steps that will
    read its result (`finish(..., call=)`), each giving one use back when committed.
    """
    self._slots.acquire()
    i = self._next_device
    self._next_device = (i + 1) % len(self._devices)
    future = self._models[i].submit(_on_device, self._devices[i], fn)
    return Call(future, uses, self._slots.release)

  def finish(self, prepare: Callable[[], Any] | None,
             commit: Callable[[concurrent.futures.Future | None], None],
             call: Call | None = None) -> None:
    """Runs `prepare()` in the finish pool, then `commit(its future)` in order.

    `commit` runs after every commit submitted before it, and not at all once `stopped`;
    an error it raises stops the run (`close` raises it). `call`: the model call whose
    result `prepare` reads; one of its uses is given back after the commit, run or not.
    """
    prepared = None if prepare is None else self._finish.submit(prepare)
    self._commit.submit(self._committed, commit, prepared, call)

  def record(self, commit: Callable[[None], None]) -> None:
    """Runs `commit(None)` in order with the commits (e.g. a failed read's outcome)."""
    self.finish(None, commit)

  def _committed(self, commit, prepared, call) -> None:
    try:
      if not self.stopped.is_set():
        commit(prepared)
    except BaseException as e:  # pylint: disable=broad-exception-caught
      self._error = e  # raised by close(), in the caller's thread
      self.stopped.set()
    finally:
      if call is not None:
        call.used()

  def close(self) -> None:
    """Waits for every step submitted (unsubmitted reads are dropped once `stopped`).

    Raises:
      the error that stopped the run, if a commit raised one.
    """
    cancel = self.stopped.is_set()
    self._read.shutdown(wait=True, cancel_futures=cancel)
    for executor in self._models + [self._finish, self._commit]:
      executor.shutdown(wait=True)
    if self._error is not None:
      raise self._error


def _on_device(device: str | None, fn: Callable[[], Any]) -> Any:
  with tf.device(device) if device else contextlib.nullcontext():
    return fn()
