"""IBM Telco Customer Churn (a snapshot table) -> contract events, with the label held back.

The table (7,043 customers, 21 columns; see /work/shared/data/README.md) has no dates: only
`tenure` in months as of the snapshot, the contract type, the monthly charge and whether the
customer left "within the last month" (`Churn`). This module derives, per customer and for a
reference date R (the snapshot moment), an event history that ends at R:

- `customer.profile_updated` at the start: segment from the household (senior / family /
  couple / single) and the demographic, billing and service columns as attributes;
- `subscription.started` `tenure` months before R: plan = the contract type, price =
  MonthlyCharges, labelled EUR (the table names no currency; it is a US sample, but spend
  features count only the product's main currency, EUR, so the figures go in unchanged as EUR), terms of
  1 month (Month-to-month, `auto_renew` true), 12 or 24 months (One year / Two year,
  `auto_renew` false: a fixed term the customer re-signs);
- `subscription.renewed` at every term boundary up to and including R, so the last contract
  event is the term that contains R (for Month-to-month it ends one month after R);
- one `order.completed` invoice of MonthlyCharges at the end of each month of tenure (the
  last one at R); `tenure` 0 means signed up at R, no invoice yet (the 11 blank TotalCharges).

`Churn` never goes into an event: it comes back separately as the label. TotalCharges is only
used as a cross-check of tenure x MonthlyCharges (prices changed over time, so they differ).
Event ids are deterministic (`telco:<customerID>:<kind>:<n>`), so a replay is idempotent.

Pure and streaming: rows are read one at a time from the file or lines given; nothing is
written unless `write_files` is called, and never into the repository.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

DEFAULT_REFERENCE = date(2026, 11, 1)
SOURCE = "telco"
DEFAULT_CURRENCY = "EUR"  # services.scoring.features.MAIN_CURRENCY: the only currency spend counts
COLUMNS = (
    "customerID", "gender", "SeniorCitizen", "Partner", "Dependents", "tenure", "PhoneService",
    "MultipleLines", "InternetService", "OnlineSecurity", "OnlineBackup", "DeviceProtection",
    "TechSupport", "StreamingTV", "StreamingMovies", "Contract", "PaperlessBilling", "PaymentMethod",
    "MonthlyCharges", "TotalCharges", "Churn",
)
TERM_MONTHS = {"Month-to-month": 1, "One year": 12, "Two year": 24}
# Columns that become profile attributes as they are (strings); the yes/no ones become booleans.
_TEXT_ATTRIBUTES = ("gender", "MultipleLines", "InternetService", "OnlineSecurity", "OnlineBackup",
                    "DeviceProtection", "TechSupport", "StreamingTV", "StreamingMovies", "PaymentMethod")
_YES_NO_ATTRIBUTES = ("Partner", "Dependents", "PhoneService", "PaperlessBilling")
_YES_NO = {"Yes": True, "No": False}


class TelcoFormatError(ValueError):
    """The input is not the Telco table (missing column, bad value); says which row and field."""


@dataclass(frozen=True, slots=True)
class TelcoCustomer:
    """One row of the table, typed."""

    customer_id: str
    tenure: int
    contract: str
    monthly_charges: Decimal
    total_charges: Decimal | None
    churned: bool
    row: dict[str, str]

    @property
    def term_months(self) -> int:
        return TERM_MONTHS[self.contract]


@dataclass
class Summary:
    """What a conversion produced, and the TotalCharges cross-check."""

    customers: int = 0
    events: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    churned: int = 0
    blank_total_charges: int = 0
    # |tenure x MonthlyCharges - TotalCharges| / TotalCharges, over rows that have both
    total_charges_checked: int = 0
    total_charges_within_10pct: int = 0

    def add(self, customer: TelcoCustomer, events: list[dict[str, Any]]) -> None:
        self.customers += 1
        self.events += len(events)
        for event in events:
            self.by_type[event["type"]] = self.by_type.get(event["type"], 0) + 1
        self.churned += customer.churned
        if customer.total_charges is None:
            self.blank_total_charges += 1
        elif customer.total_charges > 0:
            self.total_charges_checked += 1
            invoiced = customer.monthly_charges * customer.tenure
            if abs(invoiced - customer.total_charges) <= customer.total_charges * Decimal("0.1"):
                self.total_charges_within_10pct += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "customers": self.customers, "events": self.events, "by_type": dict(sorted(self.by_type.items())),
            "churned": self.churned, "blank_total_charges": self.blank_total_charges,
            "total_charges_checked": self.total_charges_checked,
            "total_charges_within_10pct": self.total_charges_within_10pct,
        }


# --- reading ---------------------------------------------------------------------------


def _money(value: str, line: int, name: str) -> Decimal:
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise TelcoFormatError(f"line {line}: {name} {value!r} is not a number") from None
    if amount < 0 or not amount.is_finite():
        raise TelcoFormatError(f"line {line}: {name} {value!r} must be a non-negative amount")
    return amount


def read_customers(lines: Iterable[str]) -> Iterator[TelcoCustomer]:
    """Typed rows from the CSV text (an open file or any iterable of lines), one at a time."""
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise TelcoFormatError(f"not the Telco table: missing column(s) {', '.join(missing)}")
    for row in reader:
        line = reader.line_num
        customer_id = (row["customerID"] or "").strip()
        if not customer_id:
            raise TelcoFormatError(f"line {line}: customerID is empty")
        try:
            tenure = int(row["tenure"])
        except (TypeError, ValueError):
            raise TelcoFormatError(f"line {line}: tenure {row['tenure']!r} is not a whole number of months") from None
        if not 0 <= tenure <= 1200:
            raise TelcoFormatError(f"line {line}: tenure {tenure} is out of range (0..1200 months)")
        contract = row["Contract"]
        if contract not in TERM_MONTHS:
            raise TelcoFormatError(f"line {line}: Contract {contract!r} is not one of {', '.join(TERM_MONTHS)}")
        if row["Churn"] not in _YES_NO:
            raise TelcoFormatError(f"line {line}: Churn {row['Churn']!r} is not Yes or No")
        total = (row["TotalCharges"] or "").strip()
        yield TelcoCustomer(
            customer_id=customer_id, tenure=tenure, contract=contract,
            monthly_charges=_money(row["MonthlyCharges"] or "", line, "MonthlyCharges"),
            total_charges=_money(total, line, "TotalCharges") if total else None,
            churned=_YES_NO[row["Churn"]], row=dict(row),
        )


# --- events ----------------------------------------------------------------------------


def add_months(day: date, months: int) -> date:
    """Calendar months; the day is clamped to the month's length (Jan 31 + 1 -> Feb 28/29)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    for candidate in (day.day, 30, 29, 28):
        try:
            return date(year, month, min(day.day, candidate))
        except ValueError:
            continue
    raise AssertionError("unreachable")


