"""Scores and their reasons for one batch: CPU per `score_and_explain` call by batch size.

The model is the one the scoring bench trains (simulated history, the boosted trees training
picks there). The raw reference, measured in the same run on the same rows: sklearn's own
`predict_proba` over the rows and their perturbed copies (one copy per feature that differs from
the model's reference), which is what `score_and_explain` computes for the probabilities and
reasons, less the features, the clipping and the wording.

    .venv/bin/python -m bench.reasons [--sizes 1,2,10,50,200,1000] [--seconds 1.0]

Prints a table; measures nothing else (no services, no broker).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np

from bench.scoring import train_model
from services.scoring import reasons
from services.scoring.features import FEATURE_NAMES, feature_vector, features_as_of, to_history_event
from services.scoring.model import single_threaded
from services.scoring.simulate import simulate_history


def cpu_per_call(call: Callable[[], object], seconds: float) -> float:
    """CPU seconds per call, over at least `seconds` of CPU after one warm-up call."""
    call()
    started, calls = time.process_time(), 0
    while time.process_time() - started < seconds:
        call()
        calls += 1
    return (time.process_time() - started) / calls


def customers(count: int) -> list[dict[str, float]]:
    end = datetime.now(timezone.utc)
    histories: dict[str, list] = {}
    for event in simulate_history(count, 7, end):
        histories.setdefault(event["customer_id"], []).append(to_history_event(event))
    return [features_as_of(sorted(h, key=lambda e: e.sort_key()), end) for h in histories.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda t: [int(s) for s in t.split(",")], default=[1, 2, 10, 50, 200, 1000])
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per measurement")
    args = parser.parse_args()

    trained = train_model(1500)
    estimator, reference = trained.estimator, trained.report.reference or reasons.TYPICAL_CUSTOMER
    rows = customers(max(args.sizes) + 200)[: max(args.sizes)]
    ref = np.array([float(reference[name]) for name in FEATURE_NAMES])
    print(f"model: {trained.report.algorithm}")
    print("| rows | score_and_explain CPU ms | sklearn predict_proba on rows + copies, CPU ms | ratio | ours µs per row |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        batch = rows[:size]
        ours = cpu_per_call(lambda: reasons.score_and_explain(estimator, FEATURE_NAMES, batch, reference), args.seconds)
        X = np.array([feature_vector(row, FEATURE_NAMES) for row in batch])
        rows_at, features_at = np.nonzero(X != ref)
        copies = X[rows_at].copy()
        copies[np.arange(len(rows_at)), features_at] = ref[features_at]
        stacked = np.vstack([copies, X])

        def sklearn() -> object:
            with single_threaded():
                return estimator.predict_proba(stacked)

        raw = cpu_per_call(sklearn, args.seconds)
        print(f"| {size:,} | {ours * 1e3:.2f} | {raw * 1e3:.2f} | {ours / raw:.2f} | {ours / size * 1e6:.1f} |")


if __name__ == "__main__":
    main()
