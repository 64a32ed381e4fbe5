"""The node's inference engine: one per process, holding the model and the hospital's records.

``Engine.answer(routed_request) -> InferenceResult fields`` is pure with respect to Kafka: the
service loop (``service.py``) feeds it RoutedRequest records and publishes what it returns.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedllm.common.config import Settings
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon
from services.node_worker.answer_dp import groups_for_population
from services.node_worker.clinosim_data import ensure_clinosim
from services.node_worker.dp_decode import BatchedDecoder, DPDecodeConfig, dp_decode
from services.node_worker.model import LoadedModel, load_model
from services.node_worker.records import HospitalRecords, Note, hospital_key
from services.node_worker.text_routes import TextRoutes

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a clinical assistant at a hospital. Answer the clinician's question briefly and "
    "factually in English. Use the patient notes when they are relevant."
)


def hospital_dir(settings: Settings, hospital_id: str) -> Path:
    return settings.data_dir / "hospitals" / hospital_id


def clinosim_dir(settings: Settings, hospital_id: str) -> Path:
    return hospital_dir(settings, hospital_id) / "clinosim"


def ensure_hospital_data(settings: Settings, hospital_id: str) -> Path:
    """Generate the hospital's synthetic records once; returns the clinosim folder."""
    cfg = settings.hospital(hospital_id)
    return ensure_clinosim(
        clinosim_dir(settings, hospital_id), seed=cfg.seed, population=cfg.population
    )


