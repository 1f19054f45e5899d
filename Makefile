# Two commands from a fresh clone: `make run` and `make test`. Each makes .venv if
# missing and installs the package with its own MPI (the mpich wheel).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata changes (editable install: code changes need nothing).
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned first: the CPU build this machine keeps on disk (a bare range would pull
	# a CUDA build of several GB); the extras' ranges then accept it.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[mpich,test,progress,plot,torch,keras]"
	touch $(STAMP)

install: $(STAMP)

# The quickstart: a small CNN with synchronized BatchNormalization on 2 ranks (measured
# times in docs/benchmarks.md); writes runs/quickstart-<timestamp>/.
run: $(STAMP)
	$(BIN)/distbn launch -n 2 configs/quickstart.yaml

# The import contracts (pyproject.toml [tool.importlinter]: nothing imports upward), then
# the tests.
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
