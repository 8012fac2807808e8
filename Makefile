# Two entry points do all set-up on a fresh machine (see README.md):
#   make demo   runs the whole TGRL pipeline locally on CPU with embedded defaults
#   make test   runs the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tgrl-installed
CONFIG ?= configs/tiny-cpu.yaml

.PHONY: demo test lint setup clean

setup: $(STAMP)

# torch goes first, pinned to the CPU wheel, so no dependency range can pull a CUDA build.
$(STAMP): pyproject.toml scripts/install-tools.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	bash scripts/install-tools.sh
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tgrl pipeline run --local --config $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
