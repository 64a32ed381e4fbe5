"""Clinical QA utility of every answer path, with ground truth from the hospital's FHIR records.

    python bench/utility.py [--quick] [--population 4000] [--eps 0.3 1 3] [--no-write]

Rows (see bench/clinical_qa.py for the questions and the fixed scoring):

* **floor** — the record-free model (SmolLM2-135M-Instruct, the question only, greedy).
* **ceiling** — non-private RAG over all of the hospital's notes (BM25 top 3 notes, greedy);
  never served.
* **per-token DP** — the node's DP decoding (m = ``dp_groups`` groups, one token at a time),
  on a subset (it is slow on a CPU); its floor/ceiling are re-measured on the same subset.
* **answer-level DP** — :mod:`fedllm.services.node_worker.answer_dp` (entity questions; other
  questions get the record-free answer at no cost).
* **aggregate route** — :mod:`fedllm.services.node_worker.translate` → DP aggregates (questions it
  does not read get the record-free answer at no cost).
* **routes at ε = 1000** — the same two routes with negligible noise (reference, never served).

Columns per ε: accuracy, mean ε actually spent per question (from the returned RDP curve, at
δ = 1e-5), mean latency. Gap closed = (DP − floor)/(ceiling − floor) for the best DP path.
Results are written between markers into docs/utility.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.clinical_qa import Question, build_questions, score, subset  # noqa: E402
from fedllm.common.config import HospitalConfig, Settings  # noqa: E402
from fedllm.privacy.rdp import rho_for_epsilon  # noqa: E402
from fedllm.services.node_worker.clinosim_data import ensure_clinosim  # noqa: E402
from fedllm.services.node_worker.cohort import load_cohort  # noqa: E402
from fedllm.services.node_worker.records import GroupIndex, load_notes  # noqa: E402

DELTA = 1e-5
MARK_START, MARK_END = "<!-- utility-bench:start -->", "<!-- utility-bench:end -->"


@dataclass
class Row:
    name: str
    eps: float | None
    correct: list[bool] = field(default_factory=list)
    spent: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    by_template: dict[str, list[bool]] = field(default_factory=dict)

    def add(self, q: Question, answer: str, spent: float, seconds: float) -> None:
        ok = score(q, answer)
        self.correct.append(ok)
        self.by_template.setdefault(q.template, []).append(ok)
        self.spent.append(spent)
        self.seconds.append(seconds)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else float("nan")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs ({torch.get_num_threads()} torch threads), "
        f"{dev}; torch {torch.__version__}, Python {platform.python_version()}"
    )


def greedy(engine, question: str, notes, max_tokens: int) -> str:  # noqa: ANN001
    lm = engine.lm
    ids = torch.tensor([engine.encode(question, notes)], device=lm.device)
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
            eos_token_id=engine.stop_ids(),
        )
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def timed(fn: Callable[[], tuple[str, float]]) -> tuple[str, float, float]:
    t = time.perf_counter()
    text, spent = fn()
    return text, spent, time.perf_counter() - t


def gap(dp: float, floor: float, ceiling: float) -> float:
    """(dp − floor)/(ceiling − floor); undefined (NaN, printed "–") unless ceiling > floor."""
    return (dp - floor) / (ceiling - floor) if ceiling > floor else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 questions per template, ε=1 only")
    ap.add_argument(
        "--population",
        type=int,
        default=4000,
        help="clinosim catchment population (4000 gives ≥ 2,000 patients)",
    )
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    ap.add_argument("--per-template", type=int, default=12)
    ap.add_argument(
        "--lm-questions",
        type=int,
        default=0,
        help="questions per template for the model rows (floor, ceiling); 0 = all",
    )
    ap.add_argument(
        "--token-questions",
        type=int,
        default=1,
        help="questions per template for the (slow) per-token DP row",
    )
    ap.add_argument(
        "--token-eps",
        type=float,
        nargs="*",
        default=None,
        help="ε values for the per-token DP row (default: every --eps)",
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--data-dir", type=Path, default=REPO / ".fedllm")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="do not update docs/utility.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    eps_list = [1.0] if args.quick else args.eps
    started = time.perf_counter()

    from fedllm.services.node_worker.answer_dp import groups_for_population
    from fedllm.services.node_worker.answering import Engine, clinosim_dir
    from fedllm.services.node_worker.text_routes import TextRoutes

    hid = f"bench-s{args.seed}-p{args.population}"
    settings = Settings(
        data_dir=args.data_dir,
        hospitals=[
            HospitalConfig(
                id=hid, departments=["general"], seed=args.seed, population=args.population
            )
        ],
    )
    t = time.perf_counter()
    cdir = ensure_clinosim(
        clinosim_dir(settings, hid), seed=args.seed, population=args.population, progress=True
    )
    cohort = load_cohort(cdir)
    notes = cohort_notes(cdir, load_notes(cdir))
    print(
        f"hospital {hid}: {len(cohort)} patients, {len(notes)} notes "
        f"(ready in {time.perf_counter() - t:.1f} s)",
        flush=True,
    )
    questions = build_questions(cohort, per_template=args.per_template)
    if args.quick:
        questions = subset(questions, per_template=2)
    lm_questions = (
        subset(questions, per_template=args.lm_questions) if args.lm_questions else list(questions)
    )
    token_qs = {q.qid for q in subset(lm_questions, per_template=args.token_questions)}
    token_eps = eps_list if args.token_eps is None else args.token_eps
    print(
        f"{len(questions)} questions; model rows on {len(lm_questions)}, per-token DP on "
        f"{len(token_qs)} at ε {token_eps}",
        flush=True,
    )

    engine = Engine(settings, hid, rng=random.SystemRandom())
    routes = TextRoutes(
        cdir,
        key=engine_key(settings, hid),
        notes=lambda: notes,
        groups=groups_for_population(args.population),
    )
    if engine.records.n_notes != len(notes):  # a snapshot: per-token DP sees the same notes
        from fedllm.services.node_worker.records import HospitalRecords

        engine.records = HospitalRecords(notes, key=engine_key(settings, hid), groups=engine.groups)
    t = time.perf_counter()
    _ = routes.entities  # extract the groups' entities once (a node does this lazily)
    print(
        f"answer-level DP: {routes.entities.groups} groups, entities extracted in "
        f"{time.perf_counter() - t:.1f} s",
        flush=True,
    )
    full_index = GroupIndex(notes)
    rng = random.SystemRandom()

    floor, ceiling = Row("record-free model (floor)", None), Row("non-private RAG (ceiling)", None)
    floor_text: dict[str, str] = {}
    for i, q in enumerate(lm_questions):
        text, spent, s = timed(lambda q=q: (greedy(engine, q.text, None, args.max_tokens), 0.0))
        floor.add(q, text, spent, s)
        floor_text[q.qid] = text
        ctx = full_index.search(q.text, k=3)
        text, spent, s = timed(
            lambda q=q, ctx=ctx: (greedy(engine, q.text, ctx, args.max_tokens), 0.0)
        )
        ceiling.add(q, text, spent, s)
        print(
            f"  [{i + 1}/{len(lm_questions)}] floor {floor.correct[-1]:d} "
            f"ceiling {ceiling.correct[-1]:d}  {q.qid}",
            flush=True,
        )

    lm_ids = {q.qid for q in lm_questions}

    def route_row(name: str, eps: float, which: tuple[str, ...]) -> Row:
        """Over the model-row questions (comparable with floor/ceiling); its accuracy over all
        questions goes in ``full`` (a question no route answers counts as wrong there unless
        the floor answered it)."""
        row, full = Row(name, eps), Row(name, eps)
        for q in questions:

            def run(q: Question = q) -> tuple[str, float]:
                res = routes.answer(q.text, epsilon=eps, delta=DELTA, rng=rng, routes=which)
                if res is None:
                    return floor_text.get(q.qid, ""), 0.0
                return res.text, res.curve.epsilon(delta=DELTA)

            text, spent, s = timed(run)
            full.add(q, text, spent, s)
            if q.qid in lm_ids:
                row.add(q, text, spent, s)
        row.full = full  # type: ignore[attr-defined]
        return row

    rows: list[Row] = [floor, ceiling]
    token_rows: list[tuple[Row, Row, Row]] = []
    for eps in eps_list:
        tok = Row("per-token DP decoding", eps)
        tf, tc = Row("floor (same subset)", None), Row("ceiling (same subset)", None)
        for q in lm_questions:
            if q.qid not in token_qs or eps not in token_eps:
                continue

            def run_tok(q: Question = q, eps: float = eps) -> tuple[str, float]:
                # The node's own order: the release row first, then the mechanism.
                rho = rho_for_epsilon(epsilon=eps, delta=DELTA, orders=engine.orders)
                key = (f"bench-{q.qid}-{eps:g}-{time.time_ns()}", 0)
                engine.ledger.begin(*key, rho=rho)
                out = engine._generate(
                    {"prompt": q.text, "max_tokens": args.max_tokens, "temperature": 1.0},
                    key=key,
                    rho=rho,
                    delta=DELTA,
                    temperature=1.0,
                    exclude=frozenset(),
                )
                return out["response"], float(out["privacy_cost"])

            text, spent, s = timed(run_tok)
            tok.add(q, text, spent, s)
            i = lm_questions.index(q)
            tf.add(q, floor_text[q.qid], 0.0, floor.seconds[i])
            tc.correct.append(ceiling.correct[i])
            print(
                f"  ε={eps:g} per-token {tok.correct[-1]:d} ({s:.0f} s) {q.qid}: {text[:80]!r}",
                flush=True,
            )
        token_rows.append((tok, tf, tc))
        if tok.correct:
            rows.append(tok)
        rows.append(route_row("answer-level DP (entities)", eps, ("entities",)))
        rows.append(route_row("aggregate route (translator)", eps, ("aggregate",)))
        rows.append(route_row("routed: aggregate → entities", eps, ("aggregate", "entities")))
    rows.append(route_row("routes at ε=1000 (reference)", 1000.0, ("aggregate", "entities")))

    report = render(
        rows,
        token_rows,
        questions,
        lm_questions,
        cohort_size=len(cohort),
        notes=len(notes),
        groups=routes.entities.groups,
        dp_groups=engine.groups,
        args=args,
        eps_list=eps_list,
        elapsed=time.perf_counter() - started,
    )
    print(report)
    if not args.no_write:
        write_doc(REPO / "docs" / "utility.md", report)
    return 0


def cohort_notes(cdir: Path, notes: list) -> list:  # noqa: ANN001
    """The notes of patients in the FHIR cohort (clinosim's population slug ``POP-…`` is the
    notes' patient id and an identifier of the FHIR Patient). In a complete generation this
    keeps every note; it matters only for a snapshot of an unfinished export."""
    import json

    fhir = cdir / "fhir_r4" / "Patient.ndjson"
    slugs = set()
    with fhir.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                for ident in json.loads(line).get("identifier") or []:
                    if "population-slug" in ident.get("system", ""):
                        slugs.add(ident.get("value"))
    return [n for n in notes if n.patient_id in slugs]


def engine_key(settings: Settings, hid: str) -> bytes:
    from fedllm.services.node_worker.answering import hospital_dir
    from fedllm.services.node_worker.records import hospital_key

    return hospital_key(hospital_dir(settings, hid) / "partition.key")


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.0f} %"


def render(
    rows: list[Row],
    token_rows,
    questions,
    lm_questions,
    *,  # noqa: ANN001
    cohort_size: int,
    notes: int,
    groups: int,
    dp_groups: int,
    args,
    eps_list,
    elapsed: float,
) -> str:  # noqa: ANN001
    floor, ceiling = rows[0], rows[1]
    lines = [
        f"Measured by `python bench/utility.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: {machine()}. Hospital: clinosim seed {args.seed}, "
        f"population {args.population} → {cohort_size} patients, {notes} notes. "
        f"{len(questions)} questions; the model rows (floor, ceiling) and the table below on "
        f"{len(lm_questions)} of them; per-token DP with m = {dp_groups} groups on "
        f"{max((len(t[0].correct) for t in token_rows), default=0)} of those; answer-level DP with "
        f"m = {groups} groups, K = 1 entity per group; δ = {DELTA:g}. Run time "
        f"{elapsed / 60:.1f} min.",
        "",
        "| path | ε requested | accuracy | ε spent (mean) | latency (mean) | n | accuracy on "
        f"all {len(questions)} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "–" if r.eps is None else f"{r.eps:g}"
        full = getattr(r, "full", None)
        lines.append(
            f"| {r.name} | {eps} | {_pct(r.accuracy)} | "
            f"{statistics.fmean(r.spent) if r.spent else 0:.3g} | "
            f"{statistics.fmean(r.seconds) if r.seconds else 0:.2f} s | {len(r.correct)} | "
            f"{_pct(full.accuracy) if full is not None else '–'} |"
        )
    templates = list(dict.fromkeys(q.template for q in questions))
    lines += [
        "",
        "Accuracy by template (DP routes: over all questions):",
        "",
        "| path | ε | " + " | ".join(templates) + " |",
        "|---|---|" + "---|" * len(templates),
    ]
    for r in rows:
        if r.name.startswith("per-token"):
            continue
        eps = "–" if r.eps is None else f"{r.eps:g}"
        by = getattr(r, "full", r).by_template
        cells = [_pct(sum(v) / len(v)) if (v := by.get(t)) else "–" for t in templates]
        lines.append(f"| {r.name} | {eps} | " + " | ".join(cells) + " |")
    ref = rows[-1]
    lines += [
        "",
        "Gap closed = (DP − floor)/(ceiling − floor), best DP path per ε (and, in "
        "brackets, against the noise-free routes at ε=1000 as the ceiling):",
        "",
    ]
    for i, eps in enumerate(eps_list):
        cands = [r for r in rows if r.eps == eps and not r.name.startswith("per-token")]
        best = max(cands, key=lambda r: r.accuracy)
        tok, tf, tc = token_rows[i]
        tok_gap = (
            gap(tok.accuracy, tf.accuracy, sum(tc.correct) / len(tc.correct))
            if tc.correct
            else float("nan")
        )
        lines.append(
            f"- ε = {eps:g}: best path **{best.name}** {_pct(best.accuracy)}; gap closed "
            f"**{_pct(gap(best.accuracy, floor.accuracy, ceiling.accuracy))}** (floor "
            f"{_pct(floor.accuracy)}, ceiling {_pct(ceiling.accuracy)}) "
            f"[{_pct(gap(best.accuracy, floor.accuracy, ref.accuracy))} of the gap to the "
            f"noise-free routes' {_pct(ref.accuracy)}]; per-token DP on its "
            f"subset: {_pct(tok.accuracy)}, gap closed {_pct(tok_gap)}."
        )
    return "\n".join(lines)


def write_doc(path: Path, report: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{MARK_START}\n{report}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        head, _, rest = text.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n## Clinical QA benchmark (bench/utility.py)\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
