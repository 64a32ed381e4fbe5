from __future__ import annotations

import threading
from pathlib import Path

from fedllm.services.node_worker.records import (
    GroupIndex,
    HospitalRecords,
    Note,
    group_of,
    hospital_key,
    load_notes,
    partition,
)

KEY = b"k" * 32


def _notes() -> list[Note]:
    out = []
    for p in range(12):
        for j in range(3):
            out.append(Note(f"n{p}-{j}", f"P{p}", f"patient {p} note {j} common words aspirin"))
    out.append(Note("rare", "P5", "metformin for type 2 diabetes hba1c"))
    return out


def test_partition_is_disjoint_complete_and_by_patient() -> None:
    notes = _notes()
    groups = partition(notes, key=KEY, groups=4)
    ids = [n.note_id for g in groups for n in g]
    assert sorted(ids) == sorted(n.note_id for n in notes)  # complete, no duplicates
    owner = {}
    for gi, g in enumerate(groups):
        for n in g:
            assert owner.setdefault(n.patient_id, gi) == gi  # a patient lives in one group


def test_partition_is_stable_and_keyed() -> None:
    notes = _notes()
    a = partition(notes, key=KEY, groups=4)
    b = partition(list(reversed(notes)), key=KEY, groups=4)
    assert [sorted(n.note_id for n in g) for g in a] == [sorted(n.note_id for n in g) for g in b]
    other = [group_of(f"P{p}", key=b"x" * 32, groups=4) for p in range(12)]
    assert other != [group_of(f"P{p}", key=KEY, groups=4) for p in range(12)]


def test_retrieval_sees_only_its_group() -> None:
    recs = HospitalRecords(_notes(), key=KEY, groups=4)
    hits = recs.retrieve("metformin diabetes", per_group=2)
    g = group_of("P5", key=KEY, groups=4)
    for gi, notes in enumerate(hits):
        assert all(n in recs.partition[gi] for n in notes)
        assert ("rare" in [n.note_id for n in notes]) == (gi == g)


def test_removing_a_patient_changes_only_its_group() -> None:
    notes = _notes()
    full = HospitalRecords(notes, key=KEY, groups=4).retrieve("aspirin note 1", per_group=2)
    for p in range(12):
        pid = f"P{p}"
        less = HospitalRecords([n for n in notes if n.patient_id != pid], key=KEY, groups=4)
        hits = less.retrieve("aspirin note 1", per_group=2)
        changed = {i for i in range(4) if hits[i] != full[i]}
        assert changed <= {group_of(pid, key=KEY, groups=4)}


def test_bm25_ranks_matching_note_first() -> None:
    idx = GroupIndex(_notes())
    assert idx.search("metformin hba1c", k=1)[0].note_id == "rare"
    assert idx.search("zzz", k=3) == []


def test_hospital_key_created_once(tmp_path: Path) -> None:
    path = tmp_path / "h" / "partition.key"
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(hospital_key(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert hospital_key(path) == keys[0]


def test_clinosim_notes_have_patients(clinosim_source: Path) -> None:
    notes = load_notes(clinosim_source)
    assert len(notes) > 20
    assert all(n.patient_id.startswith("POP-") and n.text for n in notes)
    recs = HospitalRecords(notes, key=KEY, groups=8)
    assert recs.n_notes == len(notes)
