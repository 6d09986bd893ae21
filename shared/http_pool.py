"""A small HTTP/1.1 client: pooled keep-alive connections on asyncio protocols, responses
parsed by httptools (the parser uvicorn uses). The gateway's hot path (proxied requests) and the
actions service's webhook sender use it.

Why not aiohttp, which this replaced: per proxied request its ClientSession cost about as much
CPU as all the rest of the gateway (request and response objects, header multidicts, auto
headers, tracing hooks, a task per connection attempt). The gateway needs none of that: it
sends bytes it already has to a few fixed upstreams and hands back status, a few headers and
the body. What is left is what the proxy needs: keep-alive, Content-Length / chunked /
read-until-close bodies, a bound on connections, and failures sorted the way the proxy answers
them (UpstreamUnavailable: nothing was sent, 503; UpstreamBroken: 502; TimeoutError: 504).

For webhooks, two optional hooks: `resolve` picks (and may refuse) the addresses a connection
goes to, so an SSRF check sees exactly the address connected to (no second lookup a rebinding
DNS could answer differently); `max_body` bounds what is kept of an answer from a stranger.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

IDLE_S = 4.0  # below uvicorn's 5 s keep-alive: never send down a connection the upstream is closing

# (host, port) -> the addresses to connect to, in order; raises OSError to refuse the host.
Resolve = Callable[[str, int], Awaitable[Sequence[str]]]


class UpstreamUnavailable(Exception):
    """No connection: refused, unreachable, or none free within the connect timeout."""


class UpstreamBroken(Exception):
    """A connection that broke HTTP: hung up before a full answer, or answered garbage."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names, the first value of each
    content: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, max_body: int | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._max_body = max_body
        self._body_size = 0
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self._until_close = False
        self._no_body = False  # the answer to HEAD: headers only, whatever they announce

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():  # talking out of turn: not trusted
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"invalid HTTP response: {type(exc).__name__}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            if self._headers_done and self._until_close:
                self.on_message_complete()  # a body delimited by the end of the connection
            else:
                self._fail(UpstreamBroken("the upstream closed the connection before a full answer"))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        # 204 and 304 never have a body (RFC 9110): without Content-Length they are still
        # complete, and the connection stays reusable (it was closed after every 204: a new
        # connection per webhook, whose receivers mostly answer 204).
        self._until_close = (self._parser.get_status_code() not in (204, 304)
                             and "content-length" not in self._headers
                             and "transfer-encoding" not in self._headers)
        if self._no_body and self._parser.get_status_code() >= 200:
            self._until_close = True  # the parser still expects the body: not reusable
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self._max_body is not None:
            if self._answer is None or self._answer.done():  # cut off already
                return
            room = self._max_body - self._body_size
            if len(body) > room:  # keep the first max_body bytes; the rest is not read
                self._body.append(body[:room])
                self._until_close = True  # the connection is mid-body: not reusable
                self.on_message_complete()
                return
            self._body_size += len(body)
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer = self._answer
        if answer is None or answer.done():
            return
        if self._parser.get_status_code() < 200:  # interim (103 Early Hints): the answer follows
            self._headers, self._body, self._headers_done = {}, [], False
            return
        if not self._parser.should_keep_alive() or self._until_close:
            self.close()
        answer.set_result(Answer(self._parser.get_status_code(), self._headers, b"".join(self._body)))

    # -- used by the pool
    def exchange(self, request: bytes, no_body: bool = False) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._headers, self._body, self._headers_done, self._until_close = {}, [], False, False
        self._body_size = 0
        self._no_body = no_body
        self.transport.write(request)
        return self._answer

    def finished(self) -> bool:
        """Reusable: the last exchange completed and the connection stays open."""
        return not self.closed and self._answer is not None and self._answer.done() \
            and not self._answer.cancelled() and self._answer.exception() is None

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Origin:
    """scheme://host:port: where connections go, and the idle ones kept for it."""

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.ssl = ssl.create_default_context() if scheme == "https" else None
        default = 443 if scheme == "https" else 80
        named = f"[{host}]" if ":" in host else host  # an IPv6 literal goes in brackets
        self.host_header = (named if port == default else f"{named}:{port}").encode("idna")
        self.idle: collections.deque[_Connection] = collections.deque()


