"""Shopify order webhooks -> `order.completed` / `order.refunded` (pure functions, no I/O).

Shopify signs each delivery with `X-Shopify-Hmac-Sha256`: base64 of HMAC-SHA256 over the raw
body, keyed with the shared secret. It names the event in `X-Shopify-Topic` and the shop in
`X-Shopify-Shop-Domain`, and retries a delivery until it gets a 2xx. The field-by-field
mapping is documented in docs/events.md ("Sources: Shopify").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from decimal import Decimal, InvalidOperation
from typing import Any

from services.ingest.sources.base import CustomerLookup, Headers, Mapped, MappedEvent, MappingError

NAME = "shopify"
SIGNATURE_HEADER = "X-Shopify-Hmac-Sha256"
TOPIC_HEADER = "X-Shopify-Topic"
SHOP_HEADER = "X-Shopify-Shop-Domain"

ORDER_TOPICS = ("orders/create", "orders/paid")  # both -> the same order.completed (one id)
CANCELLED_TOPIC = "orders/cancelled"
REFUND_TOPIC = "refunds/create"
SUPPORTED_TOPICS = (*ORDER_TOPICS, CANCELLED_TOPIC, REFUND_TOPIC)
MAX_REASON_CHARS = 200  # the contract's ShortText

CANCELLED_NOTE = (
    "orders/cancelled publishes nothing: if money goes back to the customer, Shopify sends "
    "refunds/create, which becomes order.refunded"
)
# Acknowledged, not refused: Shopify retries every non-2xx and may drop a subscription that
# keeps failing, so a shop with guest checkouts would lose its webhook over orders we cannot use.
GUEST_NOTE = "guest checkout (no customer.id): nothing to attribute, so nothing was published"
NO_MONEY_NOTE = (
    "refund moved no money (no successful refund transaction), so no order.refunded was published"
)


def sign(body: bytes, secret: str) -> str:
    """The `X-Shopify-Hmac-Sha256` value Shopify sends for `body`."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_hmac(body: bytes, signature: str | None, secret: str) -> bool:
    """Constant-time check of the header against the raw body (before any parsing)."""
    if not signature or not secret:
        return False
    return hmac.compare_digest(sign(body, secret).encode("ascii"), signature.strip().encode())


def map_order(
    topic: str | None,
    payload: Any,
    *,
    shop_domain: str | None = None,
    customer_of: CustomerLookup = lambda order_id: None,
) -> Mapped:
    """One verified webhook -> contract events (dicts, validated by the caller against the
    contract), plus the order -> customer link to remember. Raises MappingError naming the
    Shopify field or header at fault."""
    if not topic:
        raise MappingError(TOPIC_HEADER, f"missing; supported topics: {', '.join(SUPPORTED_TOPICS)}")
    if topic not in SUPPORTED_TOPICS:
        raise MappingError(
            TOPIC_HEADER, f"unsupported topic {topic!r}; supported topics: {', '.join(SUPPORTED_TOPICS)}"
        )
    if not isinstance(payload, dict):
        raise MappingError("(body)", f"a {topic} webhook must be a JSON object")
    source = f"{NAME}:{shop_domain}" if shop_domain else NAME
    if topic == REFUND_TOPIC:
        return _refund(payload, source, customer_of)
    if topic == CANCELLED_TOPIC:
        return Mapped(orders=_order_link(payload), note=CANCELLED_NOTE)
    return _order(payload, source)


def _order(order: dict[str, Any], source: str) -> Mapped:
    order_id = _id(order.get("id"), "id")
    customer = order.get("customer")
    if not isinstance(customer, dict) or customer.get("id") in (None, ""):
        return Mapped(note=GUEST_NOTE)
    customer_id = _id(customer["id"], "customer.id")
    occurred_at, time_field = _first(order, "processed_at", "created_at")
    amount, amount_field = _first(order, "current_total_price", "total_price")
    data: dict[str, Any] = {
        "order_id": f"{NAME}:{order_id}",
        "amount": amount,
        "currency": order.get("currency"),
    }
    items = _item_count(order.get("line_items"))
    if items is not None:
        data["items"] = items
    event = {
        "id": f"{NAME}:order:{order_id}",
        "type": "order.completed",
        "customer_id": f"{NAME}:{customer_id}",
        "occurred_at": occurred_at,
        "source": source,
        "data": data,
    }
    origins = {
        "id": "id", "customer_id": "customer.id", "occurred_at": time_field, "source": SHOP_HEADER,
        "data.order_id": "id", "data.amount": amount_field, "data.currency": "currency",
        "data.items": "line_items[].quantity",
    }
    return Mapped(events=[MappedEvent(event, origins)], orders={order_id: f"{NAME}:{customer_id}"})


