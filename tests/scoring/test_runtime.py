"""The scoring process's runtime settings hold while it serves and are undone when it stops."""

from __future__ import annotations

import sys
from datetime import datetime, timezone

from fastapi.testclient import TestClient

from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from shared.clock import ManualClock


def test_the_gil_switch_interval_is_the_configured_one_while_serving(scoring_settings: ScoringSettings) -> None:
    before = sys.getswitchinterval()
    settings = scoring_settings.model_copy(update={"gil_switch_interval_ms": 2.5})
    with TestClient(create_app(settings, ManualClock(datetime(2026, 5, 1, tzinfo=timezone.utc)))) as client:
        assert client.get("/healthz").status_code == 200
        assert sys.getswitchinterval() == 0.0025
    assert sys.getswitchinterval() == before

