# Two commands: `make run` brings the whole system up, `make test` proves it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench bench-scoring bench-actions clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/churnguard dev

test: $(STAMP)
	$(BIN)/python -m pytest

# Ingest throughput and latency on a real broker and real service processes (~2.5 min; uses wrk
# when installed: apt-get install -y wrk). Writes bench/results/ingest.json, docs/benchmarks.md.
# Then scoring (bench-scoring) and actions (bench-actions).
bench: $(STAMP)
	$(BIN)/python -m bench.ingest
	$(MAKE) bench-scoring
	$(MAKE) bench-actions

# Scoring events/s per instance on SQLite and PostgreSQL (127.0.0.1:5432), next to a bare
# consumer; publish-to-score latency at fixed rates (~3 min). Writes bench/results/scoring.json.
bench-scoring: $(STAMP)
	$(BIN)/python -m bench.scoring

# Webhook deliveries/s through the outbox at concurrency 1/16/64 next to bare httpx and aiohttp
# clients, and outbox-to-receiver latency at 200/s with and without a hanging receiver, on
# PostgreSQL (127.0.0.1:5432) (~1.5 min). Writes bench/results/actions.json, docs/benchmarks.md.
bench-actions: $(STAMP)
	$(BIN)/python -m bench.actions

clean:
	rm -rf var/ .pytest_cache
