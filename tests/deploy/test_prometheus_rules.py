"""The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`), and
every metric they use is one the services export or one planned in docs/operations.md."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.known_metrics import PLANNED_METRICS, exported_metric_names, metric_names_in, unknown_metrics

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "churnguard-rules.yml"
RULE_TESTS = RULES_DIR / "churnguard-rules.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (Debian: apt-get install -y prometheus; `make install` does it as root)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the alert rules, but {message}")
        pytest.skip(message)
    return found


def test_rules_are_valid(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout + result.stderr)


def test_rules_unit_tests_pass(promtool: str) -> None:
    result = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULES_DIR,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fired = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts == fired, f"alerts never shown firing in a unit test: {sorted(alerts - fired)}"


def test_the_issue_asks_for_these_alerts() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {"ChurnguardConsumerLagGrowing", "ChurnguardIngestErrorRateHigh", "ChurnguardIngestBrokerUnavailable",
            "ChurnguardWebhookFailureRateHigh", "ChurnguardWebhooksParked", "ChurnguardCircuitBreakerOpen",
            "ChurnguardModelStale", "ChurnguardModelDrifting", "ChurnguardServiceDown"} <= alerts


def test_rules_use_only_known_metrics() -> None:
    known = exported_metric_names() | PLANNED_METRICS | {"up"}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            used = metric_names_in(rule["expr"])
            assert used, f"{rule['alert']}: no metric found in its expression"
            assert not unknown_metrics(used, known), f"{rule['alert']}: unknown {unknown_metrics(used, known)}"
