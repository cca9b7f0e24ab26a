# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000

.PHONY: run test lint install dev-install bench clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(BIN)/.dev-installed: requirements.txt requirements-dev.txt $(BIN)/.installed
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(BIN)/.installed

dev-install: $(BIN)/.dev-installed

## Start the proxy with gunicorn on SQLite (llm-proxy.db) at http://localhost:$(PORT)
run: install
	PORT=$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py app:app

## Run the whole test suite (SQLite always; PostgreSQL too when TEST_DATABASE_URL is set)
test: dev-install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## Benchmark: fake upstream, bare Flask forwarder, llm-proxy on SQLite and PostgreSQL, one core each (~4 min; needs wrk)
bench: install
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache llm-proxy.db*
