"""The hospital's privacy policy as the trainer reads it: the node's own settings
(``FEDLLM_NODE_*``), so training draws from the same store and caps as the node's queries."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedllm.common.config import Settings


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDLLM_NODE_", extra="ignore")

    database_url: str = ""
    lifetime_epsilon: float = Field(default=30.0, gt=0)
    person_epsilon: float = Field(default=10.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)

    def node_delta(self, *, persons: int) -> float:
        return min(self.delta, 1.0 / (10.0 * max(persons, 1)))

    def store_url(self, settings: Settings, hospital_id: str) -> str:
        if self.database_url:
            return self.database_url.replace("{hospital}", hospital_id)
        path: Path = settings.data_dir / "hospitals" / hospital_id / "privacy.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path.resolve()}"
