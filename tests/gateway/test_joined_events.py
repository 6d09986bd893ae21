"""Single events through the gateway to the real ingest on the real broker, sent concurrently so
that the gateway joins them (services/gateway/joiner.py): every caller gets its own answer (its
event's id, its own validation error, the duplicate it sent), the gateway's metrics show events
travelling together, and the topic holds each valid event once, under its caller's tenant."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from pydantic import SecretStr

from services.gateway.app import create_app as gateway_app
from services.gateway.config import GatewaySettings
from services.gateway.manage import create_tenant
from services.ingest.app import create_app as ingest_app
from services.ingest.config import IngestSettings
from shared.events import EventRecord, decode_customer_record
from shared.joined import JOINED_CONTENT_TYPE, JOINED_PATH, LENGTHS_HEADER, join_bodies
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from shared.topics import CUSTOMER_EVENTS
from tests.helpers import INTERNAL_TOKEN, ServerThread, read_topic, wait_until
from tests.ingest.test_routes import event

PER_TENANT = 80


@dataclass
class Stack:
    gateway: str
    keys: dict[str, str]  # tenant id -> api key


@pytest.fixture
def stack(kafka_settings: KafkaSettings, database_url: str) -> Iterator[Stack]:
    database = DatabaseSettings(database_url=database_url)
    internal = InternalAuthSettings(internal_token=SecretStr(INTERNAL_TOKEN))
    ingest = ServerThread(ingest_app(IngestSettings(kafka=kafka_settings, database=database, internal=internal))).start()
    gateway = ServerThread(gateway_app(GatewaySettings(
        database=database, internal=internal, ingest_url=ingest.url, rate_limit_per_s=0.0,
    ))).start()
    try:
        wait_until(lambda: httpx.get(f"{ingest.url}/readyz", timeout=5).status_code == 200, timeout_s=60,
                   what="ingest ready")
        keys = dict(create_tenant(database_url, f"shop-{n}-{uuid.uuid4().hex[:6]}") for n in range(2))
        yield Stack(gateway.url, keys)
    finally:
        gateway.stop()
        ingest.stop()


def joined_so_far(gateway: str) -> tuple[float, float]:
    """(requests to ingest, events in them) from the gateway's histogram."""
    found = {}
    for line in httpx.get(f"{gateway}/metrics", timeout=5).text.splitlines():
        for suffix in ("_count", "_sum"):
            if line.startswith(f"churnguard_gateway_joined_events{suffix} "):
                found[suffix] = float(line.rsplit(" ", 1)[1])
    return found.get("_count", 0.0), found.get("_sum", 0.0)


def test_concurrent_callers_each_get_their_own_answer(stack: Stack, kafka_settings: KafkaSettings) -> None:
    first = []  # (tenant, body, what the caller should hear)
    for tenant in stack.keys:
        for n in range(PER_TENANT):
            body = event(n, id=f"{tenant}-{n}", customer_id=f"c-{n}")
            if n % 10 == 3:
                body.pop("customer_id")
                first.append((tenant, body, "invalid"))
            else:
                first.append((tenant, body, "new"))
    # The second wave resends some of the first (known by then: duplicates) beside new ones.
    second = [(tenant, body, "resent") for tenant, body, what in first[::4] if what == "new"]
    second += [(tenant, event(n, id=f"{tenant}-{n}"), "new")
               for tenant in stack.keys for n in range(PER_TENANT, PER_TENANT + 20)]
    requests_before, events_before = joined_so_far(stack.gateway)

    async def send(plans: list[tuple[str, dict, str]]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.gateway, timeout=30,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(
                client.post("/v1/events", json=body, headers={"Authorization": f"Bearer {stack.keys[tenant]}"})
                for tenant, body, _ in plans))

    for plans in (first, second):
        answers = asyncio.run(send(plans))
        for (_, body, what), answer in zip(plans, answers, strict=True):
            if what == "invalid":
                assert answer.status_code == 422, answer.text
                assert answer.json()["errors"] == [{"field": "customer_id", "message": "required field is missing"}]
            else:
                assert answer.status_code == 202, answer.text
                assert answer.json() == {"accepted": int(what == "new"), "duplicates": int(what == "resent"),
                                         "id": body["id"]}

    requests, events = (now - before for now, before in zip(joined_so_far(stack.gateway),
                                                           (requests_before, events_before), strict=True))
    assert events == len(first) + len(second)
    assert requests < events, "no two events travelled together"

    valid = {(tenant, body["id"]) for tenant, body, what in first + second if what == "new"}
    records = asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, len(valid) + 1, timeout_s=5))
    published = Counter((r.tenant_id, r.event.id) for r in map(decode_customer_record, (x.value for x in records))
                        if isinstance(r, EventRecord))
    assert set(published) == valid
    assert set(published.values()) == {1}


def test_the_joined_route_is_not_public(stack: Stack) -> None:
    """Only the gateway joins: the internal route is not in its route table nor in its API."""
    key = next(iter(stack.keys.values()))
    body, lengths = join_bodies([json.dumps(event(1)).encode()])
    response = httpx.post(f"{stack.gateway}{JOINED_PATH}", content=body, timeout=10, headers={
        "Authorization": f"Bearer {key}", "Content-Type": JOINED_CONTENT_TYPE, LENGTHS_HEADER: lengths})
    assert response.status_code in (404, 405), response.text
    assert JOINED_PATH not in httpx.get(f"{stack.gateway}/openapi.json", timeout=10).json()["paths"]
