"""The webhook outbox worker: claims due deliveries, POSTs them signed (Standard Webhooks),
and books the outcome (delivered / retry later / parked).

Retry timing uses the injected clock. The `webhook-timestamp` header uses the wall clock
(`signing_clock`), because receivers compare it with their own clock to reject replays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import timedelta, timezone

import httpx
from sqlalchemy import Engine
from standardwebhooks import Webhook

from services.actions import metrics, service
from services.actions.service import AttemptResult, ClaimedDelivery
from shared.clock import Clock, SystemClock
from shared.db import session_scope
from shared.tasks import stop_gracefully

log = logging.getLogger(__name__)

USER_AGENT = "churnguard-webhooks/0.1"
LEASE_MARGIN_S = 30.0


def signed_headers(claimed: ClaimedDelivery, signing_clock: Clock) -> dict[str, str]:
    sent_at = signing_clock.now().astimezone(timezone.utc)
    signature = Webhook(claimed.secret).sign(claimed.delivery_id, sent_at, claimed.payload)
    return {
        "webhook-id": claimed.delivery_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


class DeliveryWorker:
    def __init__(
        self,
        engine: Engine,
        client: httpx.AsyncClient,
        clock: Clock,
        *,
        retry_schedule_s: Sequence[float],
        poll_s: float = 1.0,
        batch_size: int = 50,
        attempt_timeout_s: float = 10.0,
        signing_clock: Clock | None = None,
    ) -> None:
        self._engine = engine
        self._client = client
        self._clock = clock
        self._signing_clock = signing_clock or SystemClock()
        self._schedule = list(retry_schedule_s)
        self._poll_s = poll_s
        self._batch_size = batch_size
        self._attempt_timeout_s = attempt_timeout_s
        # A claim outlives the longest attempt, so a live worker's rows are never re-claimed.
        self._lease = timedelta(seconds=attempt_timeout_s + LEASE_MARGIN_S)
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._task = asyncio.create_task(self._run(), name="webhook-delivery")
        return self._task

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """New or replayed deliveries: look now instead of at the next poll. Thread-safe."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def stop(self) -> None:
        self._running = False
        if self._task is None:
            return
        self._wakeup.set()
        # let attempts in flight finish and be booked
        await stop_gracefully(self._task, timeout_s=self._attempt_timeout_s + 5)

    # --- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        while self._running:
            self._wakeup.clear()
            try:
                handled = await self.run_once()
                await self._refresh_gauges()
            except Exception:  # database down and the like: keep the worker alive, try again
                log.exception("webhook delivery cycle failed; retrying")
                handled = 0
            if handled >= self._batch_size:
                continue  # more may be due right now
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_s)
            except asyncio.TimeoutError:
                pass

    async def run_once(self) -> int:
        """Claim what is due, attempt each once (concurrently), book the results."""
        claimed, parked = await asyncio.to_thread(self._claim)
        if parked:
            metrics.WEBHOOK_ATTEMPTS.labels("parked").inc(parked)
        if not claimed:
            return parked
        results = await asyncio.gather(*(self._attempt(c) for c in claimed))
        outcomes = await asyncio.to_thread(self._book, list(zip(claimed, results, strict=True)))
        for outcome in outcomes:
            if outcome != "stale":
                metrics.WEBHOOK_ATTEMPTS.labels(outcome).inc()
        return len(claimed) + parked

    def _claim(self) -> tuple[list[ClaimedDelivery], int]:
        with session_scope(self._engine) as session:
            return service.claim_due_deliveries(
                session, self._clock.now(), self._batch_size, self._lease
            )

    def _book(self, attempts: list[tuple[ClaimedDelivery, AttemptResult]]) -> list[str]:
        outcomes = []
        for claimed, result in attempts:
            with session_scope(self._engine) as session:
                outcome = service.record_attempt(
                    session, claimed, result, self._clock.now(), self._schedule
                )
            outcomes.append(outcome)
            if outcome == "stale":
                log.info(
                    "delivery %s changed during its attempt; result not booked", claimed.delivery_id
                )
            elif outcome != "delivered":
                log.warning(
                    "webhook %s: %s (%s)",
                    claimed.delivery_id,
                    outcome,
                    result.error or f"HTTP {result.status_code}",
                )
        return outcomes

    async def _attempt(self, claimed: ClaimedDelivery) -> AttemptResult:
        started = time.perf_counter()
        try:
            headers = signed_headers(claimed, self._signing_clock)
            response = await self._client.post(
                claimed.url,
                content=claimed.payload.encode(),
                headers=headers,
                timeout=self._attempt_timeout_s,
            )
            return AttemptResult(status_code=response.status_code)
        except httpx.HTTPError as exc:
            return AttemptResult(error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        except Exception as exc:  # a bad stored secret or URL must not kill the worker
            log.exception("webhook %s could not be sent", claimed.delivery_id)
            return AttemptResult(error=f"{type(exc).__name__}: {exc}")
        finally:
            metrics.WEBHOOK_DELIVERY_SECONDS.observe(time.perf_counter() - started)

    async def _refresh_gauges(self) -> None:
        counts = await asyncio.to_thread(self._counts)
        metrics.OUTBOX_DEPTH.set(counts.get("pending", 0))
        metrics.PARKED_DELIVERIES.set(counts.get("parked", 0))

    def _counts(self) -> dict[str, int]:
        with session_scope(self._engine) as session:
            return service.outbox_counts(session)
