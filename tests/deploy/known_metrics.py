"""Metric names the services really export (read from the prometheus_client registry after
importing every module that defines metrics), plus the ones planned in issue #7 that other work
is adding; the alert rules and the dashboard may use nothing else."""

from __future__ import annotations

import importlib
import re

from prometheus_client import REGISTRY

SERVICES = ("gateway", "ingest", "scoring", "actions")
METRIC_MODULES = (*(f"services.{s}.metrics" for s in SERVICES), "shared.kafka", "shared.metrics")

# Every metric the alert rules and the dashboard use now exists; nothing is only planned.
PLANNED_METRICS: frozenset[str] = frozenset()

_NAME = re.compile(r"\b((?:churnguard_[A-Za-z0-9_]+)|up)\b(?!\s*\()")
_NAME_REGEX = re.compile(r'__name__\s*=~\s*"([^"]+)"')
_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")


def exported_metric_names() -> set[str]:
    """Every sample name (with _total, _bucket, _sum, _count...) registered by our modules."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    from shared.metrics import http_metrics

    for service in SERVICES:
        http_metrics(service)
    return {name for name in REGISTRY._names_to_collectors if name.startswith("churnguard_")}


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression selects; `{__name__=~"re"}` selectors become `re:<regex>`."""
    patterns = {f"re:{p}" for p in _NAME_REGEX.findall(expr)}
    bare = _LABEL_MATCHERS.sub("", expr)
    return {n for n in _NAME.findall(bare)} | patterns


def unknown_metrics(used: set[str], known: set[str]) -> set[str]:
    unknown = set()
    for name in used:
        if name.startswith("re:"):
            if not any(re.fullmatch(name[3:], k) for k in known):
                unknown.add(name)
        elif name not in known:
            unknown.add(name)
    return unknown
