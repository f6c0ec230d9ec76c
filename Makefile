# Every target that needs the virtual environment creates it first, so a fresh
# clone needs nothing but Python 3.11+ for `make run` and `make test`.
PYTHON_VERSION := $(shell cat .python-version)
# The deploy's Python (.python-version) when it is on PATH, else python3.
PYTHON ?= $(shell command -v python$(PYTHON_VERSION) 2>/dev/null || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install lock run demo test test-fast lint format bench chaos clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# The suite runs on the deploy's pins: requirements.txt (less its `.` line, which pip
# refuses as a constraint) constrains the install of the project and its dev extra.
$(STAMP): setup.cfg pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	grep -vx '\.' requirements.txt > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c $(VENV)/constraints.txt
	touch $(STAMP)

install: $(STAMP) ## create .venv: the locked runtime pins, the project, its dev extra on top

# uv resolves for the deploy's Python and platform wherever it runs, from PyPI alone.
lock: $(STAMP) ## refresh requirements.txt from setup.cfg (UPGRADE=1: newest allowed versions)
	echo . | $(BIN)/uv pip compile - --quiet --python-version $(PYTHON_VERSION) \
		--python-platform linux --custom-compile-command 'make lock' \
		--output-file requirements.txt $(if $(UPGRADE),--upgrade)

run: $(STAMP) ## start web and worker (embedded PostgreSQL / simulator when unconfigured)
	$(BIN)/python -m webhook_sync.dev.run

demo: $(STAMP) ## create trainings in the local simulator, drop some webhooks, watch them converge
	$(BIN)/webhook-sync demo

# The suite in TEST_WORKERS processes (pytest-xdist; 0: in this one). Each test has its own
# database and free ports, and much of the suite waits on processes, timers and
# PostgreSQL, so two workers shorten it even on two cores; more would crowd the
# end-to-end runs' processes and PostgreSQL's connections.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test: $(STAMP) ## run the whole test suite
	$(PYTEST)

test-fast: $(STAMP) ## run the suite but the slow tests (real processes, builds)
	$(PYTEST) -m "not slow"

lint: $(STAMP) ## ruff check, format check, the import-layer contract, dead code (vulture)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/vulture

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## run the benchmarks in bench/ and append to bench/RESULTS.md
	$(BIN)/python -m bench

chaos: $(STAMP) ## a big end-to-end run under faults, with a printed report
	$(BIN)/python -m tests.chaos

clean: ## remove the virtual environment and local data
	rm -rf $(VENV) .venv-deploy-cache .data build *.egg-info
