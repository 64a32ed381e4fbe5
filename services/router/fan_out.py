"""Fan-out aggregates (pure): one request answered in parts by several hospitals at once.

An aggregate request naming two or more hospitals (or "*": every healthy node alive), or one
that requires consensus, goes to all of them at once, one RoutedRequest each with
``budget_share`` = 1/k of the reserved ρ and ``parts`` = k, so the sum of what the k hospitals
spend stays within the reservation. Each node answers a ``part`` (status "partial"); when all k
parts are in, the router emits one ``combined`` "ok" result
(:mod:`fedllm.common.aggregates`; the curve is the sum of the parts' curves). A part that
fails, misses its deadline or whose node leaves fails the whole request — no retry, since the
answered parts already spent budget — and the router's ``verdict`` carries the summed curve of
the parts that spent (a failed part that reports a spend included), which the accountant
charges. Record kinds: :mod:`fedllm.common.results`.
"""

from __future__ import annotations

import json

from fedllm.common import topics
from fedllm.common.aggregates import combine_parts, parse_part, part_curve, total_curve
from fedllm.common.results import ANSWER, COMBINED, PART, VERDICT, result_kind
from fedllm.schemas.records import InferenceRequest, InferenceResult, RoutedRequest
from fedllm.services.router.consensus import consensus_of
from fedllm.services.router.machine import Action, Audit, DispatchState, FanOut, Send


