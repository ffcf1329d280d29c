"""The flags that choose a model and its output head, shared by spine-predict and
spine-evaluate: one wording of --saved_model and --protocol for both.

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
