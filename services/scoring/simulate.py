"""Synthetic but plausible customer histories, for demos, training and tests.

Each customer has a latent churn propensity. It drives how often they complain and open
tickets, how they answer NPS surveys, whether their contract renews itself, and the hazard
of entering a *decline*: orders thin out, complaints and open tickets pile up, NPS drops,
and then they leave — a subscriber gives notice and the contract ends, a shop customer
simply goes silent. A few leave without any warning (noise), and loyal customers order
regularly, give high NPS and renew. Deterministic for a seed; nothing after `end`.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from services.scoring.features import as_utc

SOURCE = "simulator"
_NAMESPACE = uuid.UUID("6f1c7f1e-3a0b-4d5e-9a59-1b9f5d0c2a11")
_SEGMENT = timedelta(days=15)
_PLANS = (("basic", "9.90"), ("plus", "19.90"), ("premium", "39.90"))
_COUNTRIES = ("DE", "DE", "DE", "AT", "CH", "NL", "FR")


def simulate_history(
    n_customers: int, seed: int, end: datetime, days: int = 730, customer_prefix: str | None = None
) -> Iterator[dict[str, Any]]:
    """Yield events (dicts valid under shared.events.parse_event), customer by customer,
    each customer's in time order, all with `occurred_at <= end`."""
    if n_customers < 0 or days < 30:
        raise ValueError("n_customers must be >= 0 and days >= 30")
    end = as_utc(end).replace(microsecond=0)
    start = end - timedelta(days=days)
    prefix = f"sim{seed}-" if customer_prefix is None else customer_prefix
    for index in range(n_customers):
        rng = random.Random(f"churnguard-sim:{seed}:{index}")
        customer = _Customer(rng, f"{prefix}{index:05d}", start, end)
        yield from customer.events(seed)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation, never needed at our rates but keeps it bounded
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    threshold, k, product = math.exp(-lam), 0, rng.random()
    while product > threshold:
        k += 1
        product *= rng.random()
    return k


def _iso(moment: datetime) -> str:
    return moment.replace(microsecond=0).isoformat()


@dataclass
class _Contract:
    contract_id: str
    plan: str
    price: str
    start: date
    end: date
    auto_renew: bool
    notice_period_days: int = 30

    def data(self) -> dict[str, Any]:
        return {
            "contract_id": self.contract_id, "plan": self.plan, "price": self.price,
            "currency": "EUR", "start_date": self.start.isoformat(), "end_date": self.end.isoformat(),
            "auto_renew": self.auto_renew, "notice_period_days": self.notice_period_days,
        }


