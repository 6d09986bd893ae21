"""Score drift: how far the live score distribution has moved from the one the active model
produced on its validation period, as a population stability index (PSI).

PSI = sum over bins of (live% - reference%) * ln(live% / reference%), over the bins of the
score histogram. Rules of thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 significant
(deploy/prometheus alerts on the last). The live side is a sliding window of the latest scores
this process produced for events; until it holds `min_live` scores the value is NaN (unknown,
which no alert compares true against).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

EDGES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Upper edges of all bins but the last (which ends at 1): those of churnguard_scoring_score."""
FLOOR = 1e-4
"""Empty bins count as this share, so ln() stays finite."""


def shares(bin_counts: Sequence[float]) -> np.ndarray:
    counts = np.asarray(bin_counts, dtype=float)
    return np.maximum(counts / max(counts.sum(), 1.0), FLOOR)


def bin_of(scores: Iterable[float]) -> np.ndarray:
    return np.searchsorted(EDGES, np.asarray(list(scores), dtype=float), side="right")


def psi(reference: Sequence[float], live: Sequence[float]) -> float:
    """PSI between two histograms over the same bins (counts or shares)."""
    expected, actual = shares(reference), shares(live)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class ScoreDrift:
    def __init__(self, reference_scores: Sequence[float], min_live: int = 200, window: int = 10_000) -> None:
        self._reference = np.bincount(bin_of(reference_scores), minlength=len(EDGES) + 1)
        self._min_live = min_live
        self._window = window
        self._recent: deque[int] = deque()
        self._live = np.zeros(len(EDGES) + 1)

    def observe(self, scores: Iterable[float]) -> None:
        """Add a batch of scores to the window; the oldest leave it (counted per batch: one
        numpy call each way, not one per score)."""
        bins = bin_of(scores)[-self._window:]
        leaving = len(self._recent) + len(bins) - self._window
        if leaving > 0:
            self._live -= np.bincount([self._recent.popleft() for _ in range(leaving)], minlength=len(self._live))
        self._recent.extend(bins.tolist())
        self._live += np.bincount(bins, minlength=len(self._live))

    def value(self) -> float:
        if len(self._recent) < self._min_live or self._reference.sum() == 0:
            return math.nan
        return psi(self._reference, self._live)
