# Two entry points: `make serve` (install, then run the services) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# MLX's CPU backend links a reference BLAS; Debian's OpenBLAS (if present) is ~10x faster and
# changes no result. Only the test suite uses it; Apple Silicon runs on Metal.
OPENBLAS := $(firstword $(wildcard /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0))

.PHONY: install install-test serve test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# mlx-whisper declares torch although mlxd never imports it; on Linux take the CPU build.
$(VENV)/.torch: | $(BIN)/python
	if [ "$$(uname -s)" = Linux ]; then $(BIN)/pip install --quiet torch==2.13.0; fi
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/mlxd serve $(ARGS)

lint: install-test
	$(BIN)/ruff check engine conversions tests bench
	$(BIN)/ruff format --check engine conversions tests bench
	$(BIN)/lint-imports

test: install-test lint
	LD_PRELOAD=$(OPENBLAS) $(BIN)/pytest $(ARGS)

format: install-test
	$(BIN)/ruff format engine conversions tests bench
	$(BIN)/ruff check --fix engine conversions tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
