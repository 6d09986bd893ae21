"""The gateway's upstream connection pool against real sockets: scripted HTTP/1.1 servers that
answer with Content-Length, chunked and read-until-close bodies, close or keep connections,
hang up midway, or say nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from shared.http_pool import Answer, UpstreamBroken, UpstreamPool, UpstreamUnavailable
from shared.broker import free_port

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Scripted:
    """Reads each request's head and body, then lets `reply` answer; `reply` returns whether
    the connection stays open for another request."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                if not await self.reply(reader, writer):
                    return
        finally:
            writer.close()


Serve = Callable[[Reply], Awaitable[Scripted]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> Scripted:
        scripted = Scripted(reply)
        server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        servers.append(server)
        scripted.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/base"
        return scripted

    yield start
    for server in servers:
        server.close()


def answer(raw: bytes, keep: bool = True) -> Reply:
    async def reply(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep
    return reply


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"


async def test_content_length_answers_reuse_one_connection(serve: Serve) -> None:
    upstream = await serve(answer(OK))
    pool = UpstreamPool(10, connect_timeout_s=2)
    origin, prefix = pool.origin(upstream.url)
    for _ in range(3):
        got = await pool.request(origin, "POST", prefix + "/v1/events?x=1",
                                 [(b"content-type", b"application/json"), (b"x-a", b"b")], b'{"e":1}')
        assert (got.status, got.headers["content-type"], got.content) == (200, "application/json", b'{"ok":true}')
    await pool.close()
    assert upstream.connections == 1
    first = upstream.requests[0]
    assert first.startswith(b"POST /base/v1/events?x=1 HTTP/1.1\r\n")
    port = upstream.url.split(":")[2].split("/")[0]
    assert f"host: 127.0.0.1:{port}\r\n".encode() in first
    assert b"x-a: b\r\n" in first and b"content-length: 7\r\n" in first and first.endswith(b'{"e":1}')


async def test_chunked_and_read_until_close_bodies(serve: Serve) -> None:
    chunked = await serve(answer(b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n"
                                 b"location: /x\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"))
    until_close = await serve(answer(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it",
                                     keep=False))
    pool = UpstreamPool(10, connect_timeout_s=2)
    got = await fetch(pool, chunked.url, "GET", "/c")
    assert (got.status, got.headers["location"], got.content) == (201, "/x", b"hello world")
    for _ in range(2):  # the connection ends with each answer: a new one each time
        got = await fetch(pool, until_close.url, "GET", "/u")
        assert (got.status, got.content) == (200, b"all of it")
    assert until_close.connections == 2
    assert chunked.requests[0].startswith(b"GET /base/c HTTP/1.1\r\n")
    assert b"content-length" not in chunked.requests[0]  # a GET without a body has none
    await pool.close()


def fetch(pool: UpstreamPool, url: str, method: str, path: str) -> Awaitable[Answer]:
    origin, prefix = pool.origin(url)
    return pool.request(origin, method, prefix + path, [], b"")


async def test_connection_close_and_stale_idle_connections_are_not_reused(serve: Serve) -> None:
    closing = await serve(answer(OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1), keep=False))
    keeping = await serve(answer(OK))
    pool = UpstreamPool(10, connect_timeout_s=2)
    stale = UpstreamPool(10, connect_timeout_s=2, idle_s=0)  # every idle connection is too old
    for _ in range(2):
        assert (await fetch(pool, closing.url, "GET", "/")).status == 200
        assert (await fetch(stale, keeping.url, "GET", "/")).status == 200
    assert (closing.connections, keeping.connections) == (2, 2)
    await pool.close()
    await stale.close()


async def test_refused_connection_is_unavailable() -> None:
    pool = UpstreamPool(10, connect_timeout_s=2)
    with pytest.raises(UpstreamUnavailable):
        await fetch(pool, f"http://127.0.0.1:{free_port()}", "GET", "/")


async def test_hang_up_midway_and_garbage_are_broken(serve: Serve) -> None:
    short = await serve(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", keep=False))
    garbage = await serve(answer(b"NOT HTTP AT ALL\r\n\r\n", keep=False))
    silent_close = await serve(answer(b"", keep=False))
    pool = UpstreamPool(10, connect_timeout_s=2)
    for upstream in (short, garbage, silent_close):
        with pytest.raises(UpstreamBroken):
            await fetch(pool, upstream.url, "GET", "/")
    await pool.close()


async def test_a_full_pool_makes_callers_wait_then_gives_up_as_unavailable(serve: Serve) -> None:
    release = asyncio.Event()

    async def held(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(OK)
        await writer.drain()
        return True

    upstream = await serve(held)
    pool = UpstreamPool(1, connect_timeout_s=0.2)
    first = asyncio.create_task(fetch(pool, upstream.url, "GET", "/"))
    async with asyncio.timeout(10):
        while not upstream.requests:  # the one connection is taken
            await asyncio.sleep(0.01)
    with pytest.raises(UpstreamUnavailable, match="busy"):
        await fetch(pool, upstream.url, "GET", "/")
    waiting = asyncio.create_task(fetch(pool, upstream.url, "GET", "/"))
    release.set()
    assert (await first).status == 200
    assert (await waiting).status == 200  # it got the connection the first one gave back
    assert upstream.connections == 1
    await pool.close()


async def test_a_cancelled_exchange_closes_its_connection(serve: Serve) -> None:
    calls = 0

    async def slow_then_fast(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # never answers the first request
        writer.write(OK)
        await writer.drain()
        return True

    upstream = await serve(slow_then_fast)
    pool = UpstreamPool(1, connect_timeout_s=2)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await fetch(pool, upstream.url, "GET", "/")
    # The late answer can never be taken for the next request's: a new connection serves it.
    assert (await fetch(pool, upstream.url, "GET", "/")).status == 200
    assert upstream.connections == 2
    await pool.close()


async def test_head_answers_and_interim_answers(serve: Serve) -> None:
    head = await serve(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"))  # and no body
    hints = await serve(answer(b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n" + OK))
    pool = UpstreamPool(10, connect_timeout_s=2)
    async with asyncio.timeout(10):  # a parser waiting for HEAD's announced body would hang here
        got = await fetch(pool, head.url, "HEAD", "/")
    assert (got.status, got.headers["content-length"], got.content) == (200, "1234", b"")
    got = await fetch(pool, hints.url, "GET", "/")
    assert (got.status, got.content, "link" in got.headers) == (200, b'{"ok":true}', False)
    assert (await fetch(pool, hints.url, "GET", "/")).status == 200
    assert hints.connections == 1
    await pool.close()


async def test_204_and_304_without_length_keep_the_connection(serve: Serve) -> None:
    """No body by definition: complete at the end of the head, the connection reused (it was
    closed as a read-until-close body, a new connection per webhook answered 204)."""
    upstream = await serve(answer(b"HTTP/1.1 204 No Content\r\nx-n: 1\r\n\r\n"))
    not_modified = await serve(answer(b"HTTP/1.1 304 Not Modified\r\netag: \"a\"\r\n\r\n"))
    pool = UpstreamPool(10, connect_timeout_s=2)
    for _ in range(3):
        got = await fetch(pool, upstream.url, "POST", "/hook")
        assert (got.status, got.headers["x-n"], got.content) == (204, "1", b"")
        assert (await fetch(pool, not_modified.url, "GET", "/")).status == 304
    await pool.close()
    assert (upstream.connections, not_modified.connections) == (1, 1)


async def test_max_body_keeps_the_start_of_a_long_answer_and_drops_the_connection(serve: Serve) -> None:
    body = b"x" * 100_000
    upstream = await serve(answer(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body))
    chunked = await serve(answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"))
    pool = UpstreamPool(10, connect_timeout_s=2, max_body=1000)
    for _ in range(2):
        got = await fetch(pool, upstream.url, "GET", "/")
        assert (got.status, got.content) == (200, body[:1000])
    assert upstream.connections == 2  # cut off mid-body: not reused
    for _ in range(2):  # within the bound: whole, and the connection kept
        assert (await fetch(pool, chunked.url, "GET", "/")).content == b"hello world"
    assert chunked.connections == 1
    await pool.close()


async def test_resolve_chooses_the_address_and_may_refuse(serve: Serve) -> None:
    upstream = await serve(answer(OK))
    port = int(upstream.url.split(":")[2].split("/")[0])
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        if host == "refused.example":
            raise PermissionError(13, "refused: a private address")
        return ["127.0.0.1"]  # what the hook says, not what DNS would

    pool = UpstreamPool(10, connect_timeout_s=2, resolve=resolve)
    got = await fetch(pool, f"http://hooks.example:{port}/base", "POST", "/in")
    assert got.status == 200 and asked == [("hooks.example", port)]
    assert f"host: hooks.example:{port}\r\n".encode() in upstream.requests[0]
    with pytest.raises(UpstreamUnavailable, match="refused: a private address") as refused:
        await fetch(pool, f"http://refused.example:{port}/", "POST", "/in")
    assert isinstance(refused.value.__cause__, PermissionError)  # the refusal itself, readable
    assert upstream.connections == 1
    await pool.close()
