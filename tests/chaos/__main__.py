"""`make chaos`: the long fault-injection run (tests/chaos/harness.py), printed and recorded.

    .venv/bin/python -m tests.chaos --help
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bench.common import code_version, run_command
from tests.chaos.harness import ChaosConfig, ChaosRun, failures, summary
from tests.chaos.report import write_doc

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events to replay (at least)")
    parser.add_argument("--load-seconds", type=float, default=300.0, help="how long the replay takes")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs, spread over the four services")
    parser.add_argument("--broker-pauses", type=int, default=3)
    parser.add_argument("--receiver-failures", type=int, default=2)
    parser.add_argument("--receiver-hangs", type=int, default=2)
    parser.add_argument("--database-outages", type=int, default=3)
    parser.add_argument("--database", choices=("postgresql", "sqlite", "both"), default="both")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--drain-timeout", type=float, default=900.0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temp dir)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/reliability.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    databases = ("postgresql", "sqlite") if args.database == "both" else (args.database,)
    code = code_version()
    runs: dict[str, dict] = {}
    failed = False
    for database in databases:
        workdir = args.workdir / database if args.workdir else Path(tempfile.mkdtemp(prefix=f"chaos-{database}-"))
        config = ChaosConfig(
            workdir=workdir, events=args.events, load_seconds=args.load_seconds, kills=args.kills,
            broker_pauses=args.broker_pauses, receiver_failures=args.receiver_failures,
            receiver_hangs=args.receiver_hangs, database_outages=args.database_outages, database=database,
            seed=args.seed, drain_timeout_s=args.drain_timeout,
        )
        print(f"== chaos run on {database} (logs in {workdir})", flush=True)
        result = asyncio.run(ChaosRun(config).run())
        problems = failures(result, config)
        result["failures"] = problems
        result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        runs[database] = result
        print(summary(result))
        print("RESULT:", "held" if not problems else "FAILED\n  " + "\n  ".join(problems), flush=True)
        failed = failed or bool(problems)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "chaos.json"
    out.write_text(json.dumps(runs, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    if not args.no_doc:
        write_doc(runs, run_command("tests.chaos", argv), note=f" (code of commit {code})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
