"""Patient-level DP-SGD mechanics on the tiny model: the per-patient clip bounds a step, the
FedProx term pulls towards the global adapter, and the model is left at the global adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedllm.common.lora_model import get_vector, load_adapted
from fedllm.services.trainer.dp_lora import DpSgdConfig, PatientDpSgd, clip_update
from fedllm.services.trainer.notes import notes_by_patient, patient_rows

pytestmark = pytest.mark.federated


@pytest.fixture(scope="module")
def setup(fl_sources):
    torch.set_num_threads(1)
    models = fl_sources[11].parents[1] / "models"
    m = load_adapted(models_dir=models, tiny=True, rank=4, seed=0)
    rows = patient_rows(notes_by_patient(fl_sources[11]), m.tokenizer, seq_len=32, max_rows=2)
    return m, rows, PatientDpSgd(m.model, pad_id=m.pad_id)


def test_all_of_a_patients_notes_are_one_unit(setup) -> None:
    _, rows, _ = setup
    assert len(rows) >= 5
    assert all(r.shape[0] <= 2 and r.shape[1] == 32 for r in rows.values())


def test_per_patient_clip_bounds_the_step(setup) -> None:
    m, rows, sgd = setup
    before = get_vector(m.model)
    cfg = DpSgdConfig(
        steps=1, sample_rate=1.0, noise_multiplier=0.0, clip_norm=1e-3, learning_rate=1.0
    )
    out = sgd.train_round(rows, cfg)
    # Σ of N clipped gradients / (q·N) has norm ≤ C; times lr = 1
    assert 0 < np.linalg.norm(out.update) <= 1e-3 * (1 + 1e-5)
    assert np.array_equal(get_vector(m.model), before)  # left at the global adapter


def test_fedprox_term_pulls_towards_global(setup) -> None:
    m, rows, sgd = setup
    plain = sgd.train_round(
        rows,
        DpSgdConfig(
            steps=4, sample_rate=1.0, noise_multiplier=0.0, clip_norm=1.0, learning_rate=0.2
        ),
    )
    prox = sgd.train_round(
        rows,
        DpSgdConfig(
            steps=4,
            sample_rate=1.0,
            noise_multiplier=0.0,
            clip_norm=1.0,
            learning_rate=0.2,
            prox_mu=3.0,
        ),
    )
    assert np.linalg.norm(prox.update) < 0.9 * np.linalg.norm(plain.update)


def test_update_clip_and_bad_config() -> None:
    assert np.linalg.norm(clip_update(np.full(4, 10.0), max_norm=1.0)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        DpSgdConfig(steps=1, sample_rate=0.0, noise_multiplier=1, clip_norm=1, learning_rate=1)
