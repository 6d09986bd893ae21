"""A token bucket per API key, in this gateway process's memory.

Why not a library: `limits` offers fixed/moving/sliding windows but no token bucket, and its
in-memory storage reads the wall clock itself; `aiolimiter` is a leaky bucket that makes callers
*wait* (on the event loop's clock) rather than answering "no, retry in n s"; `pyrate-limiter`
has a pluggable clock but models rates as windows of counted items with per-bucket storage
objects, more machinery than the dozen lines below, and still no "seconds until a token" to put
in Retry-After. A token bucket is short, and this one takes time from the injectable Clock, so
tests move a ManualClock instead of sleeping.

The buckets live in one process: with N gateway replicas behind a load balancer a key gets up
to N x its limit (docs/operations.md says so, and how to divide).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from shared.clock import Clock


@dataclass
class _Bucket:
    tokens: float
    updated: float  # clock seconds
    per_s: float
    burst: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0  # until the next token, when not allowed

    @property
    def retry_after_header(self) -> str:
        """Whole seconds (the header has no fractions), at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class TokenBuckets:
    """`take(key, per_s, burst)`: a bucket of `burst` tokens refilling at `per_s` per second.
    A full bucket lets `burst` requests through at once, then `per_s` per second. Buckets of
    keys not seen for a while are dropped beyond `max_keys` (least recently used first): a
    dropped bucket comes back full, which only ever errs towards letting a request through.
    Called from the event loop only (no lock)."""

    def __init__(self, clock: Clock, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _seconds(self) -> float:
        return self._clock.now().timestamp()

    def take(self, key: str, per_s: float, burst: int) -> Decision:
        if per_s <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs per_s > 0 and burst >= 1, not {per_s}, {burst}")
        now = self._seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=float(burst), updated=now, per_s=per_s, burst=burst)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            elapsed = max(0.0, now - bucket.updated)  # a clock set back refills nothing
            # Refilled at the rate that applied until now; a changed limit applies from here
            # (a lowered one does not hand out a fresh bucket).
            bucket.tokens = min(float(burst), bucket.tokens + elapsed * bucket.per_s)
            bucket.updated, bucket.per_s, bucket.burst = now, per_s, burst
        self._buckets.move_to_end(key)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Decision(True)
        return Decision(False, (1.0 - bucket.tokens) / per_s)
