"""The data's own ledger, kept by each hospital in its own durable store (SQLAlchemy).

Three things live here, keyed by hospital:

* **releases**, one row per (request_id, attempt): written as ``started`` (with the reserved ρ)
  before any record is read, and as ``released`` (with the exact result fields) before the
  result is published. A redelivered request is answered from this row, so a restarted node
  re-sends the same release and never draws new noise; a request found ``started`` but never
  released (the node died mid-mechanism) is failed closed and still charged.
* the **lifetime budget** of the hospital's data set: a zCDP ρ sum that every query touching
  the records draws from, whatever the user, department or window. A query that does not fit
  is refused before any record is read. There is no reset: the stored cap can only be lowered
  by configuration, never raised, and nothing subtracts from the spend.
* the **individual filter**: ρ charged to each person whose records entered a mechanism
  (Feldman & Zrnic 2021, individual Rényi filters; with curves ρ·α the filter at every order is
  the one test Σρ ≤ cap). Persons whose spend plus the next query's ρ would pass the cap are
  left out of retrieval and aggregates.

The budget and the filter are the hospital's one data ledger, shared with its trainer:
``fedllm.common.person_ledger`` (a release that charges every person writes one row there).

Everything here is internal to the hospital; none of it is ever released to requesters.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    select,
)

from fedllm.common import person_ledger as pl
from fedllm.common.db import make_engine
from fedllm.common.kafka import now_ms
from fedllm.services.node_worker.fields import AnswerFields

metadata = MetaData()

releases = Table(
    "node_releases",
    metadata,
    Column("hospital_id", String(128), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("state", String(16), nullable=False),  # "started" | "released"
    Column("rho", Float, nullable=False),
    Column("persons_charged", Boolean, nullable=False, default=False),
    Column("fields_json", Text, nullable=False, default=""),
    Column("created_at_ms", BigInteger, nullable=False),
)


# Built once (statement construction and its cache key are most of a small query's cost);
# the parameters come from `NodeLedger._key`.
_KEY = and_(
    releases.c.hospital_id == bindparam("k_hospital"),
    releases.c.request_id == bindparam("k_request"),
    releases.c.attempt == bindparam("k_attempt"),
)
_ROW = select(releases).where(_KEY)
_ROW_FOR_UPDATE = _ROW.with_for_update()
_MARK_CHARGED = releases.update().where(_KEY).values(persons_charged=True)
_RELEASE = releases.update().where(_KEY).values(state="released", fields_json=bindparam("v_fields"))


@dataclass(frozen=True, slots=True)
class StoredRelease:
    state: str
    rho: float
    fields: AnswerFields | None


def _stored(row: Any) -> StoredRelease:
    """A `releases` row as a StoredRelease."""
    return StoredRelease(
        state=row.state,
        rho=row.rho,
        fields=json.loads(row.fields_json) if row.fields_json else None,
    )


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    hospital_id: str
    rho_spent: float
    rho_cap: float
    persons_charged: int
    persons_at_cap: int
    person_rho_cap: float


class NodeLedger:
    """One hospital's store. ``rho_cap`` and ``person_rho_cap`` are the configured caps (zCDP)."""

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
        self._local = threading.local()  # this thread's open transaction(), if any
        metadata.create_all(self.engine)
        pl.open_hospital(self.engine, hospital_id, rho_cap=rho_cap)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run this thread's ledger calls in the block as one transaction: one commit at the
        end, each call seeing the writes of the calls before it (a batch of requests is then
        handled exactly as one after the other). Nested blocks join the outer one."""
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self.engine.begin() as conn:
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    @contextmanager
    def _conn(self) -> Iterator[Connection]:
        """The open transaction() of this thread, or a transaction of its own."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self.engine.begin() as own:
            yield own

    def _key(self, request_id: str, attempt: int) -> dict[str, Any]:
        """The parameters of the prebuilt statements (`_ROW` ...) for one release row."""
        return {"k_hospital": self.hospital_id, "k_request": request_id, "k_attempt": attempt}

    def lookup(self, request_id: str, attempt: int) -> StoredRelease | None:
        with self._conn() as conn:
            row = conn.execute(_ROW, self._key(request_id, attempt)).first()
        return _stored(row) if row is not None else None

    def begin(self, request_id: str, attempt: int, *, rho: float) -> StoredRelease | None:
        """Draw ``rho`` from the lifetime budget and mark the request started, atomically.

        Returns None when it was drawn; the stored row when the request was seen before; a
        ``refused`` pseudo-row (nothing written) when the lifetime budget cannot cover it.
        """
        with self._conn() as conn:
            row = conn.execute(_ROW, self._key(request_id, attempt)).first()
            if row is not None:
                return _stored(row)
            if not pl.draw_lifetime(conn, self.hospital_id, rho):
                return StoredRelease(state="refused", rho=0.0, fields=None)
            conn.execute(
                releases.insert().values(
                    hospital_id=self.hospital_id,
                    request_id=request_id,
                    attempt=attempt,
                    state="started",
                    rho=rho,
                    persons_charged=False,
                    fields_json="",
                    created_at_ms=now_ms(),
                )
            )
        return None

    def capped_persons(self, *, rho: float) -> pl.Capped:
        """Persons whose filter cannot take another ``rho``: they leave retrieval and aggregates
        (``all``: every person, a state that follows from public figures alone)."""
        with self._conn() as conn:
            return pl.capped(conn, self.hospital_id, rho=rho, person_cap=self.person_rho_cap)

    def _charge_once(self, request_id: str, attempt: int, charge: Any) -> None:
        """Run ``charge(conn)`` once per (request, attempt), before the mechanism runs."""
        with self._conn() as conn:
            row = conn.execute(_ROW_FOR_UPDATE, self._key(request_id, attempt)).one()
            if row.persons_charged:
                return
            charge(conn)
            conn.execute(_MARK_CHARGED, self._key(request_id, attempt))

    def charge_persons(
        self, request_id: str, attempt: int, persons: set[str] | frozenset[str], *, rho: float
    ) -> None:
        """Charge ``rho`` to each of ``persons`` (one row each)."""
        self._charge_once(
            request_id, attempt, lambda c: pl.charge_persons(c, self.hospital_id, persons, rho)
        )

    def charge_everyone(
        self, request_id: str, attempt: int, *, rho: float, left_out: frozenset[str]
    ) -> None:
        """Charge ``rho`` to every person but ``left_out`` (at their cap): one row, whatever the
        number of persons, plus one per person left out."""
        self._charge_once(
            request_id,
            attempt,
            lambda c: pl.charge_everyone(c, self.hospital_id, rho, left_out=left_out),
        )

    def spends(self, persons: set[str] | frozenset[str]) -> dict[str, float]:
        """Each person's ρ spend on the individual filter (internal)."""
        with self.engine.connect() as conn:
            return pl.spends(conn, self.hospital_id, persons)

    def release(self, request_id: str, attempt: int, fields: AnswerFields) -> AnswerFields:
        """Persist the result fields (before publishing); first write wins. Returns what is
        stored, which is what must be published."""
        with self._conn() as conn:
            row = conn.execute(_ROW_FOR_UPDATE, self._key(request_id, attempt)).first()
            if row is not None and row.state == "released":
                stored: AnswerFields = json.loads(row.fields_json)
                return stored
            text = json.dumps(fields, sort_keys=True)
            if row is None:  # refused or failed before any draw: nothing charged here
                conn.execute(
                    releases.insert().values(
                        hospital_id=self.hospital_id,
                        request_id=request_id,
                        attempt=attempt,
                        state="released",
                        rho=0.0,
                        persons_charged=False,
                        fields_json=text,
                        created_at_ms=now_ms(),
                    )
                )
            else:
                conn.execute(_RELEASE, {**self._key(request_id, attempt), "v_fields": text})
        return fields

    def lifetime(self) -> tuple[float, float]:
        """(ρ spent, ρ cap) of the data set's lifetime budget. Public: the spend is a function
        of the admitted reservations alone, never of the records."""
        with self.engine.connect() as conn:
            return pl.lifetime(conn, self.hospital_id)

    def lifetime_room(self) -> float:
        """Share of the data set's lifetime ρ budget left."""
        spent, cap = self.lifetime()
        return max(0.0, 1.0 - spent / cap) if cap > 0 else 0.0

    def summary(self, *, query_rho: float, population: int = 0) -> LedgerSummary:
        """The privacy officer's view; "at cap" = cannot take one more query of ``query_rho``
        (``population``: the number of persons held, for those never charged a subset)."""
        with self.engine.connect() as conn:
            spent, cap = pl.lifetime(conn, self.hospital_id)
            n = pl.filter_counts(
                conn,
                self.hospital_id,
                query_rho=query_rho,
                person_cap=self.person_rho_cap,
                population=population,
            )
        return LedgerSummary(
            hospital_id=self.hospital_id,
            rho_spent=spent,
            rho_cap=cap,
            persons_charged=n.persons_charged,
            persons_at_cap=n.persons_at_cap,
            person_rho_cap=self.person_rho_cap,
        )
