"""`fedllm ask "…"` for a person at a terminal, and `fedllm token` to mint a token with the
deployment's JWT secret (the demo secret under `fedllm up`)."""

from __future__ import annotations

import argparse
import os
import sys

from fedllm.client.models import Answer, AskError, AskTimeout
from fedllm.client.tokens import local_token


def _token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    if os.environ.get("FEDLLM_TOKEN"):
        return os.environ["FEDLLM_TOKEN"]
    if args.as_user:
        return local_token(args.as_user, role=args.role, department=args.department or "general")
    raise AskError(
        0,
        "no credential: pass --token, set FEDLLM_TOKEN, or --as USER "
        "(mints a token with JWT_SECRET; the demo secret under `fedllm up`)",
    )


def show(answer: Answer) -> str:
    """The lines `fedllm ask` prints."""
    left = "unknown" if answer.budget_left is None else f"{answer.budget_left:.4f}"
    if answer.ok:
        head = answer.text.strip()
    else:
        head = f"[{answer.status}] {answer.reason}"
    return (
        f"{head}\n"
        f"ε spent: {answer.epsilon_spent:.4f}   budget left: {left}   "
        f"request: {answer.request_id}" + (f"   node: {answer.node_id}" if answer.node_id else "")
    )


def cmd_ask(args: argparse.Namespace) -> int:
    from fedllm.client import HttpClient, KafkaClient

    try:
        token = _token(args)
    except (ValueError, AskError) as exc:  # no credential, or --as without a JWT secret
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        ask = {
            "epsilon": args.epsilon,
            "max_tokens": args.max_tokens,
            "kind": args.kind,
            "department": args.department,
            "hospitals": tuple(args.hospital),
            "timeout_s": args.timeout,
            "idempotency_key": args.idempotency_key,
        }
        if args.kafka is not None:
            answer = KafkaClient(token=token, bootstrap=args.kafka or None).ask(args.prompt, **ask)
        else:
            with HttpClient(args.url, token=token, verify=args.cacert or True) as client:
                answer = client.ask(args.prompt, **ask)
    except (AskError, AskTimeout) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(show(answer))
    return 0 if answer.ok else 1


def cmd_token(args: argparse.Namespace) -> int:
    try:
        print(local_token(args.user, role=args.role, department=args.department, ttl_s=args.ttl))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a question (HTTP by default, --kafka to produce)")
    p.add_argument("prompt")
    p.add_argument("--epsilon", type=float, default=1.0, help="privacy budget to spend")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--kind", choices=("generate", "aggregate"), default="generate")
    p.add_argument("--department", default=None, help="default: the token's department")
    p.add_argument("--hospital", action="append", default=[], help="repeatable")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument(
        "--idempotency-key",
        default=None,
        help="retry safely: the same key is the same request, charged once",
    )
    p.add_argument("--url", default=os.environ.get("FEDLLM_URL", "http://127.0.0.1:8080"))
    p.add_argument("--cacert", default="", help="CA bundle for an HTTPS gateway")
    p.add_argument(
        "--kafka",
        nargs="?",
        const="",
        default=None,
        metavar="BOOTSTRAP",
        help="produce to Kafka instead (default bootstrap: KAFKA_BOOTSTRAP)",
    )
    p.add_argument("--token", default=None, help="bearer token (or FEDLLM_TOKEN)")
    p.add_argument(
        "--as",
        dest="as_user",
        default=None,
        help="mint a token for USER with JWT_SECRET (demo secret in demo mode)",
    )
    p.add_argument("--role", default="doctor", help="with --as")
    p.set_defaults(func=cmd_ask)
    p = sub.add_parser("token", help="mint a bearer token with JWT_SECRET (demo: demo secret)")
    p.add_argument("user")
    p.add_argument("--role", default="doctor")
    p.add_argument("--department", default="general")
    p.add_argument("--ttl", type=int, default=1800, help="seconds")
    p.set_defaults(func=cmd_token)
