"""`fedllm federate`: federated DP-LoRA rounds over Kafka, with one line per round.

``--role all`` (default) runs the coordinator and one trainer per hospital in this process
(each with its own model copy and its own hospital ledger), ``--role coordinator`` or
``--role trainer --hospital ID`` runs one side alone, as a deployment would.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fedllm.adapter_cli import describe, publish_from_store
from fedllm.common.adapters import AdapterRegistry
from fedllm.common.config import Settings
from fedllm.common.kafka import ensure_topics, wait_for_broker
from fedllm.embedded import EmbeddedBroker
from fedllm.privacy import rho_for_epsilon
from fedllm.services.federation.config import FederationConfig, topic_names
from fedllm.services.federation.store import RoundStore
from fedllm.services.node_worker.clinosim_data import ensure_clinosim
from fedllm.services.trainer.ledger import TrainerLedger
from fedllm.services.trainer.settings import TrainerSettings

if TYPE_CHECKING:  # the model stack (torch) is imported when a federation is built, not by the CLI
    from fedllm.services.federation.coordinator import Coordinator, RoundReport
    from fedllm.services.trainer.service import Trainer

MAX_ROWS_PER_PATIENT = 4


def hospital_data(settings: Settings, hospital_id: str, *, seed: int, population: int) -> Path:
    return ensure_clinosim(
        settings.data_dir / "hospitals" / hospital_id / "clinosim", seed=seed, population=population
    )


def format_report(r: RoundReport) -> str:
    eps = " ".join(f"{h}={e:.2f}" for h, e in sorted(r.epsilon_by_hospital.items()))
    tl = f"{r.train_loss:.3f}" if r.train_loss >= 0 else "n/a"
    hl = f"{r.heldout_loss:.3f}" if r.heldout_loss >= 0 else "n/a"
    declined = f" declined={','.join(r.declined)}" if r.declined else ""
    return (
        f"round {r.round} [{r.status}] participants={len(r.participants)} "
        f"({','.join(r.participants)}){declined} train_loss={tl} heldout_loss={hl} "
        f"|Δ|={r.update_norm:.4f} ε: {eps} ({r.seconds:.1f}s)"
    )


def build_trainer(
    settings: Settings,
    cfg: FederationConfig,
    hospital_id: str,
    *,
    seed: int,
    population: int,
    tiny: bool,
    report_train_loss: bool,
) -> Trainer:
    from fedllm.common.lora_model import load_adapted
    from fedllm.services.trainer.notes import notes_by_patient, patient_rows
    from fedllm.services.trainer.service import Trainer

    ts = TrainerSettings()
    src = hospital_data(settings, hospital_id, seed=seed, population=population)
    adapted = load_adapted(
        models_dir=settings.data_dir / "models", tiny=tiny, rank=cfg.lora_rank, seed=cfg.seed
    )
    rows = patient_rows(
        notes_by_patient(src), adapted.tokenizer, seq_len=cfg.seq_len, max_rows=MAX_ROWS_PER_PATIENT
    )
    delta = ts.node_delta(persons=len(rows))
    ledger = TrainerLedger(
        ts.store_url(settings, hospital_id),
        hospital_id=hospital_id,
        rho_cap=rho_for_epsilon(epsilon=ts.lifetime_epsilon, delta=delta),
        person_rho_cap=rho_for_epsilon(epsilon=ts.person_epsilon, delta=delta),
    )
    return Trainer(
        settings,
        hospital_id=hospital_id,
        federation_id=cfg.federation_id,
        ledger=ledger,
        adapted=adapted,
        rows=rows,
        delta=delta,
        topic_prefix=cfg.topic_prefix,
        report_train_loss=report_train_loss,
    )


def build_coordinator(
    settings: Settings,
    cfg: FederationConfig,
    *,
    tiny: bool,
    heldout_seed: int,
    population: int,
    store_url: str,
    on_round=None,
) -> Coordinator:  # noqa: ANN001
    import torch

    from fedllm.common.lora_model import eval_loss, get_vector, load_adapted, set_vector
    from fedllm.services.federation.coordinator import Coordinator
    from fedllm.services.trainer.notes import notes_by_patient, patient_rows

    adapted = load_adapted(
        models_dir=settings.data_dir / "models", tiny=tiny, rank=cfg.lora_rank, seed=cfg.seed
    )
    # public held-out notes: a synthetic hospital no trainer holds, so evaluating is free
    src = ensure_clinosim(
        settings.data_dir / "federation" / f"heldout-{heldout_seed}",
        seed=heldout_seed,
        population=population,
    )
    rows = patient_rows(
        notes_by_patient(src), adapted.tokenizer, seq_len=cfg.seq_len, max_rows=MAX_ROWS_PER_PATIENT
    )
    held = torch.cat(list(rows.values()))

    def evaluate(vec):  # noqa: ANN001, ANN202
        set_vector(adapted.model, vec)
        return eval_loss(adapted.model, held, pad_id=adapted.pad_id)

    return Coordinator(
        settings,
        cfg,
        store=RoundStore(store_url),
        initial=get_vector(adapted.model),
        evaluate=evaluate,
        on_round=on_round,
    )


async def run_all(
    settings: Settings,
    cfg: FederationConfig,
    coordinator: Coordinator | None,
    trainers: list[Trainer],
) -> list[RoundReport]:
    await wait_for_broker(settings)
    await ensure_topics(settings, dict.fromkeys(topic_names(cfg.topic_prefix), 1))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(t.run(stop)) for t in trainers]
    try:
        if coordinator is None:
            await asyncio.gather(*tasks)
            return []
        await asyncio.sleep(0.5)  # trainers positioned before the first announcement
        coord_task = asyncio.create_task(coordinator.run())
        await asyncio.wait([coord_task, *tasks], return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and t.exception() is not None:
                coord_task.cancel()
                raise t.exception()  # type: ignore[misc]
        return await coord_task
    finally:
        stop.set()
        for res in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(res, Exception):
                raise res


def _federate(args: argparse.Namespace) -> int:
    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    settings = Settings(data_dir=Path(args.data_dir)) if args.data_dir else Settings()
    hospitals = args.hospitals.split(",") if args.hospitals else [h.id for h in settings.hospitals]
    seeds = {h.id: h.seed for h in settings.hospitals}
    cfg = FederationConfig(
        federation_id=args.federation_id or f"fed-{uuid.uuid4().hex[:8]}",
        hospitals=tuple(hospitals),
        min_participants=args.min_participants,
        max_rounds=args.rounds,
        convergence_threshold=args.threshold,
        join_timeout_s=args.join_timeout,
        round_deadline_s=args.deadline,
        rule=args.rule,
        secure=not args.insecure,
        local_steps=args.steps,
        sample_rate=args.sample_rate,
        noise_multiplier=args.noise,
        clip_norm=args.clip,
        learning_rate=args.lr,
        prox_mu=args.mu,
        update_clip=args.update_clip,
        lora_rank=args.rank,
        seq_len=args.seq_len,
        topic_prefix=args.topic_prefix,
    )
    print(
        f"federation {cfg.federation_id}: {len(hospitals)} hospitals, rule={cfg.rule}, "
        f"secure={cfg.secure}, rounds≤{cfg.max_rounds}",
        flush=True,
    )
    trainers = []
    if args.role in ("all", "trainer"):
        mine = [args.hospital] if args.role == "trainer" else hospitals
        for i, h in enumerate(mine):
            trainers.append(
                build_trainer(
                    settings,
                    cfg,
                    h,
                    seed=seeds.get(h, 100 + i),
                    population=args.population,
                    tiny=args.tiny,
                    report_train_loss=args.report_train_loss,
                )
            )
    coord = None
    if args.role in ("all", "coordinator"):
        store = (
            args.store or f"sqlite:///{(settings.data_dir / 'federation' / 'rounds.db').resolve()}"
        )
        (settings.data_dir / "federation").mkdir(parents=True, exist_ok=True)
        coord = build_coordinator(
            settings,
            cfg,
            tiny=args.tiny,
            heldout_seed=args.heldout_seed,
            population=args.population,
            store_url=store,
            on_round=lambda r: print(format_report(r), flush=True),
        )
    if settings.kafka_bootstrap:
        reports = asyncio.run(run_all(settings, cfg, coord, trainers))
    elif args.role != "all":
        print("set KAFKA_BOOTSTRAP to run one role alone", file=sys.stderr)
        return 2
    else:  # no broker configured: the embedded one, as `fedllm up` does
        with EmbeddedBroker() as broker:
            settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
            for t in trainers:
                t.settings = settings
            assert coord is not None
            coord.settings = settings
            reports = asyncio.run(run_all(settings, cfg, coord, trainers))
    if reports and coord is not None and not args.no_publish:
        # the final global adapter, pending until an admin approves it (fedllm adapter approve)
        deltas = [t.delta for t in trainers]
        version = publish_from_store(
            AdapterRegistry.for_data_dir(settings.data_dir),
            coord.store,
            cfg.federation_id,
            delta=max(deltas) if deltas else TrainerSettings().delta,
            base_model="tiny-llama-test" if args.tiny else "SmolLM2-135M-Instruct",
            lora_rank=cfg.lora_rank,
            lora_seed=cfg.seed,
        )
        print(f"published (pending approval): {describe(version)}", flush=True)
    return 0 if reports or args.role == "trainer" else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federate", help="federated DP-LoRA training rounds over Kafka")
    p.add_argument("--role", choices=["all", "coordinator", "trainer"], default="all")
    p.add_argument("--hospital", default="", help="the hospital id (with --role trainer)")
    p.add_argument("--hospitals", default="", help="comma-separated ids (default: configured)")
    p.add_argument("--federation-id", default="")
    p.add_argument("--data-dir", default="")
    p.add_argument("--store", default="", help="coordinator round store URL")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-participants", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.0, help="stop when |Δ| falls below")
    p.add_argument("--join-timeout", type=float, default=60.0)
    p.add_argument("--deadline", type=float, default=600.0, help="per-round update deadline (s)")
    p.add_argument("--rule", default="fedavg", choices=["fedavg", "median", "trimmed_mean", "krum"])
    p.add_argument("--insecure", action="store_true", help="no secure aggregation (robust rules)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--sample-rate", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=1.5)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--mu", type=float, default=0.0, help="FedProx proximal weight")
    p.add_argument("--update-clip", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--heldout-seed", type=int, default=999)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--tiny", action="store_true", help="random 2-layer test model")
    p.add_argument("--report-train-loss", action="store_true", help="send train loss (not DP)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-publish", action="store_true", help="do not register the adapter")
    p.set_defaults(func=_federate)


if __name__ == "__main__":
    sys.exit(0)
