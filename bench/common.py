"""What every benchmark script shares: rewriting its generated block in a doc, naming the code
that was measured and the command that ran it, scratch PostgreSQL databases (the tests' too)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("CHURNGUARD_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
"""The PostgreSQL server benches make their scratch databases on (never the database itself)."""


def postgres_reachable(dsn: str = PG_ADMIN_DSN) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def create_scratch_database(dsn: str = PG_ADMIN_DSN, prefix: str = "cg_bench_") -> tuple[str, str]:
    """A new empty database on `dsn`'s server for one run or test: (its name, its URL). The
    prefix (`cg_bench_`, the tests' `cg_test_`) makes what a killed run left behind easy to find."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"{dsn.rsplit('/', 1)[0]}/{name}"


def drop_scratch_database(name: str, dsn: str = PG_ADMIN_DSN) -> None:
    """Drop a database create_scratch_database made, whoever is still connected to it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def code_version() -> str:
    """The commit checked out, and whether Python files differ from it ("unknown" outside git):
    taken when a run starts, so later edits do not change what it reports."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
                   if line.endswith(".py")]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} with uncommitted changes to {len(changed)} Python files" if changed else commit


def met_text(met: bool | None) -> str:
    """A goal's verdict in a results table; None: the run did not measure the figure."""
    return {True: "yes", False: "**no**", None: "**not measured**"}[met]


def run_command(module: str, argv: Sequence[str] | None) -> str:
    """The command a run was started by, for its result file: the make goal that started it
    (`BENCH_COMMAND`, which the Makefile sets and its sub-makes inherit, so `make bench`'s parts
    all say `make bench` and `make soak` says `make soak`), else `python -m <module> <args>`.
    `argv` given means called from Python (a test): its own arguments, whatever make is around."""
    from_make = os.environ.get("BENCH_COMMAND")
    if argv is None and from_make:
        return from_make.strip()
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)]).strip()


def replace_generated_block(
    doc: Path, start: str, end: str, block: str, intro_if_new: str = "", at_top: bool = False
) -> None:
    """Put `block` (which begins with `start` and ends with `end`) in place of the text between
    those markers in `doc`; when the markers are not there yet, append it (after `intro_if_new`),
    or with `at_top` put it right under the document's title (its first line, if a `# ` heading)."""
    text = doc.read_text() if doc.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    elif at_top:
        title, sep, body = text.partition("\n")
        if not title.startswith("# "):
            title, sep, body = "", "", text
        head = title + "\n\n" if title else ""
        text = head + intro_if_new + block + "\n\n" + body.lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + intro_if_new + block + "\n"
    doc.write_text(text)
