"""One-off upgrade of a ledger written before the zCDP filter's running sums existed.

Adds the integer ρ columns (`budget_accounts.charged_units`, `epoch`; `budget_entries.
reserved_units`, `charged_units`, `user_epoch`, `dept_epoch`), fills each entry's units from its
stored curves, marks entries that an admin reset already forgave (epoch −1: they no longer count
against that account), and sets every account's running sum to the sum recomputed from its
entries. Idempotent: a ledger that has the columns is left alone.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, inspect, text

from fedllm.privacy.accountant import PrivacyCurve, ZcdpFilter

log = logging.getLogger(__name__)

_ACCOUNT_COLUMNS = {"charged_units": "BIGINT", "epoch": "INTEGER"}
_ENTRY_COLUMNS = {
    "reserved_units": "BIGINT",
    "charged_units": "BIGINT",
    "user_epoch": "INTEGER",
    "dept_epoch": "INTEGER",
}


def needs_upgrade(engine: Engine) -> bool:
    insp = inspect(engine)
    if not insp.has_table("budget_entries"):
        return False
    have = {c["name"] for c in insp.get_columns("budget_entries")}
    return not set(_ENTRY_COLUMNS) <= have


def upgrade(engine: Engine, zcdp: ZcdpFilter) -> None:
    """Bring an old ledger's schema and running sums up to date (see the module docstring)."""
    if not needs_upgrade(engine):
        return
    insp = inspect(engine)
    with engine.begin() as conn:
        for table, columns in (
            ("budget_accounts", _ACCOUNT_COLUMNS),
            ("budget_entries", _ENTRY_COLUMNS),
        ):
            have = {c["name"] for c in insp.get_columns(table)}
            for name, sql_type in columns.items():
                if name not in have:
                    conn.execute(
                        text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type} NOT NULL DEFAULT 0")
                    )
        rows = conn.execute(
            text(
                "SELECT request_id, user_id, department, window_start, state, reserved_rdp, "
                "spent_rdp, created_at_ms FROM budget_entries"
            )
        ).all()
        resets: dict[tuple[str, int], int] = {}
        for scope, window, at in conn.execute(
            text(
                "SELECT scope, window_start, max(reset_at_ms) FROM budget_resets "
                "GROUP BY scope, window_start"
            )
        ).all():
            resets[(scope, window)] = at
        for rid, user, dept, window, state, reserved, spent, created in rows:
            reserved_units = _units(zcdp, reserved)
            charged = {"reserved": reserved_units, "committed": _units(zcdp, spent)}.get(state, 0)
            forgiven_user = created <= resets.get((f"user:{user}", window), -1)
            forgiven_dept = created <= resets.get((f"dept:{dept}", window), -1)
            conn.execute(
                text(
                    "UPDATE budget_entries SET reserved_units = :r, charged_units = :c, "
                    "user_epoch = :ue, dept_epoch = :de WHERE request_id = :id"
                ),
                {
                    "r": reserved_units,
                    "c": charged,
                    "ue": -1 if forgiven_user else 0,
                    "de": -1 if forgiven_dept else 0,
                    "id": rid,
                },
            )
        conn.execute(
            text(
                "UPDATE budget_accounts SET epoch = 0, charged_units = coalesce(("
                "SELECT sum(e.charged_units) FROM budget_entries e WHERE "
                "e.window_start = budget_accounts.window_start AND e.user_epoch = 0 "
                "AND budget_accounts.scope = 'user:' || e.user_id), 0) "
                "WHERE scope LIKE 'user:%'"
            )
        )
        conn.execute(
            text(
                "UPDATE budget_accounts SET epoch = 0, charged_units = coalesce(("
                "SELECT sum(e.charged_units) FROM budget_entries e WHERE "
                "e.window_start = budget_accounts.window_start AND e.dept_epoch = 0 "
                "AND budget_accounts.scope = 'dept:' || e.department), 0) "
                "WHERE scope LIKE 'dept:%'"
            )
        )
    log.warning(
        "ledger upgraded: %d entries given integer ρ units; account sums recomputed", len(rows)
    )


def _units(zcdp: ZcdpFilter, curve: object) -> int:
    if isinstance(curve, str):
        import json

        curve = json.loads(curve)
    if not curve:
        return 0
    return zcdp.charge_units(PrivacyCurve.from_dict(curve))  # type: ignore[arg-type]
