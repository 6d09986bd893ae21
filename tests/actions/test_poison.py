"""Poisoned messages written straight to both topics actions reads (churn-scores, customer-events),
ahead of a customer's good records on the same partition: the real consumers (real broker, real
database) dead-letter each with a reason naming its problem, the retried kind after the
configured attempts, count them, and handle the good records behind them; `churnguard dlq list`
shows them, with the consumer group that gave up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from services.actions.app import create_app
from services.actions.config import ActionsSettings
from services.cli import app as cli
from shared.clock import ManualClock
from shared.events import EventRecord, parse_event
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS, dead_letter
from tests.actions.actions_support import TENANT, headers, make_score, read_partitions, wait_until
from tests.poison import check_dead_letters, poisoned_events, poisoned_scores, write_poisoned

MAX_ATTEMPTS = 2  # not the default (3): the setting reaches both consumers


def _dead_letters(reason: str) -> float:
    return REGISTRY.get_sample_value("churnguard_actions_dead_letters_total", {"reason": reason}) or 0.0


def _decisions(client: TestClient, customer: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/customers/{customer}/decisions", headers=headers()).json()


async def test_poisoned_scores_and_events_go_to_the_dead_letter_topics_and_the_partitions_keep_moving(
    make_settings: Callable[..., ActionsSettings], clock: ManualClock, kafka_settings: KafkaSettings,
    database_url: str,
) -> None:
    postgres = database_url.startswith("postgresql")
    kafka = kafka_settings.model_copy(update={"consumer_max_attempts": MAX_ATTEMPTS})
    settings = make_settings(kafka=kafka)
    groups = {CHURN_SCORES: [settings.group_id], CUSTOMER_EVENTS: [f"{settings.group_id}-events"]}
    scores, events = poisoned_scores(TENANT, "c-p", postgres=postgres), poisoned_events(TENANT, "c-p", postgres=postgres)
    good_score = make_score("s-good", "c-p", 0.93)
    complaint = EventRecord(tenant_id=TENANT, received_at=clock.now(), event=parse_event({
        "id": "e-complaint", "type": "support.complaint", "customer_id": "c-p",
        "occurred_at": (clock.now() - timedelta(minutes=5)).isoformat(), "data": {"severity": "high"},
    }, now=clock.now()))
    assert good_score.key == complaint.key == scores[0].key == events[0].key
    before = {reason: _dead_letters(reason) for reason in ("undecodable", "unprocessable")}

    with TestClient(create_app(settings, clock)) as client:
        await write_poisoned(kafka, [*scores, *events])
        publisher = Publisher(kafka, "test-upstream")
        try:  # behind the poison, on its partition of each topic (same key)
            await publisher.publish(CHURN_SCORES, good_score.key, good_score.model_dump_json().encode())
            await publisher.publish(CUSTOMER_EVENTS, complaint.key, complaint.model_dump_json().encode())
        finally:
            await publisher.close()

        decided = await wait_until(lambda: len(_decisions(client, "c-p")) == 2 and _decisions(client, "c-p"),
                                   timeout_s=30, what="the good score and the complaint behind the poison decided")
        assert sorted(d["trigger"] for d in decided) == ["complaint", "score"]
        assert next(d for d in decided if d["trigger"] == "score")["score_id"] == "s-good"
        await wait_until(lambda: _dead_letters("unprocessable") - before["unprocessable"] == len(scores) + len(events) - 2,
                         what="unprocessable dead letters counted")
        assert _dead_letters("undecodable") - before["undecodable"] == 2
        # the poisoned score's customer (same id, model version too long) got no decision from it
        assert {d["score_id"] for d in decided if d["trigger"] == "score"} == {"s-good"}

    letters: dict[str, Any] = {}
    for topic, poisoned in ((CHURN_SCORES, scores), (CUSTOMER_EVENTS, events)):
        dlq = await read_partitions(kafka, dead_letter(topic), until=lambda rs, n=len(poisoned): len(rs) >= n)
        letters |= check_dead_letters(dlq, poisoned, max_attempts=MAX_ATTEMPTS, groups=groups)
    reasons = {key: dict(r.headers)["reason"].decode() for key, [r] in letters.items()}
    assert reasons[(CHURN_SCORES, "model-version-too-long")] == (
        "unprocessable: model_version is 300 characters; actions stores at most 128 and scoring's registry "
        "never names a model longer than 64")
    assert reasons[(CUSTOMER_EVENTS, "occurred-after-received")].startswith("unprocessable: occurred_at ")
    if postgres:
        for topic in (CHURN_SCORES, CUSTOMER_EVENTS):
            assert reasons[(topic, "nul-in-customer-id")].startswith(f"unprocessable: failed {MAX_ATTEMPTS} times: DataError")

    env = {"CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "CHURNGUARD_KAFKA_TOPIC_PREFIX": kafka.topic_prefix}
    for topic, poisoned in ((CHURN_SCORES, scores), (CUSTOMER_EVENTS, events)):
        listed = await asyncio.to_thread(CliRunner().invoke, cli, ["dlq", "list", "--topic", topic], env=env)
        assert listed.exit_code == 0, listed.output
        assert f"{len(poisoned)} dead letters on {topic}.dlq, {len(poisoned)} not replayed" in listed.output
        for p in poisoned:
            line = reasons[(topic, p.name)].splitlines()[0]
            assert f"by {groups[topic][0]}: {line}" in listed.output, p.name
