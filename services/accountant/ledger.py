"""Ledger operations: reserve, settle (commit actual, refund the rest), refund, expire.

Each operation is one database transaction that locks the user's and the department's account
rows, so concurrent accountant instances cannot overspend a shared department budget. Every
operation is idempotent by request id: replaying an event after a crash changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from fedllm.common.config import BudgetConfig
from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant, window_start
from services.accountant.models import Base, BudgetAccount, BudgetEntry, BudgetReset

LIVE_STATES = ("reserved", "committed")


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's position after an operation (ε at the ledger's δ)."""

    limit: float
    spent: float
    remaining: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an operation did. `changed` is False for a replay or an out-of-order event."""

    request_id: str
    changed: bool
    state: str
    reason: str
    user: Balance
    department: Balance
    entry: dict[str, Any]


# Called inside an operation's transaction, just before it commits (the outbox writes there).
Then = Callable[[Session, "Outcome"], None]


def _then(then: Then | None, s: Session, outcome: Outcome) -> Outcome:
    if then is not None:
        then(s, outcome)
    return outcome


class Ledger:
    """The authoritative budget ledger over a SQLAlchemy engine (Postgres or SQLite)."""

    def __init__(self, engine: Engine, budget: BudgetConfig, accountant: RdpAccountant) -> None:
        self.engine = engine
        self.budget = budget
        self.accountant = accountant
        Base.metadata.create_all(engine)

    # -- queries -------------------------------------------------------------------------

    def _window(self, now_s: float | None = None) -> int:
        return window_start(now_s=time.time() if now_s is None else now_s,
                            window_seconds=self.budget.window_seconds)

    def _dept_limit(self, department: str) -> float:
        if department not in self.budget.department_epsilon:
            raise KeyError(department)
        return self.budget.department_epsilon[department]

    def _spent_curve(self, s: Session, *, column: Any, value: str, window: int) -> PrivacyCurve:
        scope = ("user:" if column is BudgetEntry.user_id else "dept:") + value
        reset_at = s.scalar(select(func.max(BudgetReset.reset_at_ms)).where(
            BudgetReset.scope == scope, BudgetReset.window_start == window,
        )) or 0
        rows = s.execute(
            select(BudgetEntry.state, BudgetEntry.reserved_rdp, BudgetEntry.spent_rdp).where(
                column == value,
                BudgetEntry.window_start == window,
                BudgetEntry.state.in_(LIVE_STATES),
                BudgetEntry.created_at_ms > reset_at,
            )
        ).all()
        curves = [
            PrivacyCurve.from_dict(spent if state == "committed" else reserved)
            for state, reserved, spent in rows
        ]
        return self.accountant.compose(PrivacyCurve.zero(self.accountant.orders), *curves)

    def _balance(self, curve: PrivacyCurve, limit: float) -> Balance:
        delta = self.budget.delta
        spent = self.accountant.epsilon(curve, delta=delta)
        remaining = self.accountant.remaining(spent=curve, limit_epsilon=limit, delta=delta)
        return Balance(limit=limit, spent=spent, remaining=remaining)

    def balances(self, user_id: str, department: str, *, window: int | None = None
                 ) -> tuple[Balance, Balance]:
        """(user, department) balances in the given (default: current) window."""
        window = self._window() if window is None else window
        with Session(self.engine) as s:
            return self._balances(s, user_id, department, window)

    def _balances(self, s: Session, user_id: str, department: str, window: int
                  ) -> tuple[Balance, Balance]:
        user = self._spent_curve(s, column=BudgetEntry.user_id, value=user_id, window=window)
        dept = self._spent_curve(s, column=BudgetEntry.department, value=department,
                                 window=window)
        return (self._balance(user, self.budget.user_epsilon),
                self._balance(dept, self._dept_limit(department)))

    def last_department(self, user_id: str) -> str | None:
        """The department of the user's latest request, if any."""
        with Session(self.engine) as s:
            return s.scalar(select(BudgetEntry.department).where(
                BudgetEntry.user_id == user_id).order_by(BudgetEntry.created_at_ms.desc())
                .limit(1))

    def entry(self, request_id: str) -> dict[str, Any] | None:
        with Session(self.engine) as s:
            row = s.get(BudgetEntry, request_id)
            return _as_dict(row) if row else None

    # -- locking -------------------------------------------------------------------------

    def _lock_accounts(self, s: Session, user_id: str, department: str, window: int) -> None:
        """Create (if needed) and lock both account rows, in a fixed order."""
        accounts = sorted([
            (f"user:{user_id}", self.budget.user_epsilon),
            (f"dept:{department}", self._dept_limit(department)),
        ])
        insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        for scope, limit in accounts:
            s.execute(insert(BudgetAccount).values(
                scope=scope, window_start=window, limit_epsilon=limit,
            ).on_conflict_do_nothing())
        for scope, _ in accounts:
            s.execute(select(BudgetAccount).where(
                BudgetAccount.scope == scope, BudgetAccount.window_start == window,
            ).with_for_update())

    def _begin(self, s: Session) -> None:
        if self.engine.dialect.name == "sqlite":
            s.connection().exec_driver_sql("BEGIN IMMEDIATE")  # serialise writers

    # -- operations ------------------------------------------------------------------------

    def reserve(self, request: dict[str, Any], *, now_s: float | None = None,
                then: Then | None = None) -> Outcome:
        """Reserve the request's (ε, δ) against its user's and department's budgets.

        `then(session, outcome)` runs inside the transaction, before it commits."""
        rid, user_id, dept = request["request_id"], request["user_id"], request["department"]
        window = self._window(now_s)
        with Session(self.engine, autobegin=False) as s, s.begin():
            self._begin(s)
            existing = s.get(BudgetEntry, rid)
            if existing is not None:
                user, department = self._balances(s, user_id, existing.department,
                                                   existing.window_start)
                return _then(then, s, Outcome(rid, False, existing.state, existing.reason, user,
                                              department, _as_dict(existing)))
            if dept not in self.budget.department_epsilon:
                return _then(then, s, self._reject(s, request, window,
                                                   f"unknown department {dept!r}"))
            self._lock_accounts(s, user_id, dept, window)
            cost = self.accountant.query_curve(epsilon=request["epsilon"], delta=self.budget.delta)
            user_curve = self._spent_curve(s, column=BudgetEntry.user_id, value=user_id,
                                           window=window)
            dept_curve = self._spent_curve(s, column=BudgetEntry.department, value=dept,
                                           window=window)
            for curve, limit, who in (
                (user_curve, self.budget.user_epsilon, "user"),
                (dept_curve, self._dept_limit(dept), "department"),
            ):
                if self.accountant.would_exceed(spent=curve, extra=cost, limit_epsilon=limit,
                                                delta=self.budget.delta):
                    left = self.accountant.remaining(spent=curve, limit_epsilon=limit,
                                                     delta=self.budget.delta)
                    return _then(then, s, self._reject(
                        s, request, window,
                        f"{who} privacy budget exhausted: requested epsilon "
                        f"{request['epsilon']:g}, remaining {left:.4f} of {limit:g} "
                        f"this window",
                    ))
            row = BudgetEntry(
                request_id=rid, user_id=user_id, department=dept, window_start=window,
                state="reserved", epsilon=request["epsilon"], delta=self.budget.delta,
                reserved_rdp=cost.to_dict(), spent_rdp=None, spent_epsilon=0.0,
                deadline_ms=request["deadline_ms"], created_at_ms=_now_ms(),
            )
            s.add(row)
            s.flush()
            user, department = self._balances(s, user_id, dept, window)
            return _then(then, s, Outcome(rid, True, "reserved", "", user, department,
                                          _as_dict(row)))

    def _reject(self, s: Session, request: dict[str, Any], window: int, reason: str) -> Outcome:
        row = BudgetEntry(
            request_id=request["request_id"], user_id=request["user_id"],
            department=request["department"], window_start=window, state="rejected",
            epsilon=request["epsilon"], delta=self.budget.delta, reserved_rdp={},
            spent_rdp=None, spent_epsilon=0.0, deadline_ms=request["deadline_ms"],
            created_at_ms=_now_ms(), settled_at_ms=_now_ms(), outcome="rejected",
            reason=reason,
        )
        s.add(row)
        s.flush()
        if request["department"] in self.budget.department_epsilon:
            user, dept = self._balances(s, request["user_id"], request["department"], window)
        else:
            zero = Balance(limit=0.0, spent=0.0, remaining=0.0)
            user, dept = zero, zero
        return Outcome(row.request_id, True, "rejected", reason, user, dept, _as_dict(row))

    def settle(self, request_id: str, *, spent: PrivacyCurve | None, outcome: str,
               reason: str = "", node_id: str = "", then: Then | None = None) -> Outcome | None:
        """Commit what was really spent (refunding the rest), or refund all when `spent` is None.

        Only a `reserved` entry changes; anything else (replay, late answer) is a no-op.
        Returns None for an unknown request id. `then` as for `reserve`.
        """
        with Session(self.engine, autobegin=False) as s, s.begin():
            self._begin(s)
            row = s.get(BudgetEntry, request_id)
            if row is None:
                return None
            if row.state == "reserved":
                self._lock_accounts(s, row.user_id, row.department, row.window_start)
                s.refresh(row)
            changed = row.state == "reserved"
            if changed:
                row.state = "committed" if spent is not None else "refunded"
                row.spent_rdp = spent.to_dict() if spent is not None else None
                row.spent_epsilon = (
                    self.accountant.epsilon(spent, delta=row.delta) if spent is not None else 0.0
                )
                row.outcome, row.reason, row.node_id = outcome, reason, node_id
                row.settled_at_ms = _now_ms()
                s.flush()
            user, dept = self._balances(s, row.user_id, row.department, row.window_start)
            return _then(then, s, Outcome(row.request_id, changed, row.state, row.reason, user,
                                          dept, _as_dict(row)))

    def reset(self, adjustment: dict[str, Any], *, now_s: float | None = None) -> bool:
        """Apply an admin's BudgetAdjustment (action "reset") to the current window, once.

        Returns False for a replay (same adjustment id). Raises KeyError for an unknown
        department and ValueError for an unknown scope or action.
        """
        if adjustment["action"] != "reset" or adjustment["scope"] not in ("user", "department"):
            raise ValueError(f"unsupported adjustment {adjustment['action']}/"
                             f"{adjustment['scope']}")
        subject = adjustment["subject"]
        if adjustment["scope"] == "department":
            self._dept_limit(subject)
        prefix = "user:" if adjustment["scope"] == "user" else "dept:"
        with Session(self.engine, autobegin=False) as s, s.begin():
            self._begin(s)
            if s.get(BudgetReset, adjustment["adjustment_id"]) is not None:
                return False
            s.add(BudgetReset(
                adjustment_id=adjustment["adjustment_id"], scope=prefix + subject,
                window_start=self._window(now_s), reset_at_ms=_now_ms(),
                actor_user_id=adjustment["actor_user_id"], reason=adjustment["reason"],
            ))
            return True

    def expired(self, *, now_ms: int, grace_ms: int) -> list[str]:
        """Ids of reservations whose deadline passed more than `grace_ms` ago."""
        with Session(self.engine) as s:
            return list(s.scalars(select(BudgetEntry.request_id).where(
                BudgetEntry.state == "reserved", BudgetEntry.deadline_ms < now_ms - grace_ms,
            )))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_dict(row: BudgetEntry) -> dict[str, Any]:
    return {c.name: getattr(row, c.name) for c in BudgetEntry.__table__.columns}
