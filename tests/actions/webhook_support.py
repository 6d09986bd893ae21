"""A scriptable real HTTP webhook receiver (status + headers per request, or hang until
released) that deduplicates on webhook-id the way receivers are told to, plus small helpers
for the webhook tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.actions.actions_support import headers


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # hold the request open until `release()` (or 60 s)


@dataclass(frozen=True)
class Request:
    path: str
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None while it hangs


class ScriptedReceiver:
    """Answers each POST with the next `script` entry, else `default`. Effects are applied
    once per webhook-id (what docs/webhooks.md asks receivers to do): `effects` counts them,
    `duplicates` counts the re-sent ids it recognised."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.default = Answer()
        self._requests: list[Request] = []
        self._effects: dict[str, int] = {}
        self.duplicates = 0
        self.hanging = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like real receivers

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                seen = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    answer = receiver.script.pop(0) if receiver.script else receiver.default
                    if answer.hang:
                        receiver.hanging += 1
                if answer.hang:
                    receiver._release.wait(60)
                    with receiver._lock:
                        receiver.hanging -= 1
                with receiver._lock:
                    webhook_id = seen.get("webhook-id", "")
                    receiver._requests.append(
                        Request(self.path, webhook_id, seen, body, answer.status)
                    )
                    if 200 <= answer.status < 300:
                        if webhook_id in receiver._effects:
                            receiver.duplicates += 1
                        else:
                            receiver._effects[webhook_id] = 1
                payload = b"" if answer.status in (204, 304) else b"ok"
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout): nothing to answer to
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str = "/hooks", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[Request]:
        return [r for r in self.requests() if r.path == path]

    @property
    def effects(self) -> int:
        with self._lock:
            return len(self._effects)

    def release(self) -> None:
        self._release.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def deliveries(client: TestClient, tenant: str | None = None, **query: str) -> list[dict[str, Any]]:
    response = client.get(
        "/v1/deliveries", params=query, headers=headers(tenant) if tenant else headers()
    )
    assert response.status_code == 200, response.text
    return response.json()


def subscribe(client: TestClient, url: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": url, **body}, headers=headers())
    assert response.status_code == 201, response.text
    return response.json()


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a real /metrics scrape, keyed by (name, sorted labels)."""
    text = client.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
