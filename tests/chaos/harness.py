"""Nothing lost, nothing doubled, under faults: the fault-injection run.

On real parts only: a Tansu broker process, a database (a PostgreSQL server this run starts
itself, or a SQLite file), the four `churnguard serve` processes and a webhook receiver (aiohttp,
in this process). A client replays simulated customer histories through the gateway in batches,
retrying on 503 (and on any other 5xx or dropped connection: the event ids make resending safe)
as docs/events.md tells upstream senders to. Meanwhile a fault injector, at random moments:

- SIGKILLs a random service and restarts it (every service at least once),
- SIGSTOPs the broker for a few seconds, then SIGCONTs it,
- makes the webhook receiver answer 500, or hang past the delivery timeout, for a while,
- takes the database away and back (PostgreSQL: an immediate shutdown, i.e. a crash, then a
  restart; SQLite: another process holds an exclusive lock on the file),
- writes poisoned messages straight to the topics (tests.poison).

A supervisor restarts any service that exits on its own (as Kubernetes would) and counts it.
When the load and the faults are over and the pipeline has drained, `check` reads the database,
the topics and the receiver's log and reports: events lost and duplicated, features that differ
from a recomputation from scratch, triggers with more than one offer, offers that neither reached
the receiver nor were parked with a reason, deliveries stuck in the outbox, and dead letters
other than the deliberate ones.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from sqlalchemy import text
from standardwebhooks import Webhook

from services.actions.config import DEFAULT_POLICIES_FILE
from services.actions.policies import load_policy_file
from services.gateway import manage as gateway_ops
from services.scoring import cli_ops as scoring_ops
from services.scoring import repository as scoring_repository
from services.scoring.features import compute_features
from services.scoring.simulate import simulate_history
from shared.broker import free_port, start_broker
from shared.db import make_engine, session_scope
from shared.settings import KafkaSettings
from shared.topics import ALL_TOPICS, CHURN_SCORES, CUSTOMER_EVENTS, dead_letter
from tests.poison import Poisoned, check_dead_letters, poisoned_events, poisoned_scores, write_poisoned
from tests.helpers import read_topic
from tools.postgres import LocalPostgres
from tools.stack import SERVICES, ServiceStack

log = logging.getLogger("chaos")

SECRET = "whsec_" + "Y2hhb3MtcmVjZWl2ZXItc2VjcmV0LTAxMjM0NTY3"
INTERNAL_TOKEN = "chaos-internal-token"
EVENTS_PER_CUSTOMER = 31
# Rough duration of each fault, kills including the restart until ready, for spacing them.
FAULT_SECONDS = {"kill": 6.0, "broker_pause": 3.5, "receiver_fail": 5.5, "receiver_hang": 5.5,
                 "database_outage": 5.0, "poison": 0.5}  # what simulate_history yields on average over 365 days


@dataclass
class ChaosConfig:
    workdir: Path
    events: int = 100_000
    load_seconds: float = 300.0
    kills: int = 20
    broker_pauses: int = 3
    receiver_failures: int = 2
    receiver_hangs: int = 2
    database_outages: int = 3
    database: str = "postgresql"  # or "sqlite"
    seed: int = 7
    batch_size: int = 100
    senders: int = 4
    resend_fraction: float = 0.02
    drain_timeout_s: float = 900.0
    train_customers: int = 1500

    def fault_plan(self, rng: random.Random) -> list[tuple[str, str]]:
        kills = [("kill", SERVICES[i % len(SERVICES)]) for i in range(max(self.kills, len(SERVICES)))]
        plan = [
            *kills,
            *[("broker_pause", "broker")] * self.broker_pauses,
            *[("receiver_fail", "receiver")] * self.receiver_failures,
            *[("receiver_hang", "receiver")] * self.receiver_hangs,
            *[("database_outage", self.database)] * self.database_outages,
            ("poison", "topics"),
        ]
        rng.shuffle(plan)
        return plan


# --- the marketing tool ----------------------------------------------------------------------


class Receiver:
    """Verifies every webhook's signature and records it by webhook-id; can be told to fail
    (500) or hang (answer only when the hang is over, after the sender has given up)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "ok"
        self._calm = asyncio.Event()
        self._calm.set()
        self.accepted: dict[str, dict[str, Any]] = {}  # webhook-id -> payload, first 2xx answer
        self.deliveries_by_id: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        self.bad_signatures = 0
        self._verifier = Webhook(SECRET)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "ok":
            self._calm.set()
        else:
            self._calm.clear()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.mode == "fail":
            self.answers["500"] += 1
            return web.Response(status=500, text="receiver failing on purpose")
        if self.mode == "hang":
            self.answers["hang"] += 1
            await self._calm.wait()
        try:
            payload = self._verifier.verify(body, dict(request.headers))
        except Exception:  # noqa: BLE001 - any verification failure is a bad signature
            self.bad_signatures += 1
            return web.Response(status=400, text="bad signature")
        webhook_id = request.headers["webhook-id"]
        self.deliveries_by_id[webhook_id] += 1
        self.accepted.setdefault(webhook_id, payload)
        self.answers["204"] += 1
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.set_mode("ok")
        if self._runner is not None:
            await self._runner.cleanup()


