# The habits of this project.  `make demo` and `make test` do all the set-up
# themselves: they create a virtual environment in $(VENV) and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test install-bench demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable '.[bench]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

install-bench: $(VENV)/.installed-bench

demo: $(VENV)/.installed
	$(BIN)/python -m composeopt demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest --cov=composeopt --cov-report=term --cov-fail-under=90 -q

# Optimiser step timings against the memory-traffic floor and the installed peers (BENCH_ARGS=--quick).
bench: $(VENV)/.installed-bench
	$(BIN)/python -m composeopt.bench --json bench.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .coverage build *.egg-info
