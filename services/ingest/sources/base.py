"""What every upstream source provides, and what its mapping hands back.

A source is a small module of pure functions (no fastapi, no SQL): it checks a webhook's
signature and maps one webhook to events of the shared contract. Everything around it (the
secret per tenant, the order -> customer links, validation, publishing) is common.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Headers = Mapping[str, str]
"""Request headers with lower-case names."""

CustomerLookup = Callable[[str], "str | None"]
"""order id (as the source names it) -> customer id of a mapped event, if churnguard saw the order."""


class MappingError(ValueError):
    """The webhook cannot become events (422). `field` names the field in the source's own
    payload or header (e.g. `customer.id`, `X-Shopify-Topic`), so the sender can find it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class MappedEvent:
    """One contract event (a dict, validated later) and, per contract field, the source field
    it came from, e.g. {"data.amount": "current_total_price"}: a contract violation is then
    reported by the name the sender knows."""

    event: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Mapped:
    events: list[MappedEvent] = field(default_factory=list)
    # order id -> customer id, remembered so that later webhooks without a customer (refunds)
    # can be attributed
    orders: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # why nothing was published, when that is the right answer


class Source(Protocol):
    name: str  # path segment (/v1/sources/<name>/...) and key of the tenant's secret
    webhook: str  # path segment of the webhook endpoint (/v1/sources/<name>/<webhook>)
    title: str  # for humans: "Shopify"
    signature_header: str

    def verify(self, body: bytes, headers: Headers, secret: str) -> bool:
        """True only if the raw body carries a valid signature made with `secret`."""
        ...

    def map(self, payload: Any, headers: Headers, customer_of: CustomerLookup) -> Mapped:
        """The verified webhook as contract events; raises MappingError (422)."""
        ...
