"""The table and plot of tools/finetune_study.sh ("How many slices must I label?").

  .venv/bin/python tools/study_table.py out/finetune_study

reads STUDY_OUT/cells/*.json (one per arm, k and seed), prints a markdown table (rows k,
columns: vertebra Dice of each arm as mean ± half the min-max range over seeds, and the
training minutes), says whether the issue's goal holds, and writes STUDY_OUT/study.svg
(Dice against k, error bars from the lowest to the highest seed). The arms:

  a  the base model (the recipe without the new scanner) as it is: k = 0
  b  the base fine-tuned on the k labelled slices only
  c  the recipe from scratch on the base data plus the k slices

The goal (issue 21): at every k, (b) reaches (c) -- it is not below (c) by more than the
seeds spread, i.e. the highest (b) seed is not under the lowest (c) seed -- in at most a
fifth of (c)'s training minutes; and at k = 4 (b) beats (a) by at least 0.05 Dice in
every seed, each seed's fine-tuned model against its own base (the seed-S cell of (b)
starts from the seed-S base, so the base's seed-to-seed spread is not a difference
between the arms; comparing the arms' ranges would count it twice). (b) and (c) are
trained apart: they differ "outside the spread" when their min-max ranges over seeds do
not overlap; a difference inside it is not a result. One seed per cell gives no spread:
no verdict.

The script also writes each cell through this file:

  study_table.py --cell=CELL.json --arm=b --k=4 --seed=0 --seconds=95.2 \
      --eval_json=EVAL.json --commands=COMMANDS.sh [--slices=4] [--init_from=CELL]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any, Optional, Sequence

ARMS = {"a": "(a) base as it is", "b": "(b) fine-tuned", "c": "(c) from scratch"}
GOAL_K = 4           # the k at which (b) must beat (a)
GOAL_MARGIN = 0.05   # by this much vertebra Dice
GOAL_TIME = 1 / 5    # (b)'s training minutes over (c)'s, at most
COLORS = {"a": "#7f7f7f", "b": "#1f77b4", "c": "#d62728"}


# ------------------------------------------------------------------------------- cells

def cell_name(arm: str, k: int, seed: int) -> str:
  """The file stem of a cell, e.g. "b_k4_seed0"."""
  return f"{arm}_k{k}_seed{seed}"


def _commit() -> Optional[str]:
  """The checkout's commit (with "+changes" when the tree differs), None outside git."""
  here = pathlib.Path(__file__).resolve().parent
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=here, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+changes" if dirty.strip() else "")


def make_cell(*, arm: str, k: int, seed: int, seconds: float, scores: dict[str, Any],
              commands: Sequence[str], slices: Optional[int] = None,
              init_from: Optional[str] = None) -> dict[str, Any]:
  """One cell of the study from a spine-evaluate JSON of the scoring volumes.

  Args:
    arm: "a", "b" or "c" (`ARMS`).
    k: labelled slices of the new scanner trained on (0 for arm a).
    seed: the training seed.
    seconds: wall time of the cell's spine-train call.
    scores: spine-evaluate's JSON (folder mode) on the scoring volumes.
    commands: the command lines that reproduce the cell, in order.
    slices: slices of the new scanner the cell trained on, read from the converted
      folder's dataset.json (None for arm a).
    init_from: the cell whose model arm b started from.

  Returns:
    {"arm", "k", "seed", "dice_vertebra" (pooled over every voxel of the volumes),
    "dice_vertebra_per_volume" {case id: Dice}, "minutes", "protocol" (the head scored),
    "slices", "init_from", "commands", "commit"}.

  Raises:
    ValueError: an unknown arm, or scores without a vertebra Dice (failed cases).
  """
  if arm not in ARMS:
    raise ValueError(f"arm {arm!r}: expected one of {', '.join(ARMS)}")
  if scores.get("failures"):
    raise ValueError(f"the evaluation of {cell_name(arm, k, seed)} failed on "
                     f"{scores['failures']}")
  try:
    pooled = float(scores["overall"]["pooled"]["dice"]["dice_vertebra"])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"{cell_name(arm, k, seed)}: the evaluation holds no pooled "
                     "vertebra Dice") from None
  return {"arm": arm, "k": k, "seed": seed, "dice_vertebra": pooled,
          "dice_vertebra_per_volume": {r["case_id"]: r["dice"]["dice_vertebra"]
                                       for r in scores["cases"]},
          "minutes": seconds / 60, "protocol": scores.get("protocol"), "slices": slices,
          "init_from": init_from, "commands": list(commands), "commit": _commit()}