# --- the upstream shop -----------------------------------------------------------------------


def replay_events(config: ChaosConfig, end: datetime) -> list[dict[str, Any]]:
    """Simulated histories of enough customers for `config.events` events, in time order across
    customers (a replay of a year), shuffled within small windows so some arrive out of order."""
    customers = max(10, math.ceil(config.events / EVENTS_PER_CUSTOMER * 1.05))
    events: list[dict[str, Any]] = []
    while len(events) < config.events:
        events = list(simulate_history(customers, config.seed, end, days=365, customer_prefix="chaos-"))
        customers = math.ceil(customers * 1.2)
    events.sort(key=lambda e: e["occurred_at"])
    rng = random.Random(config.seed)
    window = 200
    for start in range(0, len(events), window):
        chunk = events[start:start + window]
        rng.shuffle(chunk)
        events[start:start + window] = chunk
    return events


@dataclass
class LoadStats:
    sent_ids: set[str] = field(default_factory=set)
    accepted_ids: set[str] = field(default_factory=set)
    batches: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    client_errors: list[str] = field(default_factory=list)
    resent: int = 0
    seconds: float = 0.0


class Client:
    """Sends batches through the gateway at a steady pace with a few in flight; retries each
    batch until it is accepted, honouring Retry-After."""

    def __init__(self, gateway_url: str, api_key: str, config: ChaosConfig) -> None:
        self.url = f"{gateway_url}/v1/events/batch"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.config = config
        self.stats = LoadStats()

    def batches(self, events: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        rng = random.Random(self.config.seed + 1)
        size = self.config.batch_size
        for start in range(0, len(events), size):
            batch = events[start:start + size]
            # A few events sent again later on: the sender's own retries, days apart or not.
            if start >= size:
                recent = events[max(0, start - 20 * size):start]
                again = [e for e in recent if rng.random() < self.config.resend_fraction * size / len(recent)]
                self.stats.resent += len(again)
                batch = batch + again[: max(0, 500 - len(batch))]
            yield batch

    async def run(self, events: list[dict[str, Any]]) -> LoadStats:
        started = time.monotonic()
        interval = self.config.load_seconds * self.config.batch_size / max(1, len(events))
        slots = asyncio.Semaphore(self.config.senders)
        tasks: set[asyncio.Task[None]] = set()
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for index, batch in enumerate(self.batches(events)):
                due = started + index * interval
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await slots.acquire()
                task = asyncio.create_task(self._send(session, batch))
                task.add_done_callback(lambda _t: slots.release())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        self.stats.seconds = time.monotonic() - started
        return self.stats

    async def _send(self, session: aiohttp.ClientSession, batch: list[dict[str, Any]]) -> None:
        ids = [e["id"] for e in batch]
        self.stats.sent_ids.update(ids)
        body = orjson.dumps({"events": batch})
        backoff = 0.2
        while True:
            wait = backoff
            try:
                async with session.post(self.url, data=body, headers=self.headers) as response:
                    answer = await response.read()
                    self.stats.attempts[str(response.status)] += 1
                    if response.status == 202:
                        counts = orjson.loads(answer)
                        if counts.get("rejected"):
                            self.stats.client_errors.append(f"202 with rejections: {answer[:300]!r}")
                        self.stats.accepted_ids.update(ids)
                        self.stats.batches += 1
                        return
                    if response.status not in (429,) and response.status < 500:
                        self.stats.client_errors.append(f"{response.status}: {answer[:300]!r}")
                        return
                    retry_after = response.headers.get("Retry-After")
                    if retry_after and retry_after.isdigit():
                        wait = min(float(retry_after), 5.0)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.stats.attempts[type(exc).__name__] += 1
            await asyncio.sleep(wait * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 5.0)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class FaultLog:
    injected: Counter[str] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    unplanned_exits: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)


