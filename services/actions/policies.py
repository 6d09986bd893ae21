"""Declarative retention policies: the document (offer catalog + policies), its validation, and
the pure matching of one trigger's facts against it.

No database, no transport. The same pydantic models validate the YAML file loaded at start
(`policies_file`, the default set) and the documents tenants PUT through the API (which replace
the default set for that tenant). Policies are evaluated in `priority` order (lowest first); the
first whose trigger and conditions match is chosen, and only then do guardrails (consent,
cooldown, budget, value gate, holdout; see guardrails.py) decide whether its offer is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Outcome = Literal["offer_created", "suppressed"]

OFFER_CREATED: Outcome = "offer_created"
SUPPRESSED: Outcome = "suppressed"

# Reasons (low cardinality: they are metric labels).
MATCHED = "matched"
NO_MATCH = "no_match"
COOLDOWN = "cooldown"
CONSENT = "consent"
HOLDOUT = "holdout"
BUDGET = "budget"
VALUE_GATE = "value_gate"
ERASED = "erased"
REASONS = (MATCHED, NO_MATCH, COOLDOWN, CONSENT, HOLDOUT, BUDGET, VALUE_GATE, ERASED)

Trigger = Literal["score", "contract_end", "cancellation", "complaint", "feedback"]
TRIGGERS: tuple[str, ...] = ("score", "contract_end", "cancellation", "complaint", "feedback")
"""What makes actions evaluate policies: a new churn score; the contract-end sweep reaching one
of a policy's `days_before_end`; a customer event (a cancellation notice, a complaint, an NPS or
CSAT answer) that occurred recently (`event_trigger_max_age_hours`)."""

OfferKind = Literal[
    "discount",
    "loyalty_bonus",
    "tier_upgrade",
    "renewal_offer",
    "free_shipping",
    "cross_sell_bundle",
    "personal_call",
    "feedback_survey",
    "service_recovery",
]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
AttributeValue = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Offer(_Strict):
    """One instrument of the catalog. `cost` is what one sent offer is expected to cost the shop
    (discount given away, points, an agent's time): the value gate and the uplift report use it.
    `service: true` marks a non-marketing message (service recovery, a survey): it may go to
    customers without marketing consent and does not count against the customer-wide cooldown."""

    kind: OfferKind
    cost: float = Field(0.0, ge=0)
    currency: str = Field("EUR", pattern=r"^[A-Z]{3}$")
    service: bool = False
    validity_days: int = Field(14, ge=1, le=366)
    description: str | None = Field(None, max_length=500)
    discount_percent: int | None = Field(None, gt=0, le=100)
    discount_amount: float | None = Field(None, gt=0)
    bonus_points: int | None = Field(None, gt=0)
    target_tier: str | None = Field(None, min_length=1, max_length=64)
    renewal_months: int | None = Field(None, ge=1, le=120)
    bundle: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, min_length=1, max_length=20
    )
    survey_url: str | None = Field(None, max_length=2000)
    call_within_hours: int | None = Field(None, ge=1, le=720)

    @model_validator(mode="after")
    def _kind_has_its_parameters(self) -> Offer:
        if self.kind == "discount" and (self.discount_percent is None) == (
            self.discount_amount is None
        ):
            raise ValueError("a discount needs exactly one of discount_percent or discount_amount")
        if self.kind == "loyalty_bonus" and self.bonus_points is None:
            raise ValueError("a loyalty_bonus needs bonus_points")
        if self.kind == "tier_upgrade" and self.target_tier is None:
            raise ValueError("a tier_upgrade needs target_tier")
        if self.kind == "cross_sell_bundle" and not self.bundle:
            raise ValueError("a cross_sell_bundle needs bundle (product ids)")
        return self

    def details(self) -> dict[str, Any]:
        """What the webhook carries about the instrument (no internal cost)."""
        return self.model_dump(exclude={"cost", "description"}, exclude_none=True)


class Range(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self

    def contains(self, value: float | None) -> bool:
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Conditions(_Strict):
    """All given conditions must hold (AND); an absent condition is not checked. A condition on a
    fact the customer does not have (no NPS answer, no contract, no tier) does not hold."""

    score: Range | None = Field(None, description="Churn probability, 0..1.")
    bands: list[Literal["low", "medium", "high"]] | None = Field(None, min_length=1)
    score_change: Range | None = Field(
        None, description="This probability minus the customer's previous one."
    )
    segments: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1
    )
    customer_value: Range | None = Field(
        None, description="CLV: profile attribute `clv` when given, else spend over 365 days."
    )
    loyalty_tiers: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1
    )
    days_to_contract_end: Range | None = None
    auto_renew: bool | None = None
    cancellation_notice: bool | None = None
    complaint_within_days: int | None = Field(None, ge=1, le=3650)
    max_nps: int | None = Field(None, ge=0, le=10)
    max_csat: int | None = Field(None, ge=1, le=5)
    attributes: dict[
        Annotated[str, Field(min_length=1, max_length=128)],
        AttributeValue | list[AttributeValue],
    ] | None = Field(None, description="Profile attribute equals the value (or is in the list).")

    @model_validator(mode="after")
    def _score_in_unit_interval(self) -> Conditions:
        if self.score is not None:
            for edge in (self.score.min, self.score.max):
                if edge is not None and not 0.0 <= edge <= 1.0:
                    raise ValueError("score bounds must lie within 0..1")
        return self


class Budget(_Strict):
    period: Literal["week", "month"]
    max_count: int | None = Field(None, ge=0)
    max_cost: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _some_cap(self) -> Budget:
        if self.max_count is None and self.max_cost is None:
            raise ValueError("a budget needs max_count, max_cost or both")
        return self


class ValueGate(_Strict):
    """Send only when P(churn) x customer value x expected_uplift > the offer's cost."""

    expected_uplift: float = Field(gt=0, le=1)


class Policy(_Strict):
    name: Name
    priority: int = Field(ge=0, le=1_000_000, description="Lower is evaluated first.")
    description: str | None = Field(None, max_length=500)
    enabled: bool = True
    triggers: list[Trigger] = Field(default_factory=lambda: ["score"], min_length=1)
    days_before_end: list[Annotated[int, Field(ge=0, le=3650)]] | None = Field(
        None, min_length=1, description="contract_end trigger: fire this many days before the end."
    )
    when: Conditions = Field(default_factory=Conditions)
    offer: Name = Field(description="A key of the document's `offers` catalog.")
    cooldown_days: float = Field(30, ge=0, description="No second offer of this policy within.")
    respect_customer_cooldown: bool = Field(
        True, description="Also wait for the customer-wide cooldown (playbook steps may not)."
    )
    budget: Budget | None = None
    value_gate: ValueGate | None = None

    @model_validator(mode="after")
    def _contract_end_needs_days(self) -> Policy:
        if ("contract_end" in self.triggers) != (self.days_before_end is not None):
            raise ValueError(
                "days_before_end is required with, and only with, trigger contract_end"
            )
        return self


class PolicyDocument(_Strict):
    """A full set of policies and the offer catalog they draw from."""

    customer_cooldown_days: float = Field(
        30, ge=0, description="At most one marketing offer per customer within this many days."
    )
    offers: dict[Name, Offer] = Field(min_length=1)
    policies: list[Policy] = Field(max_length=200)

    @model_validator(mode="after")
    def _consistent(self) -> PolicyDocument:
        names, priorities = set(), set()
        for index, policy in enumerate(self.policies):
            if policy.name in names:
                raise ValueError(f"policies[{index}].name: duplicate policy name '{policy.name}'")
            if policy.priority in priorities:
                raise ValueError(
                    f"policies[{index}].priority: priority {policy.priority} is used twice"
                )
            if policy.offer not in self.offers:
                raise ValueError(
                    f"policies[{index}].offer: '{policy.offer}' is not in the offers catalog"
                )
            names.add(policy.name)
            priorities.add(policy.priority)
        return self

    def ordered(self) -> list[Policy]:
        return sorted((p for p in self.policies if p.enabled), key=lambda p: p.priority)

    def policy(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)

    def contract_end_offsets(self) -> set[int]:
        return {
            day
            for p in self.ordered()
            if "contract_end" in p.triggers
            for day in p.days_before_end or ()
        }


class PolicyFileError(Exception):
    """The policy file cannot be used; the message names the file, the path in it and why."""


def format_errors(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or '(document)'}: {e['msg']}"
        for e in error.errors()
    )


