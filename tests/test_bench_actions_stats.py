"""The statistic that judges "a hanging receiver changes the healthy one's p99 by < 10%"
(bench/actions.py): pure logic on made-up latencies, deterministic (fixed seeds)."""

from __future__ import annotations

import random

from bench.actions import latency_summary, pooled_p99_change


def _runs(scale: float, seed: int, runs: int = 5, deliveries: int = 4_000) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.expovariate(1.0) * scale for _ in range(deliveries)] for _ in range(runs)]


def test_the_same_distribution_gives_an_interval_around_no_change_narrow_enough_to_judge() -> None:
    pooled = pooled_p99_change(_runs(1.0, seed=1), _runs(1.0, seed=2))
    low, high = pooled["ci95"]
    assert low < 0.0 < high
    assert high < 0.10 and low > -0.10
    assert pooled["deliveries"] == [20_000, 20_000]


def test_a_slowdown_of_a_third_is_seen_and_its_interval_excludes_ten_percent() -> None:
    pooled = pooled_p99_change(_runs(1.0, seed=1), _runs(4 / 3, seed=2))
    assert 0.25 < pooled["change"] < 0.42
    assert pooled["ci95"][0] > 0.10


def test_one_slow_run_widens_the_interval_instead_of_deciding_alone() -> None:
    steady = _runs(1.0, seed=3)
    with_outlier = _runs(1.0, seed=4)
    with_outlier[2] = [v * 3 for v in with_outlier[2]]  # the machine was busy during one run
    calm = pooled_p99_change(steady, _runs(1.0, seed=4))
    disturbed = pooled_p99_change(steady, with_outlier)
    assert disturbed["ci95"][1] - disturbed["ci95"][0] > 2 * (calm["ci95"][1] - calm["ci95"][0])


def test_the_summary_pools_each_conditions_runs_and_keeps_the_per_run_p99s() -> None:
    def run(hanging: bool, samples: list[float]) -> dict[str, object]:
        ordered = sorted(samples)
        return {"hanging_receiver": hanging, "from_commit_ms": ordered,
                "from_commit_p99_ms": ordered[int(0.99 * len(ordered)) - 1]}

    runs = [run(hanging, samples) for hanging, seed in ((False, 5), (True, 6), (False, 7), (True, 8))
            for samples in _runs(1.0, seed=seed, runs=1)]
    summary = latency_summary(runs)
    assert len(summary["healthy_beside"]["p99_ms"]) == len(summary["hanging_beside"]["p99_ms"]) == 2
    assert summary["pooled"]["deliveries"] == [8_000, 8_000]
    assert summary["pooled"]["ci95"][0] < summary["pooled"]["change"] < summary["pooled"]["ci95"][1]
