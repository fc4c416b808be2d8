# Flow Studio. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
SCALEOUT_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/flowstudio
SCALEOUT_REDIS_URL ?= redis://127.0.0.1:6379/0
SCALEOUT_BROKER_URL ?= redis://127.0.0.1:6379/1

# Each test session gets its own data directory (SQLite files, broker folders, keys): sessions never share a file.
TEST_ENV = STUDIO_DATA_DIR=$$(mktemp -d /tmp/flowstudio-test-XXXXXX)

.DEFAULT_GOAL := help
.PHONY: help run worker test test-engine test-scaleout lint check bench bench-engine bench-authoring bench-runs \
	bench-compare bench-serve bench-single-test clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	@touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@touch $(RUN_STAMP) $@

run: $(RUN_STAMP) ## Install into .venv, migrate, and start the studio with its workers at http://127.0.0.1:8000
	$(BIN)/python manage.py runstudio

worker: $(RUN_STAMP) ## Start a Celery worker for this host (scale-out: set DATABASE_URL, CELERY_BROKER_URL, REDIS_URL)
	$(BIN)/celery -A studio worker --loglevel INFO

test: $(TEST_STAMP) lint ## Install what tests need and run the whole suite (SQLite, then PostgreSQL + Redis when reachable)
	$(TEST_ENV) $(BIN)/python -m pytest --ignore=tests/e2e $(PYTEST_ARGS)
	@# Browser tests run in their own session: Playwright's sync API keeps an event loop running in the test thread.
	@if [ -x /usr/bin/chromium ]; then $(TEST_ENV) $(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS); \
	else echo "Debian's chromium is not installed: the browser tests were NOT run (.ci/run installs it)."; fi
	@$(MAKE) --no-print-directory test-scaleout

test-scaleout: $(TEST_STAMP) ## Run the database, Celery and Channels tests again on PostgreSQL + Redis
	@if $(BIN)/python -c "import socket,sys; [socket.create_connection(a, 2).close() for a in [('127.0.0.1',5432),('127.0.0.1',6379)]]" 2>/dev/null; then \
	  echo "Scale-out leg: PostgreSQL at 127.0.0.1:5432, Redis at 127.0.0.1:6379"; \
	  $(TEST_ENV) DATABASE_URL=$(SCALEOUT_DATABASE_URL) REDIS_URL=$(SCALEOUT_REDIS_URL) CELERY_BROKER_URL=$(SCALEOUT_BROKER_URL) \
	    $(BIN)/python -m pytest -m integration $(PYTEST_ARGS); \
	else \
	  echo "PostgreSQL (127.0.0.1:5432) or Redis (127.0.0.1:6379) is not reachable: the scale-out leg was NOT run."; \
	fi

test-engine: $(TEST_STAMP) ## Run the engine tests alone (no Django)
	$(TEST_ENV) $(BIN)/python -m pytest tests/engine $(PYTEST_ARGS)

lint: $(TEST_STAMP) ## Ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

check: $(RUN_STAMP) ## Django system checks, with production settings
	$(BIN)/python manage.py check
	STUDIO_PRODUCTION=1 STUDIO_SECRET_KEY=$$($(BIN)/python -c 'import secrets;print(secrets.token_urlsafe(60))') \
	  $(BIN)/python manage.py check --deploy --fail-level WARNING

bench: bench-engine bench-authoring bench-runs bench-compare bench-serve bench-single-test ## Run every benchmark; results in bench/results/

bench-engine: $(TEST_STAMP) ## Engine against prompt flow (flow test, local batches): bench/results/engine.md
	$(TEST_ENV) $(BIN)/python bench/engine_bench.py

bench-authoring: $(TEST_STAMP) ## History and diff pages of a 50-file, 200-version flow: bench/results/authoring.md
	$(TEST_ENV) $(BIN)/python bench/authoring_bench.py

bench-runs: $(TEST_STAMP) ## Batch runs on Celery workers against prompt flow's pf run: bench/results/runs.md
	$(TEST_ENV) $(BIN)/python bench/runs_bench.py

bench-compare: $(TEST_STAMP) ## Compare page over three 20,000-line runs: bench/results/compare.md
	$(TEST_ENV) $(BIN)/python bench/compare_bench.py

bench-serve: $(TEST_STAMP) ## Endpoints against prompt flow's pf flow serve: bench/results/serve.md
	$(TEST_ENV) $(BIN)/python bench/serve_bench.py

bench-single-test: $(TEST_STAMP) ## Token latency of single tests over the websocket: bench/results/single_test.md
	$(TEST_ENV) $(BIN)/python bench/single_test_bench.py

clean: ## Remove the virtualenv and local data
	rm -rf $(VENV) data
