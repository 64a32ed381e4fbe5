"""Node admission and circuit breakers for the router (pure: time passed in).

`ControlledRegistry` is a `NodeRegistry` that consults the control state
(fedllm/common/control.py):

- a heartbeat from a hospital that is not approved (nor draining) is ignored and reported once
  per status change for audit (`node.heartbeat_ignored`); a removed node leaves at once;
- a node whose breaker is open (by hand, or automatically), that is draining, or any node while
  processing is halted, stays in the registry but is not eligible for new work;
- automatic breakers: a heartbeat reporting `error_rate` ≥ `breaker_error_rate`, or
  `ewma_latency_ms` ≥ `breaker_latency_ms` (when that is > 0), opens the node's breaker; it
  closes on the first healthy heartbeat after `breaker_cooldown_s`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedllm.common.control import ControlState
from fedllm.services.router.registry import NodeInfo, NodeRegistry


@dataclass(frozen=True, slots=True)
class ControlEvent:
    """Something the router must audit: action and fields."""

    action: str
    hospital_id: str
    fields: dict[str, str]


class ControlledRegistry(NodeRegistry):
    """A node registry gated by the control state; `events` collects what to audit."""

    def __init__(self, *, ttl_s: float, control: ControlState) -> None:
        super().__init__(ttl_s=ttl_s)
        self.control = control
        self.auto_open: dict[str, tuple[int, str]] = {}  # hospital -> (opened at ms, reason)
        self.events: list[ControlEvent] = []
        self._ignored: dict[str, str] = {}  # hospital -> admission status last reported

    def drain_events(self) -> list[ControlEvent]:
        events, self.events = self.events, []
        return events

    def observe(self, heartbeat: Mapping[str, Any], *, now_ms: int) -> bool:
        hospital_id = heartbeat["hospital_id"]
        status = self.control.admission(hospital_id)
        if status not in ("approved", "draining"):
            if self._ignored.get(hospital_id) != status:
                self._ignored[hospital_id] = status
                self.events.append(
                    ControlEvent(
                        "node.heartbeat_ignored",
                        hospital_id,
                        {"outcome": "ignored", "reason": f"node is {status}, not approved"},
                    )
                )
            self.leave_now(hospital_id)  # expire() reports it left and re-routes its work
            return False
        self._ignored.pop(hospital_id, None)
        self._check_breaker(heartbeat, now_ms=now_ms)
        return super().observe(heartbeat, now_ms=now_ms)

    def _check_breaker(self, heartbeat: Mapping[str, Any], *, now_ms: int) -> None:
        hospital_id = heartbeat["hospital_id"]
        error_rate = float(heartbeat.get("error_rate", 0.0))
        latency = float(heartbeat.get("ewma_latency_ms", 0.0))
        max_errors = float(self.control.setting("breaker_error_rate"))
        max_latency = float(self.control.setting("breaker_latency_ms"))
        why = ""
        if error_rate >= max_errors:
            why = f"error rate {error_rate:.2f} >= {max_errors:.2f}"
        elif max_latency > 0 and latency >= max_latency:
            why = f"EWMA latency {latency:.0f} ms >= {max_latency:.0f} ms"
        opened = self.auto_open.get(hospital_id)
        if why and opened is None:
            self.auto_open[hospital_id] = (now_ms, why)
            self.events.append(
                ControlEvent(
                    "node.breaker_opened", hospital_id, {"outcome": "automatic", "reason": why}
                )
            )
        elif not why and opened is not None:
            cooldown_ms = int(float(self.control.setting("breaker_cooldown_s")) * 1000)
            if now_ms - opened[0] >= cooldown_ms:
                del self.auto_open[hospital_id]
                self.events.append(
                    ControlEvent(
                        "node.breaker_closed",
                        hospital_id,
                        {"outcome": "automatic", "reason": "heartbeat healthy after cooldown"},
                    )
                )

    def blocked(self, hospital_id: str) -> str:
        """Why the node takes no new work now ('' when it may)."""
        if self.control.halted is not None:
            return f"processing halted: {self.control.halted}"
        manual = self.control.breakers.get(hospital_id)
        if manual is not None:
            return f"breaker open: {manual}"
        auto = self.auto_open.get(hospital_id)
        if auto is not None:
            return f"breaker open: {auto[1]}"
        status = self.control.admission(hospital_id)
        if status != "approved":
            return f"node is {status}"
        return ""

    def _gated(self, node: NodeInfo) -> NodeInfo:
        return replace(node, healthy=False) if self.blocked(node.hospital_id) else node

    def alive(self, now_ms: int) -> list[NodeInfo]:
        self._forget_removed()
        return [self._gated(n) for n in super().alive(now_ms)]

    def get(self, hospital_id: str, *, now_ms: int) -> NodeInfo | None:
        self._forget_removed()
        node = super().get(hospital_id, now_ms=now_ms)
        return None if node is None else self._gated(node)

    def expire(self, *, now_ms: int) -> list[NodeInfo]:
        self._forget_removed()
        return super().expire(now_ms=now_ms)

    def _forget_removed(self) -> None:
        for hospital_id in [h for h in self.ids() if h in self.control.removed]:
            self.leave_now(hospital_id)  # at once: expire() would only notice after the TTL
