# The habits of this project.  `make demo` and `make test` do all the set-up
# themselves: they create a virtual environment in $(VENV) and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/python -m composeopt demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest --cov=composeopt --cov-report=term --cov-fail-under=90 -q

clean:
	rm -rf $(VENV) .pytest_cache .coverage build *.egg-info
