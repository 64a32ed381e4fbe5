"""The coordinator's durable round log: each round's result is written here before it is
published, so a restarted coordinator resumes from the last finished round with its global
adapter, and never publishes a different result for a round it already closed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    select,
)

from fedllm.common.db import open_tables
from fedllm.common.kafka import now_ms

metadata = MetaData()

rounds = Table(
    "fl_coordinator_rounds",
    metadata,
    Column("federation_id", String(128), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("fields_json", Text, nullable=False),  # the RoundResult fields except the payload
    Column("global_blob", LargeBinary, nullable=False),  # float32 global adapter after the round
    Column("created_at_ms", BigInteger, nullable=False),
)


@dataclass(frozen=True, slots=True)
class ClosedRound:
    round: int
    attempt: int
    status: str
    fields: dict[str, Any]
    global_vector: np.ndarray


class RoundStore:
    def __init__(self, url_or_engine: str | Engine) -> None:
        self.engine = open_tables(url_or_engine, metadata)

    def close_round(
        self,
        federation_id: str,
        round_no: int,
        *,
        attempt: int,
        status: str,
        fields: dict[str, Any],
        global_vector: np.ndarray,
    ) -> ClosedRound:
        """Persist a round's result (first write wins); returns what is stored."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(rounds).where(
                    and_(rounds.c.federation_id == federation_id, rounds.c.round == round_no)
                )
            ).first()
            if row is None:
                conn.execute(
                    rounds.insert().values(
                        federation_id=federation_id,
                        round=round_no,
                        attempt=attempt,
                        status=status,
                        fields_json=json.dumps(fields, sort_keys=True),
                        global_blob=np.asarray(global_vector, dtype="<f4").tobytes(),
                        created_at_ms=now_ms(),
                    )
                )
                return ClosedRound(round_no, attempt, status, fields, global_vector)
        return self._closed(row)

    @staticmethod
    def _closed(row: Any) -> ClosedRound:
        return ClosedRound(
            round=row.round,
            attempt=row.attempt,
            status=row.status,
            fields=json.loads(row.fields_json),
            global_vector=np.frombuffer(row.global_blob, dtype="<f4").copy(),
        )

    def last(self, federation_id: str) -> ClosedRound | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(rounds)
                .where(rounds.c.federation_id == federation_id)
                .order_by(rounds.c.round.desc())
                .limit(1)
            ).first()
        return None if row is None else self._closed(row)