def write_json(path: pathlib.Path, value: Any) -> None:
  """Writes `value` as JSON to a temporary name, then renames it: no half cell."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(value, indent=2) + "\n")
  tmp.replace(path)


def load_cells(study_out: pathlib.Path) -> list[dict[str, Any]]:
  """Every cell under STUDY_OUT/cells, in file-name order."""
  return [json.loads(p.read_text()) for p in sorted((study_out / "cells").glob("*.json"))]


# ----------------------------------------------------------------------- the figures

@dataclasses.dataclass(frozen=True)
class Stat:
  """One (arm, k) over its seeds: vertebra Dice mean, lowest and highest, and minutes."""
  mean: float
  low: float
  high: float
  seeds: int
  minutes: float   # mean training minutes over the seeds

  @property
  def spread(self) -> float:
    """Half the min-max range: the "±" of the table."""
    return (self.high - self.low) / 2


def summarize(cells: Sequence[dict[str, Any]]) -> dict[tuple[str, int], Stat]:
  """{(arm, k): its Stat over the seeds}, sorted by arm then k.

  Raises:
    ValueError: two cells of one arm, k and seed.
  """
  groups: dict[tuple[str, int], dict[int, dict]] = {}
  for cell in cells:
    seeds = groups.setdefault((cell["arm"], int(cell["k"])), {})
    if cell["seed"] in seeds:
      raise ValueError(f"two cells {cell_name(cell['arm'], cell['k'], cell['seed'])}")
    seeds[cell["seed"]] = cell
  out = {}
  for key in sorted(groups):
    dice = [c["dice_vertebra"] for c in groups[key].values()]
    minutes = [c["minutes"] for c in groups[key].values()]
    out[key] = Stat(mean=sum(dice) / len(dice), low=min(dice), high=max(dice),
                    seeds=len(dice), minutes=sum(minutes) / len(minutes))
  return out


def ks_of(summary: dict[tuple[str, int], Stat]) -> list[int]:
  return sorted({k for _, k in summary})


def table(summary: dict[tuple[str, int], Stat]) -> str:
  """The markdown table: one row per k, Dice and minutes of each arm."""
  def dice(stat):
    return "" if stat is None else f"{stat.mean:.3f} ± {stat.spread:.3f} ({stat.seeds})"

  def minutes(stat):
    return "" if stat is None else f"{stat.minutes:.1f}"

  header = ["k"] + [f"{ARMS[a]}: Dice" for a in ARMS] + [f"({a}) min" for a in ARMS]
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for k in ks_of(summary):
    stats = [summary.get((a, k)) for a in ARMS]
    lines.append("| " + " | ".join([str(k)] + [dice(s) for s in stats]
                                    + [minutes(s) for s in stats]) + " |")
  return "\n".join(lines)


def _apart(x: Stat, y: Stat) -> bool:
  """Whether the min-max ranges over seeds of `x` and `y` do not overlap."""
  return x.high < y.low or y.high < x.low


def _where(x: Stat, y: Stat) -> str:
  return "outside the seed spread" if _apart(x, y) else "inside the seed spread"


def paired_gains(cells: Sequence[dict[str, Any]], k: int) -> dict[int, float]:
  """{seed: (b)'s Dice at k minus (a)'s} over the seeds that have both cells."""
  dice = {(c["arm"], int(c["k"]), c["seed"]): c["dice_vertebra"] for c in cells}
  return {seed: dice[("b", k, seed)] - dice[("a", 0, seed)]
          for arm, kk, seed in sorted(dice)
          if (arm, kk) == ("b", k) and ("a", 0, seed) in dice}


def verdict(cells: Sequence[dict[str, Any]]) -> tuple[Optional[bool], list[str]]:
  """Whether the issue's goal holds (module docstring), with one line per check.

  Returns:
    (True or False; None when it cannot be judged: one seed only in some cell, or a cell
    missing while every measured condition holds), the lines.
  """
  summary = summarize(cells)
  lines, checks, judged = [], [], True
  base = summary.get(("a", 0))
  for k in [k for k in ks_of(summary) if k > 0]:
    b, c = summary.get(("b", k)), summary.get(("c", k))
    if b is None or c is None:
      lines.append(f"k={k}: (b) or (c) not measured")
      judged = False
      continue
    reaches = not (b.high < c.low)
    ratio = b.minutes / c.minutes if c.minutes > 0 else float("inf")
    checks += [reaches, ratio <= GOAL_TIME]
    lines.append(f"k={k}: (b) - (c) = {b.mean - c.mean:+.3f} ({_where(b, c)}): "
                 f"{'reaches' if reaches else 'below'} (c); minutes (b)/(c) = "
                 f"{ratio:.2f} ({'<=' if ratio <= GOAL_TIME else '>'} {GOAL_TIME:.2f})")
  b4 = summary.get(("b", GOAL_K))
  if base is None or b4 is None:
    lines.append(f"k={GOAL_K}: (b) - (a) not measured")
    judged = False
  else:
    gains = paired_gains(cells, GOAL_K)
    every = bool(gains) and min(gains.values()) >= GOAL_MARGIN
    checks.append(every)
    per_seed = ", ".join(f"{g:+.3f} (seed {s})" for s, g in gains.items())
    lines.append(f"k={GOAL_K}: (b) - (a) = {b4.mean - base.mean:+.3f}; per seed, against "
                 f"its own base: {per_seed or 'no seed has both'} "
                 f"({'every seed >=' if every else 'not every seed >='} {GOAL_MARGIN})")
  one_seed = any(s.seeds < 2 for s in summary.values())
  if one_seed:
    lines.append("fewer than 2 seeds in some cell: no spread, no verdict")
    judged = False
  if not judged:
    if not all(checks) and not one_seed:
      # A condition that failed on cells of two seeds or more fails whatever the missing
      # cells show.
      lines.append("goal: does not hold (a condition above fails; the cells not "
                   "measured cannot change that)")
      return False, lines
    lines.append("goal: cannot be judged")
    return None, lines
  holds = all(checks)
  lines.append(f"goal: {'holds' if holds else 'does not hold'} ((b) reaches (c) in at most "
               f"{GOAL_TIME:.0%} of its minutes at every k, and beats (a) by >= "
               f"{GOAL_MARGIN} at k={GOAL_K} in every seed)")
  return holds, lines


def plot_svg(summary: dict[tuple[str, int], Stat], width: int = 640,
             height: int = 400) -> str:
  """An SVG of vertebra Dice against k: one line per arm, bars from lowest to highest
  seed; arm (a), measured at k = 0 only, also as a dashed line across the plot."""
  left, right, top, bottom = 60, 20, 20, 80
  ks = ks_of(summary) or [0]
  x_hi = max(max(ks), 1)
  values = [v for s in summary.values() for v in (s.low, s.high)] or [0.0, 1.0]
  # The axis spans whole tenths (twentieths when narrow), one gridline per tick.
  y_lo = max(0.0, math.floor((min(values) - 0.02) * 10) / 10)
  y_hi = min(1.0, math.ceil((max(values) + 0.02) * 10) / 10)
  y_hi = y_hi if y_hi > y_lo else y_lo + 0.1
  tick = 0.1 if y_hi - y_lo > 0.3 else 0.05
  ticks = round((y_hi - y_lo) / tick)
  pw, ph = width - left - right, height - top - bottom

  def px(k):
    return left + k / x_hi * pw

  def py(y):
    return top + ph - (y - y_lo) / (y_hi - y_lo) * ph

  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12" '
         'role="img" aria-label="vertebra Dice against labelled slices k">',
         f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
         'stroke="#888"/>']
  for k in ks:
    out.append(f'<text x="{px(k):.1f}" y="{top + ph + 16}" text-anchor="middle">{k}</text>')
  for i in range(ticks + 1):
    y = y_lo + tick * i
    out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" '
               f'stroke="#eee"/><text x="{left - 6}" y="{py(y) + 4:.1f}" '
               f'text-anchor="end">{y:.2f}</text>')
  out.append(f'<text x="{left + pw / 2:.0f}" y="{top + ph + 34}" text-anchor="middle">'
             'labelled slices of the new scanner (k)</text>')
  out.append(f'<text transform="translate(16 {top + ph / 2:.0f}) rotate(-90)" '
             'text-anchor="middle">vertebra Dice (pooled)</text>')
  for i, arm in enumerate(ARMS):
    color, points = COLORS[arm], [(k, summary[(a, k)]) for a, k in summary if a == arm]
    if arm == "a" and points:
      y = py(points[0][1].mean)
      out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                 f'stroke="{color}" stroke-dasharray="5,4"/>')
    if len(points) > 1:
      line = " ".join(f"{px(k):.1f},{py(s.mean):.1f}" for k, s in points)
      out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                 f'points="{line}"/>')
    for k, s in points:
      out.append(f'<line x1="{px(k):.1f}" y1="{py(s.low):.1f}" x2="{px(k):.1f}" '
                 f'y2="{py(s.high):.1f}" stroke="{color}" stroke-width="1.5"/>'
                 f'<circle cx="{px(k):.1f}" cy="{py(s.mean):.1f}" r="3.5" fill="{color}">'
                 f'<title>{ARMS[arm]}, k={k}: {s.mean:.3f} ({s.low:.3f}-{s.high:.3f}, '
                 f'{s.seeds} seeds)</title></circle>')
    lx, ly = left + i * pw / 3, height - 20
    out.append(f'<line x1="{lx:.0f}" y1="{ly}" x2="{lx + 18:.0f}" y2="{ly}" '
               f'stroke="{color}" stroke-width="3"/><text x="{lx + 24:.0f}" '
               f'y="{ly + 4}">{ARMS[arm]}</text>')
  out.append("</svg>")
  return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ command line

def _write_cell(args: argparse.Namespace) -> None:
  scores = json.loads(pathlib.Path(args.eval_json).read_text())
  commands = [line for line in pathlib.Path(args.commands).read_text().splitlines()
              if line.strip()]
  cell = make_cell(arm=args.arm, k=args.k, seed=args.seed, seconds=args.seconds,
                   scores=scores, commands=commands, slices=args.slices,
                   init_from=args.init_from)
  write_json(pathlib.Path(args.cell), cell)
  print(f"study: {args.cell}: vertebra Dice {cell['dice_vertebra']:.3f}, "
        f"{cell['minutes']:.1f} training minutes")


def _report(study_out: pathlib.Path) -> None:
  cells = load_cells(study_out)
  if not cells:
    raise ValueError(f"{study_out / 'cells'}: no cells (run tools/finetune_study.sh)")
  summary = summarize(cells)
  print(table(summary))
  print("\nDice: vertebra, pooled over the scoring volumes; mean ± half the min-max range "
        "over (seeds). min: minutes of the cell's spine-train call, mean over seeds "
        "((b): the fine-tuning only, the base's are (a)'s).\n")
  _, lines = verdict(cells)
  print("\n".join(lines))
  svg = study_out / "study.svg"
  svg.write_text(plot_svg(summary))
  print(f"\nplot: {svg}")


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("study_out", nargs="?", help="STUDY_OUT of tools/finetune_study.sh")
  parser.add_argument("--cell", help="write this cell (the script's use) instead")
  parser.add_argument("--arm", choices=sorted(ARMS))
  parser.add_argument("--k", type=int)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--seconds", type=float)
  parser.add_argument("--eval_json")
  parser.add_argument("--commands")
  parser.add_argument("--slices", type=int)
  parser.add_argument("--init_from")
  args = parser.parse_args(argv)
  try:
    if args.cell:
      missing = [f"--{n}" for n in ("arm", "k", "seed", "seconds", "eval_json", "commands")
                 if getattr(args, n) is None]
      if missing:
        parser.error(f"--cell needs {', '.join(missing)}")
      _write_cell(args)
    elif args.study_out:
      _report(pathlib.Path(args.study_out))
    else:
      parser.error("give STUDY_OUT (or --cell and its settings)")
  except (OSError, ValueError, KeyError) as e:
    print(f"study_table: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
