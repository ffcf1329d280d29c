"""Packs a spine-train run as the model that ships with spineseg (`make pretrained`).

  python tools/pack_pretrained.py RUN_DIR [OUTPUT_DIR]

OUTPUT_DIR defaults to export/pretrained_model. Prints the weights digest that
MODEL_CARD.md records (tests/test_pretrained.py checks the two agree).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from export import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: list[str]) -> None:
  if len(argv) not in (2, 3):
    sys.exit("usage: python tools/pack_pretrained.py RUN_DIR [OUTPUT_DIR]")
  output = argv[2] if len(argv) == 3 else pretrained.MODEL_DIR
  try:
    digest = pretrained.pack(argv[1], output)
  except FileNotFoundError as e:
    sys.exit(f"pack_pretrained: error: {e}")
  size = (pathlib.Path(output) / pretrained.MODEL_FILE).stat().st_size
  print(f"pack_pretrained: wrote {output} ({size / 2**20:.1f} MiB); weights sha256 {digest}")


if __name__ == "__main__":
  main(sys.argv)
