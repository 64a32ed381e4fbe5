"""Issue #12 item 2: a node answers aggregate queries next to each other in its queue as one
batch — one ledger transaction for their draws and charges, committed before any mechanism
runs, one for their releases — and a batch is answered exactly as one request after the other."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from fedllm.common import topics
from fedllm.common.config import Settings
from fedllm.common.person_ledger import cap_units, charge_units
from fedllm.privacy.rdp import DEFAULT_ORDERS
from fedllm.services.node_worker.ledger import releases
from fedllm.services.node_worker.service import run, wait_ready
from tests.kafka_helpers import collect, produce, with_grant
from tests.node_worker.test_engine import routed
from tests.node_worker.test_ledger import make_engine, node_loop_settings

if TYPE_CHECKING:  # torch: imported by the tests that build an engine, not at collection
    from fedllm.services.node_worker.answering import Engine
    from fedllm.services.node_worker.model import LoadedModel

#: Counts and means over everyone and over a subset, so that both kinds of charge (one running
#: row for everyone, one row per matching person) meet the filter inside one batch.
QUERIES = [
    {"op": "count", "where": {"sex": "F"}},
    {"op": "count"},
    {"op": "mean", "field": "age"},
    {"op": "count", "where": {"sex": "F"}},
    {"op": "count"},
    {"op": "count", "where": {"sex": "M"}},
]


def requests() -> list[dict[str, Any]]:
    return [routed(prompt=json.dumps(q), kind="aggregate", epsilon=1.0) for q in QUERIES]


def spends(engine: Engine) -> dict[str, float]:
    from fedllm.services.node_worker.cohort import load_cohort

    held = {p.person for p in load_cohort(engine.clinosim_dir)}
    return engine.ledger.spends(held)


@pytest.mark.parametrize(
    "node",
    [
        # about 3.8 queries per person: the fourth query of a person leaves them out
        {"person_epsilon": 2.0, "lifetime_epsilon": 100.0},
        # about 2.8 queries in all: the third is refused by the data set's lifetime budget
        {"person_epsilon": 100.0, "lifetime_epsilon": 1.7},
    ],
)
def test_a_batch_answers_exactly_as_one_after_the_other(
    tmp_path: Path, hospital_data_dir: Path, tiny: LoadedModel, node: dict[str, float]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(hospital_data_dir / "hospitals", other / "hospitals")
    one_by_one, batched = (
        make_engine(other, tiny, **node),
        make_engine(hospital_data_dir, tiny, **node),
    )
    reqs = requests()
    want = [one_by_one.answer(r) for r in reqs]
    got = batched.answer_batch(reqs)
    assert got == want  # same noise source, same order: the same releases, bit for bit
    assert spends(batched) == spends(one_by_one)
    assert batched.ledger.lifetime() == one_by_one.ledger.lifetime()
    # The caps bind inside the batch, so the test is not vacuous.
    person_cap = batched.ledger.person_rho_cap
    worst = max(spends(batched).values())
    assert cap_units(worst) <= cap_units(person_cap)
    refused = [a for a in got if a["status"] != "ok"]
    if node["lifetime_epsilon"] < 10:
        assert refused and all("lifetime" in a["reason"] for a in refused)
        spent, cap = batched.ledger.lifetime()
        assert 0 < spent <= cap
    else:
        assert not refused
        assert charge_units(worst) + charge_units(batched.query_rho_cap) > cap_units(person_cap)


def test_a_batch_draws_and_charges_before_any_mechanism_runs(
    hospital_data_dir: Path, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the first mechanism runs, every request of the batch is durably started and every
    draw is committed: a crash from then on fails them closed and charged, never redraws."""
    from fedllm.services.node_worker import answering

    eng = make_engine(hospital_data_dir, tiny, person_epsilon=100.0, lifetime_epsilon=100.0)
    reqs = requests()
    ids = [r["request_id"] for r in reqs]
    seen: list[tuple[list[str], float]] = []
    real = answering.answer_on_cohort

    def spy(**kw: Any) -> Any:
        with eng.ledger.engine.connect() as conn:  # another connection: committed state only
            rows = conn.execute(
                select(releases.c.request_id, releases.c.state).where(
                    releases.c.request_id.in_(ids)
                )
            ).all()
        states = {r.request_id: r.state for r in rows}
        seen.append(([states.get(i, "absent") for i in ids], eng.ledger.lifetime()[0]))
        return real(**kw)

    monkeypatch.setattr(answering, "answer_on_cohort", spy)
    out = eng.answer_batch(reqs)
    assert [a["status"] for a in out] == ["ok"] * len(reqs)
    first_states, first_spent = seen[0]
    assert first_states == ["started"] * len(reqs)
    assert first_spent == pytest.approx(len(reqs) * eng.query_rho_cap, rel=1e-9)


