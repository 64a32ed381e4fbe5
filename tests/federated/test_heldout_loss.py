"""A few federated DP-LoRA rounds bring the held-out loss on (public, unseen) notes below the
base model's. Pure in-process rounds (FedAvg of the trainers' DP-SGD updates)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm.common.lora_model import eval_loss, get_vector, load_adapted, set_vector
from fedllm.services.trainer.dp_lora import DpSgdConfig, PatientDpSgd
from fedllm.services.trainer.notes import notes_by_patient, patient_rows

pytestmark = pytest.mark.federated


def _rounds(
    models_dir: Path,
    sources: dict[int, Path],
    *,
    tiny: bool,
    rounds: int,
    cfg: DpSgdConfig,
    rank: int,
    seq_len: int,
    max_rows: int,
) -> tuple[float, list[float]]:
    torch.set_num_threads(1)
    m = load_adapted(models_dir=models_dir, tiny=tiny, rank=rank, seed=0)
    rows = {
        s: patient_rows(notes_by_patient(src), m.tokenizer, seq_len=seq_len, max_rows=max_rows)
        for s, src in sources.items()
    }
    held = torch.cat(list(rows.pop(14).values()))
    base = eval_loss(m.model, held, pad_id=m.pad_id)
    sgd = PatientDpSgd(m.model, pad_id=m.pad_id)
    g = get_vector(m.model).astype(np.float64)
    losses = []
    for _ in range(rounds):
        ups = []
        for r in rows.values():
            set_vector(m.model, g)
            ups.append(sgd.train_round(r, cfg).update)
        g = g + np.mean(ups, axis=0)
        set_vector(m.model, g)
        losses.append(eval_loss(m.model, held, pad_id=m.pad_id))
    return base, losses


def test_heldout_loss_drops_tiny_model(fl_sources, tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "smollm2-tokenizer").symlink_to(
        fl_sources[11].parents[1] / "models" / "smollm2-tokenizer"
    )
    cfg = DpSgdConfig(
        steps=4, sample_rate=0.5, noise_multiplier=0.3, clip_norm=1.0, learning_rate=0.5
    )
    srcs = {s: fl_sources[s] for s in (11, 12, 14)}
    base, losses = _rounds(
        models, srcs, tiny=True, rounds=3, cfg=cfg, rank=4, seq_len=32, max_rows=2
    )
    assert losses[-1] < base - 0.01, (base, losses)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEDLLM_FL_REAL", "1") == "0", reason="FEDLLM_FL_REAL=0")
def test_heldout_loss_drops_smollm2(fl_sources) -> None:
    """SmolLM2-135M-Instruct, LoRA r=1 on q/v, 2 hospitals, 2 rounds of 1 DP-SGD step (σ=0.3,
    q=1: a large ε, as ~10 patients per hospital leave little room; docs/federated.md)."""
    models = fl_sources[11].parents[1] / "models"
    cfg = DpSgdConfig(
        steps=1, sample_rate=1.0, noise_multiplier=0.3, clip_norm=1.0, learning_rate=1.0
    )
    srcs = {s: fl_sources[s] for s in (11, 12, 14)}
    base, losses = _rounds(
        models, srcs, tiny=False, rounds=2, cfg=cfg, rank=1, seq_len=32, max_rows=1
    )
    print(f"smollm2 held-out loss: base {base:.3f}, rounds {[round(x, 3) for x in losses]}")
    assert losses[-1] < base, (base, losses)
