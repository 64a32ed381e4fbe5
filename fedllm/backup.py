"""`fedllm backup` / `fedllm restore`: pg_dump / pg_restore of the ledger and audit databases.

A backup is a directory: one custom-format dump per database (`ledger.dump`, and `audit.dump`
when the audit log has a database of its own) and `manifest.json` with each dump's SHA-256, its
tables and the audit chain heads at dump time. Restore checks the checksum, refuses a target that
already has tables, restores in one transaction and runs the audit verification on the result.
Connection details go to pg_dump through libpq environment variables, never the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.engine import make_url

from fedllm.common.config import Settings
from fedllm.common.db import make_engine, normalise_url

MANIFEST = "manifest.json"
LIBPQ_QUERY = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "options": "PGOPTIONS",
}


class BackupError(Exception):
    """A backup or restore that cannot go ahead (with the reason)."""


def libpq_env(url: str) -> dict[str, str]:
    """PG* environment variables for a SQLAlchemy or libpq Postgres URL."""
    u = make_url(normalise_url(url))
    if not u.drivername.startswith("postgresql"):
        raise BackupError(
            f"backup and restore need PostgreSQL, not {u.drivername} "
            "(the embedded SQLite default is one file: copy it)"
        )
    env = {"PGDATABASE": u.database or ""}
    for var, value in (
        ("PGHOST", u.host),
        ("PGPORT", u.port),
        ("PGUSER", u.username),
        ("PGPASSWORD", u.password),
    ):
        if value:
            env[var] = str(value)
    for key, var in LIBPQ_QUERY.items():
        if key in u.query:
            query = u.query[key]
            env[var] = query if isinstance(query, str) else query[-1]
    return env


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"{name} not found: install the PostgreSQL client tools")
    return path


def _run(args: list[str], url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | libpq_env(url)
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise BackupError(f"{Path(args[0]).name} failed: {out.stderr.strip()}")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _audit_heads(url: str) -> dict[str, list[Any]]:
    from fedllm.services.auditor.tables import chain_heads

    engine = make_engine(url)
    try:
        if not inspect(engine).has_table("audit_chain_heads"):
            return {}
        with engine.connect() as conn:
            return {
                c: [int(s), h]
                for c, s, h in conn.execute(
                    select(chain_heads.c.chain, chain_heads.c.seq, chain_heads.c.row_hash)
                )
            }
    finally:
        engine.dispose()


def _tables(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        return sorted(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def backup(out: Path, databases: dict[str, str]) -> dict[str, Any]:
    """Dump each named database into `out` (created, must be empty); returns the manifest."""
    pg_dump = _tool("pg_dump")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise BackupError(f"{out} is not empty")
    version = subprocess.run([pg_dump, "--version"], capture_output=True, text=True).stdout
    manifest: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(),
        "pg_dump": version.strip(),
        "dumps": [],
    }
    for name, url in databases.items():
        heads = _audit_heads(url)  # before the dump: the dump holds at least these rows
        path = out / f"{name}.dump"
        _run([pg_dump, "--format=custom", "--no-owner", "--no-privileges", f"--file={path}"], url)
        manifest["dumps"].append(
            {
                "name": name,
                "file": path.name,
                "sha256": _sha256(path),
                "tables": _tables(url),
                "audit_heads": heads,
            }
        )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def restore(src: Path, url: str, *, name: str) -> dict[str, Any]:
    """Restore dump `name` of the backup in `src` into the empty database at `url`."""
    pg_restore = _tool("pg_restore")
    manifest = json.loads((src / MANIFEST).read_text())
    entry = next((d for d in manifest["dumps"] if d["name"] == name), None)
    if entry is None:
        raise BackupError(
            f"no dump named {name!r} in {src} "
            f"(has: {', '.join(d['name'] for d in manifest['dumps'])})"
        )
    path = src / entry["file"]
    if _sha256(path) != entry["sha256"]:
        raise BackupError(f"{path} does not match its checksum in the manifest")
    existing = _tables(url)
    if existing:
        raise BackupError(f"target database is not empty (tables: {', '.join(existing)})")
    _run(
        [
            pg_restore,
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            f"--dbname={libpq_env(url)['PGDATABASE']}",
            str(path),
        ],
        url,
    )
    return entry


def _databases(args: argparse.Namespace) -> dict[str, str]:
    ledger = args.database_url or Settings().resolved_database_url()
    dbs = {"ledger": ledger}
    if args.audit_database_url and args.audit_database_url != ledger:
        dbs["audit"] = args.audit_database_url
    return dbs


def cmd_backup(args: argparse.Namespace) -> int:
    try:
        manifest = backup(Path(args.out), _databases(args))
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for d in manifest["dumps"]:
        heads = ", ".join(f"{c} seq {s}" for c, (s, _) in sorted(d["audit_heads"].items()))
        print(
            f"{d['name']}: {args.out}/{d['file']} ({len(d['tables'])} tables"
            f"{'; audit ' + heads if heads else ''}) sha256 {d['sha256'][:16]}"
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from fedllm.services.auditor.verify import verify

    url = args.database_url or Settings().resolved_database_url()
    try:
        entry = restore(Path(args.source), url, name=args.name)
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"restored {entry['name']} ({len(entry['tables'])} tables) from {args.source}")
    if "audit_log" not in entry["tables"]:
        return 0
    engine = make_engine(url)
    try:
        report = verify(engine)
    finally:
        engine.dispose()
    print("\n".join(report.lines()))
    for chain, (seq, _) in entry["audit_heads"].items():
        restored = next((c for c in report.chains if c.chain == chain), None)
        if restored is None or restored.head_seq < seq:
            print(
                f"FAIL chain {chain}: the backup's manifest says seq {seq}, restored "
                f"{restored.head_seq if restored else 'nothing'}"
            )
            return 1
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `backup` and `restore` to the `fedllm` parser."""
    p = sub.add_parser("backup", help="pg_dump the ledger (and audit) databases into a directory")
    p.add_argument("--out", required=True, help="new or empty directory for the dumps")
    p.add_argument("--database-url", help="ledger database (default: DATABASE_URL)")
    p.add_argument("--audit-database-url", help="audit database, when not the ledger's")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="restore a backup into an empty database, then verify")
    p.add_argument("--from", dest="source", required=True, help="backup directory")
    p.add_argument("--database-url", help="empty target database (default: DATABASE_URL)")
    p.add_argument("--name", default="ledger", help="which dump: ledger (default) or audit")
    p.set_defaults(func=cmd_restore)
