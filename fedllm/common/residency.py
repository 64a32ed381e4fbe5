"""Data residency: which hospitals' regions a request may be routed to (docs/residency.md).

A hospital's region is configuration (``HospitalConfig.region``), never what a heartbeat
claims. A request may go to the regions allowed for its department
(``Settings.department_regions``) and, when the caller's token names regions (the user's
``regions``, carried on the request as ``allowed_regions``), only to those too: the allowed set
is the intersection. Nothing configured on either side: any region (the behaviour before
residency existed). A hospital without a region is outside every restricted set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedllm.common.config import Settings

__all__ = ["RegionPolicy"]


@dataclass(frozen=True, slots=True)
class RegionPolicy:
    """Pure residency rule over configured hospital and department regions."""

    hospital_region: Mapping[str, str] = field(default_factory=dict)
    department_regions: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> RegionPolicy:
        return cls(
            hospital_region={h.id: h.region for h in settings.hospitals},
            department_regions={
                d: frozenset(r) for d, r in settings.department_regions.items() if r
            },
        )

    def allowed(self, request: Mapping[str, Any]) -> frozenset[str] | None:
        """The regions `request` may be routed to; None: any region."""
        dept = self.department_regions.get(str(request.get("department", "")))
        user = frozenset(request.get("allowed_regions") or ()) or None
        if dept is None:
            return user
        return dept if user is None else dept & user

    def permits(self, request: Mapping[str, Any], hospital_id: str) -> bool:
        allowed = self.allowed(request)
        return allowed is None or self.hospital_region.get(hospital_id, "") in allowed

    def outside(self, request: Mapping[str, Any], hospital_ids: Iterable[str]) -> list[str]:
        """The hospitals among `hospital_ids` that `request` may not use."""
        return [h for h in hospital_ids if h != "*" and not self.permits(request, h)]

    def describe(self, request: Mapping[str, Any]) -> str:
        allowed = self.allowed(request)
        return "any region" if allowed is None else f"regions {sorted(allowed) or '(none)'}"
