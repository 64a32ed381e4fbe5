"""Signed checkpoints of the audit chain heads, kept outside the database.

The hash chain makes every row depend on all rows before it, so an insider who can write the
database could still rewrite a whole chain consistently (recompute every hash from the altered row
on). An anchor defeats that: the auditor periodically appends each chain's head (chain, seq,
row_hash) to `anchors.jsonl` in a directory outside the database (a volume, ideally shipped to
write-once storage), each line signed with HMAC-SHA256 under FEDLLM_AUDIT_ANCHOR_KEY, a key the
database never holds. `fedllm audit verify` then checks that the row at each chain's latest
anchored seq still has the anchored hash: any change at or before that seq changes it.

What an anchor cannot show: rows appended after the latest anchor (the chain still covers them),
and anchors deleted from the file (keep the file on append-only / object-lock storage).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Connection, Engine, func, select

from fedllm.common import metrics
from fedllm.services.auditor.tables import audit_log, chain_heads, checkpoints
from fedllm.services.auditor.verify import verify

log = logging.getLogger(__name__)
FILE_NAME = "anchors.jsonl"
SIGNED_FIELDS = ("chain", "seq", "row_hash", "anchored_at")


class AnchorSettings(BaseSettings):
    """`FEDLLM_AUDIT_ANCHOR_*`: where the anchors go, the signing key, how often."""

    model_config = SettingsConfigDict(env_prefix="FEDLLM_AUDIT_ANCHOR_", extra="ignore")

    dir: str = ""  # empty: anchoring off
    key: SecretStr = SecretStr("")
    interval_s: float = 300.0

    @property
    def enabled(self) -> bool:
        return bool(self.dir and self.key.get_secret_value())

    def path(self) -> Path:
        return Path(self.dir) / FILE_NAME


class AnchorError(Exception):
    """The anchor file is unusable (bad signature, unreadable line)."""


@dataclass(frozen=True, slots=True)
class Anchor:
    chain: str
    seq: int
    row_hash: str
    anchored_at: str  # ISO 8601, UTC

    def payload(self) -> bytes:
        return json.dumps(
            {f: getattr(self, f) for f in SIGNED_FIELDS}, sort_keys=True, separators=(",", ":")
        ).encode()

    def sign(self, key: bytes) -> str:
        return hmac.new(key, self.payload(), hashlib.sha256).hexdigest()


def _key(settings: AnchorSettings) -> bytes:
    raw = settings.key.get_secret_value()
    if not raw:
        raise AnchorError("FEDLLM_AUDIT_ANCHOR_KEY is not set")
    return raw.encode()


def write_anchor(
    engine: Engine,
    settings: AnchorSettings,
    *,
    heads: list[tuple[str, int, str]] | None = None,
    now: datetime | None = None,
) -> list[Anchor]:
    """Append one signed line per chain head (default: the database's current heads) to the
    anchor file; returns the anchors written."""
    key = _key(settings)
    at = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
    if heads is None:
        with engine.connect() as conn:
            heads = [
                tuple(r)
                for r in conn.execute(  # type: ignore[misc]
                    select(chain_heads.c.chain, chain_heads.c.seq, chain_heads.c.row_hash).order_by(
                        chain_heads.c.chain
                    )
                )
            ]
    anchors = [Anchor(chain=c, seq=int(s), row_hash=h, anchored_at=at) for c, s, h in heads if s]
    path = settings.path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for a in anchors:
            line = {f: getattr(a, f) for f in SIGNED_FIELDS} | {"hmac": a.sign(key)}
            f.write(json.dumps(line, sort_keys=True) + "\n")
    metrics.AUDIT_ANCHOR_TIME.set(time.time())
    return anchors


def latest_anchors(settings: AnchorSettings) -> dict[str, Anchor]:
    """The newest anchor of each chain; any line with a bad signature raises AnchorError."""
    key = _key(settings)
    path = settings.path()
    latest: dict[str, Anchor] = {}
    if not path.exists():
        return latest
    for n, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            anchor = Anchor(**{f: line[f] for f in SIGNED_FIELDS})
            sig = str(line["hmac"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"{path}:{n}: unreadable anchor line ({exc})") from exc
        if not hmac.compare_digest(anchor.sign(key), sig):
            raise AnchorError(f"{path}:{n}: bad signature (anchor file altered or wrong key)")
        current = latest.get(anchor.chain)
        if current is None or anchor.seq >= current.seq:
            latest[anchor.chain] = anchor
    return latest


def _cut(conn: Connection, chain: str) -> tuple[int, str] | None:
    row = conn.execute(
        select(checkpoints.c.cut_seq, checkpoints.c.cut_hash)
        .where(checkpoints.c.chain == chain)
        .order_by(checkpoints.c.cut_seq.desc())
        .limit(1)
    ).first()
    return (int(row.cut_seq), str(row.cut_hash)) if row else None


def check_anchors(engine: Engine, settings: AnchorSettings) -> list[str]:
    """Problems found comparing the database with the latest anchor of each chain ([] = ok)."""
    try:
        anchors = latest_anchors(settings)
    except AnchorError as exc:
        return [str(exc)]
    problems = []
    with engine.connect() as conn:
        for chain, a in sorted(anchors.items()):
            found = conn.scalar(
                select(audit_log.c.row_hash).where(
                    audit_log.c.chain == chain, audit_log.c.seq == a.seq
                )
            )
            if found is None:
                cut = _cut(conn, chain)
                if cut is not None and a.seq <= cut[0]:
                    if a.seq == cut[0] and cut[1] != a.row_hash:
                        problems.append(
                            f"chain {chain}: purge checkpoint at seq {a.seq} has "
                            f"hash {cut[1]}, anchored {a.row_hash}"
                        )
                    continue  # purged by retention; the checkpoint carries the chain on
                problems.append(
                    f"chain {chain}: anchored seq {a.seq} ({a.anchored_at}) is "
                    f"missing: rows deleted or chain truncated"
                )
            elif found != a.row_hash:
                problems.append(
                    f"chain {chain}: row seq {a.seq} has hash {found}, anchored "
                    f"{a.row_hash} at {a.anchored_at}: rows at or before seq "
                    f"{a.seq} were rewritten"
                )
    return problems


def head_ages(engine: Engine, *, now: datetime | None = None) -> dict[str, float]:
    """Seconds since each chain's newest row was stored."""
    now = now or datetime.now(UTC)
    with engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.chain, func.max(audit_log.c.stored_at)).group_by(audit_log.c.chain)
        ).all()
    out = {}
    for chain, at in rows:
        if at is not None:
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
            out[chain] = max(0.0, (now - at).total_seconds())
    return out


