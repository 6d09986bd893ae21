"""The Shopify mapping as pure functions: signature check and webhook -> contract events."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from services.ingest.service import validate
from services.ingest.sources import SOURCES, MappingError, get_source, known_sources
from services.ingest.sources.shopify import CANCELLED_NOTE, NO_MONEY_NOTE, map_order, sign, verify_hmac

DATA = Path(__file__).parent / "data"
SECRET = "shpss_0123456789abcdef0123456789ab"


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def known(order_id: str) -> str | None:
    return {"5412389701234": "shopify:7001234567890"}.get(order_id)


def test_signature_is_base64_hmac_sha256_of_the_raw_body() -> None:
    body = (DATA / "shopify_order.json").read_bytes()
    expected = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
    assert sign(body, SECRET) == expected
    assert verify_hmac(body, expected, SECRET)
    assert not verify_hmac(body, expected, SECRET + "x")  # another tenant's secret
    assert not verify_hmac(body + b" ", expected, SECRET)  # the body changed on the way
    assert not verify_hmac(body, None, SECRET)
    assert not verify_hmac(body, "", SECRET)
    assert not verify_hmac(body, "bm90IGEgc2lnbmF0dXJl", SECRET)
    assert not verify_hmac(body, "ünïcode", SECRET)  # no exception on non-ASCII headers


def test_order_becomes_order_completed_with_every_field_mapped() -> None:
    mapped = map_order("orders/create", load("shopify_order.json"), shop_domain="shop-de.myshopify.com")
    [item] = mapped.events
    assert item.event == {
        "id": "shopify:order:5412389701234",
        "type": "order.completed",
        "customer_id": "shopify:7001234567890",
        "occurred_at": "2025-11-20T11:00:00+01:00",  # processed_at
        "source": "shopify:shop-de.myshopify.com",
        "data": {"order_id": "shopify:5412389701234", "amount": "114.60", "currency": "EUR", "items": 4},
    }
    assert mapped.orders == {"5412389701234": "shopify:7001234567890"}
    assert mapped.note is None
    assert not isinstance(validate(item.event), list)  # a valid contract event


def test_paid_maps_to_the_same_event_id_as_create() -> None:
    order = load("shopify_order.json")
    created = map_order("orders/create", order).events[0].event
    paid = map_order("orders/paid", order).events[0].event
    assert created["id"] == paid["id"] == "shopify:order:5412389701234"
    assert created["source"] == "shopify"  # no shop domain header


def test_fallbacks_created_at_and_total_price() -> None:
    order = load("shopify_order.json")
    order.pop("processed_at")
    order.pop("current_total_price")
    order["total_price"] = "99.95"
    [item] = map_order("orders/create", order).events
    assert item.event["occurred_at"] == "2025-11-20T10:59:12+01:00"
    assert item.event["data"]["amount"] == "99.95"
    assert item.origins["occurred_at"] == "created_at" and item.origins["data.amount"] == "total_price"


def test_guest_checkout_maps_to_nothing_with_a_note() -> None:
    for customer in (None, {}, {"id": None, "email": "guest@example.com"}):
        order = load("shopify_order.json")
        order["customer"] = customer
        mapped = map_order("orders/create", order)
        assert mapped.events == [] and mapped.orders == {}
        assert "guest checkout" in (mapped.note or "")
    order = load("shopify_order.json")
    del order["customer"]
    assert map_order("orders/paid", order).events == []


def test_refund_sums_successful_refund_transactions_in_decimal() -> None:
    mapped = map_order("refunds/create", load("shopify_refund.json"), customer_of=known)
    [item] = mapped.events
    assert item.event == {
        "id": "shopify:refund:930123456789",
        "type": "order.refunded",
        "customer_id": "shopify:7001234567890",
        "occurred_at": "2025-11-27T14:02:41+01:00",
        "source": "shopify",
        "data": {"order_id": "shopify:5412389701234", "amount": "71.00", "currency": "EUR",
                 "reason": "Beanie arrived damaged"},
    }  # 50.10 + 20.90; the failed 15.00 does not count
    assert mapped.orders == {}
    assert not isinstance(validate(item.event), list)


def test_refund_amounts_that_floats_would_get_wrong() -> None:
    refund = load("shopify_refund.json")
    refund["transactions"] = [
        {**refund["transactions"][0], "amount": "0.10"},
        {**refund["transactions"][0], "amount": "0.20"},
        {**refund["transactions"][0], "amount": "0.05", "kind": "sale"},  # not a refund
        {**refund["transactions"][0], "amount": "1.00", "status": "pending"},
    ]
    [item] = map_order("refunds/create", refund, customer_of=known).events
    assert item.event["data"]["amount"] == "0.30"  # 0.1 + 0.2 == 0.30000000000000004 in floats


def test_refund_of_an_unknown_order_names_order_id() -> None:
    with pytest.raises(MappingError) as caught:
        map_order("refunds/create", load("shopify_refund.json"), customer_of=lambda order_id: None)
    assert caught.value.field == "order_id"
    assert "refund for an order churnguard has not seen" in caught.value.message


def test_refund_without_money_moved_publishes_nothing() -> None:
    refund = load("shopify_refund.json")
    refund["transactions"] = [t for t in refund["transactions"] if t["status"] != "success"]
    mapped = map_order("refunds/create", refund, customer_of=known)
    assert mapped.events == [] and mapped.note == NO_MONEY_NOTE


def test_refund_in_two_currencies_is_refused() -> None:
    refund = load("shopify_refund.json")
    refund["transactions"][1]["currency"] = "USD"
    with pytest.raises(MappingError, match="several currencies"):
        map_order("refunds/create", refund, customer_of=known)


def test_long_refund_note_is_cut_to_the_contract_limit() -> None:
    refund = load("shopify_refund.json")
    refund["note"] = "x" * 500
    [item] = map_order("refunds/create", refund, customer_of=known).events
    assert len(item.event["data"]["reason"]) == 200


def test_cancelled_publishes_nothing_but_remembers_the_customer() -> None:
    mapped = map_order("orders/cancelled", load("shopify_order.json"))
    assert mapped.events == []
    assert mapped.note == CANCELLED_NOTE
    assert mapped.orders == {"5412389701234": "shopify:7001234567890"}
    assert map_order("orders/cancelled", load("shopify_order_guest.json")).orders == {}


@pytest.mark.parametrize("topic", [None, "", "orders/updated", "customers/create", "app/uninstalled"])
def test_unsupported_topics_name_the_supported_ones(topic: str | None) -> None:
    with pytest.raises(MappingError) as caught:
        map_order(topic, load("shopify_order.json"))
    assert caught.value.field == "X-Shopify-Topic"
    assert "orders/create, orders/paid, orders/cancelled, refunds/create" in caught.value.message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda o: o.pop("id"), "id"),
        (lambda o: o.update(id=True), "id"),
        (lambda o: o.update(id={"nested": 1}), "id"),
        (lambda o: [o.pop("processed_at"), o.pop("created_at")], "processed_at"),
        (lambda o: o["line_items"][1].update(quantity="1"), "line_items[1].quantity"),
        (lambda o: o["line_items"][0].update(quantity=-1), "line_items[0].quantity"),
        (lambda o: o.update(line_items={"quantity": 1}), "line_items"),
        (lambda o: o["customer"].update(id=[1]), "customer.id"),
    ],
)
def test_malformed_orders_name_the_shopify_field(change: Any, field: str) -> None:
    order = load("shopify_order.json")
    change(order)
    with pytest.raises(MappingError) as caught:
        map_order("orders/create", order)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.pop("order_id"), "order_id"),
        (lambda r: r["transactions"][0].update(amount="12,50"), "transactions[0].amount"),
        (lambda r: r["transactions"][0].update(amount=12.5), "transactions[0].amount"),
        (lambda r: r["transactions"][0].update(amount="NaN"), "transactions[0].amount"),
        (lambda r: r["transactions"][0].update(amount="-3.00"), "transactions[0].amount"),
        (lambda r: r["transactions"][1].pop("currency"), "transactions[1].currency"),
        (lambda r: r.update(transactions={"amount": "1.00"}), "transactions"),
    ],
)
def test_malformed_refunds_name_the_shopify_field(change: Any, field: str) -> None:
    refund = load("shopify_refund.json")
    change(refund)
    with pytest.raises(MappingError) as caught:
        map_order("refunds/create", refund, customer_of=known)
    assert caught.value.field == field


def test_the_body_must_be_an_object() -> None:
    with pytest.raises(MappingError, match="JSON object"):
        map_order("orders/create", [load("shopify_order.json")])


def test_mapping_does_not_change_the_payload() -> None:
    order = load("shopify_order.json")
    before = copy.deepcopy(order)
    map_order("orders/paid", order)
    assert order == before


def test_registry_knows_shopify_and_the_source_adapter_reads_lowercase_headers() -> None:
    assert known_sources() == ("shopify",)
    assert get_source("nope") is None
    source = SOURCES["shopify"]
    body = (DATA / "shopify_order.json").read_bytes()
    headers = {"x-shopify-hmac-sha256": sign(body, SECRET), "x-shopify-topic": "orders/paid",
               "x-shopify-shop-domain": "shop-de.myshopify.com"}
    assert source.verify(body, headers, SECRET)
    assert not source.verify(body, {**headers, "x-shopify-hmac-sha256": sign(body, "another-secret-0000")}, SECRET)
    [item] = source.map(json.loads(body), headers, known).events
    assert item.event["source"] == "shopify:shop-de.myshopify.com"
