"""Which command a benchmark's result file says it was run by (bench.common.run_command)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.common import run_command

REPO = Path(__file__).resolve().parent.parent


def test_a_run_from_make_names_the_make_goal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_COMMAND", "make soak")
    monkeypatch.setattr(sys, "argv", ["bench/pipeline.py", "--rates", "50", "--soak-seconds", "600"])
    assert run_command("bench.pipeline", None) == "make soak"


def test_a_run_from_the_shell_names_its_module_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_COMMAND", raising=False)
    monkeypatch.setattr(sys, "argv", ["bench/actions.py", "--concurrency", "16", "--no-latency"])
    assert run_command("bench.actions", None) == "python -m bench.actions --concurrency 16 --no-latency"
    monkeypatch.setattr(sys, "argv", ["bench/summary.py"])
    assert run_command("bench.summary", None) == "python -m bench.summary"


def test_a_call_from_python_names_its_own_arguments_even_under_make(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_COMMAND", "make test")
    assert run_command("bench.scoring", ["--events", "100"]) == "python -m bench.scoring --events 100"


class _Named(Exception):
    """Stops a bench's main() where it names its command."""


@pytest.mark.parametrize("module", ["ingest", "scoring", "actions", "pipeline", "summary", "telco"])
def test_each_bench_run_from_make_names_the_make_goal_in_its_result(
        module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started as `python -m bench.<module>` by make (main() without arguments), each bench asks
    run_command with argv None, which is what lets BENCH_COMMAND name the run (the actions
    bench once passed sys.argv on and its result file said `python -m bench.actions` under
    `make bench`)."""
    bench = importlib.import_module(f"bench.{module}")
    asked: list[object] = []

    def named(name: str, argv: object) -> str:
        asked.append(argv)
        raise _Named

    monkeypatch.setattr(bench, "run_command", named)
    monkeypatch.setattr(sys, "argv", [f"bench/{module}.py", "--no-doc"])
    with pytest.raises(_Named):
        bench.main()
    assert asked == [None]


@pytest.mark.parametrize(("goals", "expected"), [
    (["soak"], "make soak"),
    (["bench-actions", "bench-summary"], "make bench-actions bench-summary"),
])
def test_the_makefile_hands_its_goal_to_the_run(goals: list[str], expected: str, tmp_path: Path) -> None:
    """The real Makefile, its recipes run with a stand-in `python` that prints what a bench
    would read. STAMP names a file newer than pyproject.toml, so nothing is installed."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\necho "BENCH_COMMAND=$BENCH_COMMAND"\n')
    stand_in.chmod(0o755)
    installed = tmp_path / "installed"
    installed.touch()
    os.utime(installed, (time.time() + 3_600,) * 2)  # whatever a checkout left as pyproject's time
    printed = subprocess.run(
        ["make", "-s", "--no-print-directory", *goals, f"BIN={tmp_path}", f"STAMP={installed}"],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if k not in ("BENCH_COMMAND", "MAKEFLAGS", "MAKELEVEL")},
    ).stdout.splitlines()
    assert printed == [f"BENCH_COMMAND={expected}"] * len(goals)
