# spineseg: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian's Bazel 4 and its platforms repository (see third_party/bazel/README.md).
BAZEL_DEBS := bazel-bootstrap bazel-platforms
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv test demo recipe finetune-study pretrained bench quality bazel-test bazel-smoke build-file clean

venv: $(STAMP)

# Reinstall when setup.py changes; editable so the console scripts run the working tree.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

# Phantom data -> convert -> train -> export -> predict -> evaluate, all under demo_out/.
demo: $(STAMP)
	tools/demo.sh

# The multi-scanner recipe (experiments/multi_scanner/) on ../shared/data, under recipe_out/:
# convert each folder, train three seeds, export, score the ensemble with --tta.
recipe: $(STAMP)
	tools/recipe.sh

# "How many slices must I label?" (docs/training.md): the base model as it is, fine-tuned
# on k slices of a new scanner, and retrained with them, under out/finetune_study/.
finetune-study: $(STAMP)
	tools/finetune_study.sh

# The model that ships with spineseg (export/pretrained_model/): the recipe with one seed
# and --deterministic, packed without optimizer state (its training: about 35 minutes on
# 2 fast CPU cores, 2 hours 15 minutes on 2 slow ones).
pretrained: $(STAMP)
	tools/pretrained.sh

# Every benchmark in bench/ with its default (small) settings; the quality bench (hours
# of training at full size) only as a --quick smoke run: `make quality` runs it in full.
bench: $(STAMP)
	@set -e; for b in bench/*_bench.py; do \
	  args=; case $$b in *quality_bench.py) args=--quick;; esac; \
	  echo "== $$b $$args"; $(PY) $$b $$args; done

quality: $(STAMP)
	$(PY) bench/quality_bench.py --seeds=0,1

# The suite under Bazel (py_test per test file, the .venv interpreter), offline once the
# Debian packages are installed. BAZEL_TESTS picks the test targets (default: all).
BAZEL_TESTS ?= //...
bazel-test: $(STAMP)
	@if ! command -v bazel >/dev/null || [ ! -d /usr/share/bazel/tools/platforms ]; then \
	  echo "installing $(BAZEL_DEBS) with apt-get"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(BAZEL_DEBS); \
	fi
	$(PY) tools/bazel/gen_build.py --check
	bazel build //...
	bazel test --local_test_jobs=2 $(BAZEL_TESTS)

# What CI runs after `make test` has run every test under pytest: Bazel builds every
# target, and runs the quick tests (about a minute) that load each package through
# BUILD's deps, instead of the whole suite a second time (about 15 minutes on 2 cores).
BAZEL_SMOKE := $(addprefix //:test_,bazel_build readers phantom orientation manifest \
  metrics preprocess partial_labels slices_per_case trainer_losses trainer_unet \
  trainer_pipeline sliding_window_portable validation_matches_evaluate)
bazel-smoke:
	$(MAKE) bazel-test BAZEL_TESTS="$(BAZEL_SMOKE)"

# Rewrite BUILD after adding or removing a module, an import or a test file.
build-file: $(STAMP)
	$(PY) tools/bazel/gen_build.py

clean:
	-command -v bazel >/dev/null && bazel clean --expunge
	rm -rf $(VENV) demo_out *.egg-info
