"""SQLAlchemy 2 models of the audit store (the migrations create the same tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Double,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


class Base(DeclarativeBase):
    pass


class AuditLog(Base):
    """One audit record; append-only, chained per `chain` by (seq, prev_hash, row_hash)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        UniqueConstraint("chain", "seq", name="uq_audit_log_chain_seq"),
        Index("ix_audit_log_occurred_at", "occurred_at"),
        Index("ix_audit_log_request_id", "request_id"),
        Index("ix_audit_log_action_department", "action", "department"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    chain: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(200), unique=True)
    action: Mapped[str] = mapped_column(Text)
    service: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(Text, default="")
    user_id: Mapped[str] = mapped_column(Text, default="")
    role: Mapped[str] = mapped_column(Text, default="")
    department: Mapped[str] = mapped_column(Text, default="")
    source_address: Mapped[str] = mapped_column(Text, default="")
    hospital_id: Mapped[str] = mapped_column(Text, default="")
    records_used: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(Text, default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    epsilon: Mapped[float] = mapped_column(Double, default=0.0)
    delta: Mapped[float] = mapped_column(Double, default=0.0)
    rdp_summary: Mapped[str] = mapped_column(Text, default="")
    prompt_hmac: Mapped[str] = mapped_column(Text, default="")
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sealed_text: Mapped[str] = mapped_column(Text, default="")  # AES-GCM token, base64
    key_id: Mapped[str] = mapped_column(Text, default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))
    # Transport metadata, not hashed: where the event was read (NULL for records the auditor
    # writes itself, e.g. a purge). Used by `audit replay` to know which rows a replay covers.
    source_partition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source_offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ChainHead(Base):
    """The last (seq, row_hash) of each chain; appends lock this row (SELECT ... FOR UPDATE)."""

    __tablename__ = "audit_chain_heads"

    chain: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    row_hash: Mapped[str] = mapped_column(String(64))


class Checkpoint(Base):
    """Anchor left by a purge: the chain continues from (cut_seq, cut_hash)."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    chain: Mapped[str] = mapped_column(String(128), index=True)
    cut_seq: Mapped[int] = mapped_column(BigInteger)
    cut_hash: Mapped[str] = mapped_column(String(64))
    purged_rows: Mapped[int] = mapped_column(BigInteger)
    before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    purge_event_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


audit_log = cast(Table, AuditLog.__table__)
chain_heads = cast(Table, ChainHead.__table__)
checkpoints = cast(Table, Checkpoint.__table__)