class ChaosRun:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.workdir = config.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.faults = FaultLog()
        self.receiver = Receiver()
        self.poisoned: list[Poisoned] = []
        self.poison_customer = ""
        self.postgres: LocalPostgres | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.stack: ServiceStack | None = None
        self.tenant_id = ""
        self.api_key = ""
        self._started = time.monotonic()
        self._intentionally_down: set[str] = set()
        self._supervising = False

    def note(self, message: str) -> None:
        line = f"{time.monotonic() - self._started:7.1f}s {message}"
        self.faults.timeline.append(line)
        log.info(line)

    # -- set-up and tear-down ---------------------------------------------------------------

    def _start_database(self) -> str:
        if self.config.database == "postgresql":
            self.postgres = LocalPostgres().init()
            self.postgres.start()
            return self.postgres.create_database("churnguard")
        if self.config.database == "sqlite":
            return f"sqlite:///{self.workdir / 'churnguard.db'}"
        raise ValueError(f"database must be postgresql or sqlite, not {self.config.database!r}")

    async def setup(self) -> None:
        database_url = self._start_database()
        broker_port = free_port()
        self.broker = start_broker("127.0.0.1", broker_port, log_path=str(self.workdir / "broker.log"))
        kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{broker_port}", topic_prefix="chaos-")
        self.stack = ServiceStack(
            workdir=self.workdir, database_url=database_url, kafka=kafka, internal_token=INTERNAL_TOKEN,
            log_level="warning",
            settings={
                "CHURNGUARD_ACTIONS_WEBHOOK_ALLOW_LOCAL_URLS": "true",
                # Short timeouts and retries so a run drains in minutes: the schedule still
                # ends in parking, which is what a delivery that never got through must reach.
                "CHURNGUARD_ACTIONS_WEBHOOK_TIMEOUT_S": "2",
                "CHURNGUARD_ACTIONS_RETRY_SCHEDULE_S": "[1, 2, 4, 8, 16]",
                "CHURNGUARD_ACTIONS_BREAKER_COOLDOWN_S": "3",
                "CHURNGUARD_GATEWAY_RATE_LIMIT_PER_S": "100000",
                "CHURNGUARD_GATEWAY_RATE_LIMIT_BURST": "1000000",
            },
        )
        self.stack.create_topics()
        log.info("training a model on simulated history ...")
        scoring_ops.simulate(database_url, "sim", self.config.train_customers, 11, None, None)
        scoring_ops.train(database_url, "sim", 90, True, reports_dir=None)
        self.tenant_id, self.api_key = gateway_ops.create_tenant(database_url, "chaos-shop")
        await self.receiver.start()
        self.stack.start_all()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.api_key}"}) as session:
            async with session.post(f"{self.stack.url('gateway')}/v1/webhooks",
                                    json={"url": self.receiver.url, "secret": SECRET}) as response:
                if response.status != 201:
                    raise RuntimeError(f"cannot subscribe the receiver: {response.status} {await response.text()}")

    async def teardown(self) -> dict[str, int | None]:
        self._supervising = False
        codes: dict[str, int | None] = {}
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(signal.SIGCONT)
        if self.stack is not None:
            codes = await asyncio.to_thread(self.stack.stop_all)
        await self.receiver.stop()
        if self.broker is not None:
            self.broker.terminate()
            try:
                self.broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.broker.kill()
        if self.postgres is not None:
            shutil.copy(self.postgres.log, self.workdir / "postgres.log")
            self.postgres.remove()
        return codes

    # -- faults --------------------------------------------------------------------------------

    async def supervise(self) -> None:
        """Restart a service that exited without being killed on purpose (as Kubernetes would)."""
        assert self.stack is not None
        self._supervising = True
        while self._supervising:
            for name in SERVICES:
                if name in self._intentionally_down or self.stack.alive(name):
                    continue
                code = self.stack.processes[name].returncode
                tail = self.stack.log_path(name).read_text(errors="replace").strip().splitlines()[-3:]
                self.faults.unplanned_exits.append(f"{name} exited with {code}: {' | '.join(tail)[-400:]}")
                self.note(f"{name} exited on its own ({code}); restarting")
                self.stack.start(name)
            await asyncio.sleep(0.5)

    async def inject(self, kind: str, target: str) -> None:
        assert self.stack is not None and self.broker is not None
        if kind == "kill":
            self._intentionally_down.add(target)
            try:
                self.stack.kill(target, signal.SIGKILL)
                self.note(f"SIGKILL {target}")
                await asyncio.sleep(self.rng.uniform(0, 2))  # how long the supervisor takes
                self.stack.start(target)
            finally:
                self._intentionally_down.discard(target)
            await asyncio.to_thread(self.stack.wait_ready, target, 120)
            self.note(f"{target} ready again")
            self.faults.kills[target] += 1
        elif kind == "broker_pause":
            seconds = self.rng.uniform(2, 5)
            self.broker.send_signal(signal.SIGSTOP)
            self.note(f"SIGSTOP broker for {seconds:.1f}s")
            await asyncio.sleep(seconds)
            self.broker.send_signal(signal.SIGCONT)
            self.note("SIGCONT broker")
        elif kind in ("receiver_fail", "receiver_hang"):
            seconds = self.rng.uniform(3, 8)
            self.receiver.set_mode(kind.removeprefix("receiver_"))
            self.note(f"receiver {self.receiver.mode}s for {seconds:.1f}s")
            await asyncio.sleep(seconds)
            self.receiver.set_mode("ok")
            self.note("receiver healthy")
        elif kind == "database_outage":
            seconds = self.rng.uniform(3, 6)
            if self.postgres is not None:
                await asyncio.to_thread(self.postgres.stop, "immediate")
                self.note(f"PostgreSQL crashed (immediate shutdown) for {seconds:.1f}s")
                await asyncio.sleep(seconds)
                await asyncio.to_thread(self.postgres.start)
                self.note("PostgreSQL back")
            else:
                self.note(f"SQLite file locked exclusively for {seconds:.1f}s")
                await asyncio.to_thread(_hold_exclusive_lock, self.workdir / "churnguard.db", seconds)
                self.note("SQLite lock released")
        elif kind == "poison":
            # Keyed like a real customer's records: they sit ahead of that customer's next ones.
            postgres = self.postgres is not None
            records = [*poisoned_events(self.tenant_id, self.poison_customer, postgres=postgres),
                       *poisoned_scores(self.tenant_id, self.poison_customer, postgres=postgres)]
            await write_poisoned(self.stack.kafka, records)
            self.poisoned.extend(records)
            self.note(f"{len(records)} poisoned messages written straight to the topics")
        else:
            raise ValueError(f"unknown fault {kind}")
        self.faults.injected[kind] += 1

    async def inject_all(self, plan: list[tuple[str, str]]) -> None:
        # Spread the faults over the load: what each takes (a restart is ~5 s) leaves the gaps.
        busy = sum(FAULT_SECONDS.get(kind, 1.0) for kind, _ in plan)
        mean_gap = max(0.5, (self.config.load_seconds - busy) / (len(plan) + 1))
        for kind, target in plan:
            await asyncio.sleep(self.rng.uniform(0.3, 1.7) * mean_gap)
            await self.inject(kind, target)

    # -- drain and check ------------------------------------------------------------------------

    def _scalar(self, sql: str) -> int:
        assert self.stack is not None
        engine = make_engine(self.stack.database_url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(text(sql), {"tenant": self.tenant_id}).scalar_one())
        finally:
            engine.dispose()

    def backlog(self, accepted: int) -> dict[str, int]:
        """What is still on its way: events not in the history, scores without a decision,
        deliveries due in the outbox."""
        stored = self._scalar("SELECT count(*) FROM scoring_events WHERE tenant_id = :tenant")
        undecided = self._scalar(
            "SELECT count(*) FROM scoring_scores s WHERE s.tenant_id = :tenant AND NOT EXISTS "
            "(SELECT 1 FROM actions_decisions d WHERE d.tenant_id = s.tenant_id AND d.score_id = s.score_id)")
        pending = self._scalar(
            "SELECT count(*) FROM actions_deliveries WHERE tenant_id = :tenant AND status = 'pending'")
        return {"events_not_stored": max(0, accepted - stored), "scores_undecided": undecided,
                "deliveries_pending": pending}

    async def drain(self, accepted: int) -> dict[str, Any]:
        assert self.stack is not None
        started = time.monotonic()
        last: dict[str, int] = {}
        calm_checks = 0
        while time.monotonic() - started < self.config.drain_timeout_s:
            try:
                last = await asyncio.to_thread(self.backlog, accepted)
            except Exception as exc:  # noqa: BLE001 - the database may still be recovering
                last = {"error": 1}
                log.warning("backlog query failed: %s", exc)
            calm_checks = calm_checks + 1 if not any(last.values()) else 0
            if calm_checks >= 3:  # three quiet readings in a row, a second apart
                return {"seconds": round(time.monotonic() - started, 1), "drained": True, "backlog": last}
            await asyncio.sleep(1)
        return {"seconds": round(time.monotonic() - started, 1), "drained": False, "backlog": last}

    async def run(self) -> dict[str, Any]:
        await self.setup()
        assert self.stack is not None
        supervisor = asyncio.create_task(self.supervise())
        try:
            events = replay_events(self.config, datetime.now(timezone.utc) - timedelta(minutes=5))
            customers = len({e["customer_id"] for e in events})
            self.poison_customer = events[len(events) // 2]["customer_id"]
            self.note(f"replaying {len(events)} events of {customers} customers over "
                      f"~{self.config.load_seconds:g}s, with faults")
            client = Client(self.stack.url("gateway"), self.api_key, self.config)
            plan = self.config.fault_plan(self.rng)
            load, _ = await asyncio.gather(client.run(events), self.inject_all(plan))
            self.note(f"load done in {load.seconds:.1f}s; faults over; draining")
            drained = await self.drain(len(load.accepted_ids))
            self.note(f"drained={drained['drained']} in {drained['seconds']}s: {drained['backlog']}")
            checks = await self.check(load)
            all_ready = {name: self.stack.ready(name) for name in SERVICES}
        finally:
            self._supervising = False
            await supervisor
            stop_codes = await self.teardown()
        return {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()},
            "events": {"replayed": len(events), "distinct_sent": len(load.sent_ids),
                       "accepted": len(load.accepted_ids), "customers": customers, "resent": load.resent,
                       "client_errors": load.client_errors[:20], "attempts": dict(load.attempts),
                       "load_seconds": round(load.seconds, 1)},
            "faults": {"injected": dict(self.faults.injected), "kills": dict(self.faults.kills),
                       "unplanned_exits": self.faults.unplanned_exits, "timeline": self.faults.timeline},
            "drain": drained,
            "checks": checks,
            "ready_at_end": all_ready,
            "stop_codes": stop_codes,
        }

    async def check(self, load: LoadStats) -> dict[str, Any]:
        assert self.stack is not None
        checks = await asyncio.to_thread(self._check_database, load)
        dlq: list[Any] = []
        for topic in ALL_TOPICS:
            dlq.extend(await read_topic(self.stack.kafka, dead_letter(topic), count=10**9, timeout_s=3))
        try:
            # Killed between dead-lettering and committing, a consumer does it again: repeats allowed.
            check_dead_letters(dlq, self.poisoned, max_attempts=3, exactly_once=False, groups={
                CUSTOMER_EVENTS: ["scoring", "actions-events"], CHURN_SCORES: ["actions"]})
            problems: list[str] = []
        except AssertionError as exc:
            problems = str(exc).splitlines()[1:]
        checks["dead_letters"] = {"total": len(dlq), "deliberate": len(self.poisoned),
                                  "problems": problems[:20], "problem_count": len(problems)}
        checks["receiver"] = {"accepted": len(self.receiver.accepted), "answers": dict(self.receiver.answers),
                              "bad_signatures": self.receiver.bad_signatures,
                              "webhooks_delivered_more_than_once": sum(
                                  1 for n in self.receiver.deliveries_by_id.values() if n > 1)}
        return checks

    def _check_database(self, load: LoadStats) -> dict[str, Any]:
        assert self.stack is not None
        engine = make_engine(self.stack.database_url)
        try:
            with session_scope(engine) as session:
                rows = session.execute(text(
                    "SELECT event_id, count(*) FROM scoring_events WHERE tenant_id = :tenant GROUP BY event_id"),
                    {"tenant": self.tenant_id}).all()
                stored = {event_id: n for event_id, n in rows}
                events = {
                    "lost": sorted(load.accepted_ids - stored.keys())[:20],
                    "lost_count": len(load.accepted_ids - stored.keys()),
                    "duplicated_count": sum(1 for n in stored.values() if n > 1),
                    "never_sent_but_stored": len(stored.keys() - load.sent_ids),
                }
                features = self._check_features(session)
                offers = self._check_offers(session)
        finally:
            engine.dispose()
        return {"events": events, "features": features, "offers": offers}

    def _check_features(self, session: Any) -> dict[str, Any]:
        histories = scoring_repository.load_tenant_history(session, self.tenant_id)
        stored = session.execute(text(
            "SELECT customer_id, features, updated_at FROM scoring_customer_features WHERE tenant_id = :tenant"),
            {"tenant": self.tenant_id}).all()
        differing: list[str] = []
        for customer_id, features, updated_at in stored:
            vector = features if isinstance(features, dict) else orjson.loads(features)
            as_of = updated_at if isinstance(updated_at, datetime) else datetime.fromisoformat(updated_at)
            if as_of.tzinfo is None:
                as_of = as_of.replace(tzinfo=timezone.utc)
            fresh = compute_features(histories.get(customer_id, []), as_of)
            names = set(vector) | set(fresh)
            wrong = sorted(n for n in names if not _same(vector.get(n), fresh.get(n)))
            if wrong:
                differing.append(f"{customer_id}: {', '.join(wrong[:5])}")
        return {"customers": len(stored), "customers_with_history": len(histories),
                "differing_count": len(differing), "differing": differing[:20],
                "customers_without_features": len(histories.keys() - {c for c, _, _ in stored})}

    def _check_offers(self, session: Any) -> dict[str, Any]:
        tenant = {"tenant": self.tenant_id}
        offers = session.execute(text(
            "SELECT offer_id, customer_id, policy, score_id FROM actions_offers WHERE tenant_id = :tenant"),
            tenant).all()
        per_trigger = Counter(score_id for _, _, _, score_id in offers)
        cooldowns = {p.name: p.cooldown_days for p in load_policy_file(DEFAULT_POLICIES_FILE).policies}
        per_customer_policy = Counter((customer, policy) for _, customer, policy, _ in offers
                                      if cooldowns.get(policy, 0) > 0)
        deliveries = session.execute(text(
            "SELECT delivery_id, offer_id, status, last_error FROM actions_deliveries WHERE tenant_id = :tenant"),
            tenant).all()
        by_offer: dict[str, list[tuple[str, str, str | None]]] = defaultdict(list)
        for delivery_id, offer_id, status, last_error in deliveries:
            by_offer[offer_id].append((delivery_id, status, last_error))
        received_by_offer: dict[str, set[str]] = defaultdict(set)
        for webhook_id, payload in self.receiver.accepted.items():
            received_by_offer[payload["data"]["offer_id"]].add(webhook_id)
        unaccounted: list[str] = []
        parked: list[str] = []
        for offer_id, *_ in offers:
            rows = by_offer.get(offer_id, [])
            if not rows:
                unaccounted.append(f"{offer_id}: no delivery row")
            for delivery_id, status, last_error in rows:
                if status == "delivered" and delivery_id in self.receiver.accepted:
                    continue
                if status == "parked" and last_error:
                    parked.append(f"{offer_id}: {last_error[:120]}")
                    continue
                unaccounted.append(f"{offer_id}: {status}, receiver has it: {delivery_id in self.receiver.accepted}")
        decisions = Counter(
            f"{outcome}:{reason}" for outcome, reason in session.execute(text(
                "SELECT outcome, reason FROM actions_decisions WHERE tenant_id = :tenant"), tenant).all())
        holdout_with_offer = self._scalar_in(session, (
            "SELECT count(*) FROM actions_decisions WHERE tenant_id = :tenant "
            "AND reason = 'holdout' AND offer_id IS NOT NULL"))
        known_deliveries = {d for d, *_ in deliveries}
        return {
            "offers": len(offers),
            "decisions": dict(decisions.most_common()),
            "triggers_with_more_than_one_offer": sum(1 for n in per_trigger.values() if n > 1),
            "customers_with_repeat_offer_within_cooldown": sum(1 for n in per_customer_policy.values() if n > 1),
            "offers_with_more_than_one_webhook_id": sum(1 for ids in received_by_offer.values() if len(ids) > 1),
            "received_unknown_webhook_ids": len(set(self.receiver.accepted) - known_deliveries),
            "delivered": sum(1 for d in deliveries if d[2] == "delivered"),
            "parked": len(parked), "parked_reasons": parked[:10],
            "unaccounted_count": len(unaccounted), "unaccounted": unaccounted[:20],
            "holdout_decisions_with_offer": holdout_with_offer,
        }

    def _scalar_in(self, session: Any, sql: str) -> int:
        return int(session.execute(text(sql), {"tenant": self.tenant_id}).scalar_one())


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _hold_exclusive_lock(path: Path, seconds: float) -> None:
    """Another process's write lock, as SQLite sees it: every writer waits or fails meanwhile."""
    connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)  # the fault's duration, in a worker thread
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def failures(result: dict[str, Any], config: ChaosConfig) -> list[str]:
    """Every way the run falls short of the guarantees (empty: it held)."""
    checks = result["checks"]
    problems: list[str] = []
    expect_zero = {
        "events lost": checks["events"]["lost_count"],
        "events stored twice": checks["events"]["duplicated_count"],
        "features differing from a recomputation": checks["features"]["differing_count"],
        "customers with history but no features": checks["features"]["customers_without_features"],
        "triggers with more than one offer": checks["offers"]["triggers_with_more_than_one_offer"],
        "repeat offers within a cooldown": checks["offers"]["customers_with_repeat_offer_within_cooldown"],
        "offers sent under two webhook ids": checks["offers"]["offers_with_more_than_one_webhook_id"],
        "webhooks the outbox does not know": checks["offers"]["received_unknown_webhook_ids"],
        "offers neither delivered nor parked with a reason": checks["offers"]["unaccounted_count"],
        "holdout decisions with an offer": checks["offers"]["holdout_decisions_with_offer"],
        "dead letters that are not the deliberate ones, or lack them": checks["dead_letters"]["problem_count"],
        "bad webhook signatures": checks["receiver"]["bad_signatures"],
        "client errors (4xx) from the API": len(result["events"]["client_errors"]),
    }
    problems += [f"{what}: {n}" for what, n in expect_zero.items() if n]
    if not result["drain"]["drained"]:
        problems.append(f"pipeline did not drain within {config.drain_timeout_s:g}s: {result['drain']['backlog']}")
    if result["events"]["accepted"] != result["events"]["distinct_sent"]:
        problems.append(f"accepted {result['events']['accepted']} of {result['events']['distinct_sent']} sent events")
    if checks["offers"]["offers"] == 0:
        problems.append("no offer was made at all: the run proves nothing about offers")
    if sum(result["faults"]["kills"].values()) < config.kills or set(result["faults"]["kills"]) != set(SERVICES):
        problems.append(f"kills {result['faults']['kills']} short of {config.kills} across all four services")
    not_ready = [name for name, ok in result["ready_at_end"].items() if not ok]
    if not_ready:
        problems.append(f"not ready at the end: {not_ready}")
    return problems


