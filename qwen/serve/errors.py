"""Errors as the OpenAI API sends them: a status code and an ``{"error": {...}}`` body.

A route raises :class:`APIError`; :func:`install_error_handlers` turns it (and FastAPI's own validation errors)
into the response. A stream already under way sends ``APIError.body()`` as its last event instead.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def install_error_handlers(app: FastAPI) -> None:
    """Answer an :class:`APIError` with its status and body (401 with WWW-Authenticate, 503 with Retry-After),
    and a body that is not valid JSON or does not fit the request model with a 400 in the same format."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "1"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(APIError(400, "The request body is not valid JSON.").body(), status_code=400)
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in errors)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)
