"""The contract-end sweep: renewal playbooks fire N days before a contract ends, without a score.

Every `contract_sweep_interval_s` one instance (the holder of the row lease "contract-end" in
`actions_sweep_leases`, via shared.leases) pages through active contracts (no cancellation
notice, not ended) that end within the largest `days_before_end` of any policy document. For
each, the step due is the smallest configured offset not yet passed (days left <= offset); its
trigger id is derived from tenant + contract + end date + step, so every step fires once per
contract and end date (a renewal moves the end date and the playbook starts again). A step
missed while nothing swept (or a contract learned late) is not fired after a later step is due.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import select

from services.actions import metrics, repository, service, uplift
from services.actions.consumer import count_decisions, publish_decisions
from services.actions.policies import PolicyDocument
from services.actions.service import DecisionResult, Rules, TriggerInput
from services.actions.tables import ActionsContract, ActionsPolicyDocument, ActionsSweepLease
from shared import leases
from shared.clock import Clock
from shared.db import session_scope
from shared.kafka import Publisher

log = logging.getLogger(__name__)

LEASE_NAME = "contract-end"


def due_step(days_left: int, offsets: set[int]) -> int | None:
    """The playbook step due `days_left` days before the end: the smallest offset reached."""
    reached = [offset for offset in offsets if days_left <= offset]
    return min(reached) if reached else None


def contract_end_trigger(contract: ActionsContract, step: int) -> TriggerInput:
    return TriggerInput(
        "contract_end",
        contract.tenant_id,
        contract.customer_id,
        service.trigger_id(
            "contract_end", contract.tenant_id, contract.contract_id, contract.end_date, step
        ),
        contract=contract,
        contract_offset=step,
    )


@dataclass
class ContractSweepOutcome:
    skipped: str | None = None
    contracts: int = 0
    decisions: list[DecisionResult] = field(default_factory=list)


class ContractSweeper(leases.LeasedRounds):
    """Background rounds (`start`/`stop`); tests call `run_once()` and move a ManualClock."""

    name = "actions:contract-sweep"

    def __init__(
        self,
        *,
        engine: Engine,
        publisher: Publisher,
        rules: Rules,
        clock: Clock,
        interval_s: float,
        batch: int,
        on_deliveries: Callable[[], None],
        holder: str | None = None,
        uplift_horizon: timedelta = timedelta(days=90),
    ) -> None:
        super().__init__(interval_s)
        self.engine = engine
        self.publisher = publisher
        self.rules = rules
        self.clock = clock
        self.batch = batch
        self.on_deliveries = on_deliveries
        self.holder = holder or f"actions-{uuid.uuid4().hex[:12]}"
        self.uplift_horizon = uplift_horizon

    async def run_once(self) -> ContractSweepOutcome:
        now = self.clock.now()
        if not await asyncio.to_thread(self._acquire, now):
            metrics.CONTRACT_SWEEP_ROUNDS.labels("skipped").inc()
            return ContractSweepOutcome(skipped="lease held elsewhere")
        outcome = ContractSweepOutcome()
        try:
            documents = await asyncio.to_thread(self._documents)
            in_use = [self.rules.default_document, *documents.values()]
            horizon = max(max(d.contract_end_offsets(), default=-1) for d in in_use)
            today = now.date()
            after: tuple[str, str] | None = None
            while horizon >= 0 and not self.stopping:  # < 0: no policy listens to contract ends
                page, results = await asyncio.to_thread(
                    self._page, today, today + timedelta(days=horizon), after, documents, now
                )
                outcome.contracts += len(page)
                outcome.decisions.extend(results)
                await publish_decisions(self.publisher, results, self.on_deliveries)
                if len(page) < self.batch:
                    break
                after = page[-1]
            # The lease holder also refreshes the fleet's uplift figures (one instance, hourly).
            metrics.set_uplift(await asyncio.to_thread(self._uplift_totals, now))
        except Exception:
            metrics.CONTRACT_SWEEP_ROUNDS.labels("failed").inc()
            raise
        metrics.CONTRACT_SWEEP_ROUNDS.labels("done").inc()
        return outcome

    def _uplift_totals(self, now: datetime) -> dict[tuple[str, str], tuple[int, int]]:
        with session_scope(self.engine) as session:
            return uplift.fleet_totals(session, now, self.uplift_horizon)

    def _acquire(self, now: datetime) -> bool:
        expires = now + timedelta(seconds=1.5 * self.interval_s)
        with session_scope(self.engine) as session:
            return leases.acquire_lease(
                session, ActionsSweepLease, LEASE_NAME, self.holder, now, expires
            )

    def release_lease(self) -> None:
        with session_scope(self.engine) as session:
            leases.release_lease(
                session, ActionsSweepLease, LEASE_NAME, self.holder, self.clock.now()
            )

    def _documents(self) -> dict[str, PolicyDocument]:
        with session_scope(self.engine) as session:
            rows = session.exec(select(ActionsPolicyDocument)).all()
            return {row.tenant_id: PolicyDocument.model_validate(row.document) for row in rows}

    def _page(
        self,
        first: date,
        last: date,
        after: tuple[str, str] | None,
        documents: dict[str, PolicyDocument],
        now: datetime,
    ) -> tuple[list[tuple[str, str]], list[DecisionResult]]:
        with session_scope(self.engine) as session:
            contracts = list(
                repository.contracts_ending_between(session, first, last, after, self.batch)
            )
        results: list[DecisionResult] = []
        for contract in contracts:
            assert contract.end_date is not None
            document = documents.get(contract.tenant_id, self.rules.default_document)
            step = due_step((contract.end_date - first).days, document.contract_end_offsets())
            if step is None:
                continue
            with session_scope(self.engine) as session:
                trigger = contract_end_trigger(contract, step)
                result = service.decide(session, trigger, self.rules, now)
            if result.created:
                results.append(result)
        count_decisions(results)
        return [(c.tenant_id, c.contract_id) for c in contracts], results

