"""The accountant's reactions to events: reserve on a request, settle on a node result,
time out stale reservations, a batch of events at a time. Database work runs in a thread; the
messages a ledger transition implies (decision, terminal result, audit, budget status) are
written to the outbox in the same transaction and sent by its relay, so a crash after the
commit loses nothing and a replayed event (a no-op on the ledger) sends nothing new."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Counter
from sqlalchemy.orm import Session

from fedllm.common import audit, outbox, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, now_ms
from fedllm.common.metrics import record_hospital_spend
from fedllm.common.outbox import Message
from fedllm.common.results import PART, result_kind
from fedllm.privacy.accountant import PrivacyCurve, window_start
from fedllm.schemas.records import (
    AuditEvent,
    BudgetAdjustment,
    InferenceRequest,
    InferenceResult,
)
from fedllm.services.accountant import decide, messages, partials
from fedllm.services.accountant.admission import Admission
from fedllm.services.accountant.ledger import Balance, Ledger, Outcome, Settlement, Then
from fedllm.services.accountant.tables import BudgetEntry, entry_row

log = logging.getLogger(__name__)
Headers = Sequence[tuple[str, bytes]]
SERVICE = "accountant"
OVERSPEND = Counter(
    "fedllm_accountant_overspend_total",
    "Node results that reported more privacy spend than was reserved",
    ["node"],
)


class Accountant:
    """Budget reservation and settlement over a durable ledger, a batch of events at a time:
    one ledger transaction per batch, which also writes the batch's messages to the outbox;
    the relay sends them after the batch (and every 0.5 s from the app's timer)."""

    def __init__(self, settings: Settings, ledger: Ledger, bus: Bus) -> None:
        self.settings = settings
        self.ledger = ledger
        self.bus = bus
        self.admission = Admission(settings, ledger, bus)
        outbox.create_table(ledger.engine)
        partials.create_table(ledger.engine)
        self.relay = outbox.Relay(ledger.engine, bus.producer, namespace=bus.namespace)
        self._sweeps = 0

    async def relay_outbox(self) -> int:
        """Send what the outbox holds; a broker error is logged and retried by the next call."""
        try:
            return await self.relay.flush()
        except Exception as exc:
            log.warning("outbox relay: %s (will retry)", exc)
            return 0

    async def on_request(self, request: InferenceRequest, headers: Headers | None = None) -> None:
        await self.on_requests([(request, headers)])

    async def on_requests(self, requests: list[tuple[InferenceRequest, Headers | None]]) -> None:
        """Admit a batch by credential (a refusal spends nothing and ends there: its terminal
        result goes to the outbox), reserve the admitted ones in one transaction that also
        records their decisions in the outbox, and relay them."""
        admitted = await self.admission.admit_many(requests)
        if not admitted:
            await self.relay_outbox()  # the refusals' terminal results
            return
        by_id: dict[str, InferenceRequest] = {}
        for request in admitted:
            by_id.setdefault(request["request_id"], request)
        await asyncio.to_thread(
            self.ledger.reserve_many,
            admitted,
            then=_recorder(lambda o: self._reserve_messages(by_id[o.request_id], o)),
        )
        await self.relay_outbox()

    def _reserve_messages(self, request: InferenceRequest, outcome: Outcome) -> list[Message]:
        rid = request["request_id"]
        common = {
            "request_id": rid,
            "user_id": request["user_id"],
            "role": request["role"],
            "department": request["department"],
            "source_address": request["source_address"],
            "delta": outcome.entry["delta"],
        }
        entry = outcome.entry
        reserved_rho = (
            self.ledger.accountant.query_rho(epsilon=entry["epsilon"], delta=entry["delta"])
            if outcome.state != "rejected"
            else 0.0
        )
        out = [
            Message.encode(
                topics.DECISIONS,
                "BudgetDecision",
                messages.decision(request, outcome, reserved_rho=reserved_rho),
                key=rid,
            )
        ]
        if outcome.state == "reserved":
            out.append(
                _audit(
                    action="budget.reserved",
                    id_parts=(rid,),
                    outcome="approved",
                    epsilon=request["epsilon"],
                    rdp_summary=messages.rdp_summary(
                        outcome.entry["reserved_rdp"], request["epsilon"]
                    ),
                    **common,
                )
            )
        else:  # rejected
            out.append(
                Message.encode(
                    topics.RESULTS,
                    "InferenceResult",
                    messages.final_result(outcome, status="rejected"),
                    key=rid,
                )
            )
            out.append(
                _audit(
                    action="budget.refused",
                    id_parts=(rid,),
                    outcome="rejected",
                    reason=outcome.reason,
                    epsilon=request["epsilon"],
                    **common,
                )
            )
            out.append(
                _audit(
                    action="request.rejected",
                    id_parts=(rid,),
                    outcome="rejected",
                    reason=outcome.reason,
                    **common,
                )
            )
        return out + self._budget_messages(outcome)

    async def fail_request(self, request: InferenceRequest, reason: str) -> None:
        """Terminal outcome of a request event that could not be handled (dead-lettered):
        nothing reserved, a failed result and its audit record, unless it already has an
        entry (then the ledger's outcome and its outbox messages stand)."""

        def tx() -> None:
            with Session(self.ledger.engine, autobegin=False) as s, s.begin():
                if s.get(BudgetEntry, request["request_id"]) is not None:
                    return
                row = BudgetEntry(
                    request_id=request["request_id"],
                    user_id=request["user_id"],
                    department=request["department"],
                    window_start=0,
                    state="rejected",
                    epsilon=request["epsilon"],
                    delta=self.settings.budget.delta,
                    reserved_rdp={},
                    spent_rdp=None,
                    spent_epsilon=0.0,
                    deadline_ms=request["deadline_ms"],
                    created_at_ms=now_ms(),
                    settled_at_ms=now_ms(),
                    outcome="failed",
                    reason=reason[:1000],
                    node_id="",
                    reserved_units=0,
                    charged_units=0,
                    user_epoch=0,
                    dept_epoch=0,
                )
                s.add(row)
                s.flush()
                zero = Balance(limit=0.0, spent=0.0, remaining=0.0)
                outcome = Outcome(
                    row.request_id,
                    True,
                    "rejected",
                    row.reason,
                    zero,
                    zero,
                    entry_row(row),
                )
                rid = row.request_id
                common = {
                    "request_id": rid,
                    "user_id": request["user_id"],
                    "role": request["role"],
                    "department": request["department"],
                    "source_address": request["source_address"],
                    "delta": row.delta,
                }
                outbox.add(
                    s,
                    [
                        Message.encode(
                            topics.DECISIONS,
                            "BudgetDecision",
                            dict(
                                messages.decision(request, outcome),
                                approved=False,
                                reserved_epsilon=0.0,
                            ),
                            key=rid,
                        ),
                        Message.encode(
                            topics.RESULTS,
                            "InferenceResult",
                            messages.final_result(outcome, status="failed"),
                            key=rid,
                        ),
                        _audit(
                            action="request.failed",
                            id_parts=(rid,),
                            outcome="failed",
                            reason=row.reason,
                            epsilon=0.0,
                            **common,
                        ),
                    ],
                )

        await asyncio.to_thread(tx)
        await self.relay_outbox()

    async def on_node_result(self, result: InferenceResult) -> None:
        await self.on_node_results([result])

    async def on_node_results(self, results: list[InferenceResult]) -> None:
        """Settle a batch of node results in one transaction that also records the terminal
        results in the outbox, and relay them."""
        todo: list[tuple[InferenceResult, Settlement]] = []
        for result in results:
            x = await self._settlement(result)
            if x is not None:
                todo.append((result, x))
        await self._settle(todo)

    async def fail_node_result(self, result: InferenceResult, reason: str) -> None:
        """Terminal outcome of a node result that could not be handled (dead-lettered): the
        request fails; a release the result reports is still charged, anything else refunded."""
        try:
            spent, _, _ = self._charge_for(result)
        except Exception:
            spent = None
        if not decide.ends_request(result, spent):
            return  # not terminal: the router or the sweep ends the request
        await self._settle(
            [
                (
                    result,
                    Settlement(
                        result["request_id"], spent, "failed", reason, result.get("node_id", "")
                    ),
                )
            ]
        )

    async def _settlement(self, result: InferenceResult) -> Settlement | None:
        """What `result` settles, or None when it ends nothing (yet)."""
        rid = result["request_id"]
        if result_kind(result) == PART:
            # One hospital's part of a fan-out (released, or failed after its mechanism
            # started): the router combines the parts or fails the fan-out with their spend.
            # Kept so that, should the router die first, the sweep still charges the spend.
            curve = self._reported_curve(result) if result.get("node_id") else None
            if curve is not None:
                await asyncio.to_thread(partials.record, self.ledger.engine, result, curve)
            return None
        spent, status, reason = self._charge_for(result)
        if result["status"] != "ok" and result.get("rdp_orders") and spent is None:
            # A spend on orders the ledger does not know: a mechanism started all the same,
            # so the whole reservation is charged (the router does not retry it either).
            entry = await asyncio.to_thread(self.ledger.entry, rid)
            if entry is None:
                return None
            spent = PrivacyCurve.from_dict(entry["reserved_rdp"])
            reason = f"{reason}; spend reported on unknown orders: the reservation is charged"
        if not decide.ends_request(result, spent):
            # A node's own failure before any mechanism ran does not end the request: the
            # router retries it elsewhere and reports the final failure itself (a verdict);
            # the deadline sweep backs it up. One that reports a spent curve is charged now.
            log.info(
                "node %s failed attempt %s of %s; awaiting the router's verdict",
                result["node_id"],
                result.get("attempt"),
                rid,
            )
            return None
        return Settlement(rid, spent, status, reason, result.get("node_id", ""))

    async def _settle(self, todo: list[tuple[InferenceResult, Settlement]]) -> None:
        if not todo:
            return
        by_id: dict[str, tuple[InferenceResult, Settlement]] = {}
        for item in todo:
            by_id.setdefault(item[1].request_id, item)

        def build(o: Outcome) -> list[Message]:
            result, x = by_id[o.request_id]
            return self._overspend_messages(o) + self._finish_messages(
                o, result if x.outcome == "ok" else None, status=x.outcome
            )

        outcomes = await asyncio.to_thread(
            self.ledger.settle_many, [x for _, x in todo], then=_recorder(build)
        )
        for (result, x), outcome in zip(todo, outcomes, strict=True):
            if outcome is None:
                log.warning("node result for unknown request %s ignored", x.request_id)
                continue
            if outcome.changed:
                record_hospital_spend(outcome.entry["node_id"], outcome.entry["spent_epsilon"])
                if outcome.excess_rho > 0:
                    OVERSPEND.labels(x.node_id or "router").inc()
                    log.warning(
                        "request %s: %s reported rho %.6g above its reservation; "
                        "charged the report",
                        x.request_id,
                        x.node_id or "router",
                        outcome.excess_rho,
                    )
            elif outcome.entry["outcome"] == "timeout" and result["status"] == "ok":
                # The deadline rule (docs/reliability.md): the sweep ended this request first
                # (refunded, "timeout"); a later answer is refused: not charged, not delivered.
                await audit.emit(
                    self.bus,
                    action="result.refused_late",
                    service=SERVICE,
                    id_parts=(x.request_id, x.node_id),
                    request_id=x.request_id,
                    user_id=result["user_id"],
                    department=result["department"],
                    hospital_id=x.node_id,
                    outcome="refused",
                    reason="answer arrived after the request timed out",
                    epsilon=0.0,
                )
        await self.relay_outbox()

    def _overspend_messages(self, outcome: Outcome) -> list[Message]:
        """A node reported more than it reserved: it was charged, and this is the alert."""
        if outcome.excess_rho <= 0:
            return []
        entry = outcome.entry
        reserved_rho = self.ledger.filter.rho(entry["reserved_units"])
        return [
            _audit(
                action="budget.overspent",
                id_parts=(entry["request_id"],),
                request_id=entry["request_id"],
                user_id=entry["user_id"],
                department=entry["department"],
                hospital_id=entry["node_id"],
                outcome="alert",
                epsilon=entry["spent_epsilon"],
                delta=entry["delta"],
                reason=f"reported spend exceeds the reservation by rho {outcome.excess_rho:.6g} "
                f"(reserved rho {reserved_rho:.6g}); the larger was charged",
            )
        ]

    async def on_adjustment(self, adjustment: BudgetAdjustment) -> None:
        """Apply an admin's budget reset; audited with the admin as the actor. An applied
        reset's audit record goes into the outbox in the reset's own transaction; a replay or
        a refusal changes no ledger row and is audited directly (redelivery re-sends it)."""
        applied = _audit_message(_adjustment_audit(adjustment, "applied", ""))
        try:
            changed = await asyncio.to_thread(
                self.ledger.reset, adjustment, then=lambda s: outbox.add(s, [applied])
            )
        except (KeyError, ValueError) as exc:
            await self._audit_adjustment(
                adjustment, outcome="rejected", reason=f"invalid adjustment: {exc}"
            )
            return
        if changed:
            await self.relay_outbox()
        else:
            await self._audit_adjustment(adjustment, outcome="replayed", reason="")
        if adjustment["scope"] == "user":  # a replay re-publishes a status a crash lost
            await self._publish_user_budget(adjustment["subject"])

    async def fail_adjustment(self, adjustment: BudgetAdjustment, reason: str) -> None:
        """Terminal outcome of an admin reset that could not be applied (dead-lettered)."""
        await self._audit_adjustment(adjustment, outcome="failed", reason=reason)

    async def _audit_adjustment(
        self, adjustment: BudgetAdjustment, *, outcome: str, reason: str
    ) -> None:
        record = _adjustment_audit(adjustment, outcome, reason)
        await self.bus.send(
            topics.AUDIT, "AuditEvent", record, key=record.get("request_id") or SERVICE
        )

    async def _publish_user_budget(self, user_id: str) -> None:
        department = await asyncio.to_thread(self.ledger.last_department, user_id)
        if department is None:
            return
        user, dept = await asyncio.to_thread(self.ledger.balances, user_id, department)
        budget = self.settings.budget
        await self.bus.send(
            topics.BUDGETS,
            "BudgetStatus",
            messages.budget_status(
                user_id=user_id,
                department=department,
                window_start=window_start(
                    now_s=now_ms() / 1000, window_seconds=budget.window_seconds
                ),
                window_seconds=budget.window_seconds,
                delta=budget.delta,
                user=user,
                dept=dept,
            ),
            key=user_id,
        )

    async def sweep_expired(self, *, grace_ms: int = 2_000) -> int:
        """Time out reservations whose request deadline has passed: refunded, or charged for
        the fan-out parts the nodes released (`partials`). One transaction with the messages
        (outbox); an error is logged and the next sweep retries, so it never stops the app."""
        self._sweeps += 1
        try:
            if self._sweeps % 600 == 1:  # now and then: forget messages acked a day ago
                await asyncio.to_thread(
                    outbox.purge_sent, self.ledger.engine, before_ms=now_ms() - 86_400_000
                )
            ids = await asyncio.to_thread(self.ledger.expired, now_ms=now_ms(), grace_ms=grace_ms)
            if not ids:
                return 0
            todo = []
            for rid in ids:
                released = await asyncio.to_thread(
                    partials.spent, self.ledger.engine, rid, self.ledger.accountant
                )
                todo.append(
                    Settlement(
                        rid,
                        released,
                        "timeout",
                        "request deadline passed without an answer"
                        + (
                            "; the released fan-out parts are charged"
                            if released is not None
                            else ""
                        ),
                    )
                )
            await asyncio.to_thread(
                self.ledger.settle_many,
                todo,
                then=_recorder(lambda o: self._finish_messages(o, None, status="timeout")),
            )
        except Exception as exc:
            log.warning("expiry sweep failed (next sweep retries): %s", exc)
            return 0
        await self.relay_outbox()
        return len(ids)

    def _charge_for(self, result: InferenceResult) -> tuple[PrivacyCurve | None, str, str]:
        return decide.charge_for(result, orders=self.ledger.accountant.orders)

    def _reported_curve(self, result: InferenceResult) -> PrivacyCurve | None:
        return decide.reported_curve(result, orders=self.ledger.accountant.orders)

    def _finish_messages(
        self, outcome: Outcome, node_result: InferenceResult | None, *, status: str
    ) -> list[Message]:
        """The terminal result, its audit events and the budget snapshot."""
        entry = outcome.entry
        rid = entry["request_id"]
        out = [
            Message.encode(
                topics.RESULTS,
                "InferenceResult",
                messages.final_result(outcome, node_result, status=status),
                key=rid,
            )
        ]
        common = {
            "request_id": rid,
            "user_id": entry["user_id"],
            "department": entry["department"],
            "hospital_id": entry["node_id"],
            "delta": entry["delta"],
        }
        if entry["state"] == "committed":
            reserved = self.ledger.filter.epsilon(entry["reserved_units"])  # O(1), cached
            out.append(
                _audit(
                    action="budget.committed",
                    id_parts=(rid,),
                    outcome="committed",
                    epsilon=entry["spent_epsilon"],
                    rdp_summary=messages.rdp_summary(entry["spent_rdp"], entry["spent_epsilon"]),
                    refunded_epsilon=round(max(reserved - entry["spent_epsilon"], 0.0), 6),
                    records_used=int(node_result.get("records_used", 0) if node_result else 0),
                    **common,
                )
            )
        else:
            out.append(
                _audit(
                    action="budget.refunded",
                    id_parts=(rid,),
                    outcome="refunded",
                    reason=outcome.reason,
                    epsilon=0.0,
                    **common,
                )
            )
        out.append(
            _audit(
                action=messages.TERMINAL_ACTION[status],
                id_parts=(rid,),
                outcome=status,
                reason=outcome.reason,
                epsilon=entry["spent_epsilon"],
                **common,
            )
        )
        return out + self._budget_messages(outcome)

    def _budget_messages(self, outcome: Outcome) -> list[Message]:
        if outcome.user.limit <= 0:
            return []
        entry = outcome.entry
        return [
            Message.encode(
                topics.BUDGETS,
                "BudgetStatus",
                messages.budget_status(
                    user_id=entry["user_id"],
                    department=entry["department"],
                    window_start=entry["window_start"],
                    window_seconds=self.settings.budget.window_seconds,
                    delta=entry["delta"],
                    user=outcome.user,
                    dept=outcome.department,
                ),
                key=entry["user_id"],
            )
        ]


def _recorder(build: Callable[[Outcome], list[Message]]) -> Then:
    """A ledger `then` hook writing `build(outcome)` into the outbox, in its transaction."""

    def record(s: Session, outcome: Outcome) -> None:
        outbox.add(s, build(outcome))

    return record


def _adjustment_audit(adjustment: BudgetAdjustment, outcome: str, reason: str) -> AuditEvent:
    """An adjustment's `budget.reset` audit record (the admin is the actor)."""
    return audit.audit_event(
        service=SERVICE,
        action="budget.reset",
        id_parts=(adjustment["adjustment_id"],),
        user_id=adjustment["actor_user_id"],
        role=adjustment["actor_role"],
        source_address=adjustment["source_address"],
        department=adjustment["subject"] if adjustment["scope"] == "department" else "",
        outcome=outcome,
        reason=reason or adjustment["reason"],
        scope=adjustment["scope"],
        subject=adjustment["subject"],
    )


def _audit(**kw: Any) -> Message:
    """An accountant AuditEvent as an outbox message."""
    return _audit_message(audit.audit_event(service=SERVICE, **kw))


def _audit_message(record: AuditEvent) -> Message:
    return Message.encode(
        topics.AUDIT, "AuditEvent", record, key=record.get("request_id") or SERVICE
    )