def load_policy_file(path: str | Path) -> PolicyDocument:
    """Read and validate the YAML policy file; PolicyFileError says what is wrong and where."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyFileError(f"{path}: cannot read the policy file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PolicyFileError(f"{path}: the policy file must hold a mapping at the top level")
    try:
        return PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        raise PolicyFileError(f"{path}: {format_errors(exc)}") from None


# --- matching ------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What a policy's conditions look at, gathered by the caller for one trigger."""

    trigger: str
    now: datetime
    probability: float | None = None
    band: str | None = None
    previous_probability: float | None = None
    segment: str | None = None
    customer_value: float = 0.0
    loyalty_tier: str | None = None
    days_to_contract_end: float | None = None
    auto_renew: bool | None = None
    cancellation_notice: bool = False
    last_complaint_at: datetime | None = None
    last_nps: int | None = None
    last_csat: int | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    contract_offset: int | None = None  # contract_end trigger: which days_before_end step


def _attribute_matches(actual: Any, expected: AttributeValue | list[AttributeValue]) -> bool:
    if actual is None:
        return False
    options = expected if isinstance(expected, list) else [expected]
    return any(type(actual) is type(o) and actual == o for o in options) or (
        # 3 and 3.0 are the same number; True is not the number 1
        not isinstance(actual, bool)
        and isinstance(actual, (int, float))
        and any(
            not isinstance(o, bool) and isinstance(o, (int, float)) and actual == o
            for o in options
        )
    )


