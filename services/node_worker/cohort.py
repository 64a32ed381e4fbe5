"""A hospital's structured records as a small per-patient table, read from clinosim FHIR output.

Source: ``<cohort_dir>/fhir_r4/*.ndjson`` written by ``clinosim simulate --format fhir-r4``
(see :func:`fedllm.services.node_worker.clinosim_data.ensure_clinosim`): ``Patient`` (sex, birth
date), ``Condition`` (ICD-10-CM problem-list items and encounter diagnoses), ``MedicationRequest``
/ ``MedicationAdministration`` / ``MedicationStatement`` (medications) and ``Encounter``.
Ages are whole years at the generator's ``snapshot_date`` (public generation metadata).

Also the **public vocabularies** that DP histograms run over. They come from clinosim's own code
catalogues shipped in the package (``clinosim/codes/data/icd-10-cm.yaml`` and ``rxnorm.yaml``),
never from a hospital's records, so the candidate list reveals nothing about any patient.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Cohort",
    "Diagnosis",
    "Medication",
    "PatientRecord",
    "VocabEntry",
    "diagnosis_category",
    "diagnosis_vocabulary",
    "load_cohort",
    "medication_key",
    "medication_vocabulary",
]

_SLUG_SYSTEM = "urn:clinosim:identifier:population-slug"
_LINKED_SUFFIX = re.compile(r"-BABY\d*$")  # a newborn's records belong to the mother's person
_MEDICATION_RESOURCES = ("MedicationRequest", "MedicationAdministration", "MedicationStatement")
_SEX = {"female": "F", "male": "M", "other": "O", "unknown": "U"}
_EXCLUDED_STATUS = {"entered-in-error", "refuted"}
#: ICD-10 chapters V–Y (external causes) and Z (factors influencing health status, e.g.
#: "encounter for supervision of pregnancy") are not diagnoses of a disease; the histogram
#: vocabulary leaves them out. Filters (`where.diagnosis`) still see every code.
_NON_DISEASE_CHAPTERS = frozenset("VWXYZ")


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """An ICD-10-CM code and its display name."""

    code: str
    name: str


@dataclass(frozen=True, slots=True)
class Medication:
    """A medication by generic name, with its RxNorm code where the record carries one."""

    name: str
    rxnorm: str | None = None


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """One patient's row: each patient appears once in a cohort."""

    patient_id: str
    age: int | None
    sex: str  # "F", "M", "O" or "U"
    diagnoses: tuple[Diagnosis, ...]
    medications: tuple[Medication, ...]
    encounters: int
    person_id: str = ""
    """The person the row belongs to (a newborn's row is the mother's person); the unit of
    privacy. Empty: the row is its own person (``patient_id``)."""

    @property
    def person(self) -> str:
        return self.person_id or self.patient_id


@dataclass(frozen=True, slots=True)
class Cohort:
    """A hospital's patients (one row per patient) and the date ages are taken at."""

    patients: tuple[PatientRecord, ...]
    snapshot_date: dt.date

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self) -> Iterator[PatientRecord]:
        return iter(self.patients)


@dataclass(frozen=True, slots=True)
class VocabEntry:
    """A histogram candidate: a stable key and a display label."""

    key: str
    label: str


# --------------------------------------------------------------------------- loading


def _fhir_dir(cohort_dir: Path) -> Path:
    for d in (cohort_dir / "fhir_r4", cohort_dir):
        if (d / "Patient.ndjson").is_file():
            return d
    raise FileNotFoundError(f"no clinosim FHIR output (fhir_r4/Patient.ndjson) under {cohort_dir}")


