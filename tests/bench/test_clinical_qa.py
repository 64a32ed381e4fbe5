"""The benchmark's ground truth and scoring, on a cohort whose answers are known by hand."""

from __future__ import annotations

import datetime as dt

import pytest

from bench.clinical_qa import (
    TEMPLATES,
    Question,
    build_questions,
    first_number,
    score,
    subset,
)
from fedllm.services.node_worker.cohort import Cohort, Diagnosis, Medication, PatientRecord

HTN, DM, OBES = (
    Diagnosis("I10", "Essential (primary) hypertension"),
    Diagnosis("E11.9", "Type 2 diabetes mellitus without complications"),
    Diagnosis("E66.9", "Obesity"),
)
AML, MET, ATO = (
    Medication("Amlodipine", "17767"),
    Medication("Metformin", "6809"),
    Medication("Atorvastatin", "83367"),
)


def patient(
    i: int, age: int, dx: tuple[Diagnosis, ...], rx: tuple[Medication, ...]
) -> PatientRecord:
    return PatientRecord(f"p{i}", age, "F" if i % 2 else "M", dx, rx, 1)


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    ps: list[PatientRecord] = []
    # 40 hypertensive patients on amlodipine (30 of them aged 70, 10 aged 50); 10 also obese
    for i in range(40):
        ps.append(patient(i, 70 if i < 30 else 50, (HTN, OBES) if i < 10 else (HTN,), (AML,)))
    # 25 diabetic patients on metformin, aged 60; 22 of them also on atorvastatin
    for i in range(40, 65):
        ps.append(patient(i, 60, (DM,), (MET, ATO) if i < 62 else (MET,)))
    return Cohort(patients=tuple(ps), snapshot_date=dt.date(2026, 1, 1))


def by_id(qs: list[Question]) -> dict[str, Question]:
    return {q.qid: q for q in qs}


def test_ground_truth_matches_the_hand_computed_answers(cohort: Cohort) -> None:
    qs = by_id(build_questions(cohort, min_patients=20))
    assert qs["count_dx:I10"].truth == 40.0
    assert qs["count_dx:E11"].truth == 25.0
    assert qs["count_drug_over_65:amlodipine"].truth == 30.0
    assert qs["count_drug_over_65:metformin"].truth == 0.0
    assert qs["mean_age_dx:I10"].truth == pytest.approx((30 * 70 + 10 * 50) / 40)
    assert qs["top_med_for_dx:I10"].accept == {"amlodipine"}
    assert qs["top_med_for_dx:E11"].accept == {"metformin"}  # 25 > 22 and outside the 5 % tie
    assert qs["top_dx_on_drug:amlodipine"].accept == {"I10"}
    compare = next(q for q in qs.values() if q.template == "compare_dx")
    assert set(compare.candidates) == {"I10", "E11"} and compare.accept == {"I10"}
    assert "Hypertension" in compare.text and "Type 2 diabetes" in compare.text
    # obesity has 10 < 20 patients: not asked about
    assert not any("E66" in q.qid for q in qs.values())


def test_questions_cover_every_template_and_subset_takes_the_first(cohort: Cohort) -> None:
    qs = build_questions(cohort, min_patients=20)
    assert {q.template for q in qs} == set(TEMPLATES)
    assert build_questions(cohort, min_patients=20) == qs  # deterministic
    quick = subset(qs, per_template=1)
    assert len(quick) == len(TEMPLATES) and all(q in qs for q in quick)


def test_scoring_rules(cohort: Cohort) -> None:
    qs = by_id(build_questions(cohort, min_patients=20))
    count = qs["count_dx:I10"]  # truth 40, tolerance max(10, 4) = 10
    assert score(count, "≈ 48 ± 4 patients.") and score(count, "About 30.")
    assert not score(count, "≈ 51 patients") and not score(count, "I cannot tell.")
    over = qs["count_drug_over_65:amlodipine"]  # the 65 of the question is not an answer
    assert not score(over, "Patients over 65: none recorded")
    assert score(over, "Of those over 65, 33 patients.")
    age = qs["mean_age_dx:I10"]  # truth 65, tolerance 3 years
    assert score(age, "Mean age ≈ 63.5 ± 2 years") and not score(age, "Mean age 70")
    med = qs["top_med_for_dx:I10"]
    assert score(med, "Amlodipine is the most common; metformin is rarer.")
    assert not score(med, "Metformin, then amlodipine.")
    assert not score(med, "A statin.")  # names no vocabulary medication
    dx = qs["top_dx_on_drug:amlodipine"]
    assert score(dx, "Essential hypertension")
    assert not score(dx, "Type 2 diabetes mellitus")
    compare = next(q for q in qs.values() if q.template == "compare_dx")
    assert score(compare, "Hypertension is more common than type 2 diabetes.")
    assert not score(compare, "Type 2 diabetes, clearly.")


def test_first_number_skips_numbers_from_the_question() -> None:
    assert first_number("Over 65: 1,234 patients", "How many are over 65?") == 1234.0
    assert first_number("none", "q") is None
