"""Pure logic of reliable webhooks: jittered retry delays, Retry-After parsing, the endpoint
circuit breaker on a ManualClock, the SSRF address rules and a DNS rebinding seen by the
connect-time resolver, signatures with a rotated secret."""

from __future__ import annotations

import socket
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from standardwebhooks import Webhook

from services.actions.breaker import EndpointGuard
from services.actions.config import DEFAULT_RETRY_SCHEDULE_S
from services.actions.delivery import signed_headers
from services.actions.url_guard import UnsafeUrl, UrlPolicy
from services.actions.webhooks import (
    ClaimedDelivery,
    generate_secret,
    parse_retry_after,
    retry_delay,
)
from shared.clock import ManualClock, SystemClock

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)


def test_jitter_only_stretches_each_step_so_the_schedule_still_spans_more_than_a_day() -> None:
    lowest = [retry_delay(n, DEFAULT_RETRY_SCHEDULE_S, 0.1, lambda: 0.0) for n in range(1, 8)]
    highest = [retry_delay(n, DEFAULT_RETRY_SCHEDULE_S, 0.1, lambda: 0.999) for n in range(1, 8)]
    assert lowest == [timedelta(seconds=s) for s in DEFAULT_RETRY_SCHEDULE_S]
    for low, high, step in zip(lowest, highest, DEFAULT_RETRY_SCHEDULE_S, strict=True):
        assert low is not None and high is not None
        assert low < high < timedelta(seconds=step * 1.1)
    assert sum((d for d in lowest if d), timedelta()) > timedelta(hours=24)
    assert retry_delay(8, DEFAULT_RETRY_SCHEDULE_S, 0.1) is None
    # real randomness stays in the band
    for _ in range(200):
        delay = retry_delay(2, DEFAULT_RETRY_SCHEDULE_S, 0.1)
        assert delay is not None and timedelta(seconds=300) <= delay < timedelta(seconds=330)


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    assert parse_retry_after("120", NOW) == 120
    assert parse_retry_after(" 0 ", NOW) == 0
    assert parse_retry_after(format_datetime(NOW + timedelta(minutes=5), usegmt=True), NOW) == 300
    assert parse_retry_after(format_datetime(NOW - timedelta(minutes=5), usegmt=True), NOW) == 0
    for unreadable in (None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2026 00:00:00 GMT"):
        assert parse_retry_after(unreadable, NOW) is None, unreadable


def test_the_circuit_opens_after_n_failures_half_opens_after_the_cooldown_on_the_clock() -> None:
    clock = ManualClock(NOW)
    guard = EndpointGuard(clock, concurrency=3, failure_threshold=3, cooldown=timedelta(minutes=1))
    assert guard.capacity("a") == 3
    for _ in range(3):
        guard.started("a")
    assert guard.capacity("a") == 0 and guard.blocked() == ["a"]
    guard.finished("a", success=False)
    guard.finished("a", success=False)
    assert guard.state("a") == "closed" and guard.capacity("a") == 2
    guard.finished("a", success=False)  # third consecutive failure
    assert guard.state("a") == "open" and guard.capacity("a") == 0 and guard.open_count() == 1

    clock.advance(timedelta(seconds=59))
    assert guard.state("a") == "open"
    clock.advance(timedelta(seconds=1))
    assert guard.state("a") == "half_open" and guard.capacity("a") == 1  # one probe
    guard.started("a")
    assert guard.capacity("a") == 0
    guard.finished("a", success=False)  # the probe failed: open again for a full cooldown
    assert guard.state("a") == "open"
    clock.advance(timedelta(minutes=1))
    guard.started("a")
    guard.finished("a", success=True)
    assert guard.state("a") == "closed" and guard.capacity("a") == 3 and guard.open_count() == 0

    # an attempt that was never answered (the process died) says nothing about health
    guard.started("b")
    guard.finished("b", success=None)
    assert guard.state("b") == "closed" and guard.capacity("b") == 3
    # 410 opens at once, other endpoints are unaffected
    guard.started("c")
    guard.finished("c", success=False, gone=True)
    assert guard.state("c") == "open" and guard.capacity("a") == 3


def test_success_resets_the_consecutive_failure_count() -> None:
    guard = EndpointGuard(
        ManualClock(NOW), concurrency=1, failure_threshold=2, cooldown=timedelta(minutes=1)
    )
    for success in (False, True, False, True, False):
        guard.started("a")
        guard.finished("a", success=success)
    assert guard.state("a") == "closed"


def test_a_dns_rebinding_passes_creation_but_the_next_check_refuses_it() -> None:
    """The connect-time half (the sender refuses the re-pointed name and connects only to the
    checked address) is tests/actions/test_actions_webhook_sender.py, on real sockets."""
    dns = {"hooks.example.com": "93.184.216.34"}
    policy = UrlPolicy(resolve=lambda host, port: [dns[host]])
    assert policy.check("https://hooks.example.com/in") == "https://hooks.example.com/in"

    dns["hooks.example.com"] = "10.0.0.7"  # the attacker re-points the name after creation
    with pytest.raises(UnsafeUrl, match="resolves to 10.0.0.7; a private address"):
        policy.check("https://hooks.example.com/in")


def test_a_name_that_does_not_resolve_is_refused_in_production_only() -> None:
    def nowhere(host: str, port: int) -> list[str]:
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(UnsafeUrl, match="does not resolve"):
        UrlPolicy(resolve=nowhere).check("https://nowhere.invalid/")
    assert UrlPolicy(allow_local=True, resolve=nowhere).check("http://receiver:8080/")


def test_during_a_rotation_each_secret_verifies_the_request_alone() -> None:
    new, old, older = generate_secret(), generate_secret(), generate_secret()
    claimed = ClaimedDelivery(
        "msg_1", "https://x.example/", new, '{"type":"offer.created"}', 0, previous_secrets=(old,)
    )
    sent = signed_headers(claimed, SystemClock())
    assert sent["webhook-signature"].count("v1,") == 2
    for secret in (new, old):
        assert Webhook(secret).verify(claimed.payload, sent) == {"type": "offer.created"}
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(older).verify(claimed.payload, sent)
