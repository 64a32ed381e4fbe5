"""The router's state machine (pure): decisions, node results, heartbeats and clock ticks in;
actions (messages to send, audit events to emit) out.

A request gets at most `MAX_ATTEMPTS` node attempts. An attempt ends with the node's answer, or
is abandoned when the node misses the attempt deadline, answers "failed"/"timeout", or drops out
of the registry; then the request is retried once on a node not yet tried, else failed with an
InferenceResult on the node-results topic (the accountant refunds the reservation on it).
Everything is idempotent by request id: replayed decisions and duplicate answers change nothing.

Decisions may arrive in batches (:meth:`Dispatcher.on_decisions`, one batching window of the
service): a strategy that places requests jointly (:class:`BatchRoutingStrategy`, the
assignment optimiser) gets them all at once; any other routes them one by one.

Hedging (off by default, ``hedge=True``): a high-priority request whose attempt has run longer
than the p95 of recently observed answer times is sent to a second node as well (its second
attempt, so no retry is left); the first answer closes it. Privacy: the hedge starts a second
mechanism over another hospital's records, so it is a second charge — the router audits it
(``request.hedged``, with the reserved ε it puts at stake) and the accountant must charge every
attempt that a node started, the losing one included (docs/routing.md, "Hedging").

Fan-out: an aggregate request naming two or more hospitals (or "*": every healthy node alive)
goes to all of them at once, one RoutedRequest each with ``budget_share`` = 1/k of the reserved
ρ and ``parts`` = k, so the sum of what the k hospitals spend stays within the reservation. Each
node answers a ``part`` (status "partial"); when all k parts are in, the router emits one
``combined`` "ok" result (:mod:`fedllm.services.router.combine`; the curve is the sum of the
parts' curves). A part that fails, misses its deadline or whose node leaves fails the whole
request — no retry, since the answered parts already spent budget — and the router's ``verdict``
carries the summed curve of the parts that spent (a failed part that reports a spend included),
which the accountant charges. Record kinds: :mod:`fedllm.common.results`.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedllm.common import topics
from fedllm.common.residency import RegionPolicy
from fedllm.common.results import ANSWER, COMBINED, PART, VERDICT, result_kind
from fedllm.services.router.combine import combine_parts, parse_part, part_curve, total_curve
from fedllm.services.router.consensus import consensus_of
from fedllm.services.router.registry import NodeInfo, NodeRegistry
from fedllm.services.router.strategy import BatchRoutingStrategy, Choice, RoutingStrategy

MAX_ATTEMPTS = 2
HEDGE_MIN_SAMPLES = 20  # answer times observed before the p95 is trusted for hedging
HEDGE_PERCENTILE = 0.95
SERVICE = "router"


#: Order in which a batch of decisions is routed (stable within a priority).
PRIORITY_ORDER = {"high": 0, "normal": 1, "low": 2}


@dataclass(frozen=True, slots=True)
class Send:
    """Produce `record` (Avro `schema`) to `topic` with `key`."""

    topic: str
    schema: str
    record: dict[str, Any]
    key: str


@dataclass(frozen=True, slots=True)
class Audit:
    """Emit an AuditEvent (see `fedllm.common.audit.emit`)."""

    action: str
    id_parts: tuple[object, ...]
    fields: dict[str, Any]


Action = Send | Audit


@dataclass(slots=True)
class InFlight:
    """A routed request awaiting its node's answer."""

    request: dict[str, Any]
    reserved_epsilon: float
    delta: float
    hospital_id: str
    attempt: int
    attempt_deadline_ms: int
    tried: list[str] = field(default_factory=list)
    attempt_started_ms: int = 0
    hedge_hospital_id: str = ""  # a hedge attempt running beside the current one
    hedge_attempt: int = 0
    hedge_deadline_ms: int = 0
    reserved_rho: float = 0.0  # the accountant's ρ, passed on to the nodes (0: legacy decision)


