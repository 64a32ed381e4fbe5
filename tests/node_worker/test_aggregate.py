"""DP aggregate queries: validation, filters, bounded contributions, spent curve, combine."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as DpRdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedllm.common.aggregates import Combined, combine_parts, part_of
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon
from fedllm.services.node_worker.aggregate import (
    AggregateAnswer,
    answer_aggregate,
    answer_on_cohort,
    parse_query,
)
from fedllm.services.node_worker.cohort import (
    Cohort,
    Diagnosis,
    Medication,
    PatientRecord,
    diagnosis_vocabulary,
)

DELTA = 1e-5
HUGE_EPS = 1e6  # σ ≪ 1/2 even for Δ = 100: the noise is 0 with overwhelming probability


def _p(
    pid: str,
    age: int | None,
    sex: str,
    dx: list[tuple[str, str]] = (),  # type: ignore[assignment]
    meds: list[str] = (),
    encounters: int = 1,
) -> PatientRecord:  # type: ignore[assignment]
    return PatientRecord(
        patient_id=pid,
        age=age,
        sex=sex,
        diagnoses=tuple(Diagnosis(c, n) for c, n in dx),
        medications=tuple(Medication(m) for m in meds),
        encounters=encounters,
    )


def _cohort(*patients: PatientRecord) -> Cohort:
    return Cohort(patients=tuple(patients), snapshot_date=dt.date(2026, 1, 1))


DM = ("E11.9", "Type 2 diabetes (DM)")
HTN = ("I10", "Hypertension (HTN)")
ASTHMA = ("J45.901", "Asthma")
COHORT = _cohort(
    _p("a", 70, "F", [DM, HTN], ["Metformin", "Amlodipine"], encounters=3),
    _p("b", 45, "M", [HTN], ["Amlodipine"], encounters=1),
    _p("c", 30, "F", [ASTHMA], ["Albuterol"], encounters=2),
    _p("d", None, "U", [DM], ["Metformin"], encounters=0),
    _p("e", 64, "M", [DM, HTN], ["Metformin", "Lisinopril"], encounters=5),
)


def _ans(query: dict, cohort: Cohort = COHORT, eps: float = HUGE_EPS, seed: int = 0):
    return answer_on_cohort(
        query=query, cohort=cohort, epsilon=eps, delta=DELTA, rng=random.Random(seed)
    )


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"op": "median"}, "unknown op"),
        ({}, "unknown op"),
        ({"op": "count", "field": "age"}, "takes no field"),
        ({"op": "sum"}, "unknown field"),
        ({"op": "mean", "field": "weight"}, "unknown field"),
        ({"op": "histogram", "field": "age"}, "unknown field"),
        ({"op": "count", "where": {"zip": "02130"}}, "unknown filter"),
        ({"op": "count", "limit": 3}, "unknown query key"),
        ({"op": "count", "where": {"sex": "female"}}, "where.sex"),
        ({"op": "count", "where": {"age_min": 50, "age_max": 40}}, "age_min must be <="),
        ({"op": "count", "where": {"age_min": True}}, "where.age_min"),
        ({"op": "count", "where": {"age_max": 40.5}}, "where.age_max"),
        ({"op": "count", "where": {"diagnosis": "  "}}, "where.diagnosis"),
        ({"op": "count", "where": {"medication": 3}}, "where.medication"),
        ({"op": "count", "where": ["diagnosis"]}, "where must be"),
        ({"op": "sum", "field": "age", "bounds": [10, 5]}, "bounds"),
        ({"op": "sum", "field": "age", "bounds": [0, math.inf]}, "bounds"),
        ({"op": "count", "bounds": [0, 1]}, "bounds"),
        ({"op": "count", "top": 3}, "histogram' only"),
        ({"op": "histogram", "field": "diagnosis", "max_per_patient": 0}, "max_per_patient"),
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_invalid_queries_are_refused(query: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_query(query)  # type: ignore[arg-type]


def test_query_parses_from_json_text_with_defaults() -> None:
    q = parse_query(json.dumps({"op": "mean", "field": "age", "where": {"sex": "F"}}))
    assert (q.op, q.field, q.sex, q.bounds) == ("mean", "age", "F", (0.0, 100.0))
    h = parse_query({"op": "histogram", "field": "medication"})
    assert h.max_per_patient == 8 and h.top == 5


def test_validation_happens_before_reading_records(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown op"):
        answer_aggregate(
            query={"op": "max"},
            cohort_dir=tmp_path / "missing",
            epsilon=1.0,
            delta=DELTA,
            rng=random.Random(0),
        )


@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan, math.inf])
def test_bad_epsilon_is_refused(eps: float) -> None:
    with pytest.raises(ValueError):
        _ans({"op": "count"}, eps=eps)


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({}, {"a", "b", "c", "d", "e"}),
        ({"diagnosis": "E11"}, {"a", "d", "e"}),  # code prefix
        ({"diagnosis": "e11.9"}, {"a", "d", "e"}),  # case-insensitive
        ({"diagnosis": "hypertension"}, {"a", "b", "e"}),  # name substring
        ({"diagnosis": "11"}, set()),  # codes match by prefix only
        ({"medication": "metf"}, {"a", "d", "e"}),
        ({"sex": "F"}, {"a", "c"}),
        ({"age_min": 45}, {"a", "b", "e"}),  # unknown age never matches an age filter
        ({"age_min": 45, "age_max": 64}, {"b", "e"}),  # inclusive
        ({"diagnosis": "I10", "sex": "M", "medication": "lisinopril"}, {"e"}),
    ],
)
def test_filters(where: dict, expected: set[str]) -> None:
    q = parse_query({"op": "count", "where": where})
    assert {p.patient_id for p in COHORT if q.matches(p)} == expected
    a = _ans({"op": "count", "where": where})
    assert a.noisy_count == len(expected) and a.value == len(expected)
    assert a.records_used == len(COHORT)  # cohort size, never the matched count


def test_sum_and_mean_skip_unknown_values() -> None:
    assert _ans({"op": "sum", "field": "age"}).value == 70 + 45 + 30 + 64
    assert _ans({"op": "mean", "field": "age", "where": {"diagnosis": "E11"}}).value == 67
    assert _ans({"op": "sum", "field": "encounters"}).value == 11
    assert _ans({"op": "mean", "field": "diagnoses"}).value == pytest.approx(7 / 5)


def test_histogram_counts_patients_over_public_vocabulary() -> None:
    a = _ans({"op": "histogram", "field": "diagnosis"})
    h = dict(a.histogram or ())
    assert (h["E11"], h["I10"], h["J45"]) == (3, 3, 1)
    assert sum(h.values()) == 7 and a.value == 3
    m = dict(
        _ans({"op": "histogram", "field": "medication", "where": {"diagnosis": "E11"}}).histogram
        or ()
    )
    assert (m["metformin"], m["amlodipine"], m["lisinopril"], m["albuterol"]) == (3, 1, 1, 0)


# --------------------------------------------------------------------------- bounded contributions


def test_clipping_bounds_one_patients_effect_on_a_sum() -> None:
    outlier = _p("z", 200, "M", [DM], encounters=1000)
    for field, q_bounds, bound in [("encounters", None, 25), ("age", [0, 90], 90)]:
        q = {"op": "sum", "field": field} | ({"bounds": q_bounds} if q_bounds else {})
        with_z = _ans(q, cohort=_cohort(*COHORT.patients, outlier)).value
        without = _ans(q).value
        assert with_z - without == bound
    mean = _ans({"op": "mean", "field": "encounters"}, cohort=_cohort(outlier))
    assert mean.value == 25


def test_negative_bounds_sensitivity_is_max_abs() -> None:
    a = _ans({"op": "sum", "field": "age", "bounds": [-50, 10]}, eps=1.0)
    rho = rho_for_epsilon(epsilon=1.0, delta=DELTA)
    assert a.sum_sd == pytest.approx(50 / math.sqrt(2 * rho), rel=1e-9)


def test_histogram_caps_each_patients_contribution() -> None:
    vocab = [e.key for e in diagnosis_vocabulary()][:12]
    many = [(k + ".0", k) for k in vocab]
    p = _p("x", 50, "F", many)
    for k in (1, 3, 8):
        a = _ans({"op": "histogram", "field": "diagnosis", "max_per_patient": k}, cohort=_cohort(p))
        assert sum(c for _, c in a.histogram or ()) == k


# --------------------------------------------------------------------------- privacy spent


QUERIES = [
    {"op": "count", "where": {"diagnosis": "I10"}},
    {"op": "sum", "field": "encounters"},
    {"op": "mean", "field": "age"},
    {"op": "histogram", "field": "diagnosis"},
    {"op": "histogram", "field": "medication", "max_per_patient": 3},
]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("eps", [0.1, 1.0, 4.0, 10.0])
def test_released_curve_is_rho_alpha_within_budget(query: dict, eps: float) -> None:
    a = _ans(query, eps=eps)
    rho = rho_for_epsilon(epsilon=eps, delta=DELTA)
    spent = a.curve.rho_upper()
    assert spent <= rho and spent == pytest.approx(rho, rel=1e-9)  # all of it, never more
    assert a.curve.orders == tuple(DEFAULT_ORDERS)
    np.testing.assert_allclose(a.curve.as_array(), spent * np.array(DEFAULT_ORDERS), rtol=1e-12)
    assert a.curve.epsilon(delta=DELTA) <= eps
    assert "differentially private" in a.text and f"ε={eps:g}" in a.text


@settings(max_examples=60, deadline=None)
@given(eps=st.floats(min_value=0.05, max_value=30.0), op=st.sampled_from(["count", "sum", "mean"]))
def test_spent_epsilon_never_overshoots(eps: float, op: str) -> None:
    q = {"op": op} | ({} if op == "count" else {"field": "encounters"})
    a = _ans(q, eps=eps)
    assert a.curve.epsilon(delta=DELTA) <= eps


def test_count_curve_matches_dp_accounting() -> None:
    a = _ans({"op": "count"}, eps=1.0)
    acc = DpRdpAccountant(orders=list(DEFAULT_ORDERS))
    acc.compose(dp_event.GaussianDpEvent(noise_multiplier=a.count_sd))
    assert a.curve.epsilon(delta=DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)
    # a mean is two Gaussians: the count and the centred sum (Δ = 50 for age in [0, 100])
    m = _ans({"op": "mean", "field": "age"}, eps=1.0)
    acc = DpRdpAccountant(orders=list(DEFAULT_ORDERS))
    acc.compose(
        dp_event.ComposedDpEvent(
            [
                dp_event.GaussianDpEvent(noise_multiplier=m.count_sd),
                dp_event.GaussianDpEvent(noise_multiplier=m.sum_sd / 50),
            ]
        )
    )
    assert m.curve.epsilon(delta=DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)


# --------------------------------------------------------------------------- noise


def test_noisy_count_is_unbiased_with_the_stated_spread() -> None:
    rng = random.Random(1234)
    q = parse_query({"op": "count", "where": {"diagnosis": "E11"}})
    draws = np.array(
        [
            answer_on_cohort(query=q, cohort=COHORT, epsilon=1.0, delta=DELTA, rng=rng).value
            for _ in range(3000)
        ]
    )
    sd = 1 / math.sqrt(2 * rho_for_epsilon(epsilon=1.0, delta=DELTA))
    assert abs(draws.mean() - 3) < 4 * sd / math.sqrt(len(draws))
    assert draws.std() == pytest.approx(sd, rel=0.1)
    assert len(set(draws)) > 10 and all(float(x).is_integer() for x in draws)


def test_numpy_generator_is_accepted() -> None:
    a = answer_on_cohort(
        query={"op": "histogram", "field": "diagnosis", "max_per_patient": 1},
        cohort=COHORT,
        epsilon=HUGE_EPS,
        delta=DELTA,
        rng=np.random.default_rng(0),
    )
    assert sum(c for _, c in a.histogram or ()) == 5  # one per patient with a diagnosis


# --------------------------------------------------------------------------- combine


def combine(answers: list[AggregateAnswer], *, disjoint_patients: bool = False) -> Combined:
    """The router's combination of these answers, through the released JSON."""
    parts = [part_of(a, hospital_id=f"h{i}") for i, a in enumerate(answers)]
    return combine_parts(parts, disjoint_patients=disjoint_patients)


