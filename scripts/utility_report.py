"""Measured utility of the DP *aggregate* path on the configured hospitals' clinosim data.

(The utility of DP LLM text generation is measured separately, in docs/privacy.md.)

For each ε and each repetition (its own seed), every hospital answers the same query with
:func:`fedllm.services.node_worker.aggregate.answer_on_cohort`; the federated answer is what the
router returns: :func:`fedllm.common.aggregates.combine_parts` of the hospitals' parts, read back
from the released JSON (:func:`fedllm.common.aggregates.part_of`). Compared against
the exact, non-DP answer computed from the same records:

* "most common diagnosis": argmax of the noisy per-category patient counts over the public
  ICD-10-CM vocabulary; correct if it is one of the exact argmaxes (ties count as correct);
* "typical medication for <condition>": the same over the public drug vocabulary, among
  patients with that condition (conditions fixed below, a priori);
* MAE of the released counts (every vocabulary entry), of a count query and of a mean age.

Usage: ``python scripts/utility_report.py [--reps 200] [--population N] [--write]``;
``--write`` replaces the table between this run's markers in docs/utility.md and
docs/privacy.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedllm.common.aggregates import Combined, combine_parts, part_of  # noqa: E402
from fedllm.common.config import Settings  # noqa: E402
from fedllm.privacy.accountant import PrivacyCurve  # noqa: E402
from fedllm.services.node_worker.aggregate import (  # noqa: E402
    HISTOGRAM_FIELDS,
    AggregateAnswer,
    answer_on_cohort,
    histogram_keys,
    parse_query,
)
from fedllm.services.node_worker.clinosim_data import ensure_clinosim  # noqa: E402
from fedllm.services.node_worker.cohort import Cohort, load_cohort  # noqa: E402

EPSILONS = (1.0, 4.0, 10.0)
NO_NOISE_EPS = 1e6  # same pipeline (caps, grid), noise s.d. < 0.001: the "no DP" reference
#: Conditions for "typical medication", chosen a priori as common chronic conditions with a
#: standard first-line drug (not chosen by looking at the records).
CONDITIONS = (("I10", "hypertension"), ("E11", "type 2 diabetes"), ("E78", "lipid disorders"))
COUNT_QUERY = {"op": "count", "where": {"diagnosis": "I10"}}
MEAN_QUERY = {"op": "mean", "field": "age"}
DOC = REPO / "docs" / "utility.md"
PRIVACY_DOC = REPO / "docs" / "privacy.md"  # issue: the utility table also lives there


@dataclass
class Task:
    name: str
    query: dict
    truth: Counter[str]  # exact federated patient counts per vocabulary key (no cap)
    correct: list[int]
    per_hospital_correct: list[float]
    abs_err: list[float]


def _exact(cohorts: Sequence[Cohort], query: dict) -> Counter[str]:
    q = parse_query(query)
    out: Counter[str] = Counter()
    for c in cohorts:
        for p in c:
            if q.matches(p):
                out.update(histogram_keys(p, q.field or ""))
    return out


def _argmaxes(counts: Counter[str]) -> set[str]:
    if not counts:
        return set()
    top = max(counts.values())
    return {k for k, v in counts.items() if v == top}


def _noisy_top(histogram: Sequence[Sequence]) -> str:
    return min(histogram or (), key=lambda kv: (-kv[1], kv[0]))[0]


def _federated(answers: Sequence[AggregateAnswer]) -> Combined:
    """The router's combination of the hospitals' parts (the production path)."""
    return combine_parts([part_of(a, hospital_id=f"h{i}") for i, a in enumerate(answers)])


def _answers(
    cohorts: Sequence[Cohort], query: dict, eps: float, delta: float, rng: random.Random
) -> list[AggregateAnswer]:
    return [
        answer_on_cohort(query=query, cohort=c, epsilon=eps, delta=delta, rng=rng) for c in cohorts
    ]


def run(
    *, cohorts: Sequence[Cohort], reps: int, delta: float, seed: int, epsilons: Sequence[float]
) -> tuple[str, dict]:
    """The markdown table and the raw figures."""
    tasks = [
        Task(
            "most common diagnosis",
            {"op": "histogram", "field": "diagnosis"},
            Counter(),
            [],
            [],
            [],
        )
    ]
    for code, name in CONDITIONS:
        tasks.append(
            Task(
                f"typical medication for {name} ({code})",
                {"op": "histogram", "field": "medication", "where": {"diagnosis": code}},
                Counter(),
                [],
                [],
                [],
            )
        )
    for t in tasks:
        t.truth = _exact(cohorts, t.query)
    tasks = [t for t in tasks if t.truth]  # a condition nobody has has no answer to check
    exact_count = sum(1 for c in cohorts for p in c if parse_query(COUNT_QUERY).matches(p))
    ages = [p.age for c in cohorts for p in c if p.age is not None]
    exact_mean = statistics.fmean(min(max(a, 0), 100) for a in ages)

    rows: list[dict] = []
    for eps in (*epsilons, NO_NOISE_EPS):
        res = {t.name: ([], [], []) for t in tasks}
        count_err: list[float] = []
        mean_err: list[float] = []
        for r in range(reps):
            rng = random.Random(seed * 1_000_003 + r)
            for t in tasks:
                per = _answers(cohorts, t.query, eps, delta, rng)
                fed = _federated(per).release["histogram"]
                ok, ok_h, err = res[t.name]
                ok.append(int(_noisy_top(fed) in _argmaxes(t.truth)))
                hosp = [
                    _noisy_top(a.histogram or ()) in _argmaxes(_exact([c], t.query))
                    for a, c in zip(per, cohorts, strict=True)
                    if _exact([c], t.query)
                ]
                ok_h.append(statistics.fmean(hosp) if hosp else float("nan"))
                err.append(statistics.fmean(abs(n - t.truth.get(k, 0)) for k, n in fed or ()))
            count_err.append(
                abs(_federated(_answers(cohorts, COUNT_QUERY, eps, delta, rng)).value - exact_count)
            )
            mean_err.append(
                abs(_federated(_answers(cohorts, MEAN_QUERY, eps, delta, rng)).value - exact_mean)
            )
        ref = answer_on_cohort(
            query=tasks[0].query, cohort=cohorts[0], epsilon=eps, delta=delta, rng=random.Random(0)
        )
        user = sum((ref.curve for _ in cohorts), PrivacyCurve.zero(ref.curve.orders))
        rows.append(
            {
                "eps": eps,
                "user_eps_overlap": user.epsilon(delta=delta),
                "hist_sd": ref.count_sd,
                "tasks": {
                    name: (statistics.fmean(ok), _nanmean(ok_h), statistics.fmean(err))
                    for name, (ok, ok_h, err) in res.items()
                },
                "count_mae": statistics.fmean(count_err),
                "mean_mae": statistics.fmean(mean_err),
            }
        )
    return _markdown(rows, tasks, cohorts, reps, delta, exact_count, exact_mean), {"rows": rows}


def _nanmean(xs: list[float]) -> float:
    ys = [x for x in xs if x == x]
    return statistics.fmean(ys) if ys else float("nan")


def _user(r: dict) -> str:
    return "—" if r["eps"] == NO_NOISE_EPS else f"{r['user_eps_overlap']:.2f}"


def _label(eps: float) -> str:
    return "no DP (noise-free)" if eps == NO_NOISE_EPS else f"{eps:g}"


def _markdown(
    rows: list[dict],
    tasks: list[Task],
    cohorts: Sequence[Cohort],
    reps: int,
    delta: float,
    exact_count: int,
    exact_mean: float,
) -> str:
    sizes = ", ".join(str(len(c)) for c in cohorts)
    out = [
        f"Hospitals: {len(cohorts)} (patients: {sizes}); {reps} repetitions per ε; "
        f"δ = {delta:g}; histogram cap K = {HISTOGRAM_FIELDS['diagnosis']} per patient. "
        "ε is what each hospital's release is calibrated to (the user's ε if the hospitals' "
        "patients are disjoint); the next column is the user's ε if patients may overlap "
        "(sum over hospitals).",
        "",
        "Exact (non-DP) answers: "
        + "; ".join(
            f"{t.name}: {'/'.join(sorted(_argmaxes(t.truth)))} ({max(t.truth.values())} patients)"
            for t in tasks
        )
        + f"; patients with I10: {exact_count}; mean age: {exact_mean:.1f}.",
        "",
    ]
    head = [
        "question",
        "ε per hospital",
        "user ε if overlap",
        "noise s.d. per hospital count",
        "accuracy (federated)",
        "accuracy (one hospital)",
        "MAE of counts (federated)",
    ]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        for r in rows:
            acc, acc_h, mae = r["tasks"][t.name]
            out.append(
                "| "
                + " | ".join(
                    [
                        t.name,
                        _label(r["eps"]),
                        _user(r),
                        f"{r['hist_sd']:.3g}",
                        f"{acc:.2f}",
                        f"{acc_h:.2f}",
                        f"{mae:.2f}",
                    ]
                )
                + " |"
            )
    out += [
        "",
        "| ε per hospital | user ε if overlap | MAE count(patients with I10) "
        f"(exact {exact_count}) | MAE mean age (exact {exact_mean:.1f}) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {_label(r['eps'])} | {_user(r)} | {r['count_mae']:.2f} | {r['mean_mae']:.2f} |"
        )
    return "\n".join(out) + "\n"


def _write(doc: Path, label: str, table: str) -> None:
    begin, end = f"<!-- BEGIN utility-report {label} -->", f"<!-- END utility-report {label} -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Utility\n"
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    ap.add_argument(
        "--population",
        type=int,
        default=None,
        help="override every hospital's configured population",
    )
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--write", action="store_true", help=f"update {DOC.relative_to(REPO)}")
    args = ap.parse_args(argv)

    settings = Settings()
    data = args.data_dir or settings.data_dir / "utility"
    cohorts = []
    for h in settings.hospitals:
        pop = args.population or h.population
        d = ensure_clinosim(data / f"{h.id}-seed{h.seed}-pop{pop}", seed=h.seed, population=pop)
        cohorts.append(load_cohort(d))
    t0 = time.monotonic()
    table, _ = run(
        cohorts=cohorts,
        reps=args.reps,
        delta=settings.budget.delta,
        seed=args.seed,
        epsilons=args.epsilons,
    )
    label = "configured" if args.population is None else f"population-{args.population}"
    sys.stdout.write(f"### Aggregate path, {label} hospitals\n\n{table}\n")
    sys.stderr.write(f"({time.monotonic() - t0:.0f} s)\n")
    for doc in (DOC, PRIVACY_DOC) if args.write else ():
        _write(
            doc,
            label,
            f"Command: `python scripts/utility_report.py --reps {args.reps}"
            + (f" --population {args.population}" if args.population else "")
            + " --write`\n\n"
            + table,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
