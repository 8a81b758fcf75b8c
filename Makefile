# Waddle realtime: every task a person or CI runs goes through these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/waddle_pb/*.proto)

export WADDLE_JWT_SECRET ?= dev-secret-change-me
export PYTHONUNBUFFERED := 1

.PHONY: all venv protos run test lint typecheck bench up down clean migrate

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

NODE_STAMP := node_modules/.installed
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

# Regenerate the gRPC/protobuf Python code (committed; tests fail on drift).
protos: $(STAMP)
	$(PY) -m waddle_common.protogen

migrate: $(STAMP)
	$(PY) -m store_service.migrate

run: $(STAMP) protos migrate
	WADDLE_DEV_MODE=1 $(PY) -m waddle_common.devrun

test: $(STAMP) $(NODE_STAMP) protos
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
