"""`churnguard import FILE`: stream a history file (NDJSON or CSV) through the public API.

A client-side tool: it talks to the gateway's `POST /v1/events/batch` like any sender would,
so the same key, contract, limits and idempotency apply. The file is read line by line (memory
stays constant however large it is), events go in batches under the server's limits (500
events, 512 KiB), and after every acknowledged batch the position is saved atomically, so an
interrupted import continues where it stopped. Re-sending the last batch after a crash is
harmless: event ids are idempotency keys and come back as duplicates.

Rows that cannot be sent (not JSON, not a CSV row, too large) and rows the server rejects are
written to the rejected file, one JSON line each: the source line number, the reason, the
server's field errors and the raw text (truncated). They never stop the import.
"""

from __future__ import annotations

import csv
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

import httpx

log = logging.getLogger(__name__)

# The server's limits (docs/events.md): a batch holds at most 500 events and 512 KiB, one
# event at most 32 KiB. Batches are built to stay under them, so the server never sees a 413.
MAX_BATCH_EVENTS = 500
MAX_BATCH_BYTES = 512 * 1024
MAX_EVENT_BYTES = 32 * 1024
RAW_LIMIT = 4 * 1024  # raw text kept per rejected row
MAX_PENDING_REJECTS = 1000  # a run of bad lines is flushed (and the position saved) in chunks
DEFAULT_RETRY_FOR_S = 600.0
RETRYABLE = frozenset({429, 502, 503, 504})
# The server refuses a whole batch (400) over one value it cannot take as strict JSON (NaN,
# NUL, deeper than 16 levels counting the batch object and its events array), so such lines
# are rejected here; should one still slip through, the batch is split to find it.
MAX_EVENT_NESTING = 16 - 2
STATE_VERSION = 1
FORMATS = ("ndjson", "csv")
ENVELOPE_COLUMNS = ("id", "type", "customer_id", "occurred_at", "source")

_BODY_HEAD = b'{"events":['
_BODY_TAIL = b"]}"
_BOM = b"\xef\xbb\xbf"
_FINGERPRINT_HEAD = 1024
# Longest physical line read as such; longer ones are skipped to their end and rejected.
_NDJSON_LINE_CAP = MAX_EVENT_BYTES + 1024
_CSV_LINE_CAP = 2 * MAX_EVENT_BYTES
_TOO_DEEP = f"JSON nested too deeply (at most {MAX_EVENT_NESTING} levels in one event)"


# --- errors: each carries the exit code the CLI uses ------------------------------------


class BackfillError(Exception):
    """The import cannot go on; the message says why and what to do."""

    exit_code = 1


class BadInput(BackfillError):
    """Wrong arguments or an input/state file that cannot be used as given."""

    exit_code = 2


class AuthRefused(BackfillError):
    pass


class ServerRefused(BackfillError):
    pass


class ServerUnavailable(BackfillError):
    pass


class Interrupted(BackfillError):
    exit_code = 130


# --- progress ------------------------------------------------------------------------------


class Reporter:
    """Where progress and notes go. This base one only logs notes."""

    def start(self, total_bytes: int, done_bytes: int) -> None:
        pass

    def update(self, done_bytes: int, rows: int, elapsed_s: float) -> None:
        pass

    def note(self, message: str) -> None:
        log.warning("%s", message)

    def stop(self) -> None:
        pass


