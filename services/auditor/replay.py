"""Rebuild the audit store from the topic into an empty database and compare with the live one.

Reads fedllm.audit from an offset or a time (no consumer group, nothing committed), stores it
through the same path as the service, then compares row for row: each replayed event must be
in the live store with the same contents, each live row read from those offsets must have been
replayed, and common rows must be in the same chain order. Rows the live store has purged
(older than its latest checkpoint's cut-off) are reported, not counted as differences.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import TopicPartition
from sqlalchemy import Engine, and_, or_, select

from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import assign_all, make_consumer, seek_to_time
from fedllm.schemas.records import AuditEvent
from fedllm.services.auditor import migrate, store
from fedllm.services.auditor.chain import as_utc, content_view
from fedllm.services.auditor.rows import InvalidEvent, Protection, event_to_row
from fedllm.services.auditor.tables import audit_log, checkpoints
from fedllm.services.auditor.verify import row_count

log = logging.getLogger(__name__)
_IN_CHUNK = 500


class TargetNotEmpty(RuntimeError):
    """Replays go into an empty database only."""


@dataclass(slots=True)
class ReplayReport:
    read: int = 0
    undecodable: int = 0
    stored: int = 0
    duplicates: int = 0
    live_rows_compared: int = 0
    missing_in_live: list[str] = field(default_factory=list)
    missing_in_replay: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    purged_in_live: int = 0
    order_matches: bool = True
    hashes_identical: bool | None = None  # only when the replay starts at a chain's seq 1
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition: first, last

    @property
    def ok(self) -> bool:
        return (
            not self.missing_in_live
            and not self.missing_in_replay
            and not self.differing
            and self.order_matches
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        out = [
            f"read {self.read} messages ({self.undecodable} undecodable), stored {self.stored} "
            f"(+{self.duplicates} repeats), compared with {self.live_rows_compared} live rows",
        ]
        for label, ids in (
            ("missing in live store", self.missing_in_live),
            ("missing from topic replay", self.missing_in_replay),
            ("differing", self.differing),
        ):
            if ids:
                out.append(f"{label}: {len(ids)} (first: {', '.join(ids[:5])})")
        if self.purged_in_live:
            out.append(f"purged from the live store by retention: {self.purged_in_live}")
        if not self.order_matches:
            out.append("chain order differs from the live store")
        if self.hashes_identical is not None:
            out.append(f"row hashes identical to live: {self.hashes_identical}")
        out.append("MATCH" if self.ok else "MISMATCH")
        return out


async def _seek_start(
    consumer: Any, tps: list[TopicPartition], from_offset: int | None, from_time_ms: int | None
) -> bool:
    """Position every partition; returns True when messages must be filtered by timestamp."""
    if from_time_ms is None:
        for tp in tps:
            consumer.seek(tp, max(0, from_offset or 0))
        return False
    try:
        await seek_to_time(consumer, tps, from_time_ms)
    except Exception as exc:  # some brokers lack ListOffsets by time: scan and filter instead
        log.info("offsets_for_times unsupported (%s); scanning from the beginning", exc)
        await consumer.seek_to_beginning(*tps)
    return True  # also filter: harmless when the broker answered exactly


async def read_into(
    settings: Settings,
    target: Engine,
    *,
    protection: Protection,
    from_offset: int | None,
    from_time: datetime | None,
    idle_s: float = 2.0,
) -> ReplayReport:
    """Consume the audit topic from the start point until it stays idle; store into `target`."""
    report = ReplayReport()
    from_ms = int(as_utc(from_time).timestamp() * 1000) if from_time else None
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = await assign_all(consumer, topics.scoped(settings, topics.AUDIT), wait_s=5.0)
        filter_time = await _seek_start(consumer, tps, from_offset, from_ms)
        ends = await consumer.end_offsets(tps)  # a lower bound on some brokers (see BROKER.md)
        last_data = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            if not batches:
                caught_up = all([await consumer.position(tp) >= ends[tp] for tp in tps])
                if caught_up and time.monotonic() - last_data > idle_s:
                    break
                continue
            last_data = time.monotonic()
            rows = []
            for tp, msgs in sorted(batches.items(), key=lambda kv: kv[0].partition):
                for msg in msgs:
                    if filter_time and from_ms is not None and msg.timestamp < from_ms:
                        continue
                    report.read += 1
                    first, _ = report.offsets.get(tp.partition, (msg.offset, msg.offset))
                    report.offsets[tp.partition] = (first, msg.offset)
                    try:
                        event = codec.decode_as(AuditEvent, msg.value, msg.headers)
                        row = event_to_row(event, protection)
                    except (codec.DecodeError, InvalidEvent):
                        report.undecodable += 1
                        continue
                    row["source_partition"], row["source_offset"] = msg.partition, msg.offset
                    rows.append(row)
            if rows:
                res = await asyncio.to_thread(store.append, target, rows)
                report.stored += res.stored
                report.duplicates += res.duplicates
    finally:
        await consumer.stop()
    return report


def _rows(engine: Engine, where: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        q = select(audit_log).where(where).order_by(audit_log.c.chain, audit_log.c.seq)
        return [dict(r) for r in conn.execute(q).mappings()]


def _live_rows(live: Engine, report: ReplayReport, replay_ids: list[str]) -> list[dict[str, Any]]:
    """Live rows read from the replayed offsets, plus live rows of the replayed event ids."""
    ranges = [
        and_(audit_log.c.source_partition == p, audit_log.c.source_offset.between(a, b))
        for p, (a, b) in report.offsets.items()
    ]
    rows = {r["event_id"]: r for r in _rows(live, or_(*ranges))} if ranges else {}
    todo = [i for i in replay_ids if i not in rows]
    for i in range(0, len(todo), _IN_CHUNK):
        rows.update(
            {
                r["event_id"]: r
                for r in _rows(live, audit_log.c.event_id.in_(todo[i : i + _IN_CHUNK]))
            }
        )
    return sorted(rows.values(), key=lambda r: (r["chain"], r["seq"]))


def compare(live: Engine, target: Engine, report: ReplayReport) -> ReplayReport:
    """Fill the comparison fields of `report` (target = the replayed store)."""
    replayed = _rows(target, audit_log.c.id.is_not(None))
    live_rows = _live_rows(live, report, [r["event_id"] for r in replayed])
    report.live_rows_compared = len(live_rows)
    live_by_id = {r["event_id"]: r for r in live_rows}
    replay_by_id = {r["event_id"]: r for r in replayed}
    with live.connect() as conn:
        cutoffs = {
            c: as_utc(b)
            for c, b in conn.execute(
                select(checkpoints.c.chain, checkpoints.c.before).order_by(checkpoints.c.id)
            )
        }
    for r in replayed:
        mine = live_by_id.get(r["event_id"])
        if mine is None:
            cut = cutoffs.get(r["chain"])
            if cut is not None and as_utc(r["occurred_at"]) < cut:
                report.purged_in_live += 1
            else:
                report.missing_in_live.append(r["event_id"])
        elif content_view(mine) != content_view(r):
            report.differing.append(r["event_id"])
    report.missing_in_replay = [i for i in live_by_id if i not in replay_by_id]
    common = set(live_by_id) & set(replay_by_id)

    def order(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [
            (r["chain"], r["event_id"])
            for r in rows
            if r["event_id"] in common and r["source_offset"] is not None
        ]

    report.order_matches = order(live_rows) == order(replayed)
    if (
        replayed
        and all(live_by_id.get(r["event_id"], {}).get("seq") == r["seq"] for r in replayed[:1])
        and replayed[0]["seq"] == 1
    ):
        report.hashes_identical = all(
            live_by_id.get(r["event_id"], {}).get("row_hash") == r["row_hash"] for r in replayed
        )
    return report


async def replay(
    settings: Settings,
    *,
    live: Engine,
    target: Engine,
    protection: Protection,
    from_offset: int | None = None,
    from_time: datetime | None = None,
    idle_s: float = 2.0,
) -> ReplayReport:
    """Migrate the (empty) target, read the topic into it, compare with `live`."""
    await asyncio.to_thread(migrate.upgrade, target)
    if row_count(target) != 0:
        raise TargetNotEmpty("the replay database already holds audit rows; use an empty one")
    report = await read_into(
        settings,
        target,
        protection=protection,
        from_offset=from_offset,
        from_time=from_time,
        idle_s=idle_s,
    )
    return await asyncio.to_thread(compare, live, target, report)
