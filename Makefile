# Two commands: `make run` brings the whole system up, `make test` proves it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-tools run test k8s-validate bench bench-tools bench-scoring bench-actions bench-pipeline bench-summary soak chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) system-tools

# $(call debian_tool,COMMAND,PACKAGE,WHAT IF MISSING): installs the Debian package when the command
# is missing and apt is usable as root; otherwise says what is missing and what that means.
define debian_tool
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(1) (apt-get install $(2))"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
	  else echo "$(1) missing: apt-get install -y $(2) (as root); $(3)" >&2; fi; }
endef

# promtool (Debian's prometheus package) checks and unit-tests deploy/prometheus in `make test`
# (in CI a missing promtool fails those tests). kubectl (1.32, with kustomize) is expected on
# the machine for deploy/k8s.
system-tools:
	$(call debian_tool,promtool,prometheus,the deploy/prometheus tests will fail)

# wrk drives the ingest bench's single-event runs: it costs the shared CPUs far less than the
# Python fallback client, which would otherwise take cores from the services measured.
bench-tools:
	$(call debian_tool,wrk,wrk,the ingest bench falls back to a slower client)

run: $(STAMP)
	$(BIN)/churnguard dev

test: $(STAMP) system-tools
	$(BIN)/python -m pytest

# Renders deploy/k8s/overlays/* with kubectl kustomize and validates every resource against the
# Kubernetes 1.32 schemas (strict); lists the custom resources it cannot validate. Also in `make test`.
k8s-validate: $(STAMP)
	$(BIN)/python -m deploy.k8s.validate

# The make command a run was started by, written into its result file (bench/common.py
# run_command); a sub-make keeps its parent's, so each part of `make bench` says `make bench`.
bench bench-summary bench-scoring bench-actions bench-pipeline soak chaos: export BENCH_COMMAND ?= make $(MAKECMDGOALS)

# Ingest throughput and latency on a real broker and real service processes (~2.5 min; wrk is
# installed when missing, see bench-tools). Writes bench/results/ingest.json, docs/benchmarks.md.
# Then scoring (bench-scoring), actions (bench-actions), the whole pipeline (bench-pipeline), and
# last the one summary table of all four (bench-summary). About 20 minutes in all.
bench: $(STAMP) bench-tools
	$(BIN)/python -m bench.ingest
	$(MAKE) bench-scoring
	$(MAKE) bench-actions
	$(MAKE) bench-pipeline
	$(MAKE) bench-summary

# One table from bench/results/{ingest,scoring,actions,pipeline}.json: each figure, its raw
# reference from the same run, the ratio and the goal; says which file is missing or older.
# Measures nothing (seconds). Writes bench/results/summary.json and the top block of docs/benchmarks.md.
bench-summary: $(STAMP)
	$(BIN)/python -m bench.summary

# Scoring events/s per instance on SQLite and PostgreSQL (127.0.0.1:5432), next to a bare
# consumer; publish-to-score latency at fixed rates (~3 min). Writes bench/results/scoring.json.
bench-scoring: $(STAMP)
	$(BIN)/python -m bench.scoring

# Webhook deliveries/s through the outbox at concurrency 1/16/64 next to bare httpx and aiohttp
# clients, and outbox-to-receiver latency at 200/s with and without a hanging receiver, on
# PostgreSQL (127.0.0.1:5432) (~13 min). Writes bench/results/actions.json, docs/benchmarks.md.
bench-actions: $(STAMP)
	$(BIN)/python -m bench.actions

# Event-to-score and event-to-webhook latency through the gateway at fixed rates, and RSS per
# service at rest and under load, on the whole stack with PostgreSQL (~2 min).
# Writes bench/results/pipeline.json and docs/benchmarks.md.
bench-pipeline: $(STAMP)
	$(BIN)/python -m bench.pipeline

# Memory over a long steady run: 10 minutes at 50 events/s, RSS sampled every 10 s (~12 min).
soak: $(STAMP)
	$(BIN)/python -m bench.pipeline --rates 50 --duration 10 --soak-seconds 600 --soak-rate 50 --no-doc --out bench/results/soak.json

# Fault injection, the long run: 100,000 events replayed through the gateway while services are
# SIGKILLed (20 times), the broker SIGSTOPped, the receiver fails and hangs and the database goes
# away; then checks that nothing was lost or doubled. On PostgreSQL (a server the run starts
# itself) and then SQLite (~25 min). Writes bench/results/chaos.json and docs/reliability.md.
# A shortened variant runs in `make test` (tests/chaos).
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos

clean:
	rm -rf var/ .pytest_cache