def conditions_hold(when: Conditions, facts: Facts) -> bool:
    if when.score is not None and not when.score.contains(facts.probability):
        return False
    if when.bands is not None and facts.band not in when.bands:
        return False
    if when.score_change is not None:
        if facts.probability is None or facts.previous_probability is None:
            return False
        if not when.score_change.contains(facts.probability - facts.previous_probability):
            return False
    if when.segments is not None and facts.segment not in when.segments:
        return False
    if when.customer_value is not None and not when.customer_value.contains(facts.customer_value):
        return False
    if when.loyalty_tiers is not None and facts.loyalty_tier not in when.loyalty_tiers:
        return False
    if when.days_to_contract_end is not None and not when.days_to_contract_end.contains(
        facts.days_to_contract_end
    ):
        return False
    if when.auto_renew is not None and facts.auto_renew is not when.auto_renew:
        return False
    notice = when.cancellation_notice
    if notice is not None and facts.cancellation_notice is not notice:
        return False
    if when.complaint_within_days is not None and (
        facts.last_complaint_at is None
        or facts.now - facts.last_complaint_at > timedelta(days=when.complaint_within_days)
    ):
        return False
    if when.max_nps is not None and (facts.last_nps is None or facts.last_nps > when.max_nps):
        return False
    if when.max_csat is not None and (facts.last_csat is None or facts.last_csat > when.max_csat):
        return False
    for key, expected in (when.attributes or {}).items():
        if not _attribute_matches(facts.attributes.get(key), expected):
            return False
    return True


def first_match(policies: Sequence[Policy], facts: Facts) -> Policy | None:
    """The first enabled policy (in the given priority order) that listens to this trigger and
    whose conditions hold; for the contract-end sweep only policies with the reached step."""
    for policy in policies:
        if not policy.enabled or facts.trigger not in policy.triggers:
            continue
        if facts.trigger == "contract_end" and facts.contract_offset not in (
            policy.days_before_end or ()
        ):
            continue
        if conditions_hold(policy.when, facts):
            return policy
    return None
