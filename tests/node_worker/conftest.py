"""Fixtures for the node worker: the tiny test model, one clinosim hospital, cached on disk.

Both are cached under ``<repo>/.fedllm`` (git-ignored; override with FEDLLM_TEST_CACHE) so that
repeated sessions skip the slow one-off steps (tokenizer from GGUF, clinosim generation).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedllm.services.node_worker.clinosim_data import ensure_clinosim

if TYPE_CHECKING:  # torch is imported when a test asks for the model, not at collection
    from fedllm.services.node_worker.model import LoadedModel

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FEDLLM_TEST_CACHE", REPO / ".fedllm"))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    d = CACHE / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny(models_dir: Path) -> LoadedModel:
    import torch

    from fedllm.services.node_worker.model import tiny_model

    torch.set_num_threads(1)  # 2 shared cores: one thread avoids OpenMP oversubscription
    return tiny_model(models_dir=models_dir, seed=0, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def clinosim_source() -> Path:
    return ensure_clinosim(CACHE / "test-hospitals" / "seed11", seed=11, population=20)


@pytest.fixture
def hospital_data_dir(tmp_path: Path, clinosim_source: Path) -> Path:
    """A data_dir whose st_mary hospital already has its clinosim records (a copy)."""
    dst = tmp_path / "hospitals" / "st_mary" / "clinosim"
    shutil.copytree(clinosim_source, dst)
    return tmp_path
