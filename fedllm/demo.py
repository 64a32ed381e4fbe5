"""`fedllm demo`: the whole pipeline on one machine, a scripted set of requests, a table.

Two departments ask questions: cardiology (budget 15) asks a few; research (budget 2) keeps
asking until its budget is refused. Each row shows where the answer came from and what it cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fedllm.launcher import Pipeline

#: Answered by the answer-level routes (services/node_worker/text_routes.py): a population
#: question goes to DP aggregates, an entity question to answer-level DP over the notes.
ROUTED_QUESTIONS = (
    "How many of our patients are over 65?",
    "What medications do our patients with hypertension receive?",
)
QUESTIONS = (
    "What medications are commonly given to patients admitted with chest pain?",
    "Which conditions are most often recorded in the discharge summaries?",
    "What follow-up is typically advised after discharge?",
)


@dataclass(frozen=True)
class Step:
    user_id: str
    department: str
    role: str
    prompt: str
    epsilon: float


def script() -> list[Step]:
    """The scripted requests: cardiology within budget, research until refused."""
    steps = [Step("dr_alice", "cardiology", "doctor", q, 2.0) for q in QUESTIONS]
    steps += [Step("dr_alice", "cardiology", "doctor", q, 1.0) for q in ROUTED_QUESTIONS]
    steps += [Step("dr_raj", "research", "doctor", QUESTIONS[i % 3], 1.5) for i in range(6)]
    return steps


def ask(client: httpx.Client, pipeline: Pipeline, step: Step, *, max_tokens: int) -> dict[str, Any]:
    from fedllm.services.gateway.tokens import mint_token

    token = mint_token(
        pipeline.settings, user_id=step.user_id, department=step.department, role=step.role
    )
    body = {
        "prompt": step.prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "privacy_budget": step.epsilon,
        "require_consensus": False,
        "priority": "normal",
        "department": step.department,
    }
    r = client.post("/v1/inference", json=body, headers={"Authorization": f"Bearer {token}"})
    data = r.json()
    data["http_status"] = r.status_code
    return data


def excerpt(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def print_table(rows: list[tuple[Step, dict[str, Any]]]) -> None:
    header = (
        "user",
        "dept",
        "ε asked",
        "status",
        "node",
        "ε spent",
        "user ε left",
        "answer / reason",
    )
    lines = [header]
    for step, d in rows:
        ok = d["http_status"] == 200
        lines.append(
            (
                step.user_id,
                step.department,
                f"{step.epsilon:g}",
                "ok" if ok else f"{d['http_status']}",
                d.get("node_id", "") if ok else "-",
                f"{d.get('privacy_cost', 0.0):.3f}" if ok else "0",
                f"{d.get('remaining_budget', float('nan')):.3f}"
                if d.get("remaining_budget") is not None
                else "?",
                excerpt(d.get("response", "") if ok else d.get("detail", ""), 110),
            )
        )
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(header))]
    for i, r in enumerate(lines):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run_demo(*, data_dir: Path, max_tokens: int = 24) -> int:
    """Start everything, run the script, print the table; exit code 0 when every step ended."""
    from fedllm.common.config import POPULATION_PRESETS
    from fedllm.launcher import generate_hospitals, preset_hospitals

    run_db = f"sqlite:///{(data_dir / f'demo-{int(time.time())}.db').resolve()}"
    hospitals = preset_hospitals("demo")
    if hospitals is not None:
        print(
            f"hospitals: the small demo preset (clinosim population "
            f"{POPULATION_PRESETS['demo']} each, a few hundred patients); `fedllm up` uses "
            f"{POPULATION_PRESETS['realistic']} (over 2,000 patients each)",
            flush=True,
        )
    pipeline = Pipeline(data_dir=data_dir, database_url=run_db, hospitals=hospitals)
    generate_hospitals(pipeline.settings)
    print("starting the pipeline (embedded broker, 3 hospitals, SQLite ledger)…", flush=True)
    t0 = time.monotonic()
    with pipeline:
        print(f"ready in {time.monotonic() - t0:.1f}s; broker {pipeline.bootstrap}", flush=True)
        rows = []
        refused = False
        with httpx.Client(
            base_url=pipeline.gateway_url, timeout=pipeline.settings.request_timeout_s + 30
        ) as client:
            for step in script():
                if refused and step.department == "research":
                    continue
                data = ask(client, pipeline, step, max_tokens=max_tokens)
                rows.append((step, data))
                print(f"  {step.user_id}: {data['http_status']}", flush=True)
                refused = refused or (step.department == "research" and data["http_status"] == 403)
        print()
        print_table(rows)
        done = all(d["http_status"] in (200, 403) for _, d in rows)
        for step, d in rows:
            if step.prompt in ROUTED_QUESTIONS and d["http_status"] == 200:
                print(
                    f"\nQ: {step.prompt}\nA (ε spent {d.get('privacy_cost', 0.0):.3f} of "
                    f"{step.epsilon:g} asked): {d.get('response', '')}"
                )
        print(
            "\nε composes under RDP (δ = 1e-5): a budget holds more than the plain sum of the"
            " ε spent per query suggests; a refusal reports the binding (department) limit."
        )
        print(f"research budget refused: {refused}; all requests ended: {done}")
        return 0 if done and refused else 1
