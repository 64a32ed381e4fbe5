"""fedllm.common.db.open_tables: the table set-up the stores share (a URL or an engine, tables
created once, what is stored kept on reopening), and the coordinator's round store on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import Column, Integer, MetaData, Table, inspect, select

from fedllm.common.db import make_engine, open_tables
from fedllm.services.federation.store import RoundStore

meta = MetaData()
things = Table("things", meta, Column("id", Integer, primary_key=True))


def test_open_tables_from_a_url_or_an_engine_keeps_what_is_stored(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'store.db'}"  # the folder is created too
    engine = open_tables(url, meta)
    assert inspect(engine).has_table("things")
    with engine.begin() as conn:
        conn.execute(things.insert().values(id=1))
    given = make_engine(url)
    assert open_tables(given, meta) is given  # an engine is used as it is
    with open_tables(url, meta).connect() as conn:  # reopening creates nothing over it
        assert conn.execute(select(things.c.id)).scalars().all() == [1]


def test_a_reopened_round_store_resumes_after_its_last_round(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rounds.db'}"
    vec = np.arange(4, dtype=np.float32)
    first = RoundStore(url)
    first.close_round("f", 1, attempt=0, status="aggregated", fields={"a": 1}, global_vector=vec)
    again = RoundStore(url)
    kept = again.close_round(
        "f", 1, attempt=2, status="finished", fields={"a": 2}, global_vector=vec + 1
    )
    assert (kept.attempt, kept.status, kept.fields) == (0, "aggregated", {"a": 1})  # first wins
    last = again.last("f")
    assert last is not None and last.round == 1 and np.array_equal(last.global_vector, vec)
    assert again.last("other") is None
