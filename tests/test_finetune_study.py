"""tools/finetune_study.sh ("How many slices must I label?") and tools/study_table.py.

The arithmetic of the table and the goal's verdict on hand-made cells; the whole script,
shrunk, on ../shared/data (skipped without it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _study_table():
  spec = importlib.util.spec_from_file_location("study_table",
                                                REPO / "tools" / "study_table.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


st = _study_table()


def _cell(arm, k, seed, dice, minutes):
  return {"arm": arm, "k": k, "seed": seed, "dice_vertebra": dice, "minutes": minutes}


def _cells(b4=(0.70, 0.74), c4=(0.71, 0.73), a=(0.60, 0.62), b_minutes=2.0,
           c_minutes=12.0):
  """Two seeds of a at k=0 and of b and c at k=1 and k=4."""
  cells = [_cell("a", 0, s, d, 12.0) for s, d in enumerate(a)]
  for k, (b, c) in {1: ((0.61, 0.65), (0.64, 0.66)), 4: (b4, c4)}.items():
    cells += [_cell("b", k, s, d, b_minutes) for s, d in enumerate(b)]
    cells += [_cell("c", k, s, d, c_minutes) for s, d in enumerate(c)]
  return cells


def test_summary_is_mean_min_max_and_minutes_over_seeds():
  summary = st.summarize([_cell("b", 4, 0, 0.70, 1.0), _cell("b", 4, 1, 0.76, 3.0),
                          _cell("b", 4, 2, 0.79, 2.0), _cell("a", 0, 0, 0.5, 10.0)])
  b4 = summary[("b", 4)]
  assert (b4.mean, b4.low, b4.high, b4.seeds, b4.minutes) == pytest.approx(
      (0.75, 0.70, 0.79, 3, 2.0))
  assert b4.spread == pytest.approx(0.045)
  assert list(summary) == [("a", 0), ("b", 4)]
  with pytest.raises(ValueError, match="two cells b_k4_seed0"):
    st.summarize([_cell("b", 4, 0, 0.7, 1.0), _cell("b", 4, 0, 0.8, 1.0)])


def test_table_has_a_row_per_k_with_each_arms_mean_spread_and_minutes():
  text = st.table(st.summarize(_cells()))
  rows = [line.split("|")[1:-1] for line in text.splitlines()[2:]]
  assert [r[0].strip() for r in rows] == ["0", "1", "4"]
  k0, _, k4 = ([c.strip() for c in r] for r in rows)
  assert k0[1:4] == ["0.610 ± 0.010 (2)", "", ""] and k0[4:] == ["12.0", "", ""]
  assert k4[1:4] == ["", "0.720 ± 0.020 (2)", "0.720 ± 0.010 (2)"]
  assert k4[4:] == ["", "2.0", "12.0"]


def test_goal_holds_when_b_reaches_c_fast_and_beats_a_by_the_margin():
  holds, lines = st.verdict(_cells())
  assert holds is True, lines
  assert ("k=4: (b) - (a) = +0.110; per seed, against its own base: +0.100 (seed 0), "
          "+0.120 (seed 1) (every seed >= 0.05)") in lines
  assert "k=1: (b) - (c) = -0.020 (inside the seed spread): reaches (c); minutes (b)/(c) " \
         "= 0.17 (<= 0.20)" in lines


@pytest.mark.parametrize("change, why", [
    (dict(b4=(0.60, 0.62), c4=(0.70, 0.72)), "below (c)"),          # b under c, apart
    (dict(b_minutes=3.0), "0.25 (> 0.20)"),                         # more than a fifth
    (dict(b4=(0.63, 0.66)), "+0.030 (seed 0), +0.040 (seed 1) (not every"),  # under 0.05
    # The mean gains 0.06, but seed 0's model is no better than its own base.
    (dict(b4=(0.60, 0.74), c4=(0.60, 0.74)), "+0.000 (seed 0), +0.120 (seed 1) (not every"),
])
def test_goal_fails_on_each_condition(change, why):
  holds, lines = st.verdict(_cells(**change))
  assert holds is False, lines
  assert any(why in line for line in lines), lines


def test_gain_over_the_base_is_paired_by_seed():
  # The bases' seeds lie 0.20 apart and each fine-tuned model gains 0.08 on its own base:
  # the arms' ranges overlap, yet every seed gains (the goal holds).
  cells = _cells(a=(0.50, 0.70), b4=(0.58, 0.78), c4=(0.58, 0.78))
  holds, lines = st.verdict(cells)
  assert holds is True, lines
  assert st.paired_gains(cells, 4) == pytest.approx({0: 0.08, 1: 0.08})
  # A seed of (b) without its base is not paired.
  assert st.paired_gains([c for c in cells if (c["arm"], c["seed"]) != ("a", 1)], 4) == \
      pytest.approx({0: 0.08})


def test_a_failed_condition_fails_the_goal_with_cells_missing():
  cells = [c for c in _cells(b4=(0.60, 0.62), c4=(0.70, 0.72))
           if not (c["arm"] == "c" and c["k"] == 1)]
  holds, lines = st.verdict(cells)
  assert holds is False and "k=1: (b) or (c) not measured" in lines, lines
  assert lines[-1].startswith("goal: does not hold"), lines
  # With one seed a failure is no result either.
  assert st.verdict([c for c in cells if c["seed"] == 0])[0] is None


def test_no_verdict_with_one_seed_or_a_missing_cell():
  one_seed = [c for c in _cells() if c["seed"] == 0]
  assert st.verdict(one_seed)[0] is None
  no_k4 = [c for c in _cells() if not (c["arm"] == "b" and c["k"] == 4)]
  holds, lines = st.verdict(no_k4)
  assert holds is None and "k=4: (b) or (c) not measured" in lines


def test_cell_from_an_evaluation_and_refusals():
  scores = {"cases": [{"case_id": "vb1_06", "dice": {"dice_vertebra": 0.5}},
                      {"case_id": "vb1_07", "dice": {"dice_vertebra": 0.7}}],
            "overall": {"pooled": {"dice": {"dice_vertebra": 0.62}}}, "failures": [],
            "protocol": "vb1"}
  cell = st.make_cell(arm="b", k=4, seed=1, seconds=90, scores=scores,
                      commands=["spine-train ..."], slices=4, init_from="a_k0_seed1")
  assert (cell["dice_vertebra"], cell["minutes"], cell["protocol"]) == (0.62, 1.5, "vb1")
  assert cell["dice_vertebra_per_volume"] == {"vb1_06": 0.5, "vb1_07": 0.7}
  with pytest.raises(ValueError, match="failed"):
    st.make_cell(arm="b", k=4, seed=1, seconds=1, commands=[],
                 scores=dict(scores, failures=["vb1_07: unreadable"]))
  with pytest.raises(ValueError, match="arm 'd'"):
    st.make_cell(arm="d", k=4, seed=1, seconds=1, scores=scores, commands=[])


def test_plot_is_svg_with_a_bar_per_arm_and_k(tmp_path):
  svg = st.plot_svg(st.summarize(_cells()))
  root = ET.fromstring(svg)
  ns = "{http://www.w3.org/2000/svg}"
  titles = [t.text for t in root.iter(f"{ns}title")]
  assert len(titles) == 5  # a at k=0; b and c at k=1 and k=4
  assert "(b) fine-tuned, k=4: 0.720 (0.700-0.740, 2 seeds)" in titles
  assert len(list(root.iter(f"{ns}polyline"))) == 2  # b and c; a is one point + dashes


# ------------------------------------------------------------------ the script, shrunk

def test_script_runs_shrunk_on_the_shared_data_and_resumes(tmp_path):
  if not all((DATA / sub).is_dir() for sub in ("spine2d", "spine3d", "spine3d_extra")):
    pytest.skip(f"{DATA} (spine2d, spine3d, spine3d_extra) is absent")
  out = tmp_path / "study"
  env = dict(os.environ, PYTHON=sys.executable, STUDY_OUT=str(out), STUDY_SEEDS="0",
             STUDY_K="2", STUDY_EPOCHS="1", STUDY_STEPS="2", STUDY_FT_EPOCHS="1",
             STUDY_FT_STEPS="2", STUDY_IMAGE_SIZE="64", STUDY_SCORE="vb1_06",
             STUDY_FT_FLAGS="--learning_rate=3e-4 --freeze=encoder --freeze_epochs=1",
             STUDY_TRAIN_FLAGS="--base_filters=4 --depth=2", TF_CPP_MIN_LOG_LEVEL="3")
  script = str(REPO / "tools" / "finetune_study.sh")
  # Arms a and b first, c in a second run that finds them measured.
  first = subprocess.run([script], capture_output=True, text=True, timeout=1200,
                         env=dict(env, STUDY_ARMS="a b"), cwd=tmp_path)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert sorted(p.stem for p in (out / "cells").glob("*.json")) == ["a_k0_seed0",
                                                                   "b_k2_seed0"]
  proc = subprocess.run([script], capture_output=True, text=True, timeout=1200, env=env,
                        cwd=tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count("measured before") == 2
  names = sorted(p.stem for p in (out / "cells").glob("*.json"))
  assert names == ["a_k0_seed0", "b_k2_seed0", "c_k2_seed0"]
  cells = {n: json.loads((out / "cells" / f"{n}.json").read_text()) for n in names}
  for name, cell in cells.items():
    assert 0 <= cell["dice_vertebra"] <= 1 and cell["minutes"] > 0, name
    assert sorted(cell["dice_vertebra_per_volume"]) == ["vb1_06"]
  assert cells["a_k0_seed0"]["protocol"] == "spine2d"  # the base has no vb1 head
  assert cells["b_k2_seed0"]["protocol"] == cells["c_k2_seed0"]["protocol"] == "vb1"
  assert cells["b_k2_seed0"]["slices"] == 2
  # The commands of a cell reproduce it: the base's, then its own fine-tuning.
  b2 = cells["b_k2_seed0"]["commands"]
  assert any("--model_dir=" in c and "runs/a_seed0" in c for c in b2)
  tune = [c for c in b2 if "trainer.main" in c][-1]
  for flag in ("--init_from=", "--deterministic", "--epochs=1", "--learning_rate=3e-4",
               "--base_filters=4", "new_k2"):
    assert flag in tune, tune
  # The k-slice folder: one labelled slice of each volume (k = 1 is vb1_02's alone).
  manifest = json.loads((out / "data" / "new_k2" / "dataset.json").read_text())
  assert [c["id"] for c in manifest["cases"]] == ["vb1_02", "vb1_03"]
  assert all(len(c["slices_kept"]) == 1 and c["split"] == "train"
             for c in manifest["cases"])
  assert manifest["flags"]["slices_per_case"] == 1
  base = json.loads((out / "runs" / "a_seed0" / "config.json").read_text())
  assert base["dataset_weights"] == "1,1" and base["deterministic"]
  assert "| 0 |" in proc.stdout and "goal: cannot be judged" in proc.stdout
  ET.fromstring((out / "study.svg").read_text())
  # Rerun: every cell was measured, nothing trains again.
  before = {n: (out / "cells" / f"{n}.json").read_bytes() for n in names}
  again = subprocess.run([script], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "spine-train: done" not in again.stdout and "slices from" not in again.stdout
  assert again.stdout.count("measured before") == 3
  assert before == {n: (out / "cells" / f"{n}.json").read_bytes() for n in names}
  # Other settings in the same folder are refused.
  other = subprocess.run([script], capture_output=True, text=True, timeout=600,
                         env=dict(env, STUDY_FT_STEPS="3"), cwd=tmp_path)
  assert other.returncode == 1 and "other settings" in other.stderr
