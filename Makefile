# The two set-up commands (README quick start):
#   make demo   install everything and run the main job on the embedded default model
#   make test   install everything and run the linter, the type checker and the test suite
# Both install the exact versions in constraints.txt (the ones the tests last passed with);
#   make lock   re-runs the tests on the newest allowed versions and, if they pass, rewrites it.
PYTHON ?= python3.11
VENV ?= .venv
MODEL ?= smollm2-135m
VISION_MODEL ?= clip-vit-b16
BIN := $(VENV)/bin
export PYTHON VENV

.PHONY: install demo test test-all lint typecheck pytest browser clean-venv lock

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh $(MODEL)

lint: install
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

browser:
	bash scripts/browser-deps.sh

pytest: install browser
	$(BIN)/headlab fetch $(MODEL)
	$(BIN)/headlab fetch $(VISION_MODEL)
	$(BIN)/python -m pytest -m "$(PYTEST_MARKS)" $(PYTEST_ARGS)

# the tests marked slow (minutes on a CPU, each covered piecewise by faster ones) only with test-all
PYTEST_MARKS ?= not slow

test: lint typecheck pytest

test-all:
	$(MAKE) test PYTEST_MARKS=

lock:
	bash scripts/lock.sh

clean-venv:
	rm -rf $(VENV)
