"""The uplift report: treated vs control churn per policy and risk band, with a 95% interval.

Units are customers: each customer counts once per policy, with their first sent decision
(treated) or first holdout decision (control) under it; the band is the one at that decision.
Only decisions whose horizon H is over (decided_at + H <= now) count. A unit churned when,
within (decided_at, decided_at + H], a contract of theirs ended (subscription.ended) or they did
nothing at all (no activity day). Formulas in docs/policies.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from datetime import date, datetime, timedelta

Z_95 = 1.959963984540054
INTERVAL = "Newcombe hybrid score interval (method 10, from Wilson intervals), 95%"


def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of one proportion."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference(
    x1: int, n1: int, x2: int, n2: int, z: float = Z_95
) -> tuple[float, float, float]:
    """p1 - p2 with Newcombe's hybrid score interval (Newcombe 1998, method 10): better coverage
    than the Wald interval for small groups and rates near 0 or 1. Returns (diff, low, high)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    diff = p1 - p2
    low = diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return diff, low, high


def churned(
    decided_at: datetime,
    horizon: timedelta,
    activity: Iterable[date],
    contract_ends: Iterable[datetime],
) -> bool:
    end = decided_at + horizon
    if any(decided_at < ended <= end for ended in contract_ends):
        return True
    return not any(decided_at.date() < day <= end.date() for day in activity)


@dataclass(frozen=True)
class Unit:
    policy: str
    band: str
    customer_id: str
    treated: bool
    churned: bool
    redeemed: bool
    offer_cost: float
    customer_value: float


@dataclass
class GroupReport:
    policy: str
    band: str
    treated_customers: int = 0
    control_customers: int = 0
    treated_churned: int = 0
    control_churned: int = 0
    treated_churn_rate: float | None = None
    control_churn_rate: float | None = None
    uplift: float | None = None
    uplift_ci_low: float | None = None
    uplift_ci_high: float | None = None
    redemptions: int = 0
    offer_cost: float = 0.0
    retained_customers: float | None = None
    retained_revenue: float | None = None
    roi: float | None = None
    _values: list[float] = field(default_factory=list, repr=False)


def summarise(policy: str, band: str, units: Sequence[Unit]) -> GroupReport:
    """uplift = control churn rate - treated churn rate (churn prevented per treated customer);
    retained customers = uplift x treated; retained revenue = that x mean treated customer
    value; ROI = (retained revenue - offer cost) / offer cost."""
    group = GroupReport(policy, band)
    for unit in units:
        if unit.treated:
            group.treated_customers += 1
            group.treated_churned += unit.churned
            group.redemptions += unit.redeemed
            group.offer_cost += unit.offer_cost
            group._values.append(unit.customer_value)
        else:
            group.control_customers += 1
            group.control_churned += unit.churned
    group.offer_cost = round(group.offer_cost, 4)
    if group.treated_customers:
        group.treated_churn_rate = group.treated_churned / group.treated_customers
    if group.control_customers:
        group.control_churn_rate = group.control_churned / group.control_customers
    if group.treated_customers and group.control_customers:
        diff, low, high = newcombe_difference(
            group.control_churned, group.control_customers,
            group.treated_churned, group.treated_customers,
        )
        group.uplift, group.uplift_ci_low, group.uplift_ci_high = diff, low, high
        group.retained_customers = diff * group.treated_customers
        mean_value = sum(group._values) / len(group._values)
        group.retained_revenue = round(group.retained_customers * mean_value, 4)
        if group.offer_cost > 0:
            group.roi = (group.retained_revenue - group.offer_cost) / group.offer_cost
    return group


def build_report(units: Sequence[Unit]) -> list[GroupReport]:
    """One row per policy and band, and one per policy over all bands (band "all")."""
    by_group: dict[tuple[str, str], list[Unit]] = {}
    for unit in units:
        by_group.setdefault((unit.policy, unit.band), []).append(unit)
        by_group.setdefault((unit.policy, "all"), []).append(unit)
    return [summarise(policy, band, by_group[(policy, band)]) for policy, band in sorted(by_group)]


@dataclass(frozen=True)
class DecisionFacts:
    policy: str
    band: str | None
    customer_id: str
    treated: bool
    decided_at: datetime
    offer_id: str | None
    offer_cost: float
    customer_value: float


def units_from(
    decisions: Sequence[DecisionFacts],
    horizon: timedelta,
    activity: Mapping[str, list[date]],
    ends: Mapping[str, list[datetime]],
    redeemed: set[str],
) -> list[Unit]:
    """The first decision per (policy, customer), in the order given (oldest first)."""
    seen: set[tuple[str, str]] = set()
    units = []
    for d in decisions:
        if (d.policy, d.customer_id) in seen:
            continue
        seen.add((d.policy, d.customer_id))
        units.append(
            Unit(
                policy=d.policy,
                band=d.band or "unknown",
                customer_id=d.customer_id,
                treated=d.treated,
                churned=churned(
                    d.decided_at,
                    horizon,
                    activity.get(d.customer_id, ()),
                    ends.get(d.customer_id, ()),
                ),
                redeemed=d.treated and d.offer_id in redeemed,
                offer_cost=d.offer_cost if d.treated else 0.0,
                customer_value=d.customer_value,
            )
        )
    return units


def uplift_report(
    session: Any, tenant_id: str, now: datetime, horizon: timedelta
) -> list[GroupReport]:
    """Gather the matured decisions and the churn facts of their customers, then summarise."""
    from services.actions import repository  # the pure part above needs no database

    rows = repository.report_decisions(session, tenant_id, now - horizon)
    decisions = [
        DecisionFacts(
            policy=row.policy or "",
            band=row.band,
            customer_id=row.customer_id,
            treated=row.outcome == "offer_created",
            decided_at=row.decided_at,
            offer_id=row.offer_id,
            offer_cost=row.offer_cost or 0.0,
            customer_value=row.customer_value or 0.0,
        )
        for row in rows
    ]
    customers = sorted({d.customer_id for d in decisions})
    activity = repository.activity_days(session, tenant_id, customers)
    ends = repository.contract_ends(session, tenant_id, customers)
    redeemed = repository.redeemed_offers(
        session, tenant_id, [d.offer_id for d in decisions if d.offer_id]
    )
    return build_report(units_from(decisions, horizon, activity, ends, redeemed))


def fleet_totals(session: Any, now: datetime, horizon: timedelta) -> dict[tuple[str, str], tuple[int, int]]:
    """(policy, "treated" | "control") -> (customers, churned) over every tenant, all bands:
    what the uplift metrics export (Prometheus then divides: uplift = control churn rate -
    treated churn rate). Tenants are summed per policy name."""
    from services.actions import repository

    totals: dict[tuple[str, str], list[int]] = {}
    for tenant_id in repository.tenants_with_decisions(session):
        for group in uplift_report(session, tenant_id, now, horizon):
            if group.band != "all":
                continue
            for name, customers, churned in (
                ("treated", group.treated_customers, group.treated_churned),
                ("control", group.control_customers, group.control_churned),
            ):
                total = totals.setdefault((group.policy, name), [0, 0])
                total[0] += customers
                total[1] += churned
    return {key: (customers, churned) for key, (customers, churned) in totals.items()}
