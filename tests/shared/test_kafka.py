"""The Kafka kit against the real broker: safe settings, publishing, the consume loop, DLQ."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from shared.kafka import (
    BrokerUnavailable,
    ConsumeLoop,
    Decoded,
    Publisher,
    Unprocessable,
    consumer_options,
    make_consumer,
    make_producer,
    producer_options,
)
from shared.dead_letters import list_dead_letters, replay_dead_letters
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS, dead_letter
from tests.helpers import async_wait_until as wait_until
from tests.helpers import read_topic


async def test_producer_waits_for_all_replicas_and_consumer_never_autocommits() -> None:
    settings = KafkaSettings()
    assert producer_options(settings, "x")["acks"] == "all"
    assert consumer_options(settings, "g", "x")["enable_auto_commit"] is False
    producer = make_producer(settings, "x")
    assert producer._sender._acks == -1  # what aiokafka actually sends on the wire
    consumer = make_consumer(settings, ["t"], "g", "x")
    assert consumer._enable_auto_commit is False


def test_acks_cannot_be_weakened_by_configuration() -> None:
    with pytest.raises(ValueError):
        KafkaSettings(acks="1")


async def test_consume_loop_handles_good_records_and_dead_letters_poison(kafka_settings: KafkaSettings) -> None:
    publisher = Publisher(kafka_settings, "test")
    handled: dict[int, dict] = {}  # keyed like a real handler's unique key: redelivery is harmless

    async def handle(batch: list[Decoded[dict]]) -> None:
        for item in batch:
            if item.value.get("poison"):
                raise Unprocessable("poison flag set")
            handled[item.value["n"]] = item.value

    loop = ConsumeLoop(
        settings=kafka_settings, topic=CUSTOMER_EVENTS, group_id="g-test", client_id="test",
        decode=json.loads, handle=handle, publisher=publisher,
    )
    loop.start()
    try:
        await publisher.publish_many(
            CUSTOMER_EVENTS,
            [(b"k", json.dumps({"n": 1}).encode()), (b"k", b"\xff not json"),
             (b"k", json.dumps({"poison": True}).encode()), (b"k", json.dumps({"n": 2}).encode())],
        )
        await wait_until(lambda: len(handled) == 2 and loop.stats.dead_lettered == 2)
        assert sorted(handled) == [1, 2]
    finally:
        await loop.stop()
        await publisher.close()

    records = await read_topic(kafka_settings, dead_letter(CUSTOMER_EVENTS), 2, timeout_s=10)
    reasons = sorted(dict(r.headers)["reason"].decode().split(":")[0] for r in records)
    assert reasons == ["undecodable", "unprocessable"]


async def test_whole_poll_hands_several_partitions_at_once_and_falls_back_for_bad_records(
    kafka_settings: KafkaSettings,
) -> None:
    publisher = Publisher(kafka_settings, "test")
    handled: dict[int, dict] = {}
    partitions_per_call: list[int] = []

    async def handle(batch: list[Decoded[dict]]) -> None:
        partitions_per_call.append(len({item.record.partition for item in batch}))
        for item in batch:
            if item.value.get("poison"):
                raise Unprocessable("poison flag set")
        for item in batch:
            handled[item.value["n"]] = item.value

    loop = ConsumeLoop(
        settings=kafka_settings, topic=CUSTOMER_EVENTS, group_id="g-whole", client_id="test",
        decode=json.loads, handle=handle, publisher=publisher, whole_poll=True,
    )
    try:
        # on the topic before the consumer joins: its first fetch brings every partition
        await publisher.publish_many(
            CUSTOMER_EVENTS, [(f"k{n}".encode(), json.dumps({"n": n}).encode()) for n in range(12)]
        )
        loop.start()
        await wait_until(lambda: len(handled) == 12)
        assert max(partitions_per_call) > 1
        await publisher.publish_many(CUSTOMER_EVENTS, [
            (b"k1", json.dumps({"n": 100}).encode()), (b"k1", b"\xff not json"),
            (b"k2", json.dumps({"poison": True}).encode()), (b"k3", json.dumps({"n": 101}).encode()),
        ])
        await wait_until(lambda: {100, 101} <= set(handled) and loop.stats.dead_lettered == 2)
    finally:
        await loop.stop()
        await publisher.close()
    records = await read_topic(kafka_settings, dead_letter(CUSTOMER_EVENTS), 2, timeout_s=10)
    reasons = sorted(dict(r.headers)["reason"].decode().split(":")[0] for r in records)
    assert reasons == ["undecodable", "unprocessable"]


async def test_follow_ups_run_in_poll_order_beside_the_next_poll_and_a_failed_one_is_redone(
    kafka_settings: KafkaSettings,
) -> None:
    """A handler's follow-up (its publishing) runs while the next poll is handled, one at a time
    and in poll order; the poll's offsets are committed after it. A follow-up that fails
    rewinds to the first uncommitted offsets: its poll and the ones after it are handled
    again, and nothing is lost."""
    publisher = Publisher(kafka_settings, "test")
    stored: dict[int, int] = {}  # n -> times handled (a real handler's unique key makes repeats harmless)
    published: list[int] = []
    running = {"now": 0, "most": 0, "overlapped": 0, "polls": 0}
    fail_once = {13}

    async def handle(batch: list[Decoded[dict]]) -> Callable[[], Awaitable[None]]:
        running["polls"] += 1
        poll = running["polls"]
        numbers = [item.value["n"] for item in batch]
        for n in numbers:
            stored[n] = stored.get(n, 0) + 1

        async def follow_up() -> None:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            await asyncio.sleep(0)  # let anything else that could run, run
            running["overlapped"] += running["polls"] > poll  # the next poll was handled meanwhile
            running["now"] -= 1
            if fail_once & set(numbers):
                fail_once.clear()
                raise BrokerUnavailable("broker did not acknowledge: TimeoutError")
            published.extend(numbers)

        return follow_up

    settings = kafka_settings.model_copy(update={"max_poll_records": 4})
    loop = ConsumeLoop(
        settings=settings, topic=CUSTOMER_EVENTS, group_id="g-follow", client_id="test",
        decode=json.loads, handle=handle, publisher=publisher, whole_poll=True, retry_backoff_s=0.01,
    )
    try:
        await publisher.publish_many(CUSTOMER_EVENTS, [(b"k", json.dumps({"n": n}).encode()) for n in range(40)])
        loop.start()
        await wait_until(lambda: set(published) == set(range(40)) and loop.stats.processed >= 40)
    finally:
        await loop.stop()
    assert running["most"] == 1  # never two follow-ups at once
    assert running["overlapped"] >= 1  # and polls were handled while one ran
    first_seen = list(dict.fromkeys(published))
    assert first_seen == list(range(40))  # published in the partition's order
    assert stored[13] >= 2  # the failed follow-up's poll was handled again ...
    assert published.count(13) == 1  # ... and published once, when its follow-up succeeded

    # every offset was committed: the group's committed offsets add up to the 40 records
    consumer = make_consumer(settings, [], "g-follow", "test-check")
    await consumer.start()
    try:
        topic = settings.topic(CUSTOMER_EVENTS)
        committed = [await consumer.committed(TopicPartition(topic, p)) for p in range(settings.partitions)]
        assert sum(offset or 0 for offset in committed) == 40
    finally:
        await consumer.stop()
        await publisher.close()


async def test_publisher_reports_unreachable_broker_quickly() -> None:
    publisher = Publisher(KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1000), "t", send_timeout_s=1.0)
    with pytest.raises(BrokerUnavailable):
        await publisher.publish(CUSTOMER_EVENTS, b"k", b"v")
    assert await publisher.ping() is False


async def test_a_record_that_keeps_failing_is_dead_lettered_and_the_partition_moves_on(
    kafka_settings: KafkaSettings,
) -> None:
    publisher = Publisher(kafka_settings, "test")
    handled: dict[int, dict] = {}
    flaky_failures = {"left": 2}

    async def handle(batch: list[Decoded[dict]]) -> None:
        for item in batch:
            if item.value.get("bug"):
                raise ValueError("cannot compute features for this record")
            if item.value.get("flaky") and flaky_failures["left"] > 0:
                flaky_failures["left"] -= 1
                raise ConnectionRefusedError("database unreachable")  # transient: retried, never dead-lettered
            handled[item.value["n"]] = item.value

    loop = ConsumeLoop(
        settings=kafka_settings, topic=CUSTOMER_EVENTS, group_id="g-attempts", client_id="test",
        decode=json.loads, handle=handle, publisher=publisher, retry_backoff_s=0.01, max_attempts=3,
    )
    loop.start()
    try:
        await publisher.publish_many(CUSTOMER_EVENTS, [
            (b"k", json.dumps({"n": 1, "flaky": True}).encode()),
            (b"k", json.dumps({"n": 2, "bug": True}).encode()),
            (b"k", json.dumps({"n": 3}).encode()),
        ])
        await wait_until(lambda: sorted(handled) == [1, 3] and loop.stats.dead_lettered == 1)
    finally:
        await loop.stop()
        await publisher.close()

    [letter] = await list_dead_letters(kafka_settings, CUSTOMER_EVENTS)
    assert letter.reason.startswith("unprocessable: failed 3 times: ValueError")
    assert json.loads(letter.value) == {"n": 2, "bug": True}
    assert not letter.replayed


async def test_dlq_replay_republishes_each_dead_letter_once(kafka_settings: KafkaSettings) -> None:
    publisher = Publisher(kafka_settings, "test")
    try:
        await publisher.publish(dead_letter(CUSTOMER_EVENTS), b"t/c", b'{"n": 7}', [("reason", b"unprocessable: test")])
    finally:
        await publisher.close()
    assert await replay_dead_letters(kafka_settings, CUSTOMER_EVENTS) == 1
    assert await replay_dead_letters(kafka_settings, CUSTOMER_EVENTS) == 0
    [letter] = await list_dead_letters(kafka_settings, CUSTOMER_EVENTS)
    assert letter.replayed and letter.reason == "unprocessable: test"
    [back] = await read_topic(kafka_settings, CUSTOMER_EVENTS, 1)
    assert (back.key, back.value) == (b"t/c", b'{"n": 7}')
    assert dict(back.headers)["replayed-from"].startswith(kafka_settings.topic("customer-events.dlq").encode())


async def test_publish_many_puts_each_key_where_send_would_and_keeps_its_order(kafka_settings: KafkaSettings) -> None:
    publisher = Publisher(kafka_settings, "test-batches")
    messages = [(f"customer-{i % 37}".encode(), f"{i}".encode()) for i in range(2_000)]
    oversized = (b"customer-big", b"x" * (kafka_settings.max_batch_size + 1_000))
    try:
        await publisher.publish_many(CUSTOMER_EVENTS, [*messages, oversized])
    finally:
        await publisher.close()

    records = await read_topic(kafka_settings, CUSTOMER_EVENTS, count=len(messages) + 1)
    assert len(records) == len(messages) + 1
    partitions = list(range(kafka_settings.partitions))
    partitioner = DefaultPartitioner()
    by_key: dict[bytes, list[int]] = {}
    for record in records:
        assert record.partition == partitioner(record.key, partitions, partitions)
        if record.key != oversized[0]:
            by_key.setdefault(record.key, []).append(int(record.value))
    assert sum(len(values) for values in by_key.values()) == len(messages)
    for values in by_key.values():
        assert values == sorted(values)  # per-key order is the send order
    assert [r.value for r in records if r.key == oversized[0]] == [oversized[1]]


async def test_concurrent_joined_sends_all_arrive_in_each_callers_order(kafka_settings: KafkaSettings) -> None:
    """publish_joined: callers arriving while a send is in flight share the next one; each
    returns once the broker has its records, and a key keeps each caller's order."""
    publisher = Publisher(kafka_settings, "test-joined")
    callers = 60

    async def caller(n: int) -> None:
        await publisher.publish_joined(CUSTOMER_EVENTS, [(f"c-{n % 7}".encode(), f"{n}-{i}".encode()) for i in range(3)])

    try:
        await asyncio.gather(*(caller(n) for n in range(callers)))
    finally:
        await publisher.close()

    records = await read_topic(kafka_settings, CUSTOMER_EVENTS, count=callers * 3)
    assert len(records) == callers * 3
    seen: dict[str, list[int]] = {}
    for record in records:
        n, i = record.value.decode().split("-")
        seen.setdefault(n, []).append(int(i))
    assert all(values == [0, 1, 2] for values in seen.values()) and len(seen) == callers


