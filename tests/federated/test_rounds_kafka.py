"""Rounds over the real broker: join, masked updates, secure sum, result; a trainer that drops
out is left behind by a restarted attempt that charges nobody twice; a restarted coordinator
resumes after its last stored round."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from fedllm.common.config import Settings
from fedllm.federate import build_coordinator, build_trainer, run_all
from fedllm.services.federation.config import FederationConfig
from fedllm.services.federation.store import rounds
from tests.kafka_helpers import unique_namespace

pytestmark = [pytest.mark.federated, pytest.mark.slow]


def _cfg(**kw) -> FederationConfig:
    base = dict(
        federation_id=f"fed-{uuid.uuid4().hex[:8]}",
        hospitals=("h11", "h12", "h13"),
        min_participants=2,
        max_rounds=2,
        join_timeout_s=30.0,
        round_deadline_s=60.0,
        local_steps=1,
        sample_rate=0.5,
        noise_multiplier=1.0,
        clip_norm=1.0,
        learning_rate=0.5,
        topic_prefix=f"t{uuid.uuid4().hex[:6]}.",
    )
    base.update(kw)
    return FederationConfig(**base)


def _build(settings: Settings, cfg: FederationConfig, hospitals, store: str):
    torch.set_num_threads(1)
    seeds = {"h11": 11, "h12": 12, "h13": 13}
    trainers = [
        build_trainer(
            settings, cfg, h, seed=seeds[h], population=20, tiny=True, report_train_loss=True
        )
        for h in hospitals
    ]
    coord = build_coordinator(
        settings, cfg, tiny=True, heldout_seed=14, population=20, store_url=store
    )
    return coord, trainers


async def test_secure_rounds_over_the_broker(kafka_bootstrap: str, fl_data_dir: Path) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        data_dir=fl_data_dir,
        fetch_max_wait_ms=10,
    )
    cfg = _cfg()
    store = f"sqlite:///{fl_data_dir}/rounds.db"
    coord, trainers = _build(settings, cfg, cfg.hospitals, store)
    reports = await run_all(settings, cfg, coord, trainers)
    assert [r.round for r in reports] == [1, 2], reports
    assert reports[-1].status == "finished"
    for r in reports:
        assert r.participants == ["h11", "h12", "h13"]
        assert r.heldout_loss > 0 and r.train_loss > 0
    # every trainer ends on the published global adapter, which is the stored one
    last = coord.store.last(cfg.federation_id)
    for t in trainers:
        assert t.global_round == 2
        assert np.array_equal(t.global_vec, last.global_vector)
    # the secure sum unmasked to the mean of the stored (unmasked) updates
    ups = [t.ledger.lookup(cfg.federation_id, 2).update for t in trainers]
    prev = coord.store  # round 1 vector is the base of round 2

    with prev.engine.connect() as conn:
        blob = conn.execute(select(rounds.c.global_blob).where(rounds.c.round == 1)).scalar_one()
    v1 = np.frombuffer(blob, dtype="<f4").astype(np.float64)
    want = v1 + np.mean(ups, axis=0)
    assert np.max(np.abs(last.global_vector - want)) < 1e-5
    # each hospital paid two rounds, once each, and reports the ε of exactly that
    for t in trainers:
        spent, _ = t.ledger.lifetime()
        rho = t.ledger.lookup(cfg.federation_id, 1).rho
        assert spent == pytest.approx(2 * rho)
        assert reports[-1].epsilon_by_hospital[t.hospital_id] == pytest.approx(t.epsilon_spent())


async def test_dropout_restarts_round_without_double_charge(
    kafka_bootstrap: str, fl_data_dir: Path
) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        data_dir=fl_data_dir,
        fetch_max_wait_ms=10,
    )
    cfg = _cfg(max_rounds=1, round_deadline_s=45.0)
    store = f"sqlite:///{fl_data_dir}/rounds.db"
    coord, trainers = _build(settings, cfg, cfg.hospitals, store)
    quitter = trainers[2]

    async def vanish(bus, ann):  # joins (and pays), then never sends its update
        quitter.stopped = True

    quitter._train_and_send = vanish  # type: ignore[method-assign]
    reports = await run_all(settings, cfg, coord, trainers)
    assert reports[0].status == "finished"
    assert reports[0].participants == ["h11", "h12"]
    for t in trainers:
        spent, _ = t.ledger.lifetime()
        assert spent == pytest.approx(t.ledger.lookup(cfg.federation_id, 1).rho)  # once
    # a coordinator restarted after the last round does nothing more
    coord2, _ = _build(settings, cfg, (), store)
    assert await asyncio.wait_for(run_all(settings, cfg, coord2, []), 60) == []
