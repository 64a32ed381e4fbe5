"""The hash chain: RFC 8785-style canonical JSON and row_hash = SHA-256(prev_hash ‖ JSON).

Pure functions, no I/O. `prev_hash` enters the digest as its 64 ASCII hex characters.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from decimal import Decimal
from json.encoder import encode_basestring as _string  # type: ignore[attr-defined]
from typing import Any

GENESIS = "0" * 64

# The fields a row's hash covers (chain position included; id, prev_hash and row_hash not).
HASHED_FIELDS = (
    "chain",
    "seq",
    "event_id",
    "action",
    "service",
    "request_id",
    "user_id",
    "role",
    "department",
    "source_address",
    "hospital_id",
    "records_used",
    "outcome",
    "reason",
    "epsilon",
    "delta",
    "rdp_summary",
    "prompt_hmac",
    "occurred_at",
    "details",
    "sealed_text",
    "key_id",
)
# What a replayed row must share with the live one (everything but the chain position).
CONTENT_FIELDS = tuple(f for f in HASHED_FIELDS if f != "seq")


def es_number(x: float | int) -> str:
    """ECMAScript Number-to-string, as RFC 8785 §3.2.2.3 requires (shortest round trip)."""
    if isinstance(x, bool):
        raise TypeError("bool is not a number here")
    if isinstance(x, int):
        x = float(x) if abs(x) >= 2**53 else x
        if isinstance(x, int):
            return str(x)
    if not math.isfinite(x):
        raise ValueError("NaN and infinities have no canonical JSON form")
    r = repr(x)
    if "e" not in r:  # 1e-4 <= |x| < 1e16 or 0: Python's repr is already ES's fixed notation
        return r[:-2] if r.endswith(".0") else r
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    sign_bit, digit_tuple, exp = Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0") or "0"
    strip = len("".join(map(str, digit_tuple))) - len(digits)
    k = len(digits)
    n = int(exp) + strip + k  # value = 0.digits × 10^n
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mant = digits[0] + ("." + digits[1:] if k > 1 else "")
        out = f"{mant}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + out


def _utf16_key(s: str) -> bytes:
    return s.encode("utf-16-be", "surrogatepass")


def _sorted_keys(obj: dict[str, Any]) -> list[str]:
    """Keys in UTF-16 code-unit order (code-point order agrees below U+D800)."""
    keys = list(obj)
    for key in keys:
        if not isinstance(key, str):
            raise TypeError("object keys must be strings")
    joined = "".join(keys)
    if joined and max(joined) >= "\ud800":
        return sorted(keys, key=_utf16_key)
    return sorted(keys)


def _canon(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int | float):
        out.append(es_number(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(_sorted_keys(value)):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _canon(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _canon(item, out)
        out.append("]")
    else:
        raise TypeError(f"no canonical JSON for {type(value).__name__}")


def canonical_json(value: Any) -> bytes:
    """Sorted keys (UTF-16 order), no whitespace, ES number form, UTF-8."""
    out: list[str] = []
    _canon(value, out)
    return "".join(out).encode()


def as_utc(dt: datetime) -> datetime:
    """An aware UTC datetime (SQLite hands back naive ones, stored as UTC)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def iso_ms(dt: datetime) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2024-05-01T12:00:00.123Z."""
    return as_utc(dt).strftime("%Y-%m-%dT%H:%M:%S.") + f"{as_utc(dt).microsecond // 1000:03d}Z"


def hashed_view(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON object a row's hash covers."""
    view = {f: row.get(f) for f in HASHED_FIELDS}
    view["occurred_at"] = iso_ms(row["occurred_at"])
    view["details"] = dict(row.get("details") or {})
    view["epsilon"] = float(view["epsilon"] or 0.0)
    view["delta"] = float(view["delta"] or 0.0)
    view["records_used"] = int(view["records_used"] or 0)
    view["sealed_text"] = view["sealed_text"] or ""
    view["key_id"] = view["key_id"] or ""
    return view


_SORTED_FIELDS = tuple((f, _string(f) + ":") for f in sorted(HASHED_FIELDS))


def canonical_row_json(view: dict[str, Any]) -> bytes:
    """canonical_json(view) for a hashed view (flat, ASCII field names), without the dispatch."""
    parts = []
    for name, prefix in _SORTED_FIELDS:
        v = view[name]
        if isinstance(v, str):
            parts.append(prefix + _string(v))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            parts.append(prefix + es_number(v))
        else:
            parts.append(prefix + canonical_json(v).decode())
    return ("{" + ",".join(parts) + "}").encode()


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """SHA-256(prev_hash ‖ canonical JSON of the row's hashed fields), hex."""
    return hashlib.sha256(
        prev_hash.encode("ascii") + canonical_row_json(hashed_view(row))
    ).hexdigest()


def content_view(row: dict[str, Any]) -> dict[str, Any]:
    """The hashed view without the chain position, for comparing a replay with the live store."""
    view = hashed_view(row)
    view.pop("seq")
    return view
