"""A hospital's clinical notes, split into disjoint patient groups, with per-group retrieval.

Privacy role (see docs/privacy.md): the DP decoder's neighbouring relation is "one patient's
records added or removed". For that to change **at most one** group's prompt:

* notes are assigned to groups by a keyed hash (HMAC-SHA256 under a per-hospital secret) of
  the **patient** id, so all of a patient's notes land in one group and the assignment of other
  patients does not depend on whether this patient is present;
* retrieval inside a group ranks that group's notes with BM25 statistics (IDF, average length)
  computed from **that group only**, so adding a patient to group j cannot re-rank group i.

The unit is a **person**: linked records (a newborn ``POP-7-BABY`` and the mother ``POP-7``,
whose notes state the delivery) belong to one person, :func:`person_of`, and share a group.

Retrieval does the same work for every query: exactly :data:`QUERY_TERMS` term slots are scored
against every note of every group, whatever the question and whether anything matches.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

NOTES_GLOB = "cif/narratives/template/documents/*/*.json"
PATIENTS_GLOB = "cif/structural/patients/*.json"
_PATIENT_IN_ENCOUNTER = re.compile(r"(POP-\d+(?:-BABY)?)")
_LINKED_SUFFIX = re.compile(r"-BABY\d*$")
#: Term slots scored per query (longer questions are truncated, shorter ones padded).
QUERY_TERMS = 32
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_STOP = frozenset(
    "a an and are as at be by for from has have in is it of on or that the this to was were "
    "what which who with how does did do patient patients any".split()
)


@dataclass(frozen=True, slots=True)
class Note:
    """One clinical note and the patient it belongs to."""

    note_id: str
    patient_id: str
    text: str


# --------------------------------------------------------------------------- loading


def _note_text(narrative: dict) -> str:
    text = (narrative.get("text") or "").strip()
    if text:
        return text
    sections = narrative.get("sections") or {}
    return "\n".join(f"{k.capitalize()}: {v}" for k, v in sections.items() if v).strip()


def _document_owners(root: Path) -> dict[str, str]:
    """document_id → patient_id from clinosim's structural records."""
    owners: dict[str, str] = {}
    for f in sorted(root.glob(PATIENTS_GLOB)):
        data = json.loads(f.read_text())
        pid = (data.get("patient") or {}).get("patient_id", "")
        for doc in data.get("documents") or []:
            owners[doc["document_id"]] = doc.get("patient_id") or pid
    return owners


def load_notes(clinosim_dir: Path) -> list[Note]:
    """Every non-empty note under a clinosim output folder, with its patient id, sorted by id."""
    root = Path(clinosim_dir)
    owners = _document_owners(root)
    notes: list[Note] = []
    for f in sorted(root.glob(NOTES_GLOB)):
        doc = json.loads(f.read_text())
        text = _note_text(doc.get("narrative") or {})
        if not text:
            continue
        note_id = doc.get("document_id") or f.stem
        pid = owners.get(note_id)
        if pid is None:  # fall back on the id embedded in the encounter id
            m = _PATIENT_IN_ENCOUNTER.search(doc.get("encounter_id", "") or note_id)
            if m is None:
                raise ValueError(f"cannot tell which patient note {note_id!r} belongs to")
            pid = m.group(1)
        notes.append(Note(note_id=note_id, patient_id=pid, text=text))
    return notes


# --------------------------------------------------------------------------- partition


