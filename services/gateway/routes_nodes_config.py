"""Node admission and run-time configuration (admin only, audited, via `fedllm.control`).

- `POST /v1/admin/nodes` registers, approves, drains or removes a hospital node. The router
  ignores (and audits) heartbeats from nodes that are not approved; configured hospitals start
  approved (`node_admission: configured`).
- `PUT /v1/admin/config` validates and applies run-time settings (`RUNTIME_CONFIG` in
  fedllm/common/control.py) in the services that use them; each change is audited with its old
  and new value. Only whitelisted, non-secret settings can be changed here.
"""

# No `from __future__ import annotations`: FastAPI must see the body models.

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from fedllm.common import control
from fedllm.services.gateway import control_plane
from fedllm.services.gateway.bodies import ErrorBody
from fedllm.services.gateway.deps import State
from fedllm.services.gateway.routes_admin import AUTH_RESPONSES, AdminPrincipal
from fedllm.services.gateway.routes_emergency import HOSPITAL_ID

DEPARTMENT = r"^[a-z][a-z0-9_-]{0,63}$"


class NodeCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    action: Literal["register", "approve", "drain", "remove"]
    hospital_id: str = Field(pattern=HOSPITAL_ID)
    # The departments a registered node will serve (used by `register`, ignored otherwise).
    departments: list[Annotated[str, Field(pattern=DEPARTMENT)]] = Field(
        default_factory=list, max_length=64
    )
    reason: str = Field(min_length=3, max_length=500)


class NodeAdmissionView(BaseModel):
    hospital_id: str
    status: str  # approved | draining | registered | removed | unknown
    configured: bool
    departments: list[str]


class RuntimeSettings(BaseModel):
    """The settings to change (at least one); null resets one to its default."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1})
    router_strategy: Literal[control.STRATEGY_NAMES] | None = None  # type: ignore[valid-type]
    cache_enabled: bool | None = None
    breaker_error_rate: float | None = Field(None, gt=0, le=1)
    breaker_latency_ms: float | None = Field(None, ge=0, le=3_600_000)
    breaker_cooldown_s: float | None = Field(None, ge=0, le=86_400)


class ConfigChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    settings: RuntimeSettings
    reason: str = Field(min_length=3, max_length=500)


class RuntimeSetting(BaseModel):
    value: Any
    default: Any
    used_by: list[str]
    doc: str


class ConfigApplied(BaseModel):
    changed: dict[str, Any]
    runtime: dict[str, RuntimeSetting]


_TRANSITIONS = {  # action -> statuses it may start from
    "register": ("unknown", "removed", "registered"),
    "approve": ("registered", "draining", "approved"),
    "drain": ("approved",),
    "remove": ("registered", "approved", "draining"),
}


def admissions(state: control.ControlState) -> list[NodeAdmissionView]:
    ids = sorted(set(state.configured) | set(state.nodes) | state.removed)
    return [
        NodeAdmissionView(
            hospital_id=h,
            status=state.admission(h),
            configured=h in state.configured,
            departments=list(state.nodes[h].departments) if h in state.nodes else [],
        )
        for h in ids
    ]


def runtime_view(state: control.ControlState) -> dict[str, RuntimeSetting]:
    return {
        key: RuntimeSetting(
            value=state.setting(key), default=spec.default, used_by=list(spec.used_by), doc=spec.doc
        )
        for key, spec in control.RUNTIME_CONFIG.items()
    }


def build_router() -> APIRouter:
    router = APIRouter(tags=["admin"])
    responses = {
        **AUTH_RESPONSES,
        400: {"model": ErrorBody, "description": "body is not parseable, or no setting given"},
        409: {"model": ErrorBody, "description": "not allowed from the node's current status"},
        503: {"model": ErrorBody, "description": "broker unavailable"},
    }

    @router.get(
        "/v1/admin/nodes/admission",
        response_model=list[NodeAdmissionView],
        responses=AUTH_RESPONSES,
    )
    async def list_admissions(state: State, principal: AdminPrincipal) -> list[NodeAdmissionView]:
        """Every hospital the control plane knows, with its admission status."""
        return admissions(control_plane.control_state(state))

    @router.post("/v1/admin/nodes", response_model=NodeAdmissionView, responses=responses)
    async def node_command(
        request: Request, state: State, principal: AdminPrincipal, body: NodeCommand
    ) -> NodeAdmissionView:
        """Register, approve, drain or remove a hospital node."""
        current = control_plane.control_state(state)
        status = current.admission(body.hospital_id)
        if status not in _TRANSITIONS[body.action]:
            raise HTTPException(409, f"cannot {body.action} a node that is {status}")
        await control_plane.issue(
            state,
            request,
            principal,
            action=f"node_{body.action}",
            target=body.hospital_id,
            value=body.departments if body.action == "register" else None,
            reason=body.reason,
            previous_status=status,
        )
        view = {v.hospital_id: v for v in admissions(current)}
        return view[body.hospital_id]

    @router.get(
        "/v1/admin/config/runtime",
        response_model=dict[str, RuntimeSetting],
        responses=AUTH_RESPONSES,
    )
    async def read_runtime(state: State, principal: AdminPrincipal) -> dict[str, RuntimeSetting]:
        """The settings PUT /v1/admin/config may change, with their current values."""
        return runtime_view(control_plane.control_state(state))

    @router.put(
        "/v1/admin/config",
        response_model=ConfigApplied,
        responses={
            **responses,
            422: {"description": "unknown setting or invalid value"},
        },
    )
    async def change_config(
        request: Request, state: State, principal: AdminPrincipal, body: ConfigChange
    ) -> ConfigApplied:
        """Validate all the changes, then apply each through `fedllm.control`; every change
        is audited with its old and new value."""
        current = control_plane.control_state(state)
        given = body.settings.model_fields_set
        if not given:
            raise HTTPException(400, "no setting to change")
        validated: dict[str, Any] = {}
        for key in sorted(given):
            value = getattr(body.settings, key)
            validated[key] = (
                control.RUNTIME_CONFIG[key].default
                if value is None and key != "router_strategy"
                else control.validate_config(key, value)
            )
        changed: dict[str, Any] = {}
        for key, value in validated.items():
            old = current.setting(key)
            if old == value:
                continue
            await control_plane.issue(
                state,
                request,
                principal,
                action="config_set",
                target=key,
                value=value,
                reason=body.reason,
                old_value=json.dumps(old),
                new_value=json.dumps(value),
            )
            changed[key] = value
        return ConfigApplied(changed=changed, runtime=runtime_view(current))

    return router
