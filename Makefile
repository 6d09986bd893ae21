# Two commands: `make run` brings the whole system up, `make test` proves it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

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
bench: $(STAMP)
	$(BIN)/python -m bench.ingest

clean:
	rm -rf var/ .pytest_cache
