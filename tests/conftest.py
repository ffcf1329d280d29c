"""Shared pytest fixtures: the real data folder (tests skip cleanly without it)."""
import os
import pathlib

import pytest

# Keep TensorFlow quiet and on the CPU threads we have; tests use small models.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  """The real scans in ../shared/data; skips the test when they are absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent")
  return SHARED_DATA
