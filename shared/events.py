"""The one event contract: what upstream systems send, and what travels on each topic.

Every customer event is one envelope (`id`, `type`, `customer_id`, `occurred_at`,
`source`, `data`) whose `data` is typed by `type`. The union is discriminated on
`type`, so an unknown type or a bad field is reported with its exact location.

Evolution rule: within `v1`, changes are additive only (new optional fields, new
event types). Renaming or removing a field, or tightening a constraint, needs `v2`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import (
    AwareDatetime,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictInt,
    Field,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)
from pydantic_core import to_json

CONTRACT_VERSION = "v1"
MAX_FUTURE_SKEW = timedelta(hours=24)
# Backfill is welcome, but a timestamp before this is almost always an unset clock (Unix epoch).
EARLIEST_OCCURRED_AT = datetime(2000, 1, 1, tzinfo=timezone.utc)


class _Strict(BaseModel):
    """Unknown fields are errors: a typo upstream must not vanish silently. Numbers and booleans
    are strict (no `false` as 0, no "12" as 12, no NaN or Infinity); dates and times come as
    RFC 3339 strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Money = Annotated[
    str,
    Field(
        pattern=r"^\d{1,12}(\.\d{1,4})?$",
        description="Non-negative decimal amount as a string, e.g. \"59.90\" (never a float).",
        examples=["59.90"],
    ),
]
Currency = Annotated[
    str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code", examples=["EUR"])
]
def _no_numbers(value: Any) -> Any:
    """Dates and times are RFC 3339 strings; a bare number (epoch seconds? days?) is refused."""
    if isinstance(value, (int, float)):
        raise ValueError("must be an RFC 3339 string, not a number")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_no_numbers)]


