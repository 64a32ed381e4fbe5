"""A node answering one part of a fan-out aggregate: status partial, spend ≤ share·ρ."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from fedllm.common import codec
from fedllm.common.config import Settings
from fedllm.common.kafka import now_ms
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon
from fedllm.services.node_worker.service import result_record

if TYPE_CHECKING:  # torch: imported by the tests that build an engine, not at collection
    from fedllm.services.node_worker.answering import Engine
    from fedllm.services.node_worker.model import LoadedModel

DELTA = 1e-5


def routed(
    query: dict[str, Any] | str,
    *,
    kind: str = "aggregate",
    epsilon: float = 1.0,
    share: float = 1.0,
    parts: int = 1,
) -> dict[str, Any]:
    rid = f"req-f-{uuid.uuid4().hex[:8]}"  # a fresh request: the node's store is per request
    inner = {
        "request_id": rid,
        "user_id": "u1",
        "role": "doctor",
        "department": "cardiology",
        "kind": kind,
        "prompt": query if isinstance(query, str) else json.dumps(query),
        "max_tokens": 8,
        "temperature": 1.0,
        "epsilon": epsilon,
        "delta": DELTA,
        "require_consensus": False,
        "priority": "normal",
        "hospitals": ["st_mary", "other"],
        "source_address": "",
        "created_at_ms": now_ms(),
        "deadline_ms": now_ms() + 60_000,
    }
    return {
        "request_id": rid,
        "hospital_id": "st_mary",
        "attempt": 1,
        "reserved_epsilon": epsilon,
        "delta": DELTA,
        "deadline_ms": now_ms() + 60_000,
        "routed_at_ms": now_ms(),
        "request": inner,
        "budget_share": share,
        "parts": parts,
    }


@pytest.fixture
def engine(hospital_data_dir: Path, tiny: LoadedModel) -> Engine:
    from fedllm.services.node_worker.answering import Engine

    return Engine(
        Settings(data_dir=hospital_data_dir), "st_mary", model=tiny, groups=4, rng=random.Random(5)
    )


@pytest.mark.parametrize(
    "query",
    [
        {"op": "count"},
        {"op": "sum", "field": "age"},
        {"op": "mean", "field": "encounters"},
        {"op": "histogram", "field": "diagnosis"},
    ],
)
@pytest.mark.parametrize("share", [0.5, 1 / 3])
def test_part_answers_partial_within_its_share(engine: Engine, query: dict, share: float) -> None:
    out = engine.answer(routed(query, epsilon=1.0, share=share, parts=round(1 / share)))
    assert out["status"] == "partial" and out["is_private"] is True
    assert out["tokens"] == 0 and out["records_used"] == 0
    curve = PrivacyCurve(out["rdp_orders"], out["rdp_epsilons"])
    assert out["rdp_orders"] == list(DEFAULT_ORDERS)
    share_rho = share * rho_for_epsilon(epsilon=1.0, delta=DELTA)
    assert np.all(curve.as_array() <= share_rho * np.asarray(DEFAULT_ORDERS) * (1 + 1e-12))
    assert curve.rho_upper() <= share_rho
    assert out["privacy_cost"] == pytest.approx(curve.epsilon(delta=DELTA))
    assert out["privacy_cost"] < 1.0
    release = json.loads(out["aggregate_json"])
    assert release["op"] == query["op"] and release["delta"] == DELTA
    assert release["epsilon"] == pytest.approx(out["privacy_cost"], rel=1e-6)
    if query["op"] in ("count", "mean"):
        assert isinstance(release["noisy_count"], int) and release["count_sd"] > 0
    if query["op"] in ("sum", "mean"):
        assert isinstance(release["noisy_sum"], float) and release["sum_sd"] > 0
    if query["op"] == "histogram":
        assert release["histogram"] and all(len(kv) == 2 for kv in release["histogram"])
    rec = result_record(routed(query), out, hospital_id="st_mary", started_ms=now_ms())
    assert rec["status"] == "partial" and rec["aggregate_json"] == out["aggregate_json"]
    _, decoded = codec.decode(*codec.encode("InferenceResult", rec))
    assert decoded["aggregate_json"] == out["aggregate_json"]


def test_share_noise_is_wider_than_a_full_reservation(engine: Engine) -> None:
    full = json.loads(engine.answer(routed({"op": "count"}, parts=2))["aggregate_json"])
    half = json.loads(engine.answer(routed({"op": "count"}, share=0.5, parts=2))["aggregate_json"])
    assert half["count_sd"] == pytest.approx(full["count_sd"] * np.sqrt(2), rel=1e-6)


def test_whole_answer_is_unchanged_by_default(engine: Engine) -> None:
    out = engine.answer(routed({"op": "count"}))
    assert out["status"] == "ok" and "aggregate_json" not in out
    rec = result_record(routed({"op": "count"}), out, hospital_id="st_mary", started_ms=now_ms())
    assert rec["aggregate_json"] == ""


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5, float("nan")])
def test_invalid_share_fails_without_release(engine: Engine, share: float) -> None:
    out = engine.answer(routed({"op": "count"}, share=share, parts=2))
    assert out["status"] == "failed" and "budget share" in out["reason"]


def test_generate_is_never_answered_in_parts(engine: Engine) -> None:
    out = engine.answer(routed("Who takes metformin?", kind="generate", share=0.5, parts=2))
    assert out["status"] == "failed" and "aggregate" in out["reason"]


def test_invalid_query_part_fails(engine: Engine) -> None:
    out = engine.answer(routed({"op": "median"}, share=0.5, parts=2))
    assert out["status"] == "failed" and "invalid aggregate query" in out["reason"]
