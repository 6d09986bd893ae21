"""The shortened fault-injection run (`make chaos` is the long one): every service SIGKILLed
at least once mid-load, the broker SIGSTOPped, the webhook receiver failing and hanging, the
database taken away, poisoned messages on the topics — and afterwards nothing lost, nothing
doubled, features equal to a recomputation, every offer delivered or parked with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import ChaosConfig, ChaosRun, failures, summary
from tools.postgres import PostgresUnavailable, server_bin_dir

pytestmark = pytest.mark.e2e


def _postgres_tools() -> bool:
    try:
        server_bin_dir()
        return True
    except PostgresUnavailable:
        return False


async def test_nothing_lost_or_doubled_under_faults(tmp_path: Path, postgres_available: bool) -> None:
    # PostgreSQL (a server of the test's own, so taking it away disturbs nothing else) wherever
    # the suite runs on PostgreSQL; SQLite otherwise. `make chaos` runs both, longer.
    database = "postgresql" if postgres_available else "sqlite"
    if database == "postgresql" and not _postgres_tools():
        pytest.fail("PostgreSQL is reachable but its server tools (initdb, pg_ctl) are not installed")
    config = ChaosConfig(
        workdir=tmp_path / database, database=database, events=2000, load_seconds=35, kills=4,
        broker_pauses=1, receiver_failures=1, receiver_hangs=1, database_outages=1,
        drain_timeout_s=180, train_customers=800,
    )
    result = await ChaosRun(config).run()
    problems = failures(result, config)
    assert not problems, f"{problems}\n{summary(result)}\nlogs: {config.workdir}"
    # the run really exercised what it claims
    assert result["events"]["accepted"] >= 2000
    assert result["checks"]["offers"]["delivered"] > 0
    assert result["checks"]["dead_letters"]["deliberate"] >= 4
