"""Runs a spineseg binary with absl so that `--help` lists that binary's own flags.

absl's `--help` prints the docstring of `__main__` and the key flags of the "main module",
which it names by `sys.argv[0]`. Under `python -m data_prep.convert` that is the module
itself, but a console script's `__main__` is the wrapper pip writes into `.venv/bin`:
no docstring, no flags, so `spine-predict --help` listed nothing. `run(main)` declares the
flags of the module that defines `main` as key flags of `sys.argv[0]` and lends it that
module's docstring, then calls `app.run(main)`. It also makes `--help` exit 0 (absl exits
1): asking for help is not a failure, and enables `faulthandler`, so that a native crash
prints the Python stacks of every thread.

  def run() -> None:
    cli.run(main)
"""
from __future__ import annotations

import faulthandler
import os
import sys
from typing import Any, Callable

from absl import app
from absl import flags

# absl's short-help switches (its HelpFlag and alias) and the full-help one.
_SHORT_HELP = ("--help", "-help", "-?", "--helpshort", "-helpshort")
_FULL_HELP = ("--helpfull", "-helpfull")


def adopt_flags(module_name: str) -> None:
  """Makes the flags `module_name` defines show in `--help` of the running program.

  Args:
    module_name: dotted name of the module whose flags the program uses (the module of
      its `main`); "__main__" (run with `python -m`) needs nothing.
  """
  if module_name == "__main__":
    return  # absl already files __main__'s flags under sys.argv[0].
  fv = flags.FLAGS
  for flag in fv.get_key_flags_for_module(module_name):
    fv.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules.get("__main__")
  source = sys.modules.get(module_name)
  if main_module is not None and not main_module.__doc__ and source is not None:
    # The console-script wrapper has no docstring; absl prints __main__'s as the usage.
    main_module.__doc__ = source.__doc__


def _help_requested(argv: list[str]) -> str:
  """"short", "full" or "" for the help switch in `argv` (arguments after `--` excluded)."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in _SHORT_HELP:
      return "short"
    if arg in _FULL_HELP:
      return "full"
  return ""


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with the flags of `main`'s module listed by `--help` (exit 0).

  Call it after every flag of the binary is defined.
  """
  # A native crash (SIGSEGV, SIGABRT, ...) inside TensorFlow then prints every Python
  # thread's stack on stderr: where it happened, instead of a bare "Segmentation fault".
  faulthandler.enable()
  adopt_flags(main.__module__)
  wanted = _help_requested(sys.argv)
  if wanted:
    # Handled here rather than by absl's help flag, which exits 1 after printing.
    app.define_help_flags()  # idempotent; lists --help itself among the flags
    try:
      app.usage(shorthelp=wanted == "short", writeto_stdout=True)
      if wanted == "short":
        print("\nTry --helpfull to get a list of all flags.", flush=True)
    except BrokenPipeError:
      # `spine-predict --help | head`: the reader left; exit quietly, not with a traceback.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  app.run(main)
