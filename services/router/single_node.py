"""Single-node requests (pure): one hospital at a time, a retry on another, hedging.

A request gets at most `MAX_ATTEMPTS` node attempts. An attempt ends with the node's answer, or
is abandoned when the node misses the attempt deadline, answers "failed"/"timeout", or drops out
of the registry; then the request is retried once on a node not yet tried, else failed with the
router's verdict on the node-results topic (the accountant refunds the reservation on it).

Hedging (off by default, ``hedge=True``): a high-priority request whose attempt has run longer
than the p95 of recently observed answer times is sent to a second node as well (its second
attempt, so no retry is left); the first answer closes it. Privacy: the hedge starts a second
mechanism over another hospital's records, so it is a second charge — the router audits it
(``request.hedged``, with the reserved ε it puts at stake) and the accountant must charge every
attempt that a node started, the losing one included (docs/routing.md, "Hedging").
"""

from __future__ import annotations

from fedllm.common import topics
from fedllm.common.results import VERDICT
from fedllm.schemas.records import InferenceResult, RoutedRequest
from fedllm.services.router.machine import Action, Audit, DispatchState, InFlight, Send
from fedllm.services.router.registry import NodeInfo
from fedllm.services.router.strategy import Choice

MAX_ATTEMPTS = 2
HEDGE_MIN_SAMPLES = 20  # answer times observed before the p95 is trusted for hedging
HEDGE_PERCENTILE = 0.95


