"""The scoring process's runtime settings hold while it serves and are undone when it stops."""

from __future__ import annotations

import gc
import sys
from datetime import datetime, timezone

from fastapi.testclient import TestClient

from services.scoring.app import YOUNG_GC_THRESHOLD, create_app
from services.scoring.config import ScoringSettings
from shared.clock import ManualClock


def test_the_gil_switch_interval_and_young_collections_are_scorings_own_while_serving(
    scoring_settings: ScoringSettings,
) -> None:
    before, gc_before = sys.getswitchinterval(), gc.get_threshold()
    settings = scoring_settings.model_copy(update={"gil_switch_interval_ms": 2.5})
    with TestClient(create_app(settings, ManualClock(datetime(2026, 5, 1, tzinfo=timezone.utc)))) as client:
        assert client.get("/healthz").status_code == 200
        assert sys.getswitchinterval() == 0.0025
        assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD
    assert sys.getswitchinterval() == before
    assert gc.get_threshold() == gc_before

