"""The durable budget ledger: one row per request, one lock row per budget account."""

from __future__ import annotations

from typing import Any, TypedDict, cast

from sqlalchemy import JSON, BigInteger, Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class BudgetAccount(Base):
    """A user's or department's budget in one window; the row is also its account's lock.

    `charged_units` is the zCDP filter's running Σρ (integer units of 1e-15 ρ, exact) over the
    entries that count against it: outstanding reservations and committed charges of the current
    `epoch`. It changes only in the transaction that changes one of those entries, so it always
    equals the sum recomputed from them (`Ledger.recompute`). An admin reset starts a new epoch.
    """

    __tablename__ = "budget_accounts"

    scope: Mapped[str] = mapped_column(String(200), primary_key=True)  # user:<id> | dept:<name>
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    limit_epsilon: Mapped[float] = mapped_column(Float)
    charged_units: Mapped[int] = mapped_column(BigInteger, default=0)
    epoch: Mapped[int] = mapped_column(Integer, default=0)


class BudgetEntry(Base):
    """One request's reservation and its settlement.

    state: reserved -> committed | refunded; or rejected at once. Transitions happen only from
    `reserved`, which makes every replayed event a no-op.
    """

    __tablename__ = "budget_entries"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), index=True)
    department: Mapped[str] = mapped_column(String(100), index=True)
    window_start: Mapped[int] = mapped_column(BigInteger, index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    reserved_rdp: Mapped[dict] = mapped_column(JSON)
    spent_rdp: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    spent_epsilon: Mapped[float] = mapped_column(Float, default=0.0)
    deadline_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    settled_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    node_id: Mapped[str] = mapped_column(String(100), default="")
    # The zCDP filter's view (units of 1e-15 ρ): what was reserved, and what counts now
    # (the reservation while reserved, the charge once committed, 0 once refunded/rejected);
    # the accounts' epochs it was reserved in (it counts only while they are current).
    reserved_units: Mapped[int] = mapped_column(BigInteger, default=0)
    charged_units: Mapped[int] = mapped_column(BigInteger, default=0)
    user_epoch: Mapped[int] = mapped_column(Integer, default=0)
    dept_epoch: Mapped[int] = mapped_column(Integer, default=0)


class EntryRow(TypedDict):
    """A `BudgetEntry` row as a plain record (`Ledger.entry`); keys = the table's columns
    (tests/accountant/test_ledger.py keeps them equal)."""

    request_id: str
    user_id: str
    department: str
    window_start: int
    state: str
    epsilon: float
    delta: float
    reserved_rdp: dict[str, Any]
    spent_rdp: dict[str, Any] | None
    spent_epsilon: float
    deadline_ms: int
    created_at_ms: int
    settled_at_ms: int | None
    outcome: str
    reason: str
    node_id: str
    reserved_units: int
    charged_units: int
    user_epoch: int
    dept_epoch: int


def entry_row(entry: BudgetEntry) -> EntryRow:
    """`entry` as a plain record."""
    return cast(EntryRow, {c.name: getattr(entry, c.name) for c in BudgetEntry.__table__.columns})


class BudgetReset(Base):
    """An admin's reset of one account in one window (its id makes the reset idempotent): the
    account's epoch advances, so entries reserved before it no longer count against that account
    (they still count against the other one)."""

    __tablename__ = "budget_resets"

    adjustment_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(200), index=True)  # user:<id> | dept:<name>
    window_start: Mapped[int] = mapped_column(BigInteger, index=True)
    reset_at_ms: Mapped[int] = mapped_column(BigInteger)
    actor_user_id: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
