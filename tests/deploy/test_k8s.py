"""deploy/k8s: every overlay renders with kubectl kustomize and validates against the Kubernetes
1.32 schemas (the same script as `make k8s-validate`); custom resources are listed as skipped and
their key fields are checked here; the hardening, probes, settings and secrets are asserted."""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.k8s import validate as k8s
from deploy.prometheus import sync as prometheus_sync
from shared.health import health_router
from shared.settings import InternalAuthSettings
from shared.topics import with_dead_letters
from tools.settings_doc import SECTIONS

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"gateway": 8000, "ingest": 8001, "scoring": 8002, "actions": 8003}
WEEK_MS = 7 * 24 * 3600 * 1000


@pytest.fixture(scope="module")
def kubectl_available() -> None:
    if shutil.which("kubectl") is None:
        message = "kubectl is not installed: the Kubernetes manifests cannot be rendered"
        if os.environ.get("CI"):
            pytest.fail(f"CI must validate deploy/k8s, but {message}")
        pytest.skip(message)


@pytest.fixture(scope="module")
def rendered(kubectl_available: None) -> dict[str, list[dict[str, Any]]]:
    return {overlay.name: k8s.render(overlay) for overlay in k8s.overlays()}


def _of_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def test_there_are_dev_and_prod_overlays() -> None:
    assert {p.name for p in k8s.overlays()} == {"dev", "prod"}


