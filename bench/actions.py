"""Webhook delivery benchmarks: how many webhooks per second the outbox path delivers to one
local receiver, next to bare HTTP clients posting the same payloads to the same receiver in the
same run; and how long a webhook takes from its outbox row to the receiver at a fixed rate, with
and without a hanging receiver beside it.

One run, one receiver process (aiohttp, answers 204 at once on /ok, never on /hang), the
actions delivery worker (`services.actions.delivery.DeliveryWorker`, the service's pooled sender, signing
every request) in the bench process, with the service's collector settings (`shared.app.settled_heap`),
on PostgreSQL (a fresh database on 127.0.0.1:5432, created and dropped by the run; SQLite with
`--backend sqlite`):

1. reference: bare httpx and aiohttp clients, N POSTs of the same signed body with
   `concurrency` requests in flight (closed loop);
2. outbox path: N outbox rows written beforehand for one subscription; the worker (endpoint
   concurrency = max in flight = `concurrency`) claims, signs, POSTs and books each. Deliveries/s
   from the commit of the rows until the last one is booked (its own `delivered` counter), the
   worker warmed up as the clients are (it has delivered 50 rows before). Timed from the
   worker's start, its first connections and claims weighed on runs of 3,000: at concurrency 16,
   4,077-4,519/s, then 4,784-5,149/s warmed up, in two runs on one machine (2026-12-07). Bare
   httpx runs once per concurrency; bare aiohttp and the outbox path run `--throughput-repeats` times (3),
   interleaved, and the ratio compares their medians: single runs of either moved by 20-30%
   with the machine's other load (ratios 0.46-0.61 in three quiet runs, 2026-12-05);
3. latency: offers with their outbox rows written at a fixed rate by 4 threads of a writer
   process of their own (open loop, one transaction per offer; each commit is reported to the
   bench, which wakes the worker, as the Kafka consumer does), so that nothing but the worker
   runs in the bench process; latency to the receiver's arrival time (same machine, wall clock)
   from the scheduled write and from its commit (the writers' own lag is reported apart). Two
   conditions: a second subscription on /ok (not recorded), or on /hang (each attempt times out
   after 2 s), to see what a hanging endpoint, and not a second one, costs the healthy one. Each
   condition runs `--latency-repeats` times, interleaved (healthy, hanging, healthy, ...), each
   run on an empty outbox (`empty_outbox`); the
   goal compares the commit -> receiver p99 of each condition's deliveries pooled, with a 95%
   bootstrap interval of the change (`pooled_p99_change`); each run's p99 and their spread are
   listed too;
4. decision path: customer events and scores through the consumers' own batch handlers
   (`services.actions.consumer.apply_events` / `decide_scores`, one transaction per batch) at
   several batch sizes: SQL statements, CPU and wall time per decision and per event.

Besides deliveries/s, every throughput row reports this process's CPU per request (bare clients)
or per delivery (the outbox path: claim, sign, send, book) and the SQL statements per delivery:
figures that move much less than rates when other work shares the machine.

The whole event-to-webhook path (ingest -> scoring -> actions) at a fixed event rate is not
measured here: it needs the whole stack (see tests/e2e for how it starts).

Run with `make bench-actions` (or `.venv/bin/python -m bench.actions --help`). Writes
bench/results/actions.json and the generated actions block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from sqlalchemy import Engine

from bench.common import (
    met_text,
    create_scratch_database,
    drop_scratch_database,
    replace_generated_block,
    run_command,
)
from bench.ingest import finite, machine, percentile
from services.actions import metrics, webhooks
from services.actions.config import ActionsSettings
from services.actions.delivery import DeliveryWorker, PooledSender, signed_headers
from services.actions.tables import (
    TABLES,
    ActionsDelivery,
    ActionsDeliveryAttempt,
    ActionsOffer,
    ActionsWebhookSecret,
    ActionsWebhookSubscription,
)
from services.actions.url_guard import UrlPolicy
from services.actions.webhooks import ClaimedDelivery, generate_secret
from shared.app import settled_heap
from shared.broker import free_port
from shared.clock import SystemClock
from shared.db import create_tables, make_engine, session_scope
from shared.events import new_id

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "actions.json"
DOC = REPO / "docs" / "benchmarks.md"
DOC_START = "<!-- bench:actions:start (generated by `make bench`; edit bench/actions.py, not this block) -->"
DOC_END = "<!-- bench:actions:end -->"
TENANT = "bench"
WARMUP_DELIVERIES = 50  # as many as the bare clients' warm-up posts
BATCH = ActionsSettings.model_fields["delivery_batch_size"].default  # the service default
WRITERS = 4  # threads writing offers + outbox rows in the latency run (one cannot keep 200/s)
GOAL_RATIO = 0.5  # issue #5: the outbox path reaches >= 50% of the fastest bare client


# --- the receiver (its own process) --------------------------------------------------------


def serve_receiver(port: int) -> None:
    from aiohttp import web

    arrivals: dict[str, float] = {}

    async def ok(request: web.Request) -> web.Response:
        body = await request.read()
        if request.query.get("record"):
            offer_id = json.loads(body)["data"]["offer_id"]
            arrivals.setdefault(offer_id, time.time())
        return web.Response(status=204)

    async def hang(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(3600)
        return web.Response(status=204)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def reset(request: web.Request) -> web.Response:
        arrivals.clear()
        return web.Response(status=204)

    app = web.Application()
    app.add_routes([web.post("/ok", ok), web.post("/hang", hang), web.get("/stats", stats),
                    web.post("/reset", reset)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "bench.actions", "receiver", str(self.port)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url("/stats"), timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("receiver did not start")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def arrivals(self) -> dict[str, float]:
        return httpx.get(self.url("/stats"), timeout=10).json()

    def reset(self) -> None:
        httpx.post(self.url("/reset"), timeout=10)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- payloads, offers, outbox rows ---------------------------------------------------------


def offer_row(now: datetime) -> ActionsOffer:
    return ActionsOffer(
        offer_id=new_id(), tenant_id=TENANT, customer_id=f"c-{uuid.uuid4().hex[:8]}",
        policy="high-risk-discount", kind="discount", discount_percent=15,
        valid_until=now + timedelta(days=14), churn_probability=0.91, band="high",
        model_version="bench", score_id=new_id(), created_at=now,
    )


def payload_of(offer: ActionsOffer) -> str:
    from services.actions.service import offer_payload

    return offer_payload(offer, ["no order for 74 days", "last NPS 2 of 10"])


def subscribe(engine: Engine, url: str) -> str:
    with session_scope(engine) as session:
        return webhooks.create_subscription(
            session, TENANT, url, datetime.now(timezone.utc), UrlPolicy(allow_local=True)
        ).id


def unsubscribe(engine: Engine, subscription_id: str) -> None:
    with session_scope(engine) as session:
        webhooks.delete_subscription(session, TENANT, subscription_id, datetime.now(timezone.utc))


def fill_outbox(engine: Engine, subscription_id: str, count: int) -> float:
    """`count` offers with their outbox rows, in one transaction; perf_counter() at its commit
    (when the rows become visible to the worker)."""
    now = datetime.now(timezone.utc)
    with session_scope(engine) as session:
        for start in range(0, count, 1000):
            offers = [offer_row(now) for _ in range(min(1000, count - start))]
            session.add_all(offers)
            session.flush()
            session.add_all([
                ActionsDelivery(
                    delivery_id=f"msg_{new_id()}", tenant_id=TENANT, subscription_id=subscription_id,
                    offer_id=o.offer_id, event_type=webhooks.OFFER_CREATED_EVENT, payload=payload_of(o),
                    status="pending", attempts=0, next_attempt_at=now, created_at=now,
                )
                for o in offers
            ])
            session.flush()
    return time.perf_counter()


def make_worker(engine: Engine, concurrency: int, timeout_s: float = 15.0) -> DeliveryWorker:
    return DeliveryWorker(
        engine, PooledSender(allow_local=True, max_connections=max(concurrency, 16),
                             connect_timeout_s=timeout_s), SystemClock(),
        retry_schedule_s=[5.0], poll_s=0.05, batch_size=BATCH,
        max_in_flight=max(concurrency, 16), attempt_timeout_s=timeout_s,
        endpoint_concurrency=concurrency,
    )


def delivered_count() -> float:
    return metrics.WEBHOOK_ATTEMPTS.labels("delivered")._value.get()


# --- throughput ----------------------------------------------------------------------------


def sample_request() -> tuple[bytes, dict[str, str]]:
    offer = offer_row(datetime.now(timezone.utc))
    claimed = ClaimedDelivery("msg_bench", "", generate_secret(), payload_of(offer), 0)
    return claimed.payload.encode(), signed_headers(claimed, SystemClock())


_CPU_MARK: list[float] = [0.0]


def _cpu_us_since(mark: float | None, count: int) -> float:
    """CPU microseconds of this process per item since `mark` (None: since closed_loop began)."""
    start = _CPU_MARK[0] if mark is None else mark
    return (time.process_time() - start) * 1e6 / max(1, count)


async def closed_loop(post: Any, total: int, concurrency: int) -> float:
    _CPU_MARK[0] = time.process_time()
    remaining = total
    failures = 0

    async def one_connection() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            if not 200 <= await post() < 300:
                failures += 1

    began = time.perf_counter()
    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"{failures} requests failed")
    return total / elapsed


async def bare_httpx(url: str, total: int, concurrency: int) -> float:
    body, headers = sample_request()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=15) as client:
        async def post() -> int:
            return (await client.post(url, content=body, headers=headers)).status_code

        await closed_loop(post, min(total, 50), concurrency)  # warm-up: connections open
        return await closed_loop(post, total, concurrency), _cpu_us_since(None, total)


async def bare_aiohttp(url: str, total: int, concurrency: int) -> float:
    body, headers = sample_request()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def post() -> int:
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                await response.read()
                return response.status

        await closed_loop(post, min(total, 50), concurrency)
        return await closed_loop(post, total, concurrency), _cpu_us_since(None, total)


async def outbox_path(engine: Engine, url: str, total: int, concurrency: int) -> tuple[float, float, float]:
    """(deliveries/s, CPU us per delivery of this process, SQL statements per delivery).

    Warmed up as the bare clients are: the worker runs and has delivered a first fill (its
    connections to the database and the receiver open) before the timed fill is committed.
    Timed from that commit (which wakes the worker, as the consumer does after an offer) until
    the last delivery is booked."""
    subscription_id = await asyncio.to_thread(subscribe, engine, url)
    worker = make_worker(engine, concurrency)
    try:
        worker.start()
        warmed_up = delivered_count() + WARMUP_DELIVERIES
        await asyncio.to_thread(fill_outbox, engine, subscription_id, WARMUP_DELIVERIES)
        worker.wake()
        await delivered(warmed_up, "warm-up")
        target = delivered_count() + total
        with StatementCounter(engine) as statements:
            claims, bookings = worker.claims.statements, worker.bookings.statements
            began = await asyncio.to_thread(fill_outbox, engine, subscription_id, total)
            cpu, filling = time.process_time(), statements.count  # the fill's own are not counted
            worker.wake()
            await delivered(target, "outbox path")
            elapsed = time.perf_counter() - began
            cpu_us = _cpu_us_since(cpu, total)
            # plus the worker's own connections on PostgreSQL (not through the engine)
            count = (statements.count - filling + worker.claims.statements - claims
                     + worker.bookings.statements - bookings)
    finally:
        await worker.stop()
    await asyncio.to_thread(unsubscribe, engine, subscription_id)
    return total / elapsed, cpu_us, count / total


async def delivered(target: float, what: str, limit_s: float = 600) -> None:
    deadline = time.perf_counter() + limit_s
    while delivered_count() < target:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what} did not finish within {limit_s:.0f} s")
        await asyncio.sleep(0.005)


def throughput_row(engine: Engine, url: str, total: int, concurrency: int, repeats: int) -> dict[str, Any]:
    """One concurrency: bare httpx once (far the slowest client here, a reference only), then
    bare aiohttp and the outbox path `repeats` times, interleaved, so that a change in the
    machine's other load hits both alike. Rates and CPU figures are the runs' medians; the
    ratio is the outbox's median over the fastest client's median, and every run is kept."""
    row: dict[str, Any] = {"concurrency": concurrency, "repeats": repeats}
    row["httpx"], row["httpx_cpu_us"] = asyncio.run(bare_httpx(url, total, concurrency))
    runs: dict[str, list[float]] = {name: [] for name in (
        "aiohttp_runs", "aiohttp_cpu_us_runs", "outbox_runs", "outbox_cpu_us_runs", "outbox_statements_runs")}
    for _ in range(repeats):
        rate, cpu_us = asyncio.run(bare_aiohttp(url, total, concurrency))
        runs["aiohttp_runs"].append(rate)
        runs["aiohttp_cpu_us_runs"].append(cpu_us)
        rate, cpu_us, statements = asyncio.run(outbox_path(engine, url, total, concurrency))
        runs["outbox_runs"].append(rate)
        runs["outbox_cpu_us_runs"].append(cpu_us)
        runs["outbox_statements_runs"].append(statements)
    row.update(runs)
    for name, values in runs.items():
        row[name.removesuffix("_runs")] = statistics.median(values)
    row["ratio"] = row["outbox"] / max(row["httpx"], row["aiohttp"])
    return row


# --- latency -------------------------------------------------------------------------------


def write_offer(engine: Engine) -> str:
    now = datetime.now(timezone.utc)
    with session_scope(engine) as session:
        offer = offer_row(now)
        session.add(offer)
        session.flush()
        webhooks.enqueue(session, tenant_id=TENANT, offer_id=offer.offer_id, payload=payload_of(offer), now=now)
        return offer.offer_id


def run_writers(database_url: str, rate: float, duration_s: float) -> None:
    """`python -m bench.actions writer URL RATE SECONDS`: its own process, so that writing offers
    does not compete with the delivery worker for the bench process (its GIL and event loop).
    Prints `ready`, then `offer_id scheduled committed` (epoch seconds) per committed offer; the
    bench wakes the worker on each line, as the Kafka consumer does after its commit."""
    engine = make_engine(database_url)
    warm = [engine.connect() for _ in range(WRITERS)]  # one open connection per writer thread
    for connection in warm:
        connection.exec_driver_sql("SELECT 1")
        connection.close()
    lock = threading.Lock()
    print("ready", flush=True)
    began = time.time() + 0.2
    total = int(rate * duration_s)

    def writer(lane: int) -> None:  # open loop: on schedule whether or not the worker keeps up
        for i in range(lane, total, WRITERS):
            due = began + i / rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            offer_id = write_offer(engine)
            committed = time.time()
            with lock:
                sys.stdout.write(f"{offer_id} {due:.6f} {committed:.6f}\n")
                sys.stdout.flush()

    threads = [threading.Thread(target=writer, args=(lane,)) for lane in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()


OUTBOX_TABLES = tuple(model.__tablename__ for model in (  # children first
    ActionsDeliveryAttempt, ActionsDelivery, ActionsWebhookSecret, ActionsWebhookSubscription, ActionsOffer))


def empty_outbox(engine: Engine) -> None:
    """Every latency run starts from the same, empty outbox: the runs before left tens of
    thousands of rows (and their dead versions) behind, and commit -> receiver latency rose
    from run to run (p50 1.8 -> 3.4 ms over ten runs, 2026-12-07), which widened the
    hanging-receiver comparison's interval more than the receiver itself moved it."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql(f"TRUNCATE {', '.join(OUTBOX_TABLES)}")
        else:
            for table in OUTBOX_TABLES:
                connection.exec_driver_sql(f"DELETE FROM {table}")
        connection.commit()


