"""``fedllm node --hospital NAME``: run one hospital's node worker.
``fedllm privacy ledger --hospital NAME``: the hospital's own privacy ledger, for its officer."""

from __future__ import annotations

import argparse

from fedllm.common.config import Settings
from fedllm.common.lifecycle import run_until_signalled, setup_logging
from fedllm.common.metrics import serve_metrics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run one hospital's node worker (DP inference)")
    p.add_argument("--hospital", required=True, help="hospital id from the config")
    p.set_defaults(func=_main)
    priv = sub.add_parser("privacy", help="a hospital's own privacy ledger (internal figures)")
    psub = priv.add_subparsers(dest="privacy_command", required=True)
    led = psub.add_parser("ledger", help="lifetime spend and cap, persons at their cap")
    led.add_argument("--hospital", required=True, help="hospital id from the config")
    led.set_defaults(func=_ledger)


def _ledger(args: argparse.Namespace) -> int:
    from fedllm.privacy.accountant import PrivacyCurve
    from fedllm.privacy.rdp import rho_for_epsilon
    from fedllm.services.node_worker.answering import clinosim_dir, open_ledger
    from fedllm.services.node_worker.records import load_notes, person_of
    from fedllm.services.node_worker.settings import NodeSettings

    settings = Settings()
    settings.hospital(args.hospital)
    node = NodeSettings()
    notes_dir = clinosim_dir(settings, args.hospital)
    persons = (
        len({person_of(n.patient_id) for n in load_notes(notes_dir)}) if (notes_dir.exists()) else 1
    )
    delta = node.node_delta(persons=persons)
    ledger = open_ledger(settings, args.hospital, node, delta=delta)
    s = ledger.summary(
        query_rho=rho_for_epsilon(epsilon=node.max_query_epsilon, delta=delta), population=persons
    )

    def eps(rho: float) -> float:
        return PrivacyCurve.from_rho(rho).epsilon(delta=delta) if rho > 0 else 0.0

    print(f"hospital {s.hospital_id}: internal figures, never released to requesters")
    print(
        f"lifetime spend   rho={s.rho_spent:.6g}  (eps {eps(s.rho_spent):.4g} at delta {delta:g})"
    )
    print(f"lifetime cap     rho={s.rho_cap:.6g}  (eps {eps(s.rho_cap):.4g} at delta {delta:g})")
    print(f"persons charged  {s.persons_charged} of {persons}")
    print(
        f"persons at cap   {s.persons_at_cap}  (cap eps {node.person_epsilon:g}: cannot take "
        f"one more query of eps {node.max_query_epsilon:g})"
    )
    return 0


def _main(args: argparse.Namespace) -> int:
    from fedllm.services.node_worker.service import run

    settings = Settings()
    hospital_id = args.hospital
    settings.hospital(hospital_id)  # unknown id: fail before touching the broker
    setup_logging(f"node-{hospital_id}")
    serve_metrics(settings, f"node-{hospital_id}")
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    run_until_signalled(lambda stop: run(settings, hospital_id, stop=stop))
    return 0
