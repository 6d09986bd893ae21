"""`churnguard import` against real parts: the real gateway and ingest apps served by uvicorn on
free ports, a real tenant key, the real broker. Accepted events must be on `customer-events`."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from typer.testing import CliRunner

from services.cli import app as cli_app
from services.gateway.app import create_app as create_gateway
from services.gateway.config import GatewaySettings
from services.gateway.manage import create_tenant
from services.ingest import backfill
from services.ingest.app import create_app as create_ingest
from services.ingest.backfill import ImportReport, run_import
from services.ingest.config import IngestSettings
from shared.broker import free_port
from shared.events import EventRecord
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from shared.topics import CUSTOMER_EVENTS
from tests.helpers import ServerThread, read_topic

TOKEN = "backfill-test-internal-token"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    url: str
    key: str
    tenant_id: str
    kafka: KafkaSettings
    ingest: ServerThread

    def topic(self, count: int, timeout_s: float = 15.0) -> list[EventRecord]:
        records = asyncio.run(read_topic(self.kafka, CUSTOMER_EVENTS, count, timeout_s=timeout_s))
        return [EventRecord.model_validate_json(r.value) for r in records]

    def topic_raw(self, count: int) -> list[dict]:
        return [json.loads(r.value) for r in asyncio.run(read_topic(self.kafka, CUSTOMER_EVENTS, count))]


StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(kafka_settings: KafkaSettings, database_url: str) -> Iterator[StackFactory]:
    """Real ingest + real gateway on free ports, and a tenant with a key. `start_ingest=False`
    leaves ingest down (the gateway answers 503) until `stack.ingest.start()`."""
    servers: list[ServerThread] = []

    def make(start_ingest: bool = True, **gateway_options: object) -> Stack:
        internal = InternalAuthSettings(internal_token=SecretStr(TOKEN))
        ingest = ServerThread(create_ingest(IngestSettings(
            kafka=kafka_settings, internal=internal, database=DatabaseSettings(database_url=database_url))))
        servers.append(ingest)
        if start_ingest:
            ingest.start()
        dead = f"http://127.0.0.1:{free_port()}"
        gateway = ServerThread(create_gateway(GatewaySettings(
            database=DatabaseSettings(database_url=database_url), internal=internal,
            ingest_url=ingest.url, scoring_url=dead, actions_url=dead, **gateway_options,
        ))).start()
        servers.append(gateway)
        tenant_id, key = create_tenant(database_url, "backfill-shop")
        return Stack(gateway.url, key, tenant_id, kafka_settings, ingest)

    yield make
    for server in reversed(servers):
        if server.server.started:
            server.stop()


@pytest.fixture
def stack(make_stack: StackFactory) -> Stack:
    return make_stack()


def event(n: int, **overrides: object) -> dict:
    body = {
        "id": f"evt-{n}", "type": "order.completed", "customer_id": f"c-{n % 7}",
        "occurred_at": "2025-06-01T10:00:00Z", "source": "legacy-shop",
        "data": {"order_id": f"o-{n}", "amount": "59.90", "currency": "EUR", "items": 2},
    }
    body.update(overrides)
    return body


def nested(levels: int) -> object:
    value: object = "v"
    for _ in range(levels):
        value = {"k": value}
    return value


def write_ndjson(path: Path, items: list[dict | str]) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def rejected_lines(report: ImportReport) -> dict[int, dict]:
    rows = [json.loads(line) for line in report.rejected_path.read_text().splitlines()]
    by_line = {row["line"]: row for row in rows}
    assert len(by_line) == len(rows), "a row was written to the rejected file twice"
    return by_line


def test_ndjson_good_events_reach_the_topic_and_bad_lines_are_named(stack: Stack, tmp_path: Path) -> None:
    source = write_ndjson(tmp_path / "history.ndjson", [
        event(1),
        event(2),
        '{"id": "evt-3", "type": "order.completed",',                                   # line 3: not JSON
        event(4),
        event(5, data={"order_id": "o-5", "amount": 59.9, "currency": "EUR"}),          # line 5: float money
        "",                                                                              # blank: skipped
        event(7, type="order.teleported"),                                               # line 7: unknown type
        event(8, data={"order_id": "o-8", "amount": "1.00", "currency": "EUR", "note": "x" * 40_000}),  # too big
        "[1, 2]",                                                                        # line 9: not an object
        event(10),
        event(11, customer_id=""),                                                       # line 11: empty id
        '{"id": "evt-12", "type": "feedback.nps", "customer_id": "c-1", "occurred_at": "2025-06-01T10:00:00Z", '
        '"data": {"score": NaN}}',                                                       # line 12: not strict JSON
        event(13, data={"attributes": nested(11)}, type="customer.profile_updated"),    # 14 levels: the server says why
        event(14, data={"attributes": nested(12)}, type="customer.profile_updated"),    # 15 levels: refused here
        event(15),
    ])
    report = run_import(source, url=stack.url, api_key=stack.key, batch_size=3)

    assert report.status == "complete"
    assert (report.accepted, report.duplicates, report.rejected) == (5, 0, 9)
    assert report.lines == 15
    rejected = rejected_lines(report)
    assert sorted(rejected) == [3, 5, 7, 8, 9, 11, 12, 13, 14]
    assert rejected[12]["reason"] == "NaN is not valid JSON; numbers must be finite"
    assert rejected[13]["errors"][0]["field"].startswith("data.attributes.k")
    assert rejected[14]["reason"] == "JSON nested too deeply (at most 14 levels in one event)"
    assert "invalid JSON" in rejected[3]["reason"] and rejected[3]["raw"].startswith('{"id": "evt-3"')
    assert [e["field"] for e in rejected[5]["errors"]] == ["data.amount"]
    assert rejected[7]["errors"][0]["field"] == "type" and "order.teleported" in rejected[7]["reason"]
    assert "one event may be at most 32,768 bytes" in rejected[8]["reason"]
    assert rejected[8]["raw_truncated"] is True and len(rejected[8]["raw"]) == backfill.RAW_LIMIT
    assert "not a JSON object" in rejected[9]["reason"]
    assert rejected[11]["errors"][0]["field"] == "customer_id"
    assert json.loads(rejected[11]["raw"])["id"] == "evt-11"

    records = stack.topic(5)
    assert sorted(r.event.id for r in records) == ["evt-1", "evt-10", "evt-15", "evt-2", "evt-4"]
    assert {r.tenant_id for r in records} == {stack.tenant_id}
    assert "import complete" in report.summary() and str(report.rejected_path) in report.summary()


def test_csv_rows_become_typed_events(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "history.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "type", "customer_id", "occurred_at", "source", "data.order_id", "data.amount",
                         "data.currency", "data.items", "data.score", "data.comment", "data.marketing",
                         "data.attributes.tier", "data.attributes.visits"])
        writer.writerow(["e1", "order.completed", "c-1", "2025-06-01T10:00:00Z", "crm", "o-1", "59.90", "EUR",
                         "2", "", "", "", "", ""])
        writer.writerow(["e2", "feedback.nps", "c-1", "2025-06-02T10:00:00+02:00", "", "", "", "", "", "3",
                         'slow, "late"\nand broken', "", "", ""])
        writer.writerow(["e3", "customer.consent_changed", "c-2", "2025-06-03T10:00:00Z", "crm", "", "", "", "",
                         "", "", "false", "", ""])
        writer.writerow(["e4", "customer.profile_updated", "c-2", "2025-06-04T10:00:00Z", "crm", "", "", "", "",
                         "", "", "", "gold", "12"])
        writer.writerow(["e5", "order.completed", "c-3"])                                  # too few cells
        writer.writerow(["e6", "feedback.nps", "c-3", "2025-06-05T10:00:00Z", "crm", "", "", "", "", "eleven",
                         "", "", "", ""])                                                  # not a score
        writer.writerow([])                                                                # blank row
    report = run_import(source, url=stack.url, api_key=stack.key)

    assert (report.status, report.accepted, report.rejected) == ("complete", 4, 2)
    rejected = rejected_lines(report)
    assert rejected[7]["reason"] == "row has 3 cells; the header has 14" and rejected[7]["raw"].startswith("e5,")
    assert [e["field"] for e in rejected[8]["errors"]] == ["data.score"]

    wire = {r["event"]["id"]: r["event"] for r in stack.topic_raw(4)}
    assert wire["e1"]["data"] == {"order_id": "o-1", "amount": "59.90", "currency": "EUR", "items": 2}
    assert wire["e1"]["source"] == "crm"
    assert wire["e2"]["data"] == {"score": 3, "comment": 'slow, "late"\nand broken'}
    assert wire["e2"]["source"] == "api"  # an empty cell is omitted: the contract's default applies
    assert wire["e3"]["data"]["marketing"] is False
    assert wire["e4"]["data"]["attributes"] == {"tier": "gold", "visits": "12"}


def test_a_csv_import_resumes_after_its_header(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "history.csv"
    rows = [f"e{n},feedback.csat,c-{n},2025-06-01T10:00:00Z,crm,{1 + n % 5}" for n in range(1, 8)]
    source.write_text("\ufeffid,type,customer_id,occurred_at,source,data.score\r\n" + "\r\n".join(rows) + "\r\n")

    first = run_import(source, url=stack.url, api_key=stack.key, batch_size=3, max_batches=1)
    assert (first.status, first.accepted, first.lines) == ("stopped", 3, 4)  # the header is line 1
    second = run_import(source, url=stack.url, api_key=stack.key, batch_size=3)
    assert (second.status, second.resumed_at_line, second.accepted, second.duplicates) == ("complete", 5, 7, 0)
    wire = {r["event"]["id"]: r["event"]["data"]["score"] for r in stack.topic_raw(7)}
    assert wire == {f"e{n}": 1 + n % 5 for n in range(1, 8)}


def test_an_interrupted_import_resumes_where_it_stopped(stack: Stack, tmp_path: Path) -> None:
    items: list[dict | str] = [event(n) for n in range(1, 24)]
    items[6] = "not json"                              # line 7, in the second batch
    items[17] = event(18, data={"amount": "1.00"})     # line 18, in the fourth batch (server reject)
    source = write_ndjson(tmp_path / "history.ndjson", items)
    good = {f"evt-{n}" for n in range(1, 24)} - {"evt-7", "evt-18"}

    first = run_import(source, url=stack.url, api_key=stack.key, batch_size=5, max_batches=2)
    assert (first.status, first.accepted, first.rejected, first.lines) == ("stopped", 10, 1, 11)
    state = json.loads(first.state_path.read_text())
    assert (state["line"], state["complete"]) == (11, False)
    assert state["offset"] == len(b"".join(source.read_bytes().splitlines(keepends=True)[:11]))

    second = run_import(source, url=stack.url, api_key=stack.key, batch_size=5)
    assert (second.status, second.resumed_at_line) == ("complete", 12)
    assert (second.accepted, second.duplicates, second.rejected, second.lines) == (len(good), 0, 2, 23)
    assert sorted(rejected_lines(second)) == [7, 18]
    records = stack.topic(len(good) + 1, timeout_s=1.5)  # one more than expected: nothing was sent twice
    assert sorted(r.event.id for r in records) == sorted(good)

    again = run_import(source, url=stack.url, api_key=stack.key, batch_size=5)
    assert again.status == "already_imported" and "already imported" in again.summary()
    assert again.accepted == len(good)


def test_a_batch_resent_after_a_crash_is_harmless(stack: Stack, tmp_path: Path) -> None:
    """Crash after the server acknowledged a batch but before the position was saved: the
    next run sends that batch again, and its rejected rows are not written twice."""
    items: list[dict | str] = [event(n) for n in range(1, 13)]
    items[6] = event(7, data={"amount": "1.00"})  # line 7: rejected by the server, in batch 2
    source = write_ndjson(tmp_path / "history.ndjson", items)
    state_path = tmp_path / "history.ndjson.import-state.json"

    run_import(source, url=stack.url, api_key=stack.key, batch_size=5, max_batches=1)
    after_first = state_path.read_bytes()
    run_import(source, url=stack.url, api_key=stack.key, batch_size=5, max_batches=1)
    state_path.write_bytes(after_first)  # as if the process died before saving batch 2

    report = run_import(source, url=stack.url, api_key=stack.key, batch_size=5)
    assert report.status == "complete" and report.resumed_at_line == 6
    # Batch 2 went twice: its four good events come back as duplicates and are not published
    # again. The counters continue from the saved state (batch 1: 5), so the lost run's 4 are
    # not in them; duplicates are.
    assert (report.accepted, report.duplicates, report.rejected) == (5 + 2, 4, 1)
    assert sorted(rejected_lines(report)) == [7]
    records = stack.topic(12, timeout_s=1.5)  # one more than expected: nothing was published twice
    assert sorted(r.event.id for r in records) == sorted({f"evt-{n}" for n in range(1, 13)} - {"evt-7"})


def test_a_changed_file_is_not_resumed_without_restart(stack: Stack, tmp_path: Path) -> None:
    source = write_ndjson(tmp_path / "history.ndjson", [event(n) for n in range(1, 7)])
    run_import(source, url=stack.url, api_key=stack.key, batch_size=2, max_batches=1)
    with source.open("a") as handle:
        handle.write(json.dumps(event(7)) + "\n")

    with pytest.raises(backfill.BadInput, match="different version.*--restart") as refused:
        run_import(source, url=stack.url, api_key=stack.key, batch_size=2)
    assert refused.value.exit_code == 2
    report = run_import(source, url=stack.url, api_key=stack.key, batch_size=2, restart=True)
    assert (report.status, report.accepted, report.duplicates, report.resumed_at_line) == ("complete", 5, 2, 0)


def _peak_memory(source: Path, stack: Stack) -> dict:
    """Import in a separate process (the servers here would blur the figure) under tracemalloc."""
    code = (
        "import json, os, sys, tracemalloc\n"
        "from pathlib import Path\n"
        "from services.ingest.backfill import run_import\n"
        "tracemalloc.start()\n"
        "report = run_import(Path(sys.argv[1]), url=sys.argv[2], api_key=os.environ['CHURNGUARD_API_KEY'])\n"
        "print(json.dumps({'peak': tracemalloc.get_traced_memory()[1], 'accepted': report.accepted,\n"
        "                  'elapsed': report.elapsed_s}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(source), stack.url], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "CHURNGUARD_API_KEY": stack.key}, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_memory_stays_constant_whatever_the_file_size(stack: Stack, tmp_path: Path) -> None:
    def history(path: Path, count: int) -> Path:
        with path.open("w") as handle:
            for n in range(count):
                handle.write(json.dumps(event(n, id=f"{path.stem}-{n}", customer_id=f"c-{n % 997}")) + "\n")
        return path

    small, large = history(tmp_path / "small.ndjson", 2_000), history(tmp_path / "large.ndjson", 20_000)
    small_run, large_run = _peak_memory(small, stack), _peak_memory(large, stack)
    print(f"\npeak traced memory: {small.stat().st_size:,} B file -> {small_run['peak']:,} B; "
          f"{large.stat().st_size:,} B file -> {large_run['peak']:,} B "
          f"({small_run['elapsed']:.1f} s, {large_run['elapsed']:.1f} s)")
    assert (small_run["accepted"], large_run["accepted"]) == (2_000, 20_000)
    assert large_run["peak"] < 1.25 * small_run["peak"]  # ten times the file, not more memory
    assert large_run["peak"] < 4 * 1024 * 1024  # a few batches' worth (one is at most 512 KiB)


def test_the_cli_imports_and_prints_a_summary(stack: Stack, tmp_path: Path) -> None:
    source = write_ndjson(tmp_path / "history.ndjson", [event(1), event(2), "oops", event(4)])
    runner = CliRunner()
    env = {"CHURNGUARD_API_KEY": stack.key, "CHURNGUARD_API_URL": stack.url}

    result = runner.invoke(cli_app, ["import", str(source)], env=env)  # with the progress bar
    assert result.exit_code == 0, result.output
    assert "import complete" in result.output
    assert "accepted               3" in result.output
    assert "duplicates             0" in result.output
    assert f"rejected               1  -> {source}.rejected.ndjson" in result.output
    assert "lines read             4" in result.output and "events/s" in result.output

    again = runner.invoke(cli_app, ["import", str(source), "--no-progress"], env=env)
    assert again.exit_code == 0 and "already imported" in again.output


def test_a_wrong_key_stops_at_once_with_a_clear_message(stack: Stack, tmp_path: Path) -> None:
    source = write_ndjson(tmp_path / "history.ndjson", [event(1), event(2)])
    result = CliRunner().invoke(cli_app, [
        "import", str(source), "--url", stack.url, "--key", "cg_wrong", "--no-progress"])
    assert result.exit_code == 1
    assert "401 invalid API key" in result.output and "Check the API key" in result.output
    assert "cg_wrong" not in result.output
    assert not (tmp_path / "history.ndjson.import-state.json").exists()


def test_an_unavailable_api_is_retried_honouring_retry_after(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = make_stack(start_ingest=False)  # the gateway answers 503 + Retry-After: 1
    source = write_ndjson(tmp_path / "history.ndjson", [event(1), event(2)])
    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        if len(asked) == 2:
            stack.ingest.start()  # back after two refusals

    report = run_import(source, url=stack.url, api_key=stack.key, sleep=sleep)
    assert asked == [1.0, 1.0]
    assert (report.status, report.accepted) == ("complete", 2)
    assert {r.event.id for r in stack.topic(2)} == {"evt-1", "evt-2"}


def test_retrying_gives_up_after_the_budget_with_the_saved_position(tmp_path: Path) -> None:
    source = write_ndjson(tmp_path / "history.ndjson", [event(1)])
    nobody = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = CliRunner().invoke(cli_app, [
        "import", str(source), "--url", nobody, "--key", "cg_x", "--retry-for", "0.5", "--no-progress"])
    assert result.exit_code == 1
    assert "gave up on the batch of lines 1-1 after retrying for 0.5 s" in result.output
    assert "ConnectError" in result.output and "run the same command again" in result.output
    assert time.monotonic() - started < 5


def test_a_batch_the_server_refuses_whole_stops_the_import(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = make_stack(max_body_bytes=4096)  # a gateway in front with a smaller limit than ingest's
    source = write_ndjson(tmp_path / "history.ndjson", [event(n) for n in range(1, 60)])
    with pytest.raises(backfill.ServerRefused, match="refused the batch of lines 1-59: 413") as refused:
        run_import(source, url=stack.url, api_key=stack.key)
    assert refused.value.exit_code == 1


def test_bad_csv_headers_are_refused_before_sending(tmp_path: Path) -> None:
    source = tmp_path / "history.csv"
    for header, problem in [
        ("id,type,customer_id,occurred_at,data.a,data.a.b", "cannot both be columns"),
        ("id,type,customer_id,occurred_at,data.a,data.a", "appears twice"),
        ("id,type,customer_id,data.a", "missing column(s) occurred_at"),
        ("id,type,,customer_id,occurred_at", "column 3"),
    ]:
        source.write_text(header + "\n")
        with pytest.raises(backfill.BadInput, match=problem.replace("(", r"\(").replace(")", r"\)")):
            run_import(source, url="http://127.0.0.1:9", api_key="cg_x")


def picky_api(refuse: Callable[[dict], bool]) -> FastAPI:
    """A stand-in API that refuses a whole batch as malformed (400) when one event displeases
    it, as ingest does for JSON it cannot take; otherwise it accepts everything."""
    api = FastAPI()
    api.state.batches = []

    @api.post("/v1/events/batch")
    async def batch(request: Request) -> JSONResponse:
        events = json.loads(await request.body())["events"]
        api.state.batches.append([e["id"] for e in events])
        if any(refuse(e) for e in events):
            return JSONResponse({"detail": "malformed JSON at line 1 column 9: bad value"}, status_code=400)
        return JSONResponse({"accepted": len(events), "duplicates": 0, "rejected": 0, "errors": []}, status_code=202)

    return api


def test_one_event_that_spoils_its_batch_is_found_and_rejected_alone(tmp_path: Path) -> None:
    api = picky_api(lambda e: e["id"] == "evt-6")
    server = ServerThread(api).start()
    try:
        source = write_ndjson(tmp_path / "history.ndjson", [event(n) for n in range(1, 9)])
        report = run_import(source, url=server.url, api_key="cg_x")
    finally:
        server.stop()
    assert (report.status, report.accepted, report.rejected) == ("complete", 7, 1)
    [row] = rejected_lines(report).values()
    assert row["line"] == 6 and row["reason"] == "refused by the server: malformed JSON at line 1 column 9: bad value"
    accepted = [ids for ids in api.state.batches if "evt-6" not in ids]
    assert sorted(i for ids in accepted for i in ids) == sorted(f"evt-{n}" for n in (1, 2, 3, 4, 5, 7, 8))


def test_a_server_that_refuses_every_event_as_malformed_stops_the_import(tmp_path: Path) -> None:
    server = ServerThread(picky_api(lambda e: True)).start()
    try:
        source = write_ndjson(tmp_path / "history.ndjson", [event(n) for n in range(1, 5)])
        with pytest.raises(backfill.ServerRefused, match="refused the batch of lines 1-4: 400"):
            run_import(source, url=server.url, api_key="cg_x")
    finally:
        server.stop()
