"""The zCDP ρ a routed request lets this node spend: the one place it is worked out.

The accountant reserves the curve ρ·α for a query of budget (ε, δ) and sends its ρ along
(``BudgetDecision.reserved_rho`` → ``RoutedRequest.reserved_rho``); a fan-out part may spend
``budget_share`` of it. A record from a writer that predates the field carries 0, and only then
is ρ derived here from the reserved ε at δ, as the accountant derives it
(:meth:`fedllm.privacy.accountant.RdpAccountant.query_rho`). That the carried ρ stays within
the signed ε is checked with the grant (:func:`fedllm.common.grants.grant_refusal`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon


def reservation_rho(
    *,
    reserved_rho: float,
    epsilon: float,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """The request's whole reserved ρ: ``reserved_rho``, or for a legacy record (0) the largest
    ρ whose curve ρ·α converts to ≤ ``epsilon`` at ``delta``. Raises ``ValueError`` on a
    negative or non-finite ``reserved_rho``."""
    if not (math.isfinite(reserved_rho) and reserved_rho >= 0):
        raise ValueError(f"reserved rho must be finite and >= 0; got {reserved_rho}")
    if reserved_rho > 0:
        return reserved_rho
    return rho_for_epsilon(epsilon=epsilon, delta=delta, orders=orders)
