"""Retention: delete a chain's oldest rows through the one sanctioned path, leaving an anchor.

In one transaction per run: enable the delete permit (Postgres: `SET LOCAL fedllm.purge = on`;
SQLite: a row in audit_purge_permit), cut each chain at the last row such that it and every
earlier row occurred before the cut-off, delete up to it, store a checkpoint (seq and row_hash
of the last purged row) and append an `audit.purged` record citing that checkpoint, so that
`audit verify` continues from the cut and a forged checkpoint has no matching record.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, insert, select, text

from fedllm.common.audit import audit_event
from fedllm.schemas.records import AuditEvent
from fedllm.services.auditor.chain import as_utc, iso_ms
from fedllm.services.auditor.rows import Protection, event_to_row
from fedllm.services.auditor.settings import AuditorSettings
from fedllm.services.auditor.store import append_rows, lock_chain_head
from fedllm.services.auditor.tables import audit_log, chain_heads, checkpoints
from fedllm.services.auditor.verify import PURGE_ACTION


class RetentionError(ValueError):
    """The cut-off would delete records younger than the retention period."""


@dataclass(frozen=True, slots=True)
class ChainPurge:
    chain: str
    cut_seq: int
    cut_hash: str
    purged_rows: int
    record: AuditEvent  # the AuditEvent of the purge (also sent to the audit topic)


def check_cutoff(before: datetime, *, retention_days: int, now: datetime | None = None) -> None:
    latest = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    if as_utc(before) > latest:
        raise RetentionError(
            f"--before {iso_ms(before)} is inside the retention period of "
            f"{retention_days} days (latest allowed {iso_ms(latest)})"
        )


def _permit(conn: Connection, on: bool) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT set_config('fedllm.purge', :v, true)"), {"v": "on" if on else "off"}
        )
    elif on:
        conn.execute(text("INSERT INTO audit_purge_permit (id) VALUES (1)"))
    else:
        conn.execute(text("DELETE FROM audit_purge_permit"))


def _start_seq(conn: Connection, chain: str) -> int:
    last_cut = conn.scalar(
        select(func.max(checkpoints.c.cut_seq)).where(checkpoints.c.chain == chain)
    )
    return int(last_cut) + 1 if last_cut is not None else 1


def purge_chain(
    conn: Connection,
    chain: str,
    before: datetime,
    *,
    protection: Protection,
    actor: str,
    source: str,
    now: datetime,
) -> ChainPurge | None:
    head_seq, _ = lock_chain_head(conn, chain)
    first_kept = conn.scalar(
        select(func.min(audit_log.c.seq)).where(
            audit_log.c.chain == chain, audit_log.c.occurred_at >= as_utc(before)
        )
    )
    cut = int(first_kept) - 1 if first_kept is not None else head_seq
    if cut < _start_seq(conn, chain):
        return None
    cut_hash = conn.scalar(
        select(audit_log.c.row_hash).where(audit_log.c.chain == chain, audit_log.c.seq == cut)
    )
    if cut_hash is None:
        raise RuntimeError(f"chain {chain}: row seq {cut} missing; run `fedllm audit verify`")
    purged = conn.execute(
        delete(audit_log).where(audit_log.c.chain == chain, audit_log.c.seq <= cut)
    ).rowcount
    record = audit_event(
        action=PURGE_ACTION,
        service="auditor",
        id_parts=(chain, cut, cut_hash),
        user_id=actor,
        role="retention",
        source_address=source,
        outcome="ok",
        reason=f"retention purge of rows before {iso_ms(before)}",
        chain=chain,
        cut_seq=str(cut),
        cut_hash=cut_hash,
        purged_rows=str(purged),
        before=iso_ms(before),
    )
    record["occurred_at_ms"] = int(as_utc(now).timestamp() * 1000)
    row = event_to_row(record, protection)
    row["chain"] = chain  # anchored in the chain it cut, whatever the chain policy
    conn.execute(
        insert(checkpoints).values(
            chain=chain,
            cut_seq=cut,
            cut_hash=cut_hash,
            purged_rows=purged,
            before=as_utc(before),
            purge_event_id=row["event_id"],
        )
    )
    append_rows(conn, [row])
    return ChainPurge(
        chain=chain, cut_seq=cut, cut_hash=cut_hash, purged_rows=purged, record=record
    )


def purge(
    engine: Engine,
    *,
    before: datetime,
    cfg: AuditorSettings,
    now: datetime | None = None,
    actor: str | None = None,
) -> list[ChainPurge]:
    """Purge every chain up to `before` (refused inside the retention period)."""
    now = now or datetime.now(UTC)
    check_cutoff(before, retention_days=cfg.retention_days, now=now)
    protection = Protection.from_settings(cfg)
    actor = actor or f"os:{getpass.getuser()}"
    source = socket.gethostname()
    done: list[ChainPurge] = []
    with engine.begin() as conn:
        _permit(conn, True)
        for chain in sorted(conn.scalars(select(chain_heads.c.chain))):
            result = purge_chain(
                conn, chain, before, protection=protection, actor=actor, source=source, now=now
            )
            if result is not None:
                done.append(result)
        _permit(conn, False)
    return done
