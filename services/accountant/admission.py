"""Admission of a request event: who is asking is what its credential says, nothing else.

A request may come from the gateway or straight from a Kafka client; either way it carries the
caller's bearer JWT in its `authorization` header, and the accountant verifies it with the
gateway's rules (`fedllm.common.identity`) BEFORE reserving anything. User, role and department
are taken from the verified claims (an event body that names someone else is refused), the
role's permissions and the department rule are applied as at the gateway, public parameters
(δ, deadline cap, size limits) are the deployment's, and the admitted request is given the
reservation grants nodes check (`fedllm.common.grants`). A refused request ends here, at once,
with a terminal `rejected` result and security audit records written to the outbox (no
decision: the router never sees it), and spends nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Literal

from sqlalchemy.orm import Session

from fedllm.common import audit, grants, outbox, results, topics
from fedllm.common.config import Settings
from fedllm.common.identity import (
    AuthError,
    IdentitySettings,
    Principal,
    bearer_from_headers,
    refusal_for,
)
from fedllm.common.kafka import Bus, now_ms
from fedllm.common.outbox import Message
from fedllm.schemas.records import InferenceRequest
from fedllm.services.accountant.ledger import Ledger
from fedllm.services.accountant.tables import EntryRow

log = logging.getLogger(__name__)
SERVICE = "accountant"
_MAX_ID = 64


class _Unread:
    """`admit`'s default: the replay check reads the ledger entry itself."""


UNREAD = _Unread()


class Admission:
    """Verifies a request event's credential and normalises the request, or rejects it."""

    def __init__(
        self, settings: Settings, ledger: Ledger, bus: Bus, identity: IdentitySettings | None = None
    ) -> None:
        identity = identity if identity is not None else IdentitySettings()
        self.settings = settings
        self.ledger = ledger
        self.bus = bus
        self.verifier = identity.verifier(settings)
        self.identifying_fields = list(identity.identifying_fields)
        self.grant_key = grants.signing_key(settings)

    async def admit_many(
        self, requests: Sequence[tuple[InferenceRequest, Sequence[tuple[str, bytes]] | None]]
    ) -> list[InferenceRequest]:
        """The admitted requests of a batch (normalised in place), with one ledger read for the
        whole batch's replay check."""
        ids = [str(r.get("request_id", "")) for r, _ in requests]
        known = await asyncio.to_thread(self.ledger.entries, ids)
        return [
            r
            for r, headers in requests
            if await self.admit(r, headers, existing=known.get(str(r.get("request_id", ""))))
        ]

    async def admit(
        self,
        request: InferenceRequest,
        headers: Sequence[tuple[str, bytes]] | None,
        *,
        existing: EntryRow | None | _Unread = UNREAD,
    ) -> bool:
        """True when `request` (normalised in place) may be reserved; else it was rejected.
        `existing`: its ledger entry if the caller read it already (None: there is none)."""
        principal: Principal | None = None
        try:
            token = bearer_from_headers(headers)
            if token is None:
                raise AuthError("missing credential")
            principal = self.verifier.verify(token)
            reason = self._normalise(request, principal)
        except AuthError as exc:
            reason = exc.reason
        entry = (
            await asyncio.to_thread(self.ledger.entry, request["request_id"])
            if isinstance(existing, _Unread)
            else existing
        )
        if entry is not None and (reason or entry["user_id"] != request["user_id"]):
            # A replay whose credential no longer holds, or someone else's request id: that
            # request already has (or will have) its own terminal result; nothing happens here.
            log.warning(
                "request %s not admitted again: %s",
                request["request_id"],
                reason or "request id belongs to another user",
            )
            await audit.emit(
                self.bus,
                action="request.replay_refused",
                service=SERVICE,
                id_parts=(request["request_id"], request["user_id"], reason),
                request_id=request["request_id"],
                outcome="denied",
                reason=reason or "request id belongs to another user",
                claimed_user_id=request.get("user_id", ""),
                severity="security",
            )
            return False
        if not reason:
            return True
        await self._reject(request, reason, principal)
        return False

    def _normalise(self, request: InferenceRequest, principal: Principal) -> str:
        """Identity from the claims, public parameters from settings; "" or why not."""
        claims: tuple[tuple[Literal["user_id", "role", "department"], str], ...] = (
            ("user_id", principal.user_id),
            ("role", principal.role),
            ("department", principal.department),
        )
        for field, claimed in claims:
            if request.get(field) and request[field] != claimed:
                return f"credential does not match the request's {field}"
            request[field] = claimed
        rid = request["request_id"]
        if not rid or len(rid) > _MAX_ID:
            return f"request_id must be 1..{_MAX_ID} characters"
        eps, budget = request["epsilon"], self.settings.budget
        if not (math.isfinite(eps) and 0 < eps <= budget.max_query_epsilon):
            return f"epsilon must be in (0, {budget.max_query_epsilon:g}]"
        if not 1 <= request["max_tokens"] <= self.settings.max_tokens_limit:
            return f"max_tokens must be in [1, {self.settings.max_tokens_limit}]"
        if not (math.isfinite(request["temperature"]) and 0 <= request["temperature"] <= 2):
            return "temperature must be in [0, 2]"
        if not request["prompt"] or len(request["prompt"]) > self.settings.max_prompt_chars:
            return f"prompt must be 1..{self.settings.max_prompt_chars} characters"
        reason = refusal_for(
            principal,
            kind=request["kind"],
            prompt=request["prompt"],
            department=request["department"],
            identifying_fields=self.identifying_fields,
        )
        if reason:
            return reason
        request["delta"] = budget.delta
        latest = now_ms() + int(self.settings.request_timeout_s * 1000)
        request["deadline_ms"] = min(int(request["deadline_ms"]), latest)
        named = [h for h in request.get("hospitals") or () if h != "*"]
        eligible = named or [h.id for h in self.settings.hospitals]
        request["grants"] = grants.sign_grants(self.grant_key, request, eligible)
        return ""

    def _record(self, messages: list[Message]) -> None:
        with Session(self.ledger.engine, autobegin=False) as s, s.begin():
            outbox.add(s, messages)

    async def _reject(
        self, request: InferenceRequest, reason: str, principal: Principal | None
    ) -> None:
        rid = request["request_id"]
        user = principal.user_id if principal else ""
        department = principal.department if principal else ""
        result = {
            "request_id": rid,
            "user_id": user,
            "department": department,
            "status": "rejected",
            "reason": reason,
            "finished_at_ms": now_ms(),
            "kind": results.FINAL,
        }
        common = {
            "request_id": rid,
            "user_id": user,
            "department": department,
            "role": principal.role if principal else "",
            "source_address": request.get("source_address", ""),
            "claimed_user_id": request.get("user_id", ""),
            "channel": "kafka",
        }
        action = "access.denied" if principal else "auth.failed"
        audits = [
            audit.audit_event(
                action=action,
                service=SERVICE,
                id_parts=(rid,),
                outcome="denied",
                reason=reason,
                severity="security",
                **common,
            ),
            audit.audit_event(
                action="request.rejected",
                service=SERVICE,
                id_parts=(rid,),
                outcome="rejected",
                reason=reason,
                **common,
            ),
        ]
        # The terminal result and its audit records leave through the outbox (sent by the
        # accountant's relay after the batch), like every other terminal result it writes.
        messages = [Message.encode(topics.RESULTS, "InferenceResult", result, key=rid)]
        messages += [Message.encode(topics.AUDIT, "AuditEvent", a, key=rid) for a in audits]
        await asyncio.to_thread(self._record, messages)
        log.warning("request %s rejected at admission: %s", rid, reason)
