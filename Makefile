# Two entry points, both starting from a bare checkout:
#   make demo   install, serve the demo model set, synthesize hello.wav through the ensemble
#   make test   install (with test tools) and run lint (ruff, mypy) + the test suite (real tritonserver included)
#
# CPU torch: `pip install torch==2.13.0` picks a local CPU wheel where one is configured
# (pip find-links). Elsewhere pass the CPU index, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# On a GPU machine use TORCH_SPEC=torch (CUDA build) instead.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: install install-test demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/orpheus-triton demo -o hello.wav

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