class UpstreamPool:
    """At most `max_connections` exchanges in flight across all upstreams (idle keep-alive
    connections do not count, as with aiohttp's connector limit); a caller finding none free
    waits, up to `connect_timeout_s`, then UpstreamUnavailable, like a refused connect.

    Idle connections past `idle_s` are closed when next looked at, and all origins are swept
    every `idle_s`, so connections to upstreams no longer called (webhook endpoints come and
    go) do not stay open."""

    def __init__(self, max_connections: int, connect_timeout_s: float, idle_s: float = IDLE_S,
                 *, resolve: Resolve | None = None, max_body: int | None = None) -> None:
        self._max = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._idle_s = idle_s
        self._resolve = resolve
        self._max_body = max_body
        self._swept_at = time.monotonic()
        self._busy = 0
        self._origins: dict[str, tuple[_Origin, str]] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def origin(self, base_url: str) -> tuple[_Origin, str]:
        """The origin of an http(s) base URL and its path prefix (no trailing /)."""
        known = self._origins.get(base_url)
        if known is None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) base URL: {base_url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            known = self._origins[base_url] = (
                _Origin(parts.scheme, parts.hostname, port), parts.path.rstrip("/"))
        return known

    async def request(self, origin: _Origin, method: str, target: str,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
        """Send one request (`target`: the encoded path and query; `headers`: raw names and
        values, neither holding a line break, without host and content-length) and read the
        full answer. Cancelled (a timeout around this call), its connection is closed."""
        head = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), origin.host_header]
        for name, value in headers:
            head += (b"\r\n", name, b": ", value)
        head.append(b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        head.append(body)
        connection = await self._acquire(origin)
        try:
            return await connection.exchange(b"".join(head), no_body=method == "HEAD")
        finally:
            self._release(origin, connection)

    async def _acquire(self, origin: _Origin) -> _Connection:
        if self._closed:
            raise UpstreamUnavailable("the gateway is shutting down")
        if self._busy >= self._max:
            await self._wait_for_room(origin)
        self._busy += 1
        now = time.monotonic()
        if now - self._swept_at >= self._idle_s:
            self._sweep(now)
        while origin.idle:
            connection = origin.idle.pop()  # the most recently used: the least likely to be stale
            if not connection.closed and now - connection.idle_since < self._idle_s:
                return connection
            connection.close()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await self._connect(origin)
        except BaseException as exc:
            self._busy -= 1
            self._wake()
            if isinstance(exc, TimeoutError):
                raise UpstreamUnavailable(f"no connection to {origin.host}:{origin.port} "
                                          f"within {self._connect_timeout_s:g} s") from None
            if isinstance(exc, OSError):  # the cause stays readable (a refusal by `resolve`)
                raise UpstreamUnavailable(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
            raise

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        max_body = self._max_body

        def protocol() -> _Connection:
            return _Connection(max_body)

        if self._resolve is None:
            _, connection = await loop.create_connection(protocol, origin.host, origin.port, ssl=origin.ssl)
            return connection
        addresses = await self._resolve(origin.host, origin.port)
        if not addresses:
            raise OSError(f"{origin.host!r} resolves to no address")
        failure: OSError | None = None
        for address in addresses:  # the checked addresses themselves: no second lookup
            try:
                _, connection = await loop.create_connection(
                    protocol, address, origin.port, ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None)
                return connection
            except OSError as exc:
                failure = exc
        assert failure is not None
        raise failure

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        for origin, _ in self._origins.values():
            fresh = [c for c in origin.idle if not c.closed and now - c.idle_since < self._idle_s]
            for connection in origin.idle:
                if connection not in fresh:
                    connection.close()
            origin.idle = collections.deque(fresh)

    async def _wait_for_room(self, origin: _Origin) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                while self._busy >= self._max:
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)
                    try:
                        await waiter
                    except BaseException:
                        if waiter.done() and not waiter.cancelled():
                            self._wake()  # woken and leaving: pass the turn on
                        raise
        except TimeoutError:
            raise UpstreamUnavailable(f"all {self._max} upstream connections busy for "
                                      f"{self._connect_timeout_s:g} s") from None

    def _release(self, origin: _Origin, connection: _Connection) -> None:
        self._busy -= 1
        if connection.finished() and not self._closed:
            connection.idle_since = time.monotonic()
            origin.idle.append(connection)
        else:
            connection.close()
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for origin, _ in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
