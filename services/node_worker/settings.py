"""The node's own privacy policy: the hospital's durable store and the data's ledger.

Read from FEDLLM_NODE_* environment variables over the ``node:`` section of the FEDLLM_CONFIG
file over these defaults. Every value is public (it is part of the mechanism's description).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fedllm.common.config import Settings, layered_sources

#: Public range of the vote temperature (0 means one-hot votes). Outside it: refused.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 2.0


class NodeSettings(BaseSettings):
    """Per-hospital privacy policy enforced at the node (see docs/privacy.md)."""

    model_config = SettingsConfigDict(
        env_prefix="FEDLLM_NODE_", env_nested_delimiter="__", extra="ignore"
    )

    database_url: str = ""
    """The hospital's own store (releases, lifetime budget, per-person filter). Empty: a SQLite
    file ``<data_dir>/hospitals/<id>/privacy.db``. ``{hospital}`` in the URL is replaced by the
    hospital id (e.g. ``postgresql://…/node_{hospital}``)."""
    lifetime_epsilon: float = Field(default=30.0, gt=0)
    """Lifetime budget of the hospital's data set, as ε at the node's δ (stored as zCDP ρ).
    Every query touching the records draws from it; nothing resets it."""
    person_epsilon: float = Field(default=10.0, gt=0)
    """Lifetime cap of one person's individual filter, as ε at the node's δ (stored as ρ)."""
    max_query_epsilon: float = Field(default=1.0, gt=0)
    """Per-query cap: a query reserving more spends at most this (ε at the node's δ) here; the
    accountant refunds the rest."""
    delta: float = Field(default=1e-5, gt=0, lt=1)
    """The δ the node states its guarantees at; lowered to 1/(10·persons) for larger data sets."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return layered_sources(
            settings_cls, init_settings, env_settings, file_secret_settings, section="node"
        )

    def node_delta(self, *, persons: int) -> float:
        """δ ≤ 1/(10·persons): the policy's δ for a data set of ``persons`` people."""
        return min(self.delta, 1.0 / (10.0 * max(persons, 1)))

    def store_url(self, settings: Settings, hospital_id: str) -> str:
        if self.database_url:
            return self.database_url.replace("{hospital}", hospital_id)
        path: Path = settings.data_dir / "hospitals" / hospital_id / "privacy.db"
        return f"sqlite:///{path.resolve()}"
