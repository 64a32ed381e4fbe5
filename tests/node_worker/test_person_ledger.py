"""Issue #12 item 1: the hospital's one data ledger (fedllm.common.person_ledger), shared by the
node worker and the trainer: a release that charges every person writes O(1) rows; the filter
matches a naive per-person reference; legacy rows migrate; export reports the spend."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import pytest
from sqlalchemy import Column, Float, MetaData, String, Table, create_engine, event

from fedllm.common import person_ledger as pl
from fedllm.common.config import Settings
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.node_worker.erasure import privacy_spend
from fedllm.services.node_worker.ledger import NodeLedger
from fedllm.services.node_worker.settings import NodeSettings
from fedllm.services.trainer.ledger import TrainerLedger

CAP = rho_for_epsilon(epsilon=3.0, delta=1e-5)


def open_ledger(url: str, hid: str = "h") -> NodeLedger:
    return NodeLedger(url, hospital_id=hid, rho_cap=1e6, person_rho_cap=CAP)


def test_filter_matches_a_naive_per_person_reference(tmp_path: Path) -> None:
    """A random mix of every-person and subset releases (plus training rounds through the
    trainer) against per-person exact sums: the same persons are left out at every step, the
    spends agree to the stored resolution (never below), and nobody passes the cap."""
    reference_run(f"sqlite:///{tmp_path / 'p.db'}")


def test_filter_matches_the_reference_on_postgres(fresh_database_url: str) -> None:
    reference_run(fresh_database_url)
    led = open_ledger(fresh_database_url)
    assert led.summary(query_rho=0.0, population=40).persons_charged == 40


def reference_run(url: str, steps: int = 120) -> None:
    led = open_ledger(url)
    trainer = TrainerLedger(url, hospital_id="h", rho_cap=1e6, person_rho_cap=CAP)
    people = [f"P{i:03d}" for i in range(40)]
    ref = dict.fromkeys(people, Fraction(0))
    rng = random.Random(5)
    refused = admitted = 0
    for step in range(steps):
        rho = rho_for_epsilon(epsilon=rng.uniform(0.05, 0.6), delta=1e-5)
        want = frozenset(p for p in people if ref[p] + Fraction(rho) > Fraction(CAP))
        got = led.capped_persons(rho=rho)
        assert (want == frozenset(people)) if got.all else (got.persons == want)
        refused += len(want)
        key = (f"r{step}", 0)
        assert led.begin(*key, rho=rho) is None
        kind = rng.choice(("everyone", "subset", "round"))
        if kind == "everyone" and not got.all:
            led.charge_everyone(*key, rho=rho, left_out=got.persons)
            charged = set(people) - want
        elif kind == "subset":
            charged = set(rng.sample(people, 12)) - want
            led.charge_persons(*key, charged, rho=rho)
        elif kind == "round":
            c = trainer.charge_round("fed", step, rho=rho, rdp=[rho], persons=rng.sample(people, 9))
            charged = set(c.persons) if c is not None else set()
            assert not charged & want
        else:
            charged = set()
        admitted += len(charged)
        for p in charged:
            ref[p] += Fraction(rho)
        stored = led.spends(frozenset(people))
        for p in people:
            assert 0 <= Fraction(stored[p]) - ref[p] <= (step + 1) * Fraction(pl.UNIT)
            assert stored[p] <= CAP
    assert refused > 0 and admitted > 0  # both sides of the filter were exercised


class Writes:
    """SQL statements and parameter rows sent through an engine."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.statements = 0
        self.rows = 0
        event.listen(engine, "before_cursor_execute", self._on)

    def _on(self, conn, cursor, statement, params, context, executemany) -> None:  # noqa: ANN001
        self.statements += 1
        self.rows += len(params) if executemany else 1


def _aggregate_cost(tmp_path: Path, persons: int) -> tuple[int, int]:
    """Statements and rows for one every-person aggregate release (begin, filter, charge,
    release) on a hospital where ``persons`` persons already carry a subset charge."""
    engine = create_engine(f"sqlite:///{tmp_path / f'n{persons}.db'}")
    led = open_ledger(engine)  # type: ignore[arg-type]
    led.begin("warm", 0, rho=0.001)
    led.charge_persons("warm", 0, {f"P{i}" for i in range(persons)}, rho=0.001)
    w = Writes(engine)
    assert led.begin("q", 0, rho=0.01) is None
    capped = led.capped_persons(rho=0.01)
    led.charge_everyone("q", 0, rho=0.01, left_out=capped.persons)
    led.release("q", 0, {"status": "ok"})
    assert led.spends({"P0", f"P{persons - 1}"}) == pytest.approx(
        {"P0": 0.011, f"P{persons - 1}": 0.011}
    )
    return w.statements, w.rows


def test_every_person_charge_does_not_grow_with_the_patients(tmp_path: Path) -> None:
    small = _aggregate_cost(tmp_path, 10)
    large = _aggregate_cost(tmp_path, 2_000)
    assert small == large and large[1] < 20


