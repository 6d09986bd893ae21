"""Joined single events: how the gateway hands ingest several callers' `POST /v1/events` in one
internal request, and how ingest answers each of them in one response.

Under load most of the cost of a single event through the gateway was the second HTTP exchange
(gateway -> ingest) and ingest's per-request work, not the event. Bodies of one tenant that
arrive while earlier ones are on their way travel together; each is judged and answered by
ingest exactly as `POST /v1/events` would, so every caller gets the answer it would have got on
its own (services/gateway/joiner.py, services/ingest/routes.py).

The framing carries the bodies as received, byte for byte (any bytes: ingest names what is wrong
with each), and the answers as ingest wrote them, so neither side parses JSON it does not need.
"""

from __future__ import annotations

from collections.abc import Sequence

JOINED_PATH = "/v1/events/joined"  # internal: not in the gateway's route table
JOINED_CONTENT_TYPE = "application/vnd.churnguard.joined-events"
LENGTHS_HEADER = "X-Churnguard-Joined-Lengths"  # request: each body's length in bytes
ANSWERS_HEADER = "X-Churnguard-Joined-Answers"  # response: `status:length` per body
MAX_ITEMS = 64  # bodies per joined request
MAX_ITEM_BYTES = 64 * 1024  # larger bodies go on their own (ingest's own limit is lower)


class MalformedJoin(ValueError):
    """The framing does not add up: a gateway/ingest version mismatch, never a caller's fault."""


def join_bodies(bodies: Sequence[bytes]) -> tuple[bytes, str]:
    """One request body and its lengths header."""
    return b"".join(bodies), ",".join(str(len(body)) for body in bodies)


def split_bodies(body: bytes, lengths: str | None) -> list[bytes]:
    sizes = _numbers(lengths, LENGTHS_HEADER)
    if len(sizes) > MAX_ITEMS:
        raise MalformedJoin(f"{len(sizes)} joined events; at most {MAX_ITEMS}")
    return _cut(body, sizes, LENGTHS_HEADER)


def join_answers(answers: Sequence[tuple[int, bytes]]) -> tuple[bytes, str]:
    """One response body and its answers header, from (status, body) per joined event."""
    return (b"".join(body for _, body in answers),
            ",".join(f"{status}:{len(body)}" for status, body in answers))


def split_answers(body: bytes, answers: str | None, expected: int) -> list[tuple[int, bytes]]:
    if not answers:
        raise MalformedJoin(f"the answer has no {ANSWERS_HEADER} header")
    try:
        pairs = [(int(status), int(size)) for status, size in
                 (item.split(":", 1) for item in answers.split(","))]
    except ValueError as exc:
        raise MalformedJoin(f"malformed {ANSWERS_HEADER} header") from exc
    if len(pairs) != expected:
        raise MalformedJoin(f"{len(pairs)} answers for {expected} joined events")
    parts = _cut(body, [size for _, size in pairs], ANSWERS_HEADER)
    return [(status, part) for (status, _), part in zip(pairs, parts, strict=True)]


def _numbers(header: str | None, name: str) -> list[int]:
    if not header:
        raise MalformedJoin(f"missing {name} header")
    try:
        sizes = [int(item) for item in header.split(",")]
    except ValueError as exc:
        raise MalformedJoin(f"malformed {name} header") from exc
    if any(size < 0 for size in sizes):
        raise MalformedJoin(f"malformed {name} header")
    return sizes


def _cut(body: bytes, sizes: Sequence[int], name: str) -> list[bytes]:
    if any(size < 0 for size in sizes) or sum(sizes) != len(body):
        raise MalformedJoin(f"the {name} header says {sum(sizes)} bytes; the body has {len(body)}")
    parts, start = [], 0
    for size in sizes:
        parts.append(body[start:start + size])
        start += size
    return parts
