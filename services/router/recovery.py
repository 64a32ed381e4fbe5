"""Re-derive the router's in-flight and fan-out state after a restart (pure part + the read).

The router's supervision state is in memory, but everything it is made of is on the broker:
every attempt it started is a `RoutedRequest` on a `hospital.<id>.requests` topic (tagged with
the `fedllm-router` header naming the deployment's routers, `router_id`), and every answer — a
node's, or the router's own verdict — is an `InferenceResult` on `fedllm.node-results`. When a
router is assigned decisions partitions (on start, or when it takes over from a dead replica),
before it routes anything, it reads both from `request_timeout_s` ago:

1. :func:`restore` rebuilds an `InFlight` (latest attempt, every hospital tried) or a `FanOut`
   (all k hospitals; a fan-out whose parts were not all sent before the crash keeps placeholders
   for the unsent ones, so it can never be combined from a subset and fails at its deadline,
   charging the parts that answered) for each request routed whose deadline has not passed;
2. :func:`replay_results` feeds the answers through the dispatcher in offset order: a router
   verdict or combined answer (`fedllm.common.results.result_kind`) ends the request with
   nothing sent; a node's answer does what it would have done live — answered fan-out parts are
   collected and combined once all are in (so they are charged, not refunded), a failed
   attempt is retried, an "ok" closes.

A decision replayed by the group afterwards (sent but not committed before the crash) is then
recognised as in flight and not routed twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from fedllm.common import codec
from fedllm.common.kafka import seek_to_time
from fedllm.schemas.records import InferenceResult, RoutedRequest
from fedllm.services.router.dispatcher import Action, Dispatcher, FanOut, InFlight

log = logging.getLogger(__name__)
R = TypeVar("R")  # a record of fedllm.schemas.records

ROUTER_HEADER = "fedllm-router"
UNSENT = "(unsent part {i}/{k})"


def restore(dispatcher: Dispatcher, routed: Iterable[RoutedRequest], *, now_ms: int) -> int:
    """Rebuild the open entries from the `RoutedRequest`s this router sent; returns how many."""
    by_request: dict[str, list[RoutedRequest]] = {}
    for record in routed:
        by_request.setdefault(record["request_id"], []).append(record)
    restored = 0
    for request_id, records in by_request.items():
        if (
            request_id in dispatcher.in_flight
            or request_id in dispatcher.fan_outs
            or dispatcher.is_finished(request_id)
        ):
            continue
        first = records[0]
        if now_ms >= int(first["request"]["deadline_ms"]):
            continue  # past its deadline: the accountant's sweep ends it
        k = int(first.get("parts") or 1)
        if k > 1:
            named = list(first["request"].get("hospitals") or ())  # the live router's order
            hospitals = sorted(
                {r["hospital_id"] for r in records},
                key=lambda h: (named.index(h) if h in named else len(named), h),
            )
            hospitals += [UNSENT.format(i=i, k=k) for i in range(len(hospitals) + 1, k + 1)]
            dispatcher.fan_outs[request_id] = FanOut(
                request=first["request"].copy(),
                reserved_epsilon=float(first["reserved_epsilon"]),
                reserved_rho=float(first.get("reserved_rho") or 0.0),
                delta=float(first["delta"]),
                hospitals=hospitals,
                deadline_ms=int(first["deadline_ms"]),
                routed_at_ms=int(first["routed_at_ms"]),
            )
        else:
            latest = max(records, key=lambda r: int(r["attempt"]))
            dispatcher.in_flight[request_id] = InFlight(
                request=latest["request"].copy(),
                reserved_epsilon=float(latest["reserved_epsilon"]),
                reserved_rho=float(latest.get("reserved_rho") or 0.0),
                delta=float(latest["delta"]),
                hospital_id=latest["hospital_id"],
                attempt=int(latest["attempt"]),
                attempt_deadline_ms=int(latest["deadline_ms"]),
                tried=list(dict.fromkeys(r["hospital_id"] for r in records)),
                attempt_started_ms=int(latest["routed_at_ms"]),
            )
        restored += 1
    return restored


def replay_results(
    dispatcher: Dispatcher, results: Iterable[InferenceResult], *, now_ms: int
) -> list[Action]:
    """Apply the answers seen since the lookback to the restored entries (in offset order)."""
    actions: list[Action] = []
    for result in results:
        request_id = result["request_id"]
        if request_id not in dispatcher.in_flight and request_id not in dispatcher.fan_outs:
            continue
        actions += dispatcher.on_node_result(result, now_ms=now_ms)
    return actions


async def read_since(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    since_ms: int,
    record_type: type[R],
    *,
    router_id: str | None = None,
) -> list[R]:
    """Decode every `record_type` record on `tps` from `since_ms` up to the ends as of now (in
    offset order per partition); with `router_id`, only those tagged with that router's header.
    Leaves the consumer positioned at those ends."""
    if not tps:
        return []
    span = await seek_to_time(consumer, tps, since_ms)
    ends = {tp: end for tp, (_, end) in span.items()}
    todo = {tp: end for tp, (start, end) in span.items() if start < end}
    out: list[R] = []
    while todo:
        batch = await consumer.getmany(*todo, timeout_ms=500)
        for tp, msgs in batch.items():
            for msg in msgs:
                if msg.offset >= todo.get(tp, 0):
                    continue
                if router_id is not None and _header(msg.headers, ROUTER_HEADER) != router_id:
                    continue
                try:
                    out.append(codec.decode_as(record_type, msg.value, msg.headers))
                except codec.DecodeError as exc:
                    log.warning("recovery skips an undecodable %s: %s", record_type.__name__, exc)
        for tp in list(todo):
            if await consumer.position(tp) >= todo[tp]:
                del todo[tp]
    for tp in tps:  # what was fetched past the ends is for the live loop, not skipped
        consumer.seek(tp, ends[tp])
    return out


def _header(headers: Any, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
