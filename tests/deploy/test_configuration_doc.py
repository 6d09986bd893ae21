"""docs/configuration.md is generated from the settings classes and must not drift from them."""

from __future__ import annotations

import ast
from pathlib import Path

from tools import settings_doc

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_doc_is_up_to_date() -> None:
    assert settings_doc.DOC.read_text() == settings_doc.render(), (
        "docs/configuration.md is out of date: run .venv/bin/python -m tools.settings_doc"
    )


def test_every_settings_class_is_documented() -> None:
    """A new BaseSettings class anywhere in shared/ or services/ must be added to the doc."""
    declared = set()
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", getattr(base, "attr", None)) == "BaseSettings" for base in node.bases
            ):
                declared.add(node.name)
    documented = {cls.__name__ for _title, cls, _source in settings_doc.SECTIONS}
    assert declared, "found no settings class at all"
    assert declared <= documented, f"not in docs/configuration.md: {sorted(declared - documented)}"


def test_every_variable_appears_with_its_default() -> None:
    text = settings_doc.DOC.read_text()
    for env, default in (("CHURNGUARD_KAFKA_ENABLE_IDEMPOTENCE", "`false`"),
                         ("CHURNGUARD_KAFKA_ISOLATION_LEVEL", "`read_uncommitted`"),
                         ("CHURNGUARD_LOG_FORMAT", "`text`"),
                         ("CHURNGUARD_ACTIONS_HOLDOUT_PERCENT", "`10")):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{env}`"))
        assert default in row, row
