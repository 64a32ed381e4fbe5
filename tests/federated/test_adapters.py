"""Adapters in service (issue #14 item 4): the registry refuses tampered bytes, a node hot-swaps
an approved adapter between requests without dropping one, and an adapter answer spends 0 ε."""

from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedllm.common import codec
from fedllm.common.adapters import AdapterError, AdapterRegistry, content_hash
from fedllm.common.config import Settings
from fedllm.common.lora_model import load_adapted, to_bytes
from fedllm.privacy.accountant import RdpAccountant, ZcdpFilter
from fedllm.services.accountant import decide
from fedllm.services.node_worker.adapter_serving import AdapterServer
from fedllm.services.node_worker.answering import SYSTEM_PROMPT, Engine
from fedllm.services.node_worker.service import result_record

pytestmark = pytest.mark.federated

RANK, SEED = 4, 0
QUESTION = "What is the usual first treatment for hypertension?"


def publish(reg: AdapterRegistry, vec: np.ndarray, *, round_no: int) -> str:
    return reg.publish(
        to_bytes(vec),
        federation_id="fed-test",
        round=round_no,
        epsilon_by_hospital={"h11": 7.5, "h12": 8.25},
        delta=1e-5,
        base_model="tiny-llama-test",
        lora_rank=RANK,
        lora_seed=SEED,
    ).hash


@pytest.fixture
def vectors(fl_data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    torch.set_num_threads(1)
    m = load_adapted(models_dir=fl_data_dir / "models", tiny=True, rank=RANK, seed=SEED)
    n = sum(p.numel() for n_, p in m.model.named_parameters() if "lora_" in n_)
    rng = np.random.default_rng(5)
    return (rng.normal(0, 0.5, n).astype(np.float32), rng.normal(0, 0.5, n).astype(np.float32))


def test_approve_refuses_a_tampered_adapter(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "adapters")
    vec = np.arange(64, dtype=np.float32)
    h = publish(reg, vec, round_no=3)
    assert h == content_hash(to_bytes(vec))
    v = reg.get(h)
    assert v.status == "pending" and v.epsilon == 8.25 and v.round == 3
    assert reg.current_hash() is None  # published is not served
    blob = tmp_path / "adapters" / f"{h}.f32"
    data = bytearray(blob.read_bytes())
    data[10] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="tampered"):
        reg.approve(h, by="admin")
    assert reg.get(h).status == "pending" and reg.current_hash() is None
    with pytest.raises(AdapterError, match="announced"):  # a round's hash that does not match
        reg.publish(
            to_bytes(vec + 1),
            federation_id="f",
            round=1,
            epsilon_by_hospital={},
            delta=1e-5,
            base_model="tiny-llama-test",
            lora_rank=RANK,
            lora_seed=SEED,
            expected_hash=h,
        )
    blob.write_bytes(to_bytes(vec))  # restored: approvable, then served; rejection withdraws
    assert reg.approve(h, by="admin").status == "approved" and reg.current_hash() == h
    assert reg.reject(h, by="admin", reason="recall").status == "rejected"
    assert reg.current_hash() is None
    with pytest.raises(AdapterError, match="rejected"):
        reg.approve(h, by="admin")


@pytest.fixture
def engine(fl_data_dir: Path, fl_sources: dict[int, Path]) -> Engine:
    shutil.copytree(fl_sources[11], fl_data_dir / "hospitals" / "st_mary" / "clinosim")
    settings = Settings(data_dir=fl_data_dir, node_load_model=False)
    return Engine(settings, "st_mary", groups=4, adapter_check_s=0.0)


def routed(i: int, *, use_adapter: bool = True, epsilon: float = 1.0) -> dict[str, Any]:
    return {
        "request_id": f"r{i}",
        "attempt": 0,
        "reserved_epsilon": epsilon,
        "delta": 1e-5,
        "request": {
            "user_id": "u",
            "department": "cardiology",
            "kind": "generate",
            "prompt": QUESTION,
            "max_tokens": 4,
            "temperature": 1.0,
            "use_adapter": use_adapter,
        },
    }


@pytest.mark.slow
def test_hot_swap_between_requests_drops_none(
    engine: Engine, vectors: tuple[np.ndarray, np.ndarray]
) -> None:
    reg = engine.adapters.registry
    assert engine.answer(routed(0))["status"] == "failed"  # none approved yet
    a, b = (publish(reg, v, round_no=i + 1) for i, v in enumerate(vectors))
    # What each version answers, from a separate server: the text names the weights used.
    expected = {}
    for h in (a, b):
        reg.approve(h, by="admin")
        ref = AdapterServer(reg, models_dir=engine.settings.data_dir / "models")
        got = ref.answer(QUESTION, system=SYSTEM_PROMPT, max_tokens=4)
        assert got is not None and got.version.hash == h
        expected[h] = got.text
    assert expected[a] != expected[b]
    reg.approve(a, by="admin")

    n = 8
    done: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()

    def worker() -> None:  # the node's request loop: one request after another
        for i in range(1, n + 1):
            done.put((i, engine.answer(routed(i))))

    t = threading.Thread(target=worker)
    t.start()
    results = [done.get(timeout=120), done.get(timeout=120)]
    reg.approve(b, by="admin")  # approved while requests are queued and one is in flight
    engine.adapters.refresh(force=True)  # the timer's check, concurrent with a generation
    t.join(timeout=300)
    while not done.empty():
        results.append(done.get())
    assert [i for i, _ in results] == list(range(1, n + 1))  # none dropped
    hashes = [r["adapter_hash"] for _, r in results]
    assert all(r["status"] == "ok" for _, r in results)
    assert hashes[:2] == [a, a] and hashes[-1] == b
    assert hashes == sorted(hashes, key=lambda h: h == b)  # old weights, then new, never back
    for _, r in results:  # each answer came from the weights of the hash it names
        assert r["response"] == expected[r["adapter_hash"]]


