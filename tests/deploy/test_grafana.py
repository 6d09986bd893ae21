"""deploy/grafana/churnguard.json: valid JSON, a sound layout, every query on metrics that exist
(or are planned in issue #7), and the pipeline's stages all on the board."""

from __future__ import annotations

import json
from pathlib import Path

from tests.deploy.known_metrics import PLANNED_METRICS, exported_metric_names, metric_names_in, unknown_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "churnguard.json"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_is_importable_json() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    datasource = dashboard["templating"]["list"][0]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"


def test_every_query_uses_known_metrics() -> None:
    known = exported_metric_names() | PLANNED_METRICS | {"up"}
    queries = 0
    for panel in _panels():
        for target in panel.get("targets", []):
            used = metric_names_in(target["expr"])
            assert used, f"{panel['title']}: no metric in {target['expr']!r}"
            assert not unknown_metrics(used, known), f"{panel['title']}: unknown {unknown_metrics(used, known)}"
            queries += 1
    assert queries >= 25


def test_the_pipeline_is_on_the_board() -> None:
    exprs = " ".join(t["expr"] for p in _panels() for t in p.get("targets", []))
    for metric in ("churnguard_ingest_events_accepted_total", "churnguard_ingest_events_rejected_total",
                   "churnguard_scoring_consumer_lag", "churnguard_scoring_scores_published_total",
                   "churnguard_actions_decisions_total", "churnguard_actions_webhook_attempts_total",
                   "churnguard_actions_webhook_delivery_seconds_bucket", "churnguard_actions_parked_deliveries",
                   "churnguard_actions_webhook_open_circuits"):
        assert metric in exprs, f"{metric} is not on the dashboard"
    titles = {p["title"] for p in _dashboard()["panels"] if p["type"] == "row"}
    assert titles == {"Events in", "Scoring", "Offers", "Webhook health", "Uplift", "Services"}


def test_uplift_is_computed_from_the_holdout_figures_actions_exports() -> None:
    (uplift,) = [p for p in _panels() if p["title"].startswith("Uplift by policy")]
    (expr,) = [target["expr"] for target in uplift["targets"]]
    for needed in ('churnguard_actions_uplift_churned_customers{group="control"}',
                   'churnguard_actions_uplift_customers{group="treated"}'):
        assert needed in expr
