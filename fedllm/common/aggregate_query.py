"""The aggregate-query grammar, shared by the gateway (which refuses a bad query with a 422
before anything is charged) and the node worker (which answers it).

Query (the request's prompt when ``kind == "aggregate"``; a dict or its JSON text)::

    {"op": "count" | "sum" | "mean" | "histogram",
     "field": "age" | "encounters" | "diagnoses" | "medications"   # sum/mean
              | "diagnosis" | "medication",                          # histogram
     "where": {"diagnosis": "E11" | "diabetes", "medication": "metformin",
               "age_min": 40, "age_max": 65, "sex": "F"},
     "bounds": [lo, hi],        # optional, sum/mean: public clipping range of the field
     "top": 5,                  # optional, histogram: how many candidates the text names
     "max_per_patient": 8}      # optional, histogram: contribution cap K

Pure: no records, no I/O. :func:`parse_query` raises ``ValueError`` (never anything else) for
any input, naming the problem; the message is safe to show the caller (no record data).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "FIELD_BOUNDS",
    "HISTOGRAM_FIELDS",
    "OPS",
    "WHERE_KEYS",
    "AggregateQuery",
    "PatientLike",
    "parse_query",
]


class _Coded(Protocol):
    @property
    def code(self) -> str: ...
    @property
    def name(self) -> str: ...


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class PatientLike(Protocol):
    """What a ``where`` filter reads from a patient row (the node's ``PatientRecord``)."""

    @property
    def age(self) -> int | None: ...
    @property
    def sex(self) -> str: ...
    @property
    def diagnoses(self) -> Sequence[_Coded]: ...
    @property
    def medications(self) -> Sequence[_Named]: ...


OPS = ("count", "sum", "mean", "histogram")
#: Numeric fields and their default public clipping range [lo, hi] (grid step 1: all integers).
FIELD_BOUNDS: dict[str, tuple[float, float]] = {
    "age": (0, 100),
    "encounters": (0, 25),
    "diagnoses": (0, 20),
    "medications": (0, 30),
}
#: Histogram fields and their default contribution cap K.
HISTOGRAM_FIELDS: dict[str, int] = {"diagnosis": 8, "medication": 8}
WHERE_KEYS = ("diagnosis", "medication", "age_min", "age_max", "sex")
_QUERY_KEYS = ("op", "field", "where", "bounds", "top", "max_per_patient")
_SEXES = ("F", "M", "O", "U")
_MAX_TEXT = 200


@dataclass(frozen=True, slots=True)
class AggregateQuery:
    """A validated query (see the module docstring)."""

    op: str
    field: str | None = None
    diagnosis: str | None = None
    medication: str | None = None
    age_min: int | None = None
    age_max: int | None = None
    sex: str | None = None
    bounds: tuple[float, float] | None = None
    top: int = 5
    max_per_patient: int | None = None

    @property
    def key(self) -> str:
        """Canonical JSON of the query: answers to the same query can be combined."""
        return json.dumps(
            {s: getattr(self, s) for s in self.__slots__ if s != "top"},
            sort_keys=True,
            separators=(",", ":"),
        )

    def matches(self, p: PatientLike) -> bool:
        """Whether a patient satisfies the ``where`` filters."""
        if self.sex is not None and p.sex != self.sex:
            return False
        if self.age_min is not None or self.age_max is not None:
            if p.age is None:
                return False
            if self.age_min is not None and p.age < self.age_min:
                return False
            if self.age_max is not None and p.age > self.age_max:
                return False
        if self.diagnosis is not None:
            q = self.diagnosis.casefold()
            if not any(
                d.code.casefold().startswith(q) or q in d.name.casefold() for d in p.diagnoses
            ):
                return False
        if self.medication is not None:
            q = self.medication.casefold()
            if not any(q in m.name.casefold() for m in p.medications):
                return False
        return True


def _text(where: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{where}.{key} must be a non-empty string")
    if len(v) > _MAX_TEXT:
        raise ValueError(f"{where}.{key} is longer than {_MAX_TEXT} characters")
    return v.strip()


def _int(where: str, key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{where}.{key} must be an integer in [{lo}, {hi}]; got {_show(v)}")
    return v


def _show(v: Any) -> str:
    """A short, printable rendering of a caller's value for an error message."""
    try:
        text = repr(v)
    except RecursionError:
        text = type(v).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown(what: str, got: Iterable[str], allowed: Sequence[str]) -> None:
    extra = sorted(_show(k) for k in set(got) - set(allowed))
    if extra:
        raise ValueError(f"unknown {what} {extra[:5]}; allowed: {list(allowed)}")


def parse_query(query: Mapping[str, Any] | str) -> AggregateQuery:
    """Validate a query dict (or its JSON text); raises ``ValueError`` naming the problem."""
    if isinstance(query, str):
        try:
            query = json.loads(query)
        except json.JSONDecodeError as exc:
            raise ValueError(f"aggregate query is not valid JSON: {exc.msg}") from None
        except (ValueError, RecursionError):  # huge integers, nesting too deep
            raise ValueError("aggregate query is not valid JSON (too large or too deep)") from None
    if not isinstance(query, Mapping):
        raise ValueError("aggregate query must be a JSON object")
    _unknown("query key(s)", query, _QUERY_KEYS)
    op = query.get("op")
    if op not in OPS:
        raise ValueError(f"unknown op {_show(op)}; allowed: {list(OPS)}")
    field = query.get("field")
    if field is not None and not isinstance(field, str):
        raise ValueError(f"field must be a string; got {type(field).__name__}")
    bounds: tuple[float, float] | None = None
    if op == "count":
        if field is not None:
            raise ValueError("op 'count' takes no field")
    elif op in ("sum", "mean"):
        if field not in FIELD_BOUNDS:
            raise ValueError(
                f"unknown field {_show(field)} for {op}; allowed: {list(FIELD_BOUNDS)}"
            )
        bounds = _bounds(query.get("bounds", FIELD_BOUNDS[field]))
    elif field not in HISTOGRAM_FIELDS:
        raise ValueError(
            f"unknown field {_show(field)} for histogram; allowed: {list(HISTOGRAM_FIELDS)}"
        )
    if op != "histogram" and ("top" in query or "max_per_patient" in query):
        raise ValueError("'top' and 'max_per_patient' apply to op 'histogram' only")
    if op not in ("sum", "mean") and "bounds" in query:
        raise ValueError("'bounds' applies to ops 'sum' and 'mean' only")
    top = _int("query", "top", query.get("top", 5), 1, 50)
    k = query.get("max_per_patient")
    if op == "histogram":
        assert field is not None  # a histogram names its field (checked above)
        k = _int("query", "max_per_patient", HISTOGRAM_FIELDS[field] if k is None else k, 1, 50)

    where = query.get("where") or {}
    if not isinstance(where, Mapping):
        raise ValueError("where must be a JSON object")
    _unknown("filter(s)", where, WHERE_KEYS)
    f: dict[str, Any] = {}
    for key in ("diagnosis", "medication"):
        if key in where:
            f[key] = _text("where", key, where[key])
    for key in ("age_min", "age_max"):
        if key in where:
            f[key] = _int("where", key, where[key], 0, 150)
    if "age_min" in f and "age_max" in f and f["age_min"] > f["age_max"]:
        raise ValueError("where.age_min must be <= where.age_max")
    if "sex" in where:
        if where["sex"] not in _SEXES:
            raise ValueError(f"where.sex must be one of {list(_SEXES)}; got {_show(where['sex'])}")
        f["sex"] = where["sex"]
    return AggregateQuery(op=op, field=field, bounds=bounds, top=top, max_per_patient=k, **f)


def _bounds(b: Any) -> tuple[float, float]:
    ok = (
        isinstance(b, Sequence)
        and not isinstance(b, str)
        and len(b) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in b)
        and all(abs(x) <= 1e6 and math.isfinite(x) for x in b)  # abs first: huge ints
    )
    if not ok or not b[0] < b[1]:
        raise ValueError(
            f"bounds must be [lo, hi] with finite lo < hi, |lo|,|hi| <= 1e6; got {_show(b)}"
        )
    return float(b[0]), float(b[1])