def _read_ndjson(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _subject(resource: dict[str, Any]) -> str | None:
    ref = (resource.get("subject") or {}).get("reference", "")
    return ref.removeprefix("Patient/") if ref.startswith("Patient/") else None


def _snapshot_date(cohort_dir: Path, fhir: Path) -> dt.date:
    """The generator's snapshot date (public metadata); today if the output has none."""
    for path, keys in (
        (fhir / "_generator_metadata.json", ("cif_metadata", "snapshot_date")),
        (cohort_dir / "_cache_manifest.json", ("snapshot_date",)),
    ):
        try:
            node: Any = json.loads(path.read_text(encoding="utf-8"))
            for k in keys:
                node = node[k]
            return dt.date.fromisoformat(str(node))
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return dt.date.today()


def _age(birth: str | None, at: dt.date) -> int | None:
    if not birth:
        return None
    try:
        b = dt.date.fromisoformat(birth[:10])
    except ValueError:
        return None
    return max(0, at.year - b.year - ((at.month, at.day) < (b.month, b.day)))


def _condition(resource: dict[str, Any]) -> Diagnosis | None:
    status = (resource.get("verificationStatus") or {}).get("coding") or [{}]
    if status[0].get("code") in _EXCLUDED_STATUS:
        return None
    concept = resource.get("code") or {}
    icd = next((c for c in concept.get("coding") or [] if "icd-10" in c.get("system", "")), None)
    coding: dict[str, Any] = icd or next(iter(concept.get("coding") or []), {})
    code = str(coding.get("code") or "").strip().upper()
    if not code:
        return None
    name = ""
    for cand in (concept.get("text"), coding.get("display")):
        if cand and not str(cand).startswith("(display"):
            name = str(cand)
            break
    return Diagnosis(code=code, name=name or _icd_names().get(code, code))


def _medication(resource: dict[str, Any]) -> Medication | None:
    concept = resource.get("medicationCodeableConcept") or {}
    coding: dict[str, Any] = next(
        (c for c in concept.get("coding") or [] if "rxnorm" in c.get("system", "")), {}
    )
    name = concept.get("text") or coding.get("display")
    if not name:
        return None
    return Medication(name=str(name).strip(), rxnorm=coding.get("code"))


@functools.lru_cache(maxsize=32)
def _load_cached(fhir: Path, cohort_dir: Path, mtime_ns: int) -> Cohort:
    at = _snapshot_date(cohort_dir, fhir)
    diagnoses: dict[str, set[Diagnosis]] = defaultdict(set)
    medications: dict[str, set[Medication]] = defaultdict(set)
    encounters: dict[str, int] = defaultdict(int)
    for r in _read_ndjson(fhir / "Condition.ndjson"):
        if (pid := _subject(r)) and (d := _condition(r)):
            diagnoses[pid].add(d)
    for kind in _MEDICATION_RESOURCES:
        for r in _read_ndjson(fhir / f"{kind}.ndjson"):
            if (pid := _subject(r)) and (m := _medication(r)):
                medications[pid].add(m)
    for r in _read_ndjson(fhir / "Encounter.ndjson"):
        if pid := _subject(r):
            encounters[pid] += 1
    patients: dict[str, PatientRecord] = {}
    for r in _read_ndjson(fhir / "Patient.ndjson"):
        pid = str(r["id"])
        slug = next(
            (
                str(i.get("value", ""))
                for i in r.get("identifier") or []
                if i.get("system") == _SLUG_SYSTEM
            ),
            "",
        )
        patients[pid] = PatientRecord(
            person_id=_LINKED_SUFFIX.sub("", slug) if slug else "",
            patient_id=pid,
            age=_age(r.get("birthDate"), at),
            sex=_SEX.get(str(r.get("gender", "unknown")), "U"),
            diagnoses=tuple(sorted(diagnoses[pid], key=lambda d: (d.code, d.name))),
            medications=tuple(sorted(medications[pid], key=lambda m: (m.name, m.rxnorm or ""))),
            encounters=encounters[pid],
        )
    return Cohort(patients=tuple(patients[k] for k in sorted(patients)), snapshot_date=at)


def load_cohort(cohort_dir: Path) -> Cohort:
    """The per-patient table of a clinosim output directory (or its ``fhir_r4`` folder).

    One row per ``Patient`` resource; conditions and medications are deduplicated per patient.
    Cached per directory until ``Patient.ndjson`` changes.
    """
    cohort_dir = Path(cohort_dir).resolve()
    fhir = _fhir_dir(cohort_dir)
    return _load_cached(fhir, cohort_dir, (fhir / "Patient.ndjson").stat().st_mtime_ns)


# --------------------------------------------------------------------------- public vocabularies


def _catalogue(name: str) -> dict[str, str]:
    """English displays of one clinosim code catalogue (public: shipped with the package)."""
    from clinosim.codes.loader import _load_system  # the package's own YAML loader

    out: dict[str, str] = {}
    for code, entry in _load_system(name).codes.items():
        label = entry.get("en") if isinstance(entry, dict) else entry
        out[str(code).upper() if name.startswith("icd") else str(code)] = str(label or code)
    return out


@functools.cache
def _icd_names() -> dict[str, str]:
    return _catalogue("icd-10-cm")


@functools.cache
def _short_names() -> dict[str, str]:
    import yaml
    from clinosim.codes import loader

    path = Path(loader.__file__).with_name("data") / "condition-short-name.yaml"
    try:
        codes = yaml.safe_load(path.read_text(encoding="utf-8")).get("codes", {})
    except (OSError, AttributeError):
        return {}
    return {str(k).upper(): str(v.get("en", k)) for k, v in codes.items() if isinstance(v, dict)}


def diagnosis_category(code: str) -> str:
    """The 3-character ICD-10 category of a code (``"E11.9"`` → ``"E11"``)."""
    return code.strip().upper()[:3]


@functools.cache
def diagnosis_vocabulary() -> tuple[VocabEntry, ...]:
    """Public candidate diagnoses: every 3-character ICD-10-CM category in clinosim's catalogue,
    chapters A–T (diseases, symptoms, injuries; V–Z left out), sorted by code."""
    names = _icd_names()
    short = _short_names()
    cats: dict[str, str] = {}
    for code in sorted(names):
        cat = diagnosis_category(code)
        if cat[0] in _NON_DISEASE_CHAPTERS:
            continue
        cats.setdefault(cat, short.get(cat) or names.get(cat) or names[code])
    return tuple(VocabEntry(key=k, label=v) for k, v in sorted(cats.items()))


def _generic(label: str) -> str:
    """``"Levothyroxine (Synthroid)"`` → ``"levothyroxine"``."""
    return label.split(" (")[0].strip().lower()


@functools.cache
def _rxnorm_names() -> dict[str, str]:
    return _catalogue("rxnorm")


#: Sections of clinosim's drug-name list that are not medications (its own section headers).
_NON_DRUG_SECTIONS = (
    "non-drug",
    "dialysis",
    "ventilation",
    "interventional",
    "procedures",
    "imaging",
    "allergens",
)


@functools.cache
def _drug_names() -> tuple[str, ...]:
    """English drug names clinosim can emit: keys of its ``locale/shared/drug_names_ja.yaml``,
    minus the sections that file itself labels as procedures, imaging, allergens etc."""
    import yaml
    from clinosim import locale

    path = Path(locale.__file__).parent / "shared" / "drug_names_ja.yaml"
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except OSError:
        return ()
    if not isinstance(data, dict):
        return ()
    keep: list[str] = []
    skip = False
    for line in text.splitlines():
        if line.startswith("# ---"):
            skip = line.removeprefix("# ---").strip().lower().startswith(_NON_DRUG_SECTIONS)
            continue
        if skip or not line or line[0] in "# ":
            continue
        key = yaml.safe_load(line)
        if isinstance(key, dict):
            keep.extend(str(k) for k in key if k in data)
    return tuple(keep)


@functools.cache
def medication_vocabulary() -> tuple[VocabEntry, ...]:
    """Public candidate medications: clinosim's RxNorm catalogue and its English drug-name list,
    keyed by lower-case generic name (duplicates merged), sorted."""
    out: dict[str, str] = {}
    for label in (*_rxnorm_names().values(), *_drug_names()):
        out.setdefault(_generic(label), label)
    return tuple(VocabEntry(key=k, label=v) for k, v in sorted(out.items()))


@functools.cache
def _medication_keys() -> frozenset[str]:
    return frozenset(e.key for e in medication_vocabulary())


def medication_key(med: Medication) -> str | None:
    """The vocabulary key of a recorded medication (by RxNorm code, else by generic name), or
    ``None`` if it is not in the public vocabulary."""
    if med.rxnorm and med.rxnorm in _rxnorm_names():
        return _generic(_rxnorm_names()[med.rxnorm])
    name = _generic(med.name)
    return name if name in _medication_keys() else None
