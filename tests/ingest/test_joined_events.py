"""ingest's internal route for single events the gateway joined (shared/joined.py), against
the real broker: each body is answered exactly as POST /v1/events answers it alone, the valid
ones are published once, and a framing that does not add up is refused by name."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from services.ingest.app import create_app
from shared.events import EventRecord, decode_customer_record
from shared.joined import ANSWERS_HEADER, JOINED_CONTENT_TYPE, JOINED_PATH, LENGTHS_HEADER, join_bodies, split_answers
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS
from tests.helpers import internal_headers, read_topic
from tests.ingest.test_routes import event, settings_for

MAX_EVENT_BYTES = 2048


def as_body(value: dict) -> bytes:
    return json.dumps(value).encode()


BODIES = [
    as_body(event(1)),
    as_body(event(1)),  # the same id again: a duplicate of the first
    as_body({k: v for k, v in event(3).items() if k != "customer_id"}),
    b'{"id": ',
    b'{"id": "\xff"}',
    as_body(event(6, data={"order_id": "o-6", "amount": "1.00", "currency": "EUR", "note": "x" * MAX_EVENT_BYTES})),
    as_body(event(7)),  # sent before: a duplicate
    b'{"id": NaN}',
    b"",
    as_body(event(10, type="order.teleported")),
    as_body(event(11, customer_id="c-erased")),
]


@pytest.fixture
def client(kafka_settings: KafkaSettings, database_url: str):
    settings = settings_for(kafka_settings, database_url, max_event_bytes=MAX_EVENT_BYTES)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def joined(client: TestClient, tenant: str, bodies: list[bytes], **headers: str):
    body, lengths = join_bodies(bodies)
    return client.post(JOINED_PATH, content=body, headers={
        **internal_headers(tenant), "Content-Type": JOINED_CONTENT_TYPE, LENGTHS_HEADER: lengths, **headers})


def test_each_joined_body_gets_the_answer_it_gets_alone(client: TestClient, kafka_settings: KafkaSettings) -> None:
    for tenant in ("tenant-alone", "tenant-joined"):
        assert client.post("/v1/events", json=event(7), headers=internal_headers(tenant)).status_code == 202
        erased = client.delete("/v1/customers/c-erased", headers=internal_headers(tenant))
        assert erased.status_code == 202, erased.text

    alone = [client.post("/v1/events", content=body, headers={
        **internal_headers("tenant-alone"), "Content-Type": "application/json"}) for body in BODIES]
    response = joined(client, "tenant-joined", BODIES)

    assert response.status_code == 200, response.text
    answers = split_answers(response.content, response.headers[ANSWERS_HEADER], len(BODIES))
    assert [status for status, _ in answers] == [a.status_code for a in alone]
    assert [json.loads(body) for _, body in answers] == [a.json() for a in alone]
    # what that is, spelled out: accepted, duplicate, 422, 400, 400, 413, duplicate, 400, 400, 422, suppressed
    assert [status for status, _ in answers] == [202, 202, 422, 400, 400, 413, 202, 400, 400, 422, 202]
    assert json.loads(answers[1][1]) == {"accepted": 0, "duplicates": 1, "id": "evt-1"}
    assert json.loads(answers[2][1])["errors"] == [{"field": "customer_id", "message": "required field is missing"}]
    assert json.loads(answers[10][1]) == {"accepted": 0, "duplicates": 0, "suppressed": 1, "id": "evt-11"}

    # 4 events and 2 erasure records; asking for one more waits out the timeout and shows none came
    records = asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, 7, timeout_s=3))
    decoded = [decode_customer_record(record.value) for record in records]
    published = sorted((r.tenant_id, r.event.id) for r in decoded if isinstance(r, EventRecord))
    assert published == [("tenant-alone", "evt-1"), ("tenant-alone", "evt-7"),
                         ("tenant-joined", "evt-1"), ("tenant-joined", "evt-7")]


def test_one_joined_body_is_answered_as_one(client: TestClient) -> None:
    response = joined(client, "tenant-a", [as_body(event(1))])
    assert split_answers(response.content, response.headers[ANSWERS_HEADER], 1) == [
        (202, b'{"accepted":1,"duplicates":0,"id":"evt-1"}')]


@pytest.mark.parametrize(("lengths", "named"), [
    (None, f"missing {LENGTHS_HEADER}"),
    ("3,x", f"malformed {LENGTHS_HEADER}"),
    ("3,3", "says 6 bytes; the body has"),
])
def test_a_framing_that_does_not_add_up_is_refused_by_name(client: TestClient, lengths: str | None,
                                                             named: str) -> None:
    headers = {**internal_headers("tenant-a"), "Content-Type": JOINED_CONTENT_TYPE}
    if lengths is not None:
        headers[LENGTHS_HEADER] = lengths
    response = client.post(JOINED_PATH, content=as_body(event(1)), headers=headers)
    assert response.status_code == 400
    assert named in response.json()["detail"]


def test_only_the_gateway_may_join_and_only_in_its_framing(client: TestClient) -> None:
    body, lengths = join_bodies([as_body(event(1))])
    no_token = client.post(JOINED_PATH, content=body, headers={
        "Content-Type": JOINED_CONTENT_TYPE, LENGTHS_HEADER: lengths, "X-Churnguard-Tenant": "tenant-a"})
    assert no_token.status_code == 401
    as_json = client.post(JOINED_PATH, content=body, headers={**internal_headers("tenant-a"), LENGTHS_HEADER: lengths,
                                                              "Content-Type": "application/json"})
    assert as_json.status_code == 415
    assert JOINED_CONTENT_TYPE in as_json.json()["detail"]
    assert JOINED_PATH not in client.get("/openapi.json").json()["paths"]
