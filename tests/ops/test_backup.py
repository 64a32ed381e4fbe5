"""`fedllm backup` / `fedllm restore` on real Postgres (pg_dump / pg_restore), and the signed
audit anchors: a restored database passes `fedllm audit verify` against the anchors; a chain
rewritten consistently (every hash recomputed) passes the plain chain walk but not the anchors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, inspect, select, text

from fedllm.cli import main
from fedllm.common.config import BudgetConfig
from fedllm.common.db import make_engine
from fedllm.privacy.accountant import RdpAccountant
from fedllm.services.accountant.ledger import Ledger
from fedllm.services.auditor import migrate, store
from fedllm.services.auditor.anchor import AnchorSettings, check_anchors, verify_and_anchor
from fedllm.services.auditor.chain import row_hash
from fedllm.services.auditor.tables import audit_log
from fedllm.services.auditor.verify import verify
from tests.auditor.helpers import as_superuser_untriggered, event, rows
from tests.conftest import scratch_database
from tests.kafka_helpers import inference_request

pytestmark = pytest.mark.skipif(
    shutil.which("pg_dump") is None or shutil.which("pg_restore") is None,
    reason="PostgreSQL client tools not installed",
)
KEY = "anchor-key-for-tests-only-0123456789abcdef"


@pytest.fixture
def anchors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AnchorSettings:
    monkeypatch.setenv("FEDLLM_AUDIT_ANCHOR_KEY", KEY)
    monkeypatch.setenv("FEDLLM_AUDIT_ANCHOR_DIR", str(tmp_path / "anchors"))
    return AnchorSettings()


def populate(url: str, n: int = 12) -> Engine:
    engine = make_engine(url)
    ledger = Ledger(engine, BudgetConfig(), RdpAccountant())
    for i in range(3):
        ledger.reserve(inference_request(user_id=f"u{i}", department="cardiology", epsilon=0.5))
    migrate.upgrade(engine)
    store.append(engine, rows([event(i, tag="backup") for i in range(n)]))
    return engine


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t: conn.scalar(text(f'SELECT count(*) FROM "{t}"'))
            for t in inspect(engine).get_table_names()
        }


def test_backup_restores_into_an_empty_database_and_verifies(
    fresh_database_url: str,
    postgres_admin_url: str,
    anchors: AnchorSettings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = populate(fresh_database_url)
    assert verify_and_anchor(source, anchors)
    out = tmp_path / "backup"
    assert main(["backup", "--out", str(out), "--database-url", fresh_database_url]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"audit_log", "audit_chain_heads"} <= set(manifest["dumps"][0]["tables"])
    assert manifest["dumps"][0]["audit_heads"]["main"][0] == 12
    with scratch_database(postgres_admin_url) as target_url:
        assert main(["restore", "--from", str(out), "--database-url", target_url]) == 0
        target = make_engine(target_url)
        try:
            assert counts(target) == counts(source)
            assert counts(target)["audit_log"] == 12
            capsys.readouterr()
            assert main(["audit", "verify", "--database-url", target_url]) == 0
            printed = capsys.readouterr().out
            assert "OK chain main: 12 rows" in printed and "OK anchors" in printed
            # the append-only trigger came back with the restore
            with (
                pytest.raises(Exception, match="append-only|not allowed|audit"),
                target.begin() as conn,
            ):
                conn.execute(text("DELETE FROM audit_log WHERE seq = 1"))
            # a second restore into the now non-empty database is refused
            assert main(["restore", "--from", str(out), "--database-url", target_url]) == 2
            assert "not empty" in capsys.readouterr().err
        finally:
            target.dispose()
    source.dispose()


def test_a_corrupted_dump_is_refused(
    fresh_database_url: str,
    postgres_admin_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    populate(fresh_database_url, n=3).dispose()
    out = tmp_path / "backup"
    assert main(["backup", "--out", str(out), "--database-url", fresh_database_url]) == 0
    dump = out / "ledger.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    with scratch_database(postgres_admin_url) as target_url:
        assert main(["restore", "--from", str(out), "--database-url", target_url]) == 2
        assert "checksum" in capsys.readouterr().err
    assert main(["backup", "--out", str(out), "--database-url", fresh_database_url]) == 2


def rewrite_chain_from(engine: Engine, seq: int, reason: str) -> None:
    """What an insider with database rights could do: alter row `seq` and recompute every hash
    after it, and the chain head, so the chain itself is consistent again."""
    with engine.connect() as conn:
        chain = [
            dict(r)
            for r in conn.execute(
                select(audit_log).where(audit_log.c.chain == "main").order_by(audit_log.c.seq)
            ).mappings()
        ]
    prev = chain[seq - 2]["row_hash"] if seq > 1 else "0" * 64
    for row in chain[seq - 1 :]:
        if row["seq"] == seq:
            row["reason"] = reason
        row["prev_hash"] = prev
        row["row_hash"] = prev = row_hash(prev, row)
        as_superuser_untriggered(
            engine,
            "UPDATE audit_log SET reason = :reason, prev_hash = :p, row_hash = :h WHERE id = :id",
            reason=row["reason"],
            p=row["prev_hash"],
            h=row["row_hash"],
            id=row["id"],
        )
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_chain_heads SET row_hash = :h WHERE chain = 'main'"), {"h": prev}
        )


def test_a_consistently_rewritten_chain_is_caught_by_the_anchor(
    fresh_database_url: str, anchors: AnchorSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = populate(fresh_database_url)
    assert verify_and_anchor(engine, anchors)
    assert REGISTRY.get_sample_value("fedllm_audit_verify_ok") == 1
    assert check_anchors(engine, anchors) == []
    rewrite_chain_from(engine, 4, "nothing to see here")
    assert verify(engine).ok, "the rewrite is consistent: the chain walk alone cannot see it"
    problems = check_anchors(engine, anchors)
    assert len(problems) == 1 and "seq 12" in problems[0] and "rewritten" in problems[0]
    capsys.readouterr()
    assert main(["audit", "verify", "--database-url", fresh_database_url]) == 1
    assert "FAIL anchor" in capsys.readouterr().out
    assert not verify_and_anchor(engine, anchors)
    assert REGISTRY.get_sample_value("fedllm_audit_verify_ok") == 0
    engine.dispose()


def test_rows_appended_after_the_anchor_are_fine_but_a_truncated_tail_is_not(
    fresh_database_url: str, anchors: AnchorSettings
) -> None:
    engine = populate(fresh_database_url, n=5)
    assert verify_and_anchor(engine, anchors)
    store.append(engine, rows([event(i, tag="later") for i in range(3)]))
    assert check_anchors(engine, anchors) == []
    assert verify_and_anchor(engine, anchors)  # anchors the new head (seq 8)
    as_superuser_untriggered(engine, "DELETE FROM audit_log WHERE seq > 6")
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE audit_chain_heads SET seq = 6, row_hash = "
                "(SELECT row_hash FROM audit_log WHERE seq = 6) WHERE chain = 'main'"
            )
        )
    assert verify(engine).ok
    assert any("missing" in p for p in check_anchors(engine, anchors))
    engine.dispose()


def test_a_forged_anchor_line_is_refused(fresh_database_url: str, anchors: AnchorSettings) -> None:
    engine = populate(fresh_database_url, n=4)
    assert verify_and_anchor(engine, anchors)
    path = anchors.path()
    line = json.loads(path.read_text().splitlines()[-1])
    line["seq"] = 2  # point the anchor at an earlier row, keeping the old signature
    path.write_text(path.read_text() + json.dumps(line) + "\n")
    problems = check_anchors(engine, anchors)
    assert problems and "bad signature" in problems[0]
    engine.dispose()
