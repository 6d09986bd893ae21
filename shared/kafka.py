"""Kafka plumbing: safe client factories, a bounded publisher and the at-least-once consume loop.

Delivery is at-least-once everywhere; consumers are idempotent, so the *effect* is exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner, murmur2
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from shared.settings import KafkaSettings
from shared.tasks import stop_gracefully
from shared.topics import dead_letter

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
T = TypeVar("T")


class BrokerUnavailable(Exception):
    """The broker did not take the message in time; the caller should retry later."""


class Unprocessable(Exception):
    """A decoded message that no amount of retrying will process: dead-letter it."""


class RedoBatch(Exception):
    """A handler's batch must be handled again from its first offsets, through no fault of its
    records (e.g. it was computed on top of an earlier batch whose write failed)."""


# Errors that say "the world is down", not "this record is bad": never dead-letter on them.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncio.TimeoutError, KafkaError, OperationalError, InterfaceError,
    DisconnectionError, BrokerUnavailable, RedoBatch,
)


def producer_options(settings: KafkaSettings, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": client_id,
        "acks": settings.acks,
        "enable_idempotence": settings.enable_idempotence,
        "request_timeout_ms": settings.request_timeout_ms,
        "linger_ms": settings.linger_ms,
        "max_batch_size": settings.max_batch_size,
    }


def consumer_options(settings: KafkaSettings, group_id: str, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "group_id": group_id,
        "client_id": client_id,
        # Offsets are committed by the consume loop only after the work is persisted.
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": settings.isolation_level,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "session_timeout_ms": settings.session_timeout_ms,
        "rebalance_timeout_ms": settings.rebalance_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_records": settings.max_poll_records,
        "request_timeout_ms": max(settings.request_timeout_ms, settings.session_timeout_ms + 5_000),
    }


def make_producer(settings: KafkaSettings, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(**producer_options(settings, client_id))


def make_consumer(
    settings: KafkaSettings, topics: Sequence[str], group_id: str, client_id: str
) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(*topics, **consumer_options(settings, group_id, client_id))


async def ensure_topics(settings: KafkaSettings, names: Sequence[str]) -> list[str]:
    """Create the (prefixed) topics that do not exist yet; returns the names created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=settings.request_timeout_ms,
    )
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(settings.topic(n), settings.partitions, settings.replication_factor)
                for n in names
            ]
        )
        created = []
        for topic, code, message in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != TOPIC_ALREADY_EXISTS:
                raise KafkaError(f"cannot create topic {topic}: {message} (error {code})")
        return created
    finally:
        await admin.close()


@functools.lru_cache(maxsize=16_384)
def key_hash(key: bytes) -> int:
    """The default partitioner's hash of a key (murmur2, positive), remembered: in pure Python it
    costs ~7 µs a key, more per event than the rest of producing, and the same customers keep
    coming back. Each remembered key holds ~250 bytes, so the bound is also a memory bound
    (~4 MB): with 65,536 keys a stream of new customers grew ingest and actions by ~1 MB a
    minute for twenty minutes, which a soak could not tell from a leak."""
    return murmur2(key) & 0x7FFFFFFF


