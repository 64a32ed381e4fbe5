"""The accountant's reactions to events: reserve on a request, settle on a node result,
time out stale reservations. Database work runs in a thread; outputs go out after the
database commit, so a crash in between only causes a replay, which the ledger absorbs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

from prometheus_client import Counter

from fedllm.common import audit, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, now_ms
from fedllm.common.metrics import record_hospital_spend
from fedllm.privacy.accountant import PrivacyCurve, window_start
from services.accountant import messages
from services.accountant.admission import Admission
from services.accountant.ledger import Ledger, Outcome, Settlement

log = logging.getLogger(__name__)
Headers = Sequence[tuple[str, bytes]]
SERVICE = "accountant"
OVERSPEND = Counter("fedllm_accountant_overspend_total",
                    "Node results that reported more privacy spend than was reserved", ["node"])


class Accountant:
    """Budget reservation and settlement over a durable ledger, a batch of events at a time:
    one ledger transaction per batch, then every output of the batch sent concurrently."""

    def __init__(self, settings: Settings, ledger: Ledger, bus: Bus) -> None:
        self.settings = settings
        self.ledger = ledger
        self.bus = bus
        self.admission = Admission(settings, ledger, bus)

    async def on_request(self, request: dict[str, Any],
                         headers: Headers | None = None) -> None:
        await self.on_requests([(request, headers)])

    async def on_requests(self, requests: list[tuple[dict[str, Any], Headers | None]]) -> None:
        """Admit a batch by credential (a refusal spends nothing), reserve the admitted ones in
        one transaction, and emit their decisions."""
        admitted = [r for r, headers in requests if await self.admission.admit(r, headers)]
        if not admitted:
            return
        outcomes = await asyncio.to_thread(self.ledger.reserve_many, admitted)
        sends: list[Awaitable[None]] = []
        latest: dict[str, Outcome] = {}
        for request, outcome in zip(admitted, outcomes, strict=True):
            if outcome.state in ("reserved", "rejected"):  # else a replay of a settled one
                sends += self._request_outputs(request, outcome)
                latest[request["user_id"]] = outcome
        sends += [self._publish_budget(o) for o in latest.values()]
        await asyncio.gather(*sends)

    def _request_outputs(self, request: dict[str, Any], outcome: Outcome
                         ) -> list[Awaitable[None]]:
        rid = request["request_id"]
        common = {
            "request_id": rid, "user_id": request["user_id"], "role": request["role"],
            "department": request["department"], "source_address": request["source_address"],
            "delta": outcome.entry["delta"],
        }
        if outcome.state == "reserved":
            return [
                self.bus.send(topics.DECISIONS, "BudgetDecision",
                              messages.decision(request, outcome), key=rid),
                audit.emit(
                    self.bus, action="budget.reserved", service=SERVICE, id_parts=(rid,),
                    outcome="approved", epsilon=request["epsilon"],
                    rdp_summary=messages.rdp_summary(outcome.entry["reserved_rdp"],
                                                     request["epsilon"]),
                    **common,
                ),
            ]
        return [  # rejected
            self.bus.send(topics.DECISIONS, "BudgetDecision",
                          messages.decision(request, outcome), key=rid),
            self.bus.send(topics.RESULTS, "InferenceResult",
                          messages.final_result(outcome, status="rejected"), key=rid),
            audit.emit(self.bus, action="budget.refused", service=SERVICE, id_parts=(rid,),
                       outcome="rejected", reason=outcome.reason,
                       epsilon=request["epsilon"], **common),
            audit.emit(self.bus, action="request.rejected", service=SERVICE,
                       id_parts=(rid,), outcome="rejected", reason=outcome.reason,
                       **common),
        ]

    async def on_node_result(self, result: dict[str, Any]) -> None:
        await self.on_node_results([result])

    async def on_node_results(self, results: list[dict[str, Any]]) -> None:
        """Settle a batch of node results (one transaction) and emit the terminal results."""
        todo: list[tuple[dict[str, Any], Settlement]] = []
        for result in results:
            rid = result["request_id"]
            if result["status"] == "partial":
                continue  # one hospital's part of a fan-out: the router combines the parts
            if result["status"] != "ok" and result.get("node_id"):
                # A node's own failure does not end the request: the router retries it
                # elsewhere and reports the final failure itself (node_id ""); the deadline
                # sweep backs it up.
                log.info("node %s failed attempt %s of %s; awaiting the router's verdict",
                         result["node_id"], result.get("attempt"), rid)
                continue
            spent, status, reason = self._charge_for(result)
            todo.append((result, Settlement(rid, spent, status, reason,
                                            result.get("node_id", ""))))
        if not todo:
            return
        outcomes = await asyncio.to_thread(self.ledger.settle_many, [x for _, x in todo])
        sends: list[Awaitable[None]] = []
        for (result, x), outcome in zip(todo, outcomes, strict=True):
            if outcome is None:
                log.warning("node result for unknown request %s ignored", x.request_id)
                continue
            if outcome.changed and outcome.excess_rho > 0:
                sends.append(self._overspend_alert(outcome))
            replay = (not outcome.changed and outcome.entry["outcome"] == x.outcome
                      and outcome.entry["node_id"] == x.node_id)
            if outcome.changed:
                record_hospital_spend(outcome.entry["node_id"], outcome.entry["spent_epsilon"])
            if outcome.changed or replay:
                sends += self._finish(outcome, result if x.outcome == "ok" else None,
                                      status=x.outcome)
        await asyncio.gather(*sends)

    async def _overspend_alert(self, outcome: Outcome) -> None:
        """A node reported more than it reserved: it was charged, and this is the alert."""
        entry = outcome.entry
        reserved_rho = self.ledger.filter.rho(entry["reserved_units"])
        OVERSPEND.labels(entry["node_id"] or "router").inc()
        log.warning("request %s: %s reported rho %.6g above its reservation rho %.6g; charged "
                    "the report", entry["request_id"], entry["node_id"] or "router",
                    outcome.excess_rho, reserved_rho)
        await audit.emit(
            self.bus, action="budget.overspent", service=SERVICE,
            id_parts=(entry["request_id"],), request_id=entry["request_id"],
            user_id=entry["user_id"], department=entry["department"],
            hospital_id=entry["node_id"], outcome="alert", epsilon=entry["spent_epsilon"],
            delta=entry["delta"],
            reason=f"reported spend exceeds the reservation by rho {outcome.excess_rho:.6g} "
                   f"(reserved rho {reserved_rho:.6g}); the larger was charged",
        )

    async def on_adjustment(self, adjustment: dict[str, Any]) -> None:
        """Apply an admin's budget reset; audited with the admin as the actor."""
        try:
            changed = await asyncio.to_thread(self.ledger.reset, adjustment)
            outcome, reason = ("applied" if changed else "replayed"), ""
        except (KeyError, ValueError) as exc:
            outcome, reason = "rejected", f"invalid adjustment: {exc}"
        await audit.emit(
            self.bus, action="budget.reset", service=SERVICE,
            id_parts=(adjustment["adjustment_id"],), user_id=adjustment["actor_user_id"],
            role=adjustment["actor_role"], source_address=adjustment["source_address"],
            department=adjustment["subject"] if adjustment["scope"] == "department" else "",
            outcome=outcome, reason=reason or adjustment["reason"],
            scope=adjustment["scope"], subject=adjustment["subject"],
        )
        if outcome == "applied" and adjustment["scope"] == "user":
            await self._publish_user_budget(adjustment["subject"])

    async def _publish_user_budget(self, user_id: str) -> None:
        department = await asyncio.to_thread(self.ledger.last_department, user_id)
        if department is None:
            return
        user, dept = await asyncio.to_thread(self.ledger.balances, user_id, department)
        budget = self.settings.budget
        await self.bus.send(topics.BUDGETS, "BudgetStatus", messages.budget_status(
            user_id=user_id, department=department,
            window_start=window_start(now_s=now_ms() / 1000, window_seconds=budget.window_seconds),
            window_seconds=budget.window_seconds, delta=budget.delta, user=user, dept=dept,
        ), key=user_id)

    async def sweep_expired(self, *, grace_ms: int = 2_000) -> int:
        """Refund and time out reservations whose request deadline has passed."""
        ids = await asyncio.to_thread(self.ledger.expired, now_ms=now_ms(), grace_ms=grace_ms)
        if not ids:
            return 0
        outcomes = await asyncio.to_thread(self.ledger.settle_many, [
            Settlement(rid, None, "timeout", "request deadline passed without an answer")
            for rid in ids])
        sends: list[Awaitable[None]] = []
        for outcome in outcomes:
            if outcome is not None and outcome.changed:
                sends += self._finish(outcome, None, status="timeout")
        await asyncio.gather(*sends)
        return len(ids)

    def _charge_for(self, result: dict[str, Any]) -> tuple[PrivacyCurve | None, str, str]:
        """What to charge for a node result: (curve or None for a full refund, status, reason)."""
        status = result["status"]
        if status != "ok":
            status = "timeout" if status == "timeout" else "failed"
            if result.get("rdp_orders"):
                # The router failed a fan-out after some hospitals had answered their parts:
                # those releases happened, so their curve is charged (the user gets no answer).
                spent = self._reported_curve(result)
                if spent is not None:
                    return spent, status, result["reason"]
            return None, status, result["reason"]
        if not result["is_private"]:
            return None, "failed", "answer withheld: it was not released by a DP mechanism"
        spent = self._reported_curve(result)
        if spent is None:
            return None, "failed", "answer withheld: privacy cost reported on unknown orders"
        return spent, "ok", ""

    def _reported_curve(self, result: dict[str, Any]) -> PrivacyCurve | None:
        """The result's spent curve, or None when it is not on the ledger's orders."""
        orders = tuple(result["rdp_orders"])
        if orders != tuple(self.ledger.accountant.orders):
            return None
        return PrivacyCurve(orders=orders, values=tuple(result["rdp_epsilons"]))

    def _finish(self, outcome: Outcome, node_result: dict[str, Any] | None, *,
                status: str) -> list[Awaitable[None]]:
        """The terminal result, its audit events and the budget snapshot, to be sent."""
        entry = outcome.entry
        rid = entry["request_id"]
        sends = [self.bus.send(topics.RESULTS, "InferenceResult",
                               messages.final_result(outcome, node_result, status=status),
                               key=rid)]
        common = {"request_id": rid, "user_id": entry["user_id"],
                  "department": entry["department"], "hospital_id": entry["node_id"],
                  "delta": entry["delta"]}
        if entry["state"] == "committed":
            reserved = self.ledger.accountant.epsilon(
                PrivacyCurve.from_dict(entry["reserved_rdp"]), delta=entry["delta"])
            sends.append(audit.emit(
                self.bus, action="budget.committed", service=SERVICE, id_parts=(rid,),
                outcome="committed", epsilon=entry["spent_epsilon"],
                rdp_summary=messages.rdp_summary(entry["spent_rdp"], entry["spent_epsilon"]),
                refunded_epsilon=round(max(reserved - entry["spent_epsilon"], 0.0), 6),
                records_used=int((node_result or {}).get("records_used", 0)), **common,
            ))
        else:
            sends.append(audit.emit(self.bus, action="budget.refunded", service=SERVICE,
                                    id_parts=(rid,), outcome="refunded", reason=outcome.reason,
                                    epsilon=0.0, **common))
        sends.append(audit.emit(self.bus, action=messages.TERMINAL_ACTION[status],
                                service=SERVICE, id_parts=(rid,), outcome=status,
                                reason=outcome.reason, epsilon=entry["spent_epsilon"],
                                **common))
        sends.append(self._publish_budget(outcome))
        return sends

    async def _publish_budget(self, outcome: Outcome) -> None:
        if outcome.user.limit <= 0:
            return
        entry = outcome.entry
        await self.bus.send(topics.BUDGETS, "BudgetStatus", messages.budget_status(
            user_id=entry["user_id"], department=entry["department"],
            window_start=entry["window_start"],
            window_seconds=self.settings.budget.window_seconds, delta=entry["delta"],
            user=outcome.user, dept=outcome.department,
        ), key=entry["user_id"])
