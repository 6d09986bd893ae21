"""Guardrails between a matched policy and a sent offer: pure functions, in the order decide()
applies them (erased, consent, cooldown, budget, value gate, holdout). The holdout comes last so
the control group holds exactly the customers who would otherwise have been sent the offer."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from services.actions.policies import Budget, Offer, ValueGate

_SCALE = float(2**64)


def in_holdout(tenant_id: str, customer_id: str, salt: str, percent: float) -> bool:
    """Deterministic control-group membership: the first 8 bytes of SHA-256(tenant, customer,
    salt) as a fraction of 2^64, below `percent`/100. Stable per customer across processes and
    restarts (no Python hash randomisation); a new salt draws a new group."""
    if percent <= 0:
        return False
    digest = hashlib.sha256(f"{tenant_id}\x1f{customer_id}\x1f{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE < percent / 100.0


def in_cooldown(last_at: datetime | None, now: datetime, cooldown: timedelta) -> bool:
    """True when the last offer is younger than `cooldown` (exactly `cooldown` old is not)."""
    return last_at is not None and now - last_at < cooldown


def period_start(now: datetime, period: str) -> datetime:
    """Start of the budget period holding `now`: ISO week (Monday 00:00 UTC) or calendar month."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown budget period {period!r}")


def within_budget(budget: Budget, used_count: int, used_cost: float, offer_cost: float) -> bool:
    """Whether one more offer (costing `offer_cost`) still fits this period's caps."""
    if budget.max_count is not None and used_count + 1 > budget.max_count:
        return False
    if budget.max_cost is not None and used_cost + offer_cost > budget.max_cost + 1e-9:
        return False
    return True


def expected_value(probability: float | None, customer_value: float, gate: ValueGate) -> float:
    return (probability or 0.0) * customer_value * gate.expected_uplift


def passes_value_gate(
    probability: float | None, customer_value: float, gate: ValueGate, offer: Offer
) -> bool:
    """P(churn) x customer value x expected uplift must exceed the offer's cost (strictly)."""
    return expected_value(probability, customer_value, gate) > offer.cost
