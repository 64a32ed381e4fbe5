"""The accountant's budget decisions, pure: no database, no Kafka, no clock.

The ledger (:mod:`fedllm.services.accountant.ledger`) locks the accounts, calls these functions
with their running Σρ (integer units of the zCDP filter) and writes back what they decide:

- :func:`admit`: reserve a query's ρ(ε) against every account it counts toward, or refuse it
  (naming the first account that cannot take it); an unknown department is refused outright;
- :func:`charge`: what a settled reservation costs (the realised curve's ρ, or nothing for a
  refund), and how far a report exceeded its reservation;
- :func:`account_deltas`: how the accounts' running sums move when an entry's charge changes
  (an account reset since the reservation, i.e. a new epoch, is not touched);
- :func:`balance`: an account's position in ε, in closed form;
- :func:`charge_for`, :func:`reported_curve`, :func:`ends_request`: what a node-results record
  settles (the curve to charge, or a refund) and whether it ends the request at all.

Each is O(1) in the account's history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedllm.common.results import ANSWER, COMBINED, VERDICT, result_kind
from fedllm.privacy.accountant import PrivacyCurve, ZcdpFilter
from fedllm.schemas.records import InferenceResult


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's position after an operation (ε at the ledger's δ)."""

    limit: float
    spent: float
    remaining: float


@dataclass(frozen=True, slots=True)
class Account:
    """One account a query counts toward: who it is (for the refusal), its Σρ, its limit."""

    who: str  # "user" or "department"
    charged_units: int
    limit_epsilon: float


@dataclass(frozen=True, slots=True)
class Admit:
    """Reserve `units` (ρ of the query's ε) on every account."""

    units: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """Reserve nothing; `reason` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Charge:
    """A settlement: the entry's charge becomes `units`; `excess` units above the reservation
    (0 when the reservation dominated the report)."""

    units: int
    excess: int
    state: Literal["committed", "refunded"]


def unknown_department(department: str) -> Refuse:
    return Refuse(f"unknown department {department!r}")


def admit(zcdp: ZcdpFilter, *, epsilon: float, accounts: Sequence[Account]) -> Admit | Refuse:
    """The filter's rule on every account: Σρ_i + ρ(ε) ≤ ρ(limit), in exact integers."""
    cost = zcdp.query_units(epsilon)
    for acct in accounts:
        if not zcdp.admits(
            charged=acct.charged_units, extra=cost, limit_epsilon=acct.limit_epsilon
        ):
            left = zcdp.remaining_epsilon(
                charged=acct.charged_units, limit_epsilon=acct.limit_epsilon
            )
            return Refuse(
                f"{acct.who} privacy budget exhausted: requested epsilon "
                f"{epsilon:g}, remaining {left:.4f} of "
                f"{acct.limit_epsilon:g} this window"
            )
    return Admit(cost)


def charge(zcdp: ZcdpFilter, *, reserved_units: int, spent: PrivacyCurve | None) -> Charge:
    """Commit the realised curve's ρ (refund the rest), or refund all when `spent` is None.

    A report a hair above the reservation (the node's float rounding: ≤ 1e-9 relative + 1 unit)
    is charged the reservation; a larger one is charged in full and its excess reported."""
    units = zcdp.charge_units(spent) if spent is not None else 0
    if reserved_units < units <= reserved_units + reserved_units // 10**9 + 1:
        units = reserved_units
    return Charge(
        units=units,
        excess=max(units - reserved_units, 0),
        state="committed" if spent is not None else "refunded",
    )


def account_deltas(
    *,
    new_units: int,
    old_units: int,
    entry_epochs: tuple[int, int],
    account_epochs: tuple[int, int],
) -> tuple[int, int]:
    """How much the (user, department) running sums change when an entry charged `old_units`
    is charged `new_units`: only an account still in the entry's epoch (not reset since)."""
    delta = new_units - old_units
    user = delta if entry_epochs[0] == account_epochs[0] else 0
    department = delta if entry_epochs[1] == account_epochs[1] else 0
    return user, department


def balance(zcdp: ZcdpFilter, *, charged_units: int, limit_epsilon: float) -> Balance:
    """Closed form, O(1): ε of Σρ, and the largest ε a query may still reserve."""
    return Balance(
        limit=limit_epsilon,
        spent=zcdp.epsilon(charged_units),
        remaining=zcdp.remaining_epsilon(charged=charged_units, limit_epsilon=limit_epsilon),
    )


def reported_curve(result: InferenceResult, *, orders: Sequence[float]) -> PrivacyCurve | None:
    """The result's spent curve, or None when it is not on the ledger's orders."""
    reported = tuple(result["rdp_orders"])
    if reported != tuple(orders):
        return None
    return PrivacyCurve(orders=reported, values=tuple(result["rdp_epsilons"]))


def charge_for(
    result: InferenceResult, *, orders: Sequence[float]
) -> tuple[PrivacyCurve | None, str, str]:
    """What to charge for a node result: (curve or None for a full refund, status, reason)."""
    status = result["status"]
    if status != "ok":
        status = "timeout" if status == "timeout" else "failed"
        if result.get("rdp_orders"):
            # The router failed a fan-out after some hospitals had answered their parts:
            # those releases happened, so their curve is charged (the user gets no answer).
            spent = reported_curve(result, orders=orders)
            if spent is not None:
                return spent, status, result["reason"]
        return None, status, result["reason"]
    if not result["is_private"]:
        return None, "failed", "answer withheld: it was not released by a DP mechanism"
    spent = reported_curve(result, orders=orders)
    if spent is None:
        return None, "failed", "answer withheld: privacy cost reported on unknown orders"
    return spent, "ok", ""


def ends_request(result: InferenceResult, spent: PrivacyCurve | None) -> bool:
    """Whether a node-results record settles its request (by its kind,
    :func:`fedllm.common.results.result_kind`): the router's verdict or combined answer does; a
    node's answer does when it is "ok" or reports a spend (`spent`: a mechanism started, which
    is never retried). A part never does (the router combines the parts or fails the fan-out
    with their spend), nor does a node's failure that spent nothing (the router retries it or
    sends the verdict); the deadline sweep backs both up."""
    kind = result_kind(result)
    if kind in (VERDICT, COMBINED):
        return True
    return kind == ANSWER and (result["status"] == "ok" or spent is not None)
