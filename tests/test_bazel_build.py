"""BUILD is generated from the imports of the tree; it must be current and exact."""
import ast
import importlib.util
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _gen_build():
  spec = importlib.util.spec_from_file_location("gen_build",
                                                REPO / "tools" / "bazel" / "gen_build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write(root, files):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_deps_follow_imports(tmp_path):
  _write(tmp_path, {
      "data_prep/__init__.py": "",
      "data_prep/schema.py": "import numpy as np\n",
      "data_prep/phantom.py": "from data_prep import schema as s\nimport os\n",
      "trainer/__init__.py": "",
      "trainer/main.py": "import data_prep.phantom\nfrom trainer import nothing_here\n",
      "export/__init__.py": "",
      "tests/test_x.py": "from trainer import main\nimport pytest\n",
      "tests/test_y.py": ("CMD = ['python', '-m', 'data_prep.phantom']\n"
                          "CODE = 'from trainer import main'\n"),
      "setup.py": ("import setuptools\nsetuptools.setup(name='x', entry_points={\n"
                   "    'console_scripts': ['spine-train=trainer.main:run',\n"
                   "                        'spine-phantom=data_prep.phantom:run',\n"
                   "                        'spine-convert=data_prep.convert:run']})\n"),
  })
  build = _gen_build().render(tmp_path)
  phantom = build[build.index('name = "data_prep_phantom"'):].split(")\n")[0]
  assert '":data_prep_schema"' in phantom and '":data_prep"' in phantom
  main = build[build.index('name = "trainer_main"'):].split(")\n")[0]
  # A name that is not a module (here a missing one) falls back to the package.
  assert '":data_prep_phantom"' in main and '":trainer"' in main
  assert ":numpy" not in build and ":os" not in build
  assert 'name = "spine-train"' in build and 'name = "spine-phantom"' in build
  assert 'name = "spine-convert"' not in build  # its module does not exist here
  test = build[build.index('name = "test_x"'):].split(")\n")[0]
  assert '"$(location tests/test_x.py)"' in test and '":trainer_main"' in test
  test = build[build.index('name = "test_y"'):].split(")\n")[0]
  # Modules run in a subprocess, by name or in code.
  assert '":data_prep_phantom"' in test and '":trainer_main"' in test


def test_build_file_is_current():
  gen = _gen_build()
  expected = gen.render(REPO)
  actual = (REPO / "BUILD").read_text()
  assert actual == expected, (
      "BUILD is stale (a module, import or test changed): run "
      "`.venv/bin/python tools/bazel/gen_build.py` and commit BUILD")


def test_ci_bazel_smoke_targets_are_test_files():
  """`make bazel-smoke` (CI) names test targets: each must still be a tests/ file."""
  make = (REPO / "Makefile").read_text()
  listed = re.search(r"BAZEL_SMOKE := \$\(addprefix //:test_,(.*?)\)\n", make, re.S)
  names = listed.group(1).replace("\\\n", " ").split()
  assert len(names) >= 10
  missing = [n for n in names if not (REPO / "tests" / f"test_{n}.py").is_file()]
  assert not missing, f"Makefile BAZEL_SMOKE names tests that do not exist: {missing}"


def test_binaries_come_from_setup_py_only(tmp_path):
  gen = _gen_build()
  _write(tmp_path, {"setup.py": "import setuptools\nsetuptools.setup(name='x')\n"})
  with pytest.raises(ValueError, match=r"setup.py: no entry_points="):
    gen.entry_points(tmp_path)
  _write(tmp_path, {"setup.py": "import setuptools\nSCRIPTS = []\n"
                                "setuptools.setup(entry_points={'console_scripts': SCRIPTS})\n"})
  with pytest.raises(ValueError, match="must be a literal dict"):
    gen.entry_points(tmp_path)


def test_build_binaries_equal_setup_console_scripts():
  # Read both files independently of gen_build: BUILD's py_binary targets (benchmarks
  # aside) are exactly setup.py's console scripts, each built from its module.
  text = (REPO / "setup.py").read_text()
  scripts = {name: module for name, module, _ in
             re.findall(r'"(spine-[\w-]+)=([\w.]+):(\w+)"', text)}
  build = (REPO / "BUILD").read_text()
  binaries = dict(re.findall(r'py_binary\(\n    name = "([^"]+)",\n    srcs = \["([^"]+)"\]',
                             build))
  binaries = {n: src for n, src in binaries.items() if not n.startswith("bench_")}
  assert binaries == {n: m.replace(".", "/") + ".py" for n, m in scripts.items()}
  assert "spine-phantom" in scripts
  # Each console script's function exists in its module.
  for spec in re.findall(r'"spine-[\w-]+=([\w.]+:\w+)"', text):
    module, func = spec.split(":")
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, spec


def test_module_imports_have_no_cycle():
  """Bazel refuses a cycle of py_library deps ("cycle in dependency graph") before any test
  runs; Python tolerates it when one import is lazy, so only this check sees it early."""
  gen = _gen_build()
  modules = gen.project_modules(REPO) + gen.helper_modules(REPO)
  known = set(modules)
  deps = {m: gen.imported(REPO / gen.path_of(m), known) - {m} for m in modules}
  state = {}  # module -> "open" while on the current path, "done" when cleared

  def visit(module, path):
    state[module] = "open"
    for dep in sorted(deps[module]):
      if state.get(dep) == "open":
        cycle = path[path.index(dep):] + [module, dep]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, path + [module])
    state[module] = "done"

  for module in modules:
    if module not in state:
      visit(module, [])
