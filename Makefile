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

# The pins chosen by hand; constraints.txt, the lock file `make install` applies, pins every other package to what
# resolved with them. torch 2.14.1 + torchvision 0.29.1: their CUDA builds also run on the CPU, and the registry's
# torchvision cannot load against a 2.13.0+cpu wheel, so that pair must not be picked. peft: the release the PEFT
# adapter format is tested against.
LOCK_PINS := torch==2.14.1 torchvision==0.29.1 peft==0.21.2
# The Python the lock is resolved for (CI's); other Pythons install from pyproject's open ranges instead.
LOCK_PYTHON := 3.11

.PHONY: install lock test test-gpu test-slurm lint train bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) $(PACKAGE_DIRS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]" --config-settings editable_mode=strict
	touch $(STAMP)

# Re-resolve every package to the newest release that fits pyproject.toml's ranges and LOCK_PINS (uv, from PyPI).
lock: $(STAMP)
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv
	printf '%s\n' $(LOCK_PINS) > $(VENV)/lock-pins.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --constraint $(VENV)/lock-pins.txt --upgrade \
		--python-version $(LOCK_PYTHON) --custom-compile-command "make lock" --output-file $(CONSTRAINTS)

lint: $(STAMP)
	$(BIN)/ruff check lora_vision tests
	$(BIN)/ruff format --check lora_vision tests

# Test files run side by side, one worker process per core (pytest-xdist), each file on one worker so that its
# module fixtures are built once; tests/conftest.py gives each worker its share of the cores and hands out the files
# longest first, an order pytest-xdist would replace with "most tests first" without --no-loadscope-reorder.
test: lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -m "not slurm"

# The tests against a SLURM cluster alone (tests/test_slurm.py): start the one-node test cluster first with
# tests/slurm/cluster.sh start (as root; .ci/run does); without one they skip, with the reason.
test-slurm: $(STAMP)
	$(BIN)/python -m pytest -q -m slurm -rs

# The CUDA tests alone (tests/test_gpu.py); without a GPU they skip, with the reason.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs

train: $(STAMP)
	$(BIN)/python -m lora_vision.train +exp=$(EXP) $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m lora_vision.bench --out experiments/benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
