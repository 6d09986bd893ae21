"""Upstream sources: systems that cannot speak the contract themselves (Shopify first).

Adding one = a module with pure `verify` and `map` functions (see `base.Source` and
`shopify.py`), one line in SOURCES, a route-table entry at the gateway and a section in
docs/events.md. The rest (per-tenant secrets, order -> customer links, validation against
the contract, publishing through IngestService) is shared by every source.
"""

from __future__ import annotations

from services.ingest.sources.base import CustomerLookup, Headers, Mapped, MappedEvent, MappingError, Source
from services.ingest.sources.shopify import ShopifySource

SOURCES: dict[str, Source] = {source.name: source for source in (ShopifySource(),)}


def known_sources() -> tuple[str, ...]:
    return tuple(SOURCES)


def get_source(name: str) -> Source | None:
    return SOURCES.get(name)


__all__ = [
    "SOURCES", "CustomerLookup", "Headers", "Mapped", "MappedEvent", "MappingError", "Source",
    "get_source", "known_sources",
]
