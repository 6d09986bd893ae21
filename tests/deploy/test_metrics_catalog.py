"""The metrics catalog in docs/operations.md is the services' registry, written out."""

from __future__ import annotations

from tools import metrics_doc


def test_metrics_catalog_is_up_to_date() -> None:
    assert metrics_doc.DOC.read_text() == metrics_doc.rewrite(metrics_doc.DOC.read_text()), (
        "docs/operations.md metrics catalog is out of date: run .venv/bin/python -m tools.metrics_doc"
    )


def test_catalog_names_follow_the_convention_and_every_service_has_metrics() -> None:
    metrics = metrics_doc.catalog()
    assert {m.service for m in metrics} == set(metrics_doc.SERVICES)
    for metric in metrics:
        assert metric.help, metric.name
        assert metric.kind != "counter" or metric.name.endswith("_total"), metric.name
        assert not {"tenant_id", "customer_id", "tenant", "customer", "path"} & set(metric.labels), metric.name
