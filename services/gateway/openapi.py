"""One OpenAPI document for the public API, merged from the services' own documents.

Only operations the route table exposes are kept (the services' other paths are internal),
component schemas are merged (renamed on a clash), and every operation requires an API key.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx

from services.gateway.proxy import ROUTE_TABLE, ProxyRoute, route_for
from services.gateway.scopes import ADMIN

log = logging.getLogger(__name__)

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
SCHEMA_REF = "#/components/schemas/"
SECURITY_SCHEMES = {
    "HTTPBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <api key>`",
    },
    "APIKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The API key in an `X-API-Key` header (an alternative to the bearer token).",
    },
}
SECURITY = [{"HTTPBearer": []}, {"APIKeyHeader": []}]  # either one
_DETAIL = {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {"type": "string"}}}}}
UNAUTHORIZED = {"description": "Missing, invalid or revoked API key.", "content": _DETAIL}
FORBIDDEN = {"description": "The API key lacks the scope this operation needs (named).",
             "content": _DETAIL}
BAD_BODY = {"description": "The request body is not well-formed JSON.", "content": _DETAIL}
TOO_LARGE = {"description": "The request body exceeds the gateway's limit (named).",
             "content": _DETAIL}
TOO_MANY_REQUESTS = {
    "description": "The API key's rate limit is exceeded; retry after `Retry-After` seconds.",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    "content": _DETAIL,
}


def merge_openapi(
    documents: Mapping[str, dict[str, Any] | None],
    *,
    title: str,
    version: str,
    description: str,
    table: tuple[ProxyRoute, ...] = ROUTE_TABLE,
    own: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`documents`: upstream name -> its OpenAPI document, or None if it could not be fetched.
    `own`: the gateway's own operations (the admin API), taken whole."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    operation_ids: set[str] = set()
    missing = [name for name, doc in documents.items() if doc is None]
    openapi_version = "3.1.0"

    sources = [(name, doc, False) for name, doc in documents.items()]
    if own is not None:
        sources.append(("gateway", own, True))
    for upstream, original, whole in sources:
        if original is None:
            continue
        openapi_version = original.get("openapi", openapi_version)
        public = original.get("paths", {}) if whole else _public_paths(original, upstream, table)
        own_schemas = original.get("components", {}).get("schemas", {})
        used = _referenced_schemas(public, own_schemas)  # the internal paths' schemas stay private
        doc = {"paths": public, "components": {"schemas": {n: own_schemas[n] for n in used}}}
        doc = _rename_clashing_schemas(copy.deepcopy(doc), upstream, schemas)
        schemas.update(doc["components"]["schemas"])
        for path, item in doc["paths"].items():
            merged_item = paths.setdefault(path, {})
            for key, value in item.items():
                if key in HTTP_METHODS:
                    route = None if whole else route_for(key, path, table)
                    scope = route.scope if route is not None else ADMIN
                    merged_item[key] = _secured(value, upstream, operation_ids, scope)
                else:
                    merged_item.setdefault(key, value)

    text = description
    if missing:
        text += (
            "\n\n**Incomplete:** could not fetch the API description of "
            + ", ".join(missing)
            + " just now, so "
            + ("its operations are" if len(missing) == 1 else "their operations are")
            + " missing from this document (reload later)."
        )
    return {
        "openapi": openapi_version,
        "info": {"title": title, "version": version, "description": text},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": SECURITY_SCHEMES,
        },
        "security": SECURITY,
    }


def _public_paths(
    doc: dict[str, Any], upstream: str, table: tuple[ProxyRoute, ...]
) -> dict[str, Any]:
    """The operations of `doc` that the route table sends to `upstream`."""
    public: dict[str, Any] = {}
    for path, item in doc.get("paths", {}).items():
        kept = {
            method: operation for method, operation in item.items()
            if method in HTTP_METHODS
            and (route := route_for(method, path, table)) is not None
            and route.upstream == upstream
        }
        if kept:
            public[path] = {**{k: v for k, v in item.items() if k not in HTTP_METHODS}, **kept}
    return public


def _referenced_schemas(node: Any, schemas: dict[str, Any]) -> set[str]:
    """Names of the component schemas `node` refers to, directly or through other schemas."""
    found: set[str] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, dict):
            ref = current.get("$ref")
            if isinstance(ref, str) and ref.startswith(SCHEMA_REF):
                name = ref[len(SCHEMA_REF):]
                if name not in found and name in schemas:
                    found.add(name)
                    pending.append(schemas[name])
            pending.extend(v for k, v in current.items() if k != "$ref")
        elif isinstance(current, list):
            pending.extend(current)
    return found


def _secured(
    operation: dict[str, Any], upstream: str, operation_ids: set[str], scope: str
) -> dict[str, Any]:
    operation = dict(operation)
    operation["x-required-scope"] = scope
    needs = f"Needs an API key with the scope `{scope}`."
    operation["description"] = (operation.get("description", "") + "\n\n" + needs).strip()
    operation["security"] = SECURITY
    responses = dict(operation.get("responses", {}))
    responses.setdefault("401", UNAUTHORIZED)
    responses.setdefault("403", FORBIDDEN)
    responses.setdefault("429", TOO_MANY_REQUESTS)
    if "requestBody" in operation:
        # Answered before any handler runs: the gateway's body limit, the framework's JSON parse.
        responses.setdefault("400", BAD_BODY)
        responses.setdefault("413", TOO_LARGE)
    operation["responses"] = responses
    op_id = operation.get("operationId")
    if op_id:
        if op_id in operation_ids:
            op_id = operation["operationId"] = f"{upstream}_{op_id}"
        operation_ids.add(op_id)
    return operation


def _rename_clashing_schemas(
    doc: dict[str, Any], upstream: str, merged: dict[str, Any]
) -> dict[str, Any]:
    """Identical schemas of the same name (FastAPI's HTTPValidationError, say) are shared; a
    different schema under a taken name becomes `<upstream>_<name>`, with its refs rewritten."""
    own = doc.get("components", {}).get("schemas", {})
    renames = {name: f"{upstream}_{name}" for name, schema in own.items()
               if name in merged and merged[name] != schema}
    if not renames:
        return doc
    doc = _rewrite_refs(doc, {SCHEMA_REF + old: SCHEMA_REF + new for old, new in renames.items()})
    schemas = doc["components"]["schemas"]
    for old, new in renames.items():
        schemas[new] = schemas.pop(old)
    return doc


def _rewrite_refs(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: refs.get(v, v) if k == "$ref" and isinstance(v, str) else _rewrite_refs(v, refs)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(v, refs) for v in node]
    return node


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile("^" + "[^/]+".join(re.escape(p) for p in parts) + "$")


class MergedOpenApi:
    """Fetches the services' documents (in parallel, bounded in time) and caches the merge:
    a complete one for `ttl_s`, an incomplete one only briefly, so a recovered service shows
    up soon."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        upstreams: Mapping[str, str],
        *,
        title: str,
        version: str,
        description: str,
        own: dict[str, Any] | None = None,
        ttl_s: float = 30.0,
        fetch_timeout_s: float = 3.0,
        incomplete_ttl_s: float = 2.0,
    ) -> None:
        self._client = client
        self._upstreams = dict(upstreams)
        self._info = {"title": title, "version": version, "description": description}
        self._own = own
        self._ttl_s = ttl_s
        self._incomplete_ttl_s = min(incomplete_ttl_s, ttl_s)
        self._fetch_timeout_s = fetch_timeout_s
        self._cached: dict[str, Any] | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def document(self) -> dict[str, Any]:
        async with self._lock:  # one fetch at a time; the others get its result
            if self._cached is None or time.monotonic() >= self._expires:
                fetched = await asyncio.gather(
                    *(self._fetch(name, url) for name, url in self._upstreams.items())
                )
                documents = dict(zip(self._upstreams, fetched, strict=True))
                self._cached = merge_openapi(documents, **self._info, own=self._own)
                complete = all(d is not None for d in fetched)
                ttl = self._ttl_s if complete else self._incomplete_ttl_s
                self._expires = time.monotonic() + ttl
            return self._cached

    async def methods_for(self, path: str) -> list[str]:
        """The methods the public API documents for a concrete path (for a 405's Allow)."""
        document = await self.document()
        for template, item in document["paths"].items():
            if _template_regex(template).match(path):
                return [m.upper() for m in HTTP_METHODS if m in item]
        return []

    async def _fetch(self, upstream: str, base_url: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self._fetch_timeout_s):
                answer = await self._client.get(f"{base_url}/openapi.json")
            answer.raise_for_status()
            doc = answer.json()
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            return doc
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            log.warning("cannot fetch the OpenAPI document of %s: %s", upstream, type(exc).__name__)
            return None
