"""What an `InferenceResult` is: the `kind` field, and the one function every reader uses.

`fedllm.node-results` carries four kinds of record, `fedllm.results` a fifth:

- ``answer``: a node's outcome for a whole request (one attempt): ``ok``, or a failure;
- ``part``: a node's outcome for one part of a fan-out (``status`` ``partial`` when released),
  for the router to combine; never the end of a request by itself;
- ``verdict``: the router's failure of a request (retries exhausted, no node, a failed
  fan-out); it carries the spend of whatever was released on the way;
- ``combined``: the router's combined answer of a fan-out's parts;
- ``final``: the accountant's terminal result (``fedllm.results``).

Every writer sets ``kind``. A record from a writer that predates the field has ``kind`` ""; only
then is the kind inferred, the way readers used to tell them apart: ``partial`` is a part, an
empty ``node_id`` the router's verdict, joined hospitals (``"a,b"``) a combined answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

ResultKind = Literal["answer", "part", "verdict", "combined", "final"]

ANSWER: Final = "answer"
PART: Final = "part"
VERDICT: Final = "verdict"
COMBINED: Final = "combined"
FINAL: Final = "final"
_KINDS: Final[dict[str, ResultKind]] = {
    ANSWER: ANSWER,
    PART: PART,
    VERDICT: VERDICT,
    COMBINED: COMBINED,
    FINAL: FINAL,
}


def result_kind(record: Mapping[str, Any]) -> ResultKind:
    """The record's kind: its ``kind`` field, or for a legacy record (``""``) the kind its
    ``status`` and ``node_id`` imply. An unknown kind raises ``ValueError``."""
    kind = str(record.get("kind") or "")
    if kind:
        if kind not in _KINDS:
            raise ValueError(f"unknown result kind {kind!r}")
        return _KINDS[kind]
    node_id = str(record.get("node_id") or "")
    if record.get("status") == "partial":
        return PART
    if node_id == "":
        return VERDICT
    if "," in node_id:
        return COMBINED
    return ANSWER


def from_router(record: Mapping[str, Any]) -> bool:
    """A record the router wrote itself (a verdict or a combined answer)."""
    return result_kind(record) in (VERDICT, COMBINED)
