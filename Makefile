# Two commands: `make run` brings the whole system up, `make test` proves it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench bench-scoring clean

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
# Then scoring (bench-scoring).
bench: $(STAMP)
	$(BIN)/python -m bench.ingest
	$(MAKE) bench-scoring

# Scoring events/s per instance on SQLite and PostgreSQL (127.0.0.1:5432), next to a bare
# consumer; publish-to-score latency at fixed rates (~3 min). Writes bench/results/scoring.json.
bench-scoring: $(STAMP)
	$(BIN)/python -m bench.scoring

clean:
	rm -rf var/ .pytest_cache
