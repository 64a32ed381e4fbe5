"""Walk each chain and name the first row that was altered, deleted or reordered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from fedllm.services.auditor.chain import GENESIS, row_hash
from fedllm.services.auditor.tables import audit_log, chain_heads, checkpoints

PURGE_ACTION = "audit.purged"


@dataclass(slots=True)
class ChainResult:
    chain: str
    ok: bool
    rows: int
    head_seq: int
    head_hash: str
    start_seq: int  # first seq expected (1, or one past the latest purge checkpoint)
    problem: str = ""
    bad_row_id: int | None = None
    bad_seq: int | None = None


@dataclass(slots=True)
class VerifyReport:
    chains: list[ChainResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains)

    def lines(self) -> list[str]:
        out = []
        for c in self.chains:
            if c.ok:
                out.append(
                    f"OK chain {c.chain}: {c.rows} rows, seq {c.start_seq}..{c.head_seq}, "
                    f"head {c.head_hash}"
                )
            else:
                out.append(f"FAIL chain {c.chain}: {c.problem}")
        if not self.chains:
            out.append("OK: audit log is empty")
        return out


def _latest_checkpoint(conn: Connection, chain: str) -> dict[str, Any] | None:
    row = (
        conn.execute(
            select(checkpoints)
            .where(checkpoints.c.chain == chain)
            .order_by(checkpoints.c.cut_seq.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


def _is_some_row_hash(conn: Connection, chain: str, h: str) -> bool:
    return (
        conn.scalar(
            select(func.count())
            .select_from(audit_log)
            .where(audit_log.c.chain == chain, audit_log.c.row_hash == h)
        )
        != 0
    )


def _describe(row: dict[str, Any]) -> str:
    return f"row id={row['id']} seq={row['seq']} event_id={row['event_id']}"


def verify_chain(conn: Connection, chain: str) -> ChainResult:
    """Check seq continuity, prev_hash links and each row_hash; then the head and the anchor."""
    cp = _latest_checkpoint(conn, chain)
    expected_seq, expected_prev = (cp["cut_seq"] + 1, cp["cut_hash"]) if cp else (1, GENESIS)
    start = expected_seq
    res = ChainResult(
        chain=chain,
        ok=True,
        rows=0,
        head_seq=expected_seq - 1,
        head_hash=expected_prev,
        start_seq=start,
    )

    def fail(row: dict[str, Any] | None, problem: str) -> ChainResult:
        res.ok, res.problem = False, problem
        if row is not None:
            res.bad_row_id, res.bad_seq = row["id"], row["seq"]
        return res

    purge_seen = cp is None
    result = conn.execution_options(yield_per=2000).execute(
        select(audit_log).where(audit_log.c.chain == chain).order_by(audit_log.c.seq)
    )
    for m in result.mappings():
        row = dict(m)
        if row["seq"] < expected_seq:
            return fail(
                row,
                f"{_describe(row)}: seq at or before purge checkpoint "
                f"{expected_seq - 1} (row re-inserted after a purge?)",
            )
        if row["seq"] > expected_seq:
            missing = (
                f"seq {expected_seq}"
                if row["seq"] == expected_seq + 1
                else f"seq {expected_seq}..{row['seq'] - 1}"
            )
            return fail(row, f"{missing} missing before {_describe(row)} (deleted row)")
        if row["prev_hash"] != expected_prev:
            why = (
                "reordered: its prev_hash is another row's hash"
                if _is_some_row_hash(conn, chain, row["prev_hash"])
                else "prev_hash does not match the previous row (predecessor altered or deleted)"
            )
            return fail(row, f"{_describe(row)}: {why}")
        if row_hash(row["prev_hash"], row) != row["row_hash"]:
            return fail(row, f"{_describe(row)}: altered (row_hash does not match its contents)")
        if (
            cp is not None
            and row["action"] == PURGE_ACTION
            and row["details"].get("cut_seq") == str(cp["cut_seq"])
            and row["details"].get("cut_hash") == cp["cut_hash"]
        ):
            purge_seen = True
        expected_prev, expected_seq = row["row_hash"], expected_seq + 1
        res.rows += 1
    res.head_seq, res.head_hash = expected_seq - 1, expected_prev
    head = conn.execute(
        select(chain_heads.c.seq, chain_heads.c.row_hash).where(chain_heads.c.chain == chain)
    ).first()
    if head is not None and (head.seq, head.row_hash) != (res.head_seq, res.head_hash):
        return fail(
            None,
            f"chain head says seq {head.seq} but the last row is seq "
            f"{res.head_seq}: rows after seq {res.head_seq} deleted or head altered",
        )
    if not purge_seen:
        return fail(
            None,
            f"checkpoint at seq {cp['cut_seq'] if cp else '?'} has no matching "
            f"{PURGE_ACTION} record in the chain (forged checkpoint?)",
        )
    return res


def chain_names(conn: Connection) -> list[str]:
    names = set(conn.scalars(select(chain_heads.c.chain)))
    names.update(conn.scalars(select(audit_log.c.chain).group_by(audit_log.c.chain)))
    names.update(conn.scalars(select(checkpoints.c.chain).group_by(checkpoints.c.chain)))
    return sorted(names)


def verify(engine: Engine, chain: str | None = None) -> VerifyReport:
    """Verify one chain, or all of them, in one read-only snapshot."""
    report = VerifyReport()
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for name in [chain] if chain else chain_names(conn):
            report.chains.append(verify_chain(conn, name))
        conn.rollback()
    return report


def row_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(audit_log)) or 0)
