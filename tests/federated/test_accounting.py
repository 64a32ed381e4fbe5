"""Training ε equals Opacus' RDP accountant; rounds are charged once to the node's ledgers."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from sqlalchemy import create_engine

from fedllm.privacy import DEFAULT_ORDERS
from fedllm.privacy.dpsgd import dominating_rho, dp_sgd_epsilon, dp_sgd_rdp
from fedllm.services.node_worker import ledger as node_ledger
from fedllm.services.trainer import ledger as trainer_ledger
from fedllm.services.trainer.ledger import TrainerLedger

pytestmark = pytest.mark.federated


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "rounds"), [(0.25, 1.0, 4, 3), (0.5, 0.8, 2, 5), (0.1, 1.5, 10, 1)]
)
def test_training_epsilon_equals_opacus_accountant(q, sigma, steps, rounds) -> None:
    from fedllm.privacy import eps_from_rdp

    acc = RDPAccountant()
    for _ in range(rounds * steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    # what the trainer reports: Σ of the stored per-round curves, converted once
    curve = sum(
        dp_sgd_rdp(sample_rate=q, noise_multiplier=sigma, steps=steps) for _ in range(rounds)
    )
    # on integer orders the curves are the same binomial expansion: equal to 1e-9
    ints = [i for i, a in enumerate(DEFAULT_ORDERS) if float(a).is_integer()]
    orders = [DEFAULT_ORDERS[i] for i in ints]
    want = acc.get_epsilon(delta=1e-5, alphas=orders)
    got = eps_from_rdp(orders=orders, rdp=curve[ints], delta=1e-5)[0]
    assert got == pytest.approx(want, rel=1e-9)
    # on all orders Opacus' fractional-order series (truncated earlier than dp-accounting's,
    # which fedllm.privacy.rdp mirrors) is at most 0.1 % below ours: ours never under-reports
    want_all = acc.get_epsilon(delta=1e-5, alphas=list(DEFAULT_ORDERS))
    got_all = dp_sgd_epsilon(
        sample_rate=q, noise_multiplier=sigma, steps=steps * rounds, delta=1e-5
    )
    assert want_all <= got_all <= want_all * 1.001


def test_dominating_rho_covers_the_curve() -> None:
    rdp = dp_sgd_rdp(sample_rate=0.3, noise_multiplier=1.0, steps=5)
    rho = dominating_rho(rdp=rdp)
    a = np.asarray(DEFAULT_ORDERS)
    fin = np.isfinite(rdp)
    assert fin.sum() > 100 and np.isfinite(rho)
    assert np.all(rdp[fin] <= rho * a[fin] + 1e-15)
    assert np.isclose(np.max(rdp[fin] - rho * a[fin]), 0.0)  # tight at some order


def test_trainer_and_node_share_one_data_ledger() -> None:
    """One declaration of the budget and filter tables (fedllm.common.person_ledger), used by
    both services; neither redeclares them."""
    from fedllm.common import person_ledger

    for name in ("node_budget", "node_person_everyone", "node_person_extra"):
        assert name in person_ledger.metadata.tables
        assert name not in trainer_ledger.metadata.tables
        assert name not in node_ledger.metadata.tables


def test_round_charged_once_and_refused_when_budget_cannot_pay(tmp_path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/ledger.db")
    # the node worker opened the same store first with its own caps
    node = node_ledger.NodeLedger(engine, hospital_id="h1", rho_cap=1.0, person_rho_cap=0.5)
    assert node.begin("q1", 0, rho=0.2) is None  # a query drew 0.2 before training
    led = TrainerLedger(engine, hospital_id="h1", rho_cap=1.0, person_rho_cap=0.5)
    rdp = dp_sgd_rdp(sample_rate=0.5, noise_multiplier=1.0, steps=2)
    c1 = led.charge_round("fed", 1, rho=0.3, rdp=rdp, persons=["p1", "p2"])
    assert c1 is not None and c1.fresh and c1.persons == ("p1", "p2")
    again = led.charge_round("fed", 1, rho=0.3, rdp=rdp, persons=["p1", "p2"])
    assert again is not None and not again.fresh
    assert node.lifetime()[0] == pytest.approx(0.5)  # one query + one round, not two rounds
    assert led.person_spend("p1") == pytest.approx(0.3)
    # p1 cannot take another 0.3 under its 0.5 cap: left out of round 2; p3 is new
    c2 = led.charge_round("fed", 2, rho=0.3, rdp=rdp, persons=["p1", "p3"])
    assert c2 is not None and c2.persons == ("p3",)
    # lifetime now 0.8: round 3 at 0.3 would pass the cap of 1.0 -> the hospital leaves
    assert led.charge_round("fed", 3, rho=0.3, rdp=rdp, persons=["p3"]) is None
    assert node.lifetime()[0] == pytest.approx(0.8)
    # nobody whose filter can pay: refused, and the lifetime budget is not drawn either
    led2 = TrainerLedger(engine, hospital_id="h2", rho_cap=5.0, person_rho_cap=0.1)
    assert led2.charge_round("fed", 1, rho=0.3, rdp=rdp, persons=["p9"]) is None
    assert led2.lifetime()[0] == 0.0
    # the update is stored before it is sent; a restart gets the same bytes back
    u = np.arange(5, dtype=np.float64)
    led.store_update("fed", 1, u, train_loss=2.0)
    assert np.array_equal(led.store_update("fed", 1, u + 1, train_loss=9.0), u)
    assert np.array_equal(led.lookup("fed", 1).update, u)
    total = led.training_rdp("fed")
    assert np.allclose(total, 2 * rdp)
