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


def routed(
    *, prompt: str, kind: str = "generate", epsilon: float = 5.0, max_tokens: int = 8
) -> dict[str, Any]:
    rid = f"req-1-{uuid.uuid4().hex[:8]}"  # a fresh request: the node's store is per request
    inner = {
        "request_id": rid,
        "user_id": "u1",
        "role": "doctor",
        "department": "cardiology",
        "kind": kind,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "epsilon": epsilon,
        "delta": 1e-5,
        "require_consensus": False,
        "priority": "normal",
        "hospitals": [],
        "source_address": "",
        "created_at_ms": now_ms(),
        "deadline_ms": now_ms() + 60_000,
    }
    return {
        "request_id": rid,
        "hospital_id": "st_mary",
        "attempt": 1,
        "reserved_epsilon": epsilon,
        "delta": 1e-5,
        "deadline_ms": now_ms() + 60_000,
        "routed_at_ms": now_ms(),
        "request": inner,
    }


@pytest.fixture
def engine(hospital_data_dir: Path, tiny: LoadedModel) -> Engine:
    from fedllm.services.node_worker.answering import Engine

    settings = Settings(data_dir=hospital_data_dir)
    return Engine(settings, "st_mary", model=tiny, groups=4, rng=random.Random(3))


def test_generate_returns_a_valid_private_result(engine: Engine) -> None:
    out = engine.answer(routed(prompt="Which patients take metformin?", epsilon=5.0))
    assert out["status"] == "ok" and out["is_private"] is True
    assert 0 < out["tokens"] <= 8
    assert out["records_used"] == 0  # never leaves the node
    assert out["rdp_orders"] == list(DEFAULT_ORDERS)
    # The whole reservation is reported (capped per query at the node's max_query_epsilon).
    rho = min(rho_for_epsilon(epsilon=5.0, delta=1e-5), engine.query_rho_cap)
    np.testing.assert_allclose(out["rdp_epsilons"], rho * np.asarray(DEFAULT_ORDERS))
    assert out["privacy_cost"] <= 5.0 + 1e-9
    assert out["privacy_cost"] == pytest.approx(
        PrivacyCurve(out["rdp_orders"], out["rdp_epsilons"]).epsilon(delta=1e-5)
    )
    rec = result_record(routed(prompt="x"), out, hospital_id="st_mary", started_ms=now_ms())
    codec.encode("InferenceResult", rec)  # the schema accepts it


def test_unknown_kind_and_bad_budget_fail_cleanly(engine: Engine) -> None:
    assert engine.answer(routed(prompt="x", kind="bogus"))["status"] == "failed"
    bad = routed(prompt="x")
    bad["delta"] = 0.0
    assert engine.answer(bad)["status"] == "failed"


def test_aggregate_reports_the_reservation(engine: Engine) -> None:
    out = engine.answer(routed(prompt=json.dumps({"op": "count"}), kind="aggregate", epsilon=0.5))
    assert out["status"] == "ok" and out["records_used"] == 0 and "About" in out["response"]
    rho = rho_for_epsilon(epsilon=0.5, delta=1e-5)
    assert out["privacy_cost"] == pytest.approx(PrivacyCurve.from_rho(rho).epsilon(delta=1e-5))


def test_aggregate_bad_json_fails(engine: Engine) -> None:
    out = engine.answer(routed(prompt="not json", kind="aggregate"))
    assert out["status"] == "failed" and out["is_private"] is False


@pytest.mark.slow
def test_real_model_answers_in_english(hospital_data_dir: Path, models_dir: Path) -> None:
    import torch

    from fedllm.services.node_worker.answering import Engine
    from fedllm.services.node_worker.model import cache_dir_for, load_model

    torch.set_num_threads(1)
    lm = load_model(cache_dir=cache_dir_for(models_dir.parent), device=torch.device("cpu"))
    settings = Settings(data_dir=hospital_data_dir)
    eng = Engine(settings, "st_mary", model=lm, groups=4, max_note_chars=300, rng=random.Random(0))
    out = eng.answer(routed(prompt="What is hypertension?", epsilon=10.0, max_tokens=12))
    assert out["status"] == "ok" and out["is_private"]
    words = out["response"].split()
    assert words, out
    assert sum(w.strip(".,;:!?").isalpha() for w in words) >= len(words) / 2
    assert out["privacy_cost"] <= 10.0 + 1e-9
