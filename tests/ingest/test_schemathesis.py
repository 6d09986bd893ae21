"""schemathesis against ingest's own OpenAPI, over real HTTP with the real broker and database:
whatever the generated input, ingest answers as documented and never with a 5xx.

Runs schemathesis' own CLI (its pytest plugin does not support pytest 9 yet)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.ingest.app import create_app
from shared.settings import KafkaSettings
from tests.helpers import ServerThread, internal_headers
from tests.ingest.test_routes import settings_for

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_ingest_conforms_to_its_openapi(kafka_settings: KafkaSettings, database_url: str, tmp_path: Path) -> None:
    server = ServerThread(create_app(settings_for(kafka_settings, database_url))).start()
    headers = [arg for name, value in internal_headers("tenant-fuzz").items() for arg in ("-H", f"{name}: {value}")]
    try:
        run = subprocess.run(
            [str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json", *headers,
             "--max-examples", "60", "--seed", "1", "--workers", "1",
             "--request-timeout", "10", "--report", "junit", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout.lower(), run.stdout[-3000:]
