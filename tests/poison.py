"""Deliberately poisoned records, and a check of what the dead-letter topics hold.

Used by the service-level poison tests (tests/scoring/test_poison.py, tests/actions/test_poison.py)
and meant for the chaos test: write `poisoned_events(...)` / `poisoned_scores(...)` straight to
their topics (`write_poisoned`), let the services run, then `check_dead_letters(records, poisoned,
...)` on everything read from the `.dlq` topics: they must hold only these records, each with a
reason naming its problem.

Three kinds per topic:
- undecodable: bytes the contract refuses -> dead-lettered at once, reason `undecodable: ...`;
- schema-valid but breaking an invariant of its producer (a record that did not come through
  ingest / scoring) -> the consumer's check raises Unprocessable, dead-lettered at once;
- schema-valid, storable by nobody: a NUL character in the customer id, which PostgreSQL refuses
  in every text column -> fails every time, tried `consumer_max_attempts` times on its own, then
  dead-lettered with `unprocessable: failed N times: DataError: ...`. SQLite stores it, so this
  one is poison only on PostgreSQL (`postgres=True`).

The poisoned records carry the key of a real customer, so written before that customer's good
records they sit ahead of them on the same partition. Dead letters do not carry the source
record's headers: they are matched to the poisoned records by topic, key and value.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from aiokafka import ConsumerRecord

from shared.events import EventRecord, ScoreRecord, new_id, parse_event, partition_key
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS, dead_letter

POISON_HEADER = "churnguard-poison"  # on the source record only: which kind it is


@dataclass(frozen=True)
class Poisoned:
    name: str
    topic: str  # the base topic it is written to
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    reason: str  # a fragment the dead letter's reason must contain
    retried: bool = False  # dead-lettered only after `consumer_max_attempts` tries

    @property
    def prefix(self) -> str:
        """How the dead letter's reason starts (`max_attempts` filled in for the retried kind)."""
        if self.retried:
            return "unprocessable: failed {max_attempts} times: "
        return "undecodable: " if self.name.startswith("undecodable") else "unprocessable: "


def _poisoned(name: str, topic: str, key: bytes, value: bytes, reason: str, retried: bool = False) -> Poisoned:
    return Poisoned(name, topic, key, value, ((POISON_HEADER, name.encode()),), reason, retried)


def poisoned_events(
    tenant: str, customer: str = "c-poison", *, postgres: bool, now: datetime | None = None
) -> list[Poisoned]:
    """Poison for `customer-events`, keyed like `customer`'s own events (same partition)."""
    now = now or datetime.now(timezone.utc)
    key = partition_key(tenant, customer)

    def event(customer_id: str, occurred_at: datetime) -> dict[str, object]:
        return {"id": f"poison-{new_id()}", "type": "session.recorded", "customer_id": customer_id,
                "occurred_at": occurred_at.isoformat(), "source": "poison", "data": {"duration_seconds": 30}}

    # Received three days ago, occurred one day ago: two days after it was received. In the past
    # for every clock, so it decodes; ingest could never have published it.
    received = now - timedelta(days=3)
    future = EventRecord(tenant_id=tenant, received_at=received,
                         event=parse_event(event(customer, now - timedelta(days=1)), now=now))
    records = [
        _poisoned("undecodable-bytes", CUSTOMER_EVENTS, key, b"\xff\xfe not an event record {",
                  "Invalid JSON"),
        _poisoned("occurred-after-received", CUSTOMER_EVENTS, key, future.model_dump_json().encode(),
                  "h after received_at"),
    ]
    if postgres:
        nul = EventRecord(tenant_id=tenant, received_at=now,
                          event=parse_event(event(f"{customer}\x00", now - timedelta(hours=1)), now=now))
        records.append(_poisoned("nul-in-customer-id", CUSTOMER_EVENTS, key, nul.model_dump_json().encode(),
                                 "NUL (0x00)", retried=True))
    return records


