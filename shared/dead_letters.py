"""Reading and replaying dead-letter topics (`<topic>.dlq`): what `churnguard dlq` runs.

Replay progress is kept as the committed offset of the group `churnguard-dlq-replay` on each
dead-letter partition, so a replay re-publishes only what no earlier replay did. Re-published
records go back to their original topic; consumers are idempotent, so a replay is safe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import dead_letter

REPLAY_GROUP = "churnguard-dlq-replay"


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    reason: str
    source: str
    key: bytes
    value: bytes
    replayed: bool
    group: str | None = None
    """The consumer group that gave up on it (customer-events has two: scoring's and actions')."""

    @classmethod
    def of(cls, record: ConsumerRecord, replayed_up_to: int) -> DeadLetter:
        headers = {k: v.decode(errors="replace") for k, v in record.headers or ()}
        source = f"{headers.get('source-topic', '?')}[{headers.get('source-partition', '?')}]@{headers.get('source-offset', '?')}"
        return cls(record.partition, record.offset, headers.get("reason", "(no reason recorded)"), source,
                   record.key or b"", record.value or b"", record.offset < replayed_up_to,
                   headers.get("consumer-group"))


async def _dead_letter_records(
    settings: KafkaSettings, topic: str
) -> AsyncIterator[tuple[AIOKafkaConsumer, ConsumerRecord, int]]:
    """Every record now on `<topic>.dlq`, with how far replays got on its partition."""
    name = settings.topic(dead_letter(topic))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=REPLAY_GROUP,
        enable_auto_commit=False, fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - first contact with the topic
            partitions = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
        consumer.assign(partitions)  # assigned, not subscribed: no group join, offsets still stored
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            replayed_up_to = await consumer.committed(tp) or 0
            consumer.seek(tp, 0)
            while await consumer.position(tp) < ends[tp]:
                for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    if record.offset < ends[tp]:
                        yield consumer, record, replayed_up_to
    finally:
        await consumer.stop()


async def list_dead_letters(settings: KafkaSettings, topic: str) -> list[DeadLetter]:
    return [DeadLetter.of(record, done) async for _c, record, done in _dead_letter_records(settings, topic)]


async def replay_dead_letters(settings: KafkaSettings, topic: str) -> int:
    """Re-publish every dead letter of `topic` not replayed before; returns how many."""
    publisher = Publisher(settings, client_id="dlq-replay")
    replayed = 0
    try:
        async for consumer, record, done in _dead_letter_records(settings, topic):
            if record.offset < done:
                continue
            await publisher.publish(
                topic, record.key or b"", record.value or b"",
                [("replayed-from", f"{record.topic}[{record.partition}]@{record.offset}".encode())],
            )
            await consumer.commit({TopicPartition(record.topic, record.partition): record.offset + 1})
            replayed += 1
    finally:
        await publisher.close()
    return replayed
