"""Retention policies: pure functions from a score (and what we already did) to a verdict.

No database, no transport: the caller gathers the facts a policy needs (here: when the
customer last got an offer) into a `ScoreContext`, and persists the `Verdict`. A later
issue can add declarative policies behind the same `Policy` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol

Outcome = Literal["offer_created", "suppressed"]

OFFER_CREATED: Outcome = "offer_created"
SUPPRESSED: Outcome = "suppressed"

# Reasons (low cardinality: they are metric labels).
ABOVE_THRESHOLD = "above_threshold"
BELOW_THRESHOLD = "below_threshold"
COOLDOWN = "cooldown"


@dataclass(frozen=True)
class ScoreContext:
    probability: float
    band: str
    now: datetime
    last_offer_at: datetime | None = None


@dataclass(frozen=True)
class OfferSpec:
    kind: str
    discount_percent: int
    valid_until: datetime


@dataclass(frozen=True)
class Verdict:
    policy: str
    outcome: Outcome
    reason: str
    offer: OfferSpec | None = None


class Policy(Protocol):
    name: str

    def evaluate(self, context: ScoreContext) -> Verdict: ...


@dataclass(frozen=True)
class HighRiskDiscountPolicy:
    """A discount when the churn probability reaches the threshold, once per cooldown."""

    threshold: float = 0.7
    cooldown: timedelta = timedelta(days=30)
    discount_percent: int = 15
    validity: timedelta = timedelta(days=14)
    name: str = "high-risk-discount"
    kind: str = "discount"

    def evaluate(self, context: ScoreContext) -> Verdict:
        if context.probability < self.threshold:
            return Verdict(self.name, SUPPRESSED, BELOW_THRESHOLD)
        if in_cooldown(context.last_offer_at, context.now, self.cooldown):
            return Verdict(self.name, SUPPRESSED, COOLDOWN)
        offer = OfferSpec(self.kind, self.discount_percent, context.now + self.validity)
        return Verdict(self.name, OFFER_CREATED, ABOVE_THRESHOLD, offer)


def in_cooldown(last_offer_at: datetime | None, now: datetime, cooldown: timedelta) -> bool:
    """True when the last offer is younger than `cooldown` (exactly `cooldown` old is not)."""
    return last_offer_at is not None and now - last_offer_at < cooldown
