# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
# Server processes: one per core by default (BENCHMARKS.md). WORKERS=1 for a single process.
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
STAMP := $(VENV)/.installed

.PHONY: install run test test-postgres test-cluster test-schema lint format bench bench-context bench-admission bench-deep postman screenshots clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	mkdir -p var/static
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput -v0
	$(BIN)/uvicorn config.asgi:application --host $(HOST) --port $(PORT) --workers $(WORKERS) \
		--loop uvloop --http httptools --no-access-log --timeout-graceful-shutdown 10

test: $(STAMP)
	mkdir -p var/static
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: $(STAMP)
	mkdir -p var/static
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test} $(BIN)/python -m pytest $(PYTEST_ARGS)

# PostgreSQL + Redis + two service processes + the fake OpenAI server, one process killed mid-load.
test-cluster: $(STAMP)
	CLUSTER_POSTGRES_URL=$${CLUSTER_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres} \
	CLUSTER_REDIS_URL=$${CLUSTER_REDIS_URL:-redis://127.0.0.1:6379/6} \
	$(BIN)/python -m pytest tests/cluster -v -p no:xdist $(PYTEST_ARGS)

# Schemathesis (all checks) against the live service's /api/schema/: tests/schema/run.sh.
# SCHEMA_MODES, SCHEMA_MAX_EXAMPLES, SCHEMA_SEED, SCHEMA_WORKERS; extra arguments: SCHEMA_ARGS.
test-schema: $(STAMP)
	bash tests/schema/run.sh $(SCHEMA_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Benchmarks (BENCHMARKS.md): `make bench BENCH_ARGS="--scenario stream-500"`; `python -m bench -h`.
bench: $(STAMP)
	mkdir -p var/static
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-deep: $(STAMP)
	mkdir -p var/static
	$(BIN)/python -m bench --scenario deep-history $(BENCH_ARGS)

bench-context: $(STAMP)
	mkdir -p var/static
	$(BIN)/python -m bench context $(BENCH_ARGS)

bench-admission: $(STAMP)
	mkdir -p var/static
	$(BIN)/python -m bench admission $(BENCH_ARGS)

postman: $(STAMP)
	bash postman/run.sh

# docs/chat-light.png and docs/chat-dark.png (needs /usr/bin/chromium: apt-get install chromium)
screenshots: $(STAMP)
	$(BIN)/python -m tests.web.screenshots

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
