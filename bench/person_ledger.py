"""Aggregates charged per second on the individual filter, 2,000 patients, node store (SQLite).

``python bench/person_ledger.py [--persons 2000] [--n 200]``

Printed: aggregates per second before -> after, for the whole ledger round and for the filter +
charge step alone (the rest is the two commits every release makes either way). Each
aggregate is what the node worker does around an aggregate with no ``where`` filter: draw
from the lifetime budget and mark it started, find the persons at their cap, charge the persons,
persist the release. *before*: the earlier method (one float row per person, every row read and
rewritten per charge), reimplemented inline as the baseline; *after*: ``NodeLedger`` on
``fedllm.common.person_ledger`` (one running every-person row).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sqlalchemy import Column, Float, MetaData, String, Table, and_, bindparam, select

from fedllm.common.db import make_engine
from fedllm.services.node_worker.ledger import NodeLedger, releases

RHO = 1e-4
CAP = 10.0

_md = MetaData()
per_row = Table(
    "bench_person_spend",
    _md,
    Column("hospital_id", String(128), primary_key=True),
    Column("person_id", String(128), primary_key=True),
    Column("rho_spent", Float, nullable=False),
)


def _ledger(tag: str) -> NodeLedger:
    path = Path(tempfile.mkdtemp(prefix=f"fedllm-person-{tag}-")) / "privacy.db"
    return NodeLedger(
        make_engine(f"sqlite:///{path}"), hospital_id="h", rho_cap=1e9, person_rho_cap=CAP
    )


def before(persons: list[str], n: int) -> tuple[float, float]:
    """The per-row baseline: capped = a scan, then every person's row read and rewritten."""
    led = _ledger("before")
    _md.create_all(led.engine)
    charging = 0.0
    t0 = time.perf_counter()
    for i in range(n):
        key = (f"q{i}", 0)
        led.begin(*key, rho=RHO)
        c0 = time.perf_counter()
        with led.engine.connect() as conn:
            capped = {
                r.person_id
                for r in conn.execute(
                    select(per_row.c.person_id).where(per_row.c.rho_spent > CAP - RHO)
                )
            }
        with led.engine.begin() as conn:
            have = {r.person_id: r.rho_spent for r in conn.execute(select(per_row))}
            charged = [p for p in persons if p not in capped]
            known = [{"pid": p, "spent": have[p] + RHO} for p in charged if p in have]
            new = [
                {"hospital_id": "h", "person_id": p, "rho_spent": RHO}
                for p in charged
                if p not in have
            ]
            if known:
                conn.execute(
                    per_row.update()
                    .where(
                        and_(per_row.c.hospital_id == "h", per_row.c.person_id == bindparam("pid"))
                    )
                    .values(rho_spent=bindparam("spent")),
                    known,
                )
            if new:
                conn.execute(per_row.insert(), new)
            conn.execute(
                releases.update()
                .where(and_(releases.c.hospital_id == "h", releases.c.request_id == key[0]))
                .values(persons_charged=True)
            )
        charging += time.perf_counter() - c0
        led.release(*key, {"status": "ok"})
    return n / (time.perf_counter() - t0), n / charging


def after(persons: list[str], n: int) -> tuple[float, float]:
    """The shared ledger: one every-person row per aggregate."""
    led = _ledger("after")
    led.begin("seed", 0, rho=RHO)  # every person also carries a subset charge (rows exist)
    led.charge_persons("seed", 0, set(persons), rho=RHO)
    charging = 0.0
    t0 = time.perf_counter()
    for i in range(n):
        key = (f"q{i}", 0)
        led.begin(*key, rho=RHO)
        c0 = time.perf_counter()
        capped = led.capped_persons(rho=RHO)
        led.charge_everyone(*key, rho=RHO, left_out=capped.persons)
        charging += time.perf_counter() - c0
        led.release(*key, {"status": "ok"})
    return n / (time.perf_counter() - t0), n / charging


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=2000)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    persons = [f"POP-{i:06d}" for i in range(args.persons)]
    (b, bc), (a, ac) = before(persons, args.n), after(persons, args.n)
    print(f"{args.persons} patients, SQLite node store, aggregates per second")
    print(
        f"  whole ledger round (begin, filter, charge, release): {b:.1f} -> {a:.1f} ({a / b:.1f}x)"
    )
    print(
        f"  filter + charge alone:                               {bc:.1f} -> {ac:.1f} ({ac / bc:.1f}x)"
    )


if __name__ == "__main__":
    main()