class PlainReporter(Reporter):
    """For CI and logs: a line every `every_s` seconds, notes as they happen."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 10.0) -> None:
        self._stream = stream or sys.stderr
        self._every_s = every_s
        self._total = 0
        self._last = time.monotonic()

    def start(self, total_bytes: int, done_bytes: int) -> None:
        self._total = total_bytes

    def update(self, done_bytes: int, rows: int, elapsed_s: float) -> None:
        if time.monotonic() - self._last >= self._every_s:
            self._last = time.monotonic()
            percent = 100.0 * done_bytes / self._total if self._total else 100.0
            self.note(f"{percent:5.1f}% ({done_bytes:,} of {self._total:,} bytes), "
                      f"{_rate(rows, elapsed_s)}")

    def note(self, message: str) -> None:
        print(message, file=self._stream, flush=True)


class RichProgress(Reporter):
    """A progress bar over the bytes read, with the events/s of this run (on stderr)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("importing"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task: Any = None

    def start(self, total_bytes: int, done_bytes: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("import", total=total_bytes, completed=done_bytes, rate="")

    def update(self, done_bytes: int, rows: int, elapsed_s: float) -> None:
        self._progress.update(self._task, completed=done_bytes, rate=_rate(rows, elapsed_s))

    def note(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self._progress.stop()


def _rate(rows: int, elapsed_s: float) -> str:
    return f"{rows / elapsed_s:,.0f} events/s" if elapsed_s > 0 else ""


# --- the outcome ---------------------------------------------------------------------------


@dataclass
class ImportReport:
    path: Path
    status: Literal["complete", "already_imported", "stopped"]
    accepted: int
    duplicates: int
    rejected: int
    lines: int  # physical lines read so far (all runs)
    rows: int  # rows handled in this run (sent or rejected)
    elapsed_s: float  # this run
    rejected_path: Path
    state_path: Path
    resumed_at_line: int = 0

    @property
    def events_per_s(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        if self.status == "already_imported":
            return (f"{self.path} was already imported (accepted {self.accepted:,}, duplicates "
                    f"{self.duplicates:,}, rejected {self.rejected:,}); progress in {self.state_path}. "
                    "Pass --restart to import it again.")
        head = {"complete": "import complete",
                "stopped": "import stopped (resume with the same command)"}
        resumed = f" (resumed at line {self.resumed_at_line:,})" if self.resumed_at_line else ""
        where = f"  -> {self.rejected_path}" if self.rejected else ""
        return "\n".join([
            f"{head[self.status]}: {self.path}{resumed}",
            f"  accepted    {self.accepted:>12,}",
            f"  duplicates  {self.duplicates:>12,}",
            f"  rejected    {self.rejected:>12,}{where}",
            f"  lines read  {self.lines:>12,}",
            f"  elapsed     {self.elapsed_s:>12.1f} s ({self.events_per_s:,.0f} events/s)",
        ])


# --- reading: physical lines with byte offsets, then rows ----------------------------------


@dataclass(slots=True)
class _Row:
    line: int  # first physical line of the row (1-based)
    end_line: int  # last physical line it used
    end_offset: int  # byte offset just past it: where to resume
    payload: bytes | None  # the event as JSON, or None when rejected here
    raw: bytes  # the source text (the payload itself for NDJSON)
    reason: str = ""
    errors: list[dict[str, str]] = field(default_factory=list)
    raw_size: int = -1  # of the whole source text, when `raw` holds only its start

    @property
    def truncated(self) -> bool:
        return max(self.raw_size, len(self.raw)) > RAW_LIMIT

    def refused(self, reason: str, errors: list[dict[str, str]]) -> _Row:
        return _Row(self.line, self.end_line, self.end_offset, self.payload, self.raw, reason, errors,
                    self.raw_size)


@dataclass
class _Outcome:
    """The server's answer to one batch (or to the parts it was split into)."""

    accepted: int
    duplicates: int
    rejected: int
    rows: list[_Row]  # the rejected ones, with the server's reasons
    malformed: int = 0  # refused alone with 400

    def __add__(self, other: _Outcome) -> _Outcome:
        return _Outcome(self.accepted + other.accepted, self.duplicates + other.duplicates,
                        self.rejected + other.rejected, self.rows + other.rows,
                        self.malformed + other.malformed)


class _Lines:
    """Physical lines of a binary file from a byte offset; memory is bounded by `cap`."""

    def __init__(self, handle: IO[bytes], offset: int, line_no: int, cap: int) -> None:
        handle.seek(offset)
        self._handle = handle
        self.offset = offset
        self.line_no = line_no
        self._cap = cap

    def next(self) -> tuple[bytes, int] | None:
        """(line, its full length); a line longer than the cap comes back cut to RAW_LIMIT."""
        data = self._handle.readline(self._cap + 1)
        if not data:
            return None
        length = len(data)
        if length > self._cap and not data.endswith(b"\n"):
            data = data[:RAW_LIMIT]
            while True:  # skip the rest of the line without holding it
                rest = self._handle.readline(64 * 1024)
                length += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
        self.offset += length
        self.line_no += 1
        return data, length


def _too_long(length: int) -> str:
    return f"line is {length:,} bytes; one event may be at most {MAX_EVENT_BYTES:,} bytes"


def _too_big(length: int) -> str:
    return f"event is {length:,} bytes; one event may be at most {MAX_EVENT_BYTES:,} bytes"


def _ndjson_rows(lines: _Lines) -> Iterator[_Row]:
    while (got := lines.next()) is not None:
        data, length = got
        line, end = lines.line_no, lines.offset

        def reject(reason: str) -> _Row:
            return _Row(line, line, end, None, data, reason, raw_size=length)

        if length > _NDJSON_LINE_CAP:
            yield reject(_too_long(length))
            continue
        text = data.strip()
        if line == 1 and text.startswith(_BOM):
            text = text[len(_BOM):].lstrip()
        if not text:
            continue  # blank lines are allowed
        if len(text) > MAX_EVENT_BYTES:
            yield reject(_too_big(len(text)))
            continue
        try:
            value = json.loads(text.decode("utf-8"), parse_constant=_no_constants)
        except UnicodeDecodeError as exc:
            yield reject(f"not valid UTF-8 at byte {exc.start}")
            continue
        except json.JSONDecodeError as exc:
            yield reject(f"invalid JSON at column {exc.colno}: {exc.msg}")
            continue
        except (_NotStrictJson, RecursionError) as exc:
            yield reject(str(exc) if isinstance(exc, _NotStrictJson) else _TOO_DEEP)
            continue
        if not isinstance(value, dict):
            yield reject(f"not a JSON object (got {type(value).__name__}); each line must be one event")
            continue
        if problem := _strict_json_problem(value):
            yield reject(problem)
            continue
        yield _Row(line, line, end, text, text)


class _NotStrictJson(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NotStrictJson(f"{name} is not valid JSON; numbers must be finite")


def _strict_json_problem(value: Any, depth: int = 1) -> str | None:
    if depth > MAX_EVENT_NESTING:
        return _TOO_DEEP
    if isinstance(value, str):
        return "strings must not contain NUL (\\u0000) characters" if "\x00" in value else None
    items: Any = ()
    if isinstance(value, dict):
        if any("\x00" in key for key in value):
            return "keys must not contain NUL (\\u0000) characters"
        items = value.values()
    elif isinstance(value, list):
        items = value
    for item in items:
        if problem := _strict_json_problem(item, depth + 1):
            return problem
    return None


class _LineTooLong(Exception):
    def __init__(self, length: int) -> None:
        super().__init__(_too_long(length))


class _CsvSource:
    """Decoded lines for csv.reader, recording the raw text and line span of the current row."""

    def __init__(self, lines: _Lines) -> None:
        self.lines = lines
        self.first_line = lines.line_no + 1
        self.raw = bytearray()
        self.raw_size = 0

    def begin_row(self) -> None:
        self.first_line = self.lines.line_no + 1
        self.raw.clear()
        self.raw_size = 0

    def __iter__(self) -> _CsvSource:
        return self

    def __next__(self) -> str:
        got = self.lines.next()
        if got is None:
            raise StopIteration
        data, length = got
        self.raw_size += length
        if len(self.raw) < RAW_LIMIT:
            self.raw += data[: RAW_LIMIT - len(self.raw)]
        if length > _CSV_LINE_CAP:
            raise _LineTooLong(length)
        if self.lines.line_no == 1 and data.startswith(_BOM):
            data = data[len(_BOM):]
        return data.decode("utf-8")  # UnicodeDecodeError rejects the row


def _csv_columns(cells: list[str]) -> list[tuple[str, ...]]:
    """Header names -> paths (`data.attributes.tier` -> ("data", "attributes", "tier"))."""
    paths: list[tuple[str, ...]] = []
    for number, name in enumerate((c.strip() for c in cells), start=1):
        parts = tuple(name.split("."))
        if not name or any(not p for p in parts):
            raise BadInput(f"CSV header: column {number} ({name!r}) is not a field name or dotted path")
        if parts in paths:
            raise BadInput(f"CSV header: column {name!r} appears twice")
        for other in paths:
            shorter, longer = sorted((parts, other), key=len)
            if longer[: len(shorter)] == shorter:
                raise BadInput(f"CSV header: {'.'.join(shorter)!r} and {'.'.join(longer)!r} "
                               "cannot both be columns (one is inside the other)")
        if len(parts) >= MAX_EVENT_NESTING:
            raise BadInput(f"CSV header: {name!r} is nested too deeply "
                           f"(at most {MAX_EVENT_NESTING - 1} parts)")
        paths.append(parts)
    missing = [c for c in ENVELOPE_COLUMNS[:4] if (c,) not in paths]
    if missing:
        raise BadInput(f"CSV header: missing column(s) {', '.join(missing)}; expected "
                       f"{','.join(ENVELOPE_COLUMNS)} and data.<field> columns")
    return paths


_INTEGER = re.compile(r"[+-]?\d+")
_BOOLEANS = {"true": True, "false": False}


class ContractTypes:
    """Which JSON type each CSV column has, per event type, read from the contract's JSON
    Schema (`GET /v1/schema`). A CSV cell is text; the contract says whether the field is a
    number or a boolean (strict: "12" is not 12). Money and dates are strings there, so they
    stay text. Without a schema every value is sent as text."""

    def __init__(self, schema: dict[str, Any] | None) -> None:
        self._schema = schema or {}
        self._cache: dict[tuple[str, tuple[str, ...]], frozenset[str]] = {}

    def value(self, event_type: str, path: tuple[str, ...], text: str) -> Any:
        key = (event_type, path)
        if key not in self._cache:
            self._cache[key] = self._types_at(event_type, path)
        types = self._cache[key]
        if not types or "string" in types:
            return text
        bare = text.strip()
        if "integer" in types and _INTEGER.fullmatch(bare):
            return int(bare)
        if "number" in types:
            if _INTEGER.fullmatch(bare):
                return int(bare)
            try:
                number = float(bare)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        if "boolean" in types and bare.lower() in _BOOLEANS:
            return _BOOLEANS[bare.lower()]
        return text  # the server names the field and says what it expected

    def _deref(self, node: Any) -> Any:
        for _ in range(32):
            if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
                return node
            target: Any = self._schema
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target.get(part) if isinstance(target, dict) else None
            node = target
        return None

    def _container(self, node: Any) -> dict[str, Any] | None:
        """The object schema at node, looking through `anyOf: [<object>, null]`."""
        node = self._deref(node)
        if not isinstance(node, dict):
            return None
        if "properties" in node or isinstance(node.get("additionalProperties"), dict):
            return node
        for alternative in node.get("anyOf", []) + node.get("oneOf", []):
            if (found := self._container(alternative)) is not None:
                return found
        return None

    def _leaf(self, node: Any) -> frozenset[str]:
        node = self._deref(node)
        if not isinstance(node, dict):
            return frozenset()
        declared = node.get("type", [])
        types = set([declared] if isinstance(declared, str) else declared)
        for alternative in node.get("anyOf", []) + node.get("oneOf", []):
            types |= self._leaf(alternative)
        return frozenset(types)

    def _types_at(self, event_type: str, path: tuple[str, ...]) -> frozenset[str]:
        mapping = (self._schema.get("discriminator") or {}).get("mapping") or {}
        node: Any = {"$ref": mapping[event_type]} if event_type in mapping else None
        for part in path:
            container = self._container(node)
            if container is None:
                return frozenset()
            properties = container.get("properties") or {}
            if part in properties:
                node = properties[part]
            elif isinstance(container.get("additionalProperties"), dict):
                node = container["additionalProperties"]
            else:
                return frozenset()
        return self._leaf(node)


def _csv_event(
    columns: list[tuple[str, ...]], cells: list[str], types: ContractTypes
) -> dict[str, Any]:
    """Empty cells are omitted; each value gets the JSON type the contract gives its field."""
    event: dict[str, Any] = {}
    event_type = next((v for p, v in zip(columns, cells) if p == ("type",)), "")
    for path, text in zip(columns, cells, strict=True):
        if text == "":
            continue
        target = event
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = types.value(event_type, path, text)
    if "data" in {p[0] for p in columns}:
        event.setdefault("data", {})  # all of a row's payload cells may be empty
    return event


def _csv_header(lines: _Lines) -> list[tuple[str, ...]] | None:
    source = _CsvSource(lines)
    reader = csv.reader(source, strict=True)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return None
        except (csv.Error, UnicodeDecodeError, _LineTooLong) as exc:
            raise BadInput(f"CSV header (line {source.first_line}) cannot be read: {exc}") from exc
        if any(c.strip() for c in cells):
            return _csv_columns(cells)


def _csv_rows(lines: _Lines, columns: list[tuple[str, ...]], types: ContractTypes) -> Iterator[_Row]:
    source = _CsvSource(lines)
    reader = csv.reader(source, strict=True)
    while True:
        source.begin_row()
        problem = None
        try:
            cells = next(reader)
        except StopIteration:
            return
        except _LineTooLong as exc:
            problem = str(exc)
        except UnicodeDecodeError as exc:
            problem = f"not valid UTF-8 at byte {exc.start} of line {lines.line_no}"
        except csv.Error as exc:
            problem = f"malformed CSV: {exc}"
        first, last, end, raw = source.first_line, lines.line_no, lines.offset, bytes(source.raw)
        if problem is None:
            if not any(c.strip() for c in cells):
                continue  # blank row
            if len(cells) != len(columns):
                problem = f"row has {len(cells)} cells; the header has {len(columns)}"
            elif any("\x00" in cell for cell in cells):
                problem = "cells must not contain NUL characters"
            else:
                payload = json.dumps(_csv_event(columns, cells, types), ensure_ascii=False,
                                     separators=(",", ":")).encode()
                if len(payload) <= MAX_EVENT_BYTES:
                    yield _Row(first, last, end, payload, raw, raw_size=source.raw_size)
                    continue
                problem = _too_big(len(payload))
        yield _Row(first, last, end, None, raw, problem, raw_size=source.raw_size)


# --- state -----------------------------------------------------------------------------------


def _fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    with path.open("rb") as handle:
        head = handle.read(_FINGERPRINT_HEAD)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "head_sha256": hashlib.sha256(head).hexdigest()}


def _load_state(state_path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read the saved progress in {state_path} ({exc}); "
                       "pass --restart to import from the beginning") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise BadInput(f"{state_path} is not an import state file this version understands; "
                       "pass --restart to import from the beginning, or --state to use another file")
    return state


def _save_state(state_path: Path, state: dict[str, Any]) -> None:
    """Write-then-rename: a crash leaves the old state or the new one, never half of one."""
    temporary = state_path.with_name(state_path.name + ".tmp")
    with temporary.open("w") as handle:
        json.dump(state, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, state_path)


class _RejectedFile:
    """Opened on the first reject; on resume cut back to what the saved state accounts for."""

    def __init__(self, path: Path, keep_bytes: int | None) -> None:
        self.path = path
        self._handle: IO[bytes] | None = None
        if keep_bytes is None:  # a fresh import: old rejects would mislead
            path.unlink(missing_ok=True)
            self.size = 0
        else:
            current = path.stat().st_size if path.exists() else 0
            if current > keep_bytes:  # rows of a batch whose state was never saved
                with path.open("r+b") as handle:
                    handle.truncate(keep_bytes)
            self.size = min(current, keep_bytes)

    def write(self, row: _Row) -> None:
        if self._handle is None:
            self._handle = self.path.open("ab")
        raw = row.raw[:RAW_LIMIT]
        record = {"line": row.line, "reason": row.reason, "errors": row.errors,
                  "raw": raw.decode("utf-8", "replace")}
        if row.truncated:
            record["raw_truncated"] = True
        data = json.dumps(record, ensure_ascii=False).encode() + b"\n"
        self._handle.write(data)
        self.size += len(data)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


# --- sending ---------------------------------------------------------------------------------


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return json.dumps(body)[:300]


def _batch_result(response: httpx.Response) -> dict[str, Any] | None:
    """The documented batch answer, or None when the body is something else."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("accepted"), int):
        return None
    if not isinstance(body.get("rejected", 0), int) or not isinstance(body.get("errors", []), list):
        return None
    return body


# --- the import --------------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """ndjson for .ndjson/.jsonl/.json, csv for .csv."""
    suffix = path.suffix.lower()
    if suffix in (".ndjson", ".jsonl", ".json"):
        return "ndjson"
    if suffix == ".csv":
        return "csv"
    raise BadInput(f"cannot tell the format of {path.name} from its extension; "
                   "pass --format ndjson or csv")


def default_rejected_path(path: Path) -> Path:
    return path.with_name(path.name + ".rejected.ndjson")


def default_state_path(path: Path) -> Path:
    return path.with_name(path.name + ".import-state.json")


def run_import(
    path: Path,
    *,
    url: str,
    api_key: str,
    fmt: str | None = None,
    batch_size: int = MAX_BATCH_EVENTS,
    rejected_path: Path | None = None,
    state_path: Path | None = None,
    restart: bool = False,
    retry_for_s: float = DEFAULT_RETRY_FOR_S,
    reporter: Reporter | None = None,
    client: httpx.Client | None = None,
    request_timeout_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    max_batches: int | None = None,
) -> ImportReport:
    """Import `path` through `url` (the gateway). `max_batches` stops after that many batches
    were acknowledged, as an interruption would (for tests). Raises BackfillError."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} is not a file")
    fmt = (fmt or detect_format(path)).lower()
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}; expected ndjson or csv")
    if not 1 <= batch_size <= MAX_BATCH_EVENTS:
        raise BadInput(f"batch size must be between 1 and {MAX_BATCH_EVENTS}")
    if not url.startswith(("http://", "https://")):
        raise BadInput(f"--url must be an http:// or https:// base URL, got {url!r}")
    if not api_key:
        raise BadInput("an API key is needed (--key or CHURNGUARD_API_KEY)")
    rejected_path = Path(rejected_path or default_rejected_path(path))
    state_path = Path(state_path or default_state_path(path))
    importer = _Importer(
        path, fmt, url.rstrip("/"), api_key, batch_size, rejected_path, state_path,
        retry_for_s, reporter or Reporter(), request_timeout_s, sleep, max_batches,
    )
    owns_client = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(request_timeout_s, connect=10.0))
    try:
        return importer.run(client, restart)
    finally:
        if owns_client:
            client.close()


class _Importer:
    def __init__(self, path: Path, fmt: str, base_url: str, api_key: str, batch_size: int,
                 rejected_path: Path, state_path: Path, retry_for_s: float, reporter: Reporter,
                 request_timeout_s: float, sleep: Callable[[float], None],
                 max_batches: int | None) -> None:
        self.path, self.fmt, self.base_url = path, fmt, base_url
        self.endpoint = f"{base_url}/v1/events/batch"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                        "User-Agent": "churnguard-import"}
        self.batch_size, self.rejected_path, self.state_path = batch_size, rejected_path, state_path
        self.retry_for_s, self.reporter, self.sleep = retry_for_s, reporter, sleep
        self.max_batches = max_batches
        self.state: dict[str, Any] = {}

    # state -------------------------------------------------------------------------------

    def _begin(self, restart: bool) -> bool:
        """Load or create the state; False when the file was already imported."""
        fingerprint = _fingerprint(self.path)
        saved = None if restart else _load_state(self.state_path)
        if saved is not None:
            if saved.get("input") != fingerprint:
                raise BadInput(
                    f"the saved progress in {self.state_path} is for a different version of "
                    f"{self.path} "
                    "(its size, modification time or first bytes changed); pass --restart to import it "
                    "from the beginning, or --state to keep that progress apart")
            if saved.get("format") != self.fmt:
                raise BadInput(f"the saved progress in {self.state_path} was made reading "
                               f"{self.path} as {saved.get('format')}; pass --format "
                               f"{saved.get('format')} or --restart")
            self.state = saved
            return not saved.get("complete")
        self.state = {
            "version": STATE_VERSION, "input": fingerprint, "path": str(self.path.resolve()),
            "format": self.fmt, "offset": 0, "line": 0, "accepted": 0, "duplicates": 0,
            "rejected": 0, "batches": 0, "rejected_bytes": None, "complete": False,
        }
        return True

    def _save(self) -> None:
        self.state["updated_at"] = datetime.now(timezone.utc).isoformat()
        _save_state(self.state_path, self.state)

    def _position(self) -> str:
        if not self.state.get("offset"):
            return "nothing was imported yet: run the same command again to start"
        return (f"progress is saved in {self.state_path} ({self.state['line']:,} lines done, byte "
                f"{self.state['offset']:,}): run the same command again to continue from there")

    # the loop ---------------------------------------------------------------------------

    def run(self, client: httpx.Client, restart: bool) -> ImportReport:
        started = time.monotonic()
        if not self._begin(restart):
            return self._report("already_imported", 0, 0.0, 0)
        resuming = self.state["offset"] > 0
        resumed_at = self.state["line"] + 1 if resuming else 0
        rejected = _RejectedFile(self.rejected_path, self.state["rejected_bytes"] if resuming else None)
        self.state["rejected_bytes"] = rejected.size
        rows = 0  # handled in this run, for events/s
        sent_batches = 0
        self.reporter.start(self.state["input"]["size"], self.state["offset"])
        try:
            with self.path.open("rb") as handle:
                lines, chunks = self._chunks(handle, client)
                for events, local, last, eof in chunks:
                    outcome = _Outcome(0, 0, 0, [])
                    if events:
                        outcome = self._send(client, events)
                        sent_batches += 1
                        self.state["batches"] += 1
                        self.state["accepted"] += outcome.accepted
                        self.state["duplicates"] += outcome.duplicates
                    for row in sorted(local + outcome.rows, key=lambda r: r.line):
                        rejected.write(row)
                    rejected.flush()  # before the state that accounts for it
                    self.state["rejected"] += len(local) + outcome.rejected
                    self.state["rejected_bytes"] = rejected.size
                    if eof:
                        self.state.update(offset=lines.offset, line=lines.line_no, complete=True)
                    elif last is not None:
                        self.state.update(offset=last.end_offset, line=last.end_line)
                    self._save()
                    rows += len(events) + len(local)
                    self.reporter.update(self.state["offset"], rows, time.monotonic() - started)
                    if eof:
                        return self._report("complete", rows, time.monotonic() - started, resumed_at)
                    if self.max_batches is not None and sent_batches >= self.max_batches:
                        return self._report("stopped", rows, time.monotonic() - started, resumed_at)
            raise AssertionError("unreachable: the last chunk ends the file")
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {self._position()}") from None
        finally:
            rejected.close()
            self.reporter.stop()

    def _chunks(self, handle: IO[bytes], client: httpx.Client,
                ) -> tuple[_Lines, Iterator[tuple[list[_Row], list[_Row], _Row | None, bool]]]:
        """(events to send, rows rejected here, the last row taken, end of file) per chunk: up to
        batch-size events under the byte limit, or a run of bad rows. A row that does not fit
        waits for the next chunk, so the saved position never passes an unsent row."""
        lines, row_iter = self._rows(handle, client)

        def chunks() -> Iterator[tuple[list[_Row], list[_Row], _Row | None, bool]]:
            carry: _Row | None = None
            while True:
                events: list[_Row] = []
                local: list[_Row] = []
                size = len(_BODY_HEAD) + len(_BODY_TAIL)
                last: _Row | None = None
                while True:
                    row, carry = (carry if carry is not None else next(row_iter, None)), None
                    if row is None:
                        yield events, local, last, True
                        return
                    if row.payload is not None:
                        extra = len(row.payload) + (1 if events else 0)
                        if len(events) >= self.batch_size or size + extra > MAX_BATCH_BYTES:
                            carry = row
                            break
                        events.append(row)
                        size += extra
                    else:
                        local.append(row)
                    last = row
                    if len(local) >= MAX_PENDING_REJECTS:
                        break
                yield events, local, last, False

        return lines, chunks()

    def _rows(self, handle: IO[bytes], client: httpx.Client) -> tuple[_Lines, Iterator[_Row]]:
        offset, line = self.state["offset"], self.state["line"]
        if self.fmt == "ndjson":
            lines = _Lines(handle, offset, line, _NDJSON_LINE_CAP)
            return lines, _ndjson_rows(lines)
        header_lines = _Lines(handle, 0, 0, _CSV_LINE_CAP)
        columns = _csv_header(header_lines)
        if columns is None:  # an empty file
            return header_lines, iter(())
        if not offset:
            offset, line = header_lines.offset, header_lines.line_no
        types = self._contract(client)  # after the header: a bad file fails before any request
        lines = _Lines(handle, offset, line, _CSV_LINE_CAP)
        return lines, _csv_rows(lines, columns, types)

    def _report(self, status: Literal["complete", "already_imported", "stopped"], rows: int,
                elapsed_s: float, resumed_at: int) -> ImportReport:
        return ImportReport(
            path=self.path, status=status, accepted=self.state["accepted"],
            duplicates=self.state["duplicates"], rejected=self.state["rejected"],
            lines=self.state["line"], rows=rows, elapsed_s=elapsed_s,
            rejected_path=self.rejected_path, state_path=self.state_path, resumed_at_line=resumed_at,
        )

    # one batch ------------------------------------------------------------------------------

    def _contract(self, client: httpx.Client) -> ContractTypes:
        """The contract's JSON Schema, to give CSV values their JSON types."""
        url = f"{self.base_url}/v1/schema"
        response = self._call(client, "GET", url, None, "reading the event contract")
        if response.status_code in (401, 403):
            self._refused(response, "reading the event contract")
        try:
            schema = response.json() if response.status_code == 200 else None
        except ValueError:
            schema = None
        if not isinstance(schema, dict):
            self.reporter.note(f"could not read the event contract from {url} "
                               f"({response.status_code}); CSV values are sent as text")
            schema = None
        return ContractTypes(schema)

    def _refused(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        request_id = response.headers.get("x-request-id")
        suffix = f" (request id {request_id})" if request_id else ""
        message = f"the server refused {what}: {status} {_detail(response)}{suffix}"
        if status in (401, 403):
            raise AuthRefused(f"{message}. Check the API key (--key or CHURNGUARD_API_KEY). "
                              f"{self._position()}")
        raise ServerRefused(f"{message}. {self._position()}")

    def _send(self, client: httpx.Client, events: list[_Row], whole: bool = True) -> _Outcome:
        """Post one batch until the server answers it."""
        body = _BODY_HEAD + b",".join(row.payload for row in events) + _BODY_TAIL  # type: ignore[misc]
        where = f"the batch of lines {events[0].line:,}-{events[-1].end_line:,}"
        response = self._call(client, "POST", self.endpoint, body, where)
        if response.status_code == 400:
            return self._split(client, events, response, where, whole)
        result = _batch_result(response) if response.status_code in (200, 202, 422) else None
        if result is None:
            self._refused(response, where)
        assert result is not None
        by_index: dict[int, list[dict[str, str]]] = {}
        for error in result.get("errors", []):
            index = error.get("index") if isinstance(error, dict) else None
            if isinstance(index, int) and 0 <= index < len(events):
                by_index.setdefault(index, []).append(
                    {"field": str(error.get("field", "")), "message": str(error.get("message", ""))})
        refused = [
            events[index].refused("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)
            for index, errors in sorted(by_index.items())
        ]
        rejected = max(int(result.get("rejected") or 0), len(refused))
        if rejected > len(refused):
            self.reporter.note(f"{where}: the server rejected {rejected - len(refused)} event(s) "
                               "without naming them")
        return _Outcome(int(result["accepted"]), int(result.get("duplicates") or 0), rejected, refused)

    def _split(self, client: httpx.Client, events: list[_Row], response: httpx.Response, where: str,
               whole: bool) -> _Outcome:
        """The whole batch was refused as malformed (400) over one event the local checks let
        through: find that event by halves instead of stopping a long import."""
        if len(events) == 1:
            detail = _detail(response)
            row = events[0].refused(f"refused by the server: {detail}",
                                    [{"field": "(event)", "message": detail}])
            return _Outcome(0, 0, 1, [row], malformed=1)
        half = len(events) // 2
        outcome = self._send(client, events[:half], False) + self._send(client, events[half:], False)
        if whole and outcome.malformed == len(events):
            self._refused(response, where)  # each event alone is refused too: not about one event
        return outcome

    def _call(self, client: httpx.Client, method: str, url: str, body: bytes | None,
              where: str) -> httpx.Response:
        """One request, repeated while the API is unavailable (connection trouble, 429, 502,
        503, 504), honouring Retry-After, for at most retry_for_s."""
        deadline: float | None = None
        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = client.request(method, url, content=body, headers=self.headers)
            except httpx.TransportError as exc:
                problem = f"cannot reach {url} ({type(exc).__name__}: {exc})"
            else:
                if response.status_code not in RETRYABLE:
                    return response
                problem = f"the server answered {response.status_code} ({_detail(response)})"
                wait = _retry_after(response)
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + self.retry_for_s
            if now >= deadline:
                raise ServerUnavailable(
                    f"gave up on {where} after retrying for {self.retry_for_s:g} s: {problem}. "
                    f"{self._position()}")
            backoff = min(30.0, 0.5 * 2 ** attempt) * random.uniform(0.8, 1.2)
            delay = min(max(wait if wait is not None else backoff, 0.0), deadline - now)
            self.reporter.note(f"{where}: {problem}; retrying in {delay:.1f} s "
                               f"(giving up in {deadline - now:.0f} s)")
            self.sleep(delay)
            attempt += 1
