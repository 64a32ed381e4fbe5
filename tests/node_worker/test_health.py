"""The heartbeat's health figures: EWMAs, queue by priority, the coarse budget-room level."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedllm.common import codec
from fedllm.common.config import Settings
from fedllm.services.node_worker.health import EWMA_ALPHA, NodeHealth, budget_room_level
from fedllm.services.node_worker.service import NodeState, heartbeat_record


@pytest.mark.parametrize(
    ("room", "level"),
    [
        (None, -1),
        (math.nan, 0),
        (-0.5, 0),
        (0.0, 0),
        (0.009, 0),
        (0.01, 1),
        (0.2499, 1),
        (0.25, 2),
        (0.5, 3),
        (0.7499, 3),
        (0.75, 4),
        (1.0, 4),
    ],
)
def test_budget_room_is_a_coarse_level(room: float | None, level: int) -> None:
    assert budget_room_level(room) == level


def test_ewmas_are_seeded_by_the_first_answer_then_weighted() -> None:
    h = NodeHealth()
    h.received("high")
    h.received("normal")
    h.received("normal")
    assert h.queue_by_priority() == {"high": 1, "normal": 2}
    h.answered("high", latency_ms=100.0, ok=True)
    assert (h.ewma_latency_ms, h.error_rate) == (100.0, 0.0)
    h.answered("normal", latency_ms=200.0, ok=False)
    assert h.ewma_latency_ms == pytest.approx(100 + EWMA_ALPHA * 100)
    assert h.error_rate == pytest.approx(EWMA_ALPHA)
    assert h.queue_by_priority() == {"normal": 1}
    h.answered("low", latency_ms=0.0, ok=True)  # never received: the queue does not go negative
    assert h.queue_by_priority() == {"normal": 1}


class _Engine:
    model_name = "tiny"
    device = "cpu"

    def __init__(self, room: Any) -> None:
        self._room = room

    def budget_room(self) -> float | None:
        if isinstance(self._room, Exception):
            raise self._room
        return self._room


@pytest.mark.parametrize(("room", "level"), [(0.6, 3), (None, -1), (RuntimeError("db"), -1)])
def test_heartbeat_carries_health_and_encodes(room: Any, level: int) -> None:
    settings = Settings()
    hospital = settings.hospitals[0].id
    state = NodeState(engine=_Engine(room))
    state.health.received("high")
    record = heartbeat_record(settings, hospital, state)
    assert record["budget_room"] == level
    assert record["queue_by_priority"] == {"high": 1}
    value, headers = codec.encode("NodeHeartbeat", record)
    name, decoded = codec.decode(value, headers)
    assert name.endswith("NodeHeartbeat") and decoded["budget_room"] == level


def test_an_engine_without_a_ledger_reports_unknown_room() -> None:
    settings = Settings()
    record = heartbeat_record(settings, settings.hospitals[0].id, NodeState())
    assert record["budget_room"] == -1 and record["error_rate"] == 0.0
