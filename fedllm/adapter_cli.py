"""`fedllm adapter publish|approve|reject|list`: the admin side of the adapter registry
(fedllm.common.adapters). A federation's final global adapter is published as ``pending`` by
`fedllm federate` (or `fedllm adapter publish` from the coordinator's round store); nodes serve
it only once an admin approves it."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path
from typing import Any

from fedllm.common import audit
from fedllm.common.adapters import AdapterError, AdapterRegistry, AdapterVersion
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, make_producer
from fedllm.services.federation.store import RoundStore
from fedllm.services.trainer.settings import TrainerSettings


def publish_from_store(
    registry: AdapterRegistry,
    store: RoundStore,
    federation_id: str,
    *,
    delta: float,
    base_model: str,
    lora_rank: int,
    lora_seed: int,
) -> AdapterVersion:
    """Register the federation's last stored global adapter as pending."""
    from fedllm.common.lora_model import to_bytes  # torch: only when publishing

    last = store.last(federation_id)
    if last is None:
        raise AdapterError(f"federation {federation_id} has no stored round")
    return registry.publish(
        to_bytes(last.global_vector),
        federation_id=federation_id,
        round=last.round,
        epsilon_by_hospital=dict(last.fields.get("epsilon_by_hospital") or {}),
        delta=delta,
        base_model=base_model,
        lora_rank=lora_rank,
        lora_seed=lora_seed,
        expected_hash=str(last.fields.get("adapter_hash") or ""),
    )


def describe(v: AdapterVersion) -> str:
    eps = " ".join(f"{h}={e:.3f}" for h, e in v.epsilon_by_hospital.items())
    return (
        f"{v.hash} [{v.status}] federation={v.federation_id} round={v.round} "
        f"ε={v.epsilon:.3f} (δ={v.delta:.3g}; {eps}) base={v.base_model} r={v.lora_rank}"
        + (f" by={v.decided_by}" if v.decided_by else "")
    )


async def emit_decision(settings: Settings, v: AdapterVersion, *, action: str) -> None:
    """The admin's decision as an AuditEvent on the audit topic (as other admin actions)."""
    producer = make_producer(settings)
    await producer.start()
    try:
        await audit.emit(
            Bus(producer, settings.topic_namespace),
            action=f"adapter.{action}",
            service="admin",
            id_parts=(v.hash, action, v.decided_at_ms),
            user_id=v.decided_by,
            role="admin",
            outcome="ok",
            reason=v.reason or f"adapter {action}",
            epsilon=v.epsilon,
            delta=v.delta,
            adapter_hash=v.hash,
            federation_id=v.federation_id,
            round=str(v.round),
        )
    finally:
        await producer.stop()


def _run(args: argparse.Namespace) -> int:
    settings = Settings(data_dir=Path(args.data_dir)) if args.data_dir else Settings()
    reg = AdapterRegistry.for_data_dir(settings.data_dir)
    by = args.by or getpass.getuser()
    try:
        if args.action == "publish":
            store_url = args.store or (
                f"sqlite:///{(reg.root.parent / 'federation' / 'rounds.db').resolve()}"
            )
            v = publish_from_store(
                reg,
                RoundStore(store_url),
                args.federation_id,
                delta=args.delta or TrainerSettings().delta,
                base_model="tiny-llama-test" if args.tiny else "SmolLM2-135M-Instruct",
                lora_rank=args.rank,
                lora_seed=args.seed,
            )
        elif args.action == "approve":
            v = reg.approve(args.hash, by=by)
        elif args.action == "reject":
            v = reg.reject(args.hash, by=by, reason=args.reason)
        else:
            for v in reg.list():
                print(describe(v))
            return 0
    except AdapterError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print(describe(v))
    if args.action in ("approve", "reject"):
        if not settings.kafka_bootstrap:
            print("not audited: KAFKA_BOOTSTRAP is not set", file=sys.stderr)
            return 1
        try:
            asyncio.run(emit_decision(settings, v, action=args.action))
        except Exception as exc:  # the decision stands; say it is unaudited
            print(f"decision stored but not audited: {exc!r}", file=sys.stderr)
            return 1
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("adapter", help="federated adapter registry: publish, approve, reject")
    p.add_argument("action", choices=["publish", "approve", "reject", "list"])
    p.add_argument("hash", nargs="?", default="", help="the adapter's sha256 (approve, reject)")
    p.add_argument("--data-dir", default="")
    p.add_argument("--by", default="", help="the admin's name (default: the OS user)")
    p.add_argument("--reason", default="")
    p.add_argument("--federation-id", default="", help="publish: the federation")
    p.add_argument("--store", default="", help="publish: the coordinator's round store URL")
    p.add_argument("--delta", type=float, default=0.0, help="publish: δ of the training ε")
    p.add_argument("--tiny", action="store_true", help="publish: trained on the tiny test model")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="publish: the federation's LoRA seed")
    p.set_defaults(func=_run)
