"""The control plane's state: a pure fold of the ControlCommand log on `fedllm.control`.

The gateway authorises, validates and audits each command before publishing it; every service
(gateway, router, node workers) reads the whole topic in order and folds it with
`ControlState.apply`, so replicas and restarts converge on the same state. The log is small
(administrator actions only), so replaying it from the start is cheap.

State: security lockdown, halted processing, manual circuit breakers, node admission (register,
approve, drain, remove) and a few run-time settings (`RUNTIME_CONFIG`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, assign_all, ensure_topics, make_consumer, partitions_of
from fedllm.schemas.records import ControlCommand

log = logging.getLogger(__name__)

ACTIONS = (
    "lockdown",
    "unlock",
    "halt",
    "resume",
    "breaker_open",
    "breaker_close",
    "node_register",
    "node_approve",
    "node_drain",
    "node_remove",
    "config_set",
)

# Routing strategy names (services/router/strategies.py; a router test keeps them equal).
STRATEGY_NAMES = (
    "round_robin",
    "least_load",
    "response_time",
    "power_of_two",
    "privacy_aware",
    "assignment",
)


def _strategy(value: Any) -> str:
    if value not in STRATEGY_NAMES:
        raise ValueError(f"router_strategy must be one of {', '.join(STRATEGY_NAMES)}")
    return str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError("must be a number in (0, 1]")
    return float(value)


def _latency(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3.6e6:
        raise ValueError("must be a number of milliseconds in [0, 3600000] (0: off)")
    return float(value)


def _cooldown(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86_400:
        raise ValueError("must be a number of seconds in [0, 86400]")
    return float(value)


@dataclass(frozen=True, slots=True)
class ConfigKey:
    """One run-time setting: its validator, default, and the services that apply it."""

    validate: Callable[[Any], Any]
    default: Any
    used_by: tuple[str, ...]
    doc: str


RUNTIME_CONFIG: dict[str, ConfigKey] = {
    "router_strategy": ConfigKey(
        _strategy, None, ("router",), "routing strategy (null: the configured one)"
    ),
    "cache_enabled": ConfigKey(_bool, True, ("gateway",), "serve and store cached DP answers"),
    "breaker_error_rate": ConfigKey(
        _fraction, 0.5, ("router",), "open a node's breaker at this reported error rate"
    ),
    "breaker_latency_ms": ConfigKey(
        _latency, 0.0, ("router",), "open a node's breaker at this EWMA latency (0: off)"
    ),
    "breaker_cooldown_s": ConfigKey(
        _cooldown, 30.0, ("router",), "an automatic breaker stays open at least this long"
    ),
}


def validate_config(key: str, value: Any) -> Any:
    """The validated value for `key`; ValueError with the reason otherwise."""
    spec = RUNTIME_CONFIG.get(key)
    if spec is None:
        raise ValueError(f"unknown setting {key!r}; known: {', '.join(RUNTIME_CONFIG)}")
    if key == "router_strategy" and value is None:
        return None
    try:
        return spec.validate(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


@dataclass(slots=True)
class NodeAdmission:
    """An administrator's view of one hospital: `registered` → `approved` ⇄ `draining`."""

    status: str
    departments: tuple[str, ...] = ()