def verify_and_anchor(engine: Engine, settings: AnchorSettings) -> bool:
    """Verify every chain and the anchors; anchor the heads only when both hold. Sets the
    audit gauges (verify ok, head age, anchor time)."""
    report = verify(engine)
    problems = [line for line in report.lines() if line.startswith("FAIL")]
    problems += check_anchors(engine, settings)
    ok = not problems
    metrics.AUDIT_VERIFY_OK.set(1 if ok else 0)
    for chain, age in head_ages(engine).items():
        metrics.AUDIT_HEAD_AGE.labels(chain).set(age)
    if ok:  # anchor exactly the heads just verified, not rows appended since
        write_anchor(
            engine, settings, heads=[(c.chain, c.head_seq, c.head_hash) for c in report.chains]
        )
    else:
        for p in problems:
            log.error("audit verification failed: %s", p)
    return ok


async def run_periodically(
    engine: Engine, stop: asyncio.Event, settings: AnchorSettings | None = None
) -> None:
    """Verify and anchor every `interval_s` until `stop` (a no-op when anchoring is off)."""
    settings = settings or AnchorSettings()
    if not settings.enabled:
        log.info("audit anchoring off (set FEDLLM_AUDIT_ANCHOR_DIR and FEDLLM_AUDIT_ANCHOR_KEY)")
        return
    while not stop.is_set():
        try:
            await asyncio.to_thread(verify_and_anchor, engine, settings)
        except Exception:  # a DB outage: the auditor's own loop waits it out; try again later
            log.exception("audit anchoring failed this round")
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.interval_s)
        except TimeoutError:
            pass
