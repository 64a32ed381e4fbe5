"""Fixtures: a data_dir whose hospitals already hold clinosim notes and whose models folder
links the cached SmolLM2 files (all under the git-ignored ``<repo>/.fedllm``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fedllm.services.node_worker.clinosim_data import ensure_clinosim

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FEDLLM_TEST_CACHE", REPO / ".fedllm"))
SEEDS = (11, 12, 13)
HELDOUT_SEED = 14


@pytest.fixture(scope="session")
def fl_sources() -> dict[int, Path]:
    return {
        s: ensure_clinosim(CACHE / "test-hospitals" / f"seed{s}", seed=s, population=20)
        for s in (*SEEDS, HELDOUT_SEED)
    }


@pytest.fixture
def fl_data_dir(tmp_path: Path, fl_sources: dict[int, Path]) -> Path:
    """data_dir with hospitals h11, h12, h13 and the public held-out set (seed 14)."""
    for s in SEEDS:
        shutil.copytree(fl_sources[s], tmp_path / "hospitals" / f"h{s}" / "clinosim")
    shutil.copytree(fl_sources[HELDOUT_SEED], tmp_path / "federation" / f"heldout-{HELDOUT_SEED}")
    models = tmp_path / "models"
    models.mkdir()
    for name in ("smollm2-tokenizer", "smollm2-135m-instruct"):
        if (CACHE / "models" / name).exists():
            (models / name).symlink_to(CACHE / "models" / name)
    return tmp_path