class SingleNode(DispatchState):
    """The single-node state machine: `in_flight` entries, their attempts and hedges."""

    def _on_answer(self, entry: InFlight, result: InferenceResult, *, now_ms: int) -> list[Action]:
        """A node's answer to the attempt(s) of `entry`: close it, or retry a failure."""
        request_id = entry.request["request_id"]
        node_id, attempt = result.get("node_id"), result.get("attempt", 0)
        if result["status"] != "ok" and result.get("rdp_orders"):
            # A mechanism started at the node before it failed (e.g. fail-closed mid-release):
            # that spend is charged and the accountant settles the request as failed with it,
            # so it ends here, without a retry.
            self._finish(request_id)
            return []
        if result["status"] != "ok" and entry.hedge_hospital_id:
            if node_id == entry.hedge_hospital_id and attempt in (0, entry.hedge_attempt):
                self._drop_hedge(entry)  # the hedge failed; the first attempt still runs
                return []
            if node_id == entry.hospital_id and attempt in (0, entry.attempt):
                self._promote_hedge(entry)  # the first attempt failed; the hedge still runs
                return []
        if result["status"] != "ok":
            stale = result.get("node_id") != entry.hospital_id or result.get("attempt", 0) not in (
                0,
                entry.attempt,
            )
            if stale:
                return []  # a failure of an attempt already abandoned
            why = (
                f"node {entry.hospital_id} answered {result['status']}: {result.get('reason', '')}"
            )
            return self._attempt(entry, now_ms=now_ms, why=why)
        if node_id in (entry.hospital_id, entry.hedge_hospital_id):
            self._answer_ms.append(now_ms - entry.attempt_started_ms)
        self._finish(request_id)
        return []

    def _attempt(
        self, entry: InFlight, *, now_ms: int, why: str, choice: Choice | None = None
    ) -> list[Action]:
        """Start the next attempt of `entry` (on `choice` when a batch already placed it), or
        fail it. `why` explains a retry."""
        request = entry.request
        request_id = request["request_id"]
        if now_ms >= int(request["deadline_ms"]):
            return self._fail(
                entry, "timeout", why or "request deadline passed before routing", now_ms=now_ms
            )
        if entry.attempt >= MAX_ATTEMPTS:
            return self._fail(entry, "failed", f"{why}; no attempts left", now_ms=now_ms)
        if choice is None:
            choice = self.strategy.choose(
                request, self._nodes(request, now_ms), exclude=entry.tried
            )
        if choice is None:
            reason = "no eligible node"
            if self.regions.allowed(request) is not None:
                reason += f" in {self.regions.describe(request)} (data residency)"
            if request.get("hospitals"):
                reason += f" among {','.join(request['hospitals'])}"
            if entry.tried:
                reason += f" besides {','.join(entry.tried)}"
            return self._fail(entry, "failed", f"{why}; {reason}" if why else reason, now_ms=now_ms)

        previous = entry.hospital_id
        node: NodeInfo = choice.node
        entry.attempt += 1
        entry.hospital_id = node.hospital_id
        entry.tried.append(node.hospital_id)
        entry.attempt_deadline_ms = min(now_ms + self.node_timeout_ms, int(request["deadline_ms"]))
        entry.attempt_started_ms = now_ms
        self.in_flight[request_id] = entry
        self.registry.note_routed(node.hospital_id, epsilon=entry.reserved_epsilon)

        routed: RoutedRequest = {
            "request_id": request_id,
            "hospital_id": node.hospital_id,
            "attempt": entry.attempt,
            "reserved_epsilon": entry.reserved_epsilon,
            "reserved_rho": entry.reserved_rho,
            "delta": entry.delta,
            "deadline_ms": entry.attempt_deadline_ms,
            "routed_at_ms": now_ms,
            "request": request,
        }
        actions: list[Action] = [
            Send(topics.hospital_requests(node.hospital_id), "RoutedRequest", routed, request_id)
        ]
        common = {
            "request_id": request_id,
            "user_id": request["user_id"],
            "department": request["department"],
        }
        if entry.attempt > 1:
            actions.append(
                Audit(
                    "request.retried",
                    (request_id, entry.attempt),
                    {
                        **common,
                        "hospital_id": node.hospital_id,
                        "reason": why,
                        "attempt": entry.attempt,
                        "previous_hospital_id": previous,
                    },
                )
            )
        actions.append(
            Audit(
                "request.routed",
                (request_id, entry.attempt),
                {
                    **common,
                    "hospital_id": node.hospital_id,
                    "reason": choice.reason,
                    "attempt": entry.attempt,
                    "attempt_deadline_ms": entry.attempt_deadline_ms,
                    "strategy": self.strategy.name,
                    "candidates": ",".join(choice.candidates),
                },
            )
        )
        return actions

    def hedge_after_ms(self) -> int | None:
        """The p95 of recent answer times, once enough are observed (None before)."""
        if len(self._answer_ms) < HEDGE_MIN_SAMPLES:
            return None
        ordered = sorted(self._answer_ms)
        return ordered[min(len(ordered) - 1, int(HEDGE_PERCENTILE * len(ordered)))]

    def _hedge_overdue(self, *, now_ms: int) -> list[Action]:
        """Hedge the high-priority attempts running past the p95 (when hedging is on)."""
        if not self.hedge:
            return []
        after = self.hedge_after_ms()
        if after is None:
            return []
        actions: list[Action] = []
        for entry in list(self.in_flight.values()):
            if (
                entry.request.get("priority") == "high"
                and not entry.hedge_hospital_id
                and entry.attempt < MAX_ATTEMPTS
                and now_ms - entry.attempt_started_ms >= after
                and now_ms < int(entry.request["deadline_ms"])
            ):
                actions += self._send_hedge(entry, after_ms=after, now_ms=now_ms)
        return actions

    def _send_hedge(self, entry: InFlight, *, after_ms: int, now_ms: int) -> list[Action]:
        request = entry.request
        request_id = request["request_id"]
        choice = self.strategy.choose(request, self._nodes(request, now_ms), exclude=entry.tried)
        if choice is None:
            return []
        node = choice.node
        entry.tried.append(node.hospital_id)
        entry.hedge_hospital_id = node.hospital_id
        entry.hedge_attempt = entry.attempt + 1
        entry.hedge_deadline_ms = min(now_ms + self.node_timeout_ms, int(request["deadline_ms"]))
        self.registry.note_routed(node.hospital_id, epsilon=entry.reserved_epsilon)
        routed: RoutedRequest = {
            "request_id": request_id,
            "hospital_id": node.hospital_id,
            "attempt": entry.hedge_attempt,
            "reserved_epsilon": entry.reserved_epsilon,
            "reserved_rho": entry.reserved_rho,
            "delta": entry.delta,
            "deadline_ms": entry.hedge_deadline_ms,
            "routed_at_ms": now_ms,
            "request": request,
        }
        return [
            Send(topics.hospital_requests(node.hospital_id), "RoutedRequest", routed, request_id),
            Audit(
                "request.hedged",
                (request_id, entry.hedge_attempt),
                {
                    "request_id": request_id,
                    "user_id": request["user_id"],
                    "department": request["department"],
                    "hospital_id": node.hospital_id,
                    "attempt": entry.hedge_attempt,
                    "previous_hospital_id": entry.hospital_id,
                    "epsilon": entry.reserved_epsilon,
                    "delta": entry.delta,
                    "reason": (
                        f"high priority, attempt {entry.attempt} running past the p95 "
                        f"({after_ms} ms); a second mechanism, charged as a second "
                        f"reservation"
                    ),
                    "strategy": self.strategy.name,
                    "candidates": ",".join(choice.candidates),
                },
            ),
        ]

    @staticmethod
    def _drop_hedge(entry: InFlight) -> None:
        entry.hedge_hospital_id, entry.hedge_attempt, entry.hedge_deadline_ms = "", 0, 0

    def _promote_hedge(self, entry: InFlight) -> None:
        """The hedge becomes the attempt being supervised."""
        entry.hospital_id, entry.attempt = entry.hedge_hospital_id, entry.hedge_attempt
        entry.attempt_deadline_ms = entry.hedge_deadline_ms
        self._drop_hedge(entry)

    def _fail(self, entry: InFlight, status: str, reason: str, *, now_ms: int) -> list[Action]:
        request = entry.request
        request_id = request["request_id"]
        self._finish(request_id)
        result: InferenceResult = {
            "request_id": request_id,
            "user_id": request["user_id"],
            "department": request["department"],
            "status": status,
            "reason": reason,
            "node_id": "",
            "attempt": entry.attempt,
            "delta": entry.delta,
            "finished_at_ms": now_ms,
            "kind": VERDICT,
        }
        return [
            Send(topics.NODE_RESULTS, "InferenceResult", result, request["user_id"]),
            Audit(
                "request.route_failed",
                (request_id,),
                {
                    "request_id": request_id,
                    "user_id": request["user_id"],
                    "department": request["department"],
                    "hospital_id": entry.hospital_id,
                    "outcome": status,
                    "reason": reason,
                    "attempt": entry.attempt,
                },
            ),
        ]
