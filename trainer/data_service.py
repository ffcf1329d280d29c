"""A tf.data service for spine-train: a dispatcher and workers that run its input pipeline.

  python -m trainer.data_service --port=5050 --workers=2      # dispatcher + 2 workers
  python -m trainer.data_service --dispatcher=gpu-host:5050   # on each other machine
  spine-train --data_dir=/shared/spine2d_tfr --model_dir=/tmp/unet \
      --data_service=grpc://gpu-host:5050

The first command prints the address to pass to `spine-train --data_service`. Workers
read the shards at the paths spine-train names (a shared file system), parse them and,
with --augment_on=host, augment them; spine-train only receives finished batches. Each
command blocks until Ctrl-C. TensorFlow's own tf.data service does the work
(`tf.data.experimental.service`); this module only starts its servers. Bad flags end it
with one line `data_service: error: ...` and exit status 1.
"""
import signal
import socket
import threading

from absl import flags

from data_prep import cli  # first: it quiets TensorFlow before anything loads it
from trainer import data_service_lib

_PORT = flags.DEFINE_integer(
    "port", 5050, help="The dispatcher's port; with --dispatcher, the first worker's "
    "(more workers take the next ports; unset there: any free ports). 0: any free port.")
_DISPATCHER = flags.DEFINE_string(
    "dispatcher", "", help="HOST:PORT of a running dispatcher: start workers for it "
    "here. Empty: start a dispatcher.")
_WORKERS = flags.DEFINE_integer(
    "workers", 1, help="Workers started in this process (beside the dispatcher when "
    "--dispatcher is empty; 0 then: a dispatcher only). Each runs its own copy of the "
    "input pipeline.")
_HOST = flags.DEFINE_string(
    "host", socket.gethostname(), help="This machine's name as the trainer and the "
    "workers reach it.")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", "", help="Dispatcher only: a folder for its journal, so that a restarted "
    "dispatcher resumes its jobs. Empty: none.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; settings are --flags")
  if _DISPATCHER.value:
    try:
      data_service_lib.check_address(_DISPATCHER.value)
    except ValueError as e:
      cli.fail(f"--dispatcher={_DISPATCHER.value}: {e}")
  if _DISPATCHER.value and _WORK_DIR.value:
    cli.fail("--work_dir is the dispatcher's journal; workers (--dispatcher) have none")
  # Ctrl-C or SIGTERM (a container's stop) from here on only asks for a clean stop: a
  # KeyboardInterrupt raised between two statements could escape the loop below.
  stop = threading.Event()
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda *_: stop.set())
  try:
    # Workers beside a dispatcher on the same machine must not race it for its port.
    port = _PORT.value if _PORT.present or not _DISPATCHER.value else 0
    servers = data_service_lib.start(port=port, dispatcher=_DISPATCHER.value,
                                     workers=_WORKERS.value, host=_HOST.value,
                                     work_dir=_WORK_DIR.value)
  except ValueError as e:
    cli.fail(str(e))
  if servers.dispatcher is not None:
    print(f"data_service: dispatcher at {servers.address} with {len(servers.workers)} "
          f"local worker(s); train with spine-train --data_service={servers.address}; "
          "Ctrl-C stops", flush=True)
  else:
    print(f"data_service: {len(servers.workers)} worker(s) for {servers.address}; "
          "Ctrl-C stops", flush=True)
  while not stop.wait(1):  # join() would block in C++, out of reach of the signal.
    pass
  servers.stop()
  print("data_service: stopped", flush=True)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
