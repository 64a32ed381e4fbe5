"""``fedllm node --hospital NAME``: run one hospital's node worker."""

from __future__ import annotations

import argparse

from fedllm.common.config import Settings
from fedllm.common.lifecycle import run_until_signalled, setup_logging
from fedllm.common.metrics import serve_metrics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run one hospital's node worker (DP inference)")
    p.add_argument("--hospital", required=True, help="hospital id from the config")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from services.node_worker.service import run

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
