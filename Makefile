# Every target that needs the virtual environment creates it first, so a fresh
# clone needs nothing but Python 3.11+ for `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run demo test lint format bench chaos clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev extra

run: $(STAMP) ## start web and worker (embedded PostgreSQL / simulator when unconfigured)
	$(BIN)/python -m webhook_sync.dev.run

demo: $(STAMP) ## create trainings in the local simulator, drop some webhooks, watch them converge
	$(BIN)/webhook-sync demo

test: $(STAMP) ## run the whole test suite
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff check, format check and the import-layer contract
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## run the benchmarks in bench/ and append to bench/RESULTS.md
	$(BIN)/python -m bench

chaos: $(STAMP) ## a big end-to-end run under faults, with a printed report
	$(BIN)/python -m tests.chaos

clean: ## remove the virtual environment and local data
	rm -rf $(VENV) .data build *.egg-info
