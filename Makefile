# Waddle realtime: every task a person or CI runs goes through these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/waddle_pb/*.proto)

export WADDLE_JWT_SECRET ?= dev-secret-change-me-0123456789abcdef
export PYTHONUNBUFFERED := 1

.PHONY: all venv protos run test lint typecheck bench up down image clean migrate

K8S ?= kind
BASE_IMAGE ?= python:3.12-slim
IMAGE ?= localhost/waddle:dev
CONTAINER_TOOL ?= $(shell command -v docker >/dev/null 2>&1 && echo docker || echo podman)

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
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

# Benchmarks against peers: BENCH_ARGS="--help" lists scenarios and options;
# WADDLE_BENCH_DATABASE_URL=postgresql+psycopg://... runs Waddle on PostgreSQL.
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# Container image (one image, one entrypoint per service).
image:
	$(CONTAINER_TOOL) build --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .

# Kubernetes on kind (default) or minikube (K8S=minikube): cluster, image, chart.
up:
	K8S=$(K8S) BASE_IMAGE=$(BASE_IMAGE) CONTAINER_TOOL=$(CONTAINER_TOOL) bash k8s/up.sh

down:
	K8S=$(K8S) bash k8s/down.sh

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
