"""A hospital's data ledger shared by its node worker and its trainer (one store, one filter).

* **Lifetime budget** (``node_budget``): a zCDP ρ sum every mechanism over the data set draws
  from; a draw fits when spent + ρ ≤ cap. Nothing subtracts from it and the stored cap can only
  be lowered.
* **Individual filter** (Feldman & Zrnic 2021): a person's spend is ``everyone + extra``:

  - ``everyone`` (``node_person_everyone``, one row per hospital): the running ρ of releases that
    charge every person (an aggregate with no ``where`` filter, the answer-level routes). Such a
    release writes this one row, plus a −ρ extra for each person it left out at their cap;
  - ``extra`` (``node_person_extra``): the ρ of releases that charge a subset (retrieval that
    matched a group, a filtered aggregate, a training round), one row per person charged.

  A person whose spend + ρ would pass the cap is left out (``capped``), found through an index
  on ``extra``: O(log n + persons at cap), and O(1) rows per every-person release. ``everyone``
  also covers persons who arrive later (an over-statement of their spend, never an under-).

Amounts are stored as integers of 2⁻⁵⁰ ρ: charges rounded up, the cap down, so sums are exact,
independent of order, and never looser than the real ρ (no float drift). The old per-person
float table ``node_person_spend`` is migrated into ``extra`` on open, then emptied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    MetaData,
    String,
    Table,
    and_,
    func,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

metadata = MetaData()

budgets = Table(
    "node_budget",
    metadata,
    Column("hospital_id", String(128), primary_key=True),
    Column("rho_spent", Float, nullable=False),
    Column("rho_cap", Float, nullable=False),
)

everyone = Table(
    "node_person_everyone",
    metadata,
    Column("hospital_id", String(128), primary_key=True),
    Column("units", BigInteger, nullable=False),  # ρ charged to every person, in UNIT
)

extras = Table(
    "node_person_extra",
    metadata,
    Column("hospital_id", String(128), primary_key=True),
    Column("person_id", String(128), primary_key=True),
    Column("units", BigInteger, nullable=False),  # this person's ρ beyond ``everyone``
    Index("ix_node_person_extra_units", "hospital_id", "units"),
)

# Before the split: one float row per person charged (migrated on open, then emptied).
_legacy = MetaData()
legacy_person_spend = Table(
    "node_person_spend",
    _legacy,
    Column("hospital_id", String(128), primary_key=True),
    Column("person_id", String(128), primary_key=True),
    Column("rho_spent", Float, nullable=False),
)

#: ρ per stored unit (a power of two: the scaling is exact). ρ sums up to 2¹³ fit a BigInteger.
UNIT = 2.0**-50


def charge_units(rho: float) -> int:
    """A charge in units, rounded up."""
    return math.ceil(rho / UNIT)


def cap_units(rho: float) -> int:
    """A cap in units, rounded down."""
    return math.floor(rho / UNIT)


def to_rho(units: int) -> float:
    return units * UNIT


def open_hospital(engine: Engine, hospital_id: str, *, rho_cap: float) -> None:
    """Create the tables, the hospital's rows (a larger configured cap never raises the stored
    one) and migrate its legacy per-person rows."""
    metadata.create_all(engine)
    with engine.begin() as conn:
        row = conn.execute(
            select(budgets.c.rho_cap).where(budgets.c.hospital_id == hospital_id)
        ).first()
        if row is None:
            conn.execute(
                budgets.insert().values(hospital_id=hospital_id, rho_spent=0.0, rho_cap=rho_cap)
            )
        elif rho_cap < row.rho_cap:
            conn.execute(
                budgets.update().where(budgets.c.hospital_id == hospital_id).values(rho_cap=rho_cap)
            )
        if conn.execute(select(everyone).where(everyone.c.hospital_id == hospital_id)).first():
            return
        conn.execute(everyone.insert().values(hospital_id=hospital_id, units=0))
        if inspect(conn).has_table(legacy_person_spend.name):
            old = legacy_person_spend
            rows = conn.execute(select(old).where(old.c.hospital_id == hospital_id)).all()
            _add(conn, hospital_id, {r.person_id: charge_units(r.rho_spent) for r in rows})
            conn.execute(old.delete().where(old.c.hospital_id == hospital_id))


def draw_lifetime(conn: Connection, hospital_id: str, rho: float) -> bool:
    """Draw ``rho`` from the lifetime budget (row locked); False, nothing drawn, if it cannot."""
    b = conn.execute(
        select(budgets).where(budgets.c.hospital_id == hospital_id).with_for_update()
    ).one()
    if b.rho_spent + rho > b.rho_cap:
        return False
    conn.execute(
        budgets.update()
        .where(budgets.c.hospital_id == hospital_id)
        .values(rho_spent=b.rho_spent + rho)
    )
    return True


def lifetime(conn: Connection, hospital_id: str) -> tuple[float, float]:
    b = conn.execute(
        select(budgets.c.rho_spent, budgets.c.rho_cap).where(budgets.c.hospital_id == hospital_id)
    ).one()
    return float(b.rho_spent), float(b.rho_cap)


def _everyone(conn: Connection, hospital_id: str, *, lock: bool = False) -> int:
    q = select(everyone.c.units).where(everyone.c.hospital_id == hospital_id)
    return int(conn.execute(q.with_for_update() if lock else q).scalar_one())


@dataclass(frozen=True, slots=True)
class Capped:
    """Who cannot take another charge: ``all`` (every person), or the listed ``persons``."""

    all: bool
    persons: frozenset[str]


def capped(conn: Connection, hospital_id: str, *, rho: float, person_cap: float) -> Capped:
    """Persons whose spend + ``rho`` would pass ``person_cap`` (an indexed range read)."""
    room = cap_units(person_cap) - charge_units(rho) - _everyone(conn, hospital_id)
    if room < 0:  # even a person with no extra charge is over
        return Capped(all=True, persons=frozenset())
    rows = conn.execute(
        select(extras.c.person_id).where(
            and_(extras.c.hospital_id == hospital_id, extras.c.units > room)
        )
    )
    return Capped(all=False, persons=frozenset(r.person_id for r in rows))


def _add(conn: Connection, hospital_id: str, units: dict[str, int]) -> None:
    """Add ``units[p]`` to each person's extra: one upsert statement, run over the persons."""
    if not units:
        return
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(extras)
    stmt = stmt.on_conflict_do_update(
        index_elements=[extras.c.hospital_id, extras.c.person_id],
        set_={"units": extras.c.units + stmt.excluded.units},
    )
    conn.execute(
        stmt,
        [
            {"hospital_id": hospital_id, "person_id": p, "units": u}
            for p, u in sorted(units.items())
        ],
    )


