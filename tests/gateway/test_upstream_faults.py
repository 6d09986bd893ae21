"""Upstreams that misbehave below HTTP, on real sockets: one that hangs up without answering,
one that answers garbage, one that accepts the connection and then says nothing. The caller
gets 502 or 504 quickly, never a hang, and the upstream's words never reach the caller."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings


def _raw_server(behaviour: Callable[[socket.socket], None]) -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            behaviour(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def _hang_up(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.close()


def _garbage(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"SECRET-UPSTREAM-GARBAGE\r\n\r\n")
    conn.close()


def _silent(conn: socket.socket) -> None:
    conn.recv(65536)  # and never a byte back (the connection is held open)


@pytest.fixture
def hanging_up() -> Iterator[str]:
    yield from _raw_server(_hang_up)


@pytest.fixture
def garbage() -> Iterator[str]:
    yield from _raw_server(_garbage)


@pytest.fixture
def silent() -> Iterator[str]:
    yield from _raw_server(_silent)


@pytest.mark.parametrize("upstream", ["hanging_up", "garbage"])
def test_an_upstream_breaking_http_is_502_quickly(
    settings: GatewaySettings, auth: dict[str, str], upstream: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(upstream)
    with TestClient(create_app(settings.model_copy(update={"scoring_url": url}))) as client:
        started = time.monotonic()
        response = client.get("/v1/models", headers=auth)
        assert time.monotonic() - started < 2
        assert response.status_code == 502, response.text
        assert response.json()["detail"].startswith("upstream service scoring failed")
        assert "SECRET-UPSTREAM-GARBAGE" not in response.text
        assert client.get("/v1/webhooks", headers=auth).status_code == 200  # others unaffected


def test_an_upstream_that_accepts_and_says_nothing_is_504_at_the_timeout(
    settings: GatewaySettings, auth: dict[str, str], silent: str
) -> None:
    with TestClient(create_app(settings.model_copy(
            update={"scoring_url": silent, "upstream_timeout_s": 0.5}))) as client:
        started = time.monotonic()
        response = client.post("/v1/models/m-1/promote", headers=auth, json={})
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert "did not answer within 0.5 s" in response.json()["detail"]
        assert 0.4 < elapsed < 1.5
        scrape = client.get("/metrics").text
        assert 'churnguard_gateway_upstream_requests_total{outcome="timeout",upstream="scoring"}' in scrape


@pytest.mark.parametrize(("upstream", "status", "detail"), [
    ("hanging_up", 502, "upstream service ingest failed"),
    ("garbage", 502, "upstream service ingest failed"),
    ("silent", 504, "upstream service ingest did not answer within 0.5 s"),
    ("dead_url", 503, "upstream service ingest is unavailable; retry later"),
    ("echo", 502, "upstream service ingest failed: unusable answer"),  # an ingest that cannot join
])
def test_joined_single_events_get_the_answer_forward_gives_for_a_broken_ingest(
    settings: GatewaySettings, auth: dict[str, str], upstream: str, status: int, detail: str,
    request: pytest.FixtureRequest,
) -> None:
    """POST /v1/events goes to ingest joined with other callers' events (services/gateway/joiner.py):
    when that request fails as a whole, each caller gets what an unjoined one would, quickly."""
    url = settings.ingest_url if upstream == "echo" else request.getfixturevalue(upstream)
    with TestClient(create_app(settings.model_copy(
            update={"ingest_url": url, "join_events": True, "upstream_timeout_s": 0.5}))) as client:
        started = time.monotonic()
        response = client.post("/v1/events", headers=auth, json={"id": "evt-1"})
        assert time.monotonic() - started < 1.5
        assert response.status_code == status, response.text
        assert response.json()["detail"].startswith(detail)
        assert "SECRET-UPSTREAM-GARBAGE" not in response.text
        if status == 503:
            assert response.headers["retry-after"] == "1"
