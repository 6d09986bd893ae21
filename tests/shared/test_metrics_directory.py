"""The metrics directory `churnguard serve` prepares for its workers (shared.metrics.multiprocess_metrics)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.metrics import MULTIPROCESS_DIR_ENV, multiprocess_metrics


def test_one_worker_without_a_directory_keeps_in_memory_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROCESS_DIR_ENV, raising=False)
    multiprocess_metrics(1, "ingest-8001")()
    assert MULTIPROCESS_DIR_ENV not in os.environ


def test_several_workers_get_a_temporary_directory_removed_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROCESS_DIR_ENV, raising=False)
    done = multiprocess_metrics(2, "ingest-8001")
    made = Path(os.environ[MULTIPROCESS_DIR_ENV])
    assert made.is_dir() and not any(made.iterdir())
    (made / "counter_123.db").write_bytes(b"x")
    done()
    assert not made.exists() and MULTIPROCESS_DIR_ENV not in os.environ


@pytest.mark.parametrize("workers", [1, 2])
def test_under_an_operators_directory_each_server_gets_its_own_emptied_of_an_earlier_runs_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, workers: int
) -> None:
    given = tmp_path / "metrics"
    own, neighbour = given / "ingest-8001", given / "gateway-8000"
    for directory in (own, neighbour):
        directory.mkdir(parents=True)
        (directory / "counter_41.db").write_bytes(b"old")
    (own / "gauge_livesum_41.db").write_bytes(b"old")
    (own / "README").write_text("not ours")
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(given))
    done = multiprocess_metrics(workers, "ingest-8001")
    assert os.environ[MULTIPROCESS_DIR_ENV] == str(own)  # what the workers inherit
    assert sorted(p.name for p in own.iterdir()) == ["README"]
    assert sorted(p.name for p in neighbour.iterdir()) == ["counter_41.db"]  # another service's, kept
    done()
    assert os.environ[MULTIPROCESS_DIR_ENV] == str(given)