OTHER = _cohort(
    _p("f", 55, "F", [HTN], ["Amlodipine"], encounters=4),
    _p("g", 80, "M", [HTN, DM], ["Metformin"], encounters=2),
)


@pytest.mark.parametrize("eps", [HUGE_EPS, 2.0])
def test_combine_two_hospitals(eps: float) -> None:
    def both(q: dict) -> list[AggregateAnswer]:
        return [_ans(q, cohort=c, eps=eps, seed=s) for s, c in enumerate((COHORT, OTHER))]

    counts = both({"op": "count", "where": {"diagnosis": "I10"}})
    total = combine(counts)
    assert total.release["noisy_count"] == counts[0].noisy_count + counts[1].noisy_count
    assert total.release["hospitals"] == ["h0", "h1"] and total.records_used == 0
    assert total.release["count_sd"] == pytest.approx(
        math.hypot(counts[0].count_sd, counts[1].count_sd)
    )
    rho = counts[0].curve.rho_upper()
    # default: patients may be at both hospitals -> sequential composition (sum)
    assert total.curve.rho_upper() == pytest.approx(2 * rho)
    assert "sum over hospitals" in total.text
    # declared disjoint -> parallel composition (max)
    disjoint = combine(counts, disjoint_patients=True)
    assert disjoint.curve.rho_upper() == pytest.approx(rho)
    assert disjoint.curve.epsilon(delta=DELTA) <= eps
    assert "max over hospitals" in disjoint.text
    if eps == HUGE_EPS:
        assert total.value == 3 + 2
        mean = combine(both({"op": "mean", "field": "age"}))
        assert mean.value == pytest.approx((70 + 45 + 30 + 64 + 55 + 80) / 6)
        hist = dict(combine(both({"op": "histogram", "field": "diagnosis"})).release["histogram"])
        assert (hist["I10"], hist["E11"]) == (5, 4)


