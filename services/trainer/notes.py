"""The hospital's own notes grouped by patient, tokenised into short training rows.

Reads clinosim output like the node worker does (services do not share code): notes under
``cif/narratives/template/documents``, owners from ``cif/structural/patients``. A patient is the
unit of privacy, so everything downstream is keyed by patient id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

NOTES_GLOB = "cif/narratives/template/documents/*/*.json"
PATIENTS_GLOB = "cif/structural/patients/*.json"
_PATIENT_IN_ID = re.compile(r"(POP-\d+)")


def _text(narrative: dict[str, Any]) -> str:
    text = (narrative.get("text") or "").strip()
    if text:
        return text
    sections = narrative.get("sections") or {}
    return "\n".join(f"{k.capitalize()}: {v}" for k, v in sections.items() if v).strip()


def notes_by_patient(clinosim_dir: Path) -> dict[str, list[str]]:
    """patient id -> that patient's note texts (sorted by note id); a newborn counts with the
    mother (``POP-7-BABY`` is ``POP-7``), as linked records are one person."""
    root = Path(clinosim_dir)
    owners: dict[str, str] = {}
    for f in sorted(root.glob(PATIENTS_GLOB)):
        data = json.loads(f.read_text())
        pid = (data.get("patient") or {}).get("patient_id", "")
        for doc in data.get("documents") or []:
            owners[doc["document_id"]] = doc.get("patient_id") or pid
    out: dict[str, list[str]] = {}
    for f in sorted(root.glob(NOTES_GLOB)):
        doc = json.loads(f.read_text())
        text = _text(doc.get("narrative") or {})
        if not text:
            continue
        nid = doc.get("document_id") or f.stem
        owner = owners.get(nid) or doc.get("encounter_id", "") or nid
        m = _PATIENT_IN_ID.search(owner)
        if m is None:
            raise ValueError(f"cannot tell which patient note {nid!r} belongs to")
        out.setdefault(m.group(1), []).append(text)
    return out


def patient_rows(
    notes: dict[str, list[str]], tokenizer: Any, *, seq_len: int, max_rows: int
) -> dict[str, torch.Tensor]:
    """patient -> LongTensor (rows, seq_len): the patient's notes, each cut into windows of
    ``seq_len`` tokens, at most ``max_rows`` windows per patient (a fixed cap keeps one
    patient's share of a batch bounded; the clip bounds its gradient whatever the count)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, torch.Tensor] = {}
    for pid, texts in sorted(notes.items()):
        rows: list[list[int]] = []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids), seq_len):
                chunk = ids[i : i + seq_len]
                if len(chunk) >= 8:
                    rows.append(chunk + [pad] * (seq_len - len(chunk)))
                if len(rows) >= max_rows:
                    break
            if len(rows) >= max_rows:
                break
        if rows:
            out[pid] = torch.tensor(rows, dtype=torch.long)
    return out
