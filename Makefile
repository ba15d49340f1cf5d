# Two entry points: `make serve` (install, then run the services) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# MLX's CPU backend links a reference BLAS; Debian's OpenBLAS (if present) is ~10x faster and
# changes no result. `mlxd serve` preloads it into its services itself (--blas auto); the test
# suite also runs MLX in-process, hence the preload here. Apple Silicon runs on Metal.
OPENBLAS := $(firstword $(wildcard /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0))

.PHONY: install install-test serve test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# mlx-whisper declares torch, which its run time never imports: it is installed without its
# dependencies (pyproject.toml declares what it imports), so `make serve` installs no torch.
WHISPER := requirements/mlx-whisper.txt

# sentence-transformers (the test extra) needs torch; on Linux take the CPU build.
$(VENV)/.torch: | $(BIN)/python
	if [ "$$(uname -s)" = Linux ]; then $(BIN)/pip install --quiet torch==2.13.0; fi
	touch $@

$(VENV)/.installed: pyproject.toml $(WHISPER) | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps -r $(WHISPER)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(WHISPER) $(VENV)/.torch
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps -r $(WHISPER)
	touch $@

# The test install is a superset of the run-time one: once it exists, `make serve` uses it.
install: $(if $(wildcard $(VENV)/.installed-test),$(VENV)/.installed-test,$(VENV)/.installed)

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