@dataclass(slots=True)
class FanOut:
    """An aggregate request sent to several hospitals at once, awaiting their parts."""

    request: dict[str, Any]
    reserved_epsilon: float
    delta: float
    hospitals: list[str]
    deadline_ms: int
    routed_at_ms: int
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # hospital -> its result
    reserved_rho: float = 0.0  # the accountant's ρ, passed on to the nodes (0: legacy decision)

    @property
    def missing(self) -> list[str]:
        return [h for h in self.hospitals if h not in self.parts]


class Dispatcher:
    """Routes approved decisions and supervises attempts. Time is always passed in."""

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        strategy: RoutingStrategy,
        node_timeout_s: float,
        finished_memory: int = 100_000,
        hedge: bool = False,
        regions: RegionPolicy | None = None,
        consensus_k: int = 2,
        population: Mapping[str, int] | None = None,
    ) -> None:
        if node_timeout_s <= 0:
            raise ValueError(f"node_timeout_s must be positive, got {node_timeout_s}")
        if finished_memory < 1:
            raise ValueError("finished_memory must be at least 1")
        self.registry = registry
        self.strategy = strategy
        self.node_timeout_ms = int(node_timeout_s * 1000)
        self.finished_memory = finished_memory
        self.in_flight: dict[str, InFlight] = {}
        self.fan_outs: dict[str, FanOut] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self.hedge = hedge
        self.regions = regions or RegionPolicy()  # default: no residency restriction
        if consensus_k < 2:
            raise ValueError("consensus_k must be at least 2")
        self.consensus_k = consensus_k
        self.population = dict(population or {})  # public, configured: consensus rates
        self._answer_ms: deque[int] = deque(maxlen=256)  # recent answer times, for the p95

    # -- inputs ---------------------------------------------------------------------------

    def on_decision(self, decision: Mapping[str, Any], *, now_ms: int) -> list[Action]:
        """Route an approved decision; rejected, replayed or finished ones are ignored."""
        return self.on_decisions([decision], now_ms=now_ms)

    def on_decisions(self, decisions: Sequence[Mapping[str, Any]], *, now_ms: int) -> list[Action]:
        """Route a batching window's decisions; a batch strategy places them jointly."""
        actions: list[Action] = []
        entries: list[InFlight] = []
        seen: set[str] = set()
        for decision in decisions:
            rid = decision["request_id"]
            if rid in seen:
                continue
            seen.add(rid)
            admitted = self._admit(decision, now_ms=now_ms)
            if isinstance(admitted, InFlight):
                entries.append(admitted)
            else:
                actions += admitted
        # Priority: a window's high requests are placed (and sent) first, on the best nodes.
        entries.sort(key=lambda e: PRIORITY_ORDER.get(str(e.request.get("priority")), 1))
        choices: Sequence[Choice | None] = [None] * len(entries)
        routable = [  # residency-restricted requests are placed one by one, on their nodes
            e
            for e in entries
            if now_ms < int(e.request["deadline_ms"]) and self.regions.allowed(e.request) is None
        ]
        if isinstance(self.strategy, BatchRoutingStrategy) and len(routable) > 1:
            placed = self.strategy.choose_batch(
                [e.request for e in routable], self.registry.alive(now_ms)
            )
            by_id = {e.request["request_id"]: c for e, c in zip(routable, placed, strict=True)}
            choices = [by_id.get(e.request["request_id"]) for e in entries]
        for entry, choice in zip(entries, choices, strict=True):
            actions += self._attempt(entry, now_ms=now_ms, why="", choice=choice)
        return actions

    def _admit(self, decision: Mapping[str, Any], *, now_ms: int) -> InFlight | list[Action]:
        """A new single-node entry to route, or the actions for a fan-out (or nothing)."""
        if not decision["approved"]:
            return []
        request = dict(decision["request"])
        request_id = request["request_id"]
        if (
            request_id in self.in_flight
            or request_id in self.fan_outs
            or request_id in self._finished
        ):
            return []
        if request.get("require_consensus"):
            targets, why = self._consensus_targets(request, now_ms=now_ms)
            fan = FanOut(
                request=request,
                reserved_epsilon=float(decision["reserved_epsilon"]),
                delta=float(decision["delta"]),
                reserved_rho=float(decision.get("reserved_rho") or 0.0),
                hospitals=targets,
                deadline_ms=min(now_ms + self.node_timeout_ms, int(request["deadline_ms"])),
                routed_at_ms=now_ms,
            )
            if why:  # never a silent single answer
                return self._fail_fan_out(fan, why, now_ms=now_ms)
            return self._fan_out(fan, now_ms=now_ms)
        fan_targets = self._fan_out_targets(request, now_ms=now_ms)
        if fan_targets is not None:
            fan = FanOut(
                request=request,
                reserved_epsilon=float(decision["reserved_epsilon"]),
                delta=float(decision["delta"]),
                reserved_rho=float(decision.get("reserved_rho") or 0.0),
                hospitals=fan_targets,
                deadline_ms=min(now_ms + self.node_timeout_ms, int(request["deadline_ms"])),
                routed_at_ms=now_ms,
            )
            return self._fan_out(fan, now_ms=now_ms)
        if "*" in (request.get("hospitals") or ()):
            request["hospitals"] = []  # "*" with fewer than two nodes alive: router chooses
        return InFlight(
            request=request,
            reserved_epsilon=float(decision["reserved_epsilon"]),
            delta=float(decision["delta"]),
            reserved_rho=float(decision.get("reserved_rho") or 0.0),
            hospital_id="",
            attempt=0,
            attempt_deadline_ms=0,
        )

    def on_node_result(self, result: Mapping[str, Any], *, now_ms: int) -> list[Action]:
        """A node's answer closes the request, unless it is a failure of the current attempt,
        which triggers the retry; a part goes to its fan-out. A router's own record (a verdict
        or a combined answer, e.g. read back after a restart) ends the request with nothing
        sent. Stale or unknown answers are ignored."""
        request_id = result["request_id"]
        kind = result_kind(result)
        if kind in (VERDICT, COMBINED):
            if request_id in self.in_flight or request_id in self.fan_outs:
                self._finish(request_id)
            return []
        fan = self.fan_outs.get(request_id)
        if fan is not None:
            return self._on_part(fan, result, now_ms=now_ms)
        entry = self.in_flight.get(request_id)
        if entry is None or kind != ANSWER:
            return []
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

    def on_heartbeat(self, heartbeat: Mapping[str, Any], *, now_ms: int) -> list[Action]:
        """Update the registry; audit a join."""
        if not self.registry.observe(heartbeat, now_ms=now_ms):
            return []
        node = self.registry.get(heartbeat["hospital_id"], now_ms=now_ms)
        assert node is not None
        return [
            Audit(
                "node.joined",
                (node.hospital_id, now_ms),
                {
                    "hospital_id": node.hospital_id,
                    "outcome": "joined",
                    "departments": ",".join(node.departments),
                    "model": node.model,
                    "device": node.device,
                },
            )
        ]

    def tick(self, *, now_ms: int) -> list[Action]:
        """Expire silent nodes (re-routing what they held) and overdue attempts."""
        actions: list[Action] = []
        for node in self.registry.expire(now_ms=now_ms):
            actions.append(self._node_left(node, now_ms=now_ms))
            for entry in [
                e for e in self.in_flight.values() if e.hedge_hospital_id == node.hospital_id
            ]:
                self._drop_hedge(entry)
            for entry in [e for e in self.in_flight.values() if e.hospital_id == node.hospital_id]:
                if entry.hedge_hospital_id:
                    self._promote_hedge(entry)
                    continue
                why = f"node {node.hospital_id} left the registry"
                actions += self._attempt(entry, now_ms=now_ms, why=why)
            for fan in [f for f in self.fan_outs.values() if node.hospital_id in f.missing]:
                why = f"node {node.hospital_id} left the registry"
                actions += self._fail_fan_out(fan, why, now_ms=now_ms)
        for entry in [e for e in self.in_flight.values() if now_ms >= e.attempt_deadline_ms]:
            if entry.hedge_hospital_id and now_ms < entry.hedge_deadline_ms:
                self._promote_hedge(entry)
                continue
            why = f"node {entry.hospital_id} did not answer attempt {entry.attempt} in time"
            actions += self._attempt(entry, now_ms=now_ms, why=why)
        actions += self._hedge_overdue(now_ms=now_ms)
        for fan in [f for f in self.fan_outs.values() if now_ms >= f.deadline_ms]:
            why = f"{','.join(fan.missing)} did not answer in time"
            actions += self._fail_fan_out(fan, why, now_ms=now_ms)
        return actions

    def on_send_failed(self, request_id: str, hospital_id: str, *, now_ms: int) -> list[Action]:
        """The RoutedRequest to `hospital_id` could not be produced: abandon that attempt."""
        fan = self.fan_outs.get(request_id)
        if fan is not None and hospital_id in fan.missing:
            return self._fail_fan_out(fan, f"could not send to {hospital_id}", now_ms=now_ms)
        entry = self.in_flight.get(request_id)
        if entry is None or entry.hospital_id != hospital_id:
            return []
        return self._attempt(entry, now_ms=now_ms, why=f"could not send to {hospital_id}")

    def is_finished(self, request_id: str) -> bool:
        return request_id in self._finished

    # -- internals ------------------------------------------------------------------------

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

        routed = {
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

    # -- hedging ---------------------------------------------------------------------------

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
        routed = {
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
        result = {
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

    # -- fan-out ---------------------------------------------------------------------------

    def _nodes(self, request: Mapping[str, Any], now_ms: int) -> list[NodeInfo]:
        """The live nodes `request` may be routed to (data residency applied)."""
        return [
            n for n in self.registry.alive(now_ms) if self.regions.permits(request, n.hospital_id)
        ]

    def _consensus_targets(
        self, request: Mapping[str, Any], *, now_ms: int
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

    def _fan_out_targets(self, request: Mapping[str, Any], *, now_ms: int) -> list[str] | None:
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
            routed = {
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

    def _on_part(self, fan: FanOut, result: Mapping[str, Any], *, now_ms: int) -> list[Action]:
        node_id = result.get("node_id", "")
        if node_id not in fan.missing:
            return []  # a duplicate, or not one of this fan-out's parts
        status, kind = result["status"], result_kind(result)
        if kind == PART and status == "partial":
            fan.parts[node_id] = dict(result)
            return [] if fan.missing else self._complete(fan, now_ms=now_ms)
        if kind == ANSWER and status == "ok":
            # A node that does not know fan-out answered the whole query: the accountant settles
            # on that answer (first wins), so there is nothing left for the router to do.
            self._finish(fan.request["request_id"])
            return []
        if kind == PART and part_curve(result) is not None:
            # The part failed after its mechanism started: that spend goes with the verdict.
            fan.parts[node_id] = dict(result)
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
        result = {
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
        result: dict[str, Any] = {
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
                privacy_cost=epsilon,
                rdp_orders=list(spent.orders),
                rdp_epsilons=list(spent.values),
                records_used=sum(int(fan.parts[h].get("records_used", 0)) for h in answered),
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

    def _finish(self, request_id: str) -> None:
        self.fan_outs.pop(request_id, None)
        self.in_flight.pop(request_id, None)
        self._finished[request_id] = None
        self._finished.move_to_end(request_id)
        while len(self._finished) > self.finished_memory:
            self._finished.popitem(last=False)

    def _node_left(self, node: NodeInfo, *, now_ms: int) -> Audit:
        return Audit(
            "node.left",
            (node.hospital_id, node.last_seen_ms),
            {
                "hospital_id": node.hospital_id,
                "outcome": "left",
                "reason": f"no heartbeat for {now_ms - node.last_seen_ms} ms",
                "held_requests": sum(
                    1 for e in self.in_flight.values() if e.hospital_id == node.hospital_id
                ),
            },
        )
