"""The API key as a query parameter, for webhook senders that cannot set our headers.

Shopify (and sources like it) only let a merchant configure a URL, so under `/v1/sources/`
the gateway also takes `?key=<api key>`; the source's own signature stays the proof of who
sent the body. Anywhere else the parameter is not a credential. Wherever it appears it is
taken out of the request's query string before anything else sees it: it never reaches an
upstream service, nor the access log (which reads the same ASGI scope when the response starts).
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from starlette.requests import Request

QUERY_KEY_PARAM = "key"
QUERY_KEY_PATH_PREFIX = "/v1/sources/"


def accepts_query_key(path: str) -> bool:
    return path.startswith(QUERY_KEY_PATH_PREFIX)


def _name(pair: bytes) -> str:
    return unquote_plus(pair.split(b"=", 1)[0].decode("latin-1"))


def without_query_key(query: bytes) -> bytes:
    """The query string minus every `key` parameter; the others stay byte for byte."""
    if not query:
        return query
    return b"&".join(p for p in query.split(b"&") if _name(p) != QUERY_KEY_PARAM)


def query_key_of(query: bytes) -> str | None:
    for pair in query.split(b"&"):
        if _name(pair) == QUERY_KEY_PARAM:
            _, _, value = pair.partition(b"=")
            return unquote_plus(value.decode("latin-1")).strip() or None
    return None


def take_query_key(request: Request) -> str | None:
    """The `key` parameter's value, removed from the request's ASGI scope in place."""
    query: bytes = request.scope.get("query_string", b"")
    if not query:
        return None
    key = query_key_of(query)
    request.scope["query_string"] = without_query_key(query)
    return key
