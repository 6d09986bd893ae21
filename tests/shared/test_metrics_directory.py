"""The metrics directory `churnguard serve` prepares for its workers (shared.metrics.multiprocess_metrics)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.metrics import MULTIPROCESS_DIR_ENV, multiprocess_metrics


def test_one_worker_without_a_directory_keeps_in_memory_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROCESS_DIR_ENV, raising=False)
    multiprocess_metrics(1)()
    assert MULTIPROCESS_DIR_ENV not in os.environ


def test_several_workers_get_a_temporary_directory_removed_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROCESS_DIR_ENV, raising=False)
    done = multiprocess_metrics(2)
    made = Path(os.environ[MULTIPROCESS_DIR_ENV])
    assert made.is_dir() and not any(made.iterdir())
    (made / "counter_123.db").write_bytes(b"x")
    done()
    assert not made.exists() and MULTIPROCESS_DIR_ENV not in os.environ


@pytest.mark.parametrize("workers", [1, 2])
def test_an_operators_directory_is_emptied_of_an_earlier_runs_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, workers: int
) -> None:
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_41.db").write_bytes(b"old")
    (given / "gauge_livesum_41.db").write_bytes(b"old")
    (given / "README").write_text("not ours")
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(given))
    multiprocess_metrics(workers)()
    assert sorted(p.name for p in given.iterdir()) == ["README"]
    assert os.environ[MULTIPROCESS_DIR_ENV] == str(given)
