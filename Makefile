# The README's two commands (demo, test) and the benchmarks. Each creates .venv and installs what it
# needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# torch/torchvision pinned to the releases this machine kind serves locally (see the file).
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test lint clean-venv bench-person browser person-teacher

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Light runtime only: no torch, no training stack.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $@

# Everything: training stack and test tools.
$(VENV)/.dev: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) -c $(CONSTRAINTS) -e '.[train,dev,ray]'
	touch $@ $(VENV)/.runtime

# Segments the bundled public-domain photos with the bundled model, on ONNX Runtime.
demo: $(VENV)/.runtime
	rm -rf runs/demo  # the demo's own outputs, remade on each run
	$(BIN)/hiseg predict examples/astronaut.jpg examples/group.jpg --levels --json -o runs/demo
	@echo "label maps, overlays, one mask per level and JSON summaries are in runs/demo/"
	@echo "next: source .venv/bin/activate, then hiseg predict YOUR_PHOTOS (hiseg --help)"

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The browser test drives Debian's Chromium (Playwright never downloads a browser here). Installed
# once when missing (needs root, as on CI); elsewhere that test skips and says why.
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium) || echo "note: no $(CHROMIUM): the browser test skips"

test: lint browser
	$(BIN)/pytest

clean-venv:
	rm -rf $(VENV)

# hiseg's person model against MediaPipe on PicsArt valid, in a separate venv (MediaPipe is a
# benchmark-only dependency).
.venv-bench/bin/python:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet -e . mediapipe==0.10.14

bench-person: .venv-bench/bin/python
	.venv-bench/bin/python benchmarks/person_vs_mediapipe.py --threads 2
	.venv-bench/bin/python benchmarks/person_vs_mediapipe.py --threads 2 \
		--data ../shared/data/pascal-person-part --split val --out benchmarks/person_vs_mediapipe_pascal

# MediaPipe as an extra teacher at training time only (issue 19): scores it, hiseg's TTA teacher
# and their blends on PicsArt valid, then writes soft pseudo-labels of the best blend and of
# MediaPipe alone. Needs hiseg's soft labels first (hiseg pseudo-label -m person --mode soft
# --flip --scales 1,1.25,1.5 ... -o $(PERSON_RUNS)/pseudo-tta-soft).
PERSON_RUNS ?= /work/runs/person
person-teacher: .venv-bench/bin/python
	.venv-bench/bin/python benchmarks/mediapipe_teacher.py score --threads 1
	.venv-bench/bin/python benchmarks/mediapipe_teacher.py label \
		--hiseg-labels $(PERSON_RUNS)/pseudo-tta-soft -o $(PERSON_RUNS)/pseudo-mp-ens-soft
	.venv-bench/bin/python benchmarks/mediapipe_teacher.py label --weight 1 \
		-o $(PERSON_RUNS)/pseudo-mp-soft
