# Two commands on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test bench lint typecheck validate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,slack,telegram,redis]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/helpline serve --config deploy/demo.yaml

test: $(STAMP)
	bash scripts/ensure-services.sh
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check engine channels tests bench
	$(BIN)/mypy engine

typecheck: $(STAMP)
	$(BIN)/mypy engine

validate: $(STAMP)
	$(BIN)/helpline validate flows/

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
