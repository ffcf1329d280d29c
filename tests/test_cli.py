"""Every binary's --help lists its own flags, as a console script and under `python -m`."""
import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _console_scripts() -> dict[str, str]:
  """setup.py's console scripts, name -> module (read as text: setup.py is not run)."""
  text = (REPO / "setup.py").read_text()
  return dict(re.findall(r'"(spine-[\w-]+)=([\w.]+):\w+"', text))


SCRIPTS = _console_scripts()

# One flag per binary that must be among its own: keeps the comparison below from passing
# on an empty list.
ANCHORS = {"spine-convert": "verify", "spine-train": "model_dir", "spine-export": "export_dir",
           "spine-predict": "saved_model", "spine-evaluate": "saved_model",
           "spine-phantom": "num_cases", "spine-inspect": "max_tiles_per_mosaic"}
# Modules whose flags a binary defines through them (and adopts, so --help lists them).
SHARED_FLAG_MODULES = {"spine-predict": ("export.model_flags",),
                       "spine-evaluate": ("export.model_flags",)}


def _run(cmd: list[str]) -> str:
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stderr}"
  return proc.stdout


def _flag_sections(text: str) -> dict[str, dict[str, str]]:
  """absl's flag listing after "flags:": {section heading: {flag name: its whole block}}."""
  sections: dict[str, dict[str, str]] = {}
  current, name = None, None
  if "\nflags:\n" not in text:
    return sections  # absl lists no flag at all
  for line in text.split("\nflags:\n", 1)[1].splitlines():
    if line and not line.startswith(" ") and line.endswith(":"):
      current = sections.setdefault(line[:-1], {})
    elif line.startswith("  -") and current is not None:
      name = re.match(r"  (?:-\S,)?--(?:\[no\])?(\w+):", line).group(1)
      current[name] = line.strip()
    elif line.startswith("    ") and name is not None:
      current[name] += "\n" + line.strip()
  return sections


@functools.lru_cache(maxsize=None)
def _own_flags(name: str) -> dict[str, str]:
  """The flags the binary's module (and its shared flag modules) define, with help, as
  `--helpfull` groups them."""
  script = pathlib.Path(sys.executable).parent / name
  assert script.is_file(), f"{script} is missing: run `make venv` (setup.py changed)"
  sections = _flag_sections(_run([str(script), "--helpfull"]))
  own = dict(sections[SCRIPTS[name]])
  for module in SHARED_FLAG_MODULES.get(name, ()):
    own.update(sections[module])
  return own


def test_console_scripts_are_setup_pys():
  assert set(SCRIPTS) == set(ANCHORS)
  assert SCRIPTS["spine-phantom"] == "data_prep.phantom"


@pytest.mark.parametrize("how", ["console_script", "python_m"])
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_lists_the_binarys_flags_with_their_help(name, how):
  if how == "console_script":
    out = _run([str(pathlib.Path(sys.executable).parent / name), "--help"])
  else:
    out = _run([sys.executable, "-m", SCRIPTS[name], "--help"])
  own = _own_flags(name)
  assert ANCHORS[name] in own and all(len(block.split()) > 1 for block in own.values())
  listed = {}
  for section in _flag_sections(out).values():
    listed.update(section)
  for flag, block in own.items():  # name, help text, default: all of it
    assert listed.get(flag) == block, f"{name} --help ({how}) lacks:\n{block}\n\n{out}"
  # The module's docstring is the usage text, not absl's bare "USAGE: ... [flags]".
  assert "USAGE:" not in out


def test_help_into_a_closed_pipe_exits_quietly():
  # `spine-phantom --help | head -1`: the reader is gone before the help is written.
  proc = subprocess.Popen([sys.executable, "-m", "data_prep.phantom", "--help"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  proc.stdout.close()  # long before the interpreter has started and written anything
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and b"Traceback" not in err, err.decode()


def test_a_native_crash_prints_the_python_stack(tmp_path):
  # cli.run enables faulthandler: a SIGSEGV names the thread and the line it happened on.
  script = tmp_path / "crash.py"
  script.write_text(
      "import ctypes\n"
      "from data_prep import cli\n"
      "def main(argv):\n"
      "  ctypes.string_at(0)\n"
      "cli.run(main)\n")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
  assert proc.returncode == -11
  assert "Fatal Python error: Segmentation fault" in proc.stderr
  assert 'crash.py", line 4 in main' in proc.stderr
