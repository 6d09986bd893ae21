"""The raw reference for latencies through the broker: one hop, producer -> broker -> consumer,
on the same broker in the same run as the figure it stands beside.

The embedded broker (Tansu, memory storage) gets slower as a topic grows: a bare hop at
1,000 msg/s on a new topic read p50 3 / p99 12 ms in its first 5 s and p50 62 / p99 302 ms
after 30 s, the broker then using a whole core (2026-12-07, docs/benchmarks.md). So a hop is
only a fair reference on a topic as long as the one it is compared with, and a latency run
only measures our code on topics that earlier runs have not filled.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.ingest import percentile
from shared.kafka import Publisher, ensure_topics
from shared.settings import KafkaSettings

RAW_TOPIC = "bench-raw-hop"


def latencies_ms(scheduled: dict[str, float], arrived: dict[str, float]) -> dict[str, Any]:
    values = sorted((arrived[key] - sent) * 1000 for key, sent in scheduled.items() if key in arrived)
    if not values:
        return {"count": 0}
    return {"count": len(values), "p50": round(percentile(values, 50), 1), "p95": round(percentile(values, 95), 1),
            "p99": round(percentile(values, 99), 1), "max": round(values[-1], 1)}


async def raw_broker_hop(kafka: KafkaSettings, rate: float, seconds: float, warmup_s: float = 0.0) -> dict[str, Any]:
    """One hop through the broker (a producer with the services' settings -> a consumer assigned
    to the topic, fetching as the services do), open loop at `rate` for `warmup_s` + `seconds`,
    timed from the scheduled send to the arrival; what was sent during the warm-up is not
    counted (as in a latency run that warms up first). An event crosses the broker twice before
    its score is published and three times before its decision is."""
    await ensure_topics(kafka, [RAW_TOPIC])
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=10)
    await consumer.start()
    publisher = Publisher(kafka, "bench-raw-hop")
    arrivals: dict[str, float] = {}
    try:
        partitions = [TopicPartition(kafka.topic(RAW_TOPIC), p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)

        async def receive() -> None:
            while True:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    now = time.monotonic()
                    for record in records:
                        arrivals.setdefault(record.key.decode(), now)

        receiving = asyncio.create_task(receive())
        scheduled: dict[str, float] = {}
        pending: set[asyncio.Task[None]] = set()
        body = b"x" * 400  # about an EventRecord's size
        start, n = time.monotonic(), 0
        counted_from = start + warmup_s
        while (due := start + n / rate) < counted_from + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            key = f"raw-{n}"
            if due >= counted_from:
                scheduled[key] = due
            task = asyncio.create_task(publisher.publish(RAW_TOPIC, key.encode(), body))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
        await asyncio.gather(*pending)
        deadline = time.monotonic() + 10
        while not scheduled.keys() <= arrivals.keys() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        receiving.cancel()
        return latencies_ms(scheduled, arrivals)
    finally:
        await publisher.close()
        await consumer.stop()
