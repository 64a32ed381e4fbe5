"""Data residency: a request is never routed outside its allowed regions, fan-out included."""

from __future__ import annotations

import json
from typing import Any

from fedllm.common import topics
from fedllm.common.config import HospitalConfig, Settings
from fedllm.common.residency import RegionPolicy
from fedllm.services.router.dispatcher import Dispatcher, Send
from fedllm.services.router.least_load import DepartmentLeastLoad
from fedllm.services.router.registry import NodeRegistry
from tests.router.helpers import decision, heartbeat, request

SETTINGS = Settings(
    hospitals=[
        HospitalConfig(id="eu1", departments=["cardiology"], region="EU"),
        HospitalConfig(id="eu2", departments=["cardiology"], region="EU"),
        HospitalConfig(id="us1", departments=["cardiology"], region="US"),
        HospitalConfig(id="none", departments=["cardiology"]),
    ],
    department_regions={"cardiology": ["EU"], "oncology": []},
)


def make(*, loaded: tuple[str, ...] = ()) -> Dispatcher:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=5.0),
        strategy=DepartmentLeastLoad(),
        node_timeout_s=60.0,
        regions=RegionPolicy.from_settings(SETTINGS),
    )
    for h in ("eu1", "eu2", "us1", "none"):
        depth = 50 if h in loaded else 0
        d.on_heartbeat(
            heartbeat(h, departments=("cardiology", "general"), queue_depth=depth, sent_at_ms=0),
            now_ms=0,
        )
    return d


def req(rid: str, **kw: Any) -> dict[str, Any]:
    r = request(rid, department=kw.pop("department", "cardiology"), created_ms=0, deadline_ms=9e9)
    r.update(kw)
    return r


def routed_to(actions: list) -> list[str]:
    return [
        a.record["hospital_id"]
        for a in actions
        if isinstance(a, Send) and a.topic.startswith("hospital.") and a.topic.endswith(".requests")
    ]


def failure(actions: list) -> dict[str, Any]:
    (f,) = [a.record for a in actions if isinstance(a, Send) and a.topic == topics.NODE_RESULTS]
    return f


def test_policy_intersects_department_and_user_regions() -> None:
    p = RegionPolicy.from_settings(SETTINGS)
    assert p.allowed({"department": "cardiology"}) == {"EU"}
    assert p.allowed({"department": "cardiology", "allowed_regions": ["US"]}) == frozenset()
    assert p.allowed({"department": "oncology"}) is None  # empty list: any region
    assert p.allowed({"department": "general", "allowed_regions": ["US"]}) == {"US"}
    assert not p.permits({"department": "cardiology"}, "none")  # no region: never restricted
    assert RegionPolicy().allowed({"department": "cardiology"}) is None  # default: unchanged


def test_eu_department_only_ever_reaches_eu_nodes_even_when_they_are_busy() -> None:
    d = make(loaded=("eu1", "eu2"))  # the idle nodes are US and unlabelled
    targets = [
        routed_to(d.on_decision(decision(req(f"r{i}"), at_ms=1), now_ms=1))[0] for i in range(6)
    ]
    assert set(targets) <= {"eu1", "eu2"}
    other = make(loaded=("eu1", "eu2"))
    general = req("g", department="general")  # unrestricted department: the idle nodes win
    assert routed_to(other.on_decision(decision(general, at_ms=1), now_ms=1))[0] in {"us1", "none"}


def test_no_node_in_the_allowed_regions_fails_with_the_reason_never_elsewhere() -> None:
    d = make()
    actions = d.on_decision(decision(req("r", allowed_regions=["US"]), at_ms=1), now_ms=1)
    assert routed_to(actions) == []  # EU ∩ US is empty: nothing is eligible
    f = failure(actions)
    assert f["status"] == "failed" and "data residency" in f["reason"]


def test_retry_stays_in_region() -> None:
    d = make()
    (first,) = routed_to(d.on_decision(decision(req("r"), at_ms=1), now_ms=1))
    actions = d.on_node_result(
        {"request_id": "r", "status": "failed", "node_id": first, "attempt": 1, "reason": "x"},
        now_ms=2,
    )
    assert routed_to(actions) == [({"eu1", "eu2"} - {first}).pop()]


def _agg(rid: str, hospitals: tuple[str, ...]) -> dict[str, Any]:
    return req(rid, kind="aggregate", hospitals=list(hospitals), prompt=json.dumps({"op": "count"}))


def test_fan_out_star_goes_to_allowed_regions_only() -> None:
    d = make()
    assert sorted(routed_to(d.on_decision(decision(_agg("f", ("*",)), at_ms=1), now_ms=1))) == [
        "eu1",
        "eu2",
    ]


def test_explicit_fan_out_outside_the_region_fails_whole() -> None:
    d = make()
    actions = d.on_decision(decision(_agg("f", ("eu1", "us1")), at_ms=1), now_ms=1)
    assert routed_to(actions) == []
    assert "data residency: us1" in failure(actions)["reason"]
