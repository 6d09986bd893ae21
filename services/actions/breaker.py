"""Per-endpoint circuit breakers and concurrency slots for the webhook worker.

Why not a library: pybreaker, aiobreaker and purgatory all read the wall clock themselves
(time.time / datetime.now), so tests could not move an open circuit to half-open without
sleeping; and they wrap a call (raising when open), while the worker needs to ask before
claiming a delivery "may this endpoint take one more attempt now?" so that deliveries of an
open or saturated endpoint stay in the outbox instead of occupying the worker.

State lives in the worker process (each replica keeps its own view of each endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from shared.clock import Clock

State = Literal["closed", "open", "half_open"]


@dataclass
class _Endpoint:
    in_flight: int = 0
    consecutive_failures: int = 0
    opened_at: datetime | None = None


class EndpointGuard:
    """Closed: up to `concurrency` attempts at once. After `failure_threshold` consecutive
    failures the circuit opens: no attempts until `cooldown` has passed on the clock; then
    half-open: one probe at a time; its success closes the circuit, its failure re-opens it."""

    def __init__(
        self, clock: Clock, *, concurrency: int, failure_threshold: int, cooldown: timedelta
    ) -> None:
        self._clock = clock
        self._concurrency = concurrency
        self._threshold = failure_threshold
        self._cooldown = cooldown
        self._endpoints: dict[str, _Endpoint] = {}

    def state(self, endpoint: str) -> State:
        entry = self._endpoints.get(endpoint)
        if entry is None or entry.opened_at is None:
            return "closed"
        if self._clock.now() - entry.opened_at < self._cooldown:
            return "open"
        return "half_open"

    def capacity(self, endpoint: str) -> int:
        """How many more attempts this endpoint may start now."""
        return max(0, self.limit(endpoint) - self.in_flight(endpoint))

    def reopens_at(self, endpoint: str) -> datetime | None:
        """When an open circuit lets its next probe through (None when not open)."""
        entry = self._endpoints.get(endpoint)
        if entry is None or entry.opened_at is None:
            return None
        return entry.opened_at + self._cooldown

    def limit(self, endpoint: str) -> int:
        """Attempts this endpoint may have in flight in its current state."""
        state = self.state(endpoint)
        return 0 if state == "open" else 1 if state == "half_open" else self._concurrency

    def in_flight(self, endpoint: str) -> int:
        entry = self._endpoints.get(endpoint)
        return entry.in_flight if entry else 0

    def known(self) -> list[str]:
        return list(self._endpoints)

    def blocked(self) -> list[str]:
        """Endpoints (among the known ones) that may not start an attempt now."""
        return [e for e in self._endpoints if self.capacity(e) == 0]

    def started(self, endpoint: str) -> None:
        self._endpoints.setdefault(endpoint, _Endpoint()).in_flight += 1

    def finished(self, endpoint: str, success: bool | None, gone: bool = False) -> None:
        """`success` None: the attempt says nothing about the endpoint's health (not booked).
        `gone` (410): open the circuit at once, so nothing more is sent before the booking
        has disabled the subscription."""
        entry = self._endpoints.setdefault(endpoint, _Endpoint())
        entry.in_flight = max(0, entry.in_flight - 1)
        if success is None:
            pass
        elif gone:
            entry.consecutive_failures = max(entry.consecutive_failures + 1, self._threshold)
            entry.opened_at = self._clock.now()
        elif success:
            entry.consecutive_failures = 0
            entry.opened_at = None
        else:
            entry.consecutive_failures += 1
            half_open_probe_failed = entry.opened_at is not None
            if half_open_probe_failed or entry.consecutive_failures >= self._threshold:
                entry.opened_at = self._clock.now()
        if entry.in_flight == 0 and entry.consecutive_failures == 0:
            del self._endpoints[endpoint]  # forget healthy idle endpoints: bounded memory

    def open_count(self) -> int:
        return sum(1 for e in self._endpoints if self.state(e) != "closed")
