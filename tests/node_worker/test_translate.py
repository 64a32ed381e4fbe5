"""The public question → aggregate query translator, and the routes it feeds."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.node_worker import aggregate
from fedllm.services.node_worker.cohort import load_cohort
from fedllm.services.node_worker.text_routes import TextRoutes
from fedllm.services.node_worker.translate import translate


@pytest.mark.parametrize(
    ("question", "query"),
    [
        (
            "How many of our patients on metformin are over 65?",
            {"op": "count", "where": {"medication": "metformin", "age_min": 66}},
        ),
        (
            "how many women with type 2 diabetes aged 40 or older do we have?",
            {"op": "count", "where": {"diagnosis": "E11", "age_min": 40, "sex": "F"}},
        ),
        (
            "How many patients between 18 and 30 have asthma?",
            {"op": "count", "where": {"diagnosis": "J45", "age_min": 18, "age_max": 30}},
        ),
        ("How many of our patients are under 18?", {"op": "count", "where": {"age_max": 17}}),
        (
            "What is the mean age of our patients with hypertension?",
            {"op": "mean", "field": "age", "where": {"diagnosis": "I10"}},
        ),
        (
            "Which medication is most often prescribed for hypertension in our patients?",
            {"op": "histogram", "field": "medication", "where": {"diagnosis": "I10"}, "top": 3},
        ),
        (
            "Which diagnosis is most common among our patients on amlodipine?",
            {
                "op": "histogram",
                "field": "diagnosis",
                "where": {"medication": "amlodipine"},
                "top": 3,
            },
        ),
        (
            "Which is more common among our patients: asthma or COPD?",
            {"op": "histogram", "field": "diagnosis", "top": 50},
        ),
    ],
)
def test_population_questions_translate_to_valid_queries(question: str, query: dict) -> None:
    t = translate(question)
    assert t is not None and t.query == query
    aggregate.parse_query(t.query)  # the aggregate path accepts it


@pytest.mark.parametrize(
    "question",
    [
        "What is hypertension?",
        "Which patients take metformin?",  # asks for patients, not a population figure
        "How many patients with asthma and COPD?",  # two diagnosis filters: not expressible
        "How many patients between 70 and 20?",
        "Summarise the discharge plan for the last admission.",
    ],
)
def test_other_questions_fall_through(question: str) -> None:
    assert translate(question) is None


def test_translation_is_deterministic_and_reads_the_question_only() -> None:
    q = "How many of our patients on metformin are over 65?"
    assert translate(q) == translate(q)


@pytest.fixture
def routes(clinosim_source: Path) -> TextRoutes:
    return TextRoutes(clinosim_source, key=b"k" * 32, groups=32)


def test_count_question_is_answered_by_a_dp_aggregate_with_its_noise(routes: TextRoutes) -> None:
    res = routes.answer(
        "How many of our patients are over 40?", epsilon=1.0, delta=1e-5, rng=random.Random(1)
    )
    assert res is not None and res.route == "aggregate"
    assert "differentially private aggregates" in res.text
    m = re.search(r"≈ (\d+) ± ([\d.]+) patients", res.text)
    assert m, res.text
    rho = rho_for_epsilon(epsilon=1.0, delta=1e-5)
    assert float(m.group(2)) == pytest.approx((1 / (2 * rho)) ** 0.5, rel=0.05)  # σ of Δ=1
    assert PrivacyCurve.from_rho(rho).dominates(res.curve)
    assert res.curve.epsilon(delta=1e-5) <= 1.0 + 1e-9
    assert res.records_used == len(load_cohort(routes.clinosim_dir))


def test_share_scales_the_spend(routes: TextRoutes) -> None:
    full = routes.answer(
        "How many of our patients are over 40?", epsilon=1.0, delta=1e-5, rng=random.Random(1)
    )
    half = routes.answer(
        "How many of our patients are over 40?",
        epsilon=1.0,
        delta=1e-5,
        rng=random.Random(1),
        share=0.5,
    )
    assert full is not None and half is not None
    assert half.curve.values[0] == pytest.approx(full.curve.values[0] / 2, rel=1e-6)


def test_non_population_questions_return_none(routes: TextRoutes) -> None:
    assert (
        routes.answer("What is hypertension?", epsilon=1.0, delta=1e-5, rng=random.Random(0))
        is None
    )
    assert (
        routes.answer(
            "How many of our patients are over 40?", epsilon=0.0, delta=1e-5, rng=random.Random(0)
        )
        is None
    )


def test_a_top_diagnoses_answer_names_them_in_plain_english(routes: TextRoutes) -> None:
    res = routes.answer(
        "Which diagnosis is most common among our patients?",
        epsilon=1.0,
        delta=1e-5,
        rng=random.Random(2),
    )
    assert res is not None and res.route == "aggregate"
    assert res.text.startswith("Most frequent diagnoses: "), res.text
