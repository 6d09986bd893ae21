"""Small test helpers: polling with a deadline (never fixed sleeps) and reading a real topic."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shared.broker import free_port
from shared.settings import KafkaSettings

INTERNAL_TOKEN = "test-internal-token"


def internal_headers(tenant: str, token: str = INTERNAL_TOKEN) -> dict[str, str]:
    return {"X-Churnguard-Internal-Token": token, "X-Churnguard-Tenant": tenant}


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition", interval_s: float = 0.05
) -> Any:
    """Poll (no fixed sleeps) until predicate() is truthy; returns its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s}s")
        time.sleep(interval_s)


async def async_wait_until(
    predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition", interval_s: float = 0.02
) -> Any:
    """wait_until for tests running on the event loop: polls without blocking it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


async def read_topic(
    settings: KafkaSettings,
    topic: str,
    count: int = 1,
    timeout_s: float = 15.0,
    until: Callable[[list[ConsumerRecord]], bool] | None = None,
) -> list[ConsumerRecord]:
    """Read a (base) topic from the beginning until `count` records (or `until(records)`) are
    in, assigning its partitions directly (no consumer group, so no JoinGroup wait on the
    embedded broker). `until` raises if it is not met in time; `count` returns what arrived."""
    done = until or (lambda records: len(records) >= count)
    name = settings.topic(topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=None,
        enable_auto_commit=False, fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(name, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not done(records):
            if asyncio.get_running_loop().time() > deadline:
                if until is None:
                    break
                raise AssertionError(f"expected records on {topic} did not arrive; got {len(records)}")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> from a daemon thread."""

    def __init__(self, app: Any, lifespan: str = "on") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan=lifespan,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name=f"server:{self.port}", daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def answers(url: str, process: Any) -> bool:
    """Whether a started service process answers `url` with 200 yet; fails at once if it died."""
    import httpx

    if process.poll() is not None:
        raise AssertionError(f"{url}: process exited with {process.returncode}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_processes(processes: Any, timeout_s: float = 20) -> None:
    """SIGTERM every process, then wait for each (killing one that does not stop in time)."""
    import subprocess

    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