def summary(result: dict[str, Any]) -> str:
    events, faults, checks = result["events"], result["faults"], result["checks"]
    lines = [
        f"events: {events['replayed']} replayed ({events['distinct_sent']} distinct, {events['resent']} resent on "
        f"purpose) for {events['customers']} customers in {events['load_seconds']}s; accepted {events['accepted']}; "
        f"API answers {events['attempts']}",
        f"faults: {faults['injected']}; kills by service {faults['kills']}; "
        f"unplanned exits {len(faults['unplanned_exits'])}",
        f"drain: {result['drain']}",
        f"history: lost {checks['events']['lost_count']}, duplicated {checks['events']['duplicated_count']}",
        f"features: {checks['features']['customers']} customers, differing from recomputation "
        f"{checks['features']['differing_count']}",
        f"offers: {checks['offers']['offers']} ({checks['offers']['delivered']} delivered, "
        f"{checks['offers']['parked']} parked); duplicate offers "
        f"{checks['offers']['triggers_with_more_than_one_offer']}; unaccounted {checks['offers']['unaccounted_count']}",
        f"dead letters: {checks['dead_letters']['total']} for {checks['dead_letters']['deliberate']} poisoned "
        f"records; problems: {checks['dead_letters']['problems'] or 'none'}",
        f"receiver: {checks['receiver']}",
    ]
    return "\n".join(lines)
