"""Score drift (PSI) against the model's validation scores: pure logic."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from services.scoring.drift import ScoreDrift, bin_of, psi


def test_psi_of_identical_distributions_is_zero_and_grows_with_the_shift() -> None:
    assert psi([10, 20, 30], [1, 2, 3]) == 0.0  # same shares, different counts
    small = psi([50, 30, 20], [45, 32, 23])
    large = psi([50, 30, 20], [10, 30, 60])
    assert 0 < small < 0.1 < 0.2 < large
    # by hand: sum((a - e) * ln(a / e)) over the shares
    e, a = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.3, 0.6])
    assert math.isclose(large, float(np.sum((a - e) * np.log(a / e))))


def test_live_window_is_unknown_until_full_enough_then_tracks_the_latest_scores() -> None:
    rng = np.random.default_rng(3)
    reference = rng.beta(1, 12, 5_000)  # mostly low risk, as validation scores are
    drift = ScoreDrift(reference, min_live=200, window=1_000)
    drift.observe(rng.beta(1, 12, 199))
    assert math.isnan(drift.value())
    drift.observe(rng.beta(1, 12, 801))
    assert drift.value() < 0.05  # the same population
    drift.observe(rng.beta(6, 4, 1_000))  # a full window of high scores replaces it
    assert drift.value() > 1.0


def test_no_reference_scores_means_no_drift_figure() -> None:
    drift = ScoreDrift([], min_live=1)
    drift.observe([0.5, 0.7])
    assert math.isnan(drift.value())


def test_the_drift_gauge_reads_the_consumers_drift_when_scraped_and_lets_it_go() -> None:
    import gc
    import weakref

    from prometheus_client import REGISTRY

    from services.scoring import metrics

    class Consumer:  # what the gauge reads of a ScoringConsumer
        def __init__(self, drift: ScoreDrift) -> None:
            self.drift = drift

    def scraped() -> float | None:
        return REGISTRY.get_sample_value("churnguard_scoring_score_drift")

    rng = np.random.default_rng(5)
    consumer = Consumer(ScoreDrift(rng.beta(1, 12, 5_000), min_live=200, window=1_000))
    metrics.watch_score_drift(weakref.ref(consumer))
    assert math.isnan(scraped())
    consumer.drift.observe(rng.beta(6, 4, 1_000))  # nothing set the gauge since: it reads on scrape
    assert scraped() == consumer.drift.value() > 1.0
    consumer.drift = ScoreDrift(rng.beta(1, 12, 5_000), min_live=200)  # a new model: a new reference
    assert math.isnan(scraped())
    gone = weakref.ref(consumer)
    del consumer
    gc.collect()
    assert gone() is None  # the gauge did not keep it alive
    assert math.isnan(scraped())


@given(batches=st.lists(st.lists(st.floats(0.0, 1.0), max_size=40), max_size=30),
       window=st.integers(1, 50))
def test_the_window_holds_exactly_the_latest_scores_whatever_the_batch_sizes(
        batches: list[list[float]], window: int) -> None:
    drift = ScoreDrift([0.1, 0.5], min_live=1, window=window)
    everything: list[float] = []
    for batch in batches:
        drift.observe(batch)
        everything.extend(batch)
    latest = everything[-window:] if everything else []
    expected = np.bincount(bin_of(latest), minlength=len(drift._live))
    assert drift._live.tolist() == expected.tolist()
    assert list(drift._recent) == bin_of(latest).tolist()
