"""Fan-out parts the nodes released, kept so that a request whose router died before combining
them is still charged for them when the sweep times it out (work a node did is charged).

One row per (request, hospital); replays are no-ops. The router's combined verdict stays the
normal path; these rows are only read by the expiry sweep.
"""

from __future__ import annotations

from sqlalchemy import JSON, Engine, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant
from fedllm.schemas.records import InferenceResult


class Base(DeclarativeBase):
    pass


class PartialRelease(Base):
    __tablename__ = "partial_releases"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    spent_rdp: Mapped[dict] = mapped_column(JSON)


def create_table(engine: Engine) -> None:
    Base.metadata.create_all(engine)


def record(engine: Engine, result: InferenceResult, curve: PrivacyCurve) -> None:
    """Remember one hospital's released part (first one wins)."""
    with Session(engine) as s, s.begin():
        if s.get(PartialRelease, (result["request_id"], result["node_id"])) is None:
            s.add(
                PartialRelease(
                    request_id=result["request_id"],
                    node_id=result["node_id"],
                    spent_rdp=curve.to_dict(),
                )
            )


def spent(engine: Engine, request_id: str, accountant: RdpAccountant) -> PrivacyCurve | None:
    """The composed curve of the parts released for `request_id`, or None if none was."""
    with Session(engine) as s:
        curves = [
            PrivacyCurve.from_dict(r)
            for r in s.scalars(
                select(PartialRelease.spent_rdp).where(PartialRelease.request_id == request_id)
            )
        ]
    if not curves:
        return None
    return accountant.compose(PrivacyCurve.zero(accountant.orders), *curves)
