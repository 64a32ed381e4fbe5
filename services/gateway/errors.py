"""422 bodies that always render: validation errors without the offending input.

A JSON parser accepts bodies the schema refuses and whose values cannot be rendered back as JSON
(NaN, Infinity, lone UTF-16 surrogates). FastAPI's default handler echoes the input and the
constraint context, so such a body would turn into a 500. We answer with the location, type and
message only, each made printable, and never echo what the client sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def printable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Location, type and message of each pydantic error; inputs and contexts dropped."""
    out = []
    for err in errors:
        loc = [p if isinstance(p, int) else printable(str(p)) for p in err.get("loc", ())]
        out.append(
            {
                "type": printable(str(err.get("type", "value_error"))),
                "loc": loc,
                "msg": printable(str(err.get("msg", "invalid value"))),
            }
        )
    return out


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler for RequestValidationError (registered by the app factory)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content={"detail": safe_errors(exc.errors())})