def failed(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": "failed", "reason": reason, "is_private": False, **extra}


class Engine:
    """Answers RoutedRequests for one hospital. Build once per process (loads the model)."""

    def __init__(
        self,
        settings: Settings,
        hospital_id: str,
        *,
        model: LoadedModel | None = None,
        groups: int = 8,
        notes_per_group: int = 1,
        max_note_chars: int = 600,
        config: DPDecodeConfig | None = None,
        rng: random.Random | None = None,
        orders: Sequence[float] = DEFAULT_ORDERS,
    ) -> None:
        self.settings = settings
        self.hospital_id = hospital_id
        self.groups = groups
        self.notes_per_group = notes_per_group
        self.max_note_chars = max_note_chars
        # Confident public tokens are released for free (see docs/privacy.md): measured to give
        # far more coherent answers at the same ε with the 135M model.
        self.config = config or DPDecodeConfig(public_confidence=0.5)
        self.rng = rng or random.SystemRandom()
        self.orders = tuple(float(a) for a in orders)
        self.clinosim_dir = ensure_hospital_data(settings, hospital_id)
        key = hospital_key(hospital_dir(settings, hospital_id) / "partition.key")
        self.records = HospitalRecords.from_dir(self.clinosim_dir, key=key, groups=groups)
        # Population and entity questions: answer-level routes chosen from the question alone.
        self.routes = TextRoutes(
            self.clinosim_dir, key=key,
            groups=groups_for_population(settings.hospital(hospital_id).population),
        ) if settings.answer_routes else None
        self.lm = model or load_model(data_dir=settings.data_dir)
        log.info(
            "engine ready for %s: %d notes in %d groups, model %s on %s",
            hospital_id, self.records.n_notes, groups, self.lm.name, self.lm.device,
        )

    @property
    def model_name(self) -> str:
        return self.lm.name

    @property
    def device(self) -> str:
        return str(self.lm.device)

    # ------------------------------------------------------------------ prompts

    def _messages(self, question: str, notes: Sequence[Note] | None) -> list[dict[str, str]]:
        if notes:
            body = "\n\n".join(
                f"[Note {i + 1}]\n{n.text[: self.max_note_chars]}" for i, n in enumerate(notes)
            )
            user = f"Patient notes:\n{body}\n\nQuestion: {question}"
        else:
            user = f"Question: {question}"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def encode(self, question: str, notes: Sequence[Note] | None) -> list[int]:
        ids = self.lm.tokenizer.apply_chat_template(
            self._messages(question, notes), add_generation_prompt=True, tokenize=True,
        )
        if hasattr(ids, "keys"):  # a BatchEncoding in some tokenizer versions
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def stop_ids(self) -> list[int]:
        """Tokens that end the answer: EOS, end of turn, start of a new turn."""
        tok = self.lm.tokenizer
        out = {int(tok.eos_token_id)}
        vocab = tok.get_vocab()
        for s in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
            if s in vocab:
                out.add(int(vocab[s]))
        return sorted(out)

    # ------------------------------------------------------------------ answering

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """InferenceResult fields for a RoutedRequest (status, response, privacy cost, ...)."""
        started = time.perf_counter()
        try:
            inner = request["request"]
            kind = inner.get("kind", "generate") or "generate"
            epsilon = float(request["reserved_epsilon"])
            delta = float(request["delta"])
            share = float(request.get("budget_share", 1.0))
            parts = int(request.get("parts", 1))
        except (KeyError, TypeError, ValueError) as exc:
            return failed(f"malformed routed request: {exc!r}")
        if not (math.isfinite(epsilon) and epsilon >= 0 and 0 < delta < 1):
            return failed("invalid reserved epsilon or delta")
        if not (math.isfinite(share) and 0 < share <= 1) or parts < 1:
            return failed("invalid budget share or part count")
        if parts > 1 and kind != "aggregate":
            out = failed("only aggregate queries can be answered in parts")
        elif kind == "aggregate":
            out = self._aggregate(inner, epsilon=epsilon, delta=delta, share=share, parts=parts)
        elif kind == "generate":
            routed = self.routes and self.routes.fields(
                inner, epsilon=epsilon, delta=delta, rng=self.rng, share=share, orders=self.orders
            )
            out = routed or self._generate(inner, epsilon=epsilon, delta=delta, share=share)
        else:
            out = failed(f"unknown request kind {kind!r}")
        out["model_time_ms"] = (time.perf_counter() - started) * 1000.0
        return out

    def _generate(
        self, inner: dict[str, Any], *, epsilon: float, delta: float, share: float = 1.0
    ) -> dict[str, Any]:
        question = str(inner.get("prompt", ""))[: self.settings.max_prompt_chars]
        max_tokens = max(0, min(int(inner.get("max_tokens", 64)), self.settings.max_tokens_limit))
        temperature = float(inner.get("temperature", 1.0))
        config = self.config
        if math.isfinite(temperature) and 0 <= temperature <= 2:
            config = replace(config, vote_temperature=temperature)
        rho = rho_for_epsilon(epsilon=epsilon, delta=delta, orders=self.orders) if epsilon else 0.0
        rho *= share  # this node's part of the reservation
        contexts = self.records.retrieve(question, per_group=self.notes_per_group)
        group_prompts = [self.encode(question, notes) for notes in contexts]
        public_prompt = self.encode(question, None)
        tok = self.lm.tokenizer
        decoder = BatchedDecoder(self.lm.model, device=self.lm.device, pad_id=tok.pad_token_id)
        res = dp_decode(
            decoder, public_prompt=public_prompt, group_prompts=group_prompts, rho=rho,
            delta=delta, max_tokens=max_tokens, stop_ids=self.stop_ids(), config=config,
            rng=self.rng, orders=self.orders,
            detokenize=lambda ids: tok.decode(ids, skip_special_tokens=True).strip(),
        )
        log.info(
            "dp answer: %d tokens (%d paid, %d free, %d svt rounds), stop=%s, eps=%.4f",
            len(res.token_ids), res.paid_tokens, res.free_tokens, res.svt_rounds,
            res.stop_reason, res.epsilon,
        )
        return self._ok(
            text=res.text, curve=res.curve, delta=delta, tokens=len(res.token_ids),
            records_used=sum(len(c) for c in contexts),
        )

    def _aggregate(
        self, inner: dict[str, Any], *, epsilon: float, delta: float, share: float = 1.0,
        parts: int = 1,
    ) -> dict[str, Any]:
        """Answer an aggregate query. A part of a fan-out (``parts`` > 1) spends at most
        ``share``·ρ of the reservation and returns status "partial" with its noisy release in
        ``aggregate_json``, for the router to combine with the other hospitals' parts."""
        try:
            from services.node_worker import aggregate
        except ImportError:
            return failed("aggregate queries are not available on this node")
        try:
            query = json.loads(inner.get("prompt", ""))
        except ValueError:
            return failed("aggregate prompt is not valid JSON")
        extra: dict[str, Any] = {}
        if share < 1:
            extra["rho"] = share * rho_for_epsilon(epsilon=epsilon, delta=delta)
        try:
            res = aggregate.answer_aggregate(
                query=query, cohort_dir=self.clinosim_dir, epsilon=epsilon, delta=delta,
                rng=self.rng, **extra,
            )
        except ValueError as exc:  # an invalid query: nothing was released
            return failed(f"invalid aggregate query: {exc}")
        curve: PrivacyCurve = res.curve
        reserved = PrivacyCurve.from_rho(
            share * rho_for_epsilon(epsilon=epsilon, delta=delta, orders=curve.orders),
            curve.orders,
        )
        if not reserved.dominates(curve):
            log.error("aggregate spent more than reserved; reporting the true spend")
        out = self._ok(
            text=res.text, curve=curve, delta=delta, tokens=0, records_used=int(res.records_used)
        )
        if parts > 1:
            out["status"] = "partial"
            out["aggregate_json"] = json.dumps(_release(res), separators=(",", ":"))
        return out

    @staticmethod
    def _ok(
        *, text: str, curve: PrivacyCurve, delta: float, tokens: int, records_used: int
    ) -> dict[str, Any]:
        return {
            "status": "ok",
            "reason": "",
            "response": text,
            "is_private": True,
            "privacy_cost": curve.epsilon(delta=delta),
            "delta": delta,
            "rdp_orders": list(curve.orders),
            "rdp_epsilons": list(curve.values),
            "tokens": tokens,
            "records_used": records_used,
        }


def _release(res: Any) -> dict[str, Any]:
    """The DP release of an aggregate answer (noisy figures and public metadata only), as the
    router's combiner reads it from ``aggregate_json``."""
    return {
        "op": res.op,
        "field": res.field,
        "query_key": res.query_key,
        "bounds": list(res.bounds) if res.bounds is not None else None,
        "top": res.top,
        "noisy_count": res.noisy_count,
        "noisy_sum": res.noisy_sum,
        "count_sd": res.count_sd,
        "sum_sd": res.sum_sd,
        "histogram": [list(kv) for kv in res.histogram] if res.histogram is not None else None,
        "records_used": int(res.records_used),
        "epsilon": res.epsilon,
        "delta": res.delta,
    }
