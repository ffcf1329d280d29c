"""The README and docs/ cannot drift from the code.

- every `--flag` they write exists in the `--helpfull` of the command it is given to (the
  command on the same command line; flags in prose: in some command's help);
- README.md stays a ten-minute read (at most 300 lines);
- every relative link resolves to a file (and a `#heading` of it);
- the README's multi-scanner recipe is exactly experiments/multi_scanner/'s flagfiles and
  tools/recipe.sh's commands, and the script runs (shrunk) on ../shared/data.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
FLAGFILES = sorted((REPO / "experiments").rglob("*.flags"))
RECIPE_DIR = "experiments/multi_scanner/"
README_MAX_LINES = 300

# Programs of other projects whose flags the docs may show: not checked.
FOREIGN = {"pip", "docker", "tensorflow_model_server", "curl", "bazel", "saved_model_cli",
           "tensorboard", "git", "diff", "mkdir", "ln", "mv", "rm", "cp", "realpath",
           "pytest", "apt-get"}
# Options of those programs, and Beam's pipeline options (given after `--`), as prose
# names them.
FOREIGN_FLAGS = {"direct_num_workers", "direct_running_mode", "prism_location",
                 "setup_file", "rest_api_port", "model_name", "model_base_path"}
PYTHONS = {"python", "python3", ".venv/bin/python", "$PY", '"$PY"'}
UNION = "*"  # a flag whose command is unknown: it must exist in some command's help


def _console_scripts() -> dict[str, str]:
  """setup.py's console scripts, name -> module (read as text: setup.py is not run)."""
  return dict(re.findall(r'"(spine-[\w-]+)=([\w.]+):\w+"', (REPO / "setup.py").read_text()))


SCRIPTS = _console_scripts()
MODULES = {module: name for name, module in SCRIPTS.items()}
# Binaries without a console script, run as `python -m MODULE` or `python PATH`.
OTHER_COMMANDS = ["trainer.data_service", "tests/page_check.py",
                  *sorted(f"bench/{p.name}" for p in (REPO / "bench").glob("*_bench.py"))]


def _help_argv(command: str) -> list[str]:
  if command.endswith(".py"):
    return [sys.executable, str(REPO / command), "--helpfull" if "bench/" in command
            else "--help"]
  return [sys.executable, "-m", SCRIPTS.get(command, command), "--helpfull"]


def _flags_of_help(text: str) -> set[str]:
  """Flag names a --help/--helpfull text lists (absl or argparse), `no` forms included."""
  names = set()
  for line in text.splitlines():
    if not re.match(r"\s+-", line):
      continue
    for negatable, name in re.findall(r"--(\[no\])?([a-z][\w-]*)", line):
      names.add(name)
      if negatable:
        names.add("no" + name)
  return names


