"""Small test helpers: polling with a deadline (never fixed sleeps) and reading a real topic."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from shared.settings import KafkaSettings

INTERNAL_TOKEN = "test-internal-token"


def internal_headers(tenant: str, token: str = INTERNAL_TOKEN) -> dict[str, str]:
    return {"X-Churnguard-Internal-Token": token, "X-Churnguard-Tenant": tenant}


def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


async def read_topic(settings: KafkaSettings, topic: str, count: int, timeout_s: float = 15.0) -> list[ConsumerRecord]:
    """Read `count` records from the start of a (base) topic with a throwaway group."""
    consumer = AIOKafkaConsumer(
        settings.topic(topic),
        bootstrap_servers=settings.bootstrap_servers,
        group_id=f"reader-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
        session_timeout_ms=6000,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(records) < count and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records
