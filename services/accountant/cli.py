"""`fedllm accountant`: run the budget accountant (a faust worker)."""

from __future__ import annotations

import argparse

from fedllm.common.config import Settings
from fedllm.common.lifecycle import setup_logging
from fedllm.common.metrics import serve_metrics


def _run(args: argparse.Namespace) -> int:
    import faust

    from fedllm.services.accountant.service import create_app

    settings = Settings()
    setup_logging("accountant")
    serve_metrics(settings, "accountant")
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0


def _reservation_keys(args: argparse.Namespace) -> int:
    from fedllm.common.grants import new_keypair

    seed, public = new_keypair()
    print("# the accountant only (secret):")
    print(f"FEDLLM_RESERVATION_SIGNING_KEY={seed}")
    print("# every node (public):")
    print(f"FEDLLM_RESERVATION_VERIFY_KEY={public}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accountant", help="run the privacy-budget accountant (faust worker)")
    p.add_argument("--loglevel", default="warning")
    p.set_defaults(func=_run)
    p = sub.add_parser(
        "reservation-keys", help="new Ed25519 key pair for the reservation grants nodes check"
    )
    p.set_defaults(func=_reservation_keys)
