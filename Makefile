# Waddle realtime: every task a person or CI runs goes through these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per install, so that each target installs only what it needs
# (`make run`: the runtime dependencies) and none installs anything twice.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
# checkov (security scan in `make test`) pins libraries the tests cannot
# share: it gets a virtual environment of its own.
SCAN_VENV := $(VENV)/scan
SCAN_STAMP := $(SCAN_VENV)/.installed
PROTO_SRC := $(wildcard protos/waddle_pb/*.proto)

export WADDLE_JWT_SECRET ?= dev-secret-change-me-0123456789abcdef
export PYTHONUNBUFFERED := 1

.PHONY: all venv protos run test lint typecheck bench up down image clean migrate

K8S ?= kind
BASE_IMAGE ?= python:3.12-slim
IMAGE ?= localhost/waddle:dev
# docker when a Docker engine answers (not merely when the CLI exists), else
# podman. Worked out once, and only by the targets that build images.
CONTAINER_TOOL ?= $(eval CONTAINER_TOOL := $(shell \
	if docker info >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null 2>&1; then echo podman; fi))$(CONTAINER_TOOL)

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	@touch $@

$(DEV_STAMP): pyproject.toml $(RUN_STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

$(BENCH_STAMP): pyproject.toml $(DEV_STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $@

$(SCAN_STAMP): pyproject.toml | $(PY)
	@test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install -q --upgrade pip
	$(SCAN_VENV)/bin/python -m pip install -q --group scan
	@touch $@

venv: $(DEV_STAMP)

NODE_STAMP := node_modules/.installed
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

# Regenerate the gRPC/protobuf Python code (committed; tests fail on drift).
protos: $(DEV_STAMP)
	$(PY) -m waddle_common.protogen

migrate: $(RUN_STAMP)
	$(PY) -m store_service.migrate

# Runtime dependencies only; the generated code is committed and devrun
# migrates the database itself (once) before it starts the services.
run: $(RUN_STAMP)
	WADDLE_DEV_MODE=1 $(PY) -m waddle_common.devrun

# PostgreSQL tests use WADDLE_TEST_POSTGRES_URL, else a server found on
# 127.0.0.1:5432; without either they are skipped, and the summary says so.
test: $(BENCH_STAMP) $(SCAN_STAMP) $(NODE_STAMP) protos
	@url="$${WADDLE_TEST_POSTGRES_URL:-$$($(PY) -m tests.support.postgres --discover)}"; \
	if [ -n "$$url" ]; then echo "PostgreSQL tests: $$url"; \
	else echo "PostgreSQL tests: no server on 127.0.0.1:5432 and WADDLE_TEST_POSTGRES_URL unset: they will be skipped"; fi; \
	WADDLE_TEST_POSTGRES_URL="$$url" $(PY) -m pytest -p tests.support.postgres $(PYTEST_ARGS)

lint: $(BENCH_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .

# Benchmarks against peers: BENCH_ARGS="--help" lists scenarios and options;
# WADDLE_BENCH_DATABASE_URL=postgresql+psycopg://... runs Waddle on PostgreSQL.
bench: $(BENCH_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# Container image (one image, one entrypoint per service). podman builds in
# docker format, which keeps the Dockerfile's HEALTHCHECK (OCI drops it).
image:
	@test -n "$(CONTAINER_TOOL)" || { echo "make image: no Docker engine answers (docker info) and podman is not installed (apt-get install podman)" >&2; exit 1; }
	@echo "make image: building with $(CONTAINER_TOOL)"
	$(CONTAINER_TOOL) build $(if $(filter podman,$(notdir $(CONTAINER_TOOL))),--format docker) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .

# Kubernetes on kind (default) or minikube (K8S=minikube): cluster, image, chart.
up:
	K8S=$(K8S) BASE_IMAGE=$(BASE_IMAGE) CONTAINER_TOOL=$(CONTAINER_TOOL) bash k8s/up.sh

down:
	K8S=$(K8S) bash k8s/down.sh

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