class FanOuts(DispatchState):
    """The fan-out state machine: `fan_outs` entries and their parts."""

    def _consensus_targets(
        self, request: InferenceRequest, *, now_ms: int
    ) -> tuple[list[str], str]:
        """The k least-loaded eligible hospitals serving the department (in region, among the
        named ones if any), or the reason there are fewer than k."""
        k, department = self.consensus_k, str(request.get("department", ""))
        if request.get("kind") != "aggregate":
            return [], (
                "consensus unavailable: only aggregate queries can be combined across "
                "hospitals (docs/consensus.md)"
            )
        wanted = {h for h in request.get("hospitals") or () if h != "*"}
        pool = [
            n
            for n in self._nodes(request, now_ms)
            if n.eligible
            and department in n.departments
            and (not wanted or n.hospital_id in wanted)
        ]
        if len(pool) < k:
            return [], (
                f"consensus unavailable: needs {k} eligible hospitals serving {department} "
                f"({self.regions.describe(request)}); {len(pool)} eligible"
            )
        pool.sort(key=lambda n: (n.load, n.hospital_id))
        return sorted(n.hospital_id for n in pool[:k]), ""

    def _fan_out_targets(self, request: InferenceRequest, *, now_ms: int) -> list[str] | None:
        """The hospitals an aggregate request fans out to, or None for a single-node route."""
        if request.get("kind") != "aggregate":
            return None
        wanted = list(dict.fromkeys(request.get("hospitals") or ()))
        if "*" in wanted:
            alive = sorted(n.hospital_id for n in self._nodes(request, now_ms) if n.healthy)
            return alive if len(alive) >= 2 else None
        return wanted if len(wanted) >= 2 else None

    def _fan_out(self, fan: FanOut, *, now_ms: int) -> list[Action]:
        """Send one part to each hospital, or fail at once (nothing released) if one is down."""
        request = fan.request
        request_id = request["request_id"]
        if now_ms >= int(request["deadline_ms"]):
            return self._fail_fan_out(
                fan, "request deadline passed before routing", now_ms=now_ms, status="timeout"
            )
        outside = self.regions.outside(request, fan.hospitals)
        if outside:
            return self._fail_fan_out(
                fan,
                f"data residency: {','.join(outside)} outside {self.regions.describe(request)}",
                now_ms=now_ms,
            )
        down = [
            h
            for h in fan.hospitals
            if (n := self.registry.get(h, now_ms=now_ms)) is None or not n.healthy
        ]
        if down:
            return self._fail_fan_out(
                fan, f"no eligible node: {','.join(down)} not alive", now_ms=now_ms
            )
        self.fan_outs[request_id] = fan
        k = len(fan.hospitals)
        common = {
            "request_id": request_id,
            "user_id": request["user_id"],
            "department": request["department"],
        }
        sends: list[Action] = []
        audits: list[Action] = []
        for i, hospital_id in enumerate(fan.hospitals, start=1):
            self.registry.note_routed(hospital_id, epsilon=fan.reserved_epsilon / k)
            routed: RoutedRequest = {
                "request_id": request_id,
                "hospital_id": hospital_id,
                "attempt": 1,
                "reserved_epsilon": fan.reserved_epsilon,
                "reserved_rho": fan.reserved_rho,
                "delta": fan.delta,
                "deadline_ms": fan.deadline_ms,
                "routed_at_ms": now_ms,
                "request": request,
                "budget_share": 1.0 / k,
                "parts": k,
            }
            sends.append(
                Send(topics.hospital_requests(hospital_id), "RoutedRequest", routed, request_id)
            )
            audits.append(
                Audit(
                    "request.routed",
                    (request_id, "part", hospital_id),
                    {
                        **common,
                        "hospital_id": hospital_id,
                        "attempt": 1,
                        "reason": f"fan-out part {i}/{k}, budget share 1/{k}",
                        "attempt_deadline_ms": fan.deadline_ms,
                    },
                )
            )
        return sends + audits

    def _on_part(self, fan: FanOut, result: InferenceResult, *, now_ms: int) -> list[Action]:
        node_id = result.get("node_id", "")
        if node_id not in fan.missing:
            return []  # a duplicate, or not one of this fan-out's parts
        status, kind = result["status"], result_kind(result)
        if kind == PART and status == "partial":
            fan.parts[node_id] = result.copy()
            return [] if fan.missing else self._complete(fan, now_ms=now_ms)
        if kind == ANSWER and status == "ok":
            # A node that does not know fan-out answered the whole query: the accountant settles
            # on that answer (first wins), so there is nothing left for the router to do.
            self._finish(fan.request["request_id"])
            return []
        if kind == PART and part_curve(result) is not None:
            # The part failed after its mechanism started: that spend goes with the verdict.
            fan.parts[node_id] = result.copy()
        why = f"node {node_id} answered {status}: {result.get('reason', '')}"
        return self._fail_fan_out(fan, why, now_ms=now_ms)

    def _complete(self, fan: FanOut, *, now_ms: int) -> list[Action]:
        request = fan.request
        request_id = request["request_id"]
        try:
            parts = [parse_part(fan.parts[h]) for h in fan.hospitals]
            combined = combine_parts(parts)
        except ValueError as exc:
            return self._fail_fan_out(fan, f"cannot combine the parts: {exc}", now_ms=now_ms)
        agreed = (
            consensus_of(parts, population=self.population)
            if request.get("require_consensus")
            else None
        )
        self._finish(request_id)
        result: InferenceResult = {
            "request_id": request_id,
            "user_id": request["user_id"],
            "department": request["department"],
            "status": "ok",
            "reason": "",
            "response": combined.text,
            "node_id": ",".join(fan.hospitals),
            "attempt": 1,
            "is_private": True,
            "privacy_cost": combined.epsilon,
            "delta": combined.delta,
            "rdp_orders": list(combined.curve.orders),
            "rdp_epsilons": list(combined.curve.values),
            "tokens": 0,
            "records_used": combined.records_used,
            "model_time_ms": max(float(p.get("model_time_ms", 0.0)) for p in fan.parts.values()),
            "processing_time_ms": float(now_ms - fan.routed_at_ms),
            "aggregate_json": json.dumps(combined.release, separators=(",", ":")),
            "finished_at_ms": now_ms,
            "kind": COMBINED,
        }
        if agreed is not None:
            result["consensus_reached"] = agreed.reached
            result["confidence_score"] = agreed.confidence
            result["response"] += (
                f" Consensus across {len(parts)} hospitals: "
                f"{'reached' if agreed.reached else 'not reached'} (confidence "
                f"{agreed.confidence:.2f}, {agreed.method}; from the DP releases only)."
            )
        return [
            Send(topics.NODE_RESULTS, "InferenceResult", result, request["user_id"]),
            Audit(
                "request.combined",
                (request_id,),
                {
                    "request_id": request_id,
                    "user_id": request["user_id"],
                    "department": request["department"],
                    "hospital_id": result["node_id"],
                    "outcome": "ok",
                    "epsilon": combined.epsilon,
                    "delta": combined.delta,
                    "records_used": combined.records_used,
                    "parts": len(fan.hospitals),
                },
            ),
        ]

    def _fail_fan_out(
        self, fan: FanOut, why: str, *, now_ms: int, status: str = "failed"
    ) -> list[Action]:
        """Fail the whole fan-out. The parts that did answer were released (to the router) and
        spent budget at their hospitals: their summed curve goes with the failure, and the
        accountant charges it."""
        request = fan.request
        request_id = request["request_id"]
        sent = request_id in self.fan_outs
        self._finish(request_id)
        answered = [h for h in fan.hospitals if h in fan.parts]
        curves = [c for h in answered if (c := part_curve(fan.parts[h])) is not None]
        spent = total_curve(curves)
        reason = why
        result: InferenceResult = {
            "request_id": request_id,
            "user_id": request["user_id"],
            "department": request["department"],
            "status": status,
            "node_id": "",
            "attempt": 1 if sent else 0,
            "delta": fan.delta,
            "finished_at_ms": now_ms,
            "kind": VERDICT,
        }
        if spent is not None:
            epsilon = spent.epsilon(delta=fan.delta)
            reason += (
                f"; partial release: {','.join(answered)} spent on their parts "
                f"ε ≤ {epsilon:.4g} at δ={fan.delta:g}, which is charged"
            )
            result.update(
                {
                    "privacy_cost": epsilon,
                    "rdp_orders": list(spent.orders),
                    "rdp_epsilons": list(spent.values),
                    "records_used": sum(int(fan.parts[h].get("records_used", 0)) for h in answered),
                }
            )
        result["reason"] = reason
        return [
            Send(topics.NODE_RESULTS, "InferenceResult", result, request["user_id"]),
            Audit(
                "request.route_failed",
                (request_id,),
                {
                    "request_id": request_id,
                    "user_id": request["user_id"],
                    "department": request["department"],
                    "hospital_id": ",".join(fan.hospitals),
                    "outcome": status,
                    "reason": reason,
                    "attempt": result["attempt"],
                    "epsilon": result.get("privacy_cost", 0.0),
                },
            ),
        ]
