# Every target creates the environment first when it is missing, so a fresh clone needs only
# `make train` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed
# Installed in setuptools' strict editable mode: the default mode's import hook hides a package installed under
# another name (the Optuna sweeper as hydra_plugins.lora_vision_optuna) from Hydra's plugin scan. Strict mode
# links each file, so a new module needs a reinstall: the stamp depends on the package's folders, whose times
# change when a file is added.
PACKAGE_DIRS := $(shell find lora_vision -type d -not -name __pycache__)

# The main job; more Hydra overrides go in ARGS, e.g. make train ARGS="trainer=cpu data.batch_size=32".
EXP ?= vit_r8
ARGS ?=

.PHONY: install test test-gpu lint train bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) $(PACKAGE_DIRS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]" --config-settings editable_mode=strict
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check lora_vision tests
	$(BIN)/ruff format --check lora_vision tests

test: lint
	$(BIN)/python -m pytest -q

# The CUDA tests alone (tests/test_gpu.py); without a GPU they skip, with the reason.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs

train: $(STAMP)
	$(BIN)/python -m lora_vision.train +exp=$(EXP) $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m lora_vision.bench --out experiments/benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
