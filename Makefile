# Braid — developer entry points. `make run` and `make test` are the two
# commands a newcomer needs; both set everything up first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NODES ?= 3
BENCH ?=

.PHONY: setup run test test-unit test-integration bench proto proto-check clean lint

setup:
	@./scripts/setup.sh

run: setup
	$(VENV)/bin/braid dev guest
	$(VENV)/bin/braid cluster up --nodes $(NODES) --foreground

test: setup proto-check lint
	./scripts/test.sh

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	./scripts/test.sh tests/integration

bench: setup
	$(PY) -m bench $(if $(BENCH),--section $(BENCH),)

# Regenerate braid/v1/*_pb2*.py from proto/braid/v1/*.proto with the pinned
# grpcio-tools (the committed output must match: see proto-check).
proto:
	@./scripts/genproto.sh

proto-check: setup
	@./scripts/genproto.sh --check

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf build *.egg-info .pytest_cache bench/results/*.json bench/results/report.md
