"""The per-patient table read from clinosim FHIR output, and the public vocabularies."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from fedllm.services.node_worker.cohort import (
    Medication,
    diagnosis_category,
    diagnosis_vocabulary,
    load_cohort,
    medication_key,
    medication_vocabulary,
)


def _write(d: Path, name: str, rows: list[dict]) -> None:
    (d / f"{name}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _condition(pid: str, code: str, text: str, status: str = "confirmed") -> dict:
    return {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{pid}"},
        "verificationStatus": {"coding": [{"code": status}]},
        "code": {
            "coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}],
            "text": text,
        },
    }


def _med(kind: str, pid: str, text: str, rx: str | None = None) -> dict:
    concept: dict = {"text": text}
    if rx:
        concept["coding"] = [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": rx}]
    return {
        "resourceType": kind,
        "subject": {"reference": f"Patient/{pid}"},
        "medicationCodeableConcept": concept,
    }


@pytest.fixture()
def fhir_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hospital" / "fhir_r4"
    d.mkdir(parents=True)
    (d / "_generator_metadata.json").write_text(
        json.dumps({"cif_metadata": {"snapshot_date": "2026-06-30"}})
    )
    _write(
        d,
        "Patient",
        [
            {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-07-01"},
            {"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "2000-01-01"},
            {"resourceType": "Patient", "id": "p3", "gender": "unknown"},
        ],
    )
    _write(
        d,
        "Condition",
        [
            _condition("p1", "E11.9", "Type 2 diabetes (DM)"),
            _condition("p1", "E11.9", "Type 2 diabetes (DM)"),  # duplicate: deduplicated
            _condition("p1", "I10", "Hypertension (HTN)"),
            _condition("p2", "J45.901", "Asthma"),
            _condition("p2", "I10", "Hypertension (HTN)", status="entered-in-error"),
        ],
    )
    _write(
        d,
        "MedicationRequest",
        [
            _med("MedicationRequest", "p1", "Metformin", "6809"),
            _med("MedicationRequest", "p1", "Metformin", "6809"),
        ],
    )
    _write(d, "MedicationAdministration", [_med("MedicationAdministration", "p2", "Albuterol")])
    _write(
        d,
        "Encounter",
        [
            {"resourceType": "Encounter", "subject": {"reference": "Patient/p1"}},
            {"resourceType": "Encounter", "subject": {"reference": "Patient/p1"}},
            {"resourceType": "Encounter", "subject": {"reference": "Patient/p2"}},
        ],
    )
    return d.parent


def test_load_cohort_one_row_per_patient(fhir_dir: Path) -> None:
    c = load_cohort(fhir_dir)
    assert c.snapshot_date == dt.date(2026, 6, 30)
    by_id = {p.patient_id: p for p in c}
    assert sorted(by_id) == ["p1", "p2", "p3"]
    p1, p2, p3 = by_id["p1"], by_id["p2"], by_id["p3"]
    assert (p1.age, p1.sex, p1.encounters) == (65, "F", 2)  # birthday on 1 July: still 65
    assert [d.code for d in p1.diagnoses] == ["E11.9", "I10"]
    assert [m.name for m in p1.medications] == ["Metformin"]
    assert (p2.age, p2.sex) == (26, "M")
    assert [d.code for d in p2.diagnoses] == ["J45.901"]  # entered-in-error dropped
    assert [m.name for m in p2.medications] == ["Albuterol"]
    assert (p3.age, p3.sex, p3.encounters, p3.diagnoses) == (None, "U", 0, ())
    assert load_cohort(fhir_dir / "fhir_r4") == c  # the fhir_r4 folder itself works too


def test_missing_output_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_cohort(tmp_path)


def test_vocabularies_are_public_and_stable() -> None:
    dx = diagnosis_vocabulary()
    keys = [e.key for e in dx]
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    assert {"E11", "I10", "J44", "J45"} <= set(keys)
    assert not any(k[0] in "VWXYZ" for k in keys)  # external causes / factors left out
    assert diagnosis_category("e11.9") == "E11"
    meds = {e.key for e in medication_vocabulary()}
    assert {"metformin", "amlodipine", "acetaminophen"} <= meds
    assert "observation" not in meds  # clinosim's non-drug sections are excluded
    assert medication_key(Medication("Metformin", "6809")) == "metformin"
    assert medication_key(Medication("Metformin 500 mg")) is None
    assert medication_key(Medication("Amlodipine")) == "amlodipine"
