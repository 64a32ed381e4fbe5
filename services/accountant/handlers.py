"""The accountant's reactions to events: reserve on a request, settle on a node result,
time out stale reservations. Database work runs in a thread; outputs go out after the
database commit, so a crash in between only causes a replay, which the ledger absorbs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fedllm.common import audit, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, now_ms
from fedllm.common.metrics import record_hospital_spend
from fedllm.privacy.accountant import PrivacyCurve, window_start
from services.accountant import messages
from services.accountant.ledger import Ledger, Outcome

log = logging.getLogger(__name__)
SERVICE = "accountant"


class Accountant:
    """Budget reservation and settlement over a durable ledger."""

    def __init__(self, settings: Settings, ledger: Ledger, bus: Bus) -> None:
        self.settings = settings
        self.ledger = ledger
        self.bus = bus

    async def on_request(self, request: dict[str, Any]) -> None:
        outcome = await asyncio.to_thread(self.ledger.reserve, request)
        rid = request["request_id"]
        common = {
            "request_id": rid, "user_id": request["user_id"], "role": request["role"],
            "department": request["department"], "source_address": request["source_address"],
            "delta": outcome.entry["delta"],
        }
        if outcome.state == "reserved":
            await self.bus.send(topics.DECISIONS, "BudgetDecision",
                                messages.decision(request, outcome), key=rid)
            await audit.emit(
                self.bus, action="budget.reserved", service=SERVICE, id_parts=(rid,),
                outcome="approved", epsilon=request["epsilon"],
                rdp_summary=messages.rdp_summary(outcome.entry["reserved_rdp"],
                                                 request["epsilon"]),
                **common,
            )
        elif outcome.state == "rejected":
            await self.bus.send(topics.DECISIONS, "BudgetDecision",
                                messages.decision(request, outcome), key=rid)
            await self.bus.send(topics.RESULTS, "InferenceResult",
                                messages.final_result(outcome, status="rejected"), key=rid)
            await audit.emit(self.bus, action="budget.refused", service=SERVICE, id_parts=(rid,),
                             outcome="rejected", reason=outcome.reason,
                             epsilon=request["epsilon"], **common)
            await audit.emit(self.bus, action="request.rejected", service=SERVICE,
                             id_parts=(rid,), outcome="rejected", reason=outcome.reason,
                             **common)
        else:
            return  # already settled: a replay of an old request event
        await self._publish_budget(outcome)

    async def on_node_result(self, result: dict[str, Any]) -> None:
        rid = result["request_id"]
        if result["status"] == "partial":
            return  # one hospital's part of a fan-out: the router combines the parts
        if result["status"] != "ok" and result.get("node_id"):
            # A node's own failure does not end the request: the router retries it elsewhere
            # and reports the final failure itself (node_id ""); the deadline sweep backs it up.
            log.info("node %s failed attempt %s of %s; awaiting the router's verdict",
                     result["node_id"], result.get("attempt"), rid)
            return
        spent, status, reason = self._charge_for(result)
        outcome = await asyncio.to_thread(
            self.ledger.settle, rid, spent=spent, outcome=status, reason=reason,
            node_id=result.get("node_id", ""),
        )
        if outcome is None:
            log.warning("node result for unknown request %s ignored", rid)
            return
        replay = (not outcome.changed and outcome.entry["outcome"] == status
                  and outcome.entry["node_id"] == result.get("node_id", ""))
        if outcome.changed or replay:
            if outcome.changed:
                record_hospital_spend(outcome.entry["node_id"], outcome.entry["spent_epsilon"])
            await self._finish(outcome, result if status == "ok" else None, status=status)

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
        for rid in ids:
            outcome = await asyncio.to_thread(
                self.ledger.settle, rid, spent=None, outcome="timeout",
                reason="request deadline passed without an answer",
            )
            if outcome is not None and outcome.changed:
                await self._finish(outcome, None, status="timeout")
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

    async def _finish(self, outcome: Outcome, node_result: dict[str, Any] | None, *,
                      status: str) -> None:
        entry = outcome.entry
        rid = entry["request_id"]
        await self.bus.send(topics.RESULTS, "InferenceResult",
                            messages.final_result(outcome, node_result, status=status), key=rid)
        common = {"request_id": rid, "user_id": entry["user_id"],
                  "department": entry["department"], "hospital_id": entry["node_id"],
                  "delta": entry["delta"]}
        if entry["state"] == "committed":
            reserved = self.ledger.accountant.epsilon(
                PrivacyCurve.from_dict(entry["reserved_rdp"]), delta=entry["delta"])
            await audit.emit(
                self.bus, action="budget.committed", service=SERVICE, id_parts=(rid,),
                outcome="committed", epsilon=entry["spent_epsilon"],
                rdp_summary=messages.rdp_summary(entry["spent_rdp"], entry["spent_epsilon"]),
                refunded_epsilon=round(max(reserved - entry["spent_epsilon"], 0.0), 6),
                records_used=int((node_result or {}).get("records_used", 0)), **common,
            )
        else:
            await audit.emit(self.bus, action="budget.refunded", service=SERVICE,
                             id_parts=(rid,), outcome="refunded", reason=outcome.reason,
                             epsilon=0.0, **common)
        await audit.emit(self.bus, action=messages.TERMINAL_ACTION[status], service=SERVICE,
                         id_parts=(rid,), outcome=status, reason=outcome.reason,
                         epsilon=entry["spent_epsilon"], **common)
        await self._publish_budget(outcome)

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