@pytest.mark.slow
def test_adapter_answer_spends_zero_and_names_the_adapter(
    engine: Engine, vectors: tuple[np.ndarray, np.ndarray]
) -> None:
    reg = engine.adapters.registry
    zcdp = ZcdpFilter(delta=1e-5)
    orders = RdpAccountant().orders
    reserved = zcdp.query_units(1.0)

    none = engine.answer(routed(1))  # no approved adapter: a clear failure, nothing charged
    assert none["status"] == "failed" and "no approved adapter" in none["reason"]
    spent, status, _ = decide.charge_for(
        result_record(routed(1), none, hospital_id="st_mary"), orders=orders
    )
    assert spent is None and status == "failed"

    h = publish(reg, vectors[0], round_no=2)
    reg.approve(h, by="admin")
    fields = engine.answer(routed(2))
    assert fields["status"] == "ok" and fields["is_private"]
    assert fields["privacy_cost"] == 0.0 and not any(fields["rdp_epsilons"])
    assert fields["adapter_hash"] == h and fields["adapter_epsilon"] == 8.25
    assert engine.ledger.lifetime()[0] == 0.0  # the hospital's ledger: nothing drawn
    rec = result_record(routed(2), fields, hospital_id="st_mary")
    codec.encode("InferenceResult", rec)  # the new fields are on the wire
    spent, status, _ = decide.charge_for(rec, orders=orders)
    assert status == "ok" and spent is not None
    settled = decide.charge(zcdp, reserved_units=reserved, spent=spent)
    assert reserved > 0 and settled.units == 0 and settled.excess == 0  # reservation refunded
    # the adapter path needs no node model: this node (FEDLLM_NODE_LOAD_MODEL=false) has none
    dp = engine.answer(routed(3, use_adapter=False, epsilon=0.5))
    assert dp["status"] == "failed" and "aggregate queries only" in dp["reason"]


def test_publish_from_the_round_store(tmp_path: Path) -> None:
    """`fedllm federate` / `fedllm adapter publish`: the last stored global adapter, pending,
    with the round's per-hospital ε; a store whose hash disagrees with its bytes is refused."""
    from fedllm.adapter_cli import publish_from_store
    from fedllm.services.federation.store import RoundStore

    store = RoundStore(f"sqlite:///{tmp_path / 'rounds.db'}")
    vec = np.linspace(-1, 1, 32, dtype=np.float32)
    for r, v in ((1, vec * 0), (2, vec)):
        store.close_round(
            "fed-a",
            r,
            attempt=0,
            status="finished" if r == 2 else "aggregated",
            fields={"adapter_hash": content_hash(to_bytes(v)), "epsilon_by_hospital": {"h1": r}},
            global_vector=v,
        )
    reg = AdapterRegistry(tmp_path / "adapters")
    kw: dict[str, Any] = dict(
        delta=1e-5, base_model="tiny-llama-test", lora_rank=RANK, lora_seed=SEED
    )
    v = publish_from_store(reg, store, "fed-a", **kw)
    assert v.hash == content_hash(to_bytes(vec)) and v.round == 2 and v.status == "pending"
    assert v.epsilon_by_hospital == {"h1": 2.0}
    store.close_round(
        "fed-b",
        1,
        attempt=0,
        status="finished",
        fields={"adapter_hash": "0" * 64},
        global_vector=vec,
    )
    with pytest.raises(AdapterError, match="announced"):
        publish_from_store(reg, store, "fed-b", **kw)


def test_approval_is_audited(tmp_path: Path, kafka_bootstrap: str) -> None:
    """`fedllm adapter approve` stores the decision and sends an AuditEvent naming the hash."""
    import asyncio

    from fedllm.adapter_cli import emit_decision
    from fedllm.common.kafka import ensure_topics
    from fedllm.common.topics import AUDIT
    from tests.kafka_helpers import collect, unique_namespace

    reg = AdapterRegistry(tmp_path / "adapters")
    fresh = np.random.default_rng().normal(size=16).astype(np.float32)  # a hash no run reused
    h = publish(reg, fresh, round_no=1)
    v = reg.approve(h, by="alice")
    settings = Settings(
        data_dir=tmp_path, kafka_bootstrap=kafka_bootstrap, topic_namespace=unique_namespace()
    )
    asyncio.run(ensure_topics(settings, {AUDIT: 1}))
    asyncio.run(emit_decision(settings, v, action="approve"))

    def mine(rs: list[Any]) -> list[Any]:
        return [r for r in rs if (r.get("details") or {}).get("adapter_hash") == h]

    got = mine(asyncio.run(collect(settings, AUDIT, until=lambda rs: bool(mine(rs)))))
    assert got and got[0]["action"] == "adapter.approve" and got[0]["user_id"] == "alice"
    assert got[0]["epsilon"] == 8.25