def _at(day: date) -> str:
    return datetime.combine(day, time(0, 0), tzinfo=timezone.utc).isoformat()


def _amount(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.01'))}"


def _segment(row: dict[str, str]) -> str:
    if row["SeniorCitizen"].strip() == "1":
        return "senior"
    if row["Dependents"] == "Yes":
        return "family"
    return "couple" if row["Partner"] == "Yes" else "single"


def customer_events(
    customer: TelcoCustomer, reference: date = DEFAULT_REFERENCE, *, currency: str = DEFAULT_CURRENCY, source: str = SOURCE,
) -> list[dict[str, Any]]:
    """The customer's history up to the reference date R (midnight UTC), in time order;
    each event is a dict valid under shared.events.parse_event. No label in it."""
    cid = customer.customer_id
    start = add_months(reference, -customer.tenure)
    term = customer.term_months
    price = _amount(customer.monthly_charges)
    contract_id = f"telco-{cid}"

    def event(kind: str, n: int, day: date, data: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"telco:{cid}:{kind}:{n}", "type": kind, "customer_id": cid, "occurred_at": _at(day),
                "source": source, "data": data}

    row = customer.row
    attributes: dict[str, str | int | float | bool] = {
        "senior_citizen": row["SeniorCitizen"].strip() == "1",
        **{_snake(name): _YES_NO[row[name]] for name in _YES_NO_ATTRIBUTES if row[name] in _YES_NO},
        **{_snake(name): row[name] for name in _TEXT_ATTRIBUTES if row[name]},
    }
    events = [event("customer.profile_updated", 0, start, {
        "segment": _segment(row), "signed_up_at": _at(start), "attributes": attributes,
    })]

    def contract(term_start: date) -> dict[str, Any]:
        return {"contract_id": contract_id, "plan": customer.contract, "price": price, "currency": currency,
                "start_date": term_start.isoformat(), "end_date": add_months(term_start, term).isoformat(),
                "auto_renew": term == 1}

    events.append(event("subscription.started", 0, start, contract(start)))
    # Term boundaries up to and including R: the last contract event is the term containing R.
    for n in range(1, customer.tenure // term + 1):
        boundary = add_months(start, n * term)
        events.append(event("subscription.renewed", n, boundary, contract(boundary)))
    # One invoice at the end of each month of tenure; the n-th closes month n (the last at R).
    for n in range(1, customer.tenure + 1):
        events.append(event("order.completed", n, add_months(start, n), {
            "order_id": f"telco-{cid}-invoice-{n}", "amount": price, "currency": currency,
        }))
    events.sort(key=lambda e: e["occurred_at"])  # stable: profile, start, renewal, invoice
    return events


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def convert(
    lines: Iterable[str], reference: date = DEFAULT_REFERENCE, *, currency: str = DEFAULT_CURRENCY,
) -> Iterator[tuple[TelcoCustomer, list[dict[str, Any]]]]:
    """(customer, their events) per row, streaming. The label is `customer.churned`."""
    for customer in read_customers(lines):
        yield customer, customer_events(customer, reference, currency=currency)


def write_files(
    csv_path: Path, events_path: Path, labels_path: Path, reference: date = DEFAULT_REFERENCE,
    *, currency: str = DEFAULT_CURRENCY, limit: int | None = None,
) -> Summary:
    """Read the table at `csv_path` and write the events as NDJSON (what `churnguard import`
    reads) and the labels as CSV `customer_id,churned` (1/0), separately. `limit` keeps the
    first N customers (a documented subset)."""
    summary = Summary()
    with open(csv_path, encoding="utf-8", newline="") as source, \
            open(events_path, "w", encoding="utf-8") as events_out, \
            open(labels_path, "w", encoding="utf-8", newline="") as labels_out:
        labels = csv.writer(labels_out, lineterminator="\n")
        labels.writerow(["customer_id", "churned"])
        for customer, events in convert(source, reference, currency=currency):
            if limit is not None and summary.customers >= limit:
                break
            for event in events:
                events_out.write(json.dumps(event, separators=(",", ":")) + "\n")
            labels.writerow([customer.customer_id, int(customer.churned)])
            summary.add(customer, events)
    return summary


def read_labels(labels_path: Path) -> dict[str, int]:
    with open(labels_path, encoding="utf-8", newline="") as handle:
        return {row["customer_id"]: int(row["churned"]) for row in csv.DictReader(handle)}
