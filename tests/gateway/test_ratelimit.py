"""Per-key token buckets on a ManualClock: burst, refill, Retry-After, keys apart; then through
the real gateway: 429 with Retry-After, a tenant's own limit set through the admin API, and the
metric on a real scrape of /metrics."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.manage import create_tenant
from services.gateway.ratelimit import TokenBuckets
from shared.clock import ManualClock


def _clock() -> ManualClock:
    return ManualClock(datetime(2026, 6, 1, tzinfo=timezone.utc))


def test_a_full_bucket_lets_the_burst_through_then_refills_at_the_rate() -> None:
    clock = _clock()
    buckets = TokenBuckets(clock)
    assert all(buckets.take("k1", per_s=2, burst=5).allowed for _ in range(5))
    refused = buckets.take("k1", per_s=2, burst=5)
    assert not refused.allowed
    assert refused.retry_after_s == 0.5  # one token at 2/s
    assert refused.retry_after_header == "1"  # whole seconds, rounded up

    clock.advance(timedelta(seconds=0.25))  # half a token
    half = buckets.take("k1", per_s=2, burst=5)
    assert not half.allowed and abs(half.retry_after_s - 0.25) < 1e-9
    clock.advance(timedelta(seconds=0.25))
    assert buckets.take("k1", per_s=2, burst=5).allowed
    assert not buckets.take("k1", per_s=2, burst=5).allowed

    clock.advance(timedelta(hours=1))  # refills up to the burst, no further
    assert sum(buckets.take("k1", per_s=2, burst=5).allowed for _ in range(20)) == 5


def test_retry_after_counts_whole_seconds_until_a_token() -> None:
    clock = _clock()
    buckets = TokenBuckets(clock)
    assert buckets.take("slow", per_s=0.1, burst=1).allowed
    refused = buckets.take("slow", per_s=0.1, burst=1)
    assert abs(refused.retry_after_s - 10) < 1e-9 and refused.retry_after_header == "10"
    clock.advance(timedelta(seconds=7.5))
    later = buckets.take("slow", per_s=0.1, burst=1)
    assert abs(later.retry_after_s - 2.5) < 1e-9 and later.retry_after_header == "3"


def test_one_keys_flood_leaves_another_keys_bucket_alone() -> None:
    buckets = TokenBuckets(_clock())
    flood = [buckets.take("flooder", per_s=10, burst=10).allowed for _ in range(1000)]
    assert sum(flood) == 10
    assert all(buckets.take("quiet", per_s=10, burst=10).allowed for _ in range(10))


def test_a_changed_limit_applies_without_handing_out_a_fresh_bucket() -> None:
    clock = _clock()
    buckets = TokenBuckets(clock)
    assert sum(buckets.take("k", per_s=100, burst=100).allowed for _ in range(200)) == 100
    assert not buckets.take("k", per_s=1, burst=3).allowed  # lowered: still empty
    clock.advance(timedelta(seconds=10))
    assert sum(buckets.take("k", per_s=1, burst=3).allowed for _ in range(10)) == 3


def test_a_clock_set_back_refills_nothing_and_old_buckets_are_dropped() -> None:
    clock = _clock()
    buckets = TokenBuckets(clock, max_keys=2)
    assert buckets.take("a", per_s=1, burst=1).allowed
    clock.advance(timedelta(seconds=-30))
    assert not buckets.take("a", per_s=1, burst=1).allowed
    buckets.take("b", per_s=1, burst=1)
    buckets.take("c", per_s=1, burst=1)  # "a" is the least recently used: dropped
    assert buckets.take("a", per_s=1, burst=1).allowed  # back full


def test_the_gateway_answers_429_with_retry_after_per_key(
    settings: GatewaySettings, database_url: str
) -> None:
    clock = _clock()
    limited = settings.model_copy(update={"rate_limit_per_s": 1.0, "rate_limit_burst": 3})
    _, flooder = create_tenant(database_url, "flooder")
    _, quiet = create_tenant(database_url, "quiet")
    with TestClient(create_app(limited, clock)) as client:
        before = _rate_limited(client)
        answers = [client.get("/v1/models", headers={"X-API-Key": flooder}) for _ in range(10)]
        assert [a.status_code for a in answers] == [200] * 3 + [429] * 7
        refused = answers[-1]
        assert refused.headers["Retry-After"] == "1"
        assert "rate limit of this API key exceeded (1 requests/s, burst 3)" in refused.json()["detail"]
        assert flooder not in refused.text
        # The other tenant's key has its own bucket.
        assert [client.get("/v1/models", headers={"X-API-Key": quiet}).status_code
                for _ in range(3)] == [200] * 3
        clock.advance(timedelta(seconds=1))
        assert client.get("/v1/models", headers={"X-API-Key": flooder}).status_code == 200
        assert client.get("/v1/models", headers={"X-API-Key": flooder}).status_code == 429

        assert _rate_limited(client) - before == 8


def _rate_limited(client: TestClient) -> float:
    """From a real scrape (the counter is per process, so tests compare before and after)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('churnguard_gateway_rate_limited_total{reason="key"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_tenants_own_limit_set_through_the_admin_api_applies_at_once(
    settings: GatewaySettings, database_url: str
) -> None:
    admin_key = "a" * 40
    clock = _clock()
    configured = settings.model_copy(update={
        "admin_key": SecretStr(admin_key), "auth_cache_s": 60.0,
        "rate_limit_per_s": 1000.0, "rate_limit_burst": 1000,
    })
    tenant_id, key = create_tenant(database_url, "limited")
    with TestClient(create_app(configured, clock)) as client:
        assert all(client.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
                   for _ in range(20))
        changed = client.put(f"/v1/admin/tenants/{tenant_id}/rate-limit",
                             json={"requests_per_s": 0.5, "burst": 2},
                             headers={"X-API-Key": admin_key})
        assert changed.status_code == 200, changed.text
        # The key cache (60 s here) does not delay the new limit in this process.
        statuses = [client.get("/v1/models", headers={"X-API-Key": key}).status_code for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        assert client.get("/v1/models", headers={"X-API-Key": key}).headers["Retry-After"] == "2"

        assert client.delete(f"/v1/admin/tenants/{tenant_id}/rate-limit",
                             headers={"X-API-Key": admin_key}).status_code == 200
        clock.advance(timedelta(seconds=2))  # refilled at the old rate until the next request
        assert client.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
        clock.advance(timedelta(seconds=1))  # ... and at the default rate from then on
        assert all(client.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
                   for _ in range(20))


def test_rates_that_would_make_retry_after_absurd_are_refused(settings: GatewaySettings) -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="rate_limit_per_s"):
        GatewaySettings(rate_limit_per_s=1e-300)
    with pytest.raises(ValueError, match="per_s > 0"):
        TokenBuckets(_clock()).take("k", per_s=0, burst=1)


def test_a_zero_rate_turns_the_limit_off(settings: GatewaySettings, database_url: str) -> None:
    _, key = create_tenant(database_url, "unlimited")
    off = settings.model_copy(update={"rate_limit_per_s": 0.0, "rate_limit_burst": 1})
    with TestClient(create_app(off, _clock())) as client:
        assert all(client.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
                   for _ in range(10))
