"""The node's inference engine: one per process, holding the model and the hospital's records.

``Engine.answer(routed_request) -> InferenceResult fields`` is pure with respect to Kafka: the
service loop (``service.py``) feeds it RoutedRequest records and publishes what it returns.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from fedllm.common.adapters import AdapterRegistry
from fedllm.common.aggregate_query import WHERE_KEYS
from fedllm.common.aggregates import release_of
from fedllm.common.config import Settings
from fedllm.common.person_ledger import Capped
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon
from fedllm.schemas.records import InferenceRequest, RoutedRequest
from fedllm.services.node_worker.adapter_serving import AdapterServer
from fedllm.services.node_worker.aggregate import (
    AggregateQuery,
    affected_persons,
    answer_on_cohort,
    parse_query,
    without_persons,
)
from fedllm.services.node_worker.answer_dp import groups_for_population
from fedllm.services.node_worker.clinosim_data import ensure_clinosim
from fedllm.services.node_worker.cohort import load_cohort
from fedllm.services.node_worker.dp_decode import (
    BatchedDecoder,
    DPDecodeConfig,
    NonFiniteVotes,
    check_temperature,
    dp_decode,
)
from fedllm.services.node_worker.fields import AnswerFields, failed
from fedllm.services.node_worker.ledger import NodeLedger
from fedllm.services.node_worker.model import LoadedModel, load_model
from fedllm.services.node_worker.records import HospitalRecords, Note, hospital_key, person_of
from fedllm.services.node_worker.reservation import reservation_rho
from fedllm.services.node_worker.settings import NodeSettings
from fedllm.services.node_worker.text_routes import TextRoutes

log = logging.getLogger(__name__)

#: What is left of a request once its ρ is drawn: runs the mechanism, returns the fields.
Mechanism = Callable[[], AnswerFields]

SYSTEM_PROMPT = (
    "You are a clinical assistant at a hospital. Answer the clinician's question briefly and "
    "factually in English. Use the patient notes when they are relevant."
)


#: Where the notes go in a group prompt (a marker no note or question contains).
_SLOT = "\x00NOTES\x00"
#: Public text of a group prompt when nothing matched, and the filler that pads every context.
NO_MATCH_TEXT = "No patient note matched this question."
FILLER_TEXT = " ."


def open_ledger(
    settings: Settings, hospital_id: str, node: NodeSettings, *, delta: float
) -> NodeLedger:
    """The hospital's own store, with its caps as zCDP ρ at the node's δ."""
    return NodeLedger(
        node.store_url(settings, hospital_id),
        hospital_id=hospital_id,
        rho_cap=rho_for_epsilon(epsilon=node.lifetime_epsilon, delta=delta),
        person_rho_cap=rho_for_epsilon(epsilon=node.person_epsilon, delta=delta),
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


def failed_charged(
    reason: str, *, rho: float, delta: float, orders: Sequence[float]
) -> AnswerFields:
    """A failure after a mechanism started: nothing released, the full reservation charged."""
    curve = PrivacyCurve.from_rho(rho, orders)
    return {
        **failed(reason),
        "privacy_cost": curve.epsilon(delta=delta) if rho > 0 else 0.0,
        "delta": delta,
        "rdp_orders": list(curve.orders),
        "rdp_epsilons": list(curve.values),
    }


class Engine:
    """Answers RoutedRequests for one hospital. Build once per process (loads the model).

    What leaves the node is a function of the DP release and public parameters only: no
    timings, no count of matched records (``records_used`` is always 0 on the wire), group
    prompts of one public token length, the public prompt in its own forward pass, and the
    reported spend is the full reservation (capped per query) once the records are touched.
    """

    def __init__(
        self,
        settings: Settings,
        hospital_id: str,
        *,
        model: LoadedModel | None = None,
        groups: int = 8,
        notes_per_group: int = 1,
        max_note_chars: int = 600,
        note_tokens: int = 160,
        config: DPDecodeConfig | None = None,
        rng: random.Random | None = None,
        orders: Sequence[float] = DEFAULT_ORDERS,
        node_settings: NodeSettings | None = None,
        ledger: NodeLedger | None = None,
        adapter_check_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.hospital_id = hospital_id
        self.groups = groups
        self.notes_per_group = notes_per_group
        self.max_note_chars = max_note_chars
        self.context_tokens = notes_per_group * note_tokens
        # Confident public tokens are released for free (see docs/privacy.md): measured to give
        # far more coherent answers at the same ε with the 135M model.
        self.config = config or DPDecodeConfig(public_confidence=0.5)
        self.rng = rng or random.SystemRandom()
        self.orders = tuple(float(a) for a in orders)
        self.clinosim_dir = ensure_hospital_data(settings, hospital_id)
        key = hospital_key(hospital_dir(settings, hospital_id) / "partition.key")
        self.records = HospitalRecords.from_dir(self.clinosim_dir, key=key, groups=groups)
        self.node = node_settings or NodeSettings()
        persons = {person_of(n.patient_id) for g in self.records.partition for n in g}
        # The size of the data set is public hospital metadata; δ ≤ 1/(10·persons).
        self.delta = self.node.node_delta(persons=len(persons))
        self.query_rho_cap = self._rho(self.node.max_query_epsilon)
        self.ledger = ledger or open_ledger(settings, hospital_id, self.node, delta=self.delta)
        # Population and entity questions: answer-level routes chosen from the question alone.
        self.routes = (
            TextRoutes(
                self.clinosim_dir,
                key=key,
                groups=groups_for_population(settings.hospital(hospital_id).population),
            )
            if settings.answer_routes
            else None
        )
        # FEDLLM_NODE_LOAD_MODEL=false: an aggregate-only node (no model; generate refused).
        self.lm: LoadedModel | None = model or (
            load_model(data_dir=settings.data_dir) if settings.node_load_model else None
        )
        # The approved federated adapter (docs/federated.md), loaded on first use, re-checked
        # between requests at most every adapter_check_s.
        self.adapters = AdapterServer(
            AdapterRegistry.for_data_dir(settings.data_dir),
            models_dir=settings.data_dir / "models",
            check_interval_s=adapter_check_s,
        )
        log.info(
            "engine ready for %s: %d notes in %d groups, model %s on %s",
            hospital_id,
            self.records.n_notes,
            groups,
            self.model_name,
            self.device,
        )

    def budget_room(self) -> float:
        """Share of the hospital's lifetime budget left, for the heartbeat's coarse level."""
        return self.ledger.lifetime_room()

    def budget_balance(self) -> tuple[float, float]:
        """(limit, remaining) of the data set's lifetime budget as ε at the node's δ, for the
        operators' gauges (never sent to requesters)."""
        spent, cap = self.ledger.lifetime()

        def eps(rho: float) -> float:
            return (
                PrivacyCurve.from_rho(rho, self.orders).epsilon(delta=self.delta)
                if rho > 0
                else 0.0
            )

        return eps(cap), eps(max(0.0, cap - spent))

    def _rho(self, epsilon: float) -> float:
        return rho_for_epsilon(epsilon=epsilon, delta=self.delta, orders=self.orders)

    @property
    def model_name(self) -> str:
        return self.lm.name if self.lm is not None else "none (aggregates only)"

    @property
    def device(self) -> str:
        return str(self.lm.device) if self.lm is not None else "cpu"

    # ------------------------------------------------------------------ prompts

    def _template(self, question: str, *, with_notes: bool) -> str:
        user = (
            f"Patient notes:\n{_SLOT}\n\nQuestion: {question}"
            if with_notes
            else (f"Question: {question}")
        )
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return str(
            self.language_model.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=False
            )
        )

    @property
    def language_model(self) -> LoadedModel:
        """The language model (generate only; an aggregate-only node has none)."""
        if self.lm is None:
            raise RuntimeError("this node loads no language model (FEDLLM_NODE_LOAD_MODEL=false)")
        return self.lm

    def _ids(self, text: str) -> list[int]:
        return [
            int(t)
            for t in self.language_model.tokenizer(text, add_special_tokens=False)["input_ids"]
        ]

    def _context(self, notes: Sequence[Note]) -> list[int]:
        """The notes as exactly ``context_tokens`` tokens: truncated, or padded with filler."""
        if notes:
            body = "\n\n".join(
                f"[Note {i + 1}]\n{n.text[: self.max_note_chars]}" for i, n in enumerate(notes)
            )
        else:
            body = NO_MATCH_TEXT
        ids = self._ids(body)[: self.context_tokens]
        filler = self._ids(FILLER_TEXT)
        while len(ids) < self.context_tokens:
            ids.extend(filler[: self.context_tokens - len(ids)])
        return ids

    def encode(self, question: str, notes: Sequence[Note] | None) -> list[int]:
        """The public prompt (``notes`` None: no record at all) or a group prompt (a list,
        possibly empty) whose token length depends on the question only."""
        if notes is None:
            return self._ids(self._template(question, with_notes=False))
        head, tail = self._template(question, with_notes=True).split(_SLOT)
        return self._ids(head) + self._context(notes) + self._ids(tail)

    def stop_ids(self) -> list[int]:
        """Tokens that end the answer: EOS, end of turn, start of a new turn."""
        tok = self.language_model.tokenizer
        out = {int(tok.eos_token_id)}
        vocab = tok.get_vocab()
        for s in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
            if s in vocab:
                out.add(int(vocab[s]))
        return sorted(out)

    # ------------------------------------------------------------------ answering

    def answer(self, request: RoutedRequest) -> AnswerFields:
        """InferenceResult fields for a RoutedRequest (status, response, privacy cost, ...)."""
        return self._run(self._stage(request))

    def answer_batch(self, requests: Sequence[RoutedRequest]) -> list[AnswerFields]:
        """Fields for each of ``requests``, exactly as :meth:`answer` one after the other.

        A batch of aggregate queries draws and charges in one ledger transaction, committed
        before any of their mechanisms runs (each request's filter sees the charges of those
        before it); any other kind charges inside its mechanism, so a batch holding one is
        answered one request at a time."""
        if not all(_is_aggregate(r) for r in requests):
            return [self.answer(r) for r in requests]
        with self.ledger.transaction():
            staged = [self._stage(r) for r in requests]
        return [self._run(s) for s in staged]

    @staticmethod
    def _run(staged: AnswerFields | Mechanism) -> AnswerFields:
        return staged() if callable(staged) else staged

    def _stage(self, request: RoutedRequest) -> AnswerFields | Mechanism:
        """Validate ``request`` and draw its ρ (before any record is read): the final fields
        when nothing is left to run, else the mechanism to run (an aggregate's persons are
        already charged; the other routes charge inside it, before reading the records)."""
        try:
            inner = request["request"]
            kind = inner.get("kind", "generate") or "generate"
            epsilon = float(request["reserved_epsilon"])
            delta = float(request["delta"])
            share = float(request.get("budget_share", 1.0))
            parts = int(request.get("parts", 1))
            key = (str(request["request_id"]), int(request.get("attempt", 0)))
            carried = float(request.get("reserved_rho") or 0.0)
        except (KeyError, TypeError, ValueError) as exc:
            return failed(f"malformed routed request: {exc!r}")
        if not (math.isfinite(epsilon) and epsilon >= 0 and 0 < delta < 1):
            return failed("invalid reserved epsilon or delta")
        if not (math.isfinite(share) and 0 < share <= 1) or parts < 1:
            return failed("invalid budget share or part count")
        try:
            reserved = reservation_rho(
                reserved_rho=carried, epsilon=epsilon, delta=delta, orders=self.orders
            )
        except ValueError as exc:
            return failed(f"invalid reservation: {exc}")
        # This node's part of the reservation, capped per query (the accountant refunds the rest).
        rho = min(share * reserved, self.query_rho_cap)
        if parts > 1 and kind != "aggregate":
            return failed("only aggregate queries can be answered in parts")
        if bool(inner.get("use_adapter", False)):
            if kind != "generate":
                return failed("use_adapter answers generate requests only")
            return functools.partial(self._adapter_answer, inner, delta=delta)
        temperature, query = 0.0, None
        if kind == "generate" and self.lm is None:
            return failed("this node answers aggregate queries only (no model loaded)")
        if kind == "generate":
            try:
                temperature = check_temperature(float(inner.get("temperature", 1.0)))
            except (TypeError, ValueError) as exc:  # fail closed, and charged (issue #11)
                return failed_charged(str(exc), rho=rho, delta=delta, orders=self.orders)
        elif kind == "aggregate":
            try:  # the query is public: an invalid one is refused before anything is drawn
                query = parse_query(inner.get("prompt", ""))
            except ValueError as exc:
                return failed(f"invalid aggregate query: {exc}")
        else:
            return failed(f"unknown request kind {kind!r}")
        if not rho > 0:
            return self._ok(text="", curve=PrivacyCurve.zero(self.orders), delta=delta, tokens=0)
        seen = self.ledger.begin(*key, rho=rho)  # before any record is read
        if seen is not None:
            if seen.state == "refused":
                return failed("the hospital's lifetime privacy budget cannot cover this query")
            if seen.state == "released" and seen.fields is not None:
                return seen.fields
            return failed_charged(
                "the node restarted during the mechanism; nothing released",
                rho=seen.rho,
                delta=delta,
                orders=self.orders,
            )
        capped = self.ledger.capped_persons(rho=rho)
        fail_closed = functools.partial(failed_charged, rho=rho, delta=delta, orders=self.orders)
        if query is not None:
            return _closed(
                self._aggregate(
                    query,
                    key=key,
                    rho=rho,
                    epsilon=epsilon,
                    delta=delta,
                    parts=parts,
                    capped=capped,
                ),
                fail_closed,
            )

        def generate() -> AnswerFields:
            if self.routes is not None and not (capped.all or capped.persons):
                routed = self._route(
                    inner,
                    key=key,
                    rho=rho,
                    epsilon=epsilon,
                    delta=delta,
                    capped=rho < share * reserved,
                )
                if routed is not None:
                    return routed
            exclude = self.records.all_persons() if capped.all else capped.persons
            return self._generate(
                inner,
                key=key,
                rho=rho,
                delta=delta,
                temperature=temperature,
                exclude=frozenset(exclude),
            )

        return _closed(generate, fail_closed)

    def _generate(
        self,
        inner: InferenceRequest,
        *,
        key: tuple[str, int],
        rho: float,
        delta: float,
        temperature: float,
        exclude: frozenset[str],
    ) -> AnswerFields:
        question = str(inner.get("prompt", ""))[: self.settings.max_prompt_chars]
        max_tokens = max(0, min(int(inner.get("max_tokens", 64)), self.settings.max_tokens_limit))
        config = replace(self.config, vote_temperature=temperature)
        contexts = self.records.retrieve(question, per_group=self.notes_per_group, exclude=exclude)
        # Who can be affected: every person of a group that matched (BM25 statistics and ranks
        # depend on all of them); a group with no match gives the filler prompt with or without
        # any one of its persons, so they are not charged (docs/privacy.md).
        affected: set[str] = set()
        for g, notes in enumerate(contexts):
            if notes:
                affected |= self.records.persons(g, exclude=exclude)
        self.ledger.charge_persons(*key, affected, rho=rho)
        group_prompts = [self.encode(question, notes) for notes in contexts]
        public_prompt = self.encode(question, None)
        tok = self.language_model.tokenizer
        decoder = BatchedDecoder(
            self.language_model.model, device=self.language_model.device, pad_id=tok.pad_token_id
        )
        res = dp_decode(
            decoder,
            public_prompt=public_prompt,
            group_prompts=group_prompts,
            rho=rho,
            delta=delta,
            max_tokens=max_tokens,
            stop_ids=self.stop_ids(),
            config=config,
            rng=self.rng,
            orders=self.orders,
            detokenize=lambda ids: tok.decode(ids, skip_special_tokens=True).strip(),
        )
        log.debug(
            "dp answer: %d tokens (%d paid, %d free, %d svt rounds), stop=%s",
            len(res.token_ids),
            res.paid_tokens,
            res.free_tokens,
            res.svt_rounds,
            res.stop_reason,
        )
        # The spend reported is the whole reservation: what the mechanism used depends on data.
        return self._ok(
            text=res.text,
            curve=PrivacyCurve.from_rho(rho, self.orders),
            delta=delta,
            tokens=len(res.token_ids),
        )

    def _adapter_answer(self, inner: InferenceRequest, *, delta: float) -> AnswerFields:
        """The approved adapter's answer to the question alone: no record is read, and the
        adapter is a DP-trained model, so this is post-processing and spends ε = 0 (the
        accountant refunds the reservation). Fails, charging nothing, when none is approved."""
        question = str(inner.get("prompt", ""))[: self.settings.max_prompt_chars]
        max_tokens = max(1, min(int(inner.get("max_tokens", 64)), self.settings.max_tokens_limit))
        ans = self.adapters.answer(question, system=SYSTEM_PROMPT, max_tokens=max_tokens)
        if ans is None:
            return failed("no approved adapter: an admin must approve one (fedllm adapter)")
        out = self._ok(
            text=ans.text, curve=PrivacyCurve.zero(self.orders), delta=delta, tokens=ans.tokens
        )
        out["adapter_hash"] = ans.version.hash
        out["adapter_epsilon"] = ans.version.epsilon
        return out

    def _route(
        self,
        inner: InferenceRequest,
        *,
        key: tuple[str, int],
        rho: float,
        epsilon: float,
        delta: float,
        capped: bool,
    ) -> AnswerFields | None:
        """A population or entity question answered by an answer-level route (text_routes), or
        None when no route reads the question. The routes read every person's records, so
        every person is charged, and they run only while nobody is at their cap (a capped
        person must leave the data, which these routes cannot do yet)."""
        assert self.routes is not None
        if not self.routes.applies(str(inner.get("prompt", ""))):
            return None
        self.ledger.charge_everyone(*key, rho=rho, left_out=frozenset())
        out = self.routes.fields(
            inner,
            rho=rho,
            epsilon=self.node.max_query_epsilon if capped else epsilon,
            delta=delta,
            rng=self.rng,
            orders=self.orders,
        )
        if out is None:  # a route that read the question but released nothing: still charged
            return failed_charged(
                "no answer-level release", rho=rho, delta=delta, orders=self.orders
            )
        return {**out, "records_used": 0}

    def _aggregate(
        self,
        query: AggregateQuery,
        *,
        key: tuple[str, int],
        rho: float,
        epsilon: float,
        delta: float,
        parts: int,
        capped: Capped,
    ) -> Mechanism:
        """Charge an aggregate query's persons now and return its mechanism. A part of a
        fan-out (``parts`` > 1) spends at most its share of the reservation and returns status
        "partial" with its noisy release in ``aggregate_json``, for the router to combine with
        the other hospitals' parts. With no ``where`` filter every person not at their cap is
        charged (one ledger row)."""
        full = load_cohort(self.clinosim_dir)
        exclude = frozenset(p.person for p in full.patients) if capped.all else capped.persons
        cohort = without_persons(full, exclude)
        if any(getattr(query, k) is not None for k in WHERE_KEYS):
            self.ledger.charge_persons(*key, affected_persons(query, cohort), rho=rho)
        elif not capped.all:  # (all at their cap: nobody's records are used, nobody is charged)
            self.ledger.charge_everyone(*key, rho=rho, left_out=exclude)

        def release() -> AnswerFields:
            res = answer_on_cohort(
                query=query,
                cohort=cohort,
                epsilon=epsilon,
                delta=delta,
                rng=self.rng,
                rho=rho,
            )
            # The calibrated curve depends on ρ and the query only (never on the data).
            out = self._ok(text=res.text, curve=res.curve, delta=delta, tokens=0)
            if parts > 1:
                out["status"] = "partial"
                out["aggregate_json"] = json.dumps(release_of(res), separators=(",", ":"))
            return out

        return release

    @staticmethod
    def _ok(*, text: str, curve: PrivacyCurve, delta: float, tokens: int) -> AnswerFields:
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
            "records_used": 0,  # never leaves the node
        }


def _is_aggregate(request: RoutedRequest) -> bool:
    inner = request.get("request") or {}
    return inner.get("kind") == "aggregate" and not inner.get("use_adapter", False)


def _closed(mechanism: Mechanism, fail_closed: Callable[[str], AnswerFields]) -> Mechanism:
    """``mechanism``, failing closed and charged when it raises (its ρ is drawn): non-finite
    votes or noise, or any error, which then fails this request only, not its batch. What
    the error says stays in the node's log: its text may depend on the records."""

    def run() -> AnswerFields:
        try:
            return mechanism()
        except NonFiniteVotes as exc:
            log.error("mechanism failed closed: %s", exc)
            return fail_closed(f"mechanism failed closed: {exc}")
        except Exception:
            log.exception("mechanism failed")
            return fail_closed("mechanism failed closed: internal error")

    return run
