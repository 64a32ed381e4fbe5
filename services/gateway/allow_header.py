"""405 answers list every method the path supports, across routers.

Starlette builds `Allow` from the first route whose path matches, so a path served by two
routers (e.g. GET and PUT /v1/admin/config) would advertise only one method.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def install(app: FastAPI) -> None:
    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        methods = [
            method
            for method in METHODS
            if any(
                route.matches({**request.scope, "method": method})[0] == Match.FULL
                for route in app.router.routes
            )
        ]
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else "Method Not Allowed"
        return JSONResponse(
            status_code=405,
            content={"detail": detail},
            headers={"Allow": ", ".join(methods)},
        )

    app.add_exception_handler(405, method_not_allowed)
