"""Customer histories kept in memory by the consumer, so a batch does not reload them.

What is cached is exactly what `scoring_events` holds for a customer (the durable history and
the dedup stay in the database), sorted by `HistoryEvent.sort_key`, so features computed from
an entry are `compute_features(stored history, as_of)` (services.scoring.features: defined
once; tests/scoring/test_history_cache.py proves the equality over random histories, arrival
orders and batch splits).

An entry is only trusted while nobody else can have written that customer's history:

- Events of a customer arrive on one partition (key = tenant/customer), and only the group
  member that owns the partition writes them. Entries are tagged with their partition and
  dropped when it is assigned or revoked (`partitions_assigned` / `partitions_revoked`, called
  from the consumer's rebalance listener), and a batch that was in flight across such a change
  does not write its results into the cache (`Lease`: generations per partition).
- Erasure records arrive on the same partition: the consumer drops the entry (`drop`).
- Writers outside the consume path (history import, the retention purge) bump a per-tenant
  mark in `scoring_history_marks` in their own transaction; a batch reads the marks of its
  tenants first and drops the entries of a tenant whose mark moved (`check_marks`), and the
  histories of batches in flight then are not stored.
- Updates are applied only after the batch's transaction committed (`apply`): a rolled-back
  batch leaves the cache as it was.

Memory is bounded by the total number of cached events (`max_events`), least recently used
customers first out; a history larger than the whole bound is simply not cached. All methods
are thread-safe (batches run in a worker thread, rebalance callbacks on the event loop).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.scoring.features import HistoryEvent

Key = tuple[str, str]  # (tenant_id, customer_id)


@dataclass(frozen=True)
class Lease:
    """The partition generations a batch started under; `apply` refuses results of a batch
    whose partitions changed hands meanwhile."""

    epoch: int
    generations: Mapping[int, int]


@dataclass
class _Entry:
    partition: int
    events: list[HistoryEvent]  # sorted by HistoryEvent.sort_key, never mutated in place


class HistoryCache:
    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._size = 0  # events in all entries
        self._generations: dict[int, int] = {}
        self._epoch = 0  # bumped by clear()
        self._marks: dict[str, int | None] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # -- reading -------------------------------------------------------------------------

    def lease(self, partitions: Iterable[int]) -> Lease:
        with self._lock:
            return Lease(self._epoch, {p: self._generations.get(p, 0) for p in set(partitions)})

    def get(self, key: Key, partition: int) -> list[HistoryEvent] | None:
        """The cached sorted history (do not mutate it), or None. An entry from another
        partition than the one the customer's event came on is not trusted."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.partition != partition:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.events

    def note_hit(self) -> None:
        """A history found in memory beside the cache (the batch in flight): counted as a hit."""
        with self._lock:
            self.hits += 1

    def check_marks(self, marks: Mapping[str, int | None]) -> set[str]:
        """Drop the entries of every tenant whose history mark (services.scoring.repository.
        history_marks) differs from the one seen before: its history was changed by someone
        other than this consumer. Returns those tenants; histories a batch computed before
        that are not stored any more (`apply` refuses leases taken before)."""
        with self._lock:
            changed = {t for t, mark in marks.items() if t not in self._marks or self._marks[t] != mark}
            if not changed:
                return set()
            moved = {t for t in changed if t in self._marks}
            for tenant in changed:
                self._marks[tenant] = marks[tenant]
            if moved:
                self._epoch += 1
            for key in [k for k in self._entries if k[0] in changed]:
                self._remove(key)
            return moved

    # -- writing -------------------------------------------------------------------------

    def apply(self, lease: Lease, updates: Mapping[Key, tuple[int, list[HistoryEvent]]]) -> bool:
        """Store the histories a committed batch computed, (partition, sorted events) per
        customer. Nothing is stored if any partition of the lease changed hands since."""
        with self._lock:
            if lease.epoch != self._epoch or any(
                self._generations.get(p, 0) != g for p, g in lease.generations.items()
            ):
                return False
            for key, (partition, events) in updates.items():
                if key in self._entries:
                    self._remove(key)
                if len(events) > self.max_events:
                    continue
                self._entries[key] = _Entry(partition, events)
                self._size += len(events)
            while self._size > self.max_events and self._entries:
                self._remove(next(iter(self._entries)))
            return True

    def drop(self, key: Key) -> None:
        with self._lock:
            if key in self._entries:
                self._remove(key)

    def partitions_assigned(self, partitions: Iterable[int]) -> None:
        self._forget(partitions)

    def partitions_revoked(self, partitions: Iterable[int]) -> None:
        self._forget(partitions)

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.clear()
            self._size = 0
            self._marks.clear()

    def _forget(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        with self._lock:
            for partition in gone:
                self._generations[partition] = self._generations.get(partition, 0) + 1
            for key in [k for k, e in self._entries.items() if e.partition in gone]:
                self._remove(key)

    def _remove(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._size -= len(entry.events)

    # -- introspection ---------------------------------------------------------------------

    def take_lookups(self) -> tuple[int, int]:
        """(hits, misses) since the last call."""
        with self._lock:
            counts = (self.hits, self.misses)
            self.hits = self.misses = 0
            return counts

    @property
    def customers(self) -> int:
        return len(self._entries)

    @property
    def events(self) -> int:
        return self._size


class BatchHistories:
    """The histories one transaction works with: what it computed so far (pending), else those
    of the batch written before it whose transaction may not have committed yet (`in_flight`:
    its pending histories), else the cache (if any). `commit()` after the transaction
    committed hands the pending histories to the cache; without a call they are forgotten
    (the transaction rolled back)."""

    def __init__(
        self, cache: HistoryCache | None = None, partitions: Iterable[int] = (),
        in_flight: Mapping[Key, tuple[int, list[HistoryEvent]]] | None = None,
    ) -> None:
        self.cache = cache
        self.lease = cache.lease(partitions) if cache is not None else None
        self.in_flight = in_flight or {}
        self.pending: dict[Key, tuple[int, list[HistoryEvent]]] = {}

    def get(self, key: Key, partition: int) -> list[HistoryEvent] | None:
        pending = self.pending.get(key)
        if pending is None and (pending := self.in_flight.get(key)) is not None and self.cache is not None:
            self.cache.note_hit()
        if pending is not None:
            return pending[1] if pending[0] == partition else None
        return self.cache.get(key, partition) if self.cache is not None else None

    def put(self, key: Key, partition: int, events: list[HistoryEvent]) -> None:
        self.pending[key] = (partition, events)

    def drop(self, key: Key) -> None:
        self.pending.pop(key, None)
        if self.cache is not None:
            self.cache.drop(key)

    def commit(self) -> bool:
        if self.cache is None or self.lease is None:
            return False
        return self.cache.apply(self.lease, self.pending)
