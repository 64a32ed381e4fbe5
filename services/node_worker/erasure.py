"""Right of access and right to erasure (GDPR art. 15/17, CCPA) on a node's serving data.

``fedllm patient export --hospital H --patient P`` writes every record of patient P held in the
hospital's serving data (notes, structural records, FHIR resources) as one JSON document, with
the ρ the person has spent on the hospital's individual privacy filter.
``fedllm patient erase --hospital H --patient P`` removes them: note files, structural files,
and every FHIR resource of the patient (the Patient resource, and each resource that refers to
it or carries the patient's id). Other patients' records are untouched, and so are their DP
groups (a patient's group is a keyed hash of their own id: records.group_of). The cohort cache
is keyed by the FHIR files' mtime, so it reloads; a running node rebuilds its note index on
restart (`fedllm up` restarts it), and bumping the hospital's public `data_version` retires the
gateway's cached releases. The audit events name the patient only by a keyed HMAC, never in
clear. What erasure cannot undo (releases already made, models trained): docs/privacy.md.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.services.node_worker.cohort import _SLUG_SYSTEM
from fedllm.services.node_worker.records import NOTES_GLOB, PATIENTS_GLOB, _document_owners

_PATIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class PatientFiles:
    """Where one patient's records are in a clinosim folder."""

    notes: tuple[Path, ...]
    structural: tuple[Path, ...]
    fhir_ids: frozenset[str]


def _token(patient_id: str) -> re.Pattern[str]:
    """The id as a whole token; `P-BABY` (a newborn: another data subject) does not match."""
    return re.compile(rf"(?<![0-9A-Za-z]){re.escape(patient_id)}(?!-BABY)(?![0-9A-Za-z])")


def _fhir_ids(fhir: Path, patient_id: str) -> frozenset[str]:
    ids = set()
    path = fhir / "Patient.ndjson"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                slugs = [
                    i.get("value")
                    for i in r.get("identifier") or []
                    if i.get("system") == _SLUG_SYSTEM
                ]
                if patient_id in slugs or r.get("id") == patient_id:
                    ids.add(str(r["id"]))
    return frozenset(ids)


def locate(root: Path, patient_id: str) -> PatientFiles:
    if not _PATIENT_ID.fullmatch(patient_id):
        raise ValueError(f"not a patient id: {patient_id!r}")
    owners = _document_owners(root)
    token = _token(patient_id)
    notes = []
    for f in sorted(root.glob(NOTES_GLOB)):
        owner = owners.get(f.stem)
        if owner is None:
            doc = json.loads(f.read_text())
            owner = owners.get(doc.get("document_id", ""), "")
            if not owner and token.search(doc.get("encounter_id", "") or f.stem):
                owner = patient_id
        if owner == patient_id:
            notes.append(f)
    structural = [
        f
        for f in sorted(root.glob(PATIENTS_GLOB))
        if (json.loads(f.read_text()).get("patient") or {}).get("patient_id") == patient_id
    ]
    return PatientFiles(tuple(notes), tuple(structural), _fhir_ids(root / "fhir_r4", patient_id))


def _fhir_lines(root: Path, files: PatientFiles, patient_id: str):  # type: ignore[no-untyped-def]
    """(ndjson path, kept lines, the patient's lines) for every FHIR file."""
    token = _token(patient_id)
    refs = tuple(f'"Patient/{fid}"' for fid in files.fhir_ids)
    for path in sorted((root / "fhir_r4").glob("*.ndjson")):
        kept: list[str] = []
        theirs: list[str] = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            mine = token.search(line) is not None or any(r in line for r in refs)
            if not mine and files.fhir_ids and path.name == "Patient.ndjson":
                mine = json.loads(line).get("id") in files.fhir_ids
            (theirs if mine else kept).append(line)
        yield path, kept, theirs


def export_patient(root: Path, patient_id: str) -> dict[str, Any]:
    """Every record of the patient, for an access request."""
    files = locate(root, patient_id)
    fhir: dict[str, list[Any]] = {}
    for path, _, theirs in _fhir_lines(root, files, patient_id):
        if theirs:
            fhir[path.stem] = [json.loads(line) for line in theirs]
    return {
        "patient_id": patient_id,
        "notes": [json.loads(f.read_text()) for f in files.notes],
        "structural": [json.loads(f.read_text()) for f in files.structural],
        "fhir": fhir,
    }


@dataclass(frozen=True, slots=True)
class Erased:
    notes: int
    structural: int
    fhir_resources: int


