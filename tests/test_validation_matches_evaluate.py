"""The trainer's validation Dice and `spine-evaluate --data_dir --split=val` agree.

Both use `data_prep.metrics` (one count layout, one Dice, padding excluded); this test
trains a tiny U-Net on phantom slices of several shapes (so the stored squares carry
padding), exports it, scores the val split with the SavedModel, and compares the pooled
figures with the trainer's history for the epoch whose model was kept.
"""
import json

import numpy as np
import pytest

from data_prep import metrics
from data_prep import phantom
from data_prep import writer
from export import evaluate_lib
from export import inference
from export import serving
from trainer import train


def test_trainer_validation_equals_spine_evaluate(tmp_path):
  raw = tmp_path / "raw"
  phantom.write_2d_dataset(raw, num_cases=8, seed=3, min_size=32, max_size=64)
  data_dir = tmp_path / "data"
  m = writer.convert_dataset(str(raw / "images"), str(raw / "masks"), str(data_dir),
                             writer.ConvertOptions(image_size=32, val_fraction=0.4,
                                                   num_workers=1),
                             progress=False)
  val_cases = [c for c in m["cases"] if c["split"] == "val"]
  # The test means something only if some val slice is padded in its square.
  assert any(c["shape"][1] != c["shape"][2] for c in val_cases)

  model_dir = tmp_path / "model"
  config = train.TrainConfig(data_dir=str(data_dir), model_dir=str(model_dir), epochs=3,
                             base_filters=4, depth=2, global_batch_size=2, norm="group",
                             learning_rate=3e-3, verbose=0)
  result = train.train_and_evaluate(config)
  history = json.loads((model_dir / "history.json").read_text())
  kept = max(history, key=lambda e: e["val_dice_mean"])  # the epoch best.keras holds
  assert result["best_val_dice_mean"] == pytest.approx(kept["val_dice_mean"])

  export_dir = serving.export(str(model_dir), str(tmp_path / "export" / "1"))
  model = inference.load_saved_model(export_dir)
  report = evaluate_lib.evaluate_split(model, str(data_dir), "val")
  pooled = report["overall"]["pooled"]["dice"]
  assert list(pooled) == list(metrics.KEYS)
  for key in metrics.KEYS:
    if pooled[key] == metrics.ABSENT:
      assert f"val_{key}" not in kept
    else:
      assert pooled[key] == pytest.approx(kept[f"val_{key}"], abs=1e-6), key

  # Padding is not counted: the true pixels are exactly the fitted slices' areas.
  true_pixels = int(np.sum([r["counts"] for r in report["cases"]], axis=0)[:, 2].sum())
  valid = 0
  for c in val_cases:
    g = writer.preprocess.fit_geometry(c["shape"][1], c["shape"][2], 32)
    valid += g.resized_height * g.resized_width * len(c["slices_kept"])
  assert true_pixels == valid < 32 * 32 * sum(len(c["slices_kept"]) for c in val_cases)
