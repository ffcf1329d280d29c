r"""spine-inspect: a QC report (one HTML page + PNG mosaics) of a converted dataset.

Reads the shards as the trainer does and writes OUTPUT/index.html (opens from disk: no
server, no network, no JavaScript), OUTPUT/mosaic_<split>.png (slices with the disc and
vertebra outlines, the padding striped; viewable without a browser) and
OUTPUT/summary.json. See `inspect_lib` for what the page holds.

  spine-convert --images_dir=../shared/data/spine2d/images \
      --masks_dir=../shared/data/spine2d/masks --output_dir=/tmp/spine2d_tfr
  spine-inspect --data_dir=/tmp/spine2d_tfr --output=/tmp/spine2d_report
  spine-inspect --data_dir=/tmp/spine2d_tfr --output=/tmp/spine2d_report --all --overwrite

The report folder appears only when complete (built under a hidden name, then renamed).
"""
from __future__ import annotations

import sys

from absl import app, flags

from data_prep import cli  # first: it quiets TensorFlow before anything loads it
from data_prep import inspect_lib

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, help="Converted dataset (the --output_dir of spine-convert).",
    required=True)
_OUTPUT = flags.DEFINE_string(
    "output", None, help="Report folder to write; must be absent or empty unless "
    "--overwrite.", required=True)
_ALL = flags.DEFINE_bool(
    "all", False, help="Show every slice in the mosaics, not only the middle kept slice "
    "of each case.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, help="Replace an earlier spine-inspect report in --output (a "
    "folder holding anything else is refused even then).")
_MAX_TILES = flags.DEFINE_integer(
    "max_tiles_per_mosaic", inspect_lib.DEFAULT_MAX_TILES, lower_bound=1,
    help="Slices per mosaic PNG; more make more PNGs, so a large dataset stays viewable.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    result = inspect_lib.write_report(
        _DATA_DIR.value, _OUTPUT.value, all_slices=_ALL.value,
        max_tiles_per_mosaic=_MAX_TILES.value, overwrite=_OVERWRITE.value,
        progress=sys.stderr.isatty())  # no bar in logs and captured output
  except (inspect_lib.InspectError, ValueError, OSError) as e:
    cli.fail(str(e))
  for warning in result["warnings"]:
    print(f"{cli.command_name()}: warning: {warning}", file=sys.stderr)
  print(f"{result['cases']} cases, {result['tiles']} slices drawn in "
        f"{result['seconds']:.1f} s; report: {result['output']}/index.html")


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
