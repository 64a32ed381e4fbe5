"""A hospital's federated trainer: answers round announcements over Kafka.

``join``: pay the round's privacy cost in the hospital's ledger (lifetime budget and every
eligible patient's filter) **before** anything is trained; a hospital that cannot pay answers
``decline`` and leaves the round. ``train``: train (or reload the update already trained and
paid for this round), clip it, mask it for the named participants, send it in chunks. Results
are replayed from the results topic, so a restarted trainer rebuilds the global adapter.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import numpy as np
import torch

from fedllm.common import chunks, codec, secagg, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, make_consumer, make_producer, now_ms
from fedllm.common.lora_model import AdaptedModel, from_bytes, get_vector, set_vector
from fedllm.privacy import DEFAULT_ORDERS, eps_from_rdp
from fedllm.privacy.dpsgd import dominating_rho, dp_sgd_rdp
from fedllm.schemas.records import FlRoundAnnouncement, FlRoundResult
from fedllm.services.trainer.dp_lora import DpSgdConfig, PatientDpSgd, clip_update
from fedllm.services.trainer.ledger import TrainerLedger

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        settings: Settings,
        *,
        hospital_id: str,
        federation_id: str,
        ledger: TrainerLedger,
        adapted: AdaptedModel,
        rows: dict[str, torch.Tensor],
        delta: float,
        topic_prefix: str = "",
        report_train_loss: bool = False,
    ) -> None:
        self.settings = settings
        self.hospital_id = hospital_id
        self.federation_id = federation_id
        self.ledger = ledger
        self.adapted = adapted
        self.rows = rows
        self.delta = delta
        self.report_train_loss = report_train_loss
        self.rounds_topic = topic_prefix + topics.FL_ROUNDS
        self.updates_topic = topic_prefix + topics.FL_UPDATES
        self.results_topic = topic_prefix + topics.FL_RESULTS
        self.initial = get_vector(adapted.model)
        self.global_round = 0
        self.global_vec = self.initial.copy()
        self.keys: dict[tuple[int, int], secagg.KeyPair] = {}
        self.sgd = PatientDpSgd(adapted.model, pad_id=adapted.pad_id)
        self._results = chunks.Assembler()
        self._pending: list[FlRoundAnnouncement] = []
        self.stopped = False

    def epsilon_spent(self) -> float:
        rdp = self.ledger.training_rdp()
        return (
            0.0
            if rdp is None
            else eps_from_rdp(orders=DEFAULT_ORDERS, rdp=rdp, delta=self.delta)[0]
        )

    # ------------------------------------------------------------------ results
    def _on_result(self, rec: FlRoundResult) -> None:
        whole = self._results.add(
            rec["round"], rec["chunk_index"], rec["chunk_count"], bytes(rec["payload"])
        )
        if whole is not None and rec["round"] > self.global_round:
            self.global_round = rec["round"]
            self.global_vec = from_bytes(whole)
            if rec["status"] in ("converged", "finished", "stopped"):
                self.stopped = True

    # ------------------------------------------------------------------ announcements
    async def _send(self, bus: Bus, ann: FlRoundAnnouncement, kind: str, **fields: Any) -> None:
        rec = {
            "federation_id": self.federation_id,
            "round": ann["round"],
            "attempt": ann["attempt"],
            "hospital_id": self.hospital_id,
            "kind": kind,
            "epsilon_spent": self.epsilon_spent(),
            "sent_at_ms": now_ms(),
            "public_key": b"",
            "payload": b"",
            **fields,
        }
        await bus.send(self.updates_topic, "FlClientUpdate", rec, key=self.federation_id)

    async def _join(self, bus: Bus, ann: FlRoundAnnouncement) -> None:
        rdp = dp_sgd_rdp(
            sample_rate=ann["sample_rate"],
            noise_multiplier=ann["noise_multiplier"],
            steps=ann["local_steps"],
        )
        rho = dominating_rho(rdp=rdp)
        charge = self.ledger.charge_round(
            self.federation_id, ann["round"], rho=rho, rdp=rdp, persons=sorted(self.rows)
        )
        if charge is None:
            log.info(
                "%s declines round %d: the lifetime budget cannot pay ρ=%.4g",
                self.hospital_id,
                ann["round"],
                rho,
            )
            await self._send(bus, ann, "decline")
            return
        kp = secagg.new_keypair()
        self.keys[(ann["round"], ann["attempt"])] = kp
        await self._send(bus, ann, "join", public_key=kp.public)

    def _train(self, ann: FlRoundAnnouncement) -> tuple[np.ndarray, float]:
        charge = self.ledger.lookup(self.federation_id, ann["round"])
        assert charge is not None  # join charged it
        if charge.update is not None:  # paid and trained before (restart): send the same update
            return charge.update, float(
                charge.train_loss if charge.train_loss is not None else -1.0
            )
        set_vector(self.adapted.model, self.global_vec)
        cfg = DpSgdConfig(
            steps=ann["local_steps"],
            sample_rate=ann["sample_rate"],
            noise_multiplier=ann["noise_multiplier"],
            clip_norm=ann["clip_norm"],
            learning_rate=ann["learning_rate"],
            prox_mu=ann["prox_mu"],
        )
        rows = {p: self.rows[p] for p in charge.persons if p in self.rows}
        out = self.sgd.train_round(rows, cfg)
        loss = out.mean_loss if np.isfinite(out.mean_loss) else -1.0
        stored = self.ledger.store_update(
            self.federation_id, ann["round"], out.update, train_loss=loss
        )
        return stored, loss

    async def _train_and_send(self, bus: Bus, ann: FlRoundAnnouncement) -> None:
        parts = {p["hospital_id"]: bytes(p["public_key"]) for p in ann["participants"]}
        kp = self.keys.get((ann["round"], ann["attempt"]))
        if self.hospital_id not in parts or (ann["secure"] and kp is None):
            return
        update, loss = await asyncio.to_thread(self._train, ann)
        update = clip_update(update, max_norm=ann["update_clip"])
        if ann["secure"]:
            assert kp is not None
            ctx = secagg.round_context(self.federation_id, ann["round"], ann["attempt"])
            payload = (
                secagg.mask(
                    secagg.encode_fixed(update),
                    me=self.hospital_id,
                    kp=kp,
                    peers=parts,
                    context=ctx,
                )
                .astype("<u8")
                .tobytes()
            )
        else:
            payload = np.asarray(update, dtype="<f8").tobytes()
        pieces = chunks.split(payload)
        for i, piece in enumerate(pieces):
            await self._send(
                bus,
                ann,
                "update",
                chunk_index=i,
                chunk_count=len(pieces),
                payload=piece,
                train_loss=loss if self.report_train_loss else -1.0,
            )

    async def _on_announcement(self, bus: Bus, ann: FlRoundAnnouncement) -> None:
        if now_ms() > ann["deadline_ms"]:
            return  # stale (replayed history)
        if ann["phase"] == "stop":
            self.stopped = True
            return
        if ann["phase"] == "join" and self.hospital_id:
            await self._join(bus, ann)
        elif ann["phase"] == "train":
            if self.global_round < ann["round"] - 1:
                self._pending.append(ann)  # the previous result has not arrived yet
                return
            await self._train_and_send(bus, ann)

    # ------------------------------------------------------------------ loop
    async def run(self, stop: asyncio.Event | None = None) -> None:
        producer = make_producer(self.settings, max_request_size=2 * chunks.CHUNK_BYTES)
        consumer = make_consumer(
            self.settings,
            self.rounds_topic,
            self.results_topic,
            group_id=None,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * chunks.CHUNK_BYTES,
        )
        await producer.start()
        await consumer.start()
        bus = Bus(producer, self.settings.topic_namespace)
        results_topic = topics.scoped(self.settings, self.results_topic)
        try:
            while not self.stopped and not (stop and stop.is_set()):
                batch = await consumer.getmany(timeout_ms=200)
                anns: list[FlRoundAnnouncement] = []
                for tp, msgs in sorted(batch.items(), key=lambda kv: kv[0].topic != results_topic):
                    for m in msgs:
                        try:
                            name, rec = codec.decode(m.value, m.headers)
                        except codec.DecodeError as exc:
                            log.warning("ignored undecodable message on %s: %s", tp.topic, exc)
                            continue
                        if rec.get("federation_id") != self.federation_id:
                            continue
                        if name == "FlRoundResult":
                            self._on_result(cast(FlRoundResult, rec))
                        elif name == "FlRoundAnnouncement":
                            anns.append(cast(FlRoundAnnouncement, rec))
                pending, self._pending = self._pending, []
                for ann in pending + anns:
                    await self._on_announcement(bus, ann)
        finally:
            await consumer.stop()
            await producer.stop()