def hospital_key(key_file: Path) -> bytes:
    """The hospital's partition secret: 32 random bytes in ``key_file``, created once.

    Creation is atomic (write a private temp file, then hard-link it into place, which fails if
    another process won the race), so concurrent starters agree on one key.
    """
    key_file = Path(key_file)
    if key_file.exists():
        return key_file.read_bytes()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = key_file.with_name(f"{key_file.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)
    try:
        os.link(tmp, key_file)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return key_file.read_bytes()


def person_of(patient_id: str) -> str:
    """The person a record belongs to: a newborn's records (``…-BABY``) are the mother's."""
    return _LINKED_SUFFIX.sub("", patient_id)


def group_of(patient_id: str, *, key: bytes, groups: int) -> int:
    """The group (0..groups-1) of a patient's person: HMAC-SHA256(key, person) mod groups."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1; got {groups}")
    digest = hmac.new(key, person_of(patient_id).encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % groups


def partition(notes: Iterable[Note], *, key: bytes, groups: int) -> list[list[Note]]:
    """Split notes into ``groups`` disjoint lists by the keyed hash of their patient id."""
    out: list[list[Note]] = [[] for _ in range(groups)]
    for note in notes:
        out[group_of(note.patient_id, key=key, groups=groups)].append(note)
    return out


# --------------------------------------------------------------------------- retrieval


def tokenize(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def query_terms(query: str) -> list[str]:
    """Exactly :data:`QUERY_TERMS` slots: the question's terms, truncated or padded with ""."""
    terms = tokenize(query)[:QUERY_TERMS]
    return terms + [""] * (QUERY_TERMS - len(terms))


class GroupIndex:
    """Okapi BM25 (k1=1.5, b=0.75) over one group's notes, with statistics from that group only."""

    def __init__(self, notes: Sequence[Note], *, k1: float = 1.5, b: float = 0.75) -> None:
        self.notes = list(notes)
        self.k1, self.b = k1, b
        self._tf = [Counter(tokenize(n.text)) for n in self.notes]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = (sum(self._len) / len(self._len)) if self._len else 0.0
        df: Counter[str] = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(self.notes)
        self._idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def scores(self, query: str) -> list[float]:
        """BM25 of every note; the same :data:`QUERY_TERMS` slots are scored for any query."""
        terms = query_terms(query)
        out = []
        for tf, length in zip(self._tf, self._len, strict=True):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * length / (self._avg or 1.0))
            for t in terms:
                f = tf.get(t, 0)
                s += self._idf.get(t, 0.0) * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out

    def search(self, query: str, *, k: int) -> list[Note]:
        """The ``k`` best-scoring notes with a positive score (ties broken by note id)."""
        scored = [
            (s, n.note_id, n) for s, n in zip(self.scores(query), self.notes, strict=True) if s > 0
        ]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [n for _, _, n in scored[:k]]


class HospitalRecords:
    """A hospital's notes partitioned into ``groups`` disjoint patient groups, each indexed."""

    def __init__(self, notes: Sequence[Note], *, key: bytes, groups: int) -> None:
        self.groups = groups
        self.partition = partition(notes, key=key, groups=groups)
        self.indexes = [GroupIndex(g) for g in self.partition]

    @classmethod
    def from_dir(cls, clinosim_dir: Path, *, key: bytes, groups: int) -> HospitalRecords:
        return cls(load_notes(clinosim_dir), key=key, groups=groups)

    @property
    def n_notes(self) -> int:
        return sum(len(g) for g in self.partition)

    def retrieve(
        self, question: str, *, per_group: int, exclude: frozenset[str] = frozenset()
    ) -> list[list[Note]]:
        """For each group, its own ``per_group`` notes most relevant to ``question``, leaving
        out the persons in ``exclude`` (those at their cap) as if their records were absent."""
        return [idx.search(question, k=per_group) for idx in self.indexes_without(exclude)]

    def indexes_without(self, exclude: frozenset[str]) -> list[GroupIndex]:
        if not exclude:
            return self.indexes
        out = []
        for notes, idx in zip(self.partition, self.indexes, strict=True):
            kept = [n for n in notes if person_of(n.patient_id) not in exclude]
            out.append(idx if len(kept) == len(notes) else GroupIndex(kept))
        return out

    def all_persons(self) -> set[str]:
        """Every person with records at this hospital."""
        return {person_of(n.patient_id) for notes in self.partition for n in notes}

    def persons(self, group: int, *, exclude: frozenset[str] = frozenset()) -> set[str]:
        """The persons with records in ``group`` (minus ``exclude``)."""
        return {person_of(n.patient_id) for n in self.partition[group]} - exclude
