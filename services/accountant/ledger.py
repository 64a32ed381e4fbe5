"""Ledger operations: reserve, settle (commit actual, refund the rest), refund, expire.

Admission is a zCDP filter (`fedllm.privacy.accountant.ZcdpFilter`; proof in
docs/privacy_accounting.md): every account keeps its running Σρ as an exact integer, changed in
the same transaction as the entry that changes it, so a decision costs O(1) whatever the
history. Each operation takes a batch of events in one transaction that locks the accounts it
touches (in a fixed order), so concurrent accountants cannot overspend a shared budget at any
isolation level: serialization failures, deadlocks and a concurrent insert of the same request
id roll the batch back and retry it. Every operation is idempotent by request id.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Engine, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from fedllm.common.clock import now_ms
from fedllm.common.config import BudgetConfig
from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant, ZcdpFilter, window_start
from fedllm.schemas.records import BudgetAdjustment, InferenceRequest
from fedllm.services.accountant import decide
from fedllm.services.accountant.decide import Balance
from fedllm.services.accountant.tables import (
    Base,
    BudgetAccount,
    BudgetEntry,
    BudgetReset,
    EntryRow,
    entry_row,
)
from fedllm.services.accountant.upgrade import upgrade

log = logging.getLogger(__name__)
T = TypeVar("T")
OutcomeT = TypeVar("OutcomeT", "Outcome", "Outcome | None")

#: Postgres: serialization_failure, deadlock_detected. Both mean "run the transaction again".
_RETRY_SQLSTATES = {"40001", "40P01"}
_MAX_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an operation did. `changed` is False for a replay or an out-of-order event.
    `excess_rho` > 0 when a node reported more than its reservation (charged, and alerted)."""

    request_id: str
    changed: bool
    state: str
    reason: str
    user: Balance
    department: Balance
    entry: EntryRow
    excess_rho: float = 0.0


@dataclass(frozen=True, slots=True)
class Settlement:
    """One settle instruction: commit `spent` (refund the rest), or refund all when None."""

    request_id: str
    spent: PrivacyCurve | None
    outcome: str
    reason: str = ""
    node_id: str = ""


#: Run for each changed Outcome inside the operation's transaction (e.g. to write the messages
#: the transition implies into the outbox): it commits or rolls back with the transition.
Then = Callable[[Session, "Outcome"], None]


def user_scope(user_id: str) -> str:
    return f"user:{user_id}"


def dept_scope(department: str) -> str:
    return f"dept:{department}"


