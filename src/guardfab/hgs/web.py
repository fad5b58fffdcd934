"""HTTP plumbing shared by the HGS APIs: error bodies, size limits, access roles.

Error bodies carry only the typed error's message and hint, which by project rule
never hold secrets; anything unexpected becomes a bare 500 and is logged here,
never echoed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardfab.errors import (
    FormatError,
    GuardfabError,
    InvalidInputError,
    NotAuthorizedError,
    PolicyError,
    TransportError,
    UsageError,
)

LOG = logging.getLogger("guardfab.hgs")

#: No HGS request is legitimately bigger: evidence with an 8 MiB event log, base64url.
MAX_BODY_BYTES = 12 * 1024 * 1024


def status_for(exc: GuardfabError) -> int:
    """The HTTP status a typed error maps to (first matching class wins)."""
    for cls, status in _STATUS_TABLE:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: GuardfabError) -> dict[str, Any]:
    """A JSON error body: type, message and hint (no stack, no input echo)."""
    return {"error": {"type": type(exc).__name__, "message": str(exc), "hint": exc.hint}}


async def guardfab_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI exception handler for every GuardfabError."""
    assert isinstance(exc, GuardfabError)
    return JSONResponse(error_body(exc), status_code=status_for(exc))


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Log an unexpected error server-side; answer without details."""
    LOG.error("unexpected error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    body = {"error": {"type": "InternalError", "message": "internal error", "hint": ""}}
    return JSONResponse(body, status_code=500)


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Name what is wrong in a request body without echoing any of it back.

    FastAPI's default 422 body repeats the offending input, which may be a
    health certificate or a key protector; here only field paths and messages go out.
    """
    assert isinstance(exc, RequestValidationError)
    problems = [
        f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
        for error in exc.errors()[:10]
    ]
    body = {
        "error": {
            # A FormatError subclass on the wire (see guardfab.hgs.client).
            "type": "InvalidRequestError",
            "message": "invalid request: " + "; ".join(problems),
            "hint": "see the OpenAPI document at /openapi.json",
        }
    }
    return JSONResponse(body, status_code=422)


class BodyLimitMiddleware:
    """Refuse request bodies over a limit (413) before the application reads them."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(send, self.limit)
            return
        await self.app(scope, _counting(receive, self.limit), send)


def _counting(receive: Receive, limit: int) -> Callable[[], Awaitable[Message]]:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLargeError
        return message

    return wrapped


class _BodyTooLargeError(FormatError):
    def __init__(self) -> None:
        super().__init__("request body too large")


_STATUS_TABLE: tuple[tuple[type[GuardfabError], int], ...] = (
    (_BodyTooLargeError, 413),
    (NotAuthorizedError, 403),
    (PolicyError, 403),
    (FormatError, 400),
    (InvalidInputError, 422),
    (UsageError, 409),
    (TransportError, 503),
)


async def _too_large(send: Send, limit: int) -> None:
    body = (
        b'{"error":{"type":"FormatError","message":"request body larger than '
        + str(limit).encode()
        + b' bytes","hint":""}}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
