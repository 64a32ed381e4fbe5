"""The federation coordinator: announces rounds, collects (masked) updates by a deadline,
aggregates, persists and publishes each round's result.

A round r, attempt a:

1. ``join`` announcement; each invited hospital pays the round's privacy cost in its own
   ledger first, then answers ``join`` with a fresh X25519 public key, or ``decline``.
2. With at least ``min_participants`` joined, a ``train`` announcement names them and their
   keys; each sends its masked update (chunked) before the deadline.
3. All named updates in: the masks cancel in the sum; FedAvg (sum / n), or a robust rule over
   the plain updates when secure aggregation is off. The new global adapter is written to the
   round store, then published as RoundResult chunks.
4. A named hospital missing at the deadline: the masks cannot cancel, so the attempt is
   aborted and the round restarts (attempt a + 1) without it. The survivors re-send the
   update they already paid for, re-masked under new keys; nobody is charged twice.

A restarted coordinator resumes after the last round in its store (attempts restart at a new,
higher number, so stale messages are ignored).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedllm.common import chunks, secagg
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, make_consumer, make_producer, now_ms
from fedllm.common.lora_model import to_bytes
from fedllm.schemas.records import FlClientUpdate, FlRoundAnnouncement, FlRoundResult
from fedllm.services.federation.aggregation import FedAvg, make_rule
from fedllm.services.federation.config import FederationConfig, topic_names
from fedllm.services.federation.store import RoundStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RoundReport:
    """One line of progress: what the CLI prints after each round."""

    round: int
    attempt: int
    status: str
    participants: list[str]
    train_loss: float
    heldout_loss: float
    update_norm: float
    epsilon_by_hospital: dict[str, float]
    seconds: float
    declined: list[str] = field(default_factory=list)


class Coordinator:
    def __init__(
        self,
        settings: Settings,
        cfg: FederationConfig,
        *,
        store: RoundStore,
        initial: np.ndarray,
        evaluate: Callable[[np.ndarray], float] | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = cfg
        self.store = store
        self.initial = np.asarray(initial, dtype=np.float32)
        self.evaluate = evaluate
        self.on_round = on_round
        self.rounds_topic, self.updates_topic, self.results_topic = topic_names(cfg.topic_prefix)
        self.reports: list[RoundReport] = []

    # ------------------------------------------------------------------ messages
    def _announcement(
        self, round_no: int, attempt: int, phase: str, deadline_ms: int, parts: dict[str, bytes]
    ) -> FlRoundAnnouncement:
        c = self.cfg
        return {
            "federation_id": c.federation_id,
            "round": round_no,
            "attempt": attempt,
            "phase": phase,
            "deadline_ms": deadline_ms,
            "participants": [{"hospital_id": h, "public_key": k} for h, k in sorted(parts.items())],
            "local_steps": c.local_steps,
            "sample_rate": c.sample_rate,
            "noise_multiplier": c.noise_multiplier,
            "clip_norm": c.clip_norm,
            "learning_rate": c.learning_rate,
            "prox_mu": c.prox_mu,
            "update_clip": c.update_clip,
            "secure": c.secure,
            "lora_rank": c.lora_rank,
            "seq_len": c.seq_len,
            "seed": c.seed,
            "sent_at_ms": now_ms(),
        }

    async def _publish_result(
        self,
        bus: Bus,
        round_no: int,
        attempt: int,
        status: str,
        fields: dict[str, Any],
        vec: np.ndarray,
    ) -> None:
        data = to_bytes(vec)
        parts = chunks.split(data)
        for i, part in enumerate(parts):
            record: FlRoundResult = {
                "federation_id": self.cfg.federation_id,
                "round": round_no,
                "attempt": attempt,
                "status": status,
                "participants": list(fields.get("participants", [])),
                "chunk_index": i,
                "chunk_count": len(parts),
                "payload": part,
                "adapter_hash": hashlib.sha256(data).hexdigest(),
                "update_norm": float(fields.get("update_norm", 0.0)),
                "heldout_loss": float(fields.get("heldout_loss", -1.0)),
                "epsilon_by_hospital": dict(fields.get("epsilon_by_hospital", {})),
                "sent_at_ms": now_ms(),
            }
            await bus.send(self.results_topic, "FlRoundResult", record, key=self.cfg.federation_id)

    # ------------------------------------------------------------------ collection
    async def _collect(
        self, consumer: Any, deadline_ms: int, done: Callable[[FlClientUpdate], bool]
    ) -> None:
        """Feed decoded updates of this federation to ``done`` until it says so or the deadline."""
        from fedllm.common import codec

        while now_ms() < deadline_ms:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                for m in msgs:
                    try:
                        rec = codec.decode_as(FlClientUpdate, m.value, m.headers)
                    except codec.DecodeError as exc:
                        log.warning("ignored undecodable update: %s", exc)
                        continue
                    if rec["federation_id"] == self.cfg.federation_id and done(rec):
                        return

    # ------------------------------------------------------------------ one attempt
    async def _attempt(
        self,
        bus: Bus,
        consumer: Any,
        round_no: int,
        attempt: int,
        invited: set[str],
        global_vec: np.ndarray,
    ) -> tuple[str, Any]:
        c = self.cfg
        deadline = now_ms() + int(c.join_timeout_s * 1000)
        await bus.send(
            self.rounds_topic,
            "FlRoundAnnouncement",
            self._announcement(round_no, attempt, "join", deadline, {}),
            key=c.federation_id,
        )
        keys: dict[str, bytes] = {}
        declined: set[str] = set()
        eps: dict[str, float] = {}

        def on_join(rec: FlClientUpdate) -> bool:
            if rec["round"] != round_no or rec["attempt"] != attempt:
                return False
            h = rec["hospital_id"]
            if h not in invited:
                return False
            if rec["kind"] == "join":
                keys[h] = bytes(rec["public_key"])
                eps[h] = float(rec["epsilon_spent"])
            elif rec["kind"] == "decline":
                declined.add(h)
            return len(keys) + len(declined) >= len(invited)

        await self._collect(consumer, deadline, on_join)
        if len(keys) < c.min_participants:
            return "too_few", (sorted(keys), sorted(declined), eps)
        deadline = now_ms() + int(c.round_deadline_s * 1000)
        await bus.send(
            self.rounds_topic,
            "FlRoundAnnouncement",
            self._announcement(
                round_no, attempt, "train", deadline, keys if c.secure else dict.fromkeys(keys, b"")
            ),
            key=c.federation_id,
        )
        asm = chunks.Assembler()
        got: dict[str, np.ndarray] = {}
        losses: dict[str, float] = {}

        def on_update(rec: FlClientUpdate) -> bool:
            if rec["round"] != round_no or rec["attempt"] != attempt or rec["kind"] != "update":
                return False
            h = rec["hospital_id"]
            if h not in keys or h in got:
                return False
            whole = asm.add(h, rec["chunk_index"], rec["chunk_count"], bytes(rec["payload"]))
            if whole is not None:
                got[h] = np.frombuffer(whole, dtype="<u8" if c.secure else "<f8").copy()
                eps[h] = float(rec["epsilon_spent"])
                if rec["train_loss"] >= 0:
                    losses[h] = float(rec["train_loss"])
            return len(got) == len(keys)

        await self._collect(consumer, deadline, on_update)
        missing = sorted(set(keys) - set(got))
        if missing:
            return "dropout", (missing, sorted(declined), eps)
        names = sorted(got)
        if c.secure:
            total = secagg.decode_fixed(secagg.sum_masked([got[h] for h in names]))
            agg = FedAvg.from_sum(total, participants=len(names))
        else:
            agg = make_rule(c.rule).aggregate([got[h] for h in names])
        loss = float(np.mean(list(losses.values()))) if losses else -1.0
        return "aggregated", (names, sorted(declined), eps, agg, loss)

    # ------------------------------------------------------------------ the loop
    async def run(self) -> list[RoundReport]:
        c = self.cfg
        last = self.store.last(c.federation_id)
        global_vec = self.initial.copy() if last is None else last.global_vector
        start_round = 1 if last is None else last.round + 1
        # a restart uses attempt numbers above any an earlier process may have announced
        attempt_base = (now_ms() // 1000) % 1_000_000 * 10 if last is not None else 0
        producer = make_producer(self.settings, max_request_size=2 * chunks.CHUNK_BYTES)
        # from the earliest offset: stale answers are filtered by (federation, round, attempt),
        # and no join is lost to a consumer assigned after the announcement went out
        consumer = make_consumer(
            self.settings,
            self.updates_topic,
            group_id=None,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * chunks.CHUNK_BYTES,
        )
        await producer.start()
        await consumer.start()
        try:
            bus = Bus(producer, self.settings.topic_namespace)
            done = last is not None and last.status in ("converged", "finished", "stopped")
            round_no = start_round
            while not done and round_no <= c.max_rounds:
                t0 = time.monotonic()
                invited = set(c.hospitals)
                attempt = attempt_base
                while True:
                    status, info = await self._attempt(
                        bus, consumer, round_no, attempt, invited, global_vec
                    )
                    if status != "dropout":
                        break
                    log.warning(
                        "round %d attempt %d: %s missed the deadline; restarting without them",
                        round_no,
                        attempt,
                        info[0],
                    )
                    invited -= set(info[0])
                    attempt += 1
                if status == "too_few":
                    joined, declined, eps = info
                    fields = {
                        "participants": joined,
                        "epsilon_by_hospital": eps,
                        "update_norm": 0.0,
                        "heldout_loss": -1.0,
                        "declined": declined,
                    }
                    stored = self.store.close_round(
                        c.federation_id,
                        round_no,
                        attempt=attempt,
                        status="stopped",
                        fields=fields,
                        global_vector=global_vec,
                    )
                    await self._publish_result(
                        bus,
                        round_no,
                        stored.attempt,
                        "stopped",
                        stored.fields,
                        stored.global_vector,
                    )
                    self._report(round_no, attempt, "stopped", stored.fields, t0)
                    break
                names, declined, eps, agg, train_loss = info
                new_vec = (global_vec.astype(np.float64) + agg).astype(np.float32)
                norm = float(np.linalg.norm(agg))
                held = (
                    float(await asyncio.to_thread(self.evaluate, new_vec))
                    if self.evaluate
                    else -1.0
                )
                converged = c.convergence_threshold > 0 and norm < c.convergence_threshold
                status = (
                    "converged"
                    if converged
                    else ("finished" if round_no == c.max_rounds else "aggregated")
                )
                fields = {
                    "participants": names,
                    "epsilon_by_hospital": eps,
                    "update_norm": norm,
                    "heldout_loss": held,
                    "train_loss": train_loss,
                    "declined": declined,
                }
                stored = self.store.close_round(
                    c.federation_id,
                    round_no,
                    attempt=attempt,
                    status=status,
                    fields=fields,
                    global_vector=new_vec,
                )
                await self._publish_result(
                    bus,
                    round_no,
                    stored.attempt,
                    stored.status,
                    stored.fields,
                    stored.global_vector,
                )
                global_vec = stored.global_vector
                self._report(round_no, attempt, stored.status, stored.fields, t0)
                done = stored.status in ("converged", "finished")
                round_no += 1
            await bus.send(
                self.rounds_topic,
                "FlRoundAnnouncement",
                self._announcement(round_no, 0, "stop", now_ms() + 60_000, {}),
                key=c.federation_id,
            )
        finally:
            await consumer.stop()
            await producer.stop()
        return self.reports

    def _report(
        self, round_no: int, attempt: int, status: str, fields: dict[str, Any], t0: float
    ) -> None:
        r = RoundReport(
            round=round_no,
            attempt=attempt,
            status=status,
            participants=list(fields.get("participants", [])),
            train_loss=float(fields.get("train_loss", float("nan"))),
            heldout_loss=float(fields.get("heldout_loss", -1.0)),
            update_norm=float(fields.get("update_norm", 0.0)),
            epsilon_by_hospital=dict(fields.get("epsilon_by_hospital", {})),
            seconds=time.monotonic() - t0,
            declined=list(fields.get("declined", [])),
        )
        self.reports.append(r)
        if self.on_round:
            self.on_round(r)
