"""When the delivery worker claims: once per wake-up for new rows, again when an endpoint had more
due than its queue could take, never for nothing. A real database, a real receiver over HTTP,
a poll interval far longer than each test, so every claim counted here was woken."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import select

from services.actions.delivery import DeliveryWorker, PooledSender
from services.actions.tables import ActionsDelivery
from shared.clock import ManualClock
from shared.db import session_scope
from tests.actions.actions_support import START
from tests.actions.test_actions_guardrails import engine  # noqa: F401
from tests.actions.test_actions_outbox_statements import _outbox, _subscribe
from tests.actions.webhook_support import Answer, ScriptedReceiver
from tests.helpers import async_wait_until

NEVER_S = 3_600.0  # the poll: no claim in these tests comes from it


@contextlib.asynccontextmanager
async def _running(engine: Engine, clock: ManualClock | None = None,  # noqa: F811
                   **options: Any) -> AsyncIterator[DeliveryWorker]:
    """A started worker with one sending slot per endpoint and no claim from the poll."""
    worker = DeliveryWorker(engine, PooledSender(allow_local=True), clock or ManualClock(START),
                            poll_s=NEVER_S, endpoint_concurrency=1, **options)
    worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


@pytest.fixture
async def worker(engine: Engine) -> AsyncIterator[DeliveryWorker]:  # noqa: F811
    async with _running(engine, retry_schedule_s=[60.0]) as worker:
        yield worker


def _delivered(engine: Engine) -> int:  # noqa: F811
    with session_scope(engine) as session:
        return len(session.exec(select(ActionsDelivery).where(ActionsDelivery.status == "delivered")).all())


def _attempted(engine: Engine) -> int:  # noqa: F811
    with session_scope(engine) as session:
        return sum(d.attempts for d in session.exec(select(ActionsDelivery)).all())


async def test_each_new_delivery_costs_one_claim(
    engine: Engine, worker: DeliveryWorker, scripted: ScriptedReceiver,  # noqa: F811
) -> None:
    """Rows written one at a time, each announced by wake() as the consumers do: one claim
    each (plus the one at start). The finished attempt and its sender wake nobody: the claim
    before them took everything that was due (it made three claims per delivery)."""
    endpoint = _subscribe(engine, scripted.url())
    await async_wait_until(lambda: worker.claim_rounds == 1, what="the claim at start")
    for n in range(1, 11):
        _outbox(engine, endpoint, 1)
        worker.wake()
        await async_wait_until(lambda: _delivered(engine) == n, what=f"delivery {n} booked")  # noqa: B023
    assert scripted.effects == 10
    assert worker.claim_rounds == 11


async def test_an_endpoint_with_more_due_than_its_queue_is_claimed_again_without_the_poll(
    engine: Engine, worker: DeliveryWorker, scripted: ScriptedReceiver,  # noqa: F811
) -> None:
    """120 rows due for one endpoint, whose queue takes 50 (one sending slot): a claim takes 50,
    and attempts finishing with the queue half empty claim more, until all are delivered."""
    assert worker.queue_per_endpoint == 50
    endpoint = _subscribe(engine, scripted.url())
    _outbox(engine, endpoint, 120)
    worker.wake()
    await async_wait_until(lambda: _delivered(engine) == 120, timeout_s=60.0, what="all 120 booked")
    assert scripted.effects == 120
    assert 3 <= worker.claim_rounds <= 120 // 25 + 2  # refills at half a queue, not one per row


async def _open_circuit(engine: Engine,  # noqa: F811
                        worker: DeliveryWorker, receiver: ScriptedReceiver, rows: int) -> str:
    """A new endpoint answering 500, `rows` outbox rows for it, and its circuit opened by the first
    failed attempt (the worker runs with a failure threshold of 1). Returns the endpoint."""
    receiver.default = Answer(500)
    endpoint = _subscribe(engine, receiver.url())
    _outbox(engine, endpoint, rows)
    worker.wake()
    await async_wait_until(lambda: worker.guard.state(endpoint) == "open", what="the circuit opens")
    await async_wait_until(lambda: _attempted(engine) == 1, what="the failed attempt booked")
    return endpoint


async def test_a_blocked_endpoint_is_claimed_again_once_its_circuit_lets_a_probe_through(
    engine: Engine, scripted: ScriptedReceiver,  # noqa: F811
) -> None:
    """An endpoint whose circuit opened is left out of claims (blocked); once the circuit lets a
    probe through and the probe succeeds, its remaining rows are claimed without the poll."""
    clock = ManualClock(START)
    async with _running(engine, clock, retry_schedule_s=[1.0] * 5, breaker_failure_threshold=1,
                        breaker_cooldown_s=30.0) as worker:
        endpoint = await _open_circuit(engine, worker, scripted, rows=3)
        scripted.default = Answer(200)
        clock.advance(timedelta(seconds=31))  # the rows are due again, the circuit half-open
        worker.wake()
        await async_wait_until(lambda: _delivered(engine) == 3, timeout_s=30.0, what="all 3 booked")
        assert worker.guard.state(endpoint) == "closed"


async def test_an_open_circuit_does_not_make_other_endpoints_claim_again(
    engine: Engine, scripted: ScriptedReceiver, healthy: ScriptedReceiver,  # noqa: F811
) -> None:
    """While one endpoint's circuit is open, rows for a healthy one written one at a time still
    cost one claim each: the open endpoint is blocked, not waiting for room, so the healthy
    endpoint's finished senders wake nobody (they woke a claim each: two per delivery, and
    the healthy endpoint's latency tail rose beside a hanging receiver)."""
    async with _running(engine, retry_schedule_s=[60.0] * 3, breaker_failure_threshold=1,
                        breaker_cooldown_s=600.0) as worker:
        failing = await _open_circuit(engine, worker, scripted, rows=1)
        alive = _subscribe(engine, healthy.url())
        before = worker.claim_rounds
        for n in range(1, 11):
            _outbox(engine, alive, 1)
            worker.wake()
            await async_wait_until(lambda: _delivered(engine) == n, what=f"delivery {n} booked")  # noqa: B023
        assert healthy.effects == 10
        assert worker.claim_rounds - before == 10
        assert worker.guard.state(failing) == "open"
