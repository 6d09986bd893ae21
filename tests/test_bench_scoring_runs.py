"""bench.scoring reports the median of its backlog runs, each run kept beside it."""

from __future__ import annotations

from bench.common import met_text
from bench.scoring import goals, median_run, runs_of


def run(events_per_s: float | None, cpu_us: float = 90.0) -> dict[str, object]:
    if events_per_s is None:
        return {"events": 3_000, "seconds": None, "events_per_s": None, "complete": False}
    return {"events": 19_000, "seconds": 19_000 / events_per_s, "events_per_s": events_per_s, "complete": True,
            "cpu_cores": 0.9, "cpu_us_per_event": cpu_us, "rss_mb": 240.0, "cache_hit_rate": 0.86}


def test_each_measure_is_the_median_of_the_runs() -> None:
    runs = [run(10_100, 86.0), run(9_000, 98.0), run(8_950, 99.0)]
    combined = median_run(runs)
    assert combined["complete"] is True
    assert combined["events_per_s"] == 9_000
    assert combined["cpu_us_per_event"] == 98.0
    assert combined["runs"] == runs
    assert runs_of(combined) == " (10,100, 9,000, 8,950)"


def test_one_unfinished_run_leaves_no_figure() -> None:
    combined = median_run([run(10_100), run(None), run(9_000)])
    assert combined["complete"] is False
    assert combined["events_per_s"] is None
    assert len(combined["runs"]) == 3


def test_a_single_run_is_reported_as_it_is() -> None:
    combined = median_run([run(9_500)])
    assert combined["events_per_s"] == 9_500
    assert runs_of(combined) == ""


def test_a_goal_the_run_did_not_measure_says_so() -> None:
    """A run without the 1,000/s rate (`--rates 200`) has no verdict on the p99 goal, not a fail."""
    results = {"backends": [{"backend": "postgresql", "throughput": {"events_per_s": 10_500.0},
                             "latency": [{"rate": 200, "p99_ms": 41.0, "missing": 0}]}]}
    verdicts = {g["goal"]: g["met"] for g in goals(results)}
    assert verdicts == {"pg_events_per_s": True, "pg_p99_1000": None}
    assert [met_text(v) for v in verdicts.values()] == ["yes", "**not measured**"]
