"""Bazel py_test entry point: runs the pytest files given as arguments.

  bazel test //tests:test_phantom   # runs: pytest_runner.py tests/test_phantom.py
"""
import os
import sys

import pytest


def main() -> int:
  args = ["-q", "-p", "no:cacheprovider"] + sys.argv[1:]
  # Bazel collects JUnit XML from this path when it sets it.
  if os.environ.get("XML_OUTPUT_FILE"):
    args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
  return pytest.main(args)


if __name__ == "__main__":
  sys.exit(main())
