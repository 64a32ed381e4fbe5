"""A ``use_adapter`` answer is released at ε = 0 as post-processing of the DP-trained adapter.
That is sound only if the answer is a function of (adapter, public model, question) alone: no
record, note or ledger of the hospital may reach it, nor any record-dependent field of the result.

Real parts throughout: the tiny model, a published and approved adapter, two hospitals with
different generated patients, the node's Engine. ``scripts/mutation_check.py``
(``adapter_reads_notes``) checks that these tests fail when the adapter path reads the notes.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedllm.common.adapters import AdapterRegistry
from fedllm.common.config import HospitalConfig, Settings
from fedllm.common.lora_model import load_adapted, to_bytes
from fedllm.services.node_worker.adapter_serving import AdapterServer
from fedllm.services.node_worker.answering import SYSTEM_PROMPT, Engine
from fedllm.services.node_worker.clinosim_data import ensure_clinosim
from fedllm.services.node_worker.model import LoadedModel
from fedllm.services.node_worker.service import result_record

CACHE = Path(os.environ.get("FEDLLM_TEST_CACHE", Path(__file__).resolve().parents[2] / ".fedllm"))
RANK, LORA_SEED = 4, 0
SEEDS = {"st_mary": 11, "h12": 12}  # two hospitals, different patients and notes
MAX_TOKENS = 8

#: The fields an adapter answer may carry; anything else could leak how the records look.
ADAPTER_FIELDS = {
    "status",
    "reason",
    "response",
    "is_private",
    "privacy_cost",
    "delta",
    "rdp_orders",
    "rdp_epsilons",
    "tokens",
    "records_used",
    "adapter_hash",
    "adapter_epsilon",
}

# File-system reads under a watched folder, seen by a Python audit hook (hooks cannot be
# removed, so one is installed per process and watches only while ``_WATCH`` names a folder).
_WATCH: list[str] = []
_READS: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _WATCH and event in ("open", "os.listdir", "os.scandir", "sqlite3.connect") and args:
        path = str(args[0])
        if any(path.startswith(w) for w in _WATCH):
            _READS.append(f"{event} {path}")


sys.addaudithook(_audit)


class Tripwire:
    """Stands in for the hospital's records, routes or ledger: any use is logged and refused."""

    def __init__(self, name: str, log: list[str]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_log", log)

    def __getattribute__(self, attr: str) -> Any:
        name, log = object.__getattribute__(self, "_name"), object.__getattribute__(self, "_log")
        log.append(f"{name}.{attr}")
        raise AssertionError(f"the adapter path used {name}.{attr}")


@pytest.fixture
def data_dir(tmp_path: Path, tiny: LoadedModel, models_dir: Path) -> Path:
    """Two hospitals' generated records and the cached tokenizer (``tiny`` has saved it)."""
    for hid, seed in SEEDS.items():
        src = ensure_clinosim(CACHE / "test-hospitals" / f"seed{seed}", seed=seed, population=20)
        shutil.copytree(src, tmp_path / "hospitals" / hid / "clinosim")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-tokenizer").symlink_to(models_dir / "smollm2-tokenizer")
    return tmp_path


@pytest.fixture
def engines(data_dir: Path) -> dict[str, Engine]:
    """One node per hospital on the same data_dir, so both serve the one approved adapter."""
    torch.set_num_threads(1)
    settings = Settings(
        data_dir=data_dir,
        node_load_model=False,  # the adapter path needs no node model
        hospitals=[
            HospitalConfig(id=hid, departments=["cardiology"], seed=seed, population=20)
            for hid, seed in SEEDS.items()
        ],
    )
    return {hid: Engine(settings, hid, groups=4, adapter_check_s=0.0) for hid in SEEDS}


@pytest.fixture
def adapter(data_dir: Path) -> str:
    """A published and approved adapter (random LoRA weights of the tiny model's shape)."""
    m = load_adapted(models_dir=data_dir / "models", tiny=True, rank=RANK, seed=LORA_SEED)
    n = sum(p.numel() for name, p in m.model.named_parameters() if "lora_" in name)
    vec = np.random.default_rng(7).normal(0, 0.5, n).astype(np.float32)
    reg = AdapterRegistry.for_data_dir(data_dir)
    h = reg.publish(
        to_bytes(vec),
        federation_id="fed-privacy",
        round=1,
        epsilon_by_hospital={"st_mary": 3.0, "h12": 4.0},
        delta=1e-5,
        base_model="tiny-llama-test",
        lora_rank=RANK,
        lora_seed=LORA_SEED,
    ).hash
    reg.approve(h, by="admin")
    return h


def questions(engine: Engine) -> list[str]:
    """A generic question and ones built from the hospital's own notes (the words a retrieval
    would match best), so a path that looked at the notes would see them."""
    notes = [n for g in engine.records.partition for n in g]
    return [
        "What is the usual first treatment for hypertension?",
        *(f"What happened in this case: {n.text[:120]}?" for n in notes[:2]),
    ]


def routed(question: str, *, epsilon: float = 1.0) -> dict[str, Any]:
    return {
        "request_id": "r1",
        "attempt": 0,
        "reserved_epsilon": epsilon,
        "delta": 1e-5,
        "request": {
            "user_id": "u",
            "department": "cardiology",
            "kind": "generate",
            "prompt": question,
            "max_tokens": MAX_TOKENS,
            "temperature": 1.0,
            "use_adapter": True,
        },
    }


def test_adapter_answer_is_the_same_at_hospitals_with_different_records(
    engines: dict[str, Engine], adapter: str, data_dir: Path
) -> None:
    a, b = engines["st_mary"], engines["h12"]
    texts = {hid: {n.text for g in e.records.partition for n in g} for hid, e in engines.items()}
    assert texts["st_mary"] and texts["h12"] and texts["st_mary"] != texts["h12"]
    # The same answer from a server that holds no hospital at all: (adapter, model, question).
    ref = AdapterServer(AdapterRegistry.for_data_dir(data_dir), models_dir=data_dir / "models")
    for q in questions(a) + questions(b):
        fa, fb = a.answer(routed(q)), b.answer(routed(q))
        assert fa["status"] == "ok" and fa["adapter_hash"] == adapter
        assert fa == fb  # every field, not just the text
        want = ref.answer(
            q[: a.settings.max_prompt_chars], system=SYSTEM_PROMPT, max_tokens=MAX_TOKENS
        )
        assert want is not None
        assert (fa["response"], fa["tokens"]) == (want.text, want.tokens)
        ra = result_record(routed(q), fa, hospital_id="st_mary")
        rb = result_record(routed(q), fb, hospital_id="h12")
        for rec in (ra, rb):  # the hospital's name and the wall clock are the only differences
            del rec["node_id"], rec["finished_at_ms"]
        assert ra == rb


def test_adapter_answer_reads_no_record(engines: dict[str, Engine], adapter: str) -> None:
    engine = engines["st_mary"]
    qs = questions(engine)  # drawn from the notes before the tripwires are set
    used: list[str] = []
    for attr in ("records", "routes", "ledger"):
        setattr(engine, attr, Tripwire(attr, used))
    hospital = str((engine.settings.data_dir / "hospitals").resolve())
    _WATCH[:] = [hospital, str(engine.settings.data_dir / "hospitals")]
    try:
        results = [engine.answer(routed(q)) for q in qs]
    finally:
        _WATCH.clear()
    assert used == [] and _READS == []  # no record, route, ledger or hospital file was read
    assert all(r["status"] == "ok" and r["adapter_hash"] == adapter for r in results)


def test_adapter_result_carries_nothing_record_dependent(
    engines: dict[str, Engine], adapter: str
) -> None:
    engine = engines["st_mary"]
    for q in questions(engine):
        fields = engine.answer(routed(q, epsilon=2.0))
        assert set(fields) == ADAPTER_FIELDS  # no timing, count or retrieval metadata
        assert fields["records_used"] == 0
        # A DP release (of the adapter's training) that costs this query nothing:
        assert fields["is_private"] is True
        assert fields["privacy_cost"] == 0.0 and not any(fields["rdp_epsilons"])
        assert fields["adapter_epsilon"] == 4.0  # the training ε (the largest hospital's)
        rec = result_record(routed(q, epsilon=2.0), fields, hospital_id="st_mary")
        assert rec["records_used"] == 0
        assert rec["model_time_ms"] == 0.0 and rec["processing_time_ms"] == 0.0
        assert rec["aggregate_json"] == ""
    assert engine.ledger.lifetime()[0] == 0.0  # nothing drawn from the hospital's budget