@functools.lru_cache(maxsize=None)
def _all_help() -> dict[str, set[str]]:
  """{command: its flag names}: each binary's help run once per session (in parallel)."""
  commands = [*SCRIPTS, *OTHER_COMMANDS]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

  def run(command):
    proc = subprocess.run(_help_argv(command), capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    flags = _flags_of_help(proc.stdout)
    assert flags, f"{command}: no flags in its help (exit {proc.returncode})\n{proc.stderr}"
    return command, flags

  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    return dict(pool.map(run, commands))


# --- reading the docs -------------------------------------------------------------------

def _fenced(text: str):
  """Yields (is_code, line number, line) for each line of a markdown text."""
  code = False
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith("```"):
      code = not code
      continue
    yield code, number, line


def _logical_lines(lines: list[tuple[int, str]]):
  """Joins shell continuation lines (trailing backslash)."""
  pending, start = "", None
  for number, line in lines:
    start = number if start is None else start
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    yield start, pending + line
    pending, start = "", None
  if pending:
    yield start, pending


def _tokens(line: str) -> list[str]:
  """Shell-like words: a quoted part stays inside its word (`--a="x y"` is one word)."""
  return re.findall(r"""(?:[^\s"';]+|"[^"]*"|'[^']*')+|;""", line)


def _command_of(tokens: list[str], i: int) -> str | None:
  """The command that tokens[i] starts, FOREIGN's marker "", or None."""
  token = tokens[i].strip("\"'();")
  base = token.rsplit("/", 1)[-1]
  if base in SCRIPTS:
    return base
  if token in PYTHONS or base in ("python", "python3"):
    if i + 2 < len(tokens) and tokens[i + 1] == "-m":
      module = tokens[i + 2]
      return MODULES.get(module, module)
    if i + 1 < len(tokens) and tokens[i + 1].endswith(".py"):
      return tokens[i + 1].split("/", 1)[-1] if tokens[i + 1].startswith(".") else tokens[i + 1]
    return None
  if base in FOREIGN:
    return ""
  return None


def flag_uses(line: str, default: str = UNION):
  """(command, flag) for each `--flag` of a shell-like line.

  A flag belongs to the last command named before it on the line; flags after a bare `--`
  are Beam's pipeline options (skipped); flags inside a quoted or flag-valued value of
  another flag (`--train_flags="--base_filters=16"`) are checked against every command.
  """
  uses = []
  command = default
  tokens = _tokens(line)
  for i, token in enumerate(tokens):
    found = _command_of(tokens, i)
    if found is not None:
      command = found
      continue
    if token == "--":
      command = ""  # Beam's options follow
      continue
    match = re.match(r"[`\"'(\[]*--([a-z][a-z0-9_]*)(\*?)(=(.*))?", token)
    if not match:
      continue
    name = match.group(1) + ("*" if match.group(2) else "")
    if command != "":
      uses.append((command, name))
    value = match.group(4) or ""
    for inner in re.findall(r"--([a-z][a-z0-9_]*)", value):  # flags passed through
      uses.append((UNION, inner))
  return uses


def doc_flag_uses(path: pathlib.Path):
  """(line number, command, flag) of every flag a markdown file or flagfile writes."""
  if path.suffix == ".flags":
    command = "spine-convert" if path.name.startswith("convert") else "spine-train"
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if line.startswith("--"):
        yield from ((number, c, f) for c, f in flag_uses(line, command))
    return
  code_lines = []
  for is_code, number, line in _fenced(path.read_text()):
    if is_code:
      code_lines.append((number, line))
      continue
    for span in re.findall(r"`([^`]*)`", line):  # inline code: its own command line
      yield from ((number, c, f) for c, f in flag_uses(span))
    prose = re.sub(r"`[^`]*`", " ", line)
    yield from ((number, UNION, f) for _, f in flag_uses(prose))
  for number, line in _logical_lines(code_lines):
    code, _, comment = line.partition(" #") if not line.lstrip().startswith("#") else (
        "", "", line)
    yield from ((number, c, f) for c, f in flag_uses(code))
    yield from ((number, c, f) for c, f in flag_uses(comment))


def _known(flag: str, names: set[str]) -> bool:
  if flag.endswith("*"):
    return any(n.startswith(flag[:-1]) for n in names)
  return flag in names


def test_every_flag_the_docs_write_exists_in_its_commands_help():
  helps = _all_help()
  every = set().union(*helps.values())
  wrong = []
  for path in [*DOCS, *FLAGFILES]:
    for number, command, flag in doc_flag_uses(path):
      if command == UNION:
        if not _known(flag, every) and flag not in FOREIGN_FLAGS:
          wrong.append(f"{path.relative_to(REPO)}:{number}: --{flag} is no command's flag")
      elif command not in helps:
        wrong.append(f"{path.relative_to(REPO)}:{number}: --{flag} given to {command}, "
                     "which is not a command of this repository (add it to FOREIGN?)")
      elif not _known(flag, helps[command]):
        wrong.append(f"{path.relative_to(REPO)}:{number}: {command} has no --{flag}")
  assert not wrong, "\n".join(wrong)


def test_flag_checker_catches_a_wrong_flag():
  """The checker itself: a flag of another command, a Beam option, a passed-through flag."""
  uses = flag_uses("spine-predict --saved_model=m --within_labelled_levels -- --direct_x=1")
  assert uses == [("spine-predict", "saved_model"), ("spine-predict", "within_labelled_levels")]
  helps = _all_help()
  assert "within_labelled_levels" in helps["spine-evaluate"]
  assert "within_labelled_levels" not in helps["spine-predict"]
  assert flag_uses('python bench/quality_bench.py --train_flags="--base_filters=16 '
                   '--steps_per_epoch=20" --seeds=0') == [
      ("bench/quality_bench.py", "train_flags"), (UNION, "base_filters"),
      (UNION, "steps_per_epoch"), ("bench/quality_bench.py", "seeds")]
  assert "nopostprocess" in helps["spine-evaluate"] and "flagfile" in helps["spine-train"]


def test_readme_is_a_ten_minute_read():
  lines = (REPO / "README.md").read_text().count("\n")
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
  for needed in ("make demo", "make test"):  # the CI hook looks for both
    assert needed in (REPO / "README.md").read_text()


def _anchors(path: pathlib.Path) -> set[str]:
  """GitHub's heading anchors of a markdown file."""
  seen: dict[str, int] = {}
  anchors = set()
  for is_code, _, line in _fenced(path.read_text()):
    match = re.match(r"#+\s+(.*)", line)
    if is_code or not match:
      continue
    slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def test_every_relative_link_resolves():
  broken = []
  for path in DOCS:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target):
        continue  # https:, mailto:
      file, _, anchor = target.partition("#")
      resolved = (path.parent / file).resolve() if file else path
      if not resolved.exists():
        broken.append(f"{path.relative_to(REPO)}: {target}: no such file")
      elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
        broken.append(f"{path.relative_to(REPO)}: {target}: no such heading")
  assert not broken, "\n".join(broken)


# --- the multi-scanner recipe -------------------------------------------------------------

