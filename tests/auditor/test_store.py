"""Idempotent appends, the append-only trigger, and tamper detection by `verify`."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, exc, select, text

from fedllm.services.auditor.store import append
from fedllm.services.auditor.tables import audit_log
from fedllm.services.auditor.verify import verify
from tests.auditor.helpers import as_superuser_untriggered, event, rows


def _stored(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                select(audit_log.c.seq, audit_log.c.event_id).order_by(audit_log.c.seq)
            )
        ]


def test_replayed_events_are_stored_once(engine: Engine) -> None:
    events = [event(i) for i in range(20)]
    assert append(engine, rows(events)).stored == 20
    again = append(engine, rows(events[5:15] + [event(20)] + [event(20)]))
    assert (again.stored, again.duplicates) == (1, 11)
    stored = _stored(engine)
    assert [s for s, _ in stored] == list(range(1, 22))
    assert len({e for _, e in stored}) == 21
    assert verify(engine).ok


def test_trigger_rejects_update_and_delete(engine: Engine) -> None:
    append(engine, rows([event(i) for i in range(3)]))
    for sql in (
        "UPDATE audit_log SET action = 'x' WHERE seq = 2",
        "DELETE FROM audit_log WHERE seq = 2",
    ):
        with pytest.raises(exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(sql))
    assert len(_stored(engine)) == 3


def test_trigger_rejects_truncate(pg_engine: Engine) -> None:
    append(pg_engine, rows([event(1)]))
    with pytest.raises(exc.DBAPIError, match="append-only"), pg_engine.begin() as conn:
        conn.execute(text("TRUNCATE audit_log"))


def _bad(engine: Engine) -> tuple[int | None, str]:
    report = verify(engine)
    assert not report.ok
    (chain,) = report.chains
    assert report.lines()[0].startswith("FAIL chain main")
    return chain.bad_seq, chain.problem


@pytest.fixture
def ten(engine: Engine) -> Engine:
    append(engine, rows([event(i) for i in range(10)]))
    assert verify(engine).ok
    return engine


def test_verify_names_altered_row(ten: Engine) -> None:
    as_superuser_untriggered(ten, "UPDATE audit_log SET epsilon = 0.01 WHERE seq IN (4, 7)")
    seq, problem = _bad(ten)
    assert seq == 4 and "altered" in problem and "seq=4" in problem


def test_verify_names_deleted_row(ten: Engine) -> None:
    as_superuser_untriggered(ten, "DELETE FROM audit_log WHERE seq = 6")
    seq, problem = _bad(ten)
    assert seq == 7 and "seq 6 missing" in problem and "deleted" in problem


def test_verify_names_reordered_rows(ten: Engine) -> None:
    # Swap positions 3 and 4, keeping each row's own hashes.
    as_superuser_untriggered(ten, "UPDATE audit_log SET seq = -seq WHERE seq IN (3, 4)")
    as_superuser_untriggered(ten, "UPDATE audit_log SET seq = 3 WHERE seq = -4")
    as_superuser_untriggered(ten, "UPDATE audit_log SET seq = 4 WHERE seq = -3")
    seq, problem = _bad(ten)
    assert seq == 3 and "reordered" in problem


def test_verify_detects_deleted_tail(ten: Engine) -> None:
    as_superuser_untriggered(ten, "DELETE FROM audit_log WHERE seq = 10")
    seq, problem = _bad(ten)
    assert "chain head says seq 10" in problem


def test_rehashed_forgery_breaks_the_next_link(ten: Engine) -> None:
    """Altering a row and recomputing its own hash still breaks its successor's prev_hash."""
    from fedllm.services.auditor.chain import row_hash

    with ten.connect() as conn:
        row = dict(conn.execute(select(audit_log).where(audit_log.c.seq == 5)).mappings().one())
    row["action"] = "request.completed"
    as_superuser_untriggered(
        ten,
        "UPDATE audit_log SET action = :a, row_hash = :h WHERE seq = 5",
        a=row["action"],
        h=row_hash(row["prev_hash"], row),
    )
    seq, problem = _bad(ten)
    assert seq == 6 and "prev_hash does not match" in problem


def test_per_hospital_chains(pg_engine: Engine) -> None:
    from fedllm.services.auditor.rows import Protection

    prot = Protection(hmac_key=None, sealer=None, chain_by="hospital")
    append(pg_engine, rows([event(i) for i in range(6)], prot))
    report = verify(pg_engine)
    assert report.ok and [c.chain for c in report.chains] == [
        "hospital:northside",
        "hospital:st_mary",
    ]
    assert [c.head_seq for c in report.chains] == [3, 3]