def erase_patient(root: Path, patient_id: str) -> Erased:
    """Remove the patient's records from the serving data (each file replaced atomically)."""
    files = locate(root, patient_id)
    fhir_count = 0
    for path, kept, theirs in list(_fhir_lines(root, files, patient_id)):
        if not theirs:
            continue
        fhir_count += len(theirs)
        tmp = path.with_name(path.name + ".erasing")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    for f in (*files.notes, *files.structural):
        f.unlink()
        if f.parent.is_dir() and not any(f.parent.iterdir()):
            f.parent.rmdir()
    return Erased(len(files.notes), len(files.structural), fhir_count)


def privacy_spend(settings: Any, hospital_id: str, patient_id: str) -> float:
    """The patient's person's ρ spend on the hospital's individual filter (read only). Erasure
    keeps it: the releases it paid for exist (docs/privacy.md)."""
    from fedllm.common.db import make_engine
    from fedllm.common.person_ledger import read_spend
    from fedllm.services.node_worker.records import person_of
    from fedllm.services.node_worker.settings import NodeSettings

    url = NodeSettings().store_url(settings, hospital_id)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return 0.0
    engine = make_engine(url)
    try:
        return read_spend(engine, hospital_id, person_of(patient_id))
    finally:
        engine.dispose()


def subject_hmac(key: bytes, patient_id: str) -> str:
    """How audit events name the patient: keyed with the hospital's secret, never in clear."""
    return hmac.new(key, b"erasure:" + patient_id.encode(), hashlib.sha256).hexdigest()[:32]


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patient", help="a patient's access (export) and erasure requests")
    psub = p.add_subparsers(dest="patient_command", required=True)
    for name, helptext in (
        ("export", "write every record of a patient held by a hospital node (GDPR art. 15)"),
        ("erase", "remove a patient's records from a hospital node's serving data (art. 17)"),
    ):
        c = psub.add_parser(name, help=helptext)
        c.add_argument("--hospital", required=True, help="hospital id from the config")
        c.add_argument("--patient", required=True, help="the patient id (e.g. POP-000001)")
        if name == "export":
            c.add_argument("--out", required=True, help="JSON file to write")
        c.set_defaults(func=_export if name == "export" else _erase)


def _root(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from fedllm.common.config import Settings
    from fedllm.services.node_worker.answering import clinosim_dir, hospital_dir

    settings = Settings()
    settings.hospital(args.hospital)
    return settings, clinosim_dir(settings, args.hospital), hospital_dir(settings, args.hospital)


def _audit(settings: Any, hospital: str, action: str, subject: str, **fields: Any) -> None:
    import asyncio

    from fedllm.common import audit
    from fedllm.common.kafka import Bus, make_producer

    async def send() -> None:
        producer = make_producer(settings)
        await producer.start()
        try:
            await audit.emit(
                Bus(producer, settings.topic_namespace),
                action=action,
                service="node_worker",
                id_parts=(hospital, subject, action),
                hospital_id=hospital,
                subject=subject,
                **fields,
            )
        finally:
            await producer.stop()

    asyncio.run(send())


def _export(args: argparse.Namespace) -> int:
    from fedllm.services.node_worker.records import hospital_key

    settings, root, home = _root(args)
    subject = subject_hmac(hospital_key(home / "partition.key"), args.patient)
    _audit(settings, args.hospital, "patient.exported", subject, outcome="requested")
    data = export_patient(root, args.patient)
    data["privacy_spend_rho"] = privacy_spend(settings, args.hospital, args.patient)
    Path(args.out).write_text(json.dumps(data, indent=1))
    print(
        f"{len(data['notes'])} notes, {len(data['structural'])} structural records, "
        f"{sum(len(v) for v in data['fhir'].values())} FHIR resources, "
        f"privacy spend rho={data['privacy_spend_rho']:.6g} -> {args.out}"
    )
    return 0


def _erase(args: argparse.Namespace) -> int:
    from fedllm.services.node_worker.records import hospital_key

    settings, root, home = _root(args)
    subject = subject_hmac(hospital_key(home / "partition.key"), args.patient)
    _audit(settings, args.hospital, "patient.erasure_requested", subject, outcome="accepted")
    done = erase_patient(root, args.patient)
    _audit(
        settings,
        args.hospital,
        "patient.erased",
        subject,
        outcome="erased",
        records_used=done.notes + done.structural + done.fhir_resources,
    )
    print(
        f"erased {done.notes} notes, {done.structural} structural records, "
        f"{done.fhir_resources} FHIR resources; restart the node (its index is rebuilt) and "
        "bump the hospital's data_version to retire cached answers"
    )
    return 0