class Ledger:
    """The authoritative budget ledger over a SQLAlchemy engine (Postgres or SQLite)."""

    def __init__(self, engine: Engine, budget: BudgetConfig, accountant: RdpAccountant) -> None:
        self.engine = engine
        self.budget = budget
        self.accountant = accountant
        self.filter = ZcdpFilter(delta=budget.delta, orders=accountant.orders)
        Base.metadata.create_all(engine)
        upgrade(engine, self.filter)  # a ledger from before the running sums: once

    # -- queries -------------------------------------------------------------------------

    def _window(self, now_s: float | None = None) -> int:
        return window_start(
            now_s=time.time() if now_s is None else now_s, window_seconds=self.budget.window_seconds
        )

    def _dept_limit(self, department: str) -> float:
        if department not in self.budget.department_epsilon:
            raise KeyError(department)
        return self.budget.department_epsilon[department]

    def _limit(self, scope: str) -> float:
        if scope.startswith("user:"):
            return self.budget.user_epsilon
        return self._dept_limit(scope.removeprefix("dept:"))

    def _balance(self, charged: int, limit: float) -> Balance:
        """Closed form, O(1): ε of Σρ, and the largest ε a query may still reserve."""
        return decide.balance(self.filter, charged_units=charged, limit_epsilon=limit)

    def balances(
        self, user_id: str, department: str, *, window: int | None = None
    ) -> tuple[Balance, Balance]:
        """(user, department) balances in the given (default: current) window."""
        window = self._window() if window is None else window
        with Session(self.engine) as s:
            return self._balances(s, user_id, department, window)

    def _balances(
        self, s: Session, user_id: str, department: str, window: int
    ) -> tuple[Balance, Balance]:
        scopes = [user_scope(user_id), dept_scope(department)]
        charged = dict(
            s.execute(
                select(BudgetAccount.scope, BudgetAccount.charged_units).where(
                    BudgetAccount.scope.in_(scopes), BudgetAccount.window_start == window
                )
            ).all()
        )
        return (
            self._balance(charged.get(scopes[0], 0), self.budget.user_epsilon),
            self._balance(charged.get(scopes[1], 0), self._dept_limit(department)),
        )

    def recompute(self, scope: str, *, window: int) -> int:
        """Σρ units of the entries that count against `scope` in `window`, recomputed from the
        entries (a full scan: for checks and tests; decisions use the running sum)."""
        with Session(self.engine) as s:
            acct = s.get(BudgetAccount, (scope, window))
            epoch = acct.epoch if acct is not None else 0
            if scope.startswith("user:"):
                where = (
                    BudgetEntry.user_id == scope.removeprefix("user:"),
                    BudgetEntry.user_epoch == epoch,
                )
            else:
                where = (
                    BudgetEntry.department == scope.removeprefix("dept:"),
                    BudgetEntry.dept_epoch == epoch,
                )
            total = s.scalar(
                select(func.coalesce(func.sum(BudgetEntry.charged_units), 0)).where(
                    BudgetEntry.window_start == window, *where
                )
            )
            return int(total or 0)

    def charged(self, scope: str, *, window: int) -> int:
        """The running Σρ units of `scope` in `window` (0 for an untouched account)."""
        with Session(self.engine) as s:
            acct = s.get(BudgetAccount, (scope, window))
            return acct.charged_units if acct is not None else 0

    def last_department(self, user_id: str) -> str | None:
        """The department of the user's latest request, if any."""
        with Session(self.engine) as s:
            return s.scalar(
                select(BudgetEntry.department)
                .where(BudgetEntry.user_id == user_id)
                .order_by(BudgetEntry.created_at_ms.desc())
                .limit(1)
            )

    def entry(self, request_id: str) -> EntryRow | None:
        with Session(self.engine) as s:
            row = s.get(BudgetEntry, request_id)
            return entry_row(row) if row else None

    def entries(self, request_ids: Sequence[str]) -> dict[str, EntryRow]:
        """The entries of `request_ids` that exist, by request id (one query for a batch)."""
        if not request_ids:
            return {}
        with Session(self.engine) as s:
            rows = s.scalars(
                select(BudgetEntry).where(BudgetEntry.request_id.in_(set(request_ids)))
            ).all()
            return {r.request_id: entry_row(r) for r in rows}

    # -- transactions and locking ----------------------------------------------------------

    def _run(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one transaction, retrying it from scratch on a serialization failure,
        a deadlock, SQLite's busy error or a concurrent insert of the same key."""
        for attempt in range(_MAX_ATTEMPTS):
            try:
                with Session(self.engine, autobegin=False, expire_on_commit=False) as s:
                    with s.begin():
                        if self.engine.dialect.name == "sqlite":
                            s.connection().exec_driver_sql("BEGIN IMMEDIATE")  # one writer
                        return work(s)
            except DBAPIError as exc:
                if attempt == _MAX_ATTEMPTS - 1 or not _retryable(exc):
                    raise
                log.debug("ledger transaction retried (%s)", type(exc.orig).__name__)
                time.sleep(random.uniform(0, min(0.002 * 2**attempt, 0.1)))
        raise AssertionError("unreachable")  # pragma: no cover

    def _lock_accounts(
        self, s: Session, scopes: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], BudgetAccount]:
        """Create (if needed) and lock the (scope, window) account rows, in sorted order."""
        keys = sorted(set(scopes))
        if not keys:
            return {}
        insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        s.execute(
            insert(BudgetAccount)
            .values(
                [
                    {
                        "scope": scope,
                        "window_start": window,
                        "limit_epsilon": self._limit(scope),
                        "charged_units": 0,
                        "epoch": 0,
                    }
                    for scope, window in keys
                ]
            )
            .on_conflict_do_nothing()
        )
        rows = s.scalars(
            select(BudgetAccount)
            .where(tuple_(BudgetAccount.scope, BudgetAccount.window_start).in_(keys))
            .order_by(BudgetAccount.scope, BudgetAccount.window_start)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).all()
        return {(a.scope, a.window_start): a for a in rows}

    def _entries(
        self, s: Session, ids: Sequence[str], *, lock: bool = False
    ) -> dict[str, BudgetEntry]:
        query = select(BudgetEntry).where(BudgetEntry.request_id.in_(ids))
        if lock:
            query = query.order_by(BudgetEntry.request_id).with_for_update()
        rows = s.scalars(query.execution_options(populate_existing=True)).all()
        return {r.request_id: r for r in rows}

    # -- operations ------------------------------------------------------------------------

    def reserve(
        self, request: InferenceRequest, *, now_s: float | None = None, then: Then | None = None
    ) -> Outcome:
        """Reserve the request's (ε, δ) against its user's and department's budgets."""
        return self.reserve_many([request], now_s=now_s, then=then)[0]

    def reserve_many(
        self,
        requests: Sequence[InferenceRequest],
        *,
        now_s: float | None = None,
        then: Then | None = None,
    ) -> list[Outcome]:
        """Reserve a batch in one transaction, in order; one Outcome per request (a request id
        seen before, in the ledger or earlier in the batch, is a replay). `then` runs for each
        changed Outcome, in order, inside the transaction."""
        window = self._window(now_s)
        return self._run(lambda s: _then(then, s, self._reserve_batch(s, requests, window)))

    def _reserve_batch(
        self, s: Session, requests: Sequence[InferenceRequest], window: int
    ) -> list[Outcome]:
        known = self.budget.department_epsilon
        accounts = self._lock_accounts(
            s,
            (
                key
                for r in requests
                if r["department"] in known
                for key in (
                    (user_scope(r["user_id"]), window),
                    (dept_scope(r["department"]), window),
                )
            ),
        )
        # Read after the locks: a concurrent accountant's insert of the same id is visible.
        existing = self._entries(s, [r["request_id"] for r in requests])
        outcomes: list[Outcome] = []
        for request in requests:
            rid = request["request_id"]
            if rid in existing:
                row = existing[rid]
                outcomes.append(
                    Outcome(
                        rid,
                        False,
                        row.state,
                        row.reason,
                        *self._entry_balances(s, row, accounts),
                        entry_row(row),
                    )
                )
                continue
            row = self._reserve_one(request, window, accounts)
            s.add(row)
            existing[rid] = row
            outcomes.append(
                Outcome(
                    rid,
                    True,
                    row.state,
                    row.reason,
                    *self._entry_balances(s, row, accounts),
                    entry_row(row),
                )
            )
        s.flush()
        return outcomes

    def _reserve_one(
        self, request: InferenceRequest, window: int, accounts: dict[tuple[str, int], BudgetAccount]
    ) -> BudgetEntry:
        user_id, dept = request["user_id"], request["department"]
        row = BudgetEntry(
            request_id=request["request_id"],
            user_id=user_id,
            department=dept,
            window_start=window,
            state="reserved",
            epsilon=request["epsilon"],
            delta=self.budget.delta,
            reserved_rdp={},
            spent_rdp=None,
            spent_epsilon=0.0,
            deadline_ms=request["deadline_ms"],
            created_at_ms=now_ms(),
            outcome="",
            reason="",
            node_id="",
            reserved_units=0,
            charged_units=0,
            user_epoch=0,
            dept_epoch=0,
        )
        if dept not in self.budget.department_epsilon:
            return _rejected(row, decide.unknown_department(dept).reason)
        user = accounts[(user_scope(user_id), window)]
        department = accounts[(dept_scope(dept), window)]
        verdict = decide.admit(
            self.filter,
            epsilon=request["epsilon"],
            accounts=(
                decide.Account("user", user.charged_units, self.budget.user_epsilon),
                decide.Account("department", department.charged_units, self._dept_limit(dept)),
            ),
        )
        if isinstance(verdict, decide.Refuse):
            return _rejected(row, verdict.reason)
        cost = verdict.units
        row.reserved_rdp = self.accountant.query_curve(
            epsilon=request["epsilon"], delta=self.budget.delta
        ).to_dict()
        row.reserved_units = row.charged_units = cost
        row.user_epoch, row.dept_epoch = user.epoch, department.epoch
        user.charged_units += cost
        department.charged_units += cost
        return row

    def _entry_balances(
        self, s: Session, row: BudgetEntry, accounts: dict[tuple[str, int], BudgetAccount]
    ) -> tuple[Balance, Balance]:
        """Balances of the entry's two accounts: from the locked rows when this transaction
        holds them, else read."""
        if row.department not in self.budget.department_epsilon:
            zero = Balance(limit=0.0, spent=0.0, remaining=0.0)
            return zero, zero
        user = accounts.get((user_scope(row.user_id), row.window_start))
        dept = accounts.get((dept_scope(row.department), row.window_start))
        if user is None or dept is None:
            return self._balances(s, row.user_id, row.department, row.window_start)
        return (
            self._balance(user.charged_units, self.budget.user_epsilon),
            self._balance(dept.charged_units, self._dept_limit(row.department)),
        )

    def settle(
        self,
        request_id: str,
        *,
        spent: PrivacyCurve | None,
        outcome: str,
        reason: str = "",
        node_id: str = "",
        then: Then | None = None,
    ) -> Outcome | None:
        """Commit what was really spent (refunding the rest), or refund all when `spent` is None.

        Only a `reserved` entry changes; anything else (replay, late answer) is a no-op.
        Returns None for an unknown request id.
        """
        return self.settle_many(
            [Settlement(request_id, spent, outcome, reason, node_id)], then=then
        )[0]

    def settle_many(
        self, settlements: Sequence[Settlement], *, then: Then | None = None
    ) -> list[Outcome | None]:
        """Settle a batch in one transaction, in order (see :meth:`settle`).

        A reported spend is charged as ρ = its curve's tightest dominating ρ. If it is not
        dominated by the reservation, the larger (the report) is charged and the Outcome's
        `excess_rho` says by how much it exceeded the reservation. `then` as for
        :meth:`reserve_many`.
        """
        return self._run(lambda s: _then(then, s, self._settle_batch(s, settlements)))

    def _settle_batch(self, s: Session, settlements: Sequence[Settlement]) -> list[Outcome | None]:
        ids = [x.request_id for x in settlements]
        pending = [r for r in self._entries(s, ids).values() if r.state == "reserved"]
        accounts = self._lock_accounts(
            s,
            (
                key
                for r in pending
                for key in (
                    (user_scope(r.user_id), r.window_start),
                    (dept_scope(r.department), r.window_start),
                )
            ),
        )
        entries = self._entries(s, ids, lock=True)  # again, under the locks: settled meanwhile?
        outcomes: list[Outcome | None] = []
        for x in settlements:
            row = entries.get(x.request_id)
            if row is None:
                outcomes.append(None)
                continue
            changed = row.state == "reserved"
            excess = 0
            if changed:
                excess = self._settle_one(row, x, accounts)
            outcomes.append(
                Outcome(
                    row.request_id,
                    changed,
                    row.state,
                    row.reason,
                    *self._entry_balances(s, row, accounts),
                    entry_row(row),
                    excess_rho=self.filter.rho(excess),
                )
            )
        s.flush()
        return outcomes

    def _settle_one(
        self, row: BudgetEntry, x: Settlement, accounts: dict[tuple[str, int], BudgetAccount]
    ) -> int:
        """Move a reserved entry to committed/refunded; returns the units charged above the
        reservation (0 when the reservation dominated the report)."""
        charge = decide.charge(self.filter, reserved_units=row.reserved_units, spent=x.spent)
        user = accounts[(user_scope(row.user_id), row.window_start)]
        dept = accounts[(dept_scope(row.department), row.window_start)]
        user_delta, dept_delta = decide.account_deltas(
            new_units=charge.units,
            old_units=row.charged_units,
            entry_epochs=(row.user_epoch, row.dept_epoch),
            account_epochs=(user.epoch, dept.epoch),
        )
        user.charged_units += user_delta
        dept.charged_units += dept_delta
        row.state = charge.state
        row.charged_units = charge.units
        row.spent_rdp = x.spent.to_dict() if x.spent is not None else None
        row.spent_epsilon = (
            self.accountant.epsilon(x.spent, delta=row.delta) if x.spent is not None else 0.0
        )
        row.outcome, row.reason, row.node_id = x.outcome, x.reason, x.node_id
        row.settled_at_ms = now_ms()
        return charge.excess

    def reset(
        self,
        adjustment: BudgetAdjustment,
        *,
        now_s: float | None = None,
        then: Callable[[Session], None] | None = None,
    ) -> bool:
        """Apply an admin's BudgetAdjustment (action "reset") to the current window, once;
        `then(session)` runs in the same transaction when it applies (the outbox).

        Returns False for a replay (same adjustment id). Raises KeyError for an unknown
        department and ValueError for an unknown scope or action.
        """
        if adjustment["action"] != "reset" or adjustment["scope"] not in ("user", "department"):
            raise ValueError(f"unsupported adjustment {adjustment['action']}/{adjustment['scope']}")
        subject = adjustment["subject"]
        if adjustment["scope"] == "department":
            self._dept_limit(subject)
        scope = user_scope(subject) if adjustment["scope"] == "user" else dept_scope(subject)
        window = self._window(now_s)

        def work(s: Session) -> bool:
            acct = self._lock_accounts(s, [(scope, window)])[(scope, window)]
            if s.get(BudgetReset, adjustment["adjustment_id"]) is not None:
                return False
            acct.epoch += 1
            acct.charged_units = 0
            s.add(
                BudgetReset(
                    adjustment_id=adjustment["adjustment_id"],
                    scope=scope,
                    window_start=window,
                    reset_at_ms=now_ms(),
                    actor_user_id=adjustment["actor_user_id"],
                    reason=adjustment["reason"],
                )
            )
            if then is not None:
                then(s)
            return True

        return self._run(work)

    def expired(self, *, now_ms: int, grace_ms: int) -> list[str]:
        """Ids of reservations whose deadline passed more than `grace_ms` ago."""
        with Session(self.engine) as s:
            return list(
                s.scalars(
                    select(BudgetEntry.request_id).where(
                        BudgetEntry.state == "reserved",
                        BudgetEntry.deadline_ms < now_ms - grace_ms,
                    )
                )
            )


def _retryable(exc: DBAPIError) -> bool:
    if isinstance(exc, IntegrityError):
        return True  # a concurrent insert of the same key: the retry sees the row
    if getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    return "database is locked" in str(exc.orig)


def _then(then: Then | None, s: Session, outcomes: list[OutcomeT]) -> list[OutcomeT]:
    """Run `then` for each changed outcome in `s` (before the commit)."""
    if then is not None:
        for outcome in outcomes:
            if outcome is not None and outcome.changed:
                then(s, outcome)
        s.flush()
    return outcomes


def _rejected(row: BudgetEntry, reason: str) -> BudgetEntry:
    row.state, row.outcome, row.reason = "rejected", "rejected", reason
    row.settled_at_ms = row.created_at_ms
    return row


__all__ = ["Balance", "Ledger", "Outcome", "Settlement", "Then", "dept_scope", "user_scope"]
