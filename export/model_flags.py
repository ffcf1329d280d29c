"""The flags that choose a model, its output head and how it is applied, shared by
spine-predict and spine-evaluate: one wording of --saved_model, --protocol,
--spacing_2d_mm and --tta for both.

Defining a flag here imports nothing heavy, so `--help` stays fast.
"""
from __future__ import annotations

from absl import flags


def define_saved_model(ensemble_note: str = "") -> flags.FlagHolder:
  """--saved_model: one export, an ensemble (A,B,C) or `pretrained`; required."""
  return flags.DEFINE_string(
      "saved_model", None, help="SavedModel version folder written by spine-export, or "
      "a comma-separated list of them (A,B,C): an ensemble averaging their "
      f"probabilities{ensemble_note}. `pretrained`: the model that ships with spineseg "
      "(export/pretrained_model/MODEL_CARD.md).", required=True)


def define_protocol(action: str, named_in: str) -> flags.FlagHolder:
  """--protocol: the labelling protocol whose head segments; `list` lists them.

  Args:
    action: what --protocol=list skips ("predicting", "scoring").
    named_in: where the command's output names the protocol used.
  """
  return flags.DEFINE_string(
      "protocol", None, help="The labelling protocol (spine-convert --protocol) whose "
      "output head segments, for models exported with one head per protocol (every "
      "--saved_model must have it); default: each model's own default. The names are in "
      "the export's metadata (assets.extra/spineseg.json, 'protocols'), and the error "
      "for an unknown name lists them. --protocol=list prints each model's protocols "
      f"(the default marked) and exits without {action} (no other flag is needed then). "
      f"{named_in}")


def define_spacing_2d(inputs: str) -> flags.FlagHolder:
  """--spacing_2d_mm: the pixel size of 2D `inputs` (e.g. "2D inputs")."""
  return flags.DEFINE_string(
      "spacing_2d_mm", None, help=f"mm per pixel of {inputs} (one value, or ROW,COLUMN); "
      "required for them when the model was trained with spine-convert "
      "--target_spacing_mm. NIfTI volumes carry their own spacing.")


def define_tta(scope: str = "") -> flags.FlagHolder:
  """--tta: scale test-time augmentation; `scope` says where it applies, if limited."""
  return flags.DEFINE_bool(
      "tta", False, help=f"Scale test-time augmentation{scope}: average the probabilities "
      "of each input sent at its spacing times 0.85, 1.0, 1.15 (export.inference."
      "TTA_SCALES; about 3x slower). Needs a model exported with --target_spacing_mm.")
