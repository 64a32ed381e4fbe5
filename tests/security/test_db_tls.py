"""Postgres over TLS: `sslmode` in DATABASE_URL reaches psycopg through our engine factory, and
a required TLS connection is never silently downgraded. (The local Postgres has no TLS
listener, so the check is that `sslmode=require` refuses it.)"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from fedllm.common.db import make_engine, normalise_url


def test_sslmode_is_passed_through_and_enforced(database_url: str) -> None:
    plain = make_engine(database_url)
    with plain.connect() as conn:
        server_has_tls = conn.execute(text("SHOW ssl")).scalar() == "on"
    plain.dispose()
    url = make_url(normalise_url(database_url)).update_query_dict({"sslmode": "require"})
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        if server_has_tls:
            with engine.connect() as conn:
                assert conn.execute(
                    text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                ).scalar()
        else:
            with pytest.raises(OperationalError, match="SSL"), engine.connect():
                pass
    finally:
        engine.dispose()