def test_persons_left_out_at_their_cap_are_not_charged(tmp_path: Path) -> None:
    led = open_ledger(f"sqlite:///{tmp_path / 'p.db'}")
    near = CAP * 0.9
    led.begin("a", 0, rho=near)
    led.charge_persons("a", 0, {"full"}, rho=near)
    rho = CAP * 0.2
    capped = led.capped_persons(rho=rho)
    assert capped.persons == {"full"} and not capped.all
    led.begin("b", 0, rho=rho)
    led.charge_everyone("b", 0, rho=rho, left_out=capped.persons)
    led.charge_everyone("b", 0, rho=rho, left_out=capped.persons)  # a replay charges nothing
    s = led.spends({"full", "other", "newcomer"})
    assert s == pytest.approx({"full": near, "other": rho, "newcomer": rho})
    assert led.summary(query_rho=rho, population=3).persons_at_cap == 1
    # as the engine does: charge every person not at their cap until nobody has room left
    for i in range(10):
        capped = led.capped_persons(rho=rho)
        if capped.all:
            break
        led.begin(f"c{i}", 0, rho=rho)
        led.charge_everyone(f"c{i}", 0, rho=rho, left_out=capped.persons)
    # "b" and c0..c2 charged 0.8·cap; a fifth 0.2·cap would land on the cap exactly, which the
    # stored rounding (charges up, the cap down) refuses: never looser than the real ρ
    assert capped.all and i == 3
    assert led.spends({"full", "other"}) == pytest.approx({"full": near, "other": 4 * rho})
    assert max(led.spends({"full", "other"}).values()) <= CAP


def test_legacy_per_person_rows_migrate_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    md = MetaData()
    old = Table(
        "node_person_spend",
        md,
        Column("hospital_id", String(128), primary_key=True),
        Column("person_id", String(128), primary_key=True),
        Column("rho_spent", Float, nullable=False),
    )
    engine = create_engine(url)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            old.insert(),
            [
                {"hospital_id": "h", "person_id": "a", "rho_spent": 0.25},
                {"hospital_id": "h", "person_id": "b", "rho_spent": 0.5},
                {"hospital_id": "other", "person_id": "a", "rho_spent": 9.0},
            ],
        )
    led = open_ledger(url)
    assert led.spends({"a", "b", "c"}) == pytest.approx({"a": 0.25, "b": 0.5, "c": 0.0})
    again = open_ledger(url)  # reopening does not migrate twice
    assert again.spends({"a"}) == pytest.approx({"a": 0.25})
    with engine.connect() as conn:
        left = {(r.hospital_id, r.person_id) for r in conn.execute(old.select())}
    assert left == {("other", "a")}


def test_export_reports_the_spend_and_erasure_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path)
    url = NodeSettings().store_url(settings, "st_mary")
    assert privacy_spend(settings, "st_mary", "POP-000001") == 0.0  # no ledger yet
    led = open_ledger(url, "st_mary")
    led.begin("q", 0, rho=0.1)
    led.charge_everyone("q", 0, rho=0.1, left_out=frozenset())
    led.begin("t", 0, rho=0.2)
    led.charge_persons("t", 0, {"POP-000001"}, rho=0.2)  # a newborn counts as the mother
    assert privacy_spend(settings, "st_mary", "POP-000001") == pytest.approx(0.3)
    assert privacy_spend(settings, "st_mary", "POP-000001-BABY") == pytest.approx(0.3)
    assert privacy_spend(settings, "st_mary", "POP-000002") == pytest.approx(0.1)


def test_engine_aggregate_without_filter_charges_everyone_in_one_row(
    hospital_data_dir: Path,
) -> None:
    """An aggregate with no ``where`` charges every person not at their cap through the one
    every-person row (no per-person row written); a person at their cap is left out of the
    cohort and not charged."""
    import json

    from fedllm.services.node_worker.answering import Engine
    from fedllm.services.node_worker.cohort import load_cohort
    from tests.node_worker.test_engine import routed

    eng = Engine(
        Settings(data_dir=hospital_data_dir, answer_routes=False),
        "st_mary",
        model=None,
        rng=random.Random(3),
        node_settings=NodeSettings(person_epsilon=2.5, lifetime_epsilon=100.0),
    )
    people = sorted({p.person for p in load_cohort(eng.clinosim_dir).patients})
    rho1 = rho_for_epsilon(epsilon=1.0, delta=eng.delta)
    cap = eng.ledger.person_rho_cap
    full = people[0]
    eng.ledger.begin("pre", 0, rho=cap - rho1 / 2)
    eng.ledger.charge_persons("pre", 0, {full}, rho=cap - rho1 / 2)
    sql: list[str] = []
    event.listen(eng.ledger.engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
    out = eng.answer(routed(prompt=json.dumps({"op": "count"}), kind="aggregate", epsilon=1.0))
    assert out["status"] == "ok"
    per_person = [s for s in sql if "node_person_extra" in s and "INSERT" in s.upper()]
    assert len(per_person) == 1  # the one left out (a −ρ row), not one per person
    spent = eng.ledger.spends(frozenset(people))
    want = {p: rho1 for p in people} | {full: cap - rho1 / 2}
    assert spent == pytest.approx(want)
