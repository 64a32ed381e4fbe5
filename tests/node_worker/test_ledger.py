"""Issue #11, items 3 and 5: the hospital's own store — releases persisted before publishing and
re-sent after a restart, a lifetime budget for the data set, and a per-person filter."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from fedllm import cli
from fedllm.common import topics
from fedllm.common.config import HospitalConfig, Settings
from fedllm.common.kafka import ensure_topics
from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon
from fedllm.services.node_worker.ledger import NodeLedger
from fedllm.services.node_worker.records import person_of
from fedllm.services.node_worker.service import run, wait_ready
from fedllm.services.node_worker.settings import NodeSettings
from tests.kafka_helpers import GRANT_PUBLIC, collect, produce, unique_namespace, with_grant
from tests.node_worker.test_engine import routed

if TYPE_CHECKING:  # torch: imported by the tests that build an engine, not at collection
    from fedllm.services.node_worker.answering import Engine
    from fedllm.services.node_worker.model import LoadedModel

QUESTION = "Which patients had chest pain or hypertension?"
RHO1 = rho_for_epsilon(epsilon=1.0, delta=1e-5)


def make_engine(data_dir: Path, tiny: LoadedModel, *, routes: bool = False, **node: Any) -> Engine:
    """An engine on the decoding path (`routes=True`: with the answer-level routes too)."""
    from fedllm.services.node_worker.answering import Engine

    return Engine(
        Settings(data_dir=data_dir, answer_routes=routes),
        "st_mary",
        model=tiny,
        groups=4,
        rng=random.Random(2),
        node_settings=NodeSettings(**node),
    )


def spends(engine: Engine) -> dict[str, float]:
    """The persons with a non-zero spend (over every person the hospital holds)."""
    from fedllm.services.node_worker.cohort import load_cohort

    held = engine.records.all_persons() | {p.person for p in load_cohort(engine.clinosim_dir)}
    return {p: s for p, s in engine.ledger.spends(held).items() if s > 0}


def test_lifetime_budget_refuses_before_any_record_is_read(
    hospital_data_dir: Path, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = make_engine(hospital_data_dir, tiny, lifetime_epsilon=1.2, max_query_epsilon=1.0)
    assert eng.answer(routed(prompt=QUESTION, epsilon=1.0, max_tokens=2))["status"] == "ok"
    monkeypatch.setattr(eng.records, "retrieve", lambda *a, **k: pytest.fail("records read"))
    monkeypatch.setattr(
        "fedllm.services.node_worker.answering.load_cohort", lambda *a: pytest.fail("records read")
    )
    for kind, prompt in (("generate", QUESTION), ("aggregate", json.dumps({"op": "count"}))):
        out = eng.answer(routed(prompt=prompt, kind=kind, epsilon=1.0))
        assert out["status"] == "failed" and "lifetime" in out["reason"]
        assert not out.get("rdp_epsilons")  # nothing started: nothing charged
    s = eng.ledger.summary(query_rho=RHO1)
    assert s.rho_spent == pytest.approx(RHO1) and s.rho_cap == pytest.approx(
        rho_for_epsilon(epsilon=1.2, delta=1e-5)
    )


def test_no_reset_path_reopening_cannot_raise_the_cap(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    a = NodeLedger(url, hospital_id="h", rho_cap=1.0, person_rho_cap=1.0)
    assert a.begin("r", 1, rho=0.6) is None
    b = NodeLedger(url, hospital_id="h", rho_cap=100.0, person_rho_cap=1.0)
    assert b.summary(query_rho=0).rho_cap == 1.0 and b.summary(query_rho=0).rho_spent == 0.6
    assert b.begin("r2", 1, rho=0.6).state == "refused"
    assert not any(hasattr(b, name) for name in ("reset", "refund", "set_spent"))


def test_hospitals_sharing_one_store_keep_their_own_releases(tmp_path: Path) -> None:
    """A fan-out sends one request id to several hospitals: on a shared store each hospital's
    draw, charge mark and release are its own (no hospital re-sends another's release)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a = NodeLedger(url, hospital_id="a", rho_cap=1.0, person_rho_cap=1.0)
    b = NodeLedger(url, hospital_id="b", rho_cap=1.0, person_rho_cap=1.0)
    assert a.begin("r", 0, rho=0.1) is None
    assert b.lookup("r", 0) is None
    assert b.begin("r", 0, rho=0.1) is None  # b draws too: a's row is not b's
    a.charge_persons("r", 0, {"p1"}, rho=0.1)
    b.charge_persons("r", 0, {"p1"}, rho=0.1)  # not skipped as already charged
    assert a.spends({"p1"}) == pytest.approx({"p1": 0.1})
    assert b.spends({"p1"}) == pytest.approx({"p1": 0.1})
    assert a.release("r", 0, {"status": "ok", "response": "from a"})["response"] == "from a"
    assert b.release("r", 0, {"status": "ok", "response": "from b"})["response"] == "from b"
    stored = b.lookup("r", 0)
    assert stored is not None and stored.fields == {"status": "ok", "response": "from b"}


def test_person_filter_charges_matched_groups_and_drops_persons_at_cap(
    hospital_data_dir: Path, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = make_engine(
        hospital_data_dir, tiny, person_epsilon=1.2, max_query_epsilon=1.0, lifetime_epsilon=100.0
    )
    hits = eng.records.retrieve(QUESTION, per_group=1)
    matched = {g for g, notes in enumerate(hits) if notes}
    expect = set().union(*(eng.records.persons(g) for g in matched))
    assert 0 < len(matched)
    assert eng.answer(routed(prompt=QUESTION, epsilon=1.0, max_tokens=2))["status"] == "ok"
    got = spends(eng)
    assert set(got) == expect and all(v == pytest.approx(RHO1) for v in got.values())
    # Second query: those persons cannot take another ε=1, so they leave retrieval.
    seen: list[frozenset[str]] = []
    real = eng.records.retrieve

    def spy(question: str, *, per_group: int, exclude: frozenset[str] = frozenset()):
        seen.append(exclude)
        return real(question, per_group=per_group, exclude=exclude)

    monkeypatch.setattr(eng.records, "retrieve", spy)
    assert eng.answer(routed(prompt=QUESTION, epsilon=1.0, max_tokens=2))["status"] == "ok"
    assert seen == [frozenset(expect)]
    for notes in real(QUESTION, per_group=5, exclude=frozenset(expect)):
        assert all(person_of(n.patient_id) not in expect for n in notes)
    assert eng.ledger.summary(query_rho=RHO1).persons_at_cap == len(expect)


def test_aggregate_charges_only_matching_persons(
    hospital_data_dir: Path, tiny: LoadedModel
) -> None:
    from fedllm.services.node_worker.aggregate import parse_query
    from fedllm.services.node_worker.cohort import load_cohort

    eng = make_engine(hospital_data_dir, tiny, person_epsilon=1.2, lifetime_epsilon=100.0)
    query = {"op": "count", "where": {"sex": "F"}}
    cohort = load_cohort(eng.clinosim_dir)
    q = parse_query(query)
    women = {p.person for p in cohort if q.matches(p)}
    assert 0 < len(women) < len({p.person for p in cohort})
    out = eng.answer(routed(prompt=json.dumps(query), kind="aggregate", epsilon=1.0))
    assert out["status"] == "ok"
    assert set(spends(eng)) == women


def test_started_but_unreleased_fails_closed_and_charged(
    hospital_data_dir: Path, tiny: LoadedModel
) -> None:
    eng = make_engine(hospital_data_dir, tiny)
    req = routed(prompt=QUESTION, epsilon=1.0)
    assert eng.ledger.begin(req["request_id"], req["attempt"], rho=RHO1) is None  # then "crash"
    out = eng.answer(req)
    assert out["status"] == "failed" and "restarted" in out["reason"]
    np.testing.assert_allclose(out["rdp_epsilons"], RHO1 * np.asarray(DEFAULT_ORDERS))


def test_privacy_ledger_cli(
    hospital_data_dir: Path,
    tiny: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    eng = make_engine(hospital_data_dir, tiny, person_epsilon=1.2)
    eng.answer(routed(prompt=QUESTION, epsilon=1.0, max_tokens=2))
    monkeypatch.setenv("FEDLLM_DATA_DIR", str(hospital_data_dir))
    monkeypatch.setenv("FEDLLM_NODE_PERSON_EPSILON", "1.2")
    assert cli.main(["privacy", "ledger", "--hospital", "st_mary"]) == 0
    out = capsys.readouterr().out
    assert "lifetime spend" in out and "lifetime cap" in out
    at_cap = eng.ledger.summary(query_rho=RHO1).persons_at_cap
    assert at_cap > 0 and f"persons at cap   {at_cap}" in out


async def node_loop_settings(
    kafka_bootstrap: str, tmp_path: Path, clinosim_source: Path, **extra: Any
) -> Settings:
    """Settings for one node loop on the test broker: a fresh hospital (a copy of the clinosim
    records under ``tmp_path``) in its own topic namespace, its topics created."""
    hid = f"h{uuid.uuid4().hex[:8]}"
    shutil.copytree(clinosim_source, tmp_path / "hospitals" / hid / "clinosim")
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        data_dir=tmp_path,
        heartbeat_interval_s=0.3,
        reservation_verify_key=GRANT_PUBLIC,
        answer_routes=False,
        hospitals=[HospitalConfig(id=hid, departments=["cardiology"])],
        **extra,
    )
    await ensure_topics(settings, {**topics.all_topics([hid])})
    return settings


async def test_restarted_node_resends_the_same_release(
    kafka_bootstrap: str, tmp_path: Path, clinosim_source: Path, tiny: LoadedModel
) -> None:
    """Run the node loop, stop it, start a fresh one (new engine, new noise source) on the same
    store, redeliver the request: the same release goes out and no mechanism runs again."""
    settings = await node_loop_settings(kafka_bootstrap, tmp_path, clinosim_source)
    hid = settings.hospitals[0].id
    runs: list[int] = []

    def factory(s: Settings, h: str) -> Engine:
        from fedllm.services.node_worker.answering import Engine

        eng = Engine(s, h, model=tiny, groups=4, rng=random.Random(len(runs) * 1000 + 7))
        real = eng._generate
        eng._generate = lambda *a, **k: (runs.append(1), real(*a, **k))[1]  # type: ignore[method-assign]
        return eng

    req = routed(prompt=QUESTION, epsilon=1.0, max_tokens=4)
    req["hospital_id"] = hid
    req = with_grant(req)

    async def serve_once(expected: int) -> list[dict]:
        stop = asyncio.Event()
        task = asyncio.create_task(run(settings, hid, stop=stop, engine_factory=factory))
        try:
            await wait_ready(settings, hid, timeout_s=60)
            await produce(settings, topics.hospital_requests(hid), "RoutedRequest", req, key=hid)

            def mine(rs: list[dict]) -> list[dict]:
                return [r for r in rs if r.get("request_id") == req["request_id"]]

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

    first = await serve_once(1)
    assert first[0]["status"] == "ok" and len(runs) == 1
    both = await serve_once(2)  # a new process-like node on the same durable store
    assert len(runs) == 1  # no second draw
    a, b = both[0], both[1]
    for k in ("status", "response", "rdp_epsilons", "privacy_cost", "tokens"):
        assert a[k] == b[k]


def test_delta_policy_and_defaults() -> None:
    node = NodeSettings()
    assert node.node_delta(persons=20) == 1e-5  # 1/(10·20) is larger: the default holds
    assert node.node_delta(persons=100_000) == pytest.approx(1e-6)
    assert node.max_query_epsilon == 1.0 and node.person_epsilon == 10.0


def test_patient_loss_script_bounds_the_default_policy() -> None:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "scripts" / "patient_loss.py"
    spec = importlib.util.spec_from_file_location("patient_loss", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["patient_loss"] = mod
    spec.loader.exec_module(mod)
    rho, eps, delta, k = mod.worst_case(Settings(), NodeSettings())
    assert k == 3 and delta == 1e-5
    assert rho == pytest.approx(3 * rho_for_epsilon(epsilon=10.0, delta=1e-5))
    assert 19.0 < eps < 21.0  # docs/privacy.md states ≈ 19.9


def test_budget_balance_feeds_the_hospital_gauges_and_room_level(
    hospital_data_dir: Path, tiny: LoadedModel
) -> None:
    """Operators see the lifetime budget as ε (limit, remaining); the heartbeat's coarse level
    follows the same ρ share. Both move only with admitted reservations."""
    from fedllm.privacy.accountant import PrivacyCurve
    from fedllm.services.node_worker.health import budget_room_level

    eng = make_engine(hospital_data_dir, tiny, lifetime_epsilon=3.0, max_query_epsilon=1.0)
    limit, remaining = eng.budget_balance()
    rho_cap = eng.ledger.lifetime()[1]
    assert limit == pytest.approx(
        PrivacyCurve.from_rho(rho_cap, eng.orders).epsilon(delta=eng.delta)
    )
    assert remaining == pytest.approx(limit) and budget_room_level(eng.budget_room()) == 4
    assert eng.answer(routed(prompt=QUESTION, epsilon=1.0, max_tokens=2))["status"] == "ok"
    spent, _ = eng.ledger.lifetime()
    assert spent > 0 and eng.budget_room() == pytest.approx(1 - spent / rho_cap)
    assert eng.budget_balance()[1] < remaining


def test_answer_level_routes_charge_every_person_and_stop_while_anyone_is_capped(
    hospital_data_dir: Path, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The population/entity routes read every person's records, so every person is charged;
    they cannot drop a capped person, so they do not run while anyone is at the cap."""
    eng = make_engine(
        hospital_data_dir, tiny, routes=True, person_epsilon=1.2, max_query_epsilon=1.0
    )
    question = "How many of our patients are over 65?"
    assert eng.routes is not None and eng.routes.applies(question)
    assert eng.answer(routed(prompt=question, epsilon=1.0, max_tokens=2))["status"] == "ok"
    assert set(spends(eng)) == eng.records.all_persons()
    monkeypatch.setattr(eng.routes, "fields", lambda *a, **k: pytest.fail("route ran"))
    assert eng.answer(routed(prompt=question, epsilon=1.0, max_tokens=2))["status"] == "ok"
