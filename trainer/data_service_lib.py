"""Starting tf.data service servers, and the dispatcher address spine-train accepts.

The library under `python -m trainer.data_service` (the binary: flags -> `start`), also
used by the tests and bench/pipeline_bench.py to run a service in-process. TensorFlow's
tf.data service (`tf.data.experimental.service`) does the work; nothing here schedules.
"""
from __future__ import annotations

import dataclasses
import re
import socket

_ADDRESS = re.compile(r"(?:grpc://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")
FORMAT = "grpc://HOST:PORT"


def check_address(address: str) -> str:
  """The dispatcher address `address` as tf.data wants it: "grpc://HOST:PORT".

  Args:
    address: "grpc://HOST:PORT" or "HOST:PORT" (an IPv6 host in brackets).

  Returns:
    The address with its protocol.

  Raises:
    ValueError: anything else (another protocol, no or a bad port), naming the format
      (the caller names the flag and its value).
  """
  match = _ADDRESS.fullmatch(address.strip())
  if not match or not 0 < int(match.group(2)) < 65536:
    raise ValueError(f"not a dispatcher address; expected {FORMAT} (the address "
                     "`python -m trainer.data_service` prints)")
  return f"grpc://{match.group(1)}:{int(match.group(2))}"


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
  """Fails fast when nothing listens at the dispatcher address (tf.data would retry for
  an hour).

  Raises:
    ValueError: naming the address, the OS reason and how to start a dispatcher.
  """
  match = _ADDRESS.fullmatch(check_address(address))
  host, port = match.group(1).strip("[]"), int(match.group(2))
  try:
    socket.create_connection((host, port), timeout=timeout_s).close()
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise ValueError(f"{check_address(address)}: no dispatcher answers ({reason}); start "
                     f"one with `python -m trainer.data_service --port={port}`") from None


@dataclasses.dataclass
class Servers:
  """tf.data service servers running in this process; `address` is what clients use."""
  address: str
  dispatcher: object | None
  workers: list

  def stop(self) -> None:
    for server in self.workers + ([self.dispatcher] if self.dispatcher else []):
      server.stop()


def start(*, port: int = 0, dispatcher: str = "", workers: int = 1, host: str = "localhost",
          work_dir: str = "") -> Servers:
  """Starts a dispatcher (no `dispatcher` given) and `workers` workers in this process.

  Args:
    port: the dispatcher's port (0: any free one); with `dispatcher`, the first worker's
      (the others take the next ports), 0: any.
    dispatcher: address of a running dispatcher to start workers for; "" starts one.
    workers: workers to start here (0 with a new dispatcher: a dispatcher only).
    host: the name of this machine as the trainer and the other workers reach it; each
      worker tells the dispatcher it is at host:port, and the trainer fetches from there.
    work_dir: the dispatcher's journal, so that a restarted dispatcher resumes its jobs
      ("": none, a restart loses them).

  Returns:
    The servers and the dispatcher address.

  Raises:
    ValueError: a malformed `dispatcher` address or a negative count.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  service = tf.data.experimental.service
  if workers < 0 or (dispatcher and workers < 1):
    raise ValueError(f"workers={workers}: expected >= 1 with a dispatcher address, "
                     ">= 0 without")
  server = None
  if dispatcher:
    try:
      address = check_address(dispatcher)
    except ValueError as e:
      raise ValueError(f"dispatcher {dispatcher!r}: {e}") from None
  else:
    server = service.DispatchServer(service.DispatcherConfig(
        port=port, work_dir=work_dir or None, fault_tolerant_mode=bool(work_dir)))
    address = f"grpc://{host}:{server.target.rsplit(':', 1)[1]}"
  started = []
  for i in range(workers):
    worker_port = port + i if dispatcher and port else 0
    started.append(service.WorkerServer(service.WorkerConfig(
        dispatcher_address=address.split("://", 1)[1], port=worker_port,
        # The default, localhost, would send a trainer on another machine to itself.
        worker_address=f"{host}:%port%")))
  return Servers(address, server, started)
