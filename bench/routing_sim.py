"""Routing strategies against round-robin, in one discrete-event simulation.

Replays synthetic arrival traces against five heterogeneous hospital nodes through the router's
real code — `Dispatcher` (retries, TTL expiry, batching windows, hedging), `NodeRegistry` and
every strategy of `fedllm.services.router.strategies` — and the node's real heartbeat figures
(`fedllm.services.node_worker.health`). Only the nodes and the clock are simulated: each node serves
its queue first-in first-out with `servers` parallel slots, a service time of
size × its mean (size drawn once per request, the same for every strategy: common random
numbers), heartbeats every second, and a data-set ledger that is charged ε when a mechanism
starts (a hedge or a retry that starts is a second charge; a node whose ledger cannot fit ε
refuses, uncharged).

Traces (each `--duration` seconds of arrivals; the requests' ε is 1):
- steady: Poisson arrivals at 60 % of the nodes' total capacity, departments uniform;
- bursty: on/off arrivals (10 s at 2.5×, 30 s at 0.5× the steady rate), the same mean;
- skewed: 60 % of requests for cardiology, which three nodes (one slow) serve;
- slow_node: steady, and the fastest node becomes 4× slower at a third of the run;
- node_dies: steady, and a node stops (no answers, no heartbeats) at a third of the run;
- budget_cap: steady, and one hospital starts with 90 % of its data-set budget spent (caps are
  4 × an even share of the run here, 2 × elsewhere, so the others keep room throughout).

Per strategy and trace it prints completion time p50/p95/p99 (s, from the decision to the
first answer), failed requests, retries, hedges, mechanisms charged, and the spread of
data-set budget use (the largest hospital's spend over the mean spend, over the hospitals that
still had room at the end, and the number exhausted), then each p95 as a ratio to round-robin's
in the same run, and whether the goals hold:

    python bench/routing_sim.py [--duration 600] [--seed 7] [--window-ms 50]

Goals (issue 17): the default's p95 ≤ 0.7 × round-robin's on the skewed trace, and no hospital's
budget use above 1.5 × the mean while others have room.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fedllm.common import topics
from fedllm.services.node_worker.health import NodeHealth, budget_room_level
from fedllm.services.router.dispatcher import Action, Audit, Dispatcher, Send
from fedllm.services.router.registry import NodeRegistry
from fedllm.services.router.strategies import STRATEGIES, build_strategy
from fedllm.services.router.strategy import BatchRoutingStrategy, RoutingStrategy

HEARTBEAT_MS = 1_000
TICK_MS = 200
TTL_S = 5.0
NODE_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_MS = 120_000
EPSILON = 1.0
LOAD = 0.6  # of the nodes' total capacity
SLOWDOWN = 4.0
DEPARTMENTS = ("general", "cardiology", "oncology", "radiology", "emergency")
PRIORITIES = (("high", 0.1), ("normal", 0.7), ("low", 0.2))


@dataclass(frozen=True, slots=True)
class NodeSpec:
    hospital_id: str
    departments: tuple[str, ...]
    service_ms: float
    servers: int = 1


NODES = (
    NodeSpec("h1", ("cardiology", "general", "emergency"), 800),
    NodeSpec("h2", ("cardiology", "oncology", "general"), 1_000),
    NodeSpec("h3", ("oncology", "radiology", "general"), 1_500),
    NodeSpec("h4", ("cardiology", "radiology", "general"), 2_500),
    NodeSpec("h5", ("general", "emergency", "oncology"), 3_000, servers=2),
)
CAPACITY_PER_S = sum(n.servers * 1000 / n.service_ms for n in NODES)


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    arrivals: list[tuple[int, dict[str, Any], float]]  # (time ms, request, size factor)
    faults: list[tuple[int, str, str]] = field(default_factory=list)  # (ms, kind, hospital)
    spent_at_start: dict[str, float] = field(default_factory=dict)  # fraction of the cap
    cap: float = 0.0


# -- traces ---------------------------------------------------------------------------------


def _requests(
    rng: random.Random, times: Iterator[int], *, skew: float
) -> Iterator[tuple[int, dict[str, Any], float]]:
    names, weights = zip(*PRIORITIES, strict=True)
    for i, t in enumerate(times):
        if rng.random() < skew:
            department = "cardiology"
        else:
            department = rng.choice(DEPARTMENTS)
        request = {
            "request_id": f"r{i}",
            "user_id": f"u{i % 50}",
            "department": department,
            "kind": "generate",
            "priority": rng.choices(names, weights)[0],
            "hospitals": [],
            "epsilon": EPSILON,
            "delta": 1e-5,
            "created_at_ms": t,
            "deadline_ms": t + REQUEST_TIMEOUT_MS,
        }
        yield t, request, rng.lognormvariate(-0.125, 0.5)  # mean 1


def _poisson(rng: random.Random, rate: Callable[[float], float], end_ms: int) -> Iterator[int]:
    """Arrival times (ms) of a Poisson process with a piecewise-constant rate (per s)."""
    t = 0.0
    while True:
        t += rng.expovariate(rate(t / 1000)) * 1000
        if t >= end_ms:
            return
        yield int(t)


def traces(*, duration_s: float, seed: int) -> list[Trace]:
    end = int(duration_s * 1000)
    steady_rate = LOAD * CAPACITY_PER_S

    def make(
        name: str,
        rate: Callable[[float], float],
        *,
        skew: float = 0.0,
        headroom: float = 2.0,
        **kw: Any,
    ) -> Trace:
        rng = random.Random(f"{seed}-{name}")
        arrivals = list(_requests(rng, _poisson(rng, rate, end), skew=skew))
        # The cap: `headroom` times what an even share of the run's requests would spend.
        cap = headroom * EPSILON * len(arrivals) / len(NODES)
        return Trace(name, arrivals, cap=cap, **kw)

    def steady(t: float) -> float:
        return steady_rate

    def bursty(t: float) -> float:
        return steady_rate * (2.5 if t % 40 < 10 else 0.5)

    third = end // 3
    return [
        make("steady", steady),
        make("bursty", bursty),
        make("skewed", steady, skew=0.6),
        make("slow_node", steady, faults=[(third, "slow", "h1")]),
        make("node_dies", steady, faults=[(third, "die", "h2")]),
        make("budget_cap", steady, headroom=4.0, spent_at_start={"h2": 0.9}),
    ]


# -- the simulated nodes ---------------------------------------------------------------------


@dataclass(slots=True)
class SimNode:
    spec: NodeSpec
    cap: float
    spent: float = 0.0
    slowdown: float = 1.0
    alive: bool = True
    busy: int = 0
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    health: NodeHealth = field(default_factory=NodeHealth)
    charged_in_run: float = 0.0

    def room(self) -> float:
        return max(0.0, (self.cap - self.spent) / self.cap)

    def heartbeat(self, now_ms: int) -> dict[str, Any]:
        return {
            "hospital_id": self.spec.hospital_id,
            "departments": list(self.spec.departments),
            "queue_depth": len(self.queue),
            "in_flight": self.busy,
            "recent_latency_ms": self.health.ewma_latency_ms,
            "model": "sim",
            "device": "sim",
            "healthy": True,
            "sent_at_ms": now_ms,
            "queue_by_priority": self.health.queue_by_priority(),
            "ewma_latency_ms": self.health.ewma_latency_ms,
            "error_rate": self.health.error_rate,
            "budget_room": budget_room_level(self.room()),
        }


@dataclass(slots=True)
class Outcome:
    strategy: str
    trace: str
    completion_s: list[float]
    failed: int
    retried: int
    hedged: int
    charged: int
    spent: dict[str, float]
    exhausted: list[str]
    started_low: list[str]

    def pct(self, q: float) -> float:
        xs = sorted(self.completion_s)
        if not xs:
            return math.inf
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    @property
    def spread(self) -> float:
        """Largest spend in the run over the mean, among the hospitals that had room to give:
        full room at the start (the near-cap hospital is one to spare), not exhausted at the end
        and not dead (a dead node offers no room)."""
        spends = [
            v
            for h, v in self.spent.items()
            if h not in self.exhausted and h not in self.started_low
        ]
        mean = sum(spends) / len(spends) if spends else 0.0
        return max(spends) / mean if mean > 0 else 1.0


# -- the simulation --------------------------------------------------------------------------


def simulate(
    trace: Trace,
    strategy: RoutingStrategy,
    *,
    label: str = "",
    window_ms: int = 50,
    hedge: bool = False,
) -> Outcome:
    """Run `trace` through a fresh Dispatcher with `strategy`; return what happened."""
    dispatcher = Dispatcher(
        registry=NodeRegistry(ttl_s=TTL_S),
        strategy=strategy,
        node_timeout_s=NODE_TIMEOUT_S,
        hedge=hedge,
    )
    nodes = {
        s.hospital_id: SimNode(
            s, cap=trace.cap, spent=trace.cap * trace.spent_at_start.get(s.hospital_id, 0.0)
        )
        for s in NODES
    }
    size = {r["request_id"]: f for _, r, f in trace.arrivals}
    arrived: dict[str, int] = {}
    done: set[str] = set()
    completion: list[float] = []
    counts = {"failed": 0, "retried": 0, "hedged": 0, "charged": 0}
    events: list[tuple[int, int, str, Any]] = []
    seq = itertools.count()
    batched = isinstance(strategy, BatchRoutingStrategy) and window_ms > 0
    pending: list[dict[str, Any]] = []

    def at(t: int, kind: str, payload: Any = None) -> None:
        heapq.heappush(events, (t, next(seq), kind, payload))

    def carry_out(actions: list[Action], now: int) -> None:
        for action in actions:
            if isinstance(action, Send):
                if action.topic == topics.NODE_RESULTS:  # the router's own failure verdict
                    rid = action.record["request_id"]
                    if rid not in done:
                        done.add(rid)
                        counts["failed"] += 1
                else:
                    node = nodes[action.record["hospital_id"]]
                    if node.alive:
                        node.queue.append(action.record)
                        node.health.received(action.record["request"]["priority"])
                        start_next(node, now)
            elif isinstance(action, Audit):
                if action.action == "request.retried":
                    counts["retried"] += 1
                elif action.action == "request.hedged":
                    counts["hedged"] += 1

    def answer(
        node: SimNode, routed: dict[str, Any], status: str, now: int, latency_ms: float
    ) -> None:
        node.health.answered(
            routed["request"]["priority"], latency_ms=latency_ms, ok=status == "ok"
        )
        result = {
            "request_id": routed["request_id"],
            "status": status,
            "node_id": node.spec.hospital_id,
            "kind": "answer",
            "attempt": routed["attempt"],
        }
        rid = routed["request_id"]
        if status == "ok" and rid not in done:  # the accountant keeps the first answer
            done.add(rid)
            completion.append((now - arrived[rid]) / 1000)
        carry_out(dispatcher.on_node_result(result, now_ms=now), now)

    def start_next(node: SimNode, now: int) -> None:
        while node.alive and node.busy < node.spec.servers and node.queue:
            routed = node.queue.popleft()
            if now > routed["deadline_ms"]:
                answer(node, routed, "failed", now, 0.0)  # not started: nothing charged
                continue
            if node.cap - node.spent < routed["reserved_epsilon"]:
                answer(node, routed, "failed", now, 0.0)  # refused: nothing charged
                continue
            node.spent += routed["reserved_epsilon"]  # the mechanism starts: charged
            node.charged_in_run += routed["reserved_epsilon"]
            counts["charged"] += 1
            node.busy += 1
            service = size[routed["request_id"]] * node.spec.service_ms * node.slowdown
            at(now + int(service), "done", (node.spec.hospital_id, routed, service))

    for t, request, _ in trace.arrivals:
        at(t, "arrive", request)
    for t, kind, hospital in trace.faults:
        at(t, kind, hospital)
    end = trace.arrivals[-1][0] + REQUEST_TIMEOUT_MS + int(TTL_S * 1000) if trace.arrivals else 0
    for t in range(-HEARTBEAT_MS, end, HEARTBEAT_MS):
        at(max(t, -HEARTBEAT_MS), "heartbeats")
    for t in range(0, end, TICK_MS):
        at(t, "tick")

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            arrived[payload["request_id"]] = now
            decision = {
                "request_id": payload["request_id"],
                "approved": True,
                "reserved_epsilon": EPSILON,
                "delta": 1e-5,
                "request": payload,
            }
            if batched:
                if not pending:
                    at(now + window_ms, "flush")
                pending.append(decision)
            else:
                carry_out(dispatcher.on_decisions([decision], now_ms=now), now)
        elif kind == "flush":
            batch, pending = pending, []
            carry_out(dispatcher.on_decisions(batch, now_ms=now), now)
        elif kind == "done":
            hospital, routed, service = payload
            node = nodes[hospital]
            if node.alive:
                node.busy -= 1
                answer(node, routed, "ok", now, service)
                start_next(node, now)
        elif kind == "heartbeats":
            for node in nodes.values():
                if node.alive:
                    carry_out(dispatcher.on_heartbeat(node.heartbeat(now), now_ms=now), now)
        elif kind == "tick":
            carry_out(dispatcher.tick(now_ms=now), now)
        elif kind == "slow":
            nodes[payload].slowdown = SLOWDOWN
        elif kind == "die":
            node = nodes[payload]
            node.alive = False
            node.queue.clear()
    counts["failed"] += len(trace.arrivals) - len(done)  # never answered by the end
    return Outcome(
        strategy=label or strategy.name,
        trace=trace.name,
        completion_s=completion,
        failed=counts["failed"],
        retried=counts["retried"],
        hedged=counts["hedged"],
        charged=counts["charged"],
        spent={h: n.charged_in_run for h, n in nodes.items()},
        exhausted=sorted(h for h, n in nodes.items() if n.cap - n.spent < EPSILON),
        started_low=sorted(
            {h for h, f in trace.spent_at_start.items() if f > 0.25}
            | {h for _, kind, h in trace.faults if kind == "die"}
        ),
    )


def run_all(*, duration_s: float, seed: int, window_ms: int, hedged: str) -> list[Outcome]:
    """Every strategy (and `hedged` with hedging on) over every trace, fresh state each."""
    outcomes = []
    for trace in traces(duration_s=duration_s, seed=seed):
        for name in STRATEGIES:
            outcomes.append(simulate(trace, build_strategy(name), window_ms=window_ms))
        outcomes.append(
            simulate(
                trace,
                build_strategy(hedged),
                label=f"{hedged}+hedge",
                window_ms=window_ms,
                hedge=True,
            )
        )
    return outcomes


@dataclass(frozen=True, slots=True)
class Verdict:
    strategy: str
    skewed_p95_ratio: float
    worst_spread: float
    worst_spread_trace: str
    mean_p95_ratio: float  # geometric mean over the traces

    @property
    def holds(self) -> bool:
        return self.skewed_p95_ratio <= 0.7 and self.worst_spread <= 1.5


def verdicts(outcomes: list[Outcome]) -> list[Verdict]:
    """Each strategy (hedged runs aside) against the goals, best first: those that meet both,
    by the geometric mean of their p95 over round-robin's."""
    base = {o.trace: o.pct(0.95) for o in outcomes if o.strategy == "round_robin"}
    out = []
    for name in dict.fromkeys(o.strategy for o in outcomes if "+" not in o.strategy):
        mine = [o for o in outcomes if o.strategy == name]
        ratios = [o.pct(0.95) / base[o.trace] for o in mine]
        worst = max(mine, key=lambda o: o.spread)
        out.append(
            Verdict(
                strategy=name,
                skewed_p95_ratio=next(
                    o.pct(0.95) / base[o.trace] for o in mine if o.trace == "skewed"
                ),
                worst_spread=worst.spread,
                worst_spread_trace=worst.trace,
                mean_p95_ratio=math.exp(sum(math.log(r) for r in ratios) / len(ratios)),
            )
        )
    return sorted(out, key=lambda v: (not v.holds, v.mean_p95_ratio))