def test_combine_refuses_different_queries() -> None:
    with pytest.raises(ValueError, match="different queries"):
        combine([_ans({"op": "count"}), _ans({"op": "count", "where": {"sex": "F"}})])
    with pytest.raises(ValueError):
        combine([])


def test_combine_of_one_is_the_answer() -> None:
    a = _ans({"op": "sum", "field": "encounters"}, eps=3.0)
    c = combine([a])
    assert (c.value, c.release["noisy_sum"]) == (a.value, a.noisy_sum)
    assert c.curve == a.curve
    assert isinstance(c.curve, PrivacyCurve)


# --------------------------------------------------------------------------- real clinosim data


@pytest.mark.slow
def test_on_clinosim_output(tmp_path: Path) -> None:
    from fedllm.services.node_worker.clinosim_data import ensure_clinosim
    from fedllm.services.node_worker.cohort import load_cohort

    d = ensure_clinosim(tmp_path / "h", seed=11, population=20)
    n = answer_aggregate(
        query={"op": "count"}, cohort_dir=d, epsilon=HUGE_EPS, delta=DELTA, rng=random.Random(0)
    )
    persons = {r.person for r in load_cohort(d).patients}
    assert n.value == len(persons) > 0  # a person counts once, however many records they have
    assert n.records_used >= n.value
    h = answer_aggregate(
        query={"op": "histogram", "field": "diagnosis"},
        cohort_dir=d,
        epsilon=1.0,
        delta=DELTA,
        rng=random.Random(0),
    )
    assert h.curve.epsilon(delta=DELTA) <= 1.0 and "Most frequent diagnoses" in h.text
