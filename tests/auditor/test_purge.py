"""Retention purge: only through the sanctioned path, anchored, audited, verify stays green."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, exc, insert, select, text

from fedllm.services.auditor.purge import RetentionError, purge
from fedllm.services.auditor.settings import AuditorSettings
from fedllm.services.auditor.store import append
from fedllm.services.auditor.tables import audit_log, checkpoints
from fedllm.services.auditor.verify import verify
from tests.auditor.helpers import event, rows, ts

NOW = ts(2031, 6, 1)


def _fill(engine: Engine) -> None:
    old = [event(i, tag="old", at=ts(2020, 1, 1 + i)) for i in range(8)]
    late = [event(i, tag="late", at=ts(2020, 1, 1 + i)) for i in range(2)]
    new = [event(i, tag="new", at=ts(2026, 1, 1 + i)) for i in range(5)]
    # Order of arrival: old ones, a new one, then two late old ones (after the first new row).
    append(engine, rows(old + new[:1] + late + new[1:]))


def test_purge_cuts_the_prefix_keeps_verify_green_and_is_audited(engine: Engine) -> None:
    _fill(engine)
    (done,) = purge(engine, before=ts(2024), cfg=AuditorSettings(), now=NOW, actor="dpo@test")
    # Rows 1-8 are older; row 9 is new, so the late old rows 10-11 stay (the cut is a prefix).
    assert (done.cut_seq, done.purged_rows) == (8, 8)
    report = verify(engine)
    assert report.ok, report.lines()
    assert report.chains[0].start_seq == 9 and report.chains[0].head_seq == 16
    with engine.connect() as conn:
        cp = conn.execute(select(checkpoints)).mappings().one()
        last = (
            conn.execute(select(audit_log).order_by(audit_log.c.seq.desc()).limit(1))
            .mappings()
            .one()
        )
    assert (cp["cut_seq"], cp["cut_hash"], cp["purged_rows"]) == (8, done.cut_hash, 8)
    assert last["action"] == "audit.purged" and last["user_id"] == "dpo@test"
    assert last["details"]["cut_hash"] == done.cut_hash and last["event_id"] == cp["purge_event_id"]
    # A second purge with a later cut-off continues from the checkpoint.
    (again,) = purge(engine, before=ts(2030), cfg=AuditorSettings(), now=ts(2037))
    # Rows 9-15 predate 2030; row 16 (the first purge record, written "in 2031") stays.
    assert again.cut_seq == 15 and again.purged_rows == 7
    assert verify(engine).ok
    assert purge(engine, before=ts(2030), cfg=AuditorSettings(), now=ts(2037)) == []


def test_purge_refused_inside_retention(engine: Engine) -> None:
    _fill(engine)
    with pytest.raises(RetentionError):
        purge(engine, before=ts(2026), cfg=AuditorSettings(), now=NOW)


def test_delete_outside_purge_still_refused(engine: Engine) -> None:
    _fill(engine)
    purge(engine, before=ts(2024), cfg=AuditorSettings(), now=NOW)
    with pytest.raises(exc.DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log"))
    with pytest.raises(exc.DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_checkpoints"))


def test_forged_checkpoint_is_detected(pg_engine: Engine) -> None:
    _fill(pg_engine)
    with pg_engine.begin() as conn:
        h = conn.scalar(select(audit_log.c.row_hash).where(audit_log.c.seq == 3))
        conn.execute(text("SELECT set_config('fedllm.purge', 'on', true)"))
        conn.execute(text("DELETE FROM audit_log WHERE seq <= 3"))
        conn.execute(
            insert(checkpoints).values(
                chain="main",
                cut_seq=3,
                cut_hash=h,
                purged_rows=3,
                before=ts(2024),
                purge_event_id="forged",
            )
        )
    report = verify(pg_engine)
    assert not report.ok and "forged checkpoint" in report.chains[0].problem
