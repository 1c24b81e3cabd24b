# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench load chat-ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

.env:
	$(BIN)/python -m agentserve.envfile .env

## setup: virtualenv, pinned dependencies and a .env with fresh secrets (idempotent)
setup: $(STAMP) .env

## run: serve on http://127.0.0.1:8000 (embedded PostgreSQL and offline model unless configured)
run: setup
	$(BIN)/python -m agentserve.serve

## test: the whole suite against a real PostgreSQL (DATABASE_URL, else embedded)
test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

## bench: per-turn cost along a thread, serving overhead, capacity (writes bench-results/)
bench: setup
	$(BIN)/python -m bench

## load: start the stack with the offline model at 600 ms and run load-test.js with k6
load: setup
	$(BIN)/python -m bench.load

## chat-ui: build (cached) and serve the Agent Chat UI on :5173, for AGENT_URL (default :8000) with .env's key
chat-ui: setup
	$(BIN)/python -m ui.build serve

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
