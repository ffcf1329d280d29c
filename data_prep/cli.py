"""The one runner of every spineseg binary: `--help`, errors in one line, a quiet TensorFlow.

  from data_prep import cli  # first of the project's imports: see "TensorFlow" below

  def main(argv):
    ...
    cli.fail("--output_json=x: expected a file, found a folder")  # exits 1

  def run() -> None:
    cli.run(main)

Errors. Every fault a user can fix ends the command with ONE line on stderr,
`spine-predict: error: MESSAGE`, and exit status 1: an unknown flag, a bad flag value, a
missing required flag (absl would print `FATAL Flags parsing error` and a hint), an
`app.UsageError` raised by `main` (absl would print the whole usage text), and whatever
`main` hands to `fail`. The usage text comes only with `--help`.

Help. absl's `--help` prints the docstring of `__main__` and the key flags of the "main
module", which it names by `sys.argv[0]`. Under `python -m data_prep.convert` that is the
module itself, but a console script's `__main__` is the wrapper pip writes into
`.venv/bin`: no docstring, no flags. `run(main)` declares the flags of the module that
defines `main` as key flags of `sys.argv[0]` and lends it that module's docstring. It
also makes `--help` exit 0 (absl exits 1): asking for help is not a failure. And it
enables `faulthandler`, so that a native crash prints the Python stacks of every thread.

TensorFlow. Importing this module sets TF_CPP_MIN_LOG_LEVEL=3 unless the user set it, so
that TensorFlow's C++ start-up lines (oneDNN, CPU instructions, CUDA probing, and on a
machine without a GPU an alarming `E0000 ... failed call to cuInit`) do not bury the
command's own output. A few of them are written while TensorFlow loads, before its
logging reads that variable (`WARNING: All log messages before absl::InitializeLog() is
called are written to STDERR` and what follows it); those are held back by filtering
stderr during the first `import tensorflow` by the same level. `TF_CPP_MIN_LOG_LEVEL=0`
shows everything again (1: from warnings, 2: from errors).
"""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import os
import re
import sys
import tempfile
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags

# absl's short-help switches (its HelpFlag and alias) and the full-help one.
_SHORT_HELP = ("--help", "-help", "-?", "--helpshort", "-helpshort")
_FULL_HELP = ("--helpfull", "-helpfull")

_TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
# FATAL only: the ERROR on GPU-less machines (`failed call to cuInit`) comes at every start.
_DEFAULT_TF_LOG_LEVEL = "3"
# A line of absl's C++ log: severity letter, MMDD, time (before the log is set up: 00:00 and
# seconds since 1970), thread id, file:line].
_NATIVE_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")
_PRE_INIT_WARNING = "WARNING: All log messages before absl::InitializeLog() is called"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


# The module of the running binary's `main` (`run` records it): names the command.
_main_module = "__main__"


@functools.lru_cache(maxsize=None)
def command_name() -> str:
  """The name the user runs this command by, e.g. "spine-predict", for its messages.

  A console script runs under its own name (`sys.argv[0]`). Otherwise the name is the
  console script that setup.py declares for the module of the binary's `main`
  (`python -m export.predict`: "spine-predict"), or the module's last component when it
  has none (`python -m trainer.data_service`: "data_service").
  """
  script = os.path.basename(sys.argv[0] if sys.argv else "")
  if script.startswith("spine-"):
    return script
  module = _main_module
  if module == "__main__":  # `python -m MODULE`: its __spec__ has the dotted name
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None:  # a file run as a script
      return os.path.splitext(script)[0] or "spineseg"
    module = spec.name
  for entry in importlib.metadata.entry_points(group="console_scripts"):
    if entry.value.split(":")[0] == module:
      return entry.name
  return module.rsplit(".", 1)[-1]


