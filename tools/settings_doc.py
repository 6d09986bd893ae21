"""Writes docs/configuration.md from the pydantic settings classes: every setting, its
environment variable, type and default. `python -m tools.settings_doc` rewrites the file;
`--check` exits 1 when it is out of date (tests/deploy/test_configuration_doc.py does the same).

The description is the field's `description`, else the comment right above the field."""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from services.actions.config import ActionsSettings
from services.gateway.config import GatewaySettings
from services.ingest.config import IngestSettings
from services.scoring.config import ScoringSettings
from shared.logs import LogSettings
from shared.secret_box import SecretsSettings
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from tools.generated import write_or_check

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

SECTIONS: tuple[tuple[str, type[BaseSettings], str], ...] = (
    ("Kafka (every service but the gateway)", KafkaSettings, "shared/settings.py"),
    ("Database (every service)", DatabaseSettings, "shared/settings.py"),
    ("Internal trust (every service)", InternalAuthSettings, "shared/settings.py"),
    ("Logs (every process)", LogSettings, "shared/logs.py"),
    ("Secrets at rest (ingest, actions)", SecretsSettings, "shared/secret_box.py"),
    ("Gateway", GatewaySettings, "services/gateway/config.py"),
    ("Ingest", IngestSettings, "services/ingest/config.py"),
    ("Scoring", ScoringSettings, "services/scoring/config.py"),
    ("Actions", ActionsSettings, "services/actions/config.py"),
)

HEADER = """# Configuration

Every setting is an environment variable (pydantic-settings). Lists take JSON
(`CHURNGUARD_ACTIONS_RETRY_SCHEDULE_S='[5, 60]'`); booleans `true`/`false`. A bad value stops the
service at start with the variable's name and the reason. On Kubernetes the values come from the
`churnguard-config` ConfigMap and the `churnguard-secrets` Secret (deploy/k8s); the prod overlay
sets the production-only ones (idempotent producer, `read_committed`, JSON logs).

Generated from the settings classes by `python -m tools.settings_doc`; do not edit by hand
(a test fails when this file is out of date).
"""


def _comments_above(cls: type) -> dict[str, str]:
    """Field name -> the `#` comment block directly above its line in the class body."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    body = source.splitlines()
    found: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment: list[str] = []
            row = node.lineno - 2
            while row >= 0 and body[row].strip().startswith("#"):
                comment.insert(0, body[row].strip().lstrip("#").strip())
                row -= 1
            if comment:
                found[node.target.id] = " ".join(comment)
    return found


def _type_name(field: FieldInfo) -> str:
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in get_args(annotation))
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "*required*"
    else:
        value = field.default
    if isinstance(value, SecretStr):
        return "a development value: **set it in production**"
    if isinstance(value, Path) and value.is_relative_to(DOC.parent.parent):
        # relative to the checkout, so the document does not depend on where it was generated
        value = value.relative_to(DOC.parent.parent)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    if value == "":
        return "empty"
    if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(DOC.parents[1]):
        # A path inside the checkout: shown relative to it, so the doc is the same in every clone.
        return f"`<repo>/{value.relative_to(DOC.parents[1])}`"
    return f"`{value}`"


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="),
           ("min_length", "at least {} items"), ("max_length", "at most {}"))


def _bounds(field: FieldInfo) -> str:
    found = []
    for constraint in field.metadata:
        for attr, shown in _BOUNDS:
            value = getattr(constraint, attr, None)
            if value is not None:
                found.append(shown.format(value) if "{}" in shown else f"{shown} {value}")
    return ", ".join(found)


def _is_nested(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    out = [HEADER]
    for title, cls, source in SECTIONS:
        prefix = cls.model_config.get("env_prefix", "")
        comments = _comments_above(cls)
        nested = [name for name, f in cls.model_fields.items() if _is_nested(f)]
        out.append(f"\n## {title}\n\n`{cls.__name__}` in {source}.")
        if nested:
            composed = ", ".join(
                f"`{cls.model_fields[n].annotation.__name__}`" for n in nested  # type: ignore[union-attr]
            )
            out.append(f" Also reads {composed} (above).")
        out.append("\n\n| variable | type | default | meaning |\n|---|---|---|---|\n")
        for name, field in cls.model_fields.items():
            if name in nested:
                continue
            meaning = field.description or comments.get(name, "")
            bounds = _bounds(field)  # so the doc says what the service refuses
            if bounds:
                meaning = f"{meaning} ({bounds})" if meaning else f"({bounds})"
            out.append(f"| `{prefix}{name.upper()}` | {_cell(_type_name(field))} | {_cell(_default(field))} "
                       f"| {_cell(meaning)} |\n")
    return "".join(out)


def main(argv: list[str]) -> int:
    return write_or_check(DOC, render(), "python -m tools.settings_doc", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