def poisoned_scores(
    tenant: str, customer: str = "c-poison", *, postgres: bool, now: datetime | None = None
) -> list[Poisoned]:
    """Poison for `churn-scores`, keyed like `customer`'s own scores (same partition)."""
    now = now or datetime.now(timezone.utc)
    key = partition_key(tenant, customer)

    def score(customer_id: str, model_version: str = "m-poison") -> bytes:
        return ScoreRecord(score_id=f"poison-{new_id()}", tenant_id=tenant, customer_id=customer_id,
                           probability=0.95, band="high", model_version=model_version,
                           scored_at=now).model_dump_json().encode()

    valid = json.loads(score(customer))
    records = [
        _poisoned("undecodable-probability", CHURN_SCORES, key, json.dumps(valid | {"probability": 1.7}).encode(),
                  "probability"),
        _poisoned("model-version-too-long", CHURN_SCORES, key, score(customer, "m-" + "x" * 298),
                  "model_version is 300 characters"),
    ]
    if postgres:
        records.append(_poisoned("nul-in-customer-id", CHURN_SCORES, key, score(f"{customer}\x00"),
                                 "NUL (0x00)", retried=True))
    return records


async def write_poisoned(settings: KafkaSettings, records: Sequence[Poisoned]) -> None:
    """Straight to their topics, one after the other (same key: same partition, this order)."""
    publisher = Publisher(settings, "poison-writer")
    try:
        for record in records:
            await publisher.publish(record.topic, record.key, record.value, record.headers)
    finally:
        await publisher.close()


def check_dead_letters(
    records: Sequence[ConsumerRecord],
    poisoned: Sequence[Poisoned],
    *,
    max_attempts: int,
    groups: Mapping[str, Collection[str]] | None = None,
    exactly_once: bool = True,
) -> dict[tuple[str, str], list[ConsumerRecord]]:
    """Assert that the dead letters `records` (read from `<topic>.dlq` topics) hold only the
    `poisoned` records, each on the dead-letter topic of the topic it was written to, naming its
    source topic, with a reason that names its problem (the retried kind: after `max_attempts`).

    `groups` (base topic -> the consumer groups reading it, e.g. customer-events -> scoring's and
    actions' groups): every poisoned record must have been dead-lettered by each of them and by
    no other group; without it, each poisoned record must be there at all. `exactly_once=False`
    allows repeats (a consumer killed between dead-lettering and committing does it again).
    Returns the dead letters by (base topic, poisoned record name). Raises AssertionError listing
    every problem.
    """
    problems: list[str] = []
    found: dict[tuple[str, str], list[ConsumerRecord]] = {(p.topic, p.name): [] for p in poisoned}
    by_content = {(p.topic, p.key, p.value): p for p in poisoned}
    for record in records:
        headers = {k: v.decode(errors="replace") for k, v in record.headers or ()}
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        match = next((p for (topic, key, value), p in by_content.items()
                      if record.topic.endswith(dead_letter(topic)) and record.key == key and record.value == value), None)
        if match is None:
            problems.append(f"{where}: not a deliberately poisoned record: key {record.key!r}, "
                            f"value {(record.value or b'')[:120]!r}, reason {headers.get('reason')!r}")
            continue
        found[(match.topic, match.name)].append(record)
        reason = headers.get("reason", "")
        prefix = match.prefix.format(max_attempts=max_attempts)
        if not reason.startswith(prefix) or match.reason not in reason:
            problems.append(f"{where} ({match.name}): reason {reason[:300]!r} should start with {prefix!r} "
                            f"and name {match.reason!r}")
        if not headers.get("source-topic", "").endswith(match.topic):
            problems.append(f"{where} ({match.name}): source-topic {headers.get('source-topic')!r}, "
                            f"written to {match.topic}")
        if groups is not None and headers.get("consumer-group") not in groups.get(match.topic, ()):
            problems.append(f"{where} ({match.name}): dead-lettered by {headers.get('consumer-group')!r}, "
                            f"which does not read {match.topic} here")
    for p in poisoned:
        letters = found[(p.topic, p.name)]
        wanted = sorted(groups.get(p.topic, ())) if groups is not None else [None]
        for group in wanted:
            mine = [r for r in letters if group is None or dict(r.headers or ()).get("consumer-group") == group.encode()]
            if not mine:
                problems.append(f"{p.name} on {p.topic}: no dead letter" + (f" from group {group}" if group else ""))
            elif exactly_once and len(mine) > 1:
                problems.append(f"{p.name} on {p.topic}: {len(mine)} dead letters"
                                + (f" from group {group}" if group else "") + ", expected one")
    if problems:
        raise AssertionError("dead-letter topics do not hold exactly the poisoned records:\n- " + "\n- ".join(problems))
    return found
