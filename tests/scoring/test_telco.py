"""The Telco table -> contract events converter, on a few synthetic rows in the table's format."""

from __future__ import annotations

import io
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from services.scoring.datasets import telco
from services.scoring.features import compute_features
from shared.events import parse_event

HEADER = ",".join(telco.COLUMNS)
ROWS = [
    # month-to-month, 3 months
    "1111-AAAAA,Female,0,Yes,No,3,No,No phone service,DSL,No,Yes,No,No,No,No,Month-to-month,Yes,Electronic check,29.85,89.55,Yes",
    # one year, 14 months: one renewal (after 12 months)
    "2222-BBBBB,Male,1,No,No,14,Yes,Yes,Fiber optic,No,No,Yes,No,Yes,Yes,One year,No,Mailed check,99.5,1393,No",
    # two year, exactly 24 months: the renewal falls on R
    "3333-CCCCC,Female,0,Yes,Yes,24,Yes,No,No,No internet service,No internet service,No internet service,No internet service,No internet service,No internet service,Two year,No,Credit card (automatic),20.05,481.2,No",
    # signed up at R: tenure 0, blank TotalCharges
    "4444-DDDDD,Male,0,No,Yes,0,Yes,No,DSL,Yes,Yes,Yes,Yes,No,No,Two year,Yes,Bank transfer (automatic),61.9, ,No",
]
R = date(2026, 11, 1)
R_AT = datetime(2026, 11, 1, tzinfo=timezone.utc)
NOW = datetime(2026, 11, 23, tzinfo=timezone.utc)


def sample(rows: list[str] = ROWS) -> io.StringIO:
    return io.StringIO("\n".join([HEADER, *rows]) + "\n")


def converted() -> dict[str, tuple[telco.TelcoCustomer, list[dict]]]:
    return {c.customer_id: (c, events) for c, events in telco.convert(sample(), R)}


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def test_every_event_is_valid_under_the_contract_and_none_is_after_r() -> None:
    everything = [e for _, events in converted().values() for e in events]
    assert len(everything) == 4 * 2 + (3 + 3) + (1 + 14) + (1 + 24) + 0  # renewals + invoices
    for event in everything:
        parsed = parse_event(event, now=NOW)
        assert parsed.occurred_at <= R_AT
        assert parsed.source == "telco"


def test_ids_are_deterministic_and_unique() -> None:
    first = [e["id"] for _, events in converted().values() for e in events]
    second = [e["id"] for _, events in converted().values() for e in events]
    assert first == second
    assert len(set(first)) == len(first)
    assert "telco:1111-AAAAA:order.completed:3" in first
    assert all(i.startswith("telco:") for i in first)


def test_the_label_stays_out_of_the_events() -> None:
    customers = converted()
    assert {cid: c.churned for cid, (c, _) in customers.items()} == {
        "1111-AAAAA": True, "2222-BBBBB": False, "3333-CCCCC": False, "4444-DDDDD": False}
    for _, events in customers.values():
        text = repr(events).lower()
        assert "churn" not in text
        assert not of_type(events, "subscription.ended") and not of_type(events, "subscription.cancellation_notice")


def test_month_to_month_rolls_monthly_and_its_current_term_ends_a_month_after_r() -> None:
    _, events = converted()["1111-AAAAA"]
    started = of_type(events, "subscription.started")[0]["data"]
    assert (started["start_date"], started["end_date"], started["auto_renew"]) == ("2026-08-01", "2026-09-01", True)
    assert (started["plan"], started["price"], started["currency"]) == ("Month-to-month", "29.85", "EUR")
    renewals = [e["data"] for e in of_type(events, "subscription.renewed")]
    assert [(r["start_date"], r["end_date"]) for r in renewals] == [
        ("2026-09-01", "2026-10-01"), ("2026-10-01", "2026-11-01"), ("2026-11-01", "2026-12-01")]
    features = compute_features(events, R_AT)
    assert features["days_to_contract_end"] == 30.0
    assert features["contract_auto_renew"] == 1.0


def test_fixed_terms_renew_at_their_boundaries_and_the_last_term_contains_r() -> None:
    customers = converted()
    _, one_year = customers["2222-BBBBB"]
    assert of_type(one_year, "subscription.started")[0]["data"]["start_date"] == "2025-09-01"
    assert of_type(one_year, "subscription.started")[0]["data"]["end_date"] == "2026-09-01"
    [renewal] = [e["data"] for e in of_type(one_year, "subscription.renewed")]
    assert (renewal["start_date"], renewal["end_date"], renewal["auto_renew"]) == ("2026-09-01", "2027-09-01", False)

    _, two_year = customers["3333-CCCCC"]
    [renewal] = of_type(two_year, "subscription.renewed")
    assert renewal["occurred_at"] == R_AT.isoformat()
    assert (renewal["data"]["start_date"], renewal["data"]["end_date"]) == ("2026-11-01", "2028-11-01")
    assert compute_features(two_year, R_AT)["days_to_contract_end"] == 731.0


