# The two commands of the README. Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# torch/torchvision pinned to the releases this machine kind serves locally (see the file).
CONSTRAINTS := requirements/constraints.txt
DATA ?= ../shared/data

.PHONY: demo test lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Light runtime (no torch) plus matplotlib for the stats plot.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[plot]'
	touch $@

# Everything: training stack and test tools.
$(VENV)/.dev: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) -c $(CONSTRAINTS) -e '.[train,dev]'
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	@echo "hiseg demo: no shipped model yet, so the demo checks and describes the real data set."
	@if [ ! -d "$(DATA)/pascal-person-part" ]; then \
		echo "$(DATA)/pascal-person-part not found: set DATA=/path/to/data"; exit 1; fi
	$(BIN)/hiseg tree show pascal-person-part
	$(BIN)/hiseg data check $(DATA)/pascal-person-part --split val
	$(BIN)/hiseg data stats $(DATA)/pascal-person-part --split val --out runs/demo

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests

test: lint
	$(BIN)/pytest

clean-venv:
	rm -rf $(VENV)
