"""Prints the Dice table of `make demo` from spine-evaluate JSON files.

  .venv/bin/python tools/demo_summary.py demo_out/eval/*.json
"""
import json
import pathlib
import sys

CLASSES = ("dice_disc", "dice_vertebra", "dice_mean")  # data_prep.metrics.KEYS


def _fmt(value) -> str:
  return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def main(paths: list[str]) -> int:
  print(f"\n  {'Dice (mean over cases)':<24}" + "".join(f"{c:>20}" for c in CLASSES))
  for path in paths:
    scores = json.loads(pathlib.Path(path).read_text())
    dice = scores.get("overall", {}).get("mean", {}).get("dice", {})
    cases = len(scores.get("cases", []))
    label = f"{pathlib.Path(path).stem} ({cases} cases)"
    print(f"  {label:<24}" + "".join(f"{_fmt(dice.get(c, '-')):>20}" for c in CLASSES))
    for failure in scores.get("failures", []):
      print(f"    failed: {failure}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