@dataclass
class _Customer:
    rng: random.Random
    customer_id: str
    start: datetime
    end: datetime
    out: list[tuple[datetime, str, dict[str, Any]]] = field(default_factory=list)
    tickets: int = 0
    orders: int = 0

    def __post_init__(self) -> None:
        r = self.rng
        self.propensity = r.betavariate(1.3, 3.5)
        self.existing = r.random() < 0.35  # signed up before the history window
        span = (self.end - self.start).total_seconds()
        if self.existing:
            self.signup = self.start - timedelta(days=r.uniform(30, 900))
            self.first = self.start + timedelta(seconds=r.uniform(0, 86_400 * 10))
        else:
            self.signup = self.start + timedelta(seconds=r.uniform(0, span - 86_400 * 20))
            self.first = self.signup
        p = self.propensity
        self.order_rate = math.exp(r.gauss(math.log(1.3), 0.5)) * (1.25 - 0.6 * p)  # per 30 days
        self.basket = math.exp(r.gauss(math.log(55), 0.45))
        self.session_rate = 0.0 if r.random() < 0.5 else r.uniform(0.5, 2.5) * (1.2 - 0.5 * p)
        self.loyalty = r.random() < 0.4
        self.subscriber = r.random() < 0.55
        self.decline_start: datetime | None = None
        self.decline_days = 0.0
        self.notice_at: datetime | None = None
        self.silent_at: datetime | None = None  # nothing happens from here on

    # -- helpers ----------------------------------------------------------------------

    def emit(self, moment: datetime, kind: str, data: dict[str, Any]) -> None:
        if moment <= self.end and moment >= self.first and (self.silent_at is None or moment < self.silent_at):
            self.out.append((moment, kind, data))

    def _between(self, a: datetime, b: datetime) -> datetime:
        return a + timedelta(seconds=self.rng.uniform(0, max((b - a).total_seconds(), 1)))

    def _progress(self, moment: datetime) -> float:
        if self.decline_start is None or moment < self.decline_start:
            return 0.0
        return min(1.0, (moment - self.decline_start).total_seconds() / 86_400 / self.decline_days)

    def _new_contract(self, begins: date, renewal_of: _Contract | None = None) -> _Contract:
        r = self.rng
        plan, price = r.choice(_PLANS) if renewal_of is None else (renewal_of.plan, renewal_of.price)
        auto = r.random() < (0.7 - 0.55 * self.propensity) if renewal_of is None else renewal_of.auto_renew
        return _Contract(
            contract_id=f"k-{self.customer_id}-{begins.isoformat()}", plan=plan, price=price,
            start=begins, end=begins + timedelta(days=365), auto_renew=auto,
            notice_period_days=r.choice((30, 30, 60)),
        )

    def _start_decline(self, moment: datetime, days: float) -> None:
        if self.decline_start is None:
            self.decline_start, self.decline_days = moment, days

    # -- the story --------------------------------------------------------------------

    def events(self, seed: int) -> Iterator[dict[str, Any]]:
        self._story()
        self.out.sort(key=lambda item: item[0])
        for number, (moment, kind, data) in enumerate(self.out):
            yield {
                "id": uuid.uuid5(_NAMESPACE, f"{seed}/{self.customer_id}/{number}").hex,
                "type": kind, "customer_id": self.customer_id, "occurred_at": _iso(moment),
                "source": SOURCE, "data": data,
            }

    def _story(self) -> None:
        r, p = self.rng, self.propensity
        self.emit(self.first, "customer.profile_updated", {
            "email": f"{self.customer_id}@example.com", "country": r.choice(_COUNTRIES),
            "segment": "business" if r.random() < 0.2 else "consumer", "signed_up_at": _iso(self.signup),
        })
        self.emit(self.first + timedelta(seconds=1), "customer.consent_changed",
                  {"marketing": r.random() < 0.75, "channel": "email"})
        contract: _Contract | None = None
        if self.subscriber:
            begins = self.signup.date()
            while begins + timedelta(days=365) <= self.first.date():
                begins += timedelta(days=365)
            contract = self._new_contract(begins)
            self.emit(self.first + timedelta(seconds=2), "subscription.started", contract.data())
        decided_for: str | None = None  # the contract whose renewal was decided

        t = self.first
        while t < self.end and (self.silent_at is None or t < self.silent_at):
            seg_end = min(t + _SEGMENT, self.end)
            months = (seg_end - t).total_seconds() / (86_400 * 30)
            # Leaving: a decline with warning signs, or (rarely) silently without any.
            if self.decline_start is None and r.random() < (0.003 + 0.09 * p ** 1.5) * months:
                self._start_decline(self._between(t, seg_end), r.uniform(45, 150))
            if self.silent_at is None and self.decline_start is None and r.random() < 0.0015 * months:
                self.silent_at = self._between(t, seg_end)
            if contract is not None:
                contract = self._contract_step(contract, t, seg_end, decided_for == contract.contract_id)
                decided_for = contract.contract_id if contract else decided_for
            elif self.decline_start is not None and self.silent_at is None:
                self.silent_at = self.decline_start + timedelta(days=self.decline_days)
            self._activity(t, seg_end, months)
            t = seg_end

    def _contract_step(self, contract: _Contract, t: datetime, seg_end: datetime, decided: bool) -> _Contract:
        r, p = self.rng, self.propensity
        end_at = datetime.combine(contract.end, datetime.min.time(), tzinfo=t.tzinfo)
        if self.decline_start is not None and self.notice_at is None and t >= self.decline_start:
            # Unhappy: notice halfway through the decline, effective at the end of the term
            # if that is near, otherwise after the notice period.
            self.notice_at = self.decline_start + timedelta(days=self.decline_days / 2)
            effective = self.notice_at.date() + timedelta(days=contract.notice_period_days)
            if contract.end < effective + timedelta(days=120):
                effective = max(contract.end, effective)
            self._leave(contract, self.notice_at, effective)
            return contract
        if not decided and end_at - timedelta(days=120) < seg_end and self.notice_at is None:
            # The renewal decision, taken four months before the term ends.
            stays = 0.97 if contract.auto_renew else (0.93 - 0.75 * p)
            if r.random() >= stays:
                latest = end_at - timedelta(days=contract.notice_period_days)
                self.notice_at = self._between(max(latest - timedelta(days=45), t), latest)
                if r.random() < 0.6:  # most are unhappy first; the rest just switch on price
                    self._start_decline(end_at - timedelta(days=r.uniform(60, 120)), r.uniform(60, 120))
                self._leave(contract, self.notice_at, contract.end)
            return contract
        if self.notice_at is None and t <= end_at < seg_end:
            renewed = self._new_contract(contract.end, renewal_of=contract)
            self.emit(end_at + timedelta(hours=r.uniform(0, 6)), "subscription.renewed", renewed.data())
            return renewed
        return contract

    def _leave(self, contract: _Contract, notice_at: datetime, effective: date) -> None:
        self.emit(notice_at, "subscription.cancellation_notice", {
            "contract_id": contract.contract_id, "notice_period_days": contract.notice_period_days,
            "effective_date": effective.isoformat(),
            "reason": self.rng.choice(("price", "service", "moved", "competitor", "no reason given")),
        })
        ended = datetime.combine(effective, datetime.min.time(), tzinfo=notice_at.tzinfo) + timedelta(hours=1)
        self.emit(ended, "subscription.ended", {"contract_id": contract.contract_id, "end_date": effective.isoformat()})
        self.silent_at = ended + timedelta(seconds=1)

    def _activity(self, a: datetime, b: datetime, months: float) -> None:
        r, p = self.rng, self.propensity
        progress = self._progress(a + (b - a) / 2)
        after_notice = self.notice_at is not None and a >= self.notice_at
        order_mult = 0.1 if after_notice else 1.0 - 0.85 * progress
        for _ in range(_poisson(r, self.order_rate * order_mult * months)):
            self._order(self._between(a, b))
        for _ in range(_poisson(r, self.session_rate * (1 - 0.8 * progress) * months)):
            at = self._between(a, b)
            self.emit(at, "session.recorded", {"duration_seconds": int(r.expovariate(1 / 300)),
                                               "channel": r.choice(("web", "app"))})
        for _ in range(_poisson(r, (0.08 + 0.5 * p) * (1 + 2.5 * progress) * months)):
            self._ticket(self._between(a, b), complaint=False)
        for _ in range(_poisson(r, (0.02 + 0.3 * p) * (1 + 4 * progress) * months)):
            self._ticket(self._between(a, b), complaint=True)
        for _ in range(_poisson(r, (0.2 + 0.4 * progress) * months)):
            mean = 9.4 - 6.5 * p - 3.5 * progress
            self.emit(self._between(a, b), "feedback.nps", {"score": max(0, min(10, round(r.gauss(mean, 1.3))))})

    def _order(self, at: datetime) -> None:
        r, p = self.rng, self.propensity
        self.orders += 1
        amount = max(3.0, r.gauss(self.basket, self.basket * 0.3))
        order_id = f"o-{self.customer_id}-{self.orders}"
        self.emit(at, "order.completed", {"order_id": order_id, "amount": f"{amount:.2f}",
                                          "currency": "EUR", "items": r.randint(1, 5)})
        if self.loyalty:
            self.emit(at + timedelta(seconds=5), "loyalty.points_earned", {"points": max(1, int(amount))})
            if self.orders % 12 == 0:
                tiers = ("bronze", "silver", "gold", "platinum")
                level = min(self.orders // 12, 3)
                self.emit(at + timedelta(seconds=6), "loyalty.tier_changed",
                          {"tier": tiers[level], "previous_tier": tiers[level - 1]})
        if r.random() < 0.03 + 0.15 * p:
            self.emit(at + timedelta(days=r.uniform(2, 20)), "order.refunded", {
                "order_id": order_id, "amount": f"{amount:.2f}", "currency": "EUR",
                "reason": r.choice(("damaged", "not as described", "late delivery")),
            })

    def _ticket(self, at: datetime, complaint: bool) -> None:
        r, p = self.rng, self.propensity
        self.tickets += 1
        ticket_id = f"t-{self.customer_id}-{self.tickets}"
        self.emit(at, "support.ticket_opened", {"ticket_id": ticket_id, "channel": r.choice(("email", "phone", "chat")),
                                                "subject": "complaint" if complaint else "question"})
        if complaint:
            severity = "high" if r.random() < p else r.choice(("low", "medium"))
            self.emit(at + timedelta(minutes=1), "support.complaint",
                      {"ticket_id": ticket_id, "severity": severity, "category": r.choice(("delivery", "billing", "product"))})
        progress = self._progress(at)
        if r.random() < 0.92 - 0.3 * p - 0.4 * progress:
            resolved = at + timedelta(hours=r.uniform(2, 24 * (2 + 10 * p)))
            self.emit(resolved, "support.ticket_resolved", {"ticket_id": ticket_id})
            if r.random() < 0.3:
                self.emit(resolved + timedelta(hours=1), "feedback.csat",
                          {"score": max(1, min(5, round(r.gauss(4.6 - 2.5 * p - 1.5 * progress, 0.8))))})
