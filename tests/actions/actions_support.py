"""Helpers for the actions tests: a real HTTP webhook receiver, score records, polling."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any



from shared.events import ScoreRecord
from tests.helpers import INTERNAL_TOKEN, read_topic
from tests.helpers import async_wait_until as wait_until  # noqa: F401  (re-exported for the actions tests)

TOKEN = INTERNAL_TOKEN
TENANT = "tenant-a"
OTHER_TENANT = "tenant-b"
START = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)



def headers(tenant: str = TENANT, token: str | None = TOKEN) -> dict[str, str]:
    result = {"X-Churnguard-Tenant": tenant}
    if token is not None:
        result["X-Churnguard-Internal-Token"] = token
    return result


def make_score(
    score_id: str,
    customer_id: str,
    probability: float,
    tenant: str = TENANT,
    model_version: str = "m-test-1",
    reasons: list[str] | None = None,
) -> ScoreRecord:
    band = "high" if probability >= 0.7 else "medium" if probability >= 0.4 else "low"
    return ScoreRecord(
        score_id=score_id,
        tenant_id=tenant,
        customer_id=customer_id,
        probability=probability,
        band=band,
        model_version=model_version,
        scored_at=START,
        reasons=reasons or [],
    )


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST and answers with a status
    taken from `statuses` (one per request, in order) or else `default_status`."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.default_status = 200
        self._requests: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    status = (
                        receiver.statuses.pop(0) if receiver.statuses else receiver.default_status
                    )
                    receiver._requests.append(
                        Received(
                            self.path, {k.lower(): v for k, v in self.headers.items()}, body, status
                        )
                    )
                self.send_response(status)
                body = b"" if status in (204, 304) else b"ok"  # 204/304 carry no body (RFC 9110)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str = "/hooks") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self._requests if path is None or r.path == path]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


read_partitions = read_topic
