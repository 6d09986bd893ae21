"""What every source shares: the tenant's secret, signature first, then mapping, the order ->
customer links, and validation against the contract. Publishing is IngestService's, as for
every other event. Imports neither fastapi nor aiokafka."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.ingest import repository
from services.ingest.service import FieldError, decode_json, validate
from services.ingest.sources.base import Headers, Mapped, MappedEvent, MappingError, Source
from shared.clock import Clock
from shared.db import session_scope

MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 512


class NoSecret(Exception):
    def __init__(self, source: str) -> None:
        super().__init__(f"no {source} secret configured for this tenant: PUT /v1/sources/{source}/secret")


class BadSignature(Exception):
    def __init__(self, source: Source, missing: bool) -> None:
        header = source.signature_header
        if missing:
            message = (f"missing {header} header: only webhooks signed by {source.title} with this "
                       "tenant's secret are accepted")
        else:
            message = (f"{header} does not match the body: the webhook was not signed with the secret "
                       f"configured for this tenant (PUT /v1/sources/{source.name}/secret), or the body "
                       "was changed on the way")
        super().__init__(message)


class Unmappable(Exception):
    """The verified webhook does not make valid events (422); errors name the source's fields."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors


class SourcesUnavailable(Exception):
    """The secret or order tables could not be reached (503: the sender retries)."""


class InvalidSecret(ValueError):
    pass


@dataclass(frozen=True)
class Received:
    events: list[BaseModel] = field(default_factory=list)
    note: str | None = None


def check_secret(secret: Any) -> str:
    if not isinstance(secret, str):
        raise InvalidSecret("must be a string")
    if len(secret) < MIN_SECRET_CHARS:
        raise InvalidSecret(f"must be at least {MIN_SECRET_CHARS} characters")
    if len(secret) > MAX_SECRET_CHARS:
        raise InvalidSecret(f"must be at most {MAX_SECRET_CHARS} characters")
    if secret != secret.strip():
        raise InvalidSecret("must not start or end with whitespace (a copy-and-paste slip?)")
    return secret


def contract_errors(mapped: MappedEvent, errors: list[FieldError]) -> list[FieldError]:
    """A contract violation, named by the source field it came from."""
    named = []
    for error in errors:
        origin = mapped.origins.get(error.field)
        if origin is None:  # e.g. `data.amount` when only `data` was mapped: try the parents
            parent = error.field
            while "." in parent and origin is None:
                parent = parent.rsplit(".", 1)[0]
                origin = mapped.origins.get(parent)
        if origin is None:
            named.append(error)
        else:
            named.append(FieldError(origin, f"{error.message} (mapped to {error.field} of {mapped.event.get('type')})"))
    return named


class SourceService:
    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock

    async def set_secret(self, tenant_id: str, source: str, secret: str) -> None:
        now = self._clock.now()

        def put() -> None:
            with session_scope(self._engine) as session:
                repository.put_source_secret(session, tenant_id, source, secret, now)

        await self._db(put)

    async def delete_secret(self, tenant_id: str, source: str) -> bool:
        def remove() -> bool:
            with session_scope(self._engine) as session:
                return repository.delete_source_secret(session, tenant_id, source)

        return await self._db(remove)

    async def receive(self, tenant_id: str, source: Source, body: bytes, headers: Headers) -> Received:
        """Verify, map and validate one webhook; remember its order -> customer links. Raises
        NoSecret, BadSignature, MalformedJson, Unmappable or SourcesUnavailable; nothing is
        remembered unless the whole webhook is valid."""
        now = self._clock.now()

        def work() -> Received:
            with session_scope(self._engine) as session:
                secret = repository.source_secret(session, tenant_id, source.name)
                if secret is None:
                    raise NoSecret(source.name)
                if not source.verify(body, headers, secret):
                    raise BadSignature(source, missing=not headers.get(source.signature_header.lower()))
                payload = decode_json(body)
                try:
                    mapped = source.map(
                        payload, headers,
                        lambda order_id: repository.order_customer(session, tenant_id, source.name, order_id),
                    )
                except MappingError as exc:
                    raise Unmappable([FieldError(exc.field, exc.message)]) from None
                events = self._validated(mapped, now)
                repository.remember_orders(session, tenant_id, source.name, mapped.orders, now)
            return Received(events, mapped.note)

        return await self._db(work)

    @staticmethod
    def _validated(mapped: Mapped, now: Any) -> list[BaseModel]:
        events, errors = [], []
        for item in mapped.events:
            result = validate(item.event, now=now)
            if isinstance(result, list):
                errors.extend(contract_errors(item, result))
            else:
                events.append(result)
        if errors:
            raise Unmappable(errors)
        return events

    async def _db(self, work: Any) -> Any:
        try:
            return await asyncio.to_thread(work)
        except SQLAlchemyError as exc:
            raise SourcesUnavailable(f"source tables unavailable ({type(exc).__name__})") from exc
