"""Writes the PrometheusRule of deploy/k8s/components/monitoring from churnguard-rules.yml, so
Kubernetes runs exactly the rules promtool checked. `python -m deploy.prometheus.sync`;
`--check` exits 1 when the PrometheusRule is out of date (a test does the same)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from tools.generated import write_or_check

HERE = Path(__file__).resolve().parent
RULES = HERE / "churnguard-rules.yml"
PROMETHEUS_RULE = HERE.parent / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/churnguard-rules.yml by python -m deploy.prometheus.sync.\n"


def render() -> str:
    rules = yaml.safe_load(RULES.read_text())
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "churnguard", "labels": {"app.kubernetes.io/part-of": "churnguard"}},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.safe_dump(resource, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str]) -> int:
    return write_or_check(PROMETHEUS_RULE, render(), "python -m deploy.prometheus.sync", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
