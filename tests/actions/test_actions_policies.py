"""Pure logic of policies and guardrails: the policy document and its validation errors, the
conditions, first match by priority, holdout membership, budget periods, the value gate, the
contract-end step, and the uplift arithmetic (Newcombe's interval against published values)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from services.actions.config import DEFAULT_POLICIES_FILE, ActionsSettings
from services.actions.guardrails import (
    in_cooldown,
    in_holdout,
    passes_value_gate,
    period_start,
    within_budget,
)
from services.actions.policies import (
    Budget,
    Facts,
    Offer,
    PolicyDocument,
    PolicyFileError,
    ValueGate,
    first_match,
    load_policy_file,
)
from services.actions.sweeps import due_step
from services.actions.uplift import (
    Unit,
    build_report,
    churned,
    newcombe_difference,
    summarise,
    wilson,
)

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)


def _facts(**values: Any) -> Facts:
    return Facts(**{"trigger": "score", "now": NOW} | values)


def _document(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "offers": {"d10": {"kind": "discount", "discount_percent": 10, "cost": 5}},
        "policies": [{"name": "p", "priority": 1, "offer": "d10"}],
    }
    raw.update(overrides)
    return raw


# --- the default file -----------------------------------------------------------------


def test_the_default_file_reproduces_the_threshold_policy_and_ships_the_playbooks() -> None:
    document = load_policy_file(DEFAULT_POLICIES_FILE)
    assert ActionsSettings().policies_file == DEFAULT_POLICIES_FILE
    policies = document.ordered()
    high = first_match(policies, _facts(probability=0.5, band="medium"))
    assert high is not None and high.name == "high-risk-discount"
    offer = document.offers[high.offer]
    assert (offer.kind, offer.discount_percent, offer.validity_days, high.cooldown_days) == (
        "discount", 15, 14, 30,
    )
    assert first_match(policies, _facts(probability=0.49, band="medium")) is None
    assert document.contract_end_offsets() == {60, 30, 7}
    for step, name in ((60, "renewal-60"), (30, "renewal-30"), (7, "renewal-7")):
        match = first_match(
            policies,
            _facts(trigger="contract_end", contract_offset=step, auto_renew=False,
                   days_to_contract_end=step),
        )
        assert match is not None and match.name == name
    assert first_match(policies, _facts(trigger="contract_end", contract_offset=30,
                                        auto_renew=True)) is None
    assert first_match(policies, _facts(trigger="cancellation")).name == "win-back"  # type: ignore[union-attr]
    complaint = first_match(policies, _facts(trigger="complaint", last_complaint_at=NOW))
    assert complaint is not None and document.offers[complaint.offer].service is True
    survey = first_match(policies, _facts(trigger="feedback", last_nps=3))
    assert survey is not None and survey.name == "detractor-survey"
    assert first_match(policies, _facts(trigger="feedback", last_nps=9)) is None
    kinds = {offer.kind for offer in document.offers.values()}
    assert kinds >= {"discount", "loyalty_bonus", "tier_upgrade", "renewal_offer", "free_shipping",
                     "cross_sell_bundle", "personal_call", "feedback_survey", "service_recovery"}


# --- validation errors name the file, the path and the reason ---------------------------


@pytest.mark.parametrize(
    ("change", "where", "why"),
    [
        ({"policies": [{"name": "p", "priority": 1, "offer": "nope"}]},
         "policies[0].offer", "not in the offers catalog"),
        ({"offers": {"d": {"kind": "discount"}}, "policies": []},
         "offers.d", "exactly one of discount_percent or discount_amount"),
        ({"offers": {"d": {"kind": "coupon"}}, "policies": []}, "offers.d.kind", "Input should be"),
        ({"policies": [{"name": "p", "priority": 1, "offer": "d10", "when": {"scroe": {"min": 1}}}]},
         "policies.0.when.scroe", "Extra inputs are not permitted"),
        ({"policies": [{"name": "p", "priority": 1, "offer": "d10", "when": {"score": {"min": 1.5}}}]},
         "policies.0.when", "score bounds must lie within 0..1"),
        ({"policies": [{"name": "p", "priority": 1, "offer": "d10", "triggers": ["contract_end"]}]},
         "policies.0", "days_before_end is required"),
        ({"policies": [{"name": "p", "priority": 1, "offer": "d10"},
                       {"name": "q", "priority": 1, "offer": "d10"}]},
         "policies[1].priority", "priority 1 is used twice"),
        ({"policies": [{"name": "p", "priority": 1, "offer": "d10", "budget": {"period": "day",
                                                                              "max_count": 1}}]},
         "policies.0.budget.period", "Input should be 'week' or 'month'"),
        ({"policies": [{"name": "p", "priority": 1, "offer": "d10", "budget": {"period": "week"}}]},
         "policies.0.budget", "needs max_count, max_cost or both"),
        ({"policies": [{"name": "p", "priority": 1, "offer": "d10", "value_gate": {"expected_uplift": 0}}]},
         "policies.0.value_gate.expected_uplift", "greater than 0"),
    ],
)
def test_a_bad_policy_file_fails_naming_the_file_the_path_and_the_reason(
    tmp_path: Path, change: dict[str, Any], where: str, why: str
) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(_document(**change)))
    with pytest.raises(PolicyFileError) as raised:
        load_policy_file(path)
    message = str(raised.value)
    assert message.startswith(str(path)), message
    assert where in message and why in message, message


def test_unreadable_or_malformed_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="cannot read the policy file"):
        load_policy_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("offers: {a: [1, 2\n")
    with pytest.raises(PolicyFileError, match="not valid YAML"):
        load_policy_file(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(PolicyFileError, match="mapping at the top level"):
        load_policy_file(listed)


def test_a_bad_policy_file_stops_the_app_before_anything_starts(tmp_path: Path) -> None:
    from services.actions.app import create_app

    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(_document(policies=[{"name": "p", "priority": 1, "offer": "x"}])))
    with pytest.raises(PolicyFileError, match=r"policies\[0\]\.offer: 'x' is not in the offers"):
        create_app(ActionsSettings(policies_file=path))


# --- conditions and priority ------------------------------------------------------------


def _policy_with(when: dict[str, Any]) -> PolicyDocument:
    return PolicyDocument.model_validate(
        _document(policies=[{"name": "p", "priority": 1, "offer": "d10", "when": when}])
    )


@pytest.mark.parametrize(
    ("when", "holds", "fails"),
    [
        ({"score": {"min": 0.6, "max": 0.8}}, {"probability": 0.6}, {"probability": 0.81}),
        ({"bands": ["high"]}, {"band": "high"}, {"band": "medium"}),
        ({"score_change": {"min": 0.2}}, {"probability": 0.7, "previous_probability": 0.4},
         {"probability": 0.7, "previous_probability": 0.6}),
        ({"score_change": {"min": 0.2}}, {"probability": 0.7, "previous_probability": 0.4},
         {"probability": 0.7}),  # no previous score: no change to speak of
        ({"segments": ["business"]}, {"segment": "business"}, {"segment": "consumer"}),
        ({"customer_value": {"min": 500}}, {"customer_value": 500.0}, {"customer_value": 499.0}),
        ({"loyalty_tiers": ["gold", "platinum"]}, {"loyalty_tier": "gold"}, {"loyalty_tier": None}),
        ({"days_to_contract_end": {"max": 30}}, {"days_to_contract_end": 12.0},
         {"days_to_contract_end": None}),
        ({"auto_renew": False}, {"auto_renew": False}, {"auto_renew": None}),
        ({"cancellation_notice": True}, {"cancellation_notice": True}, {"cancellation_notice": False}),
        ({"complaint_within_days": 7}, {"last_complaint_at": NOW - timedelta(days=7)},
         {"last_complaint_at": NOW - timedelta(days=7, seconds=1)}),
        ({"max_nps": 6}, {"last_nps": 6}, {"last_nps": None}),
        ({"max_csat": 2}, {"last_csat": 2}, {"last_csat": 3}),
        ({"attributes": {"plan": ["pro", "team"], "seats": 5}},
         {"attributes": {"plan": "team", "seats": 5.0}}, {"attributes": {"plan": "team", "seats": True}}),
    ],
)
def test_each_condition_holds_or_not(
    when: dict[str, Any], holds: dict[str, Any], fails: dict[str, Any]
) -> None:
    policies = _policy_with(when).ordered()
    assert first_match(policies, _facts(**holds)) is not None
    assert first_match(policies, _facts(**fails)) is None


def test_priority_decides_first_match_and_triggers_and_disabled_policies_are_respected() -> None:
    document = PolicyDocument.model_validate(
        _document(
            policies=[
                {"name": "broad", "priority": 20, "offer": "d10"},
                {"name": "narrow", "priority": 10, "offer": "d10", "when": {"bands": ["high"]}},
                {"name": "off", "priority": 5, "offer": "d10", "enabled": False},
                {"name": "on-cancel", "priority": 1, "offer": "d10", "triggers": ["cancellation"]},
            ]
        )
    )
    policies = document.ordered()
    assert [p.name for p in policies] == ["on-cancel", "narrow", "broad"]
    assert first_match(policies, _facts(band="high")).name == "narrow"  # type: ignore[union-attr]
    assert first_match(policies, _facts(band="low")).name == "broad"  # type: ignore[union-attr]
    assert first_match(policies, _facts(trigger="cancellation")).name == "on-cancel"  # type: ignore[union-attr]


# --- guardrails ------------------------------------------------------------------------


def test_holdout_share_is_within_tolerance_and_stable_per_customer() -> None:
    ids = [f"c-{n}" for n in range(10_000)]
    members = [in_holdout("tenant-a", c, "salt-1", 10.0) for c in ids]
    share = sum(members) / len(ids)
    assert 0.09 <= share <= 0.11, share  # binomial sd is 0.3 pp: 3 sd either side
    assert members == [in_holdout("tenant-a", c, "salt-1", 10.0) for c in ids]  # stable
    other_salt = [in_holdout("tenant-a", c, "salt-2", 10.0) for c in ids]
    assert other_salt != members and 0.09 <= sum(other_salt) / len(ids) <= 0.11
    other_tenant = [in_holdout("tenant-b", c, "salt-1", 10.0) for c in ids]
    assert other_tenant != members
    assert not any(in_holdout("tenant-a", c, "salt-1", 0.0) for c in ids[:1000])
    assert all(in_holdout("tenant-a", c, "salt-1", 100.0) for c in ids[:1000])
    assert 0.24 <= sum(in_holdout("t", c, "s", 25.0) for c in ids) / len(ids) <= 0.26


def test_cooldown_budget_periods_and_caps() -> None:
    assert in_cooldown(None, NOW, timedelta(days=30)) is False
    assert in_cooldown(NOW - timedelta(days=29), NOW, timedelta(days=30)) is True
    assert in_cooldown(NOW - timedelta(days=30), NOW, timedelta(days=30)) is False
    sunday = datetime(2026, 3, 1, 23, 59, tzinfo=timezone.utc)
    assert period_start(sunday, "week") == datetime(2026, 2, 23, tzinfo=timezone.utc)
    assert period_start(sunday, "month") == datetime(2026, 3, 1, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        period_start(NOW, "year")
    count_cap = Budget(period="week", max_count=2)
    assert within_budget(count_cap, 1, 0.0, 5.0) and not within_budget(count_cap, 2, 0.0, 5.0)
    cost_cap = Budget(period="month", max_cost=20.0)
    assert within_budget(cost_cap, 9, 15.0, 5.0) and not within_budget(cost_cap, 1, 15.5, 5.0)


def test_value_gate_sends_only_when_expected_value_exceeds_cost() -> None:
    offer = Offer(kind="discount", discount_percent=10, cost=10.0)
    gate = ValueGate(expected_uplift=0.1)
    assert passes_value_gate(0.5, 201.0, gate, offer)  # 0.5 x 201 x 0.1 = 10.05 > 10
    assert not passes_value_gate(0.5, 200.0, gate, offer)  # exactly 10: not more than the cost
    assert not passes_value_gate(None, 1e6, gate, offer)  # no probability known: no value


def test_contract_end_step_is_the_smallest_offset_reached() -> None:
    offsets = {60, 30, 7}
    assert due_step(61, offsets) is None
    assert [due_step(d, offsets) for d in (60, 31, 30, 8, 7, 0)] == [60, 60, 30, 30, 7, 7]


# --- uplift arithmetic ------------------------------------------------------------------


def test_newcombe_interval_matches_the_published_examples() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10.
    diff, low, high = newcombe_difference(56, 70, 48, 80)
    assert (round(diff, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)
    diff, low, high = newcombe_difference(9, 10, 3, 10)
    assert (round(low, 4), round(high, 4)) == (0.1705, 0.809)
    # Wilson interval for 81/263 (Newcombe 1998, companion paper on one proportion).
    assert tuple(round(x, 4) for x in wilson(81, 263)) == (0.2553, 0.3662)


def test_churned_means_a_contract_ended_or_no_activity_within_the_horizon() -> None:
    horizon = timedelta(days=90)
    active = [date(2026, 3, 20)]
    assert churned(NOW, horizon, active, []) is False
    assert churned(NOW, horizon, [NOW.date()], []) is True  # only the decision day itself
    assert churned(NOW, horizon, [date(2026, 6, 10)], []) is True  # back only after H days
    assert churned(NOW, horizon, active, [NOW + timedelta(days=40)]) is True
    assert churned(NOW, horizon, active, [NOW - timedelta(days=1)]) is False  # ended before


def test_report_arithmetic_on_a_constructed_scenario() -> None:
    treated = [
        Unit("p", "high", f"t{i}", True, churned=i < 10, redeemed=i % 4 == 0, offer_cost=8.0,
             customer_value=300.0)
        for i in range(40)
    ]
    control = [
        Unit("p", "high", f"c{i}", False, churned=i < 8, redeemed=False, offer_cost=0.0,
             customer_value=300.0)
        for i in range(16)
    ]
    group = summarise("p", "high", treated + control)
    assert (group.treated_customers, group.control_customers) == (40, 16)
    assert (group.treated_churned, group.control_churned) == (10, 8)
    assert group.treated_churn_rate == 0.25 and group.control_churn_rate == 0.5
    assert group.uplift == pytest.approx(0.25)
    diff, low, high = newcombe_difference(8, 16, 10, 40)
    assert (group.uplift_ci_low, group.uplift_ci_high) == (low, high)
    assert low < 0.25 < high
    assert group.redemptions == 10
    assert group.offer_cost == 320.0  # 40 x 8
    assert group.retained_customers == pytest.approx(10.0)  # 0.25 x 40
    assert group.retained_revenue == pytest.approx(3000.0)  # 10 x 300
    assert group.roi == pytest.approx((3000.0 - 320.0) / 320.0)

    rows = build_report(treated + control + [Unit("p", "low", "x", True, False, False, 8.0, 50.0)])
    assert [(r.policy, r.band) for r in rows] == [("p", "all"), ("p", "high"), ("p", "low")]
    low_band = rows[2]
    assert low_band.treated_customers == 1 and low_band.control_customers == 0
    assert low_band.uplift is None and low_band.roi is None  # no control group: no estimate
    assert rows[0].treated_customers == 41 and rows[0].control_customers == 16


def test_policy_cache_expires_and_forgets() -> None:
    from services.actions.service import PolicyCache

    now = [0.0]
    cache = PolicyCache(5.0, monotonic=lambda: now[0])
    document = PolicyDocument.model_validate(_document())
    assert cache.get("t") == (False, None)
    cache.put("t", document)
    cache.put("u", None)  # "uses the default" is cached too
    assert cache.get("t") == (True, document) and cache.get("u") == (True, None)
    now[0] = 4.9
    assert cache.get("t")[0] is True
    now[0] = 5.0
    assert cache.get("t") == (False, None)
    cache.put("t", document)
    cache.invalidate("t")
    assert cache.get("t") == (False, None)
    off = PolicyCache(0.0, monotonic=lambda: now[0])
    off.put("t", document)
    assert off.get("t") == (False, None)


def test_document_model_rejects_an_unknown_top_level_field() -> None:
    with pytest.raises(ValidationError, match="customer_cooldown"):
        PolicyDocument.model_validate(_document(customer_cooldown=3))
