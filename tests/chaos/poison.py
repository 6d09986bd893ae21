"""Poisoned messages the fault-injection run writes straight to the topics, and the check that the
dead-letter topics hold exactly those."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS


@dataclass(frozen=True)
class PoisonedRecord:
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    expected_reason: str  # how the dead letter's `reason` header must begin


def poisoned_records(tenant_id: str) -> list[PoisonedRecord]:
    key = f"{tenant_id}/chaos-poison".encode()
    return [
        PoisonedRecord(CUSTOMER_EVENTS, key, b"\x00\x01 not an event", (), "undecodable"),
        PoisonedRecord(CHURN_SCORES, key, b'{"truncated": ', (), "undecodable"),
    ]


def compare_dead_letters(expected: Sequence[PoisonedRecord], dead: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(dead letters that were not deliberate or lack the expected reason, deliberate ones missing)."""
    wanted = {(r.value, r.expected_reason) for r in expected}
    found: set[tuple[bytes, str]] = set()
    unexpected: list[str] = []
    for record in dead:
        reason = dict(record.headers).get("reason", b"").decode(errors="replace")
        match = next((w for w in wanted if w[0] == record.value and reason.startswith(w[1])), None)
        if match is None:
            unexpected.append(f"{record.topic}@{record.offset}: {reason[:160]} {record.value[:80]!r}")
        else:
            found.add(match)
    missing = [f"{value[:40]!r} ({reason})" for value, reason in wanted - found]
    return unexpected, missing
