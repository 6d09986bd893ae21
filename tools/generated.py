"""Files generated from the code (docs/configuration.md, the metrics catalog, the Kubernetes
PrometheusRule): write them, or with `--check` say whether they are up to date."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(path: Path, wanted: str, command: str, argv: list[str]) -> int:
    """Write `wanted` to `path`; with `--check` in argv, write nothing and return 1 (naming
    `command`, which regenerates it) when the file differs."""
    if "--check" in argv:
        if not path.exists() or path.read_text() != wanted:
            print(f"{path} is out of date: run {command}", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted)
    print(f"wrote {path}")
    return 0
