"""Worst-case privacy loss of any one person per year under the configured node policy.

Each hospital's node charges every person whose records can affect a release the query's whole
zCDP ρ and drops the person once the next query would pass their cap (services/node_worker/
ledger.py); the hospital's data set as a whole also has a lifetime ρ cap. Neither refreshes, so
a year's loss is bounded by the lifetime loss. A person may be treated at several hospitals and
no shared identifier links them, so the losses at the hospitals add up (sequential composition):

    ρ_person ≤ Σ_hospitals min(ρ(person_epsilon), ρ(lifetime_epsilon)),
    ε(δ) = min over orders α of the RDP→(ε,δ) conversion of the curve ρ_person·α.

    python scripts/patient_loss.py            # the configured policy (FEDLLM_CONFIG, env)
"""

from __future__ import annotations

import sys

from fedllm.common.config import Settings
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.node_worker.settings import NodeSettings


def worst_case(settings: Settings, node: NodeSettings) -> tuple[float, float, float, int]:
    """(ρ per person in total, ε at the node δ, δ, hospitals)."""
    delta = node.delta
    per_hospital = min(
        rho_for_epsilon(epsilon=node.person_epsilon, delta=delta),
        rho_for_epsilon(epsilon=node.lifetime_epsilon, delta=delta),
    )
    k = len(settings.hospitals)
    rho = k * per_hospital
    return rho, PrivacyCurve.from_rho(rho).epsilon(delta=delta), delta, k


def main() -> int:
    settings, node = Settings(), NodeSettings()
    rho, eps, delta, k = worst_case(settings, node)
    print(
        f"policy: person cap eps={node.person_epsilon:g}, hospital lifetime eps="
        f"{node.lifetime_epsilon:g}, per-query cap eps={node.max_query_epsilon:g}, "
        f"delta={delta:g} (each as eps at delta of a zCDP rho; no refresh, no reset)"
    )
    print(f"hospitals a person may be treated at: {k}")
    print(
        f"worst-case loss of one person per year (= lifetime): rho={rho:.4f}, "
        f"eps={eps:.2f} at delta={delta:g}"
    )
    print(f"at one hospital only: eps={PrivacyCurve.from_rho(rho / k).epsilon(delta=delta):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
