"""Clinical entities in free text, matched against the **public** ICD-10 / RxNorm vocabularies.

The lexicon is built only from clinosim's shipped code catalogues (the same public candidate
lists the DP histograms use, :func:`~fedllm.services.node_worker.cohort.diagnosis_vocabulary` and
:func:`~fedllm.services.node_worker.cohort.medication_vocabulary`), never from a hospital's records, so
it can be applied to a public question and to private notes alike.

A diagnosis is keyed by its 3-character ICD-10 category (``"I10"``), a medication by its
lower-case generic name (``"amlodipine"``). Matching is on lower-case word n-grams, longest
match first, left to right, without overlaps.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from fedllm.services.node_worker.cohort import (
    _icd_names,
    _short_names,
    diagnosis_category,
    diagnosis_vocabulary,
    medication_vocabulary,
)

__all__ = ["Entity", "EntityKind", "display_name", "find_entities", "lexicon"]

EntityKind = Literal["diagnosis", "medication"]
_WORD = re.compile(r"[a-z0-9]+(?:[./-][a-z0-9]+)*")
_MAX_WORDS = 8
#: Words too generic to name an entity on their own (they appear inside real names).
_TOO_GENERIC = frozenset(
    "disease disorder disorders other unspecified injection solution tablet oral acute chronic "
    "pain fever cough iv".split()
)


@dataclass(frozen=True, slots=True)
class Entity:
    """One match: the vocabulary key, its kind and the character span in the text."""

    key: str
    kind: EntityKind
    start: int
    end: int


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text.lower())]


def _variants(name: str) -> set[str]:
    """``"Hypertension (HTN)"`` → {"hypertension (htn)", "hypertension", "htn"} (normalised)."""
    name = name.strip().lower()
    out = {name}
    if "(" in name and name.endswith(")"):
        head, _, inner = name[:-1].partition("(")
        out |= {head.strip(), inner.strip()}
    for v in list(out):
        for suffix in (", unspecified", " unspecified", ", uncomplicated"):
            if v.endswith(suffix):
                out.add(v.removesuffix(suffix).strip(" ,"))
    return {" ".join(w for w, _, _ in _words(v)) for v in out if v} - {""}


@functools.cache
def lexicon() -> dict[str, tuple[str, EntityKind]]:
    """Normalised name → (key, kind) for every public diagnosis and medication name."""
    out: dict[str, tuple[str, EntityKind]] = {}
    diag_keys = {e.key for e in diagnosis_vocabulary()}
    names = [(code, name) for code, name in _icd_names().items()]
    names += list(_short_names().items())
    names += [(e.key, e.label) for e in diagnosis_vocabulary()]
    for code, name in names:
        cat = diagnosis_category(code)
        if cat not in diag_keys:
            continue
        for v in _variants(name):
            if v not in _TOO_GENERIC and len(v) > 2:
                out.setdefault(v, (cat, "diagnosis"))
    for e in medication_vocabulary():
        for v in _variants(e.label) | _variants(e.key):
            if v not in _TOO_GENERIC and len(v) > 2:
                out.setdefault(v, (e.key, "medication"))
    return out


@functools.cache
def _first_words() -> dict[str, int]:
    """First word of every lexicon name → the longest name (in words) starting with it."""
    out: dict[str, int] = {}
    for name in lexicon():
        ws = name.split(" ")
        out[ws[0]] = max(out.get(ws[0], 0), len(ws))
    return out


def find_entities(text: str, kind: EntityKind | None = None) -> Iterator[Entity]:
    """The public-vocabulary entities named in ``text`` (of one ``kind`` if given), in order."""
    lex, first = lexicon(), _first_words()
    words = _words(text)
    i = 0
    while i < len(words):
        longest = first.get(words[i][0], 0)
        for n in range(min(longest, _MAX_WORDS, len(words) - i), 0, -1):
            hit = lex.get(" ".join(w for w, _, _ in words[i : i + n]))
            if hit is not None:
                if kind is None or hit[1] == kind:
                    yield Entity(hit[0], hit[1], words[i][1], words[i + n - 1][2])
                i += n
                break
        else:
            i += 1


@functools.cache
def display_name(key: str, kind: EntityKind) -> str:
    """A short public display name for a vocabulary key."""
    if kind == "medication":
        labels = {e.key: e.label for e in medication_vocabulary()}
        return labels.get(key, key).split(" (")[0]
    short = _short_names().get(key)
    if short:
        return short.split(" (")[0]
    labels = {e.key: e.label for e in diagnosis_vocabulary()}
    label = labels.get(key, key)
    for suffix in (", unspecified", ", uncomplicated"):
        label = label.removesuffix(suffix)
    return label
