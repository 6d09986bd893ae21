"""Single events of one tenant travel to ingest together (shared/joined.py).

`POST /v1/events` bodies that arrive while earlier ones of the same tenant are on their way to
ingest wait for the next joined request (up to `MAX_ITEMS` each, at most `in_flight` joined
requests per tenant at a time); the first of a quiet moment leaves at once, so joining never adds
a wait of its own, only sharing. Ingest judges and answers each body as `POST /v1/events` would
(status, body, Retry-After), so each caller gets the answer it would have got on its own; when
the joined request fails as a whole, each caller gets what `forward` answers for that failure.

What is not joined goes through `forward` as before: another Content-Type (ingest names it),
a Content-Encoding, a body over `MAX_ITEM_BYTES`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from services.gateway import metrics
from services.gateway.proxy import UpstreamClient, UpstreamFailed, exchange, service_headers, timed_out
from shared.app import is_json_media_type
from shared.joined import (
    ANSWERS_HEADER,
    JOINED_CONTENT_TYPE,
    JOINED_PATH,
    LENGTHS_HEADER,
    MAX_ITEM_BYTES,
    MAX_ITEMS,
    MalformedJoin,
    join_bodies,
    split_answers,
)

log = logging.getLogger(__name__)

JOINED_IN_FLIGHT = 2  # joined requests per tenant at a time (per gateway process)
_JSON = "application/json"
_JOINED_CONTENT_TYPE_RAW = JOINED_CONTENT_TYPE.encode("latin-1")
_LENGTHS_RAW = LENGTHS_HEADER.lower().encode("latin-1")


def joinable(request: Request, body: bytes) -> bool:
    headers = request.headers
    return (len(body) <= MAX_ITEM_BYTES and "content-encoding" not in headers
            and is_json_media_type(headers.get("content-type", "")))


@dataclass
class _Waiting:
    body: bytes
    request_id: str
    answer: asyncio.Future[Response]


@dataclass
class _Tenant:
    waiting: list[_Waiting] = field(default_factory=list)
    sending: int = 0


class EventJoiner:
    def __init__(self, client: UpstreamClient, *, base_url: str, internal_token: str,
                 timeout_s: float, in_flight: int = JOINED_IN_FLIGHT, max_items: int = MAX_ITEMS) -> None:
        self._client = client
        self._base_url = base_url
        self._internal_token = internal_token
        self._timeout_s = timeout_s
        self._in_flight = in_flight
        self._max_items = max_items
        self._tenants: dict[str, _Tenant] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, tenant_id: str, body: bytes, request_id: str) -> Response:
        """Ingest's answer to this one body. Bounded by the upstream timeout, waiting included."""
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        tenant = self._tenants.setdefault(tenant_id, _Tenant())
        tenant.waiting.append(_Waiting(body, request_id, answer))
        if tenant.sending < self._in_flight:
            tenant.sending += 1
            task = asyncio.create_task(self._send_rounds(tenant_id, tenant))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            async with asyncio.timeout(self._timeout_s):
                # shielded: a caller giving up must not cancel the future others' round resolves
                return await asyncio.shield(answer)
        except TimeoutError:
            answer.cancel()  # not sent yet: it never will be
            return timed_out("ingest", self._timeout_s).response()
        except asyncio.CancelledError:
            answer.cancel()
            raise

    async def _send_rounds(self, tenant_id: str, tenant: _Tenant) -> None:
        try:
            while tenant.waiting:
                batch = [w for w in tenant.waiting[:self._max_items] if not w.answer.done()]
                del tenant.waiting[:self._max_items]
                if not batch:
                    continue
                try:
                    answers = await self._send(tenant_id, batch)
                except Exception as exc:  # not upstream trouble (exchange answers that): a bug
                    log.exception("joined events for ingest failed")
                    for waiting in batch:
                        if not waiting.answer.done():
                            waiting.answer.set_exception(exc)
                    continue
                for waiting, answer in zip(batch, answers, strict=True):
                    if not waiting.answer.done():
                        waiting.answer.set_result(answer)
        finally:
            tenant.sending -= 1
            if not tenant.sending and not tenant.waiting:
                self._tenants.pop(tenant_id, None)

    async def _send(self, tenant_id: str, batch: list[_Waiting]) -> list[Response]:
        body, lengths = join_bodies([w.body for w in batch])
        headers = [
            (b"content-type", _JOINED_CONTENT_TYPE_RAW),
            (_LENGTHS_RAW, lengths.encode("latin-1")),
            # ingest's access line names the first caller's request id
            *service_headers(tenant_id, batch[0].request_id, self._internal_token),
        ]
        metrics.JOINED_EVENTS.observe(len(batch))
        try:
            answer = await exchange(self._client, upstream="ingest", base_url=self._base_url,
                                    method="POST", target=JOINED_PATH, headers=headers, body=body,
                                    timeout_s=self._timeout_s)
        except UpstreamFailed as failed:
            return [failed.response() for _ in batch]
        try:
            if answer.status != 200:
                raise MalformedJoin(f"ingest answered {answer.status}: {answer.content[:200]!r}")
            parts = split_answers(answer.content, answer.headers.get(ANSWERS_HEADER.lower()), len(batch))
        except MalformedJoin as exc:  # gateway and ingest of versions that do not match
            log.error("ingest's answer to joined events is unusable: %s", exc)
            unusable = UpstreamFailed(502, "upstream service ingest failed: unusable answer")
            return [unusable.response() for _ in batch]
        retry_after = answer.headers.get("retry-after")
        return [
            Response(part, status_code=status, media_type=_JSON,
                     headers={"Retry-After": retry_after} if retry_after and status == 503 else None)
            for status, part in parts
        ]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for tenant in self._tenants.values():
            for waiting in tenant.waiting:
                waiting.answer.cancel()
        self._tenants.clear()
