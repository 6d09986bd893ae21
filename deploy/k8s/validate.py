"""Renders every overlay with `kubectl kustomize` and validates each resource against the
Kubernetes 1.32 schema (kubernetes-validate, strict: unknown fields are errors).

Custom resources (Strimzi, CloudNativePG, Prometheus Operator) have no schema here: their
CRDs' schemas are not vendored (they ship with each operator's release), so they are listed
as skipped, by name, every run; tests/deploy/test_k8s.py checks their key fields instead.

    python -m deploy.k8s.validate        (make k8s-validate)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

K8S = Path(__file__).resolve().parent
OVERLAYS = K8S / "overlays"
KUBERNETES_VERSION = "1.32"
# API groups whose kinds are CRDs: no schema is vendored for them.
CRD_GROUPS = {"kafka.strimzi.io", "postgresql.cnpg.io", "monitoring.coreos.com"}


class RenderError(Exception):
    pass


@dataclass
class Report:
    overlay: str
    validated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def overlays() -> list[Path]:
    return sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").exists())


def kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        raise RenderError("kubectl not found: install kubectl 1.32 (it bundles kustomize 5.5)")
    return found


def render(overlay: Path) -> list[dict[str, Any]]:
    result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {overlay} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def describe(resource: dict[str, Any]) -> str:
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')} ({resource.get('apiVersion')})"


def validate(overlay: Path) -> Report:
    report = Report(overlay.name)
    for resource in render(overlay):
        group = str(resource.get("apiVersion", "")).rpartition("/")[0]
        if group in CRD_GROUPS:
            report.skipped.append(describe(resource))
            continue
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path) or "(top level)"
            report.errors.append(f"{describe(resource)} at {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            report.errors.append(f"{describe(resource)}: no Kubernetes {KUBERNETES_VERSION} schema for this kind")
        else:
            report.validated.append(describe(resource))
    return report


def main() -> int:
    failed = False
    for overlay in overlays():
        try:
            report = validate(overlay)
        except RenderError as exc:
            print(f"{overlay.name}: {exc}")
            failed = True
            continue
        print(f"{overlay.name}: {len(report.validated)} resources valid against Kubernetes "
              f"{KUBERNETES_VERSION} (strict), {len(report.errors)} invalid")
        for error in report.errors:
            print(f"  INVALID {error}")
        print(f"  skipped, custom resources without a vendored schema ({len(report.skipped)}):")
        for skipped in report.skipped:
            print(f"    {skipped}")
        failed = failed or bool(report.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