def test_one_invoice_per_month_of_tenure_and_a_blank_total_is_tenure_zero() -> None:
    customers = converted()
    for cid, tenure in (("1111-AAAAA", 3), ("2222-BBBBB", 14), ("3333-CCCCC", 24), ("4444-DDDDD", 0)):
        customer, events = customers[cid]
        invoices = of_type(events, "order.completed")
        assert customer.tenure == tenure
        assert len(invoices) == tenure
        assert {i["data"]["amount"] for i in invoices} <= {f"{customer.monthly_charges:.2f}"}
    _, events = customers["2222-BBBBB"]
    assert [e["occurred_at"][:10] for e in of_type(events, "order.completed")][-2:] == ["2026-10-01", "2026-11-01"]
    assert of_type(events, "order.completed")[0]["data"]["amount"] == "99.50"

    new, events = customers["4444-DDDDD"]
    assert new.total_charges is None
    assert [e["type"] for e in events] == ["customer.profile_updated", "subscription.started"]
    assert all(e["occurred_at"] == R_AT.isoformat() for e in events)


def test_the_profile_carries_demographics_but_not_the_label() -> None:
    _, events = converted()["2222-BBBBB"]
    profile = of_type(events, "customer.profile_updated")[0]
    assert profile == events[0]
    assert profile["data"]["segment"] == "senior"
    attributes = profile["data"]["attributes"]
    assert attributes["senior_citizen"] is True and attributes["partner"] is False
    assert attributes["payment_method"] == "Mailed check"
    assert attributes["internet_service"] == "Fiber optic"
    assert attributes["paperless_billing"] is False


def test_files_hold_events_and_labels_apart(tmp_path: Path) -> None:
    source = tmp_path / "telco.csv"
    source.write_text(sample().getvalue())
    events_path, labels_path = tmp_path / "events.ndjson", tmp_path / "labels.csv"
    summary = telco.write_files(source, events_path, labels_path, R)
    lines = events_path.read_text().splitlines()
    assert len(lines) == summary.events == 8 + 6 + 15 + 25
    assert all(parse_event(line, now=NOW) for line in lines)
    assert telco.read_labels(labels_path) == {"1111-AAAAA": 1, "2222-BBBBB": 0, "3333-CCCCC": 0, "4444-DDDDD": 0}
    assert (summary.customers, summary.churned, summary.blank_total_charges) == (4, 1, 1)
    assert summary.by_type["order.completed"] == 3 + 14 + 24
    assert summary.total_charges_checked == 3


def test_month_ends_are_clamped() -> None:
    assert telco.add_months(date(2026, 1, 31), 1) == date(2026, 2, 28)
    assert telco.add_months(date(2024, 3, 31), -1) == date(2024, 2, 29)
    assert telco.add_months(date(2026, 11, 1), -72) == date(2020, 11, 1)


@pytest.mark.parametrize(("change", "message"), [
    (lambda row: row.replace("Month-to-month", "Weekly"), "line 2: Contract 'Weekly'"),
    (lambda row: row.replace(",3,", ",three,", 1), "line 2: tenure 'three'"),
    (lambda row: row.replace(",29.85,", ",-1,"), "line 2: MonthlyCharges '-1'"),
    (lambda row: row[: row.rindex(",")] + ",Maybe", "line 2: Churn 'Maybe'"),
])
def test_bad_rows_are_refused_with_line_and_field(change, message: str) -> None:
    with pytest.raises(telco.TelcoFormatError, match=message):
        list(telco.convert(sample([change(ROWS[0])]), R))


def test_a_table_without_the_telco_columns_is_refused() -> None:
    with pytest.raises(telco.TelcoFormatError, match="missing column"):
        list(telco.read_customers(io.StringIO("customerID,tenure\nx,1\n")))


def test_invoices_count_as_spend() -> None:
    _, events = converted()["2222-BBBBB"]
    features = compute_features(events, R_AT)
    assert features["spend_90d"] == pytest.approx(3 * 99.5)
    assert features["orders_365d"] == 12.0
