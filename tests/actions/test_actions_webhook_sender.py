"""The pooled webhook sender (services.actions.delivery.PooledSender) against a real local
receiver: what goes on the wire, answers and failures as attempt results, connections reused,
and the SSRF guard at connect time with a stand-in DNS (a rebinding)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

from services.actions.delivery import MAX_RESPONSE_BYTES, PooledSender, signed_headers
from services.actions.webhooks import ClaimedDelivery, generate_secret
from shared.clock import SystemClock
from tests.actions.webhook_support import Answer, ScriptedReceiver


def delivery(secret: str, *previous: str) -> ClaimedDelivery:
    return ClaimedDelivery("msg_1", "", secret, '{"type":"offer.created"}', 0,
                           previous_secrets=tuple(previous))


async def test_signed_posts_reach_the_receiver(scripted: ScriptedReceiver) -> None:
    new, old = generate_secret(), generate_secret()
    claimed = delivery(new, old)
    sender = PooledSender(allow_local=True)
    try:
        for _ in range(3):
            result = await sender.send(scripted.url("/hooks?a=b"), claimed.payload.encode(),
                                       signed_headers(claimed, SystemClock()), 5.0)
            assert result.ok and result.status_code == 200 and result.error is None
    finally:
        await sender.close()
    [first, *rest] = scripted.requests()
    assert len(rest) == 2 and first.path == "/hooks?a=b" and first.body == claimed.payload.encode()
    assert first.webhook_id == "msg_1"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["host"] == f"127.0.0.1:{scripted.port}"
    assert len(first.headers["webhook-signature"].split(" ")) == 2  # both secrets of the rotation
    assert first.headers["user-agent"].startswith("churnguard-webhooks/")


async def test_answers_and_failures_become_attempt_results(scripted: ScriptedReceiver) -> None:
    scripted.script = [
        Answer(503, {"Retry-After": "120"}),
        Answer(302, {"Location": "http://127.0.0.1:9/elsewhere"}),
        Answer(204),
        Answer(hang=True),
    ]
    sender = PooledSender(allow_local=True)
    try:
        busy = await sender.send(scripted.url(), b"{}", {}, 5.0)
        assert (busy.ok, busy.status_code, busy.retry_after) == (False, 503, "120")
        moved = await sender.send(scripted.url(), b"{}", {}, 5.0)
        assert (moved.ok, moved.status_code) == (False, 302)  # never followed
        assert (await sender.send(scripted.url(), b"{}", {}, 5.0)).status_code == 204
        hung = await sender.send(scripted.url(), b"{}", {}, 0.2)
        assert hung.error == "timeout after 0.2 s" and hung.status_code is None
        scripted.release()
        with socket.socket() as closed:  # a port nobody listens on
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        refused = await sender.send(f"http://127.0.0.1:{port}/", b"{}", {}, 5.0)
        assert refused.error is not None and refused.error.startswith("connection failed: ")
    finally:
        await sender.close()
    # (the hung request is recorded only once released, by the receiver's thread)
    assert [r.status for r in scripted.requests()][:3] == [503, 302, 204]


async def test_a_long_answer_is_cut_at_the_bound() -> None:
    body = b"y" * (MAX_RESPONSE_BYTES * 3)
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        with contextlib.suppress(OSError):  # the sender may hang up once it has read enough
            await writer.drain()
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    sender = PooledSender(allow_local=True)
    try:
        port = server.sockets[0].getsockname()[1]
        for _ in range(2):
            result = await sender.send(f"http://127.0.0.1:{port}/", b"{}", {}, 5.0)
            assert result.ok and result.status_code == 200
    finally:
        await sender.close()
        server.close()
    assert connections == 2  # cut off mid-body: that connection is not reused


async def test_a_dns_rebinding_is_refused_at_connect_time_and_the_checked_address_is_used(
    scripted: ScriptedReceiver,
) -> None:
    dns = {"hooks.example.com": "10.0.0.7"}

    async def lookup(host: str, port: int) -> list[str]:
        return [dns[host]]

    production = PooledSender(allow_local=False, lookup=lookup)
    development = PooledSender(allow_local=True, lookup=lookup, dns_cache_s=0)  # DNS changes below
    try:
        url = f"https://hooks.example.com:{scripted.port}/in"
        refused = await production.send(url, b"{}", {}, 5.0)
        assert refused.error == "refused at connect time: 'hooks.example.com' -> 10.0.0.7 is a private address"
        dns["hooks.example.com"] = "169.254.169.254"
        metadata = await development.send(url.replace("https", "http"), b"{}", {}, 5.0)
        assert metadata.error is not None and "cloud metadata" in metadata.error
        literal = await production.send(f"https://127.0.0.1:{scripted.port}/", b"{}", {}, 5.0)
        assert literal.error == "refused at connect time: 127.0.0.1 is a loopback address"
        dns["hooks.example.com"] = "127.0.0.1"  # development: local receivers allowed
        reached = await development.send(url.replace("https", "http"), b"{}", {}, 5.0)
        assert reached.ok
    finally:
        await production.close()
        await development.close()
    [request] = scripted.requests()  # only the allowed one got through
    assert request.headers["host"] == f"hooks.example.com:{scripted.port}"


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    """A certificate for `name` signed by itself (no CA trusts it), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_verifies_the_certificate_of_the_urls_host(tmp_path: Path) -> None:
    """Connected to the checked address, TLS still verifies the certificate against the URL's
    host name (SNI): a certificate no CA signed is refused before the request is sent."""
    cert, key = _self_signed(tmp_path, "hooks.example.com")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    requests = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            requests += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]

    async def lookup(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    sender = PooledSender(allow_local=True, lookup=lookup)
    try:
        result = await sender.send(f"https://hooks.example.com:{port}/in", b"{}", {}, 5.0)
    finally:
        await sender.close()
        server.close()
    assert result.error is not None and "CERTIFICATE_VERIFY_FAILED" in result.error
    assert requests == 0


async def test_lookups_are_kept_and_shared_but_a_failed_one_is_not_kept(scripted: ScriptedReceiver) -> None:
    calls: list[str] = []
    fail = [True]

    async def lookup(host: str, port: int) -> list[str]:
        calls.append(host)
        if fail[0]:
            fail[0] = False
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        await asyncio.sleep(0)  # concurrent connects wait for this one lookup
        return ["127.0.0.1"]

    sender = PooledSender(allow_local=True, lookup=lookup)
    url = f"http://hooks.example.com:{scripted.port}/in"
    try:
        failed = await sender.send(url, b"{}", {}, 5.0)
        assert failed.error is not None and "name resolution" in failed.error
        results = await asyncio.gather(*(sender.send(url, b"{}", {}, 5.0) for _ in range(4)))
        assert all(r.ok for r in results)
    finally:
        await sender.close()
    assert calls == ["hooks.example.com", "hooks.example.com"]  # the failure, then one for all four
    assert len(scripted.requests()) == 4
