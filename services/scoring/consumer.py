"""Kafka transport for scoring: customer-events -> store, score -> churn-scores.

The consumer only joins its group once an active model exists: until then events wait
safely in Kafka (and /readyz says model: false). The registry is re-read every
`model_refresh_s`, so a newly trained model is picked up without a restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass

from aiokafka import TopicPartition
from sqlalchemy import Engine

from services.scoring import erasure, metrics, repository, service
from services.scoring.config import ScoringSettings
from services.scoring.drift import ScoreDrift
from services.scoring.features import HistoryEvent
from services.scoring.history_cache import BatchHistories, HistoryCache, Key
from services.scoring.model import Predictor
from shared.app import FreeMemoryReturner, freeze_heap
from shared.clock import Clock
from shared.db import session_scope
from shared.events import (
    CustomerRecord,
    ErasureRecord,
    EventRecord,
    ScoreRecord,
    broken_invariant,
    decode_customer_record,
    erasures_done,
    keyed_json,
)
from shared.kafka import ConsumeLoop, Decoded, FollowUp, Publisher, RedoBatch, Unprocessable
from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS, ERASURE_STATUS

log = logging.getLogger(__name__)


def decode(raw: bytes) -> CustomerRecord:
    """An event, or an erasure control record."""
    return decode_customer_record(raw)


def check(record: CustomerRecord) -> None:
    """An event ingest could not have published (shared.events.broken_invariant) is not scored:
    its features would be computed as of a future that has not happened."""
    if isinstance(record, EventRecord) and (problem := broken_invariant(record)):
        raise Unprocessable(problem)


class EarlierWriteFailed(RedoBatch):
    """The batch was computed on top of one whose write failed: it is redone after it."""


class HistoryMismatch(RedoBatch):
    """The database says other events were new than the history a batch was computed from."""


@dataclass
class _Planned:
    """A batch computed and not written yet (ScoringConsumer.plan)."""

    plan: service.BatchPlan
    records: list[EventRecord]  # what is stored: the batch without the erased customers' events
    histories: BatchHistories
    epoch: int  # ScoringConsumer._write_epoch when it was planned


class ScoringConsumer:
    """Consumes customer-events in batches (one poll of all assigned partitions each).

    A batch is computed (histories, features, scores: `plan`, on the batch thread) and written
    (events, features, scores, flags in one transaction: `write`, on the writer thread), and the
    next batch is computed while the previous one is written: the database's time no longer
    adds to the model's. What the next batch computes on must be what the database will hold:

    - It takes the histories of the batch being written from that batch (`_in_flight`), not
      from the database or the cache, which get them only once it committed.
    - An event is new when its customer's history lacks its id; the write checks that the
      database agrees (HistoryMismatch otherwise).
    - A write that fails fails every batch computed on top of it (`_write_epoch`;
      EarlierWriteFailed): the consume loop rewinds to the first uncommitted offsets, and the
      batches after a failed write are handled as before, computed and written in one
      transaction (`_careful`, until one succeeds), so a record the database refuses is found
      and dead-lettered.
    - A batch with an erasure record is handled in one transaction after every write before it.
    - Without a history cache, every batch is handled in one transaction.
    """

    def __init__(self, settings: ScoringSettings, engine: Engine, publisher: Publisher, clock: Clock) -> None:
        self.settings = settings
        self.engine = engine
        # `plan` only reads, each read on its own: no transaction to begin and end per batch
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.publisher = publisher
        self.clock = clock
        self.bands = service.Bands(high=settings.high_threshold, medium=settings.medium_threshold)
        self.predictor: Predictor | None = None
        self.drift = ScoreDrift(())
        metrics.watch_score_drift(weakref.ref(self))
        self.loop: ConsumeLoop[CustomerRecord] | None = None
        self.cache = HistoryCache(settings.history_cache_events) if settings.history_cache_events > 0 else None
        # Batches are computed one after another on ONE worker thread, and written on another:
        # glibc gives each thread that allocates its own malloc arena, and batches spread over
        # the default executor's threads left several arenas' worth of freed batch memory resident.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring-batch")
        # One writer: writes commit in batch order.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring-write")
        self._return_free_memory = FreeMemoryReturner()  # called on the writer thread after a batch
        self._write_epoch = 0  # bumped (on the writer thread) by every failed write
        self._careful = self.cache is None
        self._in_flight: tuple[int, Mapping[Key, tuple[int, list[HistoryEvent]]], Future[list[str]]] | None = None
        self._last_write: asyncio.Future[list[str]] | None = None
        self._refresher: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the active model (if any), start consuming if there is one, and keep
        watching the registry."""
        try:
            await self.refresh_model()
        except Exception:
            log.exception("cannot read the model registry yet; will retry")
        self._refresher = asyncio.create_task(self._refresh_forever(), name="scoring:model-refresh")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except asyncio.CancelledError:
                pass
            self._refresher = None
        if self.loop is not None:
            await self.loop.stop()
        await self._settle()
        self._worker.shutdown(wait=False)
        self._writer.shutdown(wait=False)

    @property
    def model_loaded(self) -> bool:
        return self.predictor is not None

    @property
    def consuming(self) -> bool:
        return self.loop is not None and self.loop.alive

    # -- model --------------------------------------------------------------------------

    async def refresh_model(self) -> None:
        version = await asyncio.to_thread(self._active_version)
        if version is not None and (self.predictor is None or version != self.predictor.version):
            predictor = await asyncio.to_thread(self._load_predictor)
            if predictor is not None:
                previous = self.predictor.version if self.predictor else None
                self.predictor = predictor
                metrics.set_active_model(predictor.version, predictor.roc_auc, predictor.trained_at)
                self.drift = ScoreDrift(predictor.reference_scores)
                log.info("scoring with model %s (was %s)", predictor.version, previous)
                # A model load is when the long-lived heap changes: refrozen, so full collections
                # do not walk it. Measured on a 20,000-event backlog (PostgreSQL): they took 25
                # of 110 µs CPU per event, 4 after freezing.
                freeze_heap()
        elif version is None and self.predictor is not None:
            log.warning("no active model in the registry; keeping %s", self.predictor.version)
        if self.predictor is not None and self.loop is None:
            self._start_consuming()

    def _active_version(self) -> str | None:
        with session_scope(self.engine) as session:
            return service.active_version(session)

    def _load_predictor(self) -> Predictor | None:
        with session_scope(self.engine) as session:
            return service.load_active_predictor(session)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_refresh_s)
            try:
                await self.refresh_model()
            except Exception:
                log.exception("model refresh failed; keeping the current model")

    # -- consuming ----------------------------------------------------------------------

    def _start_consuming(self) -> None:
        self.loop = ConsumeLoop(
            settings=self.settings.kafka.model_copy(update={"max_poll_records": self.settings.max_poll_records}),
            topic=CUSTOMER_EVENTS, group_id=self.settings.group_id,
            client_id=self.settings.client_id, decode=decode, check=check, handle=self.handle,
            publisher=self.publisher, on_dead_letter=metrics.dead_lettered,
            on_batch=metrics.CONSUMER.on_batch, whole_poll=True,
            on_assigned=self._assigned, on_revoked=self._revoked, settle=self._settle,
        )
        self.loop.start()
        log.info("consuming %s as group %s", CUSTOMER_EVENTS, self.settings.group_id)

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        self._in_flight = None  # written by now (the loop settles before a rebalance)
        if self.cache is not None:
            self.cache.partitions_assigned(tp.partition for tp in partitions)
            metrics.set_history_cache(self.cache)

    def _revoked(self, partitions: set[TopicPartition]) -> None:
        self._in_flight = None
        if self.cache is not None:
            self.cache.partitions_revoked(tp.partition for tp in partitions)
            metrics.set_history_cache(self.cache)

    async def handle(self, batch: list[Decoded[CustomerRecord]]) -> FollowUp:
        """Compute the batch (all partitions of a poll) on the batch thread and hand it to the
        writer thread at once. The follow-up, which the consume loop runs (and then commits the
        offsets) while it handles the next poll, waits for the write and publishes the scores."""
        predictor = self.predictor
        assert predictor is not None, "the consumer starts only once a model is loaded"
        records = [item.value for item in batch]
        partitions = [item.record.partition for item in batch]
        loop = asyncio.get_running_loop()
        epoch = self._write_epoch
        if self._careful or any(isinstance(r, ErasureRecord) for r in records):
            self._in_flight = None
            outcome, flagged, erased = await loop.run_in_executor(
                self._writer, self._process_in_turn, records, partitions, predictor, epoch)
            self._count(outcome, flagged)
            return functools.partial(self._publish, outcome.scores, erased)
        in_flight, writing = (self._in_flight[1], self._in_flight[2]) if (
            self._in_flight is not None and self._in_flight[0] == epoch) else (None, None)
        planned = await loop.run_in_executor(
            self._worker, self.plan, records, partitions, predictor, in_flight, epoch, writing)
        write = self._writer.submit(self.write, planned)
        self._in_flight = (epoch, planned.histories.pending, write)
        written = asyncio.wrap_future(write)
        written.add_done_callback(lambda f: f.cancelled() or f.exception())  # the follow-up may never run
        self._last_write = written
        return functools.partial(self._publish_written, written, planned.plan.outcome)

    async def _settle(self) -> None:
        """Every write handed to the writer has finished (committed or not)."""
        if self._last_write is not None and not self._last_write.done():
            await asyncio.wait([self._last_write])

    def _count(self, outcome: service.BatchOutcome, flagged: list[str]) -> None:
        for reason in flagged:
            metrics.EVENTS_FLAGGED.labels(reason).inc()
        for kind, count in outcome.events_by_type.items():
            metrics.EVENTS_PROCESSED.labels(kind).inc(count)
        metrics.EVENTS_DUPLICATE.inc(outcome.duplicates)
        metrics.EVENTS_SUPPRESSED.inc(outcome.suppressed)
        metrics.SCORING_LATENCY.observe(outcome.scoring_seconds)

    async def _publish_written(self, written: asyncio.Future[list[str]], outcome: service.BatchOutcome) -> None:
        self._count(outcome, await written)
        await self._publish(outcome.scores, [])

    async def _publish(self, scores: list[ScoreRecord], erased: list[ErasureRecord]) -> None:
        await self.publisher.publish_many(CHURN_SCORES, keyed_json(scores))
        for score in scores:
            metrics.SCORE.observe(score.probability)
        for band, count in Counter(score.band for score in scores).items():
            metrics.SCORES_PUBLISHED.labels(band).inc(count)
        self.drift.observe(score.probability for score in scores)
        if erased:  # after the commit: ingest marks scoring's part of each erasure done
            await self.publisher.publish_many(ERASURE_STATUS, erasures_done(erased, "scoring", self.clock.now()))
            metrics.ERASURES.inc(len(erased))

    def plan(
        self, records: list[CustomerRecord], partitions: list[int], predictor: Predictor,
        in_flight: Mapping[Key, tuple[int, list[HistoryEvent]]] | None, epoch: int,
        writing: Future[list[str]] | None = None,
    ) -> _Planned:
        """Compute a batch without an erasure record, reading what the database holds (history
        marks, tombstones, the histories neither `in_flight` nor the cache has) and writing
        nothing. `in_flight`: the histories of the batch being written (`writing`)."""
        now = self.clock.now()
        events = [r for r in records if isinstance(r, EventRecord)]
        assert len(events) == len(records), "a batch with an erasure record is processed in one transaction"
        with session_scope(self._reader) as session:
            if self.cache is not None:
                moved = self.cache.check_marks(repository.history_marks(session, {r.tenant_id for r in events}))
                if moved and in_flight and any(key[0] in moved for key in in_flight):
                    # A tenant's stored history changed elsewhere (import, purge): neither the batch
                    # in flight nor the database alone knows its customers' histories now. Once
                    # that batch is written, the database does.
                    if writing is not None:
                        wait_for([writing])
                    in_flight = {key: value for key, value in in_flight.items() if key[0] not in moved}
            histories = BatchHistories(self.cache, partitions, in_flight)
            kept, suppressed = erasure.drop_erased(session, events)
            if len(kept) < len(events):
                kept_ids = {id(r) for r in kept}
                partitions = [p for r, p in zip(events, partitions, strict=True) if id(r) in kept_ids]
            plan = service.plan_batch(session, kept, predictor, self.bands, now,
                                      histories=histories, partitions=partitions)
        plan.outcome.suppressed = suppressed
        return _Planned(plan=plan, records=kept, histories=histories, epoch=epoch)

    def write(self, planned: _Planned) -> list[str]:
        """Store a planned batch in one transaction, then hand its histories to the cache.
        Returns the reasons of the flags newly recorded."""
        if planned.epoch != self._write_epoch:
            raise EarlierWriteFailed("the batch before this one was not stored; this one is redone after it")
        plan = planned.plan
        try:
            with session_scope(self.engine) as session:
                inserted = repository.insert_events(session, plan.rows)
                if inserted != plan.new:
                    raise HistoryMismatch(
                        f"{len(inserted ^ plan.new)} of {len(plan.rows)} events were new to the history the batch "
                        "was computed from but not to the database, or the other way round; redoing it")
                service.write_batch(session, plan)
                flagged = service.flag_events(session, planned.records, plan.as_of)
        except BaseException as exc:
            self._write_epoch += 1
            self._careful = True
            if isinstance(exc, HistoryMismatch):
                log.warning("%s", exc)
                if self.cache is not None:
                    self.cache.clear()
            raise
        planned.histories.commit()
        if self.cache is not None:
            metrics.set_history_cache(self.cache)
        self._return_free_memory()
        return flagged

    def _process_in_turn(
        self, records: list[CustomerRecord], partitions: list[int], predictor: Predictor, epoch: int
    ) -> tuple[service.BatchOutcome, list[str], list[ErasureRecord]]:
        """`process`, on the writer thread: after every write handed to it before."""
        if epoch != self._write_epoch:
            raise EarlierWriteFailed("the batch before this one was not stored; this one is redone after it")
        outcome = self.process(records, partitions, predictor)
        self._careful = self.cache is None
        self._return_free_memory()
        return outcome

    def process(
        self, records: list[CustomerRecord], partitions: list[int], predictor: Predictor
    ) -> tuple[service.BatchOutcome, list[str], list[ErasureRecord]]:
        """Events, features, scores, the flags of unusable data and erasures: one transaction.
        `partitions[i]` is the partition records[i] came from (its customer's partition).

        Records are handled in order: the events before an erasure record are stored and then
        erased with the rest of the customer's data; those after it are suppressed (tombstone).
        Scores of a customer erased later in the same batch are not published. The histories
        the batch computed go into the history cache once the transaction committed."""
        now = self.clock.now()
        total = service.BatchOutcome(scores=[])
        flagged: list[str] = []
        erased: list[ErasureRecord] = []
        with session_scope(self.engine) as session:
            if self.cache is not None:
                tenants = {r.tenant_id for r in records}
                self.cache.check_marks(repository.history_marks(session, tenants))
            histories = BatchHistories(self.cache, partitions)  # leased after the marks' check
            run: list[EventRecord] = []
            run_partitions: list[int] = []

            def flush() -> None:
                if not run:
                    return
                kept, suppressed = erasure.drop_erased(session, run)
                total.suppressed += suppressed
                if kept:
                    kept_ids = {id(r) for r in kept}
                    kept_partitions = run_partitions if len(kept) == len(run) else [
                        p for r, p in zip(run, run_partitions, strict=True) if id(r) in kept_ids]
                    outcome = service.process_batch(session, kept, predictor, self.bands, now,
                                                    histories=histories, partitions=kept_partitions)
                    total.scores.extend(outcome.scores)
                    total.events_by_type.update(outcome.events_by_type)
                    total.duplicates += outcome.duplicates
                    total.scoring_seconds += outcome.scoring_seconds
                    flagged.extend(service.flag_events(session, kept, now))
                run.clear()
                run_partitions.clear()

            for record, partition in zip(records, partitions, strict=True):
                if isinstance(record, ErasureRecord):
                    flush()
                    erasure.erase(session, record, now)
                    histories.drop((record.tenant_id, record.customer_id))
                    erased.append(record)
                else:
                    run.append(record)
                    run_partitions.append(partition)
            flush()
        histories.commit()  # only now: the transaction committed
        if self.cache is not None:
            metrics.set_history_cache(self.cache)
        if erased:
            gone = {(r.tenant_id, r.customer_id) for r in erased}
            total.scores = [s for s in total.scores if (s.tenant_id, s.customer_id) not in gone]
        return total, flagged, erased