async def outbox_latency(engine: Engine, database_url: str, receiver: Receiver, rate: float,
                         duration_s: float, hanging: bool) -> dict[str, Any]:
    """One run: a healthy subscription (recorded) and a second one, on /ok or on /hang; the
    offers (one outbox row per subscription each) come from the writer process."""
    await asyncio.to_thread(receiver.reset)
    healthy = await asyncio.to_thread(subscribe, engine, receiver.url("/ok?record=1"))
    # The baseline has a second subscription too, on a healthy endpoint: every offer then writes
    # two outbox rows in both conditions, and the difference is the hanging endpoint's alone.
    second = await asyncio.to_thread(subscribe, engine, receiver.url("/hang" if hanging else "/ok"))
    worker = make_worker(engine, 8, timeout_s=2.0)
    worker.start()
    scheduled: dict[str, float] = {}
    committed: dict[str, float] = {}
    writers = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.actions", "writer", database_url, str(rate), str(duration_s),
        stdout=asyncio.subprocess.PIPE, cwd=REPO)
    try:
        assert writers.stdout is not None
        if (await writers.stdout.readline()).strip() != b"ready":
            raise RuntimeError("the writer process did not start")
        async for line in writers.stdout:
            offer_id, due, done = line.split()
            worker.wake()
            scheduled[offer_id.decode()] = float(due)
            committed[offer_id.decode()] = float(done)
        if await writers.wait() != 0:
            raise RuntimeError(f"the writer process failed ({writers.returncode})")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            arrivals = await asyncio.to_thread(receiver.arrivals)
            if len(arrivals) >= len(scheduled):
                break
            await asyncio.sleep(0.2)
    finally:
        if writers.returncode is None:
            writers.kill()
            await writers.wait()
        await worker.stop()
        for subscription in (healthy, second):
            await asyncio.to_thread(unsubscribe, engine, subscription)
    latencies = sorted((arrivals[o] - t) * 1000 for o, t in scheduled.items() if o in arrivals)
    from_commit = sorted((arrivals[o] - t) * 1000 for o, t in committed.items() if o in arrivals)
    write_lag = sorted((committed[o] - t) * 1000 for o, t in scheduled.items())
    # When the slowest 1% (commit -> receiver) happened, seconds into the run: a tail bunched at one
    # moment (the hanging endpoint's first timeouts at 2 s, its circuit opening) is the worker's
    # doing; one spread over the run is more likely the machine's.
    first = min(scheduled.values(), default=0.0)
    slowest = sorted(((arrivals[o] - t, t) for o, t in committed.items() if o in arrivals), reverse=True)
    tail_at = sorted(round(t - first, 2) for _, t in slowest[:max(1, len(slowest) // 100)])
    return {
        "tail_at_s": tail_at,
        # the samples, for the pooled comparison (latency_summary); dropped before the JSON is written
        "from_commit_ms": [round(v, 3) for v in from_commit],
        "from_commit_p50_ms": percentile(from_commit, 50), "from_commit_p99_ms": percentile(from_commit, 99),
        "write_lag_p99_ms": percentile(write_lag, 99),
        "rate": rate, "seconds": duration_s, "hanging_receiver": hanging, "sent": len(scheduled),
        "delivered": len(latencies), "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99), "max_ms": latencies[-1] if latencies else None,
    }


def latency_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per condition (beside a healthy / a hanging receiver): each run's commit -> receiver p99,
    their median, and their spread (max - min over the median); the larger of the two spreads is
    `noise_floor`.

    `pooled`: the p99 of all of a condition's deliveries together, the relative change of those
    two, and its 95% confidence interval from a two-stage bootstrap (runs drawn with replacement,
    then deliveries within each drawn run), so both the run-to-run and the within-run variation
    are in the interval. A p99 of a few ms moves by more than 10% between two runs of one
    condition on a shared 2-CPU machine; the pooled change and its interval can still tell."""
    out: dict[str, Any] = {}
    samples: dict[str, list[list[float]]] = {}
    for hanging, name in ((False, "healthy_beside"), (True, "hanging_beside")):
        chosen = [r for r in runs if r["hanging_receiver"] is hanging
                  and r["from_commit_p99_ms"] is not None and math.isfinite(r["from_commit_p99_ms"])]
        if not chosen:
            continue
        p99s = [r["from_commit_p99_ms"] for r in chosen]
        median = statistics.median(p99s)
        out[name] = {"p99_ms": p99s, "median_p99_ms": median,
                     "spread": (max(p99s) - min(p99s)) / median if median else None}
        samples[name] = [r["from_commit_ms"] for r in chosen if r.get("from_commit_ms")]
    if "healthy_beside" in out and "hanging_beside" in out:
        spreads = [x["spread"] for x in (out["healthy_beside"], out["hanging_beside"]) if x["spread"] is not None]
        out["noise_floor"] = max(spreads) if spreads else None
        if samples["healthy_beside"] and samples["hanging_beside"]:
            out["pooled"] = pooled_p99_change(samples["healthy_beside"], samples["hanging_beside"])
    return out


def pooled_p99_change(healthy: list[list[float]], hanging: list[list[float]], draws: int = 1000,
                      seed: int = 5) -> dict[str, Any]:
    """p99 of each condition's pooled deliveries, their relative change and its 95% bootstrap
    interval (two-stage: runs, then deliveries within a run). `inverted_cdf` is the rank
    definition bench.ingest.percentile uses."""
    import numpy as np

    rng = np.random.default_rng(seed)
    runs = {name: [np.asarray(r, dtype=float) for r in sets] for name, sets in
            (("healthy", healthy), ("hanging", hanging))}

    def p99(values: np.ndarray) -> float:
        return float(np.quantile(values, 0.99, method="inverted_cdf"))

    def redrawn(sets: list[np.ndarray]) -> np.ndarray:
        picked = rng.integers(0, len(sets), len(sets))
        return np.concatenate([sets[i][rng.integers(0, len(sets[i]), len(sets[i]))] for i in picked])

    base, hang = p99(np.concatenate(runs["healthy"])), p99(np.concatenate(runs["hanging"]))
    changes = np.array([p99(redrawn(runs["hanging"])) / p99(redrawn(runs["healthy"])) - 1 for _ in range(draws)])
    low, high = np.quantile(changes, [0.025, 0.975])
    return {"healthy_p99_ms": base, "hanging_p99_ms": hang, "change": hang / base - 1,
            "ci95": [float(low), float(high)], "deliveries": [sum(map(len, runs["healthy"])),
                                                              sum(map(len, runs["hanging"]))],
            "draws": draws}


# --- the decision path ---------------------------------------------------------------------

DECISION_DOCUMENT: dict[str, Any] = {
    "customer_cooldown_days": 30,
    "offers": {
        "discount-15": {"kind": "discount", "discount_percent": 15, "validity_days": 14, "cost": 8.0},
        "survey": {"kind": "feedback_survey", "service": True, "validity_days": 14, "cost": 0.5},
    },
    "policies": [
        {"name": "high-risk-discount", "priority": 100, "triggers": ["score"], "when": {"score": {"min": 0.7}},
         "offer": "discount-15", "cooldown_days": 30, "budget": {"period": "month", "max_count": 1_000_000}},
        {"name": "medium-risk-survey", "priority": 200, "triggers": ["score"], "when": {"score": {"min": 0.4}},
         "offer": "survey", "cooldown_days": 7},
    ],
}


class StatementCounter:
    """Counts statements sent to the database through `engine` while in use (an executemany
    counts once; BEGIN and COMMIT are not counted)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.count = 0

    def _before(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> StatementCounter:
        from sqlalchemy import event

        event.listen(self.engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *_: Any) -> None:
        from sqlalchemy import event

        event.remove(self.engine, "before_cursor_execute", self._before)


def decision_path(engine: Engine, customers: int, batch: int) -> dict[str, Any]:
    """Scores and customer events through the consumers' own batch handlers (one transaction
    per batch, as the Kafka consumers run them), in this process: SQL statements and CPU time per
    decision and per event. Each customer gets a profile event, then two scores in different
    batches (the second meets the first's cooldown), probabilities spread over 0.1-0.95 so some
    decisions are offers (and outbox rows), some are suppressions."""
    import random

    from services.actions.consumer import apply_events, decide_scores
    from services.actions.policies import PolicyDocument
    from services.actions.service import PolicyCache, Rules
    from shared.events import EventRecord, ScoreRecord, parse_event

    rules = Rules(default_document=PolicyDocument.model_validate(DECISION_DOCUMENT), consent_required=False,
                  holdout_percent=10.0, cache=PolicyCache(60.0))
    tenant = f"dec-{uuid.uuid4().hex[:6]}"
    with session_scope(engine) as session:
        webhooks.create_subscription(session, tenant, "http://127.0.0.1:9/hooks", datetime.now(timezone.utc),
                                     UrlPolicy(allow_local=True))
    clock = SystemClock()
    rng = random.Random(5)
    names = [f"c-{i}" for i in range(customers)]
    now = datetime.now(timezone.utc)
    events = [
        EventRecord(tenant_id=tenant, received_at=now, event=parse_event({
            "id": new_id(), "type": "session.recorded", "customer_id": name,
            "occurred_at": now.isoformat(), "data": {"duration_seconds": 60}}, now=now))
        for name in names
    ]

    def score(name: str) -> ScoreRecord:
        p = rng.uniform(0.1, 0.95)
        return ScoreRecord(score_id=new_id(), tenant_id=tenant, customer_id=name, probability=p,
                           band="high" if p >= 0.7 else "medium" if p >= 0.4 else "low", model_version="bench",
                           scored_at=datetime.now(timezone.utc), features={"spend_365d": 120.0},
                           reasons=["no order for 74 days"])

    scores = [score(name) for name in names] + [score(name) for name in names]
    out: dict[str, Any] = {"customers": customers, "batch": batch}

    def handle_events(batch: list[Any]) -> Any:
        return apply_events(engine, batch, rules, clock, timedelta(hours=48))[0]

    def handle_scores(batch: list[Any]) -> Any:
        return decide_scores(engine, batch, rules, clock)

    for what, items, handle in (("events", events, handle_events), ("scores", scores, handle_scores)):
        cpu, wall = time.process_time(), time.perf_counter()
        offers = 0
        with StatementCounter(engine) as counter:
            for start in range(0, len(items), batch):
                offers += sum(1 for r in handle(items[start:start + batch]) if r.deliveries)
        n = len(items)
        out[what] = {
            "count": n, "offers": offers,
            "statements_per_item": round(counter.count / n, 2),
            "cpu_ms_per_item": round((time.process_time() - cpu) * 1000 / n, 3),
            "wall_ms_per_item": round((time.perf_counter() - wall) * 1000 / n, 3),
        }
    return out


# --- report --------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def tables(results: dict[str, Any]) -> str:
    out = ["| concurrency | bare httpx /s | bare aiohttp /s (median; runs) | outbox path /s (median; runs) | "
           "outbox / fastest bare | CPU us per request: httpx / aiohttp / outbox | SQL statements per delivery |",
           "|---:|---:|---:|---:|---:|---|---:|"]

    def runs(r: dict[str, Any], name: str) -> str:
        return fmt(r[name]) + ("; " + ", ".join(fmt(v) for v in r[f"{name}_runs"]) if f"{name}_runs" in r else "")

    for r in results["throughput"]:
        out.append(f"| {r['concurrency']} | {fmt(r['httpx'])} | {runs(r, 'aiohttp')} | {runs(r, 'outbox')} | "
                   f"{fmt(r['ratio'], '.2f')} | {fmt(r.get('httpx_cpu_us'))} / {fmt(r.get('aiohttp_cpu_us'))} / "
                   f"{fmt(r.get('outbox_cpu_us'))} | {fmt(r.get('outbox_statements'), '.2f')} |")
    if results.get("decisions"):
        out += ["", "| decision path, batch of | per decision: SQL statements | CPU ms | wall ms | "
                "per customer event: SQL statements | CPU ms | wall ms |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["decisions"]:
            d, e = r["scores"], r["events"]
            out.append(f"| {r['batch']} | {d['statements_per_item']:.2f} | {d['cpu_ms_per_item']:.2f} | "
                       f"{d['wall_ms_per_item']:.2f} | {e['statements_per_item']:.2f} | {e['cpu_ms_per_item']:.2f} | "
                       f"{e['wall_ms_per_item']:.2f} |")
    if results["latency"]:
        out += ["", "| run | offers + outbox rows written at | delivered | scheduled -> receiver p50 / p99 ms | "
                "commit -> receiver p50 / p99 ms | writers' lag p99 ms |",
                "|---:|---|---:|---:|---:|---:|"]
        for i, r in enumerate(results["latency"], 1):
            what = f"{r['rate']:,.0f}/s, beside " + ("a hanging receiver" if r["hanging_receiver"] else "a second healthy receiver")
            out.append(f"| {i} | {what} | {r['delivered']:,}/{r['sent']:,} | {fmt(r['p50_ms'], '.1f')} / "
                       f"{fmt(r['p99_ms'], '.1f')} | {fmt(r['from_commit_p50_ms'], '.1f')} / "
                       f"{fmt(r['from_commit_p99_ms'], '.1f')} | {fmt(r['write_lag_p99_ms'], '.1f')} |")
        summary = results["latency_summary"]
        if summary:
            out += ["", "| healthy endpoint's commit -> receiver p99, beside | each run, ms | median ms | "
                    "spread of the runs (max - min) / median |", "|---|---|---:|---:|"]
            for key, what in (("healthy_beside", "a second healthy receiver"), ("hanging_beside", "a hanging receiver")):
                if key in summary:
                    x = summary[key]
                    out.append(f"| {what} | {', '.join(format(v, '.1f') for v in x['p99_ms'])} | "
                               f"{x['median_p99_ms']:.1f} | {fmt(x['spread'], '.0%')} |")
            if pooled := summary.get("pooled"):
                out += ["", f"All runs' deliveries pooled per condition ({pooled['deliveries'][0]:,} and "
                        f"{pooled['deliveries'][1]:,}): healthy endpoint's commit -> receiver p99 "
                        f"{pooled['healthy_p99_ms']:.1f} ms beside a second healthy receiver, "
                        f"{pooled['hanging_p99_ms']:.1f} ms beside a hanging one: change {pooled['change']:+.1%}, "
                        f"95% interval {pooled['ci95'][0]:+.1%} to {pooled['ci95'][1]:+.1%} (two-stage bootstrap "
                        f"over runs and their deliveries, {pooled['draws']:,} draws)."]
    out += ["", "| goal (issue #5) | value | met |", "|---|---:|---|"]
    for g in results["goals"]:
        out.append(f"| {g['text']} | {fmt(g['value'], '.2f')} | {met_text(g['met'])} |")
    return "\n".join(out)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"goal": f"outbox_ratio_c{r['concurrency']}",
             "text": f"outbox path >= 50% of the fastest bare client, concurrency {r['concurrency']}",
             "value": r["ratio"], "met": r["ratio"] >= GOAL_RATIO} for r in results["throughput"]]
    baseline = [r["p99_ms"] for r in results["latency"] if not r["hanging_receiver"]
                and r["p99_ms"] is not None and math.isfinite(r["p99_ms"])]
    if baseline:
        median = statistics.median(baseline)
        rows.append({"goal": "outbox_p99_ms", "value": median, "met": median < 500,
                     "text": f"outbox row -> webhook p99 < 500 ms at {results['settings']['rate']:,.0f}/s (from "
                             f"the scheduled write, so the writers' lag counts; median of the {len(baseline)} "
                             "runs beside a healthy receiver; the actions part of the issue's event-to-webhook "
                             "goal), ms"})
    summary = results["latency_summary"]
    if pooled := summary.get("pooled"):
        # From the commit (in the writer process): the writers' own lag is not the worker's doing.
        change, (low, high) = pooled["change"], pooled["ci95"]
        runs = len(summary["healthy_beside"]["p99_ms"]), len(summary["hanging_beside"]["p99_ms"])
        rows.append({"goal": "hanging_p99_change", "value": change, "ci95": pooled["ci95"],
                     # met when the interval's upper end is below +10%: a hanging receiver slowing
                     # the healthy one by 10% or more is then ruled out at 95%, not merely unseen
                     "met": high < 0.10,
                     "text": "a hanging receiver changes the healthy one's commit -> receiver p99 by < 10% "
                             f"(all deliveries of {runs[0]} and {runs[1]} interleaved runs pooled per "
                             f"condition: {pooled['healthy_p99_ms']:.1f} -> {pooled['hanging_p99_ms']:.1f} ms, "
                             f"95% interval of the change {low:+.1%} to {high:+.1%}; each run's p99 spread "
                             f"by up to {fmt(summary.get('noise_floor'), '.0%')} within a condition)"})
    return rows


def write_doc(results: dict[str, Any]) -> None:
    m = results["machine"]
    block = "\n".join([
        DOC_START,
        f"Actions (webhooks), run on {results['date']} with `{results['command']}` "
        f"({results['total_seconds']:.0f} s; raw JSON in `bench/results/actions.json`) on {results['backend']}. "
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}; load average (1 min) "
        f"{m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after. One aiohttp receiver "
        "process answering 204; the clients and the delivery worker in the bench process (the latency runs' "
        "writers in a process of their own). Bare clients "
        "send one pre-signed body after 50 warm-up posts; the outbox path claims, signs, sends and books "
        f"every delivery ({results['settings']['deliveries']:,} per row, timed from their commit, the "
        f"worker warmed up on {WARMUP_DELIVERIES}). Each latency run starts on an empty outbox.",
        "",
        tables(results),
        DOC_END,
    ])
    replace_generated_block(DOC, DOC_START, DOC_END, block, intro_if_new=(
        "## Actions (webhooks)\n\n`make bench` also runs `bench/actions.py` (see its docstring): "
        "webhook deliveries/s through the outbox next to bare httpx and aiohttp clients, and outbox-to-"
        "receiver latency at a fixed rate with and without a hanging receiver. The whole event-to-webhook "
        "path at a fixed event rate is not measured yet.\n\n"))


# --- main ----------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["receiver"]:
        serve_receiver(int(arguments[1]))
        return 0
    if arguments[:1] == ["writer"]:
        run_writers(arguments[1], float(arguments[2]), float(arguments[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.actions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=3000, help="deliveries per throughput row")
    parser.add_argument("--concurrency", type=ints, default=[1, 16, 64])
    parser.add_argument("--throughput-repeats", type=int, default=3,
                        help="throughput: runs of bare aiohttp and of the outbox path per concurrency, interleaved")
    parser.add_argument("--rate", type=float, default=200.0, help="latency: outbox rows per second")
    parser.add_argument("--latency-duration", type=float, default=20.0, help="latency: seconds per run")
    parser.add_argument("--latency-repeats", type=int, default=16,
                        help="latency: runs per condition (healthy / hanging second receiver), interleaved")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--decision-batches", type=ints, default=[1, 10, 50, 200],
                        help="decision path: batch sizes (scores/events per transaction)")
    parser.add_argument("--decision-customers", type=int, default=1000,
                        help="decision path: customers (one event and two scores each)")
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)

    command = run_command("bench.actions", argv)
    began = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command.strip(),
        "machine": machine(), "backend": args.backend,
        "settings": {"deliveries": args.deliveries, "concurrency": args.concurrency,
                     "throughput_repeats": args.throughput_repeats, "rate": args.rate,
                     "latency_seconds": args.latency_duration, "latency_repeats": args.latency_repeats},
        "throughput": [], "latency": [], "decisions": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="churnguard-bench-actions-"))
    pg_name: str | None = None
    receiver = Receiver()
    stack = contextlib.ExitStack()
    try:
        if args.backend == "postgresql":
            pg_name, url = create_scratch_database()
        else:
            url = f"sqlite:///{workdir / 'actions.db'}"
        engine = make_engine(url)
        create_tables(engine, TABLES)
        # The worker runs in this process: with the collector settings the actions service
        # serves with (startup's objects frozen, young collections rarer).
        stack.enter_context(settled_heap())
        target = receiver.url("/ok")
        for concurrency in args.concurrency:
            row = throughput_row(engine, target, args.deliveries, concurrency, args.throughput_repeats)
            results["throughput"].append(row)
            print(f"concurrency {concurrency}: httpx {row['httpx']:,.0f}/s, aiohttp {row['aiohttp']:,.0f}/s, "
                  f"outbox {row['outbox']:,.0f}/s ({row['ratio']:.2f} of the fastest bare client; runs: "
                  f"aiohttp {', '.join(f'{v:,.0f}' for v in row['aiohttp_runs'])}, "
                  f"outbox {', '.join(f'{v:,.0f}' for v in row['outbox_runs'])})", flush=True)
        for batch in args.decision_batches:
            decisions = decision_path(engine, args.decision_customers, batch)
            results["decisions"].append(decisions)
            print(f"decision path, batches of {batch}: per decision {decisions['scores']}, "
                  f"per event {decisions['events']}", flush=True)
        if not args.no_latency:
            # Interleaved (A B A B ...), so drift of the machine's load hits both conditions alike.
            for run in range(args.latency_repeats):
                for hanging in (False, True):
                    empty_outbox(engine)
                    lat = asyncio.run(outbox_latency(engine, url, receiver, args.rate, args.latency_duration,
                                                     hanging))
                    results["latency"].append(lat)
                    print(f"latency run {run + 1} at {args.rate:,.0f}/s beside a "
                          f"{'hanging' if hanging else 'second healthy'} receiver: commit -> receiver "
                          f"p50 {fmt(lat['from_commit_p50_ms'], '.1f')} ms, p99 {fmt(lat['from_commit_p99_ms'], '.1f')} ms, "
                          f"{lat['delivered']}/{lat['sent']} delivered", flush=True)
        engine.dispose()
    finally:
        stack.close()
        receiver.stop()
        if pg_name:
            drop_scratch_database(pg_name)
        shutil.rmtree(workdir, ignore_errors=True)

    results["total_seconds"] = time.perf_counter() - began
    results["machine"]["loadavg_after"] = list(os.getloadavg())
    results["latency_summary"] = latency_summary(results["latency"])
    for run in results["latency"]:
        run.pop("from_commit_ms", None)  # summarised above; thousands of numbers per run
    results["goals"] = goals(results)
    print()
    print(tables(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(finite(results), indent=2, allow_nan=False) + "\n")
    print(f"\nwrote {args.out}")
    if not args.no_doc:
        write_doc(results)
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
