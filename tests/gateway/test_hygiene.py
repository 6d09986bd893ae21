"""Bad input at the public door: malformed keys (never echoed), a tenant named in the body,
path or query (never trusted), request ids carrying header injection or over-long (replaced,
never echoed), CORS off unless configured, docs that can be turned off."""

from __future__ import annotations

import asyncio
import re
import socket

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from tests.helpers import ServerThread

LONG_KEY = "cg_" + "A" * 400


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Authorization": "Bearer"}, "missing API key"),
    ({"Authorization": "Bearer    "}, "missing API key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing API key"),
    ({"Authorization": "Bearer cg_"}, "invalid API key"),
    ({"Authorization": "Bearer not-a-key-at-all"}, "invalid API key"),
    ({"Authorization": f"Bearer {LONG_KEY}"}, "invalid API key"),
    ({"X-API-Key": "cg_\u00e9t\u00e9-unicode".encode()}, "invalid API key"),  # raw UTF-8 bytes
    ({"X-API-Key": "cg_secret-looking-but-wrong-0123456789abcdef"}, "invalid API key"),
])
def test_malformed_keys_are_401_and_never_echoed(
    client: TestClient, headers: dict[str, str | bytes], expected: str
) -> None:
    response = client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["detail"].startswith(expected)
    raw = next(iter(headers.values()))
    value = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    credential = value.removeprefix("Bearer").removeprefix("Basic").strip()
    if len(credential) > 3:  # "cg_" alone is in every message about keys
        assert credential not in response.text and credential not in str(response.headers)


def test_a_tenant_in_the_body_path_or_query_is_never_trusted(
    client: TestClient, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    tenant_id, _ = tenant
    body = client.post("/v1/events?tenant_id=t_other&tenant=t_other",
                       json={"id": "e1", "tenant_id": "t_other"}, headers=auth)
    assert body.status_code == 200
    echoed = body.json()
    assert echoed["tenant"] == tenant_id  # what the service trusts: the key's tenant
    assert echoed["headers"]["x-churnguard-tenant"] == tenant_id
    # (the body goes on as sent: ingest's envelope forbids unknown fields, so a tenant_id in an
    # event is refused there with 422; scoring and actions never read one from a body)

    # There is no public path that names a tenant.
    for path in ("/v1/tenants/t_other/events", "/v1/t_other/events"):
        assert client.post(path, json={}, headers=auth).status_code == 404


@pytest.mark.parametrize("request_id", [
    "x" * 129,                         # over-long
    "abc def",                         # blank inside
    "abc%0d%0aSet-Cookie:%20a=b",      # encoded CR/LF
    "abc\tdef",
    '"quoted"',
])
def test_odd_request_ids_are_replaced_not_echoed(
    client: TestClient, auth: dict[str, str], request_id: str
) -> None:
    response = client.get("/v1/models", headers={**auth, "X-Request-ID": request_id})
    assert response.status_code == 200
    replaced = response.headers["X-Request-ID"]
    assert replaced != request_id and len(replaced) == 32 and replaced.isalnum()
    assert response.json()["headers"]["x-request-id"] == replaced  # upstream gets ours too


def test_raw_cr_lf_in_a_request_id_never_splits_the_response(settings: GatewaySettings, tenant: tuple[str, str]) -> None:
    """Over a raw socket, past any client-side check: a request id carrying CR/LF is refused by
    the HTTP parser or replaced, and no injected header reaches the response."""
    _, key = tenant
    server = ServerThread(create_app(settings)).start()
    try:
        for value in (b"abc\r\nSet-Cookie: injected=1", b"abc\rSet-Cookie: injected=1",
                      b"abc\nSet-Cookie: injected=1", b"abc\x00def"):
            request = (b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nX-API-Key: " + key.encode()
                       + b"\r\nX-Request-ID: " + value + b"\r\nConnection: close\r\n\r\n")
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
                conn.sendall(request)
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
            head = answer.split(b"\r\n\r\n", 1)[0].lower()
            status = int(head.split(b" ", 2)[1])
            assert status in (200, 400), answer[:300]
            assert b"set-cookie" not in head and b"injected" not in head
            # A CR or LF ends the header at the parser ("abc" is then a plain id, and the rest a
            # request header of its own); whatever the id became, it is a plain token.
            for line in head.split(b"\r\n"):
                if line.startswith(b"x-request-id:"):
                    assert re.fullmatch(rb"x-request-id: [a-z0-9._:-]{1,128}", line), line
    finally:
        server.stop()


def test_request_ids_are_sanitized_in_the_asgi_scope_itself(settings: GatewaySettings) -> None:
    """Whatever a server lets through: a header value with CR/LF, as raw bytes in the ASGI scope
    (no HTTP client would send it), is replaced."""
    app = create_app(settings)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/healthz", "raw_path": b"/healthz", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("gateway", 80),
        "headers": [(b"host", b"gateway"), (b"x-request-id", b"abc\r\nSet-Cookie: injected=1")],
    }
    asyncio.run(app(scope, receive, send))
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 200
    headers = {k.decode().lower(): v for k, v in start["headers"]}
    assert "set-cookie" not in headers
    assert b"abc" not in headers["x-request-id"] and len(headers["x-request-id"]) == 32
    assert all(b"\r" not in v and b"\n" not in v for _, v in start["headers"])


def test_no_cors_headers_unless_origins_are_configured(client: TestClient, auth: dict[str, str]) -> None:
    preflight = client.options("/v1/models", headers={
        "Origin": "https://shop.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers
    simple = client.get("/v1/models", headers={**auth, "Origin": "https://shop.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_only_for_the_configured_origins(settings: GatewaySettings, auth: dict[str, str]) -> None:
    configured = settings.model_copy(update={"cors_origins": "https://admin.example, https://b.example/"})
    with TestClient(create_app(configured)) as client:
        preflight = client.options("/v1/models", headers={
            "Origin": "https://admin.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://admin.example"
        assert "allow-credentials" not in str(preflight.headers).lower()
        allowed = client.get("/v1/models", headers={**auth, "Origin": "https://b.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://b.example"
        assert "retry-after" in allowed.headers["access-control-expose-headers"].lower()
        other = client.get("/v1/models", headers={**auth, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        refused = client.options("/v1/models", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_bad_cors_origins_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="CORS origin 'admin.example' must start with http"):
        GatewaySettings(cors_origins="admin.example")


def test_docs_can_be_turned_off(settings: GatewaySettings, auth: dict[str, str]) -> None:
    with TestClient(create_app(settings.model_copy(update={"docs_enabled": False}))) as client:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert client.get(path).status_code == 404, path
        assert client.get("/v1/models", headers=auth).status_code == 200  # the API itself stays
