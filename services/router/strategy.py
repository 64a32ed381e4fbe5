"""The routing-strategy interface: pick one node for a request, or None.

Strategies are pure and live one per module (like Flower's `flwr/server/strategy/`), so a new
policy is a new file, not a branch in the service.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.router.registry import NodeInfo


@dataclass(frozen=True, slots=True)
class Choice:
    """The chosen node and why (the reason goes into the audit trail)."""

    node: NodeInfo
    reason: str


class RoutingStrategy(Protocol):
    """Choose a node for `request` (an InferenceRequest record) among `nodes`."""

    def choose(
        self,
        request: Mapping[str, Any],
        nodes: Sequence[NodeInfo],
        *,
        exclude: Collection[str] = (),
    ) -> Choice | None:
        """A node not in `exclude`, or None when nothing is eligible."""
        ...
