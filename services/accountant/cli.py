"""`fedllm accountant`: run the budget accountant (a faust worker)."""

from __future__ import annotations

import argparse

from fedllm.common.config import Settings
from fedllm.common.lifecycle import setup_logging
from fedllm.common.metrics import serve_metrics


def _run(args: argparse.Namespace) -> int:
    import faust

    from services.accountant.app import create_app

    settings = Settings()
    setup_logging("accountant")
    serve_metrics(settings, "accountant")
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accountant", help="run the privacy-budget accountant (faust worker)")
    p.add_argument("--loglevel", default="warning")
    p.set_defaults(func=_run)
