"""bench.summary on small result files written here: figures, references, ratios and goal verdicts
come from the files; a missing or older file is said so; the block goes to the top of the doc."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import summary

MACHINE = {"nproc": "2", "cpu": "AMD EPYC", "python": "3.11.7", "platform": "Linux-x"}


def _ingest(date: str = "2026-11-23 17:20 UTC") -> dict[str, Any]:
    def row(target: str, endpoint: str, conn: int, events: float) -> dict[str, Any]:
        return {"target": target, "endpoint": endpoint, "connections": conn, "events_per_s": events,
                "requests_per_s": events if endpoint == "single" else events / 500}

    return {"date": date, "command": "make bench", "machine": MACHINE,
            "raw_producer": [{"name": "raw producer: send() each, then flush()", "msg_per_s": 100_000.0},
                             {"name": "raw producer: create_batch()/send_batch() per partition", "msg_per_s": 150_000.0}],
            "throughput": [row("direct", "batch", 1, 30_000.0), row("direct", "batch", 16, 40_000.0),
                           row("gateway", "batch", 1, 55_000.0), row("gateway", "batch", 16, 45_000.0),
                           row("direct", "single", 64, 1_000.0), row("gateway", "single", 64, 590.0)]}


def _scoring(date: str = "2026-11-23 17:23 UTC") -> dict[str, Any]:
    def lat(rate: float, p99: float) -> dict[str, Any]:
        return {"rate": rate, "sent": 100, "scored": 100, "missing": 0, "p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": p99}

    return {"date": date, "command": "make bench", "machine": MACHINE,
            "bare": [{"name": "bare aiokafka consumer: read + commit", "events_per_s": 200_000.0},
                     {"name": "bare aiokafka consumer: read + commit + decode EventRecord", "events_per_s": 100_000.0}],
            "backends": [{"backend": "postgresql", "throughput": {"events_per_s": 12_000.0},
                          "latency": [lat(200, 50.0), lat(1000, 99.0)], "rss_peak_mb": 240.0,
                          "rss_at_rest_mb": 200.0},
                         {"backend": "sqlite", "throughput": {"events_per_s": 8_000.0}, "latency": [],
                          "rss_peak_mb": 255.0}]}


def _actions(date: str = "2026-11-23 17:26 UTC") -> dict[str, Any]:
    return {"date": date, "command": "make bench", "machine": MACHINE,
            "throughput": [{"concurrency": 1, "httpx": 1_000.0, "aiohttp": 2_000.0, "outbox": 1_000.0},
                           {"concurrency": 16, "httpx": 500.0, "aiohttp": 8_000.0, "outbox": 1_000.0}],
            "latency_summary": {"pooled": {"healthy_p99_ms": 4.0, "hanging_p99_ms": 4.2, "change": 0.05,
                                           "ci95": [-0.03, 0.12], "deliveries": [20_000, 20_000], "draws": 1_000}}}


def _pipeline(date: str = "2026-11-23 17:28 UTC") -> dict[str, Any]:
    def lat(rate: float, hook_p99: float, arrived: int) -> dict[str, Any]:
        return {"rate": rate, "sent": 1_000, "statuses": {"202": 1_000},
                "event_to_score_ms": {"count": 1_000, "p50": 5.0, "p95": 8.0, "p99": 9.0},
                "event_to_webhook_ms": {"count": arrived, "p50": 100.0, "p95": 300.0, "p99": hook_p99},
                "rss_peak_mb": {"ingest": 110.0, "scoring": 260.0}}

    return {"date": date, "command": "make bench", "machine": MACHINE,
            "rss_at_rest_mb": {"ingest": 100.0, "scoring": 200.0},
            "latency": [lat(50, 900.0, 1_000), lat(200, 450.0, 990)]}


def _write(folder: Path, **parts: dict[str, Any]) -> None:
    for name, data in parts.items():
        (folder / f"{name}.json").write_text(json.dumps(data))


def _rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["what"]: r for r in result["rows"]}


def test_figures_references_ratios_and_goal_verdicts_come_from_the_files(tmp_path: Path) -> None:
    _write(tmp_path, ingest=_ingest(), scoring=_scoring(), actions=_actions(), pipeline=_pipeline())
    result = summary.summarize(tmp_path)
    rows = _rows(result)

    # batch via gateway: the best connection count, against the raw producer's send+flush msg/s
    batch = rows["batch, via gateway: events/s (best: 1 conn)"]
    assert (batch["ours"], batch["reference"], batch["ratio"], batch["met"]) == (55_000.0, 100_000.0, 0.55, True)
    assert rows["batch, direct: events/s (best: 16 conn)"]["ratio"] == 0.4
    single = rows["single, via gateway: events/s at 64 conn"]
    assert (single["reference"], single["ratio"], single["met"]) == (1_000.0, 0.59, False)  # goal: >= 0.60

    # scoring against the bare consumer that also decodes; 12,000/s meets >= 10,000; p99 99 < 100 ms
    pg = rows["events/s, one instance, PostgreSQL (backlog)"]
    assert (pg["reference"], pg["ratio"], pg["met"]) == (100_000.0, 0.12, True)
    p99 = rows["publish-to-score p50 / p95 / p99 ms at 1,000/s, PostgreSQL"]
    assert (p99["ours_text"], p99["met"]) == ("10.0 / 20.0 / 99.0", True)
    assert rows["publish-to-score p50 / p95 / p99 ms at 200/s, PostgreSQL"]["goal"] is None

    # the outbox against the fastest bare client of the same concurrency
    c1, c16 = (rows[f"webhook deliveries/s through the outbox, concurrency {c}"] for c in (1, 16))
    assert (c1["reference_text"], c1["ratio"], c1["met"]) == ("2,000/s bare aiohttp", 0.5, True)
    assert (c16["ratio"], c16["met"]) == (0.125, False)
    # a change of +5% whose interval reaches +12% does not rule out a 10% slowdown: not met
    hanging = rows["healthy receiver's commit -> receiver p99 ms beside a hanging one (runs pooled)"]
    assert (hanging["ours"], hanging["reference"], round(hanging["ratio"], 2), hanging["met"]) == (4.2, 4.0, 1.05, False)
    assert hanging["note"] == "change +5.0%, 95% interval -3.0% to +12.0%"

    # the webhook goal is judged at 200/s only, and a shortfall of arrivals is said
    hook = rows["event-to-webhook p50 / p95 / p99 ms at 200/s (through the gateway)"]
    assert (hook["ours"], hook["met"], hook["note"]) == (450.0, True, "990 of 1,000 arrived")
    assert rows["event-to-webhook p50 / p95 / p99 ms at 50/s (through the gateway)"]["met"] is None
    # RSS: the peak under load against the same service at rest; scoring breaks the 250 MB goal
    rss = rows["RSS scoring, peak under load, MB"]
    assert (rss["ours"], rss["reference"], rss["ratio"], rss["met"]) == (260.0, 200.0, 1.3, False)
    assert rows["RSS ingest, peak under load, MB"]["met"] is True
    # and scoring's peak over its own bench, the heavier load, per database
    own_pg = rows["RSS scoring, peak over its own bench (postgresql), MB"]
    assert (own_pg["ours"], own_pg["reference"], own_pg["ratio"], own_pg["met"]) == (240.0, 200.0, 1.2, True)
    own_sqlite = rows["RSS scoring, peak over its own bench (sqlite), MB"]
    assert (own_sqlite["met"], own_sqlite["note"]) == (False, "no RSS at rest in scoring.json")

    assert result["warnings"] == []
    assert [s["date"] for s in result["sources"]] == ["2026-11-23 17:20 UTC", "2026-11-23 17:23 UTC",
                                                      "2026-11-23 17:26 UTC", "2026-11-23 17:28 UTC"]
    assert result["goals"] == {"judged": 12, "met": 7, "not_met": 5, "not_measured": 0}
    table = summary.table(result)
    assert "| ingest | batch, via gateway: events/s (best: 1 conn) | 55,000 | 100,000 msg/s raw producer " \
           "(send + flush) | 0.55 | >= 50% of the raw producer (#3) | yes |  |" in table
    assert "| pipeline | RSS scoring, peak under load, MB | 260 | 200 MB at rest | 1.30 | < 250 MB RSS (#8) | **no** |" in table


def test_a_missing_file_and_an_older_run_are_said_and_their_goals_not_judged(tmp_path: Path) -> None:
    _write(tmp_path, ingest=_ingest(), scoring=_scoring(date="2026-11-23 14:00 UTC"), pipeline=_pipeline())
    result = summary.summarize(tmp_path)

    assert "missing: bench/results/actions.json not found (run `python -m bench.actions`)" in result["warnings"]
    older = [w for w in result["warnings"] if "scoring.json is from an older run" in w]
    assert older and "2026-11-23 14:00 UTC, 3 h 28 min before the newest, 2026-11-23 17:28 UTC" in older[0]
    by_part = {s["part"]: s for s in result["sources"]}
    assert by_part["actions"]["present"] is False and by_part["scoring"]["stale"] is True
    assert by_part["ingest"]["stale"] is False

    outbox = _rows(result)["webhook deliveries/s through the outbox"]
    assert outbox["met"] is None and outbox["note"].startswith("missing: bench/results/actions.json")
    pg = _rows(result)["events/s, one instance, PostgreSQL (backlog)"]
    assert pg["met"] is True and pg["note"] == "older run (2026-11-23 14:00 UTC)"  # judged, but flagged
    assert result["goals"]["not_measured"] == 1

    block = summary.doc_block(result)
    assert "| actions | `bench/results/actions.json` | - | - | **missing: bench/results/actions.json not found" in block
    assert "| scoring | `bench/results/scoring.json` | 2026-11-23 14:00 UTC | `make bench` | **older run than the others** |" in block
    assert "| actions | webhook deliveries/s through the outbox | - | - | - | >= 0.5 of the fastest bare client (#5) | " \
           "**not measured** |" in block


def test_main_writes_the_json_and_puts_the_block_at_the_top_of_the_doc_then_replaces_it(tmp_path: Path) -> None:
    _write(tmp_path, ingest=_ingest(), scoring=_scoring(), actions=_actions(), pipeline=_pipeline())
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nIntro.\n\n<!-- bench:ingest:start -->\nx\n<!-- bench:ingest:end -->\n")

    assert summary.main(["--results", str(tmp_path), "--doc", str(doc)]) == 0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["goals"]["judged"] == 12
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n" + summary.DOC_START + "\n## Summary (issue #8)")
    assert text.index(summary.DOC_END) < text.index("Intro.") < text.index("bench:ingest:start")
    assert "All four result files are from one run (within 30 minutes)." in text

    (tmp_path / "pipeline.json").unlink()
    assert summary.main(["--results", str(tmp_path), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.count(summary.DOC_START) == 1 and "Intro." in text
    assert "**missing: bench/results/pipeline.json not found" in text


@pytest.mark.parametrize(("goal", "value", "ratio", "met"), [
    ("batch_gateway_vs_raw", None, 0.5, True), ("batch_gateway_vs_raw", None, 0.4999, False),
    ("scoring_p99_1000", 100.0, None, False), ("rss", 249.9, None, True), ("rss", None, None, None),
])
def test_goal_thresholds(goal: str, value: float | None, ratio: float | None, met: bool | None) -> None:
    assert summary.GOALS[goal].met(value, ratio) is met