class Publisher:
    """A producer that starts lazily, so a service comes up while the broker is down, and
    whose every send is bounded in time: callers get BrokerUnavailable, never a hang."""

    def __init__(self, settings: KafkaSettings, client_id: str, send_timeout_s: float = 5.0):
        self._settings = settings
        self._client_id = client_id
        self._send_timeout_s = send_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._partitioner = DefaultPartitioner()
        # aiokafka queues one batch per partition; a second send_batch() waits for the first
        # to drain, with a timeout that shrinks on every retry (several concurrent requests
        # waiting for one partition time out). So only one of ours waits there at a time.
        self._partition_locks: dict[tuple[str, int], asyncio.Lock] = {}
        # publish_joined: callers waiting for the next joint send, by topic, and its task.
        self._joining: dict[str, list[tuple[Sequence[tuple[bytes | None, bytes]], asyncio.Future[None]]]] = {}
        self._joiner: asyncio.Task[None] | None = None

    @property
    def settings(self) -> KafkaSettings:
        return self._settings

    async def _started(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                producer = make_producer(self._settings, self._client_id)
                try:
                    await asyncio.wait_for(producer.start(), self._send_timeout_s)
                except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                    await producer.stop()
                    raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}") from exc
                self._producer = producer
        return self._producer

    async def publish_many(
        self, topic: str, messages: Sequence[tuple[bytes | None, bytes]], headers: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        """Send (key, value) pairs to a (base) topic; returns once the broker acknowledged all.

        Messages are grouped into one batch per partition (the producer's own partitioner picks
        the partition, so a key lands where `send()` would put it, and keeps its order): for a
        batch of events this costs a fraction of one `send()` per message."""
        producer = await self._started()
        name = self._settings.topic(topic)
        header_list = list(headers)
        try:
            async with asyncio.timeout(self._send_timeout_s):
                partitions = sorted(await producer.partitions_for(name))
                available = sorted(producer.client.cluster.available_partitions_for_topic(name) or partitions)
                by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
                for key, value in messages:
                    partition = (partitions[key_hash(key) % len(partitions)] if key is not None
                                 else self._partitioner(key, partitions, available))
                    by_partition.setdefault(partition, []).append((key, value))
                futures = []
                for partition, items in by_partition.items():
                    batch, in_batch = producer.create_batch(), 0
                    for key, value in items:
                        if batch.append(key=key, value=value, timestamp=None, headers=header_list) is not None:
                            in_batch += 1
                            continue
                        if in_batch:
                            futures.append(await self._send_batch(producer, batch, name, partition))
                            batch, in_batch = producer.create_batch(), 0
                        if batch.append(key=key, value=value, timestamp=None, headers=header_list) is not None:
                            in_batch += 1
                        else:  # larger than a whole batch: send() gives it a batch of its own
                            futures.append(await producer.send(
                                name, value=value, key=key, partition=partition, headers=header_list or None))
                    if in_batch:
                        futures.append(await self._send_batch(producer, batch, name, partition))
                await asyncio.gather(*futures)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"broker did not acknowledge: {type(exc).__name__}") from exc

    async def publish_joined(self, topic: str, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
        """`publish_many` for small sends from many concurrent callers (single events): what
        callers hand in while a send is in flight goes out together in the next one, so a burst of
        N one-event requests costs a few produce requests instead of N (in aiokafka's pure-Python
        protocol code each one cost more CPU than the rest of taking an event in). Nobody waits
        for company: with no send in flight, the messages leave on the next turn of the loop.
        Returns once the broker acknowledged this caller's messages; if the joint send fails,
        every caller in it gets BrokerUnavailable (the same at-least-once answer as a failed batch)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._joining.setdefault(topic, []).append((messages, future))
        if self._joiner is None or self._joiner.done():
            self._joiner = asyncio.create_task(self._send_joined(), name=f"publish:{self._client_id}")
        try:  # bounded like publish_many, however long the send in flight before ours takes
            async with asyncio.timeout(self._send_timeout_s):
                await future
        except TimeoutError as exc:
            raise BrokerUnavailable("broker did not acknowledge: TimeoutError") from exc

    async def _send_joined(self) -> None:
        while self._joining:
            rounds, self._joining = self._joining, {}
            for topic, waiting in rounds.items():
                try:
                    await self.publish_many(topic, [m for messages, _ in waiting for m in messages])
                except BrokerUnavailable as exc:
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(BrokerUnavailable(str(exc)))
                except BaseException as exc:
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(exc if isinstance(exc, Exception) else BrokerUnavailable("stopping"))
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for _, future in waiting:
                        if not future.done():
                            future.set_result(None)

    async def _send_batch(
        self, producer: AIOKafkaProducer, batch: Any, topic: str, partition: int
    ) -> asyncio.Future[Any]:
        lock = self._partition_locks.setdefault((topic, partition), asyncio.Lock())
        # Closed, the batch is complete: aiokafka neither lingers on it (it queues one batch per
        # partition, so an open batch waiting out linger_ms capped a partition at 1,000 / linger
        # sends a second) nor adds `send()`'s records to it.
        batch.close()
        async with lock:
            return await producer.send_batch(batch, topic, partition=partition)

    async def publish(self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]] = ()) -> None:
        await self.publish_many(topic, [(key, value)], headers)

    async def ping(self) -> bool:
        try:
            producer = await self._started()
            await asyncio.wait_for(producer.client.fetch_all_metadata(), self._send_timeout_s)
            return True
        except (BrokerUnavailable, KafkaError, OSError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        if self._joiner is not None and not self._joiner.done():  # the sends in flight finish first
            await asyncio.wait([self._joiner], timeout=self._send_timeout_s)
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


@dataclass
class Decoded(Generic[T]):
    record: ConsumerRecord
    value: T


@dataclass
class ConsumeStats:
    processed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    last_error: str | None = None


FollowUp = Callable[[], Awaitable[None]]
"""What a handler leaves to do after its transaction committed and before the batch's offsets
are committed: publishing what the batch produced (see ConsumeLoop)."""


class _Listener(ConsumerRebalanceListener):
    def __init__(self, assigned: Callable[[set[TopicPartition]], None] | None,
                 revoked: Callable[[set[TopicPartition]], None] | None,
                 settle: Callable[[], Awaitable[None]]) -> None:
        self._assigned, self._revoked, self._settle = assigned, revoked, settle

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._settle()  # the follow-up in flight commits its offsets while they are still ours
        if self._revoked:
            self._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if self._assigned:
            self._assigned(set(assigned))


@dataclass
class ConsumeLoop(Generic[T]):
    """fetch a batch -> decode -> handle -> commit offset+1, per partition.

    With `whole_poll`, the records of all partitions one fetch returned go to ONE `handle`
    call (each partition's records in order, partitions one after the other), and each
    partition's offset is committed after it returned: one transaction per poll instead of one
    per partition. If that call fails with a non-transient error, the partitions are handled
    one by one as without `whole_poll`.

    A handler may return a follow-up (FollowUp: publishing what its committed transaction
    produced). The loop then runs the follow-up and commits the poll's offsets in the
    background while it fetches and handles the next poll, so the broker round trips of
    publishing and committing no longer add to every poll's time. Follow-ups and offset commits
    still happen one after another in poll order (a poll's follow-up starts once the previous
    one's offsets are committed), at most one is in flight, and a failing follow-up rewinds
    every partition to its first uncommitted offset: the polls after it are handled again
    (their events are duplicates by then, which handlers are idempotent about). Before
    partitions are revoked and before the loop stops, the follow-up in flight finishes.

    `on_assigned` / `on_revoked` are called with the partitions the group gives to or takes
    from this member (a consumer's rebalance listener), before any record of an assigned
    partition is fetched and before a revoked one goes to another member; a consumer that is
    rebuilt after an error gets a fresh assignment, so `on_assigned` sees it too.

    Infrastructure errors (TRANSIENT_ERRORS: database or broker unreachable) retry the whole
    batch from the same offsets after a backoff, for as long as it takes: nothing is skipped.
    A record that cannot be decoded, that `check` or the handler says is Unprocessable, or that
    fails `max_attempts` times on its own with any other error, goes to `<topic>.dlq` with the
    reason (and the consumer group that gave up on it) in its headers, and the partition moves on.
    """

    settings: KafkaSettings
    topic: str
    group_id: str
    client_id: str
    decode: Callable[[bytes], T]
    handle: Callable[[list[Decoded[T]]], Awaitable[FollowUp | None]]
    publisher: Publisher
    on_batch: Callable[[TopicPartition, int, int | None], None] | None = None
    """Called after each committed batch: (partition, records, lag after it or None if unknown)."""
    on_dead_letter: Callable[[str, str], None] | None = None
    check: Callable[[T], None] | None = None
    """Raises Unprocessable for a decoded record that breaks an invariant of its producer (one
    written to the topic some other way): dead-lettered at once, never handed to `handle`."""
    on_assigned: Callable[[set[TopicPartition]], None] | None = None
    on_revoked: Callable[[set[TopicPartition]], None] | None = None
    settle: Callable[[], Awaitable[None]] | None = None
    """Waits for work `handle` started that outlives its follow-up (scoring's database writes
    run on a thread of their own): awaited wherever the follow-up in flight is, before
    partitions are revoked, before a rewind and before the loop stops."""
    whole_poll: bool = False
    retry_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_attempts: int | None = None
    """Tries of a record that keeps failing on its own; None: `settings.consumer_max_attempts`."""
    stats: ConsumeStats = field(default_factory=ConsumeStats)
    _consumer: AIOKafkaConsumer | None = None
    _task: asyncio.Task[None] | None = None
    _running: bool = False
    _follow_up: asyncio.Task[None] | None = None
    _uncommitted: list[dict[TopicPartition, int]] = field(default_factory=list)
    """First offset of each handled poll whose offsets are not committed yet, oldest first."""

    def __post_init__(self) -> None:
        if self.max_attempts is None:
            self.max_attempts = self.settings.consumer_max_attempts

    def start(self) -> asyncio.Task[None]:
        self._running = True
        self._task = asyncio.create_task(self._run(), name=f"consume:{self.topic}")
        return self._task

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Leave the group cleanly: offsets of finished work are already committed."""
        self._running = False
        if self._task is None:
            return
        await stop_gracefully(self._task, timeout_s=10)  # the batch in hand finishes and commits

    async def _run(self) -> None:
        backoff = self.retry_backoff_s
        while self._running:
            listening = self.on_assigned is not None or self.on_revoked is not None
            consumer = make_consumer(
                self.settings, [] if listening else [self.settings.topic(self.topic)], self.group_id, self.client_id
            )
            try:
                await consumer.start()
                if listening:
                    consumer.subscribe([self.settings.topic(self.topic)],
                                       listener=_Listener(self.on_assigned, self.on_revoked, self._follow_up_done))
            except (KafkaError, OSError) as exc:
                await consumer.stop()
                self.stats.last_error = f"cannot join group: {type(exc).__name__}"
                log.warning("consumer %s: %s; retrying", self.group_id, self.stats.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self._consumer = consumer
            try:
                await self._poll(consumer)
            except Exception as exc:  # a broker error while fetching: rebuild the consumer
                self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("consumer %s: fetch failed; rejoining", self.group_id)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                self._consumer = None
                await consumer.stop()

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        try:
            await self._poll_records(consumer)
        finally:  # stopping, or the consumer is rebuilt: the follow-up in flight finishes first
            await self._drop_follow_up()
            self._uncommitted.clear()  # a new consumer starts from the committed offsets

    async def _poll_records(self, consumer: AIOKafkaConsumer) -> None:
        backoff = self.retry_backoff_s
        while self._running:
            batches = {tp: records for tp, records in (await consumer.getmany(timeout_ms=200)).items() if records}
            if self.whole_poll and batches:
                try:
                    await self._process_poll(consumer, batches)
                    backoff = self.retry_backoff_s
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    log.exception("consumer %s: a poll of %d partitions failed; will retry from the first "
                                  "uncommitted offsets", self.group_id, len(batches))
                    await self._rewind(consumer)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                continue
            for tp, records in batches.items():
                try:
                    await self._process_partition(consumer, tp, records)
                    backoff = self.retry_backoff_s
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    log.exception("consumer %s: batch failed; will retry from offset %d",
                                  self.group_id, records[0].offset)
                    consumer.seek(tp, records[0].offset)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)

    async def _decoded(self, records: list[ConsumerRecord]) -> list[Decoded[T]]:
        good: list[Decoded[T]] = []
        for record in records:
            try:
                value = self.decode(record.value)
            except Exception as exc:  # anything the decoder rejects is poison
                await self._dead_letter(record, f"undecodable: {type(exc).__name__}: {exc}")
                continue
            if self.check is not None:
                try:
                    self.check(value)
                except Unprocessable as exc:
                    await self._dead_letter(record, f"unprocessable: {exc}")
                    continue
            good.append(Decoded(record, value))
        return good

    async def _handle_now(self, batch: list[Decoded[T]]) -> None:
        """handle, and its follow-up at once."""
        follow_up = await self.handle(batch)
        if follow_up is not None:
            await follow_up()

    async def _handle_batch(self, good: list[Decoded[T]]) -> None:
        if not good:
            return
        try:
            await self._handle_now(good)
        except TRANSIENT_ERRORS:
            raise  # infrastructure trouble: the whole batch is retried from the same offset
        except Exception:
            # Something in the batch cannot be processed: handle the records one by one so
            # good neighbours go through and only the culprit is dead-lettered.
            for item in good:
                await self._handle_alone(item)

    async def _process_partition(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[ConsumerRecord]
    ) -> None:
        good = await self._decoded(records)
        await self._handle_batch(good)
        await consumer.commit({tp: records[-1].offset + 1})
        self._done(consumer, tp, records, len(good))

    async def _process_poll(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        self._uncommitted.append({tp: records[0].offset for tp, records in batches.items()})
        decoded = {tp: await self._decoded(records) for tp, records in batches.items()}
        follow_up: FollowUp | None = None
        items = [item for good in decoded.values() for item in good]
        try:
            follow_up = await self.handle(items) if items else None
        except TRANSIENT_ERRORS:
            raise
        except Exception:
            log.warning("consumer %s: a batch of %d partitions failed; handling them one by one",
                        self.group_id, len(batches), exc_info=True)
            await self._previous_follow_up()  # what the one-by-one handling publishes comes after it
            for good in decoded.values():
                await self._handle_batch(good)
        await self._previous_follow_up()
        if follow_up is None:
            await self._commit_poll(consumer, batches, decoded)
        else:
            self._follow_up = asyncio.create_task(
                self._finish_poll(consumer, follow_up, batches, decoded), name=f"follow-up:{self.topic}")

    async def _finish_poll(
        self, consumer: AIOKafkaConsumer, follow_up: FollowUp,
        batches: dict[TopicPartition, list[ConsumerRecord]], decoded: dict[TopicPartition, list[Decoded[T]]],
    ) -> None:
        await follow_up()
        await self._commit_poll(consumer, batches, decoded)

    async def _commit_poll(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[ConsumerRecord]],
        decoded: dict[TopicPartition, list[Decoded[T]]],
    ) -> None:
        await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
        self._uncommitted.pop(0)  # polls commit in order: this one is the oldest uncommitted
        for tp, records in batches.items():
            self._done(consumer, tp, records, len(decoded[tp]))

    async def _previous_follow_up(self) -> None:
        """Wait for the previous poll's follow-up and offsets; its failure is raised here (the
        caller's poll then fails too, and both are rewound)."""
        task, self._follow_up = self._follow_up, None
        if task is not None:
            await task

    async def _follow_up_done(self) -> None:
        """Let the follow-up in flight finish, without taking its outcome: a failure stays for
        the loop to find (rebalance listener, stopping)."""
        if self._follow_up is not None and not self._follow_up.done():
            await asyncio.wait([self._follow_up])
        if self.settle is not None:
            await self.settle()

    async def _drop_follow_up(self) -> None:
        """Let the follow-up in flight finish and forget it. If it failed, its poll is redone:
        the caller rewinds, or a new consumer starts from the committed offsets."""
        task, self._follow_up = self._follow_up, None
        if task is not None:
            try:
                await task
            except Exception:
                log.warning("consumer %s: a poll's follow-up failed; redoing the poll", self.group_id, exc_info=True)
        if self.settle is not None:
            await self.settle()

    async def _rewind(self, consumer: AIOKafkaConsumer) -> None:
        """After a failed poll: every partition back to its first uncommitted offset (a
        follow-up still in flight finishes first; if it commits, its poll is not redone)."""
        await self._drop_follow_up()
        first: dict[TopicPartition, int] = {}
        for offsets in self._uncommitted:
            for tp, offset in offsets.items():
                first[tp] = min(offset, first.get(tp, offset))
        self._uncommitted.clear()
        assigned = consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:  # a partition revoked meanwhile restarts from its committed offset elsewhere
                consumer.seek(tp, offset)

    def _done(self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[ConsumerRecord], good: int) -> None:
        self.stats.processed += good
        self.stats.batches += 1
        if self.on_batch:
            highwater = consumer.highwater(tp)
            self.on_batch(tp, len(records), None if highwater is None else max(0, highwater - records[-1].offset - 1))

    async def _handle_alone(self, item: Decoded[T]) -> None:
        attempts = self.max_attempts or 1
        for attempt in range(1, attempts + 1):
            try:
                await self._handle_now([item])
                return
            except TRANSIENT_ERRORS:
                raise
            except Unprocessable as exc:
                await self._dead_letter(item.record, f"unprocessable: {exc}")
                return
            except Exception as exc:
                if attempt == attempts:
                    log.exception("consumer %s: giving up on one record", self.group_id)
                    await self._dead_letter(
                        item.record, f"unprocessable: failed {attempt} times: {type(exc).__name__}: {exc}"
                    )
                    return
                await asyncio.sleep(self.retry_backoff_s * attempt)

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        headers = [
            ("reason", reason[:1000].encode()),
            ("source-topic", record.topic.encode()),
            ("source-partition", str(record.partition).encode()),
            ("source-offset", str(record.offset).encode()),
            # customer-events has two consumers (scoring, actions): which one gave up on it
            ("consumer-group", self.group_id.encode()),
        ]
        await self.publisher.publish(dead_letter(self.topic), record.key or b"", record.value or b"", headers)
        self.stats.dead_lettered += 1
        log.warning("dead-lettered %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        if self.on_dead_letter:
            self.on_dead_letter(self.topic, reason.split(":", 1)[0])
