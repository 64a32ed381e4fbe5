"""Smoke test of bench/routing_sim.py: a short run of every strategy over every trace.

Simulated time only (no wall clock), so the figures are deterministic for a seed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fedllm.common.config import Settings
from fedllm.services.router.strategies import STRATEGIES

SIM_PATH = Path(__file__).resolve().parents[2] / "bench" / "routing_sim.py"


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("routing_sim", SIM_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["routing_sim"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # every strategy on every trace: seconds
def test_every_strategy_runs_every_trace_and_accounts_for_every_request(
    sim: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    traces = {t.name: t for t in sim.traces(duration_s=60, seed=1)}
    assert set(traces) == {"steady", "bursty", "skewed", "slow_node", "node_dies", "budget_cap"}
    outcomes = sim.run_all(duration_s=60, seed=1, window_ms=50, hedged="privacy_aware")
    assert {(o.trace, o.strategy) for o in outcomes} == {
        (t, s) for t in traces for s in [*STRATEGIES, "privacy_aware+hedge"]
    }
    for o in outcomes:
        n = len(traces[o.trace].arrivals)
        assert len(o.completion_s) + o.failed == n, (o.trace, o.strategy)
        assert o.charged >= len(o.completion_s)  # every answer started a charged mechanism
        assert o.hedged == 0 or o.strategy.endswith("+hedge")
    by = {(o.trace, o.strategy): o for o in outcomes}
    # what round-robin keeps sending to the dead node until its TTL runs out is retried
    assert by["node_dies", "round_robin"].retried > 0
    assert by["node_dies", "round_robin"].failed < len(traces["node_dies"].arrivals) / 10
    # round-robin ignores load: on the skewed trace least load does better at the tail
    assert by["skewed", "least_load"].pct(0.95) < by["skewed", "round_robin"].pct(0.95)
    # the near-cap hospital is spared by the privacy-aware strategy
    assert (
        by["budget_cap", "privacy_aware"].spent["h2"] < by["budget_cap", "round_robin"].spent["h2"]
    )
    winner = sim.report(outcomes, default=Settings().router_strategy)
    printed = capsys.readouterr().out
    assert "winner:" in printed and "round_robin" in printed
    assert winner.strategy in STRATEGIES


def test_same_seed_same_figures(sim: ModuleType) -> None:
    trace = sim.traces(duration_s=60, seed=1)[2]
    a = sim.simulate(trace, STRATEGIES["power_of_two"](), window_ms=50)
    b = sim.simulate(trace, STRATEGIES["power_of_two"](), window_ms=50)
    assert a.completion_s == b.completion_s and a.spent == b.spent
