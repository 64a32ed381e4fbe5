"""The trainer's view of its hospital's privacy ledgers, and its own round store.

The lifetime budget and the individual filter are the hospital's one data ledger, shared
with the node worker through ``fedllm.common.person_ledger`` (same tables, same zCDP
arithmetic: a charge ρ fits when spent + ρ ≤ cap; nothing is ever subtracted). A training
round is one mechanism over the hospital's data set, so:

* its ρ (the smallest ρ·α curve dominating the round's DP-SGD RDP curve) is drawn from the
  hospital's **lifetime** budget, the same sum every query draws from, before training starts;
* every patient whose notes may be sampled is charged ρ on the **individual filter**; patients
  who cannot take another ρ are left out of the round's training set;
* the charge is keyed by (federation, round): a restarted round or trainer finds its row and
  never pays twice. The trained update is stored there before it is sent, so a restart re-sends
  the same update (re-masked) instead of training again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    select,
)

from fedllm.common import person_ledger as pl
from fedllm.common.db import make_engine
from fedllm.common.kafka import now_ms

metadata = MetaData()

round_charges = Table(
    "fl_round_charges",
    metadata,
    Column("hospital_id", String(128), primary_key=True),
    Column("federation_id", String(128), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("rho", Float, nullable=False),
    Column("rdp_json", Text, nullable=False),  # the round's RDP curve on the default orders
    Column("persons_json", Text, nullable=False),  # patients charged (and trained on)
    Column("update_blob", LargeBinary, nullable=True),  # float64 update, set before sending
    Column("train_loss", Float, nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
)


@dataclass(frozen=True, slots=True)
class RoundCharge:
    """The stored charge of one round: ``fresh`` is True when this call paid it."""

    fresh: bool
    rho: float
    persons: tuple[str, ...]
    update: np.ndarray | None
    train_loss: float | None


class TrainerLedger:
    def __init__(
        self,
        url_or_engine: str | Engine,
        *,
        hospital_id: str,
        rho_cap: float,
        person_rho_cap: float,
    ) -> None:
        self.engine = (
            make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        )
        self.hospital_id = hospital_id
        self.person_rho_cap = person_rho_cap
        metadata.create_all(self.engine)
        pl.open_hospital(self.engine, hospital_id, rho_cap=rho_cap)

    def _key(self, federation_id: str, round_no: int):  # noqa: ANN202
        return and_(
            round_charges.c.hospital_id == self.hospital_id,
            round_charges.c.federation_id == federation_id,
            round_charges.c.round == round_no,
        )

    def lookup(self, federation_id: str, round_no: int) -> RoundCharge | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(round_charges).where(self._key(federation_id, round_no))
            ).first()
        return None if row is None else self._charge(row, fresh=False)

    @staticmethod
    def _charge(row, *, fresh: bool) -> RoundCharge:  # noqa: ANN001
        return RoundCharge(
            fresh=fresh,
            rho=float(row.rho),
            persons=tuple(json.loads(row.persons_json)),
            update=None
            if row.update_blob is None
            else np.frombuffer(row.update_blob, dtype="<f8").copy(),
            train_loss=row.train_loss,
        )

    def charge_round(
        self,
        federation_id: str,
        round_no: int,
        *,
        rho: float,
        rdp: np.ndarray,
        persons: list[str],
    ) -> RoundCharge | None:
        """Pay ``rho`` for the round from the lifetime budget and from each eligible person's
        filter, atomically, once per (federation, round). Returns the stored charge, or None
        when the lifetime budget cannot pay or no person's filter can (nothing written: the
        hospital leaves the round).
        Persons whose filter cannot take ``rho`` are dropped from ``persons`` first."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(round_charges).where(self._key(federation_id, round_no))
            ).first()
            if row is not None:
                return self._charge(row, fresh=False)
            capped = pl.capped(conn, self.hospital_id, rho=rho, person_cap=self.person_rho_cap)
            eligible = [] if capped.all else sorted(set(persons) - capped.persons)
            if not eligible:  # nobody left to train on: the hospital leaves, nothing charged
                return None
            if not pl.draw_lifetime(conn, self.hospital_id, rho):
                return None
            pl.charge_persons(conn, self.hospital_id, eligible, rho)
            conn.execute(
                round_charges.insert().values(
                    hospital_id=self.hospital_id,
                    federation_id=federation_id,
                    round=round_no,
                    rho=rho,
                    rdp_json=json.dumps([float(x) for x in rdp]),
                    persons_json=json.dumps(eligible),
                    update_blob=None,
                    train_loss=None,
                    created_at_ms=now_ms(),
                )
            )
        return RoundCharge(
            fresh=True, rho=rho, persons=tuple(eligible), update=None, train_loss=None
        )

    def store_update(
        self, federation_id: str, round_no: int, update: np.ndarray, *, train_loss: float
    ) -> np.ndarray:
        """Persist the trained update (first write wins); returns what is stored."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(round_charges).where(self._key(federation_id, round_no)).with_for_update()
            ).one()
            if row.update_blob is not None:
                return np.frombuffer(row.update_blob, dtype="<f8").copy()
            conn.execute(
                round_charges.update()
                .where(self._key(federation_id, round_no))
                .values(
                    update_blob=np.asarray(update, dtype="<f8").tobytes(), train_loss=train_loss
                )
            )
        return np.asarray(update, dtype=np.float64)

    def training_rdp(self, federation_id: str | None = None) -> np.ndarray | None:
        """Σ of the charged rounds' RDP curves (None when nothing was charged)."""
        q = select(round_charges.c.rdp_json).where(round_charges.c.hospital_id == self.hospital_id)
        if federation_id is not None:
            q = q.where(round_charges.c.federation_id == federation_id)
        with self.engine.connect() as conn:
            curves = [np.array(json.loads(r.rdp_json)) for r in conn.execute(q)]
        return None if not curves else np.sum(curves, axis=0)

    def lifetime(self) -> tuple[float, float]:
        with self.engine.connect() as conn:
            return pl.lifetime(conn, self.hospital_id)

    def person_spend(self, person_id: str) -> float:
        with self.engine.connect() as conn:
            return pl.spends(conn, self.hospital_id, [person_id])[person_id]
