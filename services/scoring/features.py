"""Events -> feature vector. Pure functions, defined once, used for online scoring and training.

Everything is computed from a customer's event history *as of* a moment: events that
occurred after `as_of` are invisible, so a feature can never see past its cutoff (no
leakage in training) and the wall clock is never read. Events are sorted first, so the
order in which they arrived does not matter.

Data the features cannot use is flagged (`event_flags`) and that part is ignored: spend counts
only amounts in MAIN_CURRENCY (no conversion; an order in another currency still counts as an
order, its amount does not), and a contract whose end date lies before its start date is taken
as open-ended (the contract counts, its end date does not).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

FEATURE_NAMES: tuple[str, ...] = (
    "days_since_last_activity",
    "days_since_last_order",
    "orders_30d",
    "orders_90d",
    "orders_365d",
    "spend_90d",
    "spend_365d",
    "order_trend",
    "refunds_365d",
    "complaints_90d",
    "tickets_open",
    "last_nps",
    "has_nps",
    "sessions_30d",
    "has_contract",
    "days_to_contract_end",
    "contract_auto_renew",
    "cancellation_notice_given",
    "tenure_days",
)
"""The feature vector, in the order the model sees it."""

NEUTRAL_NPS = 7.0
"""NPS 7-8 are 'passives': the neutral assumption when a customer never answered."""
NO_CONTRACT_END_DAYS = 3650.0
"""days_to_contract_end when there is no contract, or it is open-ended (read has_contract too)."""

# Within one instant, a contract starts before it is cancelled, and ends last.
_TYPE_RANK = {
    "customer.profile_updated": 0,
    "subscription.started": 1,
    "subscription.renewed": 2,
    "support.ticket_opened": 3,
    "support.ticket_resolved": 4,
    "subscription.cancellation_notice": 8,
    "subscription.ended": 9,
}
_DAY = 86_400.0

MAIN_CURRENCY = "EUR"
"""The one currency spend features count (every tenant's main currency in this version)."""
FLAG_CURRENCY = "currency"
FLAG_CONTRACT_DATES = "contract_dates"
FLAG_REASONS: tuple[str, ...] = (FLAG_CURRENCY, FLAG_CONTRACT_DATES)
"""Why an event's data is (partly) unusable for features; the event itself is kept."""
_MONEY_TYPES = frozenset({"order.completed", "order.refunded"})
_CONTRACT_TERM_TYPES = frozenset({"subscription.started", "subscription.renewed"})
FLAGGABLE_TYPES = _MONEY_TYPES | _CONTRACT_TERM_TYPES
"""Event types whose data event_flags looks at (any other type is never flagged)."""


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """The light event shape features are computed from (what the history table stores)."""

    type: str
    occurred_at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""

    def sort_key(self) -> tuple[datetime, int, str]:
        return (self.occurred_at, _TYPE_RANK.get(self.type, 5), self.id)


def as_utc(value: datetime) -> datetime:
    """Naive datetimes (SQLite hands them back that way) are UTC."""
    if value.tzinfo is timezone.utc:  # most are already (called for every history event)
        return value
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, str):
        return as_utc(datetime.fromisoformat(value))
    raise TypeError(f"occurred_at must be a datetime or an ISO string, got {type(value).__name__}")


def _to_date(value: Any) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


def _money(value: Any) -> float:
    try:
        return float(Decimal(str(value)))
    except (InvalidOperation, ValueError):
        return 0.0


def _contract_dates_inconsistent(data: Mapping[str, Any]) -> bool:
    try:
        start, end = _to_date(data.get("start_date")), _to_date(data.get("end_date"))
    except (TypeError, ValueError):
        return True
    return start is not None and end is not None and end < start


def event_flags(kind: str, data: Mapping[str, Any], currency: str = MAIN_CURRENCY) -> list[str]:
    """What in one event features cannot use (FLAG_REASONS), empty when all of it is usable."""
    flags: list[str] = []
    if kind in _MONEY_TYPES and data.get("currency") not in (None, currency):
        flags.append(FLAG_CURRENCY)
    if kind in _CONTRACT_TERM_TYPES and _contract_dates_inconsistent(data):
        flags.append(FLAG_CONTRACT_DATES)
    return flags


def to_history_event(event: Any) -> HistoryEvent:
    """Accept a HistoryEvent, a dict (`type`, `occurred_at`, `data` or `payload`), or an object
    with those attributes (e.g. a parsed shared.events envelope)."""
    if isinstance(event, HistoryEvent):
        return event
    if isinstance(event, Mapping):
        data = event.get("data", event.get("payload")) or {}
        return HistoryEvent(
            type=str(event["type"]), occurred_at=_to_datetime(event["occurred_at"]),
            data=data, id=str(event.get("id", event.get("event_id", "")) or ""),
        )
    data = getattr(event, "data", None) or getattr(event, "payload", None) or {}
    if hasattr(data, "model_dump"):
        data = data.model_dump(mode="json")
    return HistoryEvent(
        type=str(event.type), occurred_at=_to_datetime(event.occurred_at), data=data,
        id=str(getattr(event, "id", "") or getattr(event, "event_id", "") or ""),
    )


def sorted_history(events: Iterable[Any]) -> list[HistoryEvent]:
    return sorted((to_history_event(e) for e in events), key=HistoryEvent.sort_key)


def with_events(history: list[HistoryEvent], new: Iterable[HistoryEvent]) -> list[HistoryEvent]:
    """`history` (sorted by HistoryEvent.sort_key) with `new` added, sorted as one stable sort of
    both would sort them. Events mostly arrive in order: when the new ones all sort after the
    history, only they are sorted (a customer's whole history was, once per batch)."""
    added = sorted(new, key=HistoryEvent.sort_key)
    if not history or not added or history[-1].sort_key() <= added[0].sort_key():
        return [*history, *added]
    return sorted([*history, *added], key=HistoryEvent.sort_key)