def _readme_recipe() -> list[str]:
  """The command lines of the README's code blocks that use the recipe's flagfiles."""
  blocks, block = [], []
  for is_code, number, line in _fenced((REPO / "README.md").read_text()):
    if is_code:
      block.append((number, line))
    elif block:
      blocks.append(block)
      block = []
  lines = [line for b in blocks if any(RECIPE_DIR in l for _, l in b)
           for _, line in _logical_lines(b)]
  assert lines, f"README.md shows no command with {RECIPE_DIR}"
  return lines


def _script_lines() -> list[str]:
  text = (REPO / "tools" / "recipe.sh").read_text()
  folder = re.search(r"^FLAGS=(\S+)", text, re.M).group(1).rstrip("/") + "/"
  code = [(n, line.replace("$FLAGS/", folder)) for n, line in enumerate(text.splitlines())
          if not line.lstrip().startswith("#")]
  return [line for _, line in _logical_lines(code)]


def _commands(lines: list[str]) -> dict[tuple[str, str], set[str]]:
  """{(command, flagfile or ""): flag names} of spineseg commands on the lines."""
  found: dict[tuple[str, str], set[str]] = {}
  for line in lines:
    tokens = _tokens(line)
    for i in range(len(tokens)):
      command = _command_of(tokens, i)
      if command in SCRIPTS:
        rest = " ".join(tokens[i + 1:])
        flagfile = re.search(r"--flagfile=(\S+)", rest)
        key = (command, flagfile.group(1) if flagfile else "")
        found.setdefault(key, set()).update(
            f for c, f in flag_uses(line) if c == command)
  return found


def test_readme_recipe_is_the_flagfiles_and_the_script():
  readme = _commands(_readme_recipe())
  script = _commands(_script_lines())
  flagfiles = {str(p.relative_to(REPO)) for p in (REPO / RECIPE_DIR).glob("*.flags")}
  readme_files = {flagfile for _, flagfile in readme if flagfile}
  assert readme_files == flagfiles, "the README's recipe and experiments/multi_scanner/"
  for flagfile in readme_files:
    assert (REPO / flagfile).is_file(), flagfile
  assert set(readme) == set(script), "the same commands with the same flagfiles"
  for key, names in readme.items():
    assert names <= script[key], f"{key}: README flags {sorted(names - script[key])} " \
                                 "missing from tools/recipe.sh"
  assert any(command == "spine-evaluate" and "tta" in names
             for (command, _), names in readme.items())


def test_recipe_script_runs_shrunk_on_the_shared_data(tmp_path):
  if not all((DATA / sub).is_dir() for sub in ("spine2d", "spine3d", "spine3d_extra",
                                                 "spine3d_ivd")):
    pytest.skip(f"{DATA} (spine2d, spine3d, spine3d_extra, spine3d_ivd) is absent")
  env = dict(os.environ, PYTHON=sys.executable, RECIPE_OUT=str(tmp_path), RECIPE_SEEDS="0",
             RECIPE_EPOCHS="1", RECIPE_STEPS="2", RECIPE_IMAGE_SIZE="64",
             RECIPE_TRAIN_FLAGS="--base_filters=4 --depth=2",
             RECIPE_HELD_OUT="spine3d_ivd/ivd_20:ivd", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([str(REPO / "tools" / "recipe.sh")], capture_output=True, text=True,
                        timeout=900, env=env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # The flagfiles' settings reached the data and the model, the overrides too.
  volumes = json.loads((tmp_path / "data" / "spine3d_extra" / "dataset.json").read_text())
  assert volumes["annotated_labels"] == [0, 2]
  assert volumes["image_size"] == 64
  # The flagfiles' field of view (336 px x 1.1 mm) on the 64 px square.
  assert volumes["target_spacing_mm"] == pytest.approx(336 * 1.1 / 64, rel=1e-3)
  config = json.loads((tmp_path / "runs" / "seed0" / "config.json").read_text())
  assert config["dataset_weights"] == "1,1,1" and config["steps_per_epoch"] == 2
  assert config["base_filters"] == 4 and config["epochs"] == 1
  # One head per protocol; the export's default draws every class.
  datasets = json.loads((tmp_path / "runs" / "seed0" / "datasets.json").read_text())
  assert sorted(d["manifest"]["protocol"] for d in datasets["datasets"]) == [
      "ivd", "spine2d", "vb1"]
  held_out = json.loads((tmp_path / "eval" / "ivd_20.json").read_text())
  assert held_out["protocol"] == "ivd"
  assert isinstance(held_out["overall"]["pooled"]["dice"]["dice_disc"], float)
  val = json.loads((tmp_path / "eval" / "spine2d_val.json").read_text())
  assert len(val["cases"]) == 3 and val["protocol"] == "spine2d"
  vb1_val = json.loads((tmp_path / "eval" / "vb1_val.json").read_text())
  assert vb1_val["protocol"] == "vb1"
