# Two commands: `make run` (set up, then the whole default pipeline on CPU) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: the CPU 2.13.0 wheel when no torch is present, so that the package's
# `torch>=2.4` requirement is already met and pip does not fetch a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[serve,qlora,rag,dev]"
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/lmforge run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# One OpenMP thread per process: tests start subprocesses (CLI runs, servers, 2-process DDP),
# and a 2-core machine oversubscribed by spinning OpenMP pools runs them many times slower.
test: $(STAMP) lint browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The labelling app's browser test drives the system's chromium through chromedriver (never a
# browser downloaded at run time): installed from apt when absent and we are root.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; }; } || \
		echo "chromium and chromium-driver are missing: install them (as root: apt-get install chromium chromium-driver)"

clean:
	rm -rf $(VENV) runs
