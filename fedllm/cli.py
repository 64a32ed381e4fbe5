"""The `fedllm` command. Each service registers its own subcommands; this file only gathers them."""

from __future__ import annotations

import argparse
import sys

from fedllm import adapter_cli, backup, federate, launcher
from fedllm.client import cli as client_cli
from fedllm.services.accountant import cli as accountant_cli
from fedllm.services.auditor import cli as auditor_cli
from fedllm.services.gateway import cli as gateway_cli
from fedllm.services.node_worker import cli as node_cli
from fedllm.services.node_worker import erasure
from fedllm.services.router import cli as router_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    launcher.register(sub)
    client_cli.register(sub)
    for module in (gateway_cli, accountant_cli, router_cli, node_cli, auditor_cli):
        module.register(sub)
    backup.register(sub)
    erasure.register(sub)  # fedllm patient export|erase
    federate.register(sub)
    adapter_cli.register(sub)  # fedllm adapter publish|approve|reject|list
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