async def test_a_linger_does_not_hold_the_publishers_own_batches(kafka_settings: KafkaSettings) -> None:
    """The publisher builds whole batches itself, and aiokafka queues one batch per partition at a
    time: a batch left open would wait out `linger_ms` in that queue, so a linger of L ms capped
    each partition at 1,000 / L sends a second and concurrent publishes timed out with
    BrokerUnavailable (CHURNGUARD_KAFKA_LINGER_MS=5 at 700 publishes/s in the bench's broker hop).
    Here 40 concurrent publishes to one partition under a 1 s linger: all acknowledged within the
    3 s send timeout only if no batch lingers."""
    lingering = kafka_settings.model_copy(update={"linger_ms": 1_000})
    publisher = Publisher(lingering, "test-linger", send_timeout_s=3.0)
    try:
        outcomes = await asyncio.gather(
            *(publisher.publish(CUSTOMER_EVENTS, b"one-customer", f"{n}".encode()) for n in range(40)),
            return_exceptions=True,
        )
    finally:
        await publisher.close()
    assert [o for o in outcomes if o is not None] == []
    records = await read_topic(kafka_settings, CUSTOMER_EVENTS, count=40)
    assert sorted(int(r.value) for r in records) == list(range(40))


async def test_joined_sends_report_an_unreachable_broker_to_every_caller() -> None:
    publisher = Publisher(KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1000), "t", send_timeout_s=1.0)
    outcomes = await asyncio.gather(
        *(publisher.publish_joined(CUSTOMER_EVENTS, [(b"k", b"v")]) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(outcome, BrokerUnavailable) for outcome in outcomes), outcomes
    await publisher.close()
