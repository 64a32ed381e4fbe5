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
import re
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from fedllm.common import control
from fedllm.services.gateway import control_plane
from fedllm.services.gateway.deps import State
from fedllm.services.gateway.models import ErrorBody
from fedllm.services.gateway.routes_admin import AUTH_RESPONSES, AdminPrincipal
from fedllm.services.gateway.routes_emergency import HOSPITAL_ID

DEPARTMENT = r"^[a-z][a-z0-9_-]{0,63}$"


class NodeCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["register", "approve", "drain", "remove"]
    hospital_id: str = Field(pattern=HOSPITAL_ID)
    departments: list[str] = Field(default_factory=list, max_length=64)
    reason: str = Field(min_length=3, max_length=500)


class NodeAdmissionView(BaseModel):
    hospital_id: str
    status: str  # approved | draining | registered | removed | unknown
    configured: bool
    departments: list[str]


class ConfigChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    settings: dict[str, Any] = Field(min_length=1, max_length=len(control.RUNTIME_CONFIG))
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
        bad = [d for d in body.departments if not re.fullmatch(DEPARTMENT, d)]
        if bad:
            raise HTTPException(422, f"invalid department names: {', '.join(map(repr, bad))}")
        if body.departments and body.action != "register":
            raise HTTPException(422, "departments go with action register only")
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
        responses={**responses, 422: {"description": "unknown setting or invalid value"}},
    )
    async def change_config(
        request: Request, state: State, principal: AdminPrincipal, body: ConfigChange
    ) -> ConfigApplied:
        """Validate all the changes, then apply each through `fedllm.control`; every change
        is audited with its old and new value."""
        current = control_plane.control_state(state)
        validated: dict[str, Any] = {}
        for key, value in body.settings.items():
            try:
                validated[key] = control.validate_config(key, value)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
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