def compute_features(events: Iterable[Any], as_of: datetime, currency: str = MAIN_CURRENCY) -> dict[str, float]:
    """The feature vector of one customer from their event history, as of `as_of`."""
    return features_as_of(sorted_history(events), as_of, currency)


def features_as_of(history: list[HistoryEvent], as_of: datetime, currency: str = MAIN_CURRENCY) -> dict[str, float]:
    """compute_features for a whole history that is already sorted (HistoryEvent.sort_key), as
    kept by the consumer's history cache: the events after `as_of`, a suffix of the sorted
    history, are left out, so nothing is sorted or copied again in the usual case."""
    as_of = as_utc(as_of)
    end = len(history)
    while end and history[end - 1].occurred_at > as_of:
        end -= 1
    return features_from_sorted(history if end == len(history) else history[:end], as_of, currency)


def features_from_sorted(
    history: list[HistoryEvent], as_of: datetime, currency: str = MAIN_CURRENCY
) -> dict[str, float]:
    """compute_features for a history that is already sorted (HistoryEvent.sort_key) and
    holds nothing after `as_of` (training calls this on prefixes of one sorted history).
    Spend counts only amounts in `currency`."""
    t30, t90, t180, t365 = (as_of - timedelta(days=d) for d in (30, 90, 180, 365))
    orders_30 = orders_90 = orders_prev_90 = orders_365 = 0
    spend_90 = spend_365 = 0.0
    refunds_365 = complaints_90 = sessions_30 = 0
    opened: set[str] = set()
    resolved: set[str] = set()
    last_nps: float | None = None
    last_order: datetime | None = None
    first_seen: datetime | None = history[0].occurred_at if history else None
    has_contract = False
    contract_end: date | None = None
    auto_renew = False
    notice_given = False

    for event in history:
        at, kind, data = event.occurred_at, event.type, event.data
        if kind == "order.completed":
            last_order = at
            if at > t365:
                orders_365 += 1
                amount = _money(data.get("amount")) if data.get("currency", currency) == currency else 0.0
                spend_365 += amount
                if at > t90:
                    orders_90 += 1
                    spend_90 += amount
                    if at > t30:
                        orders_30 += 1
                elif at > t180:
                    orders_prev_90 += 1
        elif kind == "order.refunded":
            refunds_365 += at > t365
        elif kind == "support.complaint":
            complaints_90 += at > t90
        elif kind == "support.ticket_opened":
            opened.add(str(data.get("ticket_id")))
        elif kind == "support.ticket_resolved":
            resolved.add(str(data.get("ticket_id")))
        elif kind == "feedback.nps":
            last_nps = float(data.get("score", NEUTRAL_NPS))
        elif kind == "session.recorded":
            sessions_30 += at > t30
        elif kind in ("subscription.started", "subscription.renewed"):
            has_contract = True
            contract_end = None if _contract_dates_inconsistent(data) else _to_date(data.get("end_date"))
            auto_renew = bool(data.get("auto_renew", False))
            notice_given = False  # a new term supersedes an earlier notice
        elif kind == "subscription.cancellation_notice":
            has_contract = True
            notice_given = True
            auto_renew = False
            effective = _to_date(data.get("effective_date"))
            if effective is None and contract_end is None:
                effective = (at + timedelta(days=int(data.get("notice_period_days", 0) or 0))).date()
            if effective is not None:
                contract_end = effective
        elif kind == "subscription.ended":
            has_contract = True
            auto_renew = False
            contract_end = _to_date(data.get("end_date")) or at.date()
        elif kind == "customer.profile_updated":
            signed_up = data.get("signed_up_at")
            if signed_up:
                signed = _to_datetime(signed_up)
                if signed <= as_of and (first_seen is None or signed < first_seen):
                    first_seen = signed

    tenure = (as_of - first_seen).total_seconds() / _DAY if first_seen else 0.0
    last_activity = history[-1].occurred_at if history else None
    if has_contract and contract_end is not None:
        days_to_end = float((contract_end - as_of.date()).days)
    else:
        days_to_end = NO_CONTRACT_END_DAYS
    recent, previous = orders_90, orders_prev_90
    return {
        "days_since_last_activity": (as_of - last_activity).total_seconds() / _DAY if last_activity else 0.0,
        "days_since_last_order": (as_of - last_order).total_seconds() / _DAY if last_order else tenure,
        "orders_30d": float(orders_30),
        "orders_90d": float(orders_90),
        "orders_365d": float(orders_365),
        "spend_90d": round(spend_90, 4),
        "spend_365d": round(spend_365, 4),
        "order_trend": (recent - previous) / (recent + previous) if recent + previous else 0.0,
        "refunds_365d": float(refunds_365),
        "complaints_90d": float(complaints_90),
        "tickets_open": float(len(opened - resolved)),
        "last_nps": last_nps if last_nps is not None else NEUTRAL_NPS,
        "has_nps": 1.0 if last_nps is not None else 0.0,
        "sessions_30d": float(sessions_30),
        "has_contract": 1.0 if has_contract else 0.0,
        "days_to_contract_end": days_to_end,
        "contract_auto_renew": 1.0 if auto_renew else 0.0,
        "cancellation_notice_given": 1.0 if notice_given else 0.0,
        "tenure_days": tenure,
    }


def feature_vector(features: Mapping[str, float], names: Iterable[str] = FEATURE_NAMES) -> list[float]:
    """The features in model order; a missing name is an error (model and code disagree)."""
    return [float(features[name]) for name in names]
