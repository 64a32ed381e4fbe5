"""Each routing strategy on hand-built node states (pure, no broker), and the shared candidate set."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from fedllm.services.router.assignment import PRIORITY_WEIGHT, BatchAssignment
from fedllm.services.router.power_of_two import PowerOfTwoChoices
from fedllm.services.router.privacy_aware import PrivacyAware, budget_pressures, level_pressure
from fedllm.services.router.registry import NodeInfo, NodeRegistry
from fedllm.services.router.response_time import WeightedResponseTime
from fedllm.services.router.round_robin import RoundRobin
from fedllm.services.router.strategies import STRATEGIES, build_strategy
from fedllm.services.router.strategy import BatchRoutingStrategy, candidates
from tests.router.helpers import heartbeat, request


def pool(*beats: dict[str, Any], routed: dict[str, float] | None = None) -> list[NodeInfo]:
    reg = NodeRegistry(ttl_s=5)
    for hb in beats:
        reg.observe(hb, now_ms=0)
    for hospital, eps in (routed or {}).items():
        reg.note_routed(hospital, epsilon=eps)
    return reg.alive(0)


def node(hospital_id: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("departments", ("cardiology",))
    return heartbeat(hospital_id, sent_at_ms=0, **kw)


CARDIO = request("r1", department="cardiology", created_ms=0, deadline_ms=10_000)


def chosen(strategy: Any, req: dict[str, Any], nodes: list[NodeInfo], **kw: Any) -> str:
    choice = strategy.choose(req, nodes, **kw)
    assert choice is not None
    return choice.node.hospital_id


# -- the shared candidate set ----------------------------------------------------------------


def test_candidates_leave_out_failing_exhausted_unhealthy_excluded_and_unnamed_nodes() -> None:
    nodes = pool(
        node("ok"),
        node("failing", error_rate=0.5),
        node("exhausted", budget_room=0),
        node("down", healthy=False),
        node("tried"),
        node("general", departments=("general",)),
        node("low_room", budget_room=1),
        node("flaky", error_rate=0.49),
    )
    got = candidates(CARDIO, nodes, exclude={"tried"})
    assert got is not None and got.serve_department
    assert got.ids == ("flaky", "low_room", "ok")
    named = request(
        "r2", department="cardiology", hospitals=("general", "failing"), created_ms=0, deadline_ms=1
    )
    only_general = candidates(named, nodes)
    assert only_general is not None and only_general.ids == ("general",)
    assert not only_general.serve_department
    assert "no eligible node serves cardiology" in only_general.because("x")
    assert candidates(named, nodes, exclude={"general"}) is None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_respects_the_candidate_set(name: str) -> None:
    strategy = build_strategy(name)
    nodes = pool(
        node("a", error_rate=0.9),
        node("b"),
        node("c", departments=("general",)),
        node("d", budget_room=0),
    )
    for _ in range(5):
        choice = strategy.choose(CARDIO, nodes)
        assert choice is not None and choice.node.hospital_id == "b"
        assert choice.candidates == ("b",) and choice.reason.startswith("serves cardiology")
    assert strategy.choose(CARDIO, nodes, exclude={"b"}).node.hospital_id == "c"  # type: ignore[union-attr]
    assert strategy.choose(CARDIO, nodes, exclude={"b", "c"}) is None
    assert strategy.name == name


def test_unknown_strategy_name_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        build_strategy("quantum")


# -- round-robin -----------------------------------------------------------------------------


def test_round_robin_cycles_whatever_the_load() -> None:
    rr = RoundRobin()
    nodes = pool(node("a"), node("b", queue_depth=50), node("c", latency_ms=9999))
    assert [chosen(rr, CARDIO, nodes) for _ in range(7)] == list("abcabca")
    # a different candidate set has its own turn
    assert chosen(rr, CARDIO, nodes, exclude={"a"}) == "b"


# -- weighted response time ------------------------------------------------------------------


def test_response_time_weighs_latency_by_load() -> None:
    wrt = WeightedResponseTime()
    # a: 100 ms × (0 + 1) = 100; b: 20 ms × (3 + 1) = 80
    nodes = pool(node("a", ewma_latency_ms=100), node("b", ewma_latency_ms=20, queue_depth=3))
    assert chosen(wrt, CARDIO, nodes) == "b"
    # least load alone would take a; one more queued request at b tips it: 20 × 5 = 100 … tie → a
    nodes = pool(node("a", ewma_latency_ms=100), node("b", ewma_latency_ms=20, queue_depth=4))
    assert chosen(wrt, CARDIO, nodes) == "a"


def test_response_time_prefers_ewma_and_costs_unknown_latency_at_the_mean() -> None:
    wrt = WeightedResponseTime()
    # recent mean says b is fast, its EWMA says slow: the EWMA wins
    nodes = pool(
        node("a", latency_ms=50, ewma_latency_ms=50), node("b", latency_ms=1, ewma_latency_ms=500)
    )
    assert chosen(wrt, CARDIO, nodes) == "a"
    # c has no latency yet: costed at the mean of a and b (60), so it beats a (20 × 6) and b
    nodes = pool(
        node("a", ewma_latency_ms=20, latency_ms=0, queue_depth=5),
        node("b", ewma_latency_ms=100, latency_ms=0),
        node("c", latency_ms=0),
    )
    assert chosen(wrt, CARDIO, nodes) == "c"
    nodes = pool(
        node("a", ewma_latency_ms=20, latency_ms=0, queue_depth=1),
        node("b", ewma_latency_ms=100, latency_ms=0),
        node("c", latency_ms=0),
    )
    assert chosen(wrt, CARDIO, nodes) == "a"  # 40 < 60


# -- power of two choices --------------------------------------------------------------------


def test_two_choices_never_picks_the_most_loaded_and_is_reproducible() -> None:
    nodes = pool(node("a", queue_depth=1), node("b", queue_depth=5), node("c", queue_depth=9))
    p2c = PowerOfTwoChoices(seed=3)
    picks = [chosen(p2c, CARDIO, nodes) for _ in range(300)]
    assert "c" not in picks
    assert {"a", "b"} <= set(picks)  # random probes: not always the global minimum
    assert picks.count("a") > picks.count("b")  # a wins every probe it is in (2/3 of them)
    again = PowerOfTwoChoices(seed=3)
    assert [chosen(again, CARDIO, nodes) for _ in range(300)] == picks


# -- privacy-aware ---------------------------------------------------------------------------


def test_level_pressure_triples_per_level_lost() -> None:
    nodes = pool(*(node(f"level{lv}", budget_room=lv) for lv in (4, 3, 2, 1, -1)))
    pressure = {n.budget_room: level_pressure(n) for n in nodes}
    assert pressure == {4: 1.0, 3: 3.0, 2: 9.0, 1: 27.0, -1: 1.0}


def test_privacy_aware_prefers_room_then_trades_it_against_speed() -> None:
    pa = PrivacyAware()
    nodes = pool(node("full", budget_room=4), node("lower", budget_room=3))
    assert chosen(pa, CARDIO, nodes) == "full"
    # a level less room (pressure 3) wins only when its wait is three times shorter
    nodes = pool(
        node("full", budget_room=4, ewma_latency_ms=100, queue_depth=2),
        node("lower", budget_room=3, ewma_latency_ms=100),
    )
    assert chosen(pa, CARDIO, nodes) == "full"  # 300 × 1 vs 100 × 3: tie → more room
    nodes = pool(
        node("full", budget_room=4, ewma_latency_ms=100, queue_depth=3),
        node("lower", budget_room=3, ewma_latency_ms=100),
    )
    assert chosen(pa, CARDIO, nodes) == "lower"  # 400 vs 300


def test_privacy_aware_spreads_by_routed_share_within_a_level() -> None:
    pa = PrivacyAware()
    nodes = pool(
        node("a", budget_room=4, ewma_latency_ms=100),
        node("b", budget_room=4, ewma_latency_ms=150),
        routed={"a": 100.0, "b": 20.0},
    )
    pressures = budget_pressures(nodes)
    assert pressures["b"] == 1.0 and pressures["a"] > 1.5**3  # a holds 110/70 of the mean
    assert chosen(pa, CARDIO, nodes) == "b"  # slower, but a's patients have paid more
    even = pool(
        node("a", budget_room=4, ewma_latency_ms=100), node("b", budget_room=4, ewma_latency_ms=150)
    )
    assert chosen(pa, CARDIO, even) == "a"


# -- assignment optimiser --------------------------------------------------------------------


def test_assignment_is_a_batch_strategy_and_single_choice_is_a_batch_of_one() -> None:
    opt = BatchAssignment()
    assert isinstance(opt, BatchRoutingStrategy)
    assert not isinstance(WeightedResponseTime(), BatchRoutingStrategy)
    # expected completion decides, not latency: a = 100 × (2 + 1) = 300 > b = 200 × 1
    nodes = pool(node("a", ewma_latency_ms=100, queue_depth=2), node("b", ewma_latency_ms=200))
    assert chosen(opt, CARDIO, nodes) == "b"
    nodes = pool(node("a", ewma_latency_ms=100, queue_depth=0), node("b", ewma_latency_ms=200))
    assert chosen(opt, CARDIO, nodes) == "a"


def test_assignment_gives_the_high_priority_request_the_earliest_slot() -> None:
    opt = BatchAssignment()
    nodes = pool(node("fast", ewma_latency_ms=100), node("slower", ewma_latency_ms=150))
    normal = request("n", department="cardiology", created_ms=0, deadline_ms=1)
    high = request("h", department="cardiology", created_ms=0, deadline_ms=1, priority="high")
    n_choice, h_choice = opt.choose_batch([normal, high], nodes)
    assert h_choice is not None and h_choice.node.hospital_id == "fast"
    assert n_choice is not None and n_choice.node.hospital_id == "slower"
    # one at a time, the normal request (first) would have taken the fast node
    assert chosen(opt, normal, nodes) == "fast"


def test_assignment_keeps_each_request_in_its_candidate_set() -> None:
    opt = BatchAssignment()
    nodes = pool(
        node("cardio_slow", ewma_latency_ms=5000),
        node("general_fast", departments=("general",), ewma_latency_ms=10),
    )
    cardio = request("c", department="cardiology", created_ms=0, deadline_ms=1)
    general = request("g", department="general", created_ms=0, deadline_ms=1)
    nowhere = request("x", department="general", hospitals=("gone",), created_ms=0, deadline_ms=1)
    choices = opt.choose_batch([cardio, general, nowhere], nodes)
    assert [c.node.hospital_id if c else None for c in choices] == [
        "cardio_slow",
        "general_fast",
        None,
    ]


def _brute_force(requests: list[dict[str, Any]], nodes: list[NodeInfo]) -> float:
    """The least total cost over every placement (slot order on a node chosen optimally)."""
    best = float("inf")
    for placement in itertools.product(nodes, repeat=len(requests)):
        total = 0.0
        for n in nodes:
            mine = sorted(
                (
                    PRIORITY_WEIGHT[r["priority"]]
                    for r, p in zip(requests, placement, strict=True)
                    if p is n
                ),
                reverse=True,
            )
            total += sum(w * n.latency_ms * (n.load + j + 1) for j, w in enumerate(mine))
        best = min(best, total)
    return best


def test_assignment_total_cost_matches_brute_force() -> None:
    opt = BatchAssignment(privacy_weight=0.0)
    nodes = pool(
        node("a", ewma_latency_ms=100, queue_depth=2),
        node("b", ewma_latency_ms=250),
        node("c", ewma_latency_ms=400, in_flight=1),
    )
    prios = ["high", "normal", "low", "normal", "high"]
    reqs = [
        request(f"r{i}", department="cardiology", created_ms=0, deadline_ms=1, priority=p)
        for i, p in enumerate(prios)
    ]
    choices = opt.choose_batch(reqs, nodes)
    assert all(c is not None for c in choices)
    placed: dict[str, list[float]] = {}
    for r, c in zip(reqs, choices, strict=True):
        placed.setdefault(c.node.hospital_id, []).append(PRIORITY_WEIGHT[r["priority"]])  # type: ignore[union-attr]
    by_id = {n.hospital_id: n for n in nodes}
    total = sum(
        w * by_id[h].latency_ms * (by_id[h].load + j + 1)
        for h, ws in placed.items()
        for j, w in enumerate(sorted(ws, reverse=True))
    )
    assert total == pytest.approx(_brute_force(reqs, nodes))


def test_assignment_privacy_pressure_moves_work_off_a_low_room_hospital() -> None:
    nodes = pool(
        node("low", budget_room=1, ewma_latency_ms=100),
        node("full", budget_room=4, ewma_latency_ms=300),
    )
    assert chosen(BatchAssignment(privacy_weight=0.0), CARDIO, nodes) == "low"
    assert chosen(BatchAssignment(privacy_weight=1.0), CARDIO, nodes) == "full"
    with pytest.raises(ValueError):
        BatchAssignment(privacy_weight=-1)