def test_make_k8s_validate_passes_and_lists_what_it_skips(kubectl_available: None) -> None:
    result = subprocess.run([sys.executable, "-m", "deploy.k8s.validate"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for overlay in ("dev", "prod"):
        assert re.search(rf"^{overlay}: \d+ resources valid against Kubernetes 1.32 \(strict\), 0 invalid$",
                         result.stdout, re.M), result.stdout
    for skipped in ("Kafka/churnguard", "KafkaTopic/customer-events-dlq", "Cluster/churnguard-db",
                    "ServiceMonitor/churnguard", "PrometheusRule/churnguard"):
        assert f"    {skipped} (" in result.stdout


def test_every_core_resource_was_validated_and_only_crds_skipped(kubectl_available: None) -> None:
    for overlay in k8s.overlays():
        report = k8s.validate(overlay)
        assert report.errors == []
        assert any(v.startswith("Deployment/scoring ") for v in report.validated)
        assert all(s.split("(")[1].split("/")[0] in k8s.CRD_GROUPS for s in report.skipped)


def test_the_validator_rejects_a_misspelled_field(rendered: dict[str, list[dict[str, Any]]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    broken = copy.deepcopy(_of_kind(rendered["prod"], "Deployment")["ingest"])
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True  # wrong case
    monkeypatch.setattr(k8s, "render", lambda overlay: [broken])
    report = k8s.validate(k8s.OVERLAYS / "prod")
    assert len(report.errors) == 1
    assert "readOnlyRootFileSystem" in report.errors[0] and "Deployment/ingest" in report.errors[0]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_deployments_are_hardened(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    deployments = _of_kind(rendered[overlay], "Deployment")
    assert set(deployments) == set(SERVICES)
    health_paths = {route.path for route in health_router().routes}  # what the code serves
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 30, name
        assert pod["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "add" not in security["capabilities"]
        # Writable paths are emptyDirs: /tmp (matplotlib's cache) and var/ (reports, SQLite).
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"/tmp", "/app/var"}
        assert all("emptyDir" in v for v in pod["volumes"])
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, (name, kind)
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"/healthz", "/readyz"} <= health_paths
        # The command selects the service, on the port its Service targets.
        assert container["args"][:2] == ["serve", name]
        port = SERVICES[name]
        assert container["args"][container["args"].index("--port") + 1] == str(port)
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        service = _of_kind(rendered[overlay], "Service")[name]
        assert service["spec"]["ports"][0]["port"] == port
        assert service["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_configuration_names_only_real_settings(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """A typo in a variable name would be ignored by pydantic-settings: catch it here."""
    known = {f"{cls.model_config.get('env_prefix', '')}{name}".upper()
             for _title, cls, _source in SECTIONS for name in cls.model_fields}
    (config,) = _of_kind(rendered[overlay], "ConfigMap").values()
    assert set(config["data"]) <= known, set(config["data"]) - known
    for deployment in _of_kind(rendered[overlay], "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert {e["name"] for e in container["env"]} <= known
        assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        expected = {"CHURNGUARD_INTERNAL_TOKEN": {"name": secrets["CHURNGUARD_INTERNAL_TOKEN"]["name"],
                                                  "key": "token"},
                    "CHURNGUARD_DATABASE_URL": {"name": "churnguard-db-app", "key": "uri"}}
        if overlay == "prod" and deployment["metadata"]["name"] == "gateway":
            # The admin API exists only while this secret does (docs/operations.md).
            expected["CHURNGUARD_GATEWAY_ADMIN_KEY"] = {
                "name": "churnguard-gateway-admin", "key": "key", "optional": True}
        assert secrets == expected


def test_prod_has_production_settings_and_no_secret_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    prod = rendered["prod"]
    assert _of_kind(prod, "Secret") == {}, "a Secret with values is committed in the prod overlay"
    (config,) = _of_kind(prod, "ConfigMap").values()
    data = config["data"]
    assert data["CHURNGUARD_KAFKA_ENABLE_IDEMPOTENCE"] == "true"
    assert data["CHURNGUARD_KAFKA_ISOLATION_LEVEL"] == "read_committed"
    assert data["CHURNGUARD_KAFKA_REPLICATION_FACTOR"] == "3"
    assert data["CHURNGUARD_LOG_FORMAT"] == "json"
    assert data["CHURNGUARD_GATEWAY_DOCS_ENABLED"] == "false"
    assert not any("TOKEN" in key or "PASSWORD" in key or "SECRET" in key for key in data)
    for deployment in _of_kind(prod, "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        token = next(e for e in container["env"] if e["name"] == "CHURNGUARD_INTERNAL_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == "churnguard-internal"  # created out of band
    # Dev generates its own token; it must not be the code's built-in default either.
    (dev_secret,) = _of_kind(rendered["dev"], "Secret").values()
    assert dev_secret["metadata"]["name"].startswith("churnguard-internal")
    dev_token = base64.b64decode(dev_secret["data"]["token"]).decode()
    assert dev_token != InternalAuthSettings().internal_token.get_secret_value()


def test_prod_scales_and_survives_disruptions(rendered: dict[str, list[dict[str, Any]]]) -> None:
    prod = rendered["prod"]
    deployments = _of_kind(prod, "Deployment")
    assert all(d["spec"]["replicas"] >= 3 for d in deployments.values())
    hpas = _of_kind(prod, "HorizontalPodAutoscaler")
    assert set(hpas) == {"ingest", "scoring", "actions"}
    partitions = {t["spec"]["topicName"]: t["spec"]["partitions"] for t in _of_kind(prod, "KafkaTopic").values()}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["minReplicas"] == deployments[name]["spec"]["replicas"]
    # A consumer beyond the partition count would sit idle.
    assert hpas["scoring"]["spec"]["maxReplicas"] <= partitions["customer-events"]
    assert hpas["actions"]["spec"]["maxReplicas"] <= min(partitions["churn-scores"], partitions["customer-events"])
    pdbs = _of_kind(prod, "PodDisruptionBudget")
    assert set(pdbs) == set(SERVICES)
    for name, pdb in pdbs.items():
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert pdb["spec"]["maxUnavailable"] == 1
    assert _of_kind(rendered["dev"], "HorizontalPodAutoscaler") == {}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_kafka_is_replicated_and_every_topic_is_declared(rendered: dict[str, list[dict[str, Any]]],
                                                         overlay: str) -> None:
    resources = rendered[overlay]
    (kafka,) = _of_kind(resources, "Kafka").values()
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == 3
    assert config["min.insync.replicas"] == 2
    assert config["offsets.topic.replication.factor"] == 3
    assert config["auto.create.topics.enable"] is False
    (pool,) = _of_kind(resources, "KafkaNodePool").values()
    assert pool["spec"]["replicas"] >= 3
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    (config_map,) = _of_kind(resources, "ConfigMap").values()
    bootstrap = config_map["data"]["CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS"]
    assert bootstrap == f"{kafka['metadata']['name']}-kafka-bootstrap:9092"  # Strimzi's service name

    topics = {t["spec"]["topicName"]: t for t in _of_kind(resources, "KafkaTopic").values()}
    assert set(topics) == set(with_dead_letters())
    for name, topic in topics.items():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert topic["spec"]["replicas"] == 3, name
        assert topic["spec"]["partitions"] >= 3, name
        assert 0 < topic["spec"]["config"]["retention.ms"] <= WEEK_MS, name
        assert topic["spec"]["config"]["min.insync.replicas"] == 2, name


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_database_is_cloudnativepg_and_its_secret_is_what_the_services_read(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    (cluster,) = _of_kind(rendered[overlay], "Cluster").values()
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    # CloudNativePG names the application secret <cluster>-app.
    assert f"{cluster['metadata']['name']}-app" == "churnguard-db-app"
    assert cluster["spec"]["bootstrap"]["initdb"]["database"] == "churnguard"
    if overlay == "prod":
        assert cluster["spec"]["instances"] == 3


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_only_the_gateway_is_reachable_from_outside(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    policies = _of_kind(rendered[overlay], "NetworkPolicy")
    open_to_all = [p for p in policies.values()
                   if any("from" not in rule for rule in p["spec"].get("ingress", []))]
    assert [p["spec"]["podSelector"] for p in open_to_all] == [
        {"matchLabels": {"app.kubernetes.io/name": "gateway"}}
    ]
    services = policies["services-from-gateway"]
    assert services["spec"]["podSelector"]["matchExpressions"][0]["values"] == ["ingest", "scoring", "actions"]
    assert services["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}
    ]
    database = policies["database-from-services"]
    assert database["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/part-of": "churnguard", "app.kubernetes.io/component": "service"}}}]
    # The brokers' policy is Strimzi's, generated from the listener's peers: the services only.
    (kafka,) = _of_kind(rendered[overlay], "Kafka").values()
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["networkPolicyPeers"] == database["spec"]["ingress"][0]["from"]
    # The service pods carry the labels these selectors use.
    for deployment in _of_kind(rendered[overlay], "Deployment").values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "churnguard"
        assert labels["app.kubernetes.io/component"] == "service"


def test_monitoring_scrapes_every_service_and_runs_the_checked_rules(
    rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for resources in rendered.values():
        (monitor,) = _of_kind(resources, "ServiceMonitor").values()
        selector = monitor["spec"]["selector"]["matchLabels"]
        for service in _of_kind(resources, "Service").values():
            assert selector.items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        (rule,) = _of_kind(resources, "PrometheusRule").values()
        assert rule["spec"]["groups"], "no alert groups"
    assert prometheus_sync.main(["--check"]) == 0, "run python -m deploy.prometheus.sync"
