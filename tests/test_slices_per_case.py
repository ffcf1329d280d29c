"""spine-convert --slices_per_case: which slices a volume keeps; nothing else changes."""
import os
import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

from data_prep import manifest, phantom, slices, writer

SIZE = 32


def test_picks_are_the_middle_then_bisections_nearest_the_middle_first():
  # 57 labelled slices, as vb1_02: positions floor(f * 57) for f = 1/2, 1/4, 3/4, 3/8, 5/8.
  labelled = list(range(57))
  assert slices.pick_slices(labelled, 1) == [28]
  assert slices.pick_slices(labelled, 2) == [14, 28]
  assert slices.pick_slices(labelled, 3) == [14, 28, 42]
  assert slices.pick_slices(labelled, 4) == [14, 21, 28, 42]
  assert slices.pick_slices(labelled, 5) == [14, 21, 28, 35, 42]
  # Positions in the list of labelled slices, not slice indices: gaps are skipped.
  assert slices.pick_slices([3, 5, 9, 10, 20], 1) == [9]
  assert slices.pick_slices([3, 5, 9, 10, 20], 2) == [5, 9]
  assert slices.pick_slices([7, 8], 1) == [8]  # floor(1/2 * 2): the upper of two
  assert slices.pick_slices([3, 5], 5) == [3, 5]
  assert slices.pick_slices([3, 5], None) == [3, 5]
  assert slices.pick_slices([], 2) == []


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13, 57, 64])
def test_every_count_is_nested_in_the_next_and_reaches_every_slice(count):
  labelled = list(range(100, 100 + count))
  picks = [set(slices.pick_slices(labelled, n)) for n in range(1, count + 1)]
  assert all(len(p) == n for n, p in enumerate(picks, 1))
  assert all(a < b for a, b in zip(picks, picks[1:]))
  assert picks[-1] == set(labelled)


def _records(data_dir):
  files = manifest.load(data_dir).files("train")
  return [r.numpy() for r in tf.data.TFRecordDataset(files)]


def test_conversion_keeps_the_picked_slices_byte_for_byte_and_records_the_option(tmp_path):
  phantom.write_3d_dataset(tmp_path / "src", 2, seed=4, size=48, num_slices=12)

  def convert(out, **settings):
    options = writer.ConvertOptions(image_size=SIZE, num_workers=1, val_fraction=0,
                                    **settings)
    return writer.convert_dataset(str(tmp_path / "src" / "images"),
                                  str(tmp_path / "src" / "masks"), str(tmp_path / out),
                                  options, progress=False)

  every = convert("every")
  some = convert("some", slices_per_case=2)
  assert "slices_per_case" not in every["flags"]  # the default keeps dataset.json's bytes
  assert some["flags"]["slices_per_case"] == 2
  for full, cut in zip(every["cases"], some["cases"]):
    assert cut["slices_kept"] == slices.pick_slices(full["slices_kept"], 2)
    assert len(full["slices_kept"]) > 2  # else the option had nothing to do
  assert some["totals"]["slices_written"] == 4
  dropped = [s for s in some["skipped"]["slices"] if "--slices_per_case" in s["reason"]]
  assert len(dropped) == sum(len(c["slices_kept"]) - 2 for c in every["cases"])
  # The kept examples are those of the full conversion (normalized per whole volume).
  kept = _records(tmp_path / "some")
  assert len(kept) == 4 and set(kept) <= set(_records(tmp_path / "every"))


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_count_below_one_is_refused_in_one_line(tmp_path, value):
  with pytest.raises(ValueError, match=f"positive number of slices, found {value}"):
    writer.ConvertOptions(slices_per_case=int(value))
  if value != "0":
    return  # one binary run is enough to see the message reach the command line
  proc = subprocess.run(
      [sys.executable, "-m", "data_prep.convert", f"--images_dir={tmp_path}",
       f"--masks_dir={tmp_path}", f"--output_dir={tmp_path}/out",
       f"--slices_per_case={value}"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if "spine-convert" in line]
  assert errors == ["spine-convert: error: --slices_per_case must be a positive number of "
                    "slices, found 0 (leave it out to keep every slice)"], proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
