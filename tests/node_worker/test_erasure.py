"""Erasure and export of one patient's records on a copy of a clinosim hospital."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedllm.services.node_worker.cohort import load_cohort
from fedllm.services.node_worker.erasure import erase_patient, export_patient, subject_hmac
from fedllm.services.node_worker.records import HospitalRecords, group_of, load_notes


@pytest.fixture
def root(tmp_path: Path, clinosim_source: Path) -> Path:
    dst = tmp_path / "clinosim"
    shutil.copytree(clinosim_source, dst)
    return dst


def busiest_adult(root: Path) -> str:
    notes = load_notes(root)
    counts: dict[str, int] = {}
    for n in notes:
        if not n.patient_id.endswith("-BABY"):
            counts[n.patient_id] = counts.get(n.patient_id, 0) + 1
    return max(counts, key=lambda p: counts[p])


def test_erase_removes_the_patient_and_nothing_else(root: Path) -> None:
    patient = busiest_adult(root)
    key = b"k" * 32
    before_notes = load_notes(root)
    theirs = [n for n in before_notes if n.patient_id == patient]
    others = [n for n in before_notes if n.patient_id != patient]
    cohort_before = load_cohort(root)
    mine = [p for p in cohort_before if p.person_id == patient]
    assert theirs and len(mine) == 1
    records = HospitalRecords(before_notes, key=key, groups=8)
    query = " ".join(theirs[0].text.split()[:30])
    found = [n for group in records.retrieve(query, per_group=20) for n in group]
    assert any(n.patient_id == patient for n in found)  # retrievable before

    exported = export_patient(root, patient)
    assert len(exported["notes"]) == len(theirs)
    assert [p["id"] for p in exported["fhir"]["Patient"]] == [mine[0].patient_id]
    assert sum(len(v) for v in exported["fhir"].values()) > 1

    done = erase_patient(root, patient)
    assert done.notes == len(theirs) and done.fhir_resources == sum(
        len(v) for v in exported["fhir"].values()
    )
    after_notes = load_notes(root)
    assert [n.note_id for n in after_notes] == [n.note_id for n in others]
    assert not any(patient in n.text for n in after_notes if n.patient_id == patient)
    cohort_after = load_cohort(root)  # the mtime-keyed cache reloads
    assert all(p.person_id != patient for p in cohort_after)
    assert len(cohort_after) == len(cohort_before) - 1
    assert {p.patient_id for p in cohort_after} == {
        p.patient_id for p in cohort_before if p.person_id != patient
    }
    for path in (root / "fhir_r4").glob("*.ndjson"):
        text = path.read_text()
        assert f'"Patient/{mine[0].patient_id}"' not in text
    # Other patients keep their groups (a keyed hash of their own id).
    assert {n.note_id: group_of(n.patient_id, key=key, groups=8) for n in after_notes} == {
        n.note_id: group_of(n.patient_id, key=key, groups=8) for n in others
    }
    # A later query cannot retrieve the patient's notes.
    rebuilt = HospitalRecords(after_notes, key=key, groups=8)
    for note in theirs[:3]:
        query = " ".join(note.text.split()[:30])
        found = [n for group in rebuilt.retrieve(query, per_group=20) for n in group]
        assert found and all(n.patient_id != patient for n in found)
    assert export_patient(root, patient) == {
        "patient_id": patient,
        "notes": [],
        "structural": [],
        "fhir": {},
    }


def test_bad_patient_id_and_audit_subject(root: Path) -> None:
    with pytest.raises(ValueError):
        erase_patient(root, "../../etc")
    s = subject_hmac(b"k" * 32, "POP-000001")
    assert "POP" not in s and len(s) == 32 and s != subject_hmac(b"j" * 32, "POP-000001")