def _rfc3339_only(value: Any) -> Any:
    """For query strings and API bodies: pydantic would read "0" or 1700000000 as a Unix time."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and not _DATE_START.match(value)):
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-11-23T10:00:00Z")
    return value


_DATE_START = re.compile(r"^\d{4}-\d{2}-\d{2}")
RFC3339DateTime = Annotated[AwareDatetime, BeforeValidator(_rfc3339_only)]
"""An aware date-time given as RFC 3339 text only (no Unix numbers, not even as strings)."""
Day = Annotated[date, BeforeValidator(_no_numbers)]
Identifier = Annotated[str, Field(min_length=1, max_length=128)]
ShortText = Annotated[str, Field(max_length=200)]
Comment = Annotated[str, Field(max_length=2000)]


# --- payloads, one per event type -------------------------------------------------


class CustomerProfile(_Strict):
    email: ShortText | None = None
    name: ShortText | None = None
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None
    segment: ShortText | None = None
    signed_up_at: Timestamp | None = None
    attributes: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Tenant-defined attributes."
    )


class ConsentChanged(_Strict):
    marketing: StrictBool = Field(description="Whether marketing offers may be sent.")
    channel: Literal["email", "sms", "push", "phone", "any"] = "any"


class OrderCompleted(_Strict):
    order_id: Identifier
    amount: Money
    currency: Currency
    items: Annotated[StrictInt, Field(ge=0)] | None = None


class OrderRefunded(_Strict):
    order_id: Identifier
    amount: Money
    currency: Currency
    reason: ShortText | None = None


class Contract(_Strict):
    contract_id: Identifier
    plan: ShortText
    price: Money
    currency: Currency
    start_date: Day
    end_date: Day | None = Field(None, description="None for open-ended contracts.")
    auto_renew: StrictBool = False
    notice_period_days: Annotated[StrictInt, Field(ge=0, le=3650)] = 0


class CancellationNotice(_Strict):
    contract_id: Identifier
    notice_period_days: Annotated[StrictInt, Field(ge=0, le=3650)] = 0
    effective_date: Day | None = None
    reason: ShortText | None = None


class ContractEnded(_Strict):
    contract_id: Identifier
    end_date: Day
    reason: ShortText | None = None


class TicketOpened(_Strict):
    ticket_id: Identifier
    channel: Literal["email", "phone", "chat", "web", "store", "other"] = "other"
    subject: ShortText | None = None


class TicketResolved(_Strict):
    ticket_id: Identifier


class Complaint(_Strict):
    ticket_id: Identifier | None = None
    severity: Literal["low", "medium", "high"] = "medium"
    category: ShortText | None = None


class NpsFeedback(_Strict):
    score: Annotated[StrictInt, Field(ge=0, le=10)]
    comment: Comment | None = None


class CsatFeedback(_Strict):
    score: Annotated[StrictInt, Field(ge=1, le=5)]
    comment: Comment | None = None


class CesFeedback(_Strict):
    score: Annotated[StrictInt, Field(ge=1, le=7)]
    comment: Comment | None = None


class LoyaltyPoints(_Strict):
    points: Annotated[StrictInt, Field(gt=0)]
    balance: Annotated[StrictInt, Field(ge=0)] | None = None


class TierChanged(_Strict):
    tier: ShortText
    previous_tier: ShortText | None = None


class SessionRecorded(_Strict):
    duration_seconds: Annotated[StrictInt, Field(ge=0)] = 0
    channel: Literal["web", "app", "store", "other"] = "web"


class OfferResponse(_Strict):
    offer_id: Identifier


# --- the envelope -------------------------------------------------------------------


class _Envelope(_Strict):
    id: Identifier = Field(description="The sender's idempotency key.")
    customer_id: Identifier
    occurred_at: Timestamp = Field(description="RFC 3339 with a timezone.")
    source: ShortText = Field("api", description="Which upstream system sent it.")

    @field_validator("occurred_at")
    @classmethod
    def _plausible_time(cls, value: datetime, info: ValidationInfo) -> datetime:
        """`now` comes from the validation context (the caller's clock) when given."""
        now = (info.context or {}).get("now") or datetime.now(timezone.utc)
        if value - now > MAX_FUTURE_SKEW:
            raise ValueError("occurred_at is more than 24 hours in the future")
        if value < EARLIEST_OCCURRED_AT:
            raise ValueError(
                "occurred_at is before 2000-01-01; such a timestamp is almost always an unset clock"
            )
        return value


def _event(type_name: str, payload: type[BaseModel]) -> type[_Envelope]:
    class_name = "".join(p.capitalize() for p in type_name.replace("_", ".").split(".")) + "Event"
    return type(
        class_name,
        (_Envelope,),
        {
            "__annotations__": {"type": Literal[type_name], "data": payload},
            "__module__": __name__,
        },
    )


EVENT_PAYLOADS: dict[str, type[BaseModel]] = {
    "customer.profile_updated": CustomerProfile,
    "customer.consent_changed": ConsentChanged,
    "order.completed": OrderCompleted,
    "order.refunded": OrderRefunded,
    "subscription.started": Contract,
    "subscription.renewed": Contract,
    "subscription.cancellation_notice": CancellationNotice,
    "subscription.ended": ContractEnded,
    "support.ticket_opened": TicketOpened,
    "support.ticket_resolved": TicketResolved,
    "support.complaint": Complaint,
    "feedback.nps": NpsFeedback,
    "feedback.csat": CsatFeedback,
    "feedback.ces": CesFeedback,
    "loyalty.points_earned": LoyaltyPoints,
    "loyalty.points_redeemed": LoyaltyPoints,
    "loyalty.tier_changed": TierChanged,
    "session.recorded": SessionRecorded,
    "offer.redeemed": OfferResponse,
    "offer.declined": OfferResponse,
}
EVENT_TYPES = tuple(EVENT_PAYLOADS)
EVENT_CLASSES = {name: _event(name, payload) for name, payload in EVENT_PAYLOADS.items()}

CustomerEvent = Annotated[Union[tuple(EVENT_CLASSES.values())], Field(discriminator="type")]
"""Any one customer event, as sent by upstream systems."""

customer_event_adapter: TypeAdapter[Any] = TypeAdapter(CustomerEvent)


def parse_event(raw: Any, now: datetime | None = None) -> _Envelope:
    """Validate one event (a dict or JSON bytes); raises pydantic.ValidationError.
    `now` anchors the "not too far in the future" rule (default: the wall clock)."""
    context = {"now": now} if now else None
    if isinstance(raw, (bytes, str)):
        return customer_event_adapter.validate_json(raw, context=context)
    return customer_event_adapter.validate_python(raw, context=context)


def event_json_schema() -> dict[str, Any]:
    return customer_event_adapter.json_schema(ref_template="#/$defs/{model}")


# --- topic records ------------------------------------------------------------------


def partition_key(tenant_id: str, customer_id: str) -> bytes:
    """All of one customer's records land on one partition, in order."""
    return f"{tenant_id}/{customer_id}".encode()


class EventRecord(BaseModel):
    """A customer event on `customer-events`: the envelope plus what ingest adds."""

    model_config = ConfigDict(frozen=True)

    tenant_id: Identifier
    received_at: AwareDatetime
    event: CustomerEvent

    @property
    def key(self) -> bytes:
        return partition_key(self.tenant_id, self.event.customer_id)


def broken_invariant(record: EventRecord) -> str | None:
    """What ingest guarantees of every EventRecord it publishes and the schema alone cannot say,
    or None when the record keeps it. A record that breaks it was written to `customer-events`
    some other way; consumers dead-letter it instead of acting on it.

    Ingest refuses an event more than MAX_FUTURE_SKEW ahead of its clock and then stamps
    `received_at` from that clock, so `occurred_at` is never more than 24 h after `received_at`.
    (Decoding checks occurred_at only against the consumer's clock, which a record stamped long
    ago passes.) Acting on such an event would put the customer's last activity, consent or
    contract in the future, where no real event could ever supersede it."""
    ahead = record.event.occurred_at - record.received_at
    if ahead > MAX_FUTURE_SKEW:
        return (f"occurred_at {record.event.occurred_at.isoformat()} is {ahead.total_seconds() / 3600:.1f} h after "
                f"received_at {record.received_at.isoformat()} (ingest accepts at most "
                f"{MAX_FUTURE_SKEW.total_seconds() / 3600:.0f} h): the event did not come through the API")
    return None


class KeyedRecord(Protocol):
    """A record with its partition key (ScoreRecord, ActionRecord, ErasureStatusRecord, ...)."""

    @property
    def key(self) -> bytes: ...


def keyed_json(records: Iterable[KeyedRecord]) -> list[tuple[bytes, bytes]]:
    """(key, value) of each record as it goes on its topic: byte for byte model_dump_json(),
    from the model's own serializer called directly, without model_dump_json()'s per-call
    argument handling and str -> bytes copy (half its cost, once per published score)."""
    return [(record.key, record.__pydantic_serializer__.to_json(record)) for record in records]  # type: ignore[attr-defined]


def event_records_json(tenant_id: str, received_at: datetime, events: Sequence[_Envelope]) -> list[tuple[bytes, bytes]]:
    """(key, value) of the `EventRecord` for each already-validated event, byte for byte what
    `EventRecord(...).model_dump_json()` gives, without building or validating a record per
    event: the envelope part is serialized once per request."""
    head = b'{"tenant_id":' + to_json(tenant_id) + b',"received_at":' + to_json(received_at) + b',"event":'
    # The model's own serializer called directly: what model_dump_json() does, as bytes, without
    # its per-call argument handling and the str -> bytes copy.
    return [(partition_key(tenant_id, event.customer_id),
             b"".join((head, event.__pydantic_serializer__.to_json(event), b"}")))
            for event in events]


RiskBand = Literal["low", "medium", "high"]


class ScoreRecord(BaseModel):
    """A churn score on `churn-scores`; `score_id` is unique and the consumer's dedup key."""

    model_config = ConfigDict(frozen=True)

    score_id: Identifier
    tenant_id: Identifier
    customer_id: Identifier
    probability: Annotated[float, Field(ge=0.0, le=1.0)]
    band: RiskBand
    model_version: str
    scored_at: AwareDatetime
    cause: Literal["event", "sweep"] = "event"
    event_id: Identifier | None = None
    features: dict[str, float] = Field(default_factory=dict)
    reasons: list[str] = Field(
        default_factory=list, description="Top contributing reasons, in plain language, most important first."
    )

    @property
    def key(self) -> bytes:
        return partition_key(self.tenant_id, self.customer_id)


class ActionRecord(BaseModel):
    """A retention decision on `retention-actions`: what was decided, on which trigger, and why.

    `reason` on a suppressed decision: no_match, cooldown, consent, holdout, budget, value_gate,
    erased; on a created offer: matched. `score_id` is the score decided for trigger "score",
    and a deterministic trigger id for the other triggers."""

    model_config = ConfigDict(frozen=True)

    decision_id: Identifier
    tenant_id: Identifier
    customer_id: Identifier
    score_id: Identifier
    outcome: Literal["offer_created", "suppressed"]
    reason: str
    policy: str | None = None
    offer_id: str | None = None
    decided_at: AwareDatetime
    trigger: Literal["score", "contract_end", "cancellation", "complaint", "feedback"] = "score"
    offer_kind: str | None = None
    service: bool | None = None
    churn_probability: float | None = None
    band: RiskBand | None = None

    @property
    def key(self) -> bytes:
        return partition_key(self.tenant_id, self.customer_id)


class ErasureRecord(BaseModel):
    """A control record on `customer-events`: erase this customer (GDPR Art. 17).

    Published by ingest with the customer's partition key, so every consumer handles it after
    the customer's earlier events and before later ones. It is told apart from an EventRecord by
    its leading `"kind":"erasure"` (see `decode_customer_record`); the public event contract
    (`/v1/schema`) does not change."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["erasure"] = "erasure"
    erasure_id: Identifier
    tenant_id: Identifier
    customer_id: Identifier
    requested_at: AwareDatetime

    @property
    def key(self) -> bytes:
        return partition_key(self.tenant_id, self.customer_id)

    def to_json(self) -> bytes:
        """`kind` first: decoders recognise the record by its first bytes."""
        return self.model_dump_json().encode()


CustomerRecord = Union[EventRecord, ErasureRecord]
_ERASURE_PREFIX = b'{"kind":'


def decode_customer_record(raw: bytes) -> CustomerRecord:
    """Either record type found on `customer-events`. An EventRecord never starts with a `kind`
    field, so the check costs a prefix comparison on the hot path."""
    if raw.startswith(_ERASURE_PREFIX) or (raw[:1].isspace() and raw.lstrip().startswith(_ERASURE_PREFIX)):
        return ErasureRecord.model_validate_json(raw)
    return EventRecord.model_validate_json(raw)


ErasingService = Literal["scoring", "actions"]


class ErasureStatusRecord(BaseModel):
    """On `erasure-status`: a service has erased the customer of `erasure_id` (ingest records it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    erasure_id: Identifier
    tenant_id: Identifier
    service: ErasingService
    done_at: AwareDatetime

    @property
    def key(self) -> bytes:
        return self.erasure_id.encode()


def erasures_done(erased: Iterable[ErasureRecord], service: ErasingService, done_at: datetime) -> list[tuple[bytes, bytes]]:
    """The `erasure-status` messages saying `service` has erased these customers."""
    return keyed_json(ErasureStatusRecord(erasure_id=r.erasure_id, tenant_id=r.tenant_id, service=service,
                                          done_at=done_at) for r in erased)


def new_id() -> str:
    return uuid.uuid4().hex