def fail(message: str) -> NoReturn:
  """Ends the command: `COMMAND: error: MESSAGE` on stderr, exit status 1."""
  sys.stdout.flush()  # what was printed before comes first, also when both are one file
  print(f"{command_name()}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def fail_if_any(failures: Sequence[str], total: int, unit: str = "inputs") -> None:
  """Lists failed inputs and ends with one line counting them; returns if there are none.

  Args:
    failures: one message per failed input, each naming its file.
    total: how many inputs the run had (failed ones included).
    unit: what the inputs are called in the closing line ("inputs", "cases").
  """
  if not failures:
    return
  sys.stdout.flush()
  for message in failures:
    print(f"  {message}", file=sys.stderr)
  fail(f"{len(failures)} of {max(total, len(failures))} {unit} failed (listed above)")


def _flag_error(error: flags.Error) -> str:
  """absl's flag error as one line, a missing required flag said plainly."""
  message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  message = message.removeprefix("ERROR:: ")  # absl's prefix for an unreadable flagfile
  missing = re.fullmatch(r"flag --(\w+)=None: Flag --\1 must have a value other than "
                         r"None\.", message)
  if missing:
    return f"missing --{missing.group(1)}, a required flag (--help lists the flags)"
  if isinstance(error, flags.UnrecognizedFlagError):
    return f"{message} (--help lists the flags)"
  return message


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's `parse_flags_with_usage`, its errors in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_error(e))


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
  """`app.run(main)` with `--help` listing `main`'s module's flags (exit 0), and every
  flag or usage error in one line (`fail`).

  Call it after every flag of the binary is defined.
  """
  # A native crash (SIGSEGV, SIGABRT, ...) inside TensorFlow then prints every Python
  # thread's stack on stderr: where it happened, instead of a bare "Segmentation fault".
  faulthandler.enable()
  global _main_module
  _main_module = main.__module__
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

  def main_with_usage_errors(argv: list[str]) -> Any:
    try:
      return main(argv)
    except app.UsageError as e:  # absl would print the whole usage text
      fail(str(e))

  app.run(main_with_usage_errors, flags_parser=_parse_flags)


# ----------------------------------------------------------------------- TensorFlow

def _below(line: str, level: int) -> bool:
  """Whether `line` is a native log line of a severity under `level` (TF's numbering)."""
  if line.startswith(_PRE_INIT_WARNING):
    return level > _SEVERITY["W"]
  match = _NATIVE_LOG_LINE.match(line)
  return bool(match) and _SEVERITY[match.group(1)] < level


@contextlib.contextmanager
def _native_stderr_filtered(level: int):
  """Holds back what is written to file descriptor 2 meanwhile, then writes it out less
  the native log lines under `level`: C++ writes there directly, past `sys.stderr`."""
  sys.stderr.flush()
  try:
    held = tempfile.TemporaryFile()
    saved = os.dup(2)
  except OSError:  # no stderr, or no room for the file (a full /tmp): nothing filtered
    yield
    return
  with held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      text = held.read().decode("utf-8", errors="replace")
      sys.stderr.write("".join(line for line in text.splitlines(keepends=True)
                               if not _below(line, level)))
      sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Runs the first `import tensorflow` (also through keras) under
  `_native_stderr_filtered`, then leaves `sys.meta_path`."""

  def __init__(self, level: int):
    self._level = level

  def find_spec(self, fullname, path=None, target=None):
    del path, target  # a top-level package: found by the finders after this one
    if fullname != "tensorflow":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is not None and spec.loader is not None:
      exec_module, level = spec.loader.exec_module, self._level

      def quiet_exec_module(module):
        with _native_stderr_filtered(level):
          exec_module(module)

      spec.loader.exec_module = quiet_exec_module  # this spec's own loader object
    return spec


def _quiet_tensorflow() -> None:
  """Sets the default TF_CPP_MIN_LOG_LEVEL and filters the lines logged before it counts."""
  value = os.environ.setdefault(_TF_LOG_LEVEL, _DEFAULT_TF_LOG_LEVEL)
  try:
    level = int(value)
  except ValueError:
    return  # TensorFlow reads a value it cannot parse as 0: show everything
  if level > 0 and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport(level))


_quiet_tensorflow()