async def test_the_node_loop_batches_queued_aggregates_and_replays_them(
    kafka_bootstrap: str, tmp_path: Path, clinosim_source: Path, tiny: LoadedModel
) -> None:
    """Aggregates queued before the node starts are answered in batches, each exactly once;
    a fresh node on the same store re-sends the same releases (no second draw)."""
    settings = await node_loop_settings(
        kafka_bootstrap, tmp_path, clinosim_source, node_load_model=False
    )
    hid = settings.hospitals[0].id
    batches: list[int] = []

    def factory(s: Settings, h: str) -> Engine:
        from fedllm.services.node_worker.answering import Engine

        eng = Engine(s, h, model=tiny, groups=4)
        real = eng.answer_batch

        def counted(reqs: list[Any]) -> list[Any]:
            batches.append(len(reqs))
            return real(reqs)

        eng.answer_batch = counted  # type: ignore[method-assign]
        return eng

    reqs = []
    for r in requests():
        r["hospital_id"] = hid
        reqs.append(with_grant(r))
    ids = {r["request_id"] for r in reqs}

    async def serve(expected: int) -> list[dict[str, Any]]:
        for r in reqs:  # all queued before the node polls
            await produce(settings, topics.hospital_requests(hid), "RoutedRequest", r, key=hid)
        stop = asyncio.Event()
        task = asyncio.create_task(run(settings, hid, stop=stop, engine_factory=factory))
        try:
            await wait_ready(settings, hid, timeout_s=60)

            def mine(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return [r for r in rs if r.get("request_id") in ids]

            return mine(
                await collect(
                    settings,
                    topics.NODE_RESULTS,
                    until=lambda rs: len(mine(rs)) >= expected,
                    timeout_s=60,
                )
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)

    def stage_count() -> float:
        labels = {"service": "node_worker", "stage": "RoutedRequest", "outcome": "ok"}
        return REGISTRY.get_sample_value("fedllm_stage_requests_total", labels) or 0.0

    counted = stage_count()
    first = await serve(len(reqs))
    assert stage_count() - counted == len(reqs)  # the stage metric counts messages, not batches
    assert sorted(r["request_id"] for r in first) == sorted(ids)  # each exactly once
    assert all(r["status"] == "ok" for r in first)
    assert max(batches) > 1 and sum(batches) == len(reqs)
    both = await serve(2 * len(reqs))  # a fresh node, the same store, the same requests again
    assert sum(batches) == len(reqs)  # replays reach no engine: nothing is drawn twice
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in both:
        by_id.setdefault(r["request_id"], []).append(r)
    for a, b in by_id.values():
        for k in ("status", "response", "rdp_epsilons", "privacy_cost"):
            assert a[k] == b[k]


def test_an_error_in_one_mechanism_fails_that_request_closed_and_charged(
    hospital_data_dir: Path, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rest of the batch is answered; the failed one reports its whole reservation (its ρ
    was drawn) and none of the error's text, which may depend on the records."""
    from fedllm.services.node_worker import answering

    eng = make_engine(hospital_data_dir, tiny, person_epsilon=100.0, lifetime_epsilon=100.0)
    calls: list[int] = []
    real = answering.answer_on_cohort

    def second_fails(**kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("patient p-0042 has no age")
        return real(**kw)

    monkeypatch.setattr(answering, "answer_on_cohort", second_fails)
    out = eng.answer_batch(requests()[:3])
    assert [a["status"] for a in out] == ["ok", "failed", "ok"]
    assert out[1]["reason"] == "mechanism failed closed: internal error"
    assert out[1]["privacy_cost"] > 0
    drawn = eng.query_rho_cap * np.asarray(DEFAULT_ORDERS)  # the whole reservation: ρ·α
    np.testing.assert_allclose(out[1]["rdp_epsilons"], drawn)
