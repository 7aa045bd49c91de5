# The habits of this project.  Every target does its own set-up: it creates a
# virtual environment in $(VENV) and installs the project with the extra it
# needs (`make demo` the demo extra, `make test` the test extra, ...).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LINTED := composeopt tests docs/examples

.PHONY: install demo test bench lint format typecheck docs docs-serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable .
	touch $@

# $(VENV)/.installed-test, -demo, -lint, -docs: the project with that extra.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable '.[$*]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable '.[bench]'
	touch $@ $(VENV)/.installed

# The MPI tests' launcher and library (they skip without them): mpi4py and the mpich wheel.
$(VENV)/.installed-mpich: | $(BIN)/python
	$(BIN)/python -m pip install --quiet 'mpi4py>=4.1' mpich
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(BIN)/python -m composeopt demo

test: $(VENV)/.installed-test $(VENV)/.installed-mpich
	$(BIN)/python -m pytest --cov=composeopt --cov-report=term --cov-fail-under=90 -q

lint: $(VENV)/.installed-lint
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: $(VENV)/.installed-lint
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

typecheck: $(VENV)/.installed-lint
	$(BIN)/mypy

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --config-file docs/mkdocs.yml

docs-serve: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --config-file docs/mkdocs.yml

# Optimiser step timings against the memory-traffic floor and the installed peers (BENCH_ARGS=--quick).
bench: $(VENV)/.installed-bench
	$(BIN)/python -m composeopt.bench --json bench.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .coverage build dist site out *.egg-info