def report(outcomes: list[Outcome], *, default: str) -> Verdict:
    """Print the table, the goal checks and the winner; return the winner's verdict."""
    base = {o.trace: o for o in outcomes if o.strategy == "round_robin"}
    header = (
        f"{'trace':<11}{'strategy':<22}{'p50 s':>7}{'p95 s':>8}{'p99 s':>8}"
        f"{'p95/rr':>8}{'failed':>7}{'retry':>6}{'hedge':>6}{'charged':>8}"
        f"{'spread':>7}{'exh':>4}"
    )
    print(header)
    print("-" * len(header))
    for o in outcomes:
        ratio = o.pct(0.95) / base[o.trace].pct(0.95)
        print(
            f"{o.trace:<11}{o.strategy:<22}{o.pct(0.5):>7.2f}{o.pct(0.95):>8.2f}"
            f"{o.pct(0.99):>8.2f}{ratio:>8.2f}{o.failed:>7}{o.retried:>6}{o.hedged:>6}"
            f"{o.charged:>8}{o.spread:>7.2f}{len(o.exhausted):>4}"
        )
    print("\ngoals: skewed p95 ≤ 0.70 × round-robin; budget spread ≤ 1.50 × mean on every trace")
    print(
        f"{'strategy':<16}{'skewed p95/rr':>14}{'worst spread':>13}  {'(trace)':<12}"
        f"{'geo-mean p95/rr':>16}  goals"
    )
    ranked = verdicts(outcomes)
    for v in ranked:
        print(
            f"{v.strategy:<16}{v.skewed_p95_ratio:>14.2f}{v.worst_spread:>13.2f}  "
            f"{v.worst_spread_trace:<12}{v.mean_p95_ratio:>16.2f}  "
            f"{'hold' if v.holds else 'FAIL'}"
        )
    winner = ranked[0]
    print(
        f"\nwinner: {winner.strategy}; configured default: {default}"
        f"{'' if winner.strategy == default else ' (differs: see docs/routing.md)'}"
    )
    return winner


def main() -> None:
    from fedllm.common.config import Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--window-ms",
        type=int,
        default=None,
        help="batching window (default: the router's setting)",
    )
    parser.add_argument("--default", default=None, help="strategy judged against the goals")
    args = parser.parse_args()
    settings = Settings()
    default = args.default or settings.router_strategy
    window = settings.router_batch_window_ms if args.window_ms is None else args.window_ms
    outcomes = run_all(duration_s=args.duration, seed=args.seed, window_ms=window, hedged=default)
    report(outcomes, default=default)


if __name__ == "__main__":
    main()