def _refund(refund: dict[str, Any], source: str, customer_of: CustomerLookup) -> Mapped:
    refund_id = _id(refund.get("id"), "id")
    order_id = _id(refund.get("order_id"), "order_id")
    amount, currency = _refunded_money(refund.get("transactions"))
    if amount is None:
        return Mapped(note=NO_MONEY_NOTE)
    customer_id = customer_of(order_id)
    if customer_id is None:
        raise MappingError(
            "order_id",
            f"refund for an order churnguard has not seen (order {order_id}): the refund webhook "
            "names no customer, so it is attributed through the order's orders/create or "
            "orders/paid webhook, which has not arrived for this tenant",
        )
    occurred_at, time_field = _first(refund, "processed_at", "created_at")
    data: dict[str, Any] = {"order_id": f"{NAME}:{order_id}", "amount": amount, "currency": currency}
    note = refund.get("note")
    if isinstance(note, str) and note.strip():
        data["reason"] = note.strip()[:MAX_REASON_CHARS]
    event = {
        "id": f"{NAME}:refund:{refund_id}",
        "type": "order.refunded",
        "customer_id": customer_id,
        "occurred_at": occurred_at,
        "source": source,
        "data": data,
    }
    origins = {
        "id": "id", "customer_id": "order_id", "occurred_at": time_field, "source": SHOP_HEADER,
        "data.order_id": "order_id", "data.amount": "transactions[].amount",
        "data.currency": "transactions[].currency", "data.reason": "note",
    }
    return Mapped(events=[MappedEvent(event, origins)])


def _refunded_money(transactions: Any) -> tuple[str | None, str | None]:
    """Sum of the successful `refund` transactions, in decimal (never float); (None, None) when
    no money moved. Failed, pending and other kinds of transactions do not count."""
    if transactions is None:
        transactions = []
    if not isinstance(transactions, list):
        raise MappingError("transactions", "must be an array of transactions")
    total = Decimal(0)
    currencies: set[str] = set()
    counted = 0
    for index, transaction in enumerate(transactions):
        if not isinstance(transaction, dict):
            raise MappingError(f"transactions[{index}]", "must be an object")
        if transaction.get("kind") != "refund" or transaction.get("status") != "success":
            continue
        total += _decimal(transaction.get("amount"), f"transactions[{index}].amount")
        currency = transaction.get("currency")
        if not isinstance(currency, str) or not currency:
            raise MappingError(f"transactions[{index}].currency", "required for a successful refund transaction")
        currencies.add(currency)
        counted += 1
    if not counted:
        return None, None
    if len(currencies) > 1:
        raise MappingError(
            "transactions[].currency", f"refund transactions in several currencies ({', '.join(sorted(currencies))})"
        )
    return format(total, "f"), currencies.pop()


def _order_link(order: dict[str, Any]) -> dict[str, str]:
    """A cancelled order still tells whose order it is (a refund may follow)."""
    customer = order.get("customer")
    try:
        if isinstance(customer, dict) and customer.get("id") not in (None, ""):
            return {_id(order.get("id"), "id"): f"{NAME}:{_id(customer['id'], 'customer.id')}"}
    except MappingError:
        pass
    return {}


def _id(value: Any, field: str) -> str:
    if isinstance(value, bool) or value is None or value == "":
        raise MappingError(field, "required")
    if isinstance(value, int) or (isinstance(value, str) and value.strip() == value):
        return str(value)
    raise MappingError(field, "must be a Shopify id (an integer)")


def _first(payload: dict[str, Any], *fields: str) -> tuple[Any, str]:
    """The first of `fields` that is set, and its name (for error messages)."""
    for name in fields:
        if payload.get(name) not in (None, ""):
            return payload[name], name
    raise MappingError(fields[0], f"required (or {', '.join(fields[1:])})")


def _decimal(value: Any, field: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise MappingError(field, "must be a decimal string such as \"19.90\"")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise MappingError(field, f"not a decimal amount: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise MappingError(field, f"not a non-negative amount: {value!r}")
    return amount


def _item_count(line_items: Any) -> int | None:
    if line_items is None:
        return None
    if not isinstance(line_items, list):
        raise MappingError("line_items", "must be an array")
    total = 0
    for index, item in enumerate(line_items):
        quantity = item.get("quantity") if isinstance(item, dict) else None
        if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0:
            raise MappingError(f"line_items[{index}].quantity", "must be a non-negative integer")
        total += quantity
    return total


class ShopifySource:
    """The registry's view of this module (see services.ingest.sources.base.Source)."""

    name = NAME
    webhook = "orders"
    title = "Shopify"
    signature_header = SIGNATURE_HEADER

    def verify(self, body: bytes, headers: Headers, secret: str) -> bool:
        return verify_hmac(body, headers.get(SIGNATURE_HEADER.lower()), secret)

    def map(self, payload: Any, headers: Headers, customer_of: CustomerLookup) -> Mapped:
        return map_order(
            headers.get(TOPIC_HEADER.lower()), payload,
            shop_domain=headers.get(SHOP_HEADER.lower()), customer_of=customer_of,
        )
