"""No body gets a 5xx: fuzz beyond the schema (hypothesis).

Bodies a JSON parser accepts but the schema refuses — NaN/Infinity, lone surrogates, huge
integers, deep nesting, wrong types in nested fields, unknown keys — and aggregate prompts the
nodes' grammar refuses. The fuzzed caller's rate-limit window is filled before the run, so a
body that passes every check is answered 429 (never sent to the pipeline, never charged); every
other body must be refused with a 4xx too.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from fedllm.services.gateway.ratelimit import Window
from fedllm.services.gateway.settings import GatewaySettings
from tests.gateway.peers import running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

USER = "fuzz-user"
BASE = {"prompt": "hello", "max_tokens": 16, "temperature": 0.5, "privacy_budget": 1.0}

# JSON text pieces a JSON parser (Python's, FastAPI's) accepts
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),  # includes lone surrogates
    st.sampled_from(["count", "sum", "mean", "histogram", "age", "diagnosis", "F", "\ud800"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_query_keys = st.sampled_from(["op", "field", "where", "bounds", "top", "max_per_patient"])
_where_keys = st.sampled_from(["diagnosis", "medication", "age_min", "age_max", "sex", "zz"])
QUERIES = st.fixed_dictionaries(
    {"op": st.sampled_from(["count", "sum", "mean", "histogram", "max"]) | VALUES},
    optional={
        "field": st.sampled_from(["age", "encounters", "diagnosis", "medication"]) | VALUES,
        "where": st.dictionaries(_where_keys, VALUES, max_size=3) | VALUES,
        "bounds": st.lists(SCALARS, max_size=3) | VALUES,
        "top": VALUES,
        "max_per_patient": VALUES,
    },
) | st.dictionaries(_query_keys, VALUES, max_size=4)


def _dump(obj: object) -> bytes:
    """JSON text with NaN/Infinity literals and lone surrogates escaped (as a client may send)."""
    return json.dumps(obj, allow_nan=True).encode()


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "privacy_budget": 1.0}'


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field", "extra", "aggregate", "raw", "deep"]))
    if kind == "field":  # one field of a good body replaced by anything
        key = draw(st.sampled_from([*BASE, "priority", "kind", "hospitals", "department"]))
        return _dump({**BASE, key: draw(VALUES)})
    if kind == "extra":
        return _dump({**BASE, draw(st.text(max_size=8)): draw(VALUES)})
    if kind == "aggregate":  # the prompt is a (fuzzed) aggregate query
        prompt = draw(QUERIES.map(lambda q: json.dumps(q, allow_nan=True)) | st.text(max_size=30))
        return _dump({**BASE, "kind": "aggregate", "prompt": prompt})
    if kind == "deep":
        return _nested(draw(st.integers(min_value=1, max_value=100_000)))
    return _dump(draw(VALUES))


@pytest.fixture(scope="module")
async def fuzz_client(settings):
    gw = GatewaySettings(rate_limit_user=1, rate_window_s=3600)
    async with running_gateway(settings, gateway_settings=gw, request_timeout_s=0.3) as (app, c):
        state = app.state.gateway
        await state.limiter.hit([Window(f"{gw.redis_prefix}:rl:user:{USER}", 1, 3600)])
        yield c


async def test_fuzzed_bodies_never_get_a_5xx(fuzz_client, settings):
    headers = {**token(settings, USER), "content-type": "application/json"}
    seen: dict[int, int] = {}

    @hyp_settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=bodies())
    def run(body: bytes) -> None:
        bodies_seen.append(body)

    bodies_seen: list[bytes] = []
    run()
    for body in bodies_seen:
        r = await fuzz_client.post("/v1/inference", content=body, headers=headers)
        assert r.status_code < 500, (body[:300], r.status_code, r.text[:300])
        r.json()  # always renderable JSON
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert seen.get(422, 0) > 0 and seen.get(429, 0) > 0, seen  # both paths were exercised


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"op": "max"}, "unknown op"),
        ({"op": "sum", "field": ["age"]}, "field must be a string"),
        ({"op": "sum", "field": "age", "bounds": [0, 10**400]}, "bounds"),
        ({"op": "count", "where": {"age_min": 10**400}}, "age_min"),
        ({"op": "count", "where": {"sex": {"F": 1}}}, "where.sex"),
        ({"op": "count", "colour": "red"}, "unknown query key"),
    ],
)
async def test_bad_aggregate_query_is_422_before_the_pipeline(
    fuzz_client, settings, query, message
):
    """The node's grammar, at the gateway: refused with its message, nothing sent or charged."""
    body = {**BASE, "kind": "aggregate", "prompt": json.dumps(query)}
    r = await fuzz_client.post("/v1/inference", json=body, headers=token(settings, "agg-user"))
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("invalid aggregate query") and message in r.text


async def test_good_aggregate_query_passes_validation(fuzz_client, settings):
    body = {**BASE, "kind": "aggregate", "prompt": json.dumps({"op": "count"})}
    r = await fuzz_client.post("/v1/inference", json=body, headers=token(settings, USER))
    assert r.status_code == 429  # past validation: only the filled rate limit stops it
