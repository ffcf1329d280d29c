"""Trainer throughput per configuration on this machine, printed as one table.

  python bench/train_bench.py          # GPUs: 5 configurations; CPU only: a <1 min smoke run
  python bench/train_bench.py --configs=bf16+xla,bf16+xla+host --per_replica_batch=64

Converts phantom slices once (`data_prep.phantom` -> `convert_dataset`, no val split),
then runs the real `spine-train` (`python -m trainer.main`, one subprocess per
configuration, --strategy=mirrored over every visible GPU, or the CPU) and reads the
last epoch of its history.json: `images_per_second` and `input_wait_fraction`, both
from `trainer.callbacks.InputWait` (step time only: no checkpoint, no validation).
A configuration is `PRECISION[+xla][+host]`: PRECISION is fp32, bf16 (mixed_bfloat16) or
fp16 (mixed_float16); +xla passes --jit_compile; +host augments in tf.data
(--augment_on=host) instead of in the train step (device). Ratios are to the first row
that ran.
Without a GPU the defaults shrink to a smoke run (64 px, tiny U-Net) whose figures say
nothing about accelerators.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_PRECISIONS = {"fp32": "none", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
# (GPU default, CPU default) of each flag left unset.
_DEFAULTS = {"configs": ("fp32,fp32+xla,bf16,bf16+xla,bf16+xla+host", "fp32,fp32+host"),
             "image_size": (256, 64), "slices": (1024, 64), "per_replica_batch": (32, 8),
             "base_filters": (32, 8), "depth": (4, 3), "epochs": (3, 2)}

_CONFIGS = flags.DEFINE_string("configs", None, help="Comma-separated configurations.")
_SIZE = flags.DEFINE_integer("image_size", None, help="Side of the converted squares.")
_SLICES = flags.DEFINE_integer("slices", None, help="Phantom slices (one epoch).")
_BATCH = flags.DEFINE_integer("per_replica_batch", None, help="Batch per replica.")
_FILTERS = flags.DEFINE_integer("base_filters", None, help="U-Net width.")
_DEPTH = flags.DEFINE_integer("depth", None, help="U-Net depth.")
_EPOCHS = flags.DEFINE_integer("epochs", None,
                               help="Epochs per configuration; the last one is reported.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 900, help="Limit per configuration.")


def parse_config(name: str) -> list[str]:
  """spine-train flags of one configuration name; ValueError for an unknown part."""
  precision, *extras = name.split("+")
  if precision not in _PRECISIONS or not set(extras) <= {"xla", "host"}:
    raise ValueError(f"configuration {name!r}: expected PRECISION[+xla][+host] with "
                     f"PRECISION in {sorted(_PRECISIONS)}")
  return [f"--mixed_precision={_PRECISIONS[precision]}",
          "--jit_compile" if "xla" in extras else "--nojit_compile",
          "--augment_on=host" if "host" in extras else "--augment_on=device"]


def setting(holder, gpus: int):
  return holder.value if holder.value is not None else _DEFAULTS[holder.name][gpus == 0]


def make_data(root: pathlib.Path, slices: int, size: int) -> str:
  from data_prep import phantom  # pylint: disable=g-import-not-at-top
  from data_prep import writer
  phantom.write_2d_dataset(root / "raw", slices, seed=0)
  writer.convert_dataset(str(root / "raw" / "images"), str(root / "raw" / "masks"),
                         str(root / "data"),
                         writer.ConvertOptions(val_fraction=0.0, image_size=size),
                         progress=False)
  return str(root / "data")


def run_config(name: str, data_dir: str, model_dir: str, global_batch: int,
               gpus: int) -> dict:
  """Runs spine-train for one configuration; its last epoch's figures (or an error)."""
  command = [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}",
             f"--model_dir={model_dir}", f"--epochs={setting(_EPOCHS, gpus)}",
             f"--global_batch_size={global_batch}", "--optimizer=adamw",
             "--learning_rate=1e-3", "--loss=dice_ce", "--norm=group",
             f"--base_filters={setting(_FILTERS, gpus)}", f"--depth={setting(_DEPTH, gpus)}",
             "--strategy=mirrored", "--seed=0"] + parse_config(name)
  try:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=_TIMEOUT.value)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {_TIMEOUT.value} s"}
  if done.returncode:
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "rror" in l or "FATAL" in l] or lines
    return {"error": f"exit {done.returncode}: {errors[-1][:160] if errors else ''}"}
  history = json.loads((pathlib.Path(model_dir) / "history.json").read_text())
  last = history[-1]
  return {"images_per_second": last["images_per_second"],
          "input_wait": last["input_wait_fraction"],
          "first_epoch_s": history[0]["seconds"]}


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  devices = tf.config.list_physical_devices("GPU")
  gpus = len(devices)
  names = [tf.config.experimental.get_device_details(d).get("device_name", d.name)
           for d in devices]
  configs = setting(_CONFIGS, gpus).split(",")
  for name in configs:
    parse_config(name)  # Refuse a typo before minutes of work.
  replicas = max(1, gpus)
  batch = setting(_BATCH, gpus) * replicas
  size = setting(_SIZE, gpus)
  with tempfile.TemporaryDirectory(prefix="train_bench.") as tmp:
    root = pathlib.Path(tmp)
    data_dir = make_data(root, setting(_SLICES, gpus), size)
    results = {}
    for i, name in enumerate(configs):
      results[name] = run_config(name, data_dir, str(root / f"run{i}"), batch, gpus)
      print(f"{name}: {results[name]}", flush=True)
  where = (f"{gpus} GPU ({', '.join(sorted(set(names)))})" if gpus else
           f"CPU only, {os.cpu_count()} cores: a smoke run, not an accelerator figure")
  print(f"\ntrain_bench: {where}, TF {tf.__version__}; {setting(_SLICES, gpus)} slices "
        f"{size}x{size} per epoch, U-Net base {setting(_FILTERS, gpus)} depth "
        f"{setting(_DEPTH, gpus)}, group norm, global batch {batch}, "
        f"{setting(_EPOCHS, gpus)} epochs, last epoch reported")
  print("| configuration | images/s | per replica | ratio | input wait | epoch 1 (compile) |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  base = None
  for name, r in results.items():
    if "error" in r:
      print(f"| {name} | failed: {r['error']} | | | | |")
      continue
    base = base or r["images_per_second"]
    print(f"| {name} | {r['images_per_second']:.1f} | {r['images_per_second'] / replicas:.1f}"
          f" | {r['images_per_second'] / base:.2f} | {100 * r['input_wait']:.1f}% | "
          f"{r['first_epoch_s']:.1f} s |")
  if any("error" in r for r in results.values()):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