def charge_persons(conn: Connection, hospital_id: str, persons: Iterable[str], rho: float) -> None:
    """Charge ``rho`` to each of ``persons`` (a subset release): one row each."""
    u = charge_units(rho)
    _add(conn, hospital_id, dict.fromkeys(persons, u))


def charge_everyone(
    conn: Connection, hospital_id: str, rho: float, *, left_out: Iterable[str] = ()
) -> None:
    """Charge ``rho`` to every person but ``left_out`` (those at their cap): one row, plus one
    per person left out."""
    u = charge_units(rho)
    g = _everyone(conn, hospital_id, lock=True)
    conn.execute(everyone.update().where(everyone.c.hospital_id == hospital_id).values(units=g + u))
    _add(conn, hospital_id, dict.fromkeys(left_out, -u))


def spends(conn: Connection, hospital_id: str, persons: Iterable[str]) -> dict[str, float]:
    """Each person's ρ spend (everyone + extra)."""
    wanted = sorted(set(persons))
    g = _everyone(conn, hospital_id)
    have: dict[str, int] = {}
    for i in range(0, len(wanted), 500):
        have.update(
            (r.person_id, int(r.units))
            for r in conn.execute(
                select(extras.c.person_id, extras.c.units).where(
                    and_(
                        extras.c.hospital_id == hospital_id,
                        extras.c.person_id.in_(wanted[i : i + 500]),
                    )
                )
            )
        )
    return {p: to_rho(g + have.get(p, 0)) for p in wanted}


@dataclass(frozen=True, slots=True)
class FilterCounts:
    persons_charged: int
    persons_at_cap: int


def filter_counts(
    conn: Connection, hospital_id: str, *, query_rho: float, person_cap: float, population: int
) -> FilterCounts:
    """How many persons have spent anything, and how many cannot take one more ``query_rho``
    (``population``: persons held, for those with no extra row)."""
    g = _everyone(conn, hospital_id)
    room = cap_units(person_cap) - charge_units(query_rho)
    n_rows, charged, at_cap = conn.execute(
        select(
            func.count(),
            func.count().filter(extras.c.units + g > 0),
            func.count().filter(extras.c.units + g > room),
        ).where(extras.c.hospital_id == hospital_id)
    ).one()
    rest = max(0, population - int(n_rows))
    return FilterCounts(
        persons_charged=int(charged) + (rest if g > 0 else 0),
        persons_at_cap=int(at_cap) + (rest if g > room else 0),
    )


def read_spend(engine: Engine, hospital_id: str, person_id: str) -> float:
    """One person's ρ spend, read only (0 where the hospital's ledger has no tables yet)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(everyone.name):
            return 0.0
        if conn.execute(select(everyone).where(everyone.c.hospital_id == hospital_id)).first():
            return spends(conn, hospital_id, [person_id])[person_id]
    return 0.0
