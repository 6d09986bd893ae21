"""Reliable webhooks against real HTTP receivers, the real broker and database, with the
ManualClock moved through the retry schedule (never slept): failing then succeeding, down for
the whole schedule then replayed, 410, Retry-After, a hanging receiver beside a healthy one,
the circuit breaker, and a crash between the receiver's 200 and the booking."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.actions.app import create_app
from services.actions.config import DEFAULT_RETRY_SCHEDULE_S, ActionsSettings
from services.actions.delivery import PooledSender
from services.actions.webhooks import GONE_REASON
from shared.clock import ManualClock
from tests.actions.actions_support import START, headers, make_score, wait_until
from tests.actions.webhook_support import (
    Answer,
    ScriptedReceiver,
    deliveries,
    metric,
    scrape,
    subscribe,
    when,
)

ATTEMPTS = "churnguard_actions_webhook_attempts_total"


def _only(client: TestClient, subscription_id: str) -> dict[str, Any]:
    [delivery] = deliveries(client, subscription_id=subscription_id)
    return delivery


async def _attempted(client: TestClient, subscription_id: str, count: int) -> dict[str, Any]:
    """The delivery once its attempt `count` is booked. The listing reads the delivery row and
    its attempt log in two statements, so the log may already hold an attempt whose booking the
    row read just before it did not show (the row still under the claim's lease): the row's own
    counter, from the same read as its next_attempt_at, says the booking is in."""
    return await wait_until(
        lambda: (
            (d := deliveries(client, subscription_id=subscription_id))
            and d[0]["attempts"] >= count
            and len(d[0]["attempt_log"]) >= count
            and d[0]
        ),
        what=f"attempt {count} booked",
    )


async def test_a_receiver_failing_three_times_then_succeeding_gets_it_once_with_one_webhook_id(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    # A redirect is a failure and is not followed (it points at a path that would say 200).
    scripted.script = [Answer(500), Answer(302, {"Location": scripted.url("/elsewhere")}), Answer(400)]
    settings = make_settings(retry_schedule_s=[1, 2, 3, 4])
    with TestClient(create_app(settings, clock)) as client:
        before = scrape(client)
        subscription = subscribe(client, scripted.url())
        await publish(make_score("s-1", "c-1", 0.9))

        for attempt, (status, backoff) in enumerate(((500, 1), (302, 2), (400, 3)), start=1):
            pending = await _attempted(client, subscription["id"], attempt)
            assert pending["status"] == "pending"
            assert pending["attempt_log"][-1]["status_code"] == status
            assert when(pending["next_attempt_at"]) == clock.now() + timedelta(seconds=backoff)
            clock.advance(timedelta(seconds=backoff))

        done = await wait_until(
            lambda: (d := _only(client, subscription["id"]))["status"] == "delivered" and d,
            what="delivered",
        )
        log = done["attempt_log"]
        assert [a["status_code"] for a in log] == [500, 302, 400, 200]
        assert [a["outcome"] for a in log] == ["failed", "failed", "failed", "delivered"]
        assert all(a["latency_ms"] > 0 for a in log)
        assert "HTTP 500" in log[0]["error"] and log[-1]["error"] is None
        assert when(log[-1]["attempted_at"]) - when(log[0]["attempted_at"]) == timedelta(seconds=6)

        requests = scripted.requests()
        assert len(requests) == 4 and {r.webhook_id for r in requests} == {done["delivery_id"]}
        assert scripted.requests_to("/elsewhere") == []
        assert scripted.effects == 1 and scripted.duplicates == 0

        after = await wait_until(
            lambda: (
                (s := scrape(client))
                and metric(s, "churnguard_actions_outbox_depth") == 0
                and s
            ),
            what="outbox gauge drained",
        )
        assert metric(after, ATTEMPTS, outcome="failed") - metric(before, ATTEMPTS, outcome="failed") == 3
        assert (
            metric(after, ATTEMPTS, outcome="delivered")
            - metric(before, ATTEMPTS, outcome="delivered")
            == 1
        )
        delivered_count = "churnguard_actions_webhook_end_to_end_seconds_count"
        assert metric(after, delivered_count) - metric(before, delivered_count) == 1
        # six seconds of (manual) clock from the decision to the delivery
        e2e_sum = "churnguard_actions_webhook_end_to_end_seconds_sum"
        assert metric(after, e2e_sum) - metric(before, e2e_sum) == pytest.approx(6.0)


async def test_a_receiver_down_for_the_whole_default_schedule_ends_parked_then_replay_delivers_once(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    scripted.default = Answer(500)
    # The production schedule and jitter; the breaker opens after 5 failures and lets a probe
    # through after its cooldown, which every later step of the schedule exceeds.
    settings = make_settings(
        retry_schedule_s=list(DEFAULT_RETRY_SCHEDULE_S), retry_jitter=0.1, breaker_cooldown_s=60
    )
    with TestClient(create_app(settings, clock)) as client:
        subscription = subscribe(client, scripted.url())
        await publish(make_score("s-1", "c-1", 0.9))

        for attempt, step in enumerate(DEFAULT_RETRY_SCHEDULE_S, start=1):
            pending = await _attempted(client, subscription["id"], attempt)
            assert pending["status"] == "pending"
            wait = when(pending["next_attempt_at"]) - clock.now()
            assert timedelta(seconds=step) <= wait <= timedelta(seconds=step * 1.1), attempt
            clock.set(when(pending["next_attempt_at"]))

        parked = await wait_until(
            lambda: (d := _only(client, subscription["id"]))["status"] == "parked" and d,
            what="parked",
        )
        assert parked["attempts"] == len(DEFAULT_RETRY_SCHEDULE_S) + 1 == 8
        assert "retry schedule exhausted after 8 attempts" in parked["last_error"]
        assert "HTTP 500" in parked["last_error"]
        log = parked["attempt_log"]
        assert len(log) == 8 and log[-1]["outcome"] == "parked"
        span = when(log[-1]["attempted_at"]) - when(log[0]["attempted_at"])
        assert span >= timedelta(hours=24)
        assert span >= timedelta(seconds=sum(DEFAULT_RETRY_SCHEDULE_S))

        # The receiver is fixed; the operator replays the time range. The endpoint's circuit
        # (opened by the last failure) lets the delivery through after its cooldown.
        scripted.default = Answer(200)
        replay = client.post(
            "/v1/deliveries/replay",
            json={
                "created_from": (START - timedelta(hours=1)).isoformat(),
                "created_to": clock.now().isoformat(),
            },
            headers=headers(),
        )
        assert replay.status_code == 200, replay.text
        assert replay.json() == {
            "replayed": [parked["delivery_id"]],
            "skipped_inactive_subscription": [],
        }
        clock.advance(timedelta(seconds=60))
        done = await wait_until(
            lambda: (d := _only(client, subscription["id"]))["status"] == "delivered" and d,
            what="replay delivered",
        )
        assert len(done["attempt_log"]) == 9  # the history survives the replay
        requests = scripted.requests()
        assert [r.status for r in requests] == [500] * 8 + [200]
        assert {r.webhook_id for r in requests} == {parked["delivery_id"]}
        assert scripted.effects == 1

        # A second replay of the same range finds nothing parked.
        again = client.post(
            "/v1/deliveries/replay",
            json={
                "created_from": (START - timedelta(hours=1)).isoformat(),
                "created_to": clock.now().isoformat(),
            },
            headers=headers(),
        ).json()
        assert again["replayed"] == []


async def test_410_gone_disables_the_subscription_and_parks_its_pending_deliveries(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    healthy: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    # The first answer waits until both offers have their outbox rows, then says 410.
    scripted.script = [Answer(410, hang=True)]
    scripted.default = Answer(410)
    with TestClient(create_app(make_settings(endpoint_concurrency=1), clock)) as client:
        before = scrape(client)
        gone = subscribe(client, scripted.url())
        alive = subscribe(client, healthy.url())
        await publish(make_score("s-1", "c-1", 0.9), make_score("s-2", "c-2", 0.9))
        await wait_until(
            lambda: len(deliveries(client, subscription_id=gone["id"])) == 2 and scripted.hanging,
            what="both rows written, the first request held",
        )
        scripted.release()

        await wait_until(
            lambda: len(deliveries(client, subscription_id=alive["id"], status="delivered")) == 2,
            what="the healthy endpoint got both",
        )
        parked = await wait_until(
            lambda: (
                (d := deliveries(client, subscription_id=gone["id"], status="parked"))
                and len(d) == 2
                and d
            ),
            what="both deliveries of the gone endpoint parked",
        )
        assert {d["last_error"] for d in parked} == {GONE_REASON}
        assert len(scripted.requests()) == 1  # the second one was parked, never sent
        subscription = client.get(f"/v1/webhooks/{gone['id']}", headers=headers()).json()
        assert subscription["active"] is False
        assert subscription["disabled_reason"] == GONE_REASON
        assert when(subscription["disabled_at"]) == clock.now()
        assert [w["id"] for w in client.get("/v1/webhooks", headers=headers()).json()] == [
            alive["id"]
        ]

        # New offers no longer go to it; a replay is refused with the reason.
        await publish(make_score("s-3", "c-3", 0.9))
        await wait_until(
            lambda: len(deliveries(client, subscription_id=alive["id"], status="delivered")) == 3,
            what="third offer delivered to the healthy endpoint",
        )
        assert len(deliveries(client, subscription_id=gone["id"])) == 2
        replay = client.post(f"/v1/deliveries/{parked[0]['delivery_id']}/replay", headers=headers())
        assert replay.status_code == 409 and "410 Gone" in replay.json()["detail"]
        after = scrape(client)
        assert metric(after, ATTEMPTS, outcome="gone") - metric(before, ATTEMPTS, outcome="gone") == 1


async def test_429_and_503_retry_after_is_honoured_in_seconds_and_as_an_http_date_and_capped(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    in_five_minutes = format_datetime(START + timedelta(seconds=120 + 300), usegmt=True)
    scripted.script = [
        Answer(429, {"Retry-After": "120"}),
        Answer(503, {"Retry-After": in_five_minutes}),
        Answer(429, {"Retry-After": "999999"}),
        Answer(429),  # no Retry-After: the schedule
    ]
    settings = make_settings(retry_schedule_s=[5, 5, 5, 5, 5], retry_after_cap_s=600)
    with TestClient(create_app(settings, clock)) as client:
        subscription = subscribe(client, scripted.url())
        await publish(make_score("s-1", "c-1", 0.9))
        for attempt, expected_wait in enumerate((120, 300, 600, 5), start=1):
            pending = await _attempted(client, subscription["id"], attempt)
            assert pending["attempt_log"][-1]["outcome"] == "rate_limited"
            assert when(pending["next_attempt_at"]) == clock.now() + timedelta(
                seconds=expected_wait
            ), attempt
            if expected_wait != 5:
                assert "Retry-After" in pending["last_error"]
            clock.advance(timedelta(seconds=expected_wait))
        done = await wait_until(
            lambda: (d := _only(client, subscription["id"]))["status"] == "delivered" and d,
            what="delivered after the rate limits",
        )
        assert [r.status for r in scripted.requests()] == [429, 503, 429, 429, 200]
        assert done["attempts"] == 5


async def test_a_hanging_receiver_does_not_delay_a_healthy_one(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    healthy: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    """Every delivery to the healthy endpoint is booked while the hanging endpoint's first
    attempts are still open (their 10 s timeout has not fired: none of them is booked yet), and
    the hanging endpoint holds no more than its 2 concurrency slots."""
    scripted.default = Answer(200, hang=True)
    settings = make_settings(webhook_timeout_s=10.0, endpoint_concurrency=2)
    with TestClient(create_app(settings, clock)) as client:
        hanging = subscribe(client, scripted.url())
        alive = subscribe(client, healthy.url())
        await publish(*(make_score(f"s-{i}", f"c-{i}", 0.9) for i in range(6)))

        delivered = await wait_until(
            lambda: (
                (d := deliveries(client, subscription_id=alive["id"], status="delivered"))
                and len(d) == 6
                and d
            ),
            timeout_s=9.0,  # inside the hanging attempts' timeout
            what="all healthy deliveries booked",
        )
        stuck = deliveries(client, subscription_id=hanging["id"])
        assert len(stuck) == 6
        assert all(d["attempt_log"] == [] and d["status"] == "pending" for d in stuck)
        assert scripted.hanging == 2  # its concurrency limit, not 6
        assert len(delivered) == 6 and healthy.effects == 6

        scripted.default = Answer(200)
        scripted.release()
        await wait_until(
            lambda: len(deliveries(client, subscription_id=hanging["id"], status="delivered")) == 6,
            what="the released endpoint catches up",
        )


async def test_the_circuit_opens_after_consecutive_failures_and_a_probe_closes_it(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    healthy: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    scripted.default = Answer(500)
    settings = make_settings(
        retry_schedule_s=[1] * 10, breaker_failure_threshold=2, breaker_cooldown_s=60
    )
    with TestClient(create_app(settings, clock)) as client:
        failing = subscribe(client, scripted.url())
        await publish(make_score("s-1", "c-1", 0.9))
        await _attempted(client, failing["id"], 1)
        clock.advance(timedelta(seconds=1))
        await _attempted(client, failing["id"], 2)
        await wait_until(
            lambda: metric(scrape(client), "churnguard_actions_webhook_open_circuits") == 1,
            what="open circuit gauge",
        )

        # Due again, but the circuit is open: a witness delivery to a healthy endpoint proves
        # the worker ran meanwhile, and the failing endpoint got nothing.
        clock.advance(timedelta(seconds=1))
        alive = subscribe(client, healthy.url())
        await publish(make_score("s-2", "c-2", 0.9))
        await wait_until(
            lambda: deliveries(client, subscription_id=alive["id"], status="delivered"),
            what="witness delivered",
        )
        assert len(scripted.requests()) == 2
        assert len(_only_first(client, failing["id"])["attempt_log"]) == 2
        # While open, its due deliveries are moved to the probe time (opened at START + 1 s).
        await wait_until(
            lambda: when(_only_first(client, failing["id"])["next_attempt_at"])
            == START + timedelta(seconds=61),
            what="due delivery deferred to the probe time",
        )

        # After the cooldown one probe goes out; it succeeds and the circuit closes.
        scripted.default = Answer(200)
        clock.advance(timedelta(seconds=60))
        await wait_until(
            lambda: len(deliveries(client, subscription_id=failing["id"], status="delivered")) == 2,
            what="probe and the rest delivered",
        )
        await wait_until(
            lambda: metric(scrape(client), "churnguard_actions_webhook_open_circuits") == 0,
            what="circuit closed",
        )


def _only_first(client: TestClient, subscription_id: str) -> dict[str, Any]:
    """The oldest delivery of a subscription."""
    return deliveries(client, subscription_id=subscription_id)[-1]


class Crash(BaseException):
    """The process dies: not an Exception, so nothing in the worker handles it."""


class CrashAfterPost:
    """The real sender; after the receiver has answered, the process 'dies' before
    the worker can book the attempt."""

    def __init__(self) -> None:
        self.inner = PooledSender(allow_local=True)

    async def send(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Any:
        await self.inner.send(url, body, headers, timeout_s)
        raise Crash

    async def close(self) -> None:
        await self.inner.close()


async def test_a_crash_between_the_receivers_200_and_the_booking_resends_the_same_webhook_id(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    settings = make_settings()
    with TestClient(create_app(settings, clock, webhook_sender=CrashAfterPost())) as client:
        subscription = subscribe(client, scripted.url())
        await publish(make_score("s-1", "c-1", 0.9))
        await wait_until(lambda: scripted.requests(), what="first POST answered 200")
        unbooked = _only(client, subscription["id"])
        assert unbooked["status"] == "pending" and unbooked["attempt_log"] == []
        # the claim's lease: due again only after the longest attempt plus a margin
        assert when(unbooked["next_attempt_at"]) <= clock.now()  # due: it was claimed
        lease_end = when(unbooked["leased_until"])
        assert clock.now() + timedelta(seconds=settings.webhook_timeout_s) < lease_end
        assert lease_end <= clock.now() + timedelta(minutes=15)

    # The restarted service re-sends it once the lease has run out, with the same webhook-id.
    # (A fresh consumer group: no wait for the broker to expire the first one's membership.)
    restarted = settings.model_copy(update={"group_id": settings.group_id + "-restarted"})
    with TestClient(create_app(restarted, clock)) as client:
        clock.set(lease_end)
        done = await wait_until(
            lambda: (d := _only(client, subscription["id"]))["status"] == "delivered" and d,
            what="re-sent after the restart",
        )
        requests = scripted.requests()
        assert [r.status for r in requests] == [200, 200]
        assert {r.webhook_id for r in requests} == {done["delivery_id"]}
        assert requests[0].body == requests[1].body
        assert scripted.effects == 1 and scripted.duplicates == 1  # the receiver's dedup
        assert len(done["attempt_log"]) == 1
