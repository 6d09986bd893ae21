"""History retention: raw events older than the tenant's period are purged by a scheduled job.

Every `retention_interval_s` one instance (the holder of the lease "retention" in
`scoring_sweep_leases`, shared.leases) deletes, tenant by tenant, the stored events (and their
flags) whose occurred_at is before now minus the tenant's period (`history_retention_days`, or
`history_retention_overrides[tenant]`). "Now" is the injected clock's. Features and scores that
were computed from purged events stay until the customer's next event or sweep recomputes them
from what is left; the model registry keeps its own validation data.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine

from services.scoring import metrics, repository
from services.scoring.config import ScoringSettings
from services.scoring.tables import ScoringSweepLease
from shared import leases
from shared.clock import Clock
from shared.db import session_scope
from shared.tasks import stop_gracefully

log = logging.getLogger(__name__)

LEASE_NAME = "retention"
_RETRY_S = 60.0


@dataclass
class RetentionOutcome:
    skipped: str | None = None  # "lease held elsewhere"
    purged: dict[str, int] = field(default_factory=dict)  # tenant -> events deleted


class HistoryPurger:
    """Background job (`start`/`stop`); tests call `run_once()` and move a ManualClock."""

    def __init__(self, settings: ScoringSettings, engine: Engine, clock: Clock, holder: str | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.holder = holder or f"{settings.client_id}-retention-{uuid.uuid4().hex[:12]}"
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> RetentionOutcome:
        now = self.clock.now()
        if not await asyncio.to_thread(self._acquire, now):
            metrics.RETENTION_ROUNDS.labels("skipped").inc()
            return RetentionOutcome(skipped="lease held elsewhere")
        outcome = RetentionOutcome()
        try:
            for tenant_id in await asyncio.to_thread(self._tenants):
                cutoff = now - timedelta(days=self.settings.retention_days(tenant_id))
                deleted = await asyncio.to_thread(self._purge, tenant_id, cutoff)
                if deleted:
                    outcome.purged[tenant_id] = deleted
                    metrics.HISTORY_PURGED.inc(deleted)
        except Exception:
            metrics.RETENTION_ROUNDS.labels("failed").inc()
            raise
        metrics.RETENTION_ROUNDS.labels("done").inc()
        if outcome.purged:
            log.info("retention: purged %d events of %d tenants", sum(outcome.purged.values()), len(outcome.purged))
        return outcome

    def _acquire(self, now: datetime) -> bool:
        expires = now + timedelta(seconds=1.5 * self.settings.retention_interval_s)
        with session_scope(self.engine) as session:
            return leases.acquire_lease(session, ScoringSweepLease, LEASE_NAME, self.holder, now, expires)

    def _tenants(self) -> list[str]:
        with session_scope(self.engine) as session:
            return repository.history_tenants(session)

    def _purge(self, tenant_id: str, cutoff: datetime) -> int:
        with session_scope(self.engine) as session:
            return repository.purge_history(session, tenant_id, cutoff)

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="scoring:retention")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await stop_gracefully(self._task, timeout_s=10)
            self._task = None
            try:
                await asyncio.to_thread(self._release)
            except Exception:
                log.warning("retention: could not release the lease; it expires on its own", exc_info=True)

    def _release(self) -> None:
        with session_scope(self.engine) as session:
            leases.release_lease(session, ScoringSweepLease, LEASE_NAME, self.holder, self.clock.now())

    async def _run(self) -> None:
        delay = self.settings.retention_interval_s
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                return
            except TimeoutError:
                pass
            try:
                await self.run_once()
                delay = self.settings.retention_interval_s
            except Exception:
                log.exception("retention round failed; retrying soon")
                delay = min(self.settings.retention_interval_s, _RETRY_S)
