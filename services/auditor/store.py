"""Appending to the chained audit log: idempotent by event_id, serialised per chain.

Postgres: each chain's head row is locked with SELECT ... FOR UPDATE for the transaction.
SQLite: the head upsert takes the database write lock before the head is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from fedllm.services.auditor.chain import GENESIS, row_hash
from fedllm.services.auditor.tables import audit_log, chain_heads

_IN_CHUNK = 500


@dataclass(frozen=True, slots=True)
class AppendResult:
    stored: int
    duplicates: int


def lock_chain_head(conn: Connection, chain: str) -> tuple[int, str]:
    """Create the chain's head if new, lock it for this transaction, return (seq, row_hash)."""
    ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    conn.execute(
        ins(chain_heads)
        .values(chain=chain, seq=0, row_hash=GENESIS)
        .on_conflict_do_nothing(index_elements=["chain"])
    )
    q = select(chain_heads.c.seq, chain_heads.c.row_hash).where(chain_heads.c.chain == chain)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    seq, head = conn.execute(q).one()
    return int(seq), str(head)


def existing_event_ids(conn: Connection, event_ids: Iterable[str]) -> set[str]:
    ids = list(event_ids)
    found: set[str] = set()
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        found.update(
            conn.scalars(select(audit_log.c.event_id).where(audit_log.c.event_id.in_(chunk)))
        )
    return found


def append_rows(conn: Connection, rows: list[dict[str, Any]]) -> AppendResult:
    """Append rows (from records.event_to_row, optionally with source_partition/offset) in order,
    skipping event_ids already stored or repeated in the batch. Runs in the caller's transaction.
    """
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row["event_id"], row)
    by_chain: dict[str, list[dict[str, Any]]] = {}
    for row in unique.values():
        by_chain.setdefault(row["chain"], []).append(row)
    stored = 0
    for chain in sorted(by_chain):  # fixed order: no lock-order deadlocks between writers
        seq, prev = lock_chain_head(conn, chain)
        known = existing_event_ids(conn, (r["event_id"] for r in by_chain[chain]))
        out: list[dict[str, Any]] = []
        for row in by_chain[chain]:
            if row["event_id"] in known:
                continue
            seq += 1
            full = {
                "source_partition": None,
                "source_offset": None,
                **row,
                "seq": seq,
                "prev_hash": prev,
            }
            full["row_hash"] = prev = row_hash(prev, full)
            out.append(full)
        if out:
            conn.execute(insert(audit_log), out)
            conn.execute(
                update(chain_heads)
                .where(chain_heads.c.chain == chain)
                .values(seq=seq, row_hash=prev)
            )
            stored += len(out)
    return AppendResult(stored=stored, duplicates=len(rows) - stored)


def append(engine: Engine, rows: list[dict[str, Any]]) -> AppendResult:
    """Append rows in one committed transaction."""
    with engine.begin() as conn:
        return append_rows(conn, rows)