@dataclass
class ControlState:
    """The fold of every ControlCommand so far. `configured` hospitals start approved."""

    configured: frozenset[str] = frozenset()
    open_admission: bool = False  # settings.node_admission == "open": every node approved
    lockdown: str | None = None  # the reason while locked down
    halted: str | None = None  # the reason while halted
    breakers: dict[str, str] = field(default_factory=dict)  # hospital -> reason (manual)
    nodes: dict[str, NodeAdmission] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    config: dict[str, Any] = field(default_factory=dict)
    applied: int = 0

    @classmethod
    def for_settings(cls, settings: Settings) -> ControlState:
        return cls(
            configured=frozenset(h.id for h in settings.hospitals),
            open_admission=settings.node_admission == "open",
        )

    def setting(self, key: str) -> Any:
        return self.config.get(key, RUNTIME_CONFIG[key].default)

    def admission(self, hospital_id: str) -> str:
        """`approved`, `draining`, `registered`, `removed` or `unknown`."""
        node = self.nodes.get(hospital_id)
        if node is not None:
            return node.status
        if hospital_id in self.removed:
            return "removed"
        if self.open_admission or hospital_id in self.configured:
            return "approved"
        return "unknown"

    def apply(self, record: Mapping[str, Any]) -> None:
        """Fold one command in. Unknown actions or invalid values are skipped (logged): the
        gateway validated them, so one here is from a newer writer."""
        action, target = record["action"], record.get("target", "")
        reason = record.get("reason", "") or action
        self.applied += 1
        if action == "lockdown":
            self.lockdown = reason
        elif action == "unlock":
            self.lockdown = None
        elif action == "halt":
            self.halted = reason
        elif action == "resume":
            self.halted = None
        elif action == "breaker_open":
            self.breakers[target] = reason
        elif action == "breaker_close":
            self.breakers.pop(target, None)
        elif action == "node_register":
            departments = tuple(json.loads(record.get("value") or "[]"))
            self.removed.discard(target)
            current = self.nodes.get(target)
            status = current.status if current is not None else "registered"
            self.nodes[target] = NodeAdmission(status, departments)
        elif action in ("node_approve", "node_drain"):
            self.removed.discard(target)
            current = self.nodes.get(target) or NodeAdmission("registered")
            current.status = "approved" if action == "node_approve" else "draining"
            self.nodes[target] = current
        elif action == "node_remove":
            self.nodes.pop(target, None)
            self.breakers.pop(target, None)
            self.removed.add(target)
        elif action == "config_set":
            try:
                self.config[target] = validate_config(target, json.loads(record["value"]))
            except (ValueError, KeyError) as exc:
                log.warning("control: config_set %s skipped: %s", target, exc)
        else:
            log.warning("control: unknown action %r skipped", action)

    def view(self) -> dict[str, Any]:
        """A public summary (no secrets exist here): for health and the admin console."""
        return {
            "lockdown": self.lockdown is not None,
            "lockdown_reason": self.lockdown or "",
            "halted": self.halted is not None,
            "halted_reason": self.halted or "",
            "open_breakers": dict(sorted(self.breakers.items())),
        }


class ControlFollower:
    """Reads `fedllm.control` from the start into a `ControlState`; `on_command` is called
    after each command is folded in. `start()` returns once the log so far is applied."""

    def __init__(
        self,
        settings: Settings,
        *,
        state: ControlState | None = None,
        on_command: Callable[[ControlCommand], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.state = state if state is not None else ControlState.for_settings(settings)
        self.on_command = on_command
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._seen: set[str] = set()

    async def start(self, *, catch_up_s: float = 10.0) -> None:
        self._consumer = make_consumer(self.settings, group_id=None)
        await self._consumer.start()
        control = topics.scoped(self.settings, topics.CONTROL)
        if not await partitions_of(self._consumer, control, missing_ok=True):
            # an older deployment: create the (small) control topic
            await ensure_topics(self.settings, {topics.CONTROL: topics.PARTITIONS[topics.CONTROL]})
        tps = await assign_all(self._consumer, control, wait_s=5.0)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._catch_up(ends), timeout=catch_up_s)
        self._task = asyncio.create_task(self._run())

    async def _catch_up(self, ends: dict[TopicPartition, int]) -> None:
        while True:
            behind = [tp for tp, end in ends.items() if await self._consumer.position(tp) < end]
            if not behind:
                return
            await self._poll(100)

    async def _run(self) -> None:
        while True:
            try:
                await self._poll(200)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad record must not stop the control plane
                log.warning("control follower: %r", exc)
                await asyncio.sleep(0.5)

    async def _poll(self, timeout_ms: int) -> None:
        batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        for msgs in batch.values():
            for msg in msgs:
                try:
                    record = codec.decode_as(ControlCommand, msg.value, msg.headers)
                except Exception as exc:
                    log.warning("control: undecodable record skipped: %r", exc)
                    continue
                self.apply(record)

    def apply(self, record: ControlCommand) -> None:
        """Fold a command once (a command applied locally is skipped when read back)."""
        if record["command_id"] in self._seen:
            return
        self._seen.add(record["command_id"])
        self.state.apply(record)
        if self.on_command is not None:
            try:
                self.on_command(record)
            except Exception:
                log.exception("control: applying %s failed", record.get("action"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()


async def publish(bus: Bus, record: ControlCommand) -> None:
    """Send one ControlCommand (keyed by target, or the action when it has none)."""
    await bus.send(
        topics.CONTROL, "ControlCommand", record, key=record["target"] or record["action"]
    )
