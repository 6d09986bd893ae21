"""The webhook outbox worker: claims due deliveries, POSTs them signed (Standard Webhooks),
and books the outcome (delivered / retry later / parked / subscription disabled).

Claimed deliveries wait in a queue per endpoint drained by that endpoint's own sender tasks,
so a slow or hanging receiver only holds its own concurrency slots (`EndpointGuard`), never the
claim loop or other endpoints; results are booked in batches by one booking task. An endpoint
whose circuit is open keeps its deliveries in the outbox (not claimed) until a half-open probe
succeeds.

Retry timing and the circuit breaker use the injected clock. The `webhook-timestamp` header
uses the wall clock (`signing_clock`), because receivers compare it with their own clock to
reject replays.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import ipaddress
import logging
import math
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import psycopg
from sqlalchemy import Engine
from standardwebhooks import Webhook

from services.actions import metrics, webhooks
from services.actions.breaker import EndpointGuard
from services.actions.url_guard import address_problem, ip_literal
from services.actions.webhooks import (
    AttemptOutcome,
    AttemptResult,
    ClaimedDelivery,
    RetryPolicy,
)
from shared.clock import Clock, SystemClock
from shared.db import session_scope
from shared.http_pool import UpstreamBroken, UpstreamPool, UpstreamUnavailable
from shared.tasks import stop_gracefully

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = "churnguard-webhooks/0.2"
LEASE_MARGIN_S = 30.0
MAX_RESPONSE_BYTES = 64 * 1024  # read (and drop) at most this much of a receiver's answer
GAUGE_REFRESH_S = 0.5
# Results wait this long to be booked together (one transaction for many), unless a claim's
# worth is waiting already. The receiver has them already; only the booking waits.
BOOK_WINDOW_S = 0.01
DEFER_EVERY_S = 0.5
QUEUE_MIN = 50
DNS_CACHE_S = 10.0  # the pooled sender keeps a host's addresses this long (aiohttp's ttl_dns_cache)
DNS_CACHE_SIZE = 1024
STATEMENT_TIMEOUT_S = 30.0  # the worker's own claims and bookings (well under 0.1 s normally)


@functools.lru_cache(maxsize=4096)
def _signer(secret: str) -> Webhook:
    return Webhook(secret)


def signed_headers(claimed: ClaimedDelivery, signing_clock: Clock) -> dict[str, str]:
    """Standard Webhooks headers. Inside a secret rotation's overlap `webhook-signature` holds
    one `v1,<sig>` per live secret, space-separated (current first), as the spec allows, so a
    receiver verifying with either the old or the new secret accepts the request."""
    sent_at = signing_clock.now().astimezone(timezone.utc)
    signature = " ".join(
        _signer(secret).sign(claimed.delivery_id, sent_at, claimed.payload)
        for secret in claimed.signing_secrets
    )
    return {
        "webhook-id": claimed.delivery_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


# --- the HTTP side ----------------------------------------------------------------------


class RefusedAddress(OSError):
    """Connect-time SSRF guard: the host resolved to an address webhooks may not reach."""


@functools.lru_cache(maxsize=4096)  # per attempt, for the few URLs of the subscriptions
def refusal_before_connect(url: str, allow_local: bool) -> str | None:
    """What needs no lookup: the scheme, and hosts given as IP literals (never resolved, so the
    connect-time check of resolved addresses does not see them)."""
    parts = urlsplit(url)
    if parts.scheme != "https" and not (allow_local and parts.scheme == "http"):
        return f"refused: {parts.scheme}:// webhook URLs are not allowed (https only)"
    literal = ip_literal(parts.hostname or "")
    if literal is not None:
        problem = address_problem(literal, allow_local)
        if problem is not None:
            return f"refused at connect time: {problem}"
    return None


class WebhookSender(Protocol):
    async def send(
        self, url: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> AttemptResult: ...

    async def close(self) -> None: ...


class PooledSender:
    """POSTs over the shared keep-alive HTTP/1.1 pool (shared/http_pool.py, httptools): about
    half aiohttp's CPU per request (profile in docs/benchmarks.md), which was most of the
    worker's CPU per delivery (it replaced aiohttp here). No redirects followed, no proxies, no
    decompression, at most MAX_RESPONSE_BYTES of an answer kept, and the SSRF guard at connect
    time: every address a host name resolves to is checked, and the connection goes to those
    checked addresses (no second lookup a rebinding DNS could answer differently)."""

    def __init__(self, *, allow_local: bool, max_connections: int = 256,
                 connect_timeout_s: float = 15.0,
                 lookup: Callable[[str, int], Awaitable[Sequence[str]]] | None = None,
                 dns_cache_s: float = DNS_CACHE_S) -> None:
        self._allow_local = allow_local
        self._lookup = lookup or system_lookup  # tests stand in for DNS (a rebinding)
        # Answers kept `dns_cache_s` (as aiohttp's connector did) and shared by the connections
        # opened meanwhile: a burst of new connections to one endpoint is one lookup, not one
        # executor thread each. Every connection still checks the addresses it goes to.
        self._lookups: dict[tuple[str, int], tuple[float, asyncio.Future[Sequence[str]]]] = {}
        self._dns_cache_s = dns_cache_s
        self._pool = UpstreamPool(
            max_connections, connect_timeout_s=connect_timeout_s,
            resolve=self._resolve, max_body=MAX_RESPONSE_BYTES,
        )

    async def _resolve(self, host: str, port: int) -> Sequence[str]:
        addresses = await self._cached_lookup(host, port)
        for address in addresses:
            problem = address_problem(ipaddress.ip_address(address), self._allow_local)
            if problem is not None:
                raise RefusedAddress(errno.EACCES, f"refused at connect time: {host!r} -> {problem}")
        return addresses

    async def _cached_lookup(self, host: str, port: int) -> Sequence[str]:
        if ip_literal(host) is not None:
            return [host]
        now = time.monotonic()
        key = (host, port)
        known = self._lookups.get(key)
        failed = known is not None and known[1].done() and (
            known[1].cancelled() or known[1].exception() is not None)
        if known is None or known[0] <= now or failed:  # a failed lookup is not kept
            if len(self._lookups) >= DNS_CACHE_SIZE:
                self._lookups = {k: v for k, v in self._lookups.items() if v[0] > now}
            known = self._lookups[key] = (
                now + self._dns_cache_s, asyncio.ensure_future(self._lookup(host, port)))
        # shield: one waiter's timeout must not cancel the lookup the others share
        return await asyncio.shield(known[1])

    async def send(
        self, url: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> AttemptResult:
        started = time.perf_counter()

        def elapsed_ms() -> float:
            return (time.perf_counter() - started) * 1000

        refusal = refusal_before_connect(url, self._allow_local)
        if refusal is not None:
            return AttemptResult(error=refusal, latency_ms=elapsed_ms())
        try:
            origin, target = _request_target(url)
            raw_headers = [(name.encode("latin-1"), value.encode("latin-1"))
                           for name, value in headers.items()]
            async with asyncio.timeout(timeout_s):  # connect, wait for a slot, send, answer
                answer = await self._pool.request(
                    self._pool.origin(origin)[0], "POST", target, raw_headers, body)
        except TimeoutError:
            return AttemptResult(error=f"timeout after {timeout_s:g} s", latency_ms=elapsed_ms())
        except UpstreamUnavailable as exc:
            if isinstance(exc.__cause__, RefusedAddress):  # the SSRF guard, said plainly
                return AttemptResult(error=exc.__cause__.strerror, latency_ms=elapsed_ms())
            return AttemptResult(error=f"connection failed: {exc}", latency_ms=elapsed_ms())
        except UpstreamBroken as exc:
            return AttemptResult(error=f"broken answer: {exc}", latency_ms=elapsed_ms())
        except (ValueError, UnicodeError) as exc:  # a URL or header that cannot go on the wire
            return AttemptResult(error=f"{type(exc).__name__}: {exc}", latency_ms=elapsed_ms())
        return AttemptResult(
            status_code=answer.status,
            retry_after=answer.headers.get("retry-after"),
            latency_ms=elapsed_ms(),
        )

    async def close(self) -> None:
        await self._pool.close()


async def system_lookup(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@functools.lru_cache(maxsize=4096)
def _request_target(url: str) -> tuple[str, str]:
    """(scheme://host:port, the request target: path and query), the target percent-encoded
    as aiohttp (yarl) would, so a stored URL with a space or non-ASCII path still goes out as
    valid HTTP (and never carries a line break into the request head)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"webhook URL without a host: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return f"{parts.scheme}://{host}:{port}", target


# --- the worker -------------------------------------------------------------------------


class WorkerConnection:
    """One psycopg connection kept outside transactions, on the event loop, for the worker's
    one-statement claims and bookings on PostgreSQL (each statement is atomic by itself): no
    pool checkout, liveness ping, BEGIN or COMMIT per round (a claim was 7 round trips), and no
    thread: rows are read on the loop, without handing the GIL back and forth with a worker
    thread (measured: ~15% less CPU per delivery than the same statements from threads).

    Its statements are server-side prepared: parsing and planning the claim took ~1 ms, more
    than running it; they take arrays, not `IN (...)` lists (the engine's connections do not
    prepare because of those, see shared.db), and the claim's plan is pinned to the due index.
    One statement at a time (a lock); a failed or timed-out one drops the connection (the
    database may be gone) and the next use opens a new one."""

    def __init__(self, engine: Engine, setup: Sequence[str] = ()) -> None:
        url = engine.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._setup = setup  # statements run once on each new connection (session settings)
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self.statements = 0  # sent so far (the bench reports statements per delivery)

    async def run(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        async with self._lock:
            if self._connection is None:
                connection = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, prepare_threshold=0, connect_timeout=5
                )
                try:
                    for statement in self._setup:
                        await connection.execute(statement)
                except BaseException:
                    await connection.close()
                    raise
                self._connection = connection
            self.statements += 1
            try:
                async with asyncio.timeout(STATEMENT_TIMEOUT_S):  # a lost server: not forever
                    return await work(self._connection)
            except BaseException:
                await self._drop()
                raise

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


class DeliveryWorker:
    """Claims due deliveries in batches into a local queue per endpoint (subscription); up to
    `endpoint_concurrency` sender tasks per endpoint drain it; one booking task records the
    results in batches. Claiming ahead (up to `queue_per_endpoint` rows) is what lets one
    database round trip feed many HTTP requests; the claim's lease covers the whole queue, so a
    live worker's rows are never claimed twice. When an endpoint's circuit opens, what is still
    queued for it is handed back to the outbox at once."""

    def __init__(
        self,
        engine: Engine,
        sender: WebhookSender,
        clock: Clock,
        *,
        retry_schedule_s: Sequence[float],
        poll_s: float = 1.0,
        batch_size: int = 200,
        max_in_flight: int = 256,
        attempt_timeout_s: float = 15.0,
        jitter: float = 0.0,
        retry_after_cap_s: float = 3_600.0,
        endpoint_concurrency: int = 8,
        breaker_failure_threshold: int = 5,
        breaker_cooldown_s: float = 60.0,
        signing_clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._engine = engine
        # PostgreSQL: claims and successful bookings are one statement each, on connections of
        # their own (a claim and a booking may be on their way at the same time).
        self._one_statement = engine.dialect.name == "postgresql"
        # The claim reads the oldest due rows through the (status, next_attempt_at) index in
        # order and stops at its LIMIT. Estimates for a burst of new rows are often stale
        # (PostgreSQL then prefers a bitmap scan that reads and sorts every due row: 4 ms for
        # 3,000 due rows against 0.4 ms); this connection only ever runs the claim.
        # Its commits do not wait for the WAL flush (1-2 ms on the bench machine, a third of a
        # claim's round trip at concurrency 16, where the senders ran dry while the refill was on
        # its way): a lease or a parking lost in a PostgreSQL crash (at most ~3 x
        # wal_writer_delay of commits) only makes rows due again, sent again with the same
        # webhook-id, as after a worker's crash. Others see the lease at once either way; the
        # bookings (delivered, retries) stay durable.
        # Both connections also keep the planner off sequential scans: their statements are
        # prepared once per connection, and a plan made while the outbox looked empty (a new
        # database, or statistics not yet taken) read the whole table for every booking as it
        # grew (2-5 ms per booking after 20 s at 200 offers/s, then more) until the next ANALYZE.
        self.claims = WorkerConnection(
            engine, setup=["SET enable_bitmapscan = off", "SET enable_seqscan = off",
                           "SET synchronous_commit = off"]
        )
        self.bookings = WorkerConnection(engine, setup=["SET enable_seqscan = off"])
        self._sender = sender
        self._clock = clock
        self._signing_clock = signing_clock or SystemClock()
        self._retry = RetryPolicy(
            schedule=list(retry_schedule_s),
            jitter=jitter,
            retry_after_cap_s=retry_after_cap_s,
            rng=rng,
        )
        self._poll_s = poll_s
        self._batch_size = batch_size
        self._max_in_flight = max_in_flight
        self._attempt_timeout_s = attempt_timeout_s
        self.guard = EndpointGuard(
            clock,
            concurrency=endpoint_concurrency,
            failure_threshold=breaker_failure_threshold,
            cooldown=timedelta(seconds=breaker_cooldown_s),
        )
        # Claimed ahead per endpoint: eight rounds of its slots, so that a claim (made when the
        # queue is half empty) brings several rounds at once and the senders still have work
        # while it is on its way (with two rounds, claims of a few rows each left them idle at
        # high rates); at least a claim's worth (up to QUEUE_MIN) for endpoints with few slots.
        # Not the batch size itself: that is per round trip across all endpoints, while the
        # queue sets the lease (how long a crashed worker's claims wait: 150 s with the
        # default 8 slots and 15 s timeout, was 135 s).
        self.queue_per_endpoint = max(min(batch_size, QUEUE_MIN), 8 * endpoint_concurrency)
        self._max_queued = max(4 * batch_size, 2 * max_in_flight)
        # A claim outlives the time its endpoint needs to work through a full queue of attempts
        # that all time out, so a live worker's rows are never re-claimed. After a crash, what
        # it had claimed is due again once the lease has run out.
        rounds = math.ceil(self.queue_per_endpoint / endpoint_concurrency)
        self.lease = timedelta(seconds=rounds * attempt_timeout_s + LEASE_MARGIN_S)
        self._wakeup = asyncio.Event()
        # Endpoints the last claim may have left due rows of (blocked, or as many rows claimed
        # as they had room for): a finished attempt or sender of one of them wakes the claim
        # loop. Others do not: a claim that took everything due finds nothing new until new
        # rows are written (wake()) or become due (the poll). At 50 webhooks/s every delivery
        # cost three claims, two of them empty.
        self._capped: set[str] = set()
        self.claim_rounds = 0  # claims made (statements or transactions), for tests and benches
        self._queues: dict[str, collections.deque[ClaimedDelivery]] = {}
        self._senders: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._results: list[tuple[ClaimedDelivery, AttemptResult]] = []
        self._results_ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._booker: asyncio.Task[None] | None = None
        self._running = False
        self._gauges_at = 0.0
        self._deferred_at: dict[str, float] = {}
        self._deferral: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._booker = asyncio.create_task(self._book_loop(), name="webhook-booking")
        self._task = asyncio.create_task(self._run(), name="webhook-delivery")
        return self._task

    @property
    def alive(self) -> bool:
        return (
            self._task is not None
            and not self._task.done()
            and self._booker is not None
            and not self._booker.done()
        )

    def wake(self) -> None:
        """New or replayed deliveries: look now instead of at the next poll. Thread-safe."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def stop(self) -> None:
        """Stop claiming, let attempts in flight finish (up to their timeout), book them, and
        hand back what was claimed but not attempted."""
        self._running = False
        if self._task is None:
            return
        self._wakeup.set()
        await stop_gracefully(self._task, timeout_s=5)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._attempt_timeout_s + 5)
            for task in pending:
                task.cancel()
        unsent = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        if self._booker is not None:
            self._booker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._booker
        with contextlib.suppress(Exception):  # best effort: otherwise they wait for the lease
            if self._results:
                await self._book_pending()
            if unsent:
                await self._release(unsent)
        for beside in (self._deferral, self._gauges):
            if beside is not None:
                with contextlib.suppress(Exception):
                    await beside
        await self.claims.close()
        await self.bookings.close()
        await self._sender.close()

    # --- claiming --------------------------------------------------------------------

    async def _run(self) -> None:
        while self._running:
            self._wakeup.clear()
            try:
                claimed = await self.dispatch()
                self._refresh_gauges_beside()
            except Exception:  # database down and the like: keep the worker alive, try again
                log.exception("webhook delivery cycle failed; retrying")
                claimed = 0
            if claimed >= self._batch_size:
                continue  # more may be due right now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_s)

    def _room(self, endpoint: str) -> int:
        """How many more rows of this endpoint may be claimed into its queue now."""
        state = self.guard.state(endpoint)
        if state == "open":
            return 0
        cap = 1 if state == "half_open" else self.queue_per_endpoint
        queued = len(self._queues.get(endpoint, ()))
        return max(0, cap - queued - self.guard.in_flight(endpoint))

    async def dispatch(self) -> int:
        """Claim what is due into the endpoints' queues (within their room) and start senders.
        Returns how many rows were claimed or parked."""
        self._spawn_senders()
        if sum(len(q) for q in self._queues.values()) >= self._max_queued:
            self._capped = set(self._queues)  # no claim made: any finished attempt may make room
            return 0
        known = set(self._queues) | set(self.guard.known())
        rooms = {endpoint: self._room(endpoint) for endpoint in known}
        blocked = sorted(e for e, room in rooms.items() if room == 0)
        defer = self._due_deferrals(known)
        self.claim_rounds += 1
        if self._one_statement:
            claimed, parked = await self._claim_one_statement(blocked, rooms, defer)
        else:
            claimed, parked = await asyncio.to_thread(self._claim, blocked, rooms, defer)
        if parked:
            metrics.WEBHOOK_ATTEMPTS.labels("parked").inc(parked)
        taken: collections.Counter[str] = collections.Counter()
        for delivery in claimed:
            self._queues.setdefault(delivery.subscription_id, collections.deque()).append(delivery)
            taken[delivery.subscription_id] += 1
        # Capped: endpoints whose finished attempts make room for a claim. Not those with an open
        # circuit: no attempt of theirs is under way, and with one in the set every other
        # endpoint's finished sender woke the worker for a claim (twice the claims beside a
        # hanging receiver).
        self._capped = {endpoint for endpoint in blocked if self.guard.state(endpoint) != "open"} | {
            endpoint for endpoint, count in taken.items()
            if count >= rooms.get(endpoint, self.queue_per_endpoint)
        }
        self._spawn_senders()
        return len(claimed) + parked

    def _due_deferrals(self, endpoints: set[str]) -> dict[str, datetime]:
        """Open circuits whose new deliveries have not been deferred for a while (each UPDATE
        is cheap, but not on every wake-up)."""
        now = time.monotonic()
        result = {}
        for endpoint in endpoints:
            until = self.guard.reopens_at(endpoint)
            if until is None or self.guard.state(endpoint) != "open":
                continue
            if now - self._deferred_at.get(endpoint, 0.0) >= DEFER_EVERY_S:
                self._deferred_at[endpoint] = now
                result[endpoint] = until
        for endpoint in [e for e in self._deferred_at if e not in endpoints]:
            del self._deferred_at[endpoint]
        return result

    async def _claim_one_statement(
        self, blocked: list[str], rooms: dict[str, int], defer: dict[str, datetime]
    ) -> tuple[list[ClaimedDelivery], int]:
        now = self._clock.now()
        if defer and (self._deferral is None or self._deferral.done()):
            # Beside the claim, not before it: the claim skips open endpoints anyway (they are
            # `blocked`), so healthy endpoints' claims never wait for this UPDATE (it was a
            # thread and a transaction on the claim's path every DEFER_EVERY_S while a circuit
            # was open: the healthy endpoints' latency tail next to a hanging receiver).
            self._deferral = asyncio.create_task(self._defer_pg(defer, now))
        free = {endpoint: room for endpoint, room in rooms.items() if room > 0}
        return await self.claims.run(lambda connection: webhooks.claim_due_deliveries_pg(
            connection, now, self._batch_size, self.lease, blocked=blocked, rooms=free,
            default_room=self.queue_per_endpoint,
        ))

    async def _defer_pg(self, defer: dict[str, datetime], now: datetime) -> None:
        try:  # on the bookings' connection: the claims' stays free
            await self.bookings.run(
                lambda connection: webhooks.defer_open_endpoints_pg(connection, defer, now))
        except Exception:  # nothing lost: the rows stay due, and the claim skips them
            log.exception("deferring the deliveries of open circuits failed")

    def _claim(
        self, blocked: list[str], rooms: dict[str, int], defer: dict[str, datetime]
    ) -> tuple[list[ClaimedDelivery], int]:
        """Runs in a thread: `rooms` (each known endpoint's room) is the loop's snapshot."""
        with session_scope(self._engine) as session:
            return webhooks.claim_due_deliveries(
                session,
                self._clock.now(),
                self._batch_size,
                self.lease,
                exclude_subscriptions=blocked,
                capacity=lambda endpoint: rooms.get(endpoint, self.queue_per_endpoint),
                defer=defer,
            )

    # --- sending ---------------------------------------------------------------------

    def _spawn_senders(self) -> None:
        for endpoint, queue in list(self._queues.items()):
            while (
                queue
                and self._running
                and len(self._tasks) < self._max_in_flight
                and self._senders.get(endpoint, 0) < self.guard.limit(endpoint)
            ):
                self._senders[endpoint] = self._senders.get(endpoint, 0) + 1
                task = asyncio.create_task(self._send_queue(endpoint))
                self._tasks.add(task)
                task.add_done_callback(self._sender_done)
            if not queue and not self._senders.get(endpoint):
                del self._queues[endpoint]

    async def _send_queue(self, endpoint: str) -> None:
        try:
            while self._running:
                queue = self._queues.get(endpoint)
                if not queue:
                    return
                state = self.guard.state(endpoint)
                if state == "open":  # due again when the circuit lets a probe through
                    unsent = list(queue)
                    queue.clear()
                    await self._release(unsent, self.guard.reopens_at(endpoint))
                    return
                if state == "half_open" and self.guard.in_flight(endpoint) > 0:
                    return  # one probe at a time
                await self._attempt_and_queue(queue.popleft())
        finally:
            self._senders[endpoint] -= 1
            if not self._senders[endpoint]:
                del self._senders[endpoint]

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook sender task failed", exc_info=task.exception())
        # Another round: rows queued while max_in_flight left them without a sender, or an
        # endpoint whose rows the last claim may not have taken all of.
        if self._capped or any(
            queue and self._senders.get(endpoint, 0) < self.guard.limit(endpoint)
            for endpoint, queue in self._queues.items()
        ):
            self._wakeup.set()

    async def _release(self, unsent: list[ClaimedDelivery], at: datetime | None = None) -> None:
        """Due again at `at` (default now) instead of after their lease. On PostgreSQL one
        statement on the loop: when a circuit opens, a thread releasing its queue row by row
        held the GIL for ~50 ms, stalling every other endpoint's sends."""
        due = at or self._clock.now()
        if self._one_statement:
            await self.bookings.run(
                lambda connection: webhooks.release_claims_pg(connection, unsent, due))
        else:
            await asyncio.to_thread(self._release_in_thread, unsent, due)

    def _release_in_thread(self, unsent: list[ClaimedDelivery], at: datetime) -> None:
        with session_scope(self._engine) as session:
            webhooks.release_claims(session, unsent, at)

    async def _attempt_and_queue(self, claimed: ClaimedDelivery) -> None:
        # The slot is freed when the answer is in, before the booking: booking is batched and
        # must not cap an endpoint's throughput.
        self.guard.started(claimed.subscription_id)
        success: bool | None = None
        gone = False
        try:
            result = await self.attempt(claimed)
            success, gone = result.ok, result.status_code == 410
            self._results.append((claimed, result))
            self._results_ready.set()
        finally:
            self.guard.finished(claimed.subscription_id, success, gone=gone)
            if (claimed.subscription_id in self._capped
                    and len(self._queues.get(claimed.subscription_id, ())) <= self.queue_per_endpoint // 2):
                self._wakeup.set()  # room for at least half a queue: claim more now

    async def attempt(self, claimed: ClaimedDelivery) -> AttemptResult:
        started = time.perf_counter()
        try:
            headers = signed_headers(claimed, self._signing_clock)
            return await self._sender.send(
                claimed.url, claimed.payload.encode(), headers, self._attempt_timeout_s
            )
        except Exception as exc:  # a bad stored secret or URL must not kill the worker
            log.exception("webhook %s could not be sent", claimed.delivery_id)
            return AttemptResult(
                error=f"{type(exc).__name__}: {exc}",
                latency_ms=(time.perf_counter() - started) * 1000,
            )
        finally:
            metrics.WEBHOOK_DELIVERY_SECONDS.observe(time.perf_counter() - started)

    # --- booking ---------------------------------------------------------------------

    async def _book_loop(self) -> None:
        while True:
            await self._results_ready.wait()
            if len(self._results) < self._batch_size:
                await asyncio.sleep(BOOK_WINDOW_S)
            self._results_ready.clear()
            try:
                await self._book_pending()
            except Exception:  # keep the results: booked on the next round
                log.exception("booking webhook attempts failed; retrying")
                await asyncio.sleep(self._poll_s)
                self._results_ready.set()

    async def _book_pending(self) -> None:
        batch, self._results = self._results, []
        if not batch:
            return
        parts: list[tuple[list[tuple[ClaimedDelivery, AttemptResult]], Callable[..., Any]]]
        if self._one_statement:
            # Successes in one statement, failures that only retry or park in another (both on
            # the loop: an open circuit's failures came as a burst, and booking them the
            # portable way, in a thread holding the GIL for ~20-50 ms, was the healthy
            # endpoints' latency tail beside a hanging one), a 410 the portable way.
            gone = [item for item in batch if item[1].status_code == 410]
            parts = [
                ([item for item in batch if item[1].ok], self._book_successes),
                ([item for item in batch if not item[1].ok and item[1].status_code != 410],
                 self._book_failures),
                (gone, self._book_in_thread),
            ]
        else:
            parts = [(batch, self._book_in_thread)]
        for index, (part, book) in enumerate(parts):
            if not part:
                continue
            try:
                outcomes = await book(part)
            except BaseException:  # what is not booked yet goes back
                self._results[:0] = [item for rest, _ in parts[index:] for item in rest]
                raise
            for (claimed, result), outcome in zip(part, outcomes, strict=True):
                self._observe(claimed, result, outcome)

    async def _book_successes(
        self, batch: list[tuple[ClaimedDelivery, AttemptResult]]
    ) -> list[AttemptOutcome]:
        now = self._clock.now()
        return await self.bookings.run(
            lambda connection: webhooks.record_successes_pg(connection, batch, now)
        )

    async def _book_failures(
        self, batch: list[tuple[ClaimedDelivery, AttemptResult]]
    ) -> list[AttemptOutcome]:
        now = self._clock.now()
        return await self.bookings.run(
            lambda connection: webhooks.record_failures_pg(connection, batch, now, self._retry)
        )

    async def _book_in_thread(
        self, batch: list[tuple[ClaimedDelivery, AttemptResult]]
    ) -> list[AttemptOutcome]:
        return await asyncio.to_thread(self._book, batch)

    def _book(self, batch: list[tuple[ClaimedDelivery, AttemptResult]]) -> list[AttemptOutcome]:
        now = self._clock.now()
        with session_scope(self._engine) as session:
            return webhooks.record_attempts(session, batch, now, self._retry)

    def _observe(
        self, claimed: ClaimedDelivery, result: AttemptResult, outcome: AttemptOutcome
    ) -> None:
        if outcome == "stale":
            log.info("delivery %s changed during its attempt; not booked", claimed.delivery_id)
            return
        metrics.WEBHOOK_ATTEMPTS.labels(outcome).inc()
        if outcome == "delivered":
            if claimed.created_at is not None:
                waited = (self._clock.now() - claimed.created_at).total_seconds()
                metrics.WEBHOOK_END_TO_END_SECONDS.observe(max(0.0, waited))
        else:
            log.warning(
                "webhook %s: %s (%s)",
                claimed.delivery_id,
                outcome,
                result.error or f"HTTP {result.status_code}",
            )

    # --- gauges ----------------------------------------------------------------------

    def _refresh_gauges_beside(self) -> None:
        """Start a gauge refresh beside the claim loop, not in it: the counts are a thread and a
        transaction over every open row (more of them while a receiver hangs), and claims for
        healthy endpoints waited for them every GAUGE_REFRESH_S."""
        if time.monotonic() - self._gauges_at < GAUGE_REFRESH_S:
            return
        if self._gauges is not None and not self._gauges.done():
            return
        self._gauges_at = time.monotonic()
        self._gauges = asyncio.create_task(self._refresh_gauges())
        self._gauges.add_done_callback(self._gauges_done)

    def _gauges_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("refreshing the outbox gauges failed", exc_info=task.exception())

    async def _refresh_gauges(self) -> None:
        counts = await asyncio.to_thread(self._counts)
        metrics.OUTBOX_DEPTH.set(counts.get("pending", 0))
        metrics.PARKED_DELIVERIES.set(counts.get("parked", 0))
        metrics.OPEN_CIRCUITS.set(self.guard.open_count())

    def _counts(self) -> dict[str, Any]:
        with session_scope(self._engine) as session:
            return webhooks.outbox_counts(session)
