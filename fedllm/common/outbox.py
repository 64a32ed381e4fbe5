"""Transactional outbox: messages written in the same database transaction as the state change
that implies them, then sent by a relay until the broker acknowledges them.

`add(session, ...)` stores the encoded bytes (Avro value, key, headers) beside the change; a
crash after the commit loses nothing, because `Relay.flush()` sends every unsent row in id order
and marks it sent only after the broker's ack. A row sent again after a crash between the ack
and the mark carries the identical bytes, so consumers (idempotent by id) see a plain duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CursorResult,
    Engine,
    Integer,
    LargeBinary,
    String,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedllm.common import codec, tracing
from fedllm.common.clock import now_ms

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class OutboxRow(Base):
    """One message waiting for (or already given) the broker's ack."""

    __tablename__ = "outbox_messages"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    topic: Mapped[str] = mapped_column(String(200))
    key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[list[list[str]]] = mapped_column(JSON)  # [[name, hex bytes], ...]
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    sent_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)


@dataclass(frozen=True, slots=True)
class Message:
    """An encoded message: exactly the bytes the relay will send."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def encode(
        cls, topic: str, schema: str, record: Mapping[str, Any], *, key: str | None = None
    ) -> Message:
        value, headers = codec.encode(schema, record)
        # The trace context of the hop that wrote it travels with the stored bytes.
        headers = [*headers, *tracing.inject_headers()]
        return cls(topic, key.encode() if key else None, value, tuple(headers))


def create_table(engine: Engine) -> None:
    Base.metadata.create_all(engine)


def add(session: Session, messages: Iterable[Message]) -> None:
    """Record `messages` in the caller's open transaction (sent only if it commits)."""
    now = now_ms()
    rows = [
        {
            "topic": m.topic,
            "key": m.key,
            "value": m.value,
            "headers": [[k, v.hex()] for k, v in m.headers],
            "created_at_ms": now,
            "sent_at_ms": None,
        }
        for m in messages
    ]
    if rows:  # one executemany, in order (ids follow the list), no ORM unit of work
        session.execute(insert(OutboxRow), rows)


def pending(engine: Engine, *, limit: int = 500) -> list[tuple[int, Message]]:
    """The oldest unsent messages, in the order they were recorded."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(OutboxRow.id, OutboxRow.topic, OutboxRow.key, OutboxRow.value, OutboxRow.headers)
            .where(OutboxRow.sent_at_ms.is_(None))
            .order_by(OutboxRow.id)
            .limit(limit)
        ).all()
    return [
        (id_, Message(topic, key, value, tuple((k, bytes.fromhex(v)) for k, v in headers)))
        for id_, topic, key, value, headers in rows
    ]


def mark_sent(engine: Engine, ids: list[int]) -> None:
    if not ids:
        return
    with Session(engine) as s, s.begin():
        s.execute(update(OutboxRow).where(OutboxRow.id.in_(ids)).values(sent_at_ms=now_ms()))


def purge_sent(engine: Engine, *, before_ms: int) -> int:
    """Delete messages acknowledged before `before_ms` (retention); returns how many."""
    with Session(engine) as s, s.begin():
        result = s.execute(delete(OutboxRow).where(OutboxRow.sent_at_ms < before_ms))
        return int(cast(CursorResult[Any], result).rowcount)


class Relay:
    """Sends the outbox through an (aiokafka) producer; one flush at a time per process.
    Stored topics are logical; they are sent inside `namespace` (Settings.topic_namespace)."""

    def __init__(
        self, engine: Engine, producer: Any, *, batch: int = 500, namespace: str = ""
    ) -> None:
        self.engine = engine
        self.producer = producer
        self.namespace = namespace
        self.batch = batch
        self._lock = asyncio.Lock()

    async def flush(self) -> int:
        """Send every unsent message; returns how many. A page of messages is handed to the
        producer in order and its acks awaited together (one broker round trip per page, not
        per message); the acked ones are marked sent, and if any failed the error is raised
        after that, leaving the rest for the next flush (at-least-once: consumers dedupe)."""
        sent = 0
        async with self._lock:
            while True:
                rows = await asyncio.to_thread(pending, self.engine, limit=self.batch)
                if not rows:
                    return sent
                acks = []
                error: BaseException | None = None
                for _, m in rows:
                    try:
                        acks.append(
                            await self.producer.send(
                                self.namespace + m.topic,
                                value=m.value,
                                key=m.key,
                                headers=list(m.headers),
                            )
                        )
                    except Exception as exc:  # not even queued: stop this page here
                        error = exc
                        break
                results = await asyncio.gather(*acks, return_exceptions=True)
                done = [
                    i
                    for (i, _), r in zip(rows, results, strict=False)
                    if not isinstance(r, BaseException)
                ]
                await asyncio.to_thread(mark_sent, self.engine, done)
                sent += len(done)
                failed = next((r for r in results if isinstance(r, BaseException)), error)
                if failed is not None:
                    raise failed
