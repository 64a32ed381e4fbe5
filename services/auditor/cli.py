"""`fedllm auditor | migrate | audit {verify,replay,purge,migrate} | compliance-check`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from fedllm.common.config import Settings
from fedllm.common.db import make_engine
from fedllm.common.lifecycle import run_until_signalled, setup_logging
from fedllm.common.metrics import serve_metrics
from fedllm.schemas.records import AuditEvent

log = logging.getLogger(__name__)


def _iso(value: str) -> datetime:
    """An ISO 8601 date or date-time (UTC when no offset is given)."""
    from fedllm.services.auditor.chain import as_utc

    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from exc


def cmd_auditor(args: argparse.Namespace) -> int:
    from fedllm.services.auditor import anchor, service

    settings = Settings()
    setup_logging("auditor")
    serve_metrics(settings, "auditor")

    async def main(stop: asyncio.Event) -> None:
        engine = make_engine(settings.resolved_database_url())
        try:  # the signed chain-head checkpoints run beside the consumer (off unless configured)
            await asyncio.gather(
                service.run(settings, stop=stop), anchor.run_periodically(engine, stop)
            )
        finally:
            engine.dispose()

    run_until_signalled(main)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from fedllm.services.auditor.migrate import upgrade

    url = Settings().resolved_database_url()
    upgrade(make_engine(url))
    print("auditor schema at head")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from fedllm.services.auditor.anchor import AnchorSettings, check_anchors
    from fedllm.services.auditor.verify import verify

    engine = make_engine(args.database_url or Settings().resolved_database_url())
    report = verify(engine, chain=args.chain)
    print("\n".join(report.lines()))
    anchors = AnchorSettings(**({"dir": args.anchor_dir} if args.anchor_dir else {}))
    problems: list[str] = []
    if anchors.enabled:
        problems = check_anchors(engine, anchors)
        print(
            "\n".join(f"FAIL anchor: {p}" for p in problems)
            or f"OK anchors: database matches the signed checkpoints in {anchors.path()}"
        )
    return 0 if report.ok and not problems else 1


def cmd_anchor(args: argparse.Namespace) -> int:
    from fedllm.services.auditor.anchor import AnchorSettings, verify_and_anchor

    anchors = AnchorSettings(**({"dir": args.anchor_dir} if args.anchor_dir else {}))
    if not anchors.enabled:
        print(
            "error: set FEDLLM_AUDIT_ANCHOR_KEY and FEDLLM_AUDIT_ANCHOR_DIR (or --anchor-dir)",
            file=sys.stderr,
        )
        return 2
    ok = verify_and_anchor(
        make_engine(args.database_url or Settings().resolved_database_url()), anchors
    )
    print(
        f"anchored the chain heads in {anchors.path()}"
        if ok
        else "verification failed: nothing anchored (see the log)"
    )
    return 0 if ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from fedllm.services.auditor.replay import TargetNotEmpty, replay
    from fedllm.services.auditor.rows import Protection
    from fedllm.services.auditor.settings import AuditorSettings

    settings = Settings()
    target_url = args.database_url
    if not target_url:
        target_url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='fedllm-replay-')) / 'audit.db'}"
        print(f"replaying into {target_url}")
    live, target = make_engine(settings.resolved_database_url()), make_engine(target_url)
    try:
        rep = asyncio.run(
            replay(
                settings,
                live=live,
                target=target,
                protection=Protection.from_settings(AuditorSettings()),
                from_offset=args.from_offset,
                from_time=args.from_time,
                idle_s=args.idle,
            )
        )
    except TargetNotEmpty as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(rep.lines()))
    if args.json:
        Path(args.json).write_text(json.dumps(rep.as_dict(), indent=2, default=str))
    return 0 if rep.ok else 1


def cmd_purge(args: argparse.Namespace) -> int:
    from fedllm.services.auditor.purge import RetentionError, purge
    from fedllm.services.auditor.settings import AuditorSettings

    settings = Settings()
    engine = make_engine(settings.resolved_database_url())
    try:
        done = purge(engine, before=args.before, cfg=AuditorSettings())
    except RetentionError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    for p in done:
        print(
            f"chain {p.chain}: purged {p.purged_rows} rows up to seq {p.cut_seq} "
            f"(checkpoint {p.cut_hash})"
        )
    if not done:
        print("nothing to purge")
    if done and settings.kafka_bootstrap:
        asyncio.run(_publish([p.record for p in done], settings))
    return 0


async def _publish(records: list[AuditEvent], settings: Settings) -> None:
    """Send the purge records to the audit topic too (the auditor drops them as repeats)."""
    from fedllm.common.kafka import Bus, make_producer
    from fedllm.common.topics import AUDIT

    producer = make_producer(settings)
    await producer.start()
    try:
        bus = Bus(producer, settings.topic_namespace)
        for r in records:
            await bus.send(AUDIT, "AuditEvent", r, key=r["service"])
    except Exception as exc:  # stored already; the topic copy is a convenience
        log.warning("could not publish purge records: %s", exc)
    finally:
        await producer.stop()


def cmd_compliance(args: argparse.Namespace) -> int:
    from fedllm.services.auditor import compliance
    from fedllm.services.auditor.settings import AuditorSettings

    settings = Settings()
    rep = compliance.report(
        make_engine(args.database_url or settings.resolved_database_url()),
        AuditorSettings(),
        since=args.since,
        until=args.until,
        request_grace_s=settings.request_timeout_s + 60,
    )
    if args.report or not args.json:
        print("\n".join(compliance.lines(rep)))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2, sort_keys=True))
    return 0 if rep["ok"] else 1


def _add_migrate(sub: Any) -> None:
    """`fedllm migrate`: shared with other services that register it; run theirs, then ours."""
    existing = sub.choices.get("migrate")
    if existing is None:
        p = sub.add_parser("migrate", help="apply database migrations (auditor schema)")
        p.set_defaults(func=cmd_migrate)
        return
    previous = existing.get_default("func")

    def both(args: argparse.Namespace) -> int:
        rc = int(previous(args) or 0) if previous else 0
        return rc or cmd_migrate(args)

    existing.set_defaults(func=both)


def register(sub: Any) -> None:
    """Add the auditor's subcommands to the `fedllm` parser."""
    p = sub.add_parser("auditor", help="run the audit-log service")
    p.set_defaults(func=cmd_auditor)
    _add_migrate(sub)

    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(
        dest="audit_command", required=True
    )
    p = audit.add_parser("migrate", help="apply the auditor's migrations only")
    p.set_defaults(func=cmd_migrate)
    p = audit.add_parser("verify", help="walk the hash chains; exit 1 on the first bad row")
    p.add_argument("--chain", help="verify this chain only")
    p.add_argument("--database-url", help="default: the configured database")
    p.add_argument(
        "--anchor-dir",
        help="signed checkpoints to check against "
        "(default FEDLLM_AUDIT_ANCHOR_DIR; needs FEDLLM_AUDIT_ANCHOR_KEY)",
    )
    p.set_defaults(func=cmd_verify)

    p = audit.add_parser("anchor", help="verify, then append signed chain-head checkpoints")
    p.add_argument("--database-url", help="default: the configured database")
    p.add_argument("--anchor-dir", help="default: FEDLLM_AUDIT_ANCHOR_DIR")
    p.set_defaults(func=cmd_anchor)

    p = audit.add_parser("replay", help="rebuild from the topic into an empty DB and compare")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-offset", type=int)
    start.add_argument("--from-time", type=_iso)
    p.add_argument("--database-url", help="empty target database (default: a temp SQLite)")
    p.add_argument("--idle", type=float, default=2.0, help="stop after this many idle seconds")
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(func=cmd_replay)

    p = audit.add_parser("purge", help="retention: delete rows older than --before")
    p.add_argument("--before", type=_iso, required=True)
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("compliance-check", help="HIPAA audit compliance report")
    p.add_argument("--report", action="store_true", help="print the report (default)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--since", type=_iso)
    p.add_argument("--until", type=_iso)
    p.add_argument("--database-url", help="default: the configured database")
    p.set_defaults(func=cmd_compliance)
