"""A lean path for the hottest host-facing routes: same bodies, checks and answers, less framework.

Every attestation is two requests (challenge, attest) and every key release one;
FastAPI's per-request machinery (dependency solving, its exception and exit-stack
middleware, response validation) cost about as much as a host-key attestation's
own checks. This ASGI middleware answers exactly those routes itself, for
well-formed requests only:

* the body is read whole (the outer :class:`~guardfab.hgs.web.BodyLimitMiddleware`
  still bounds it), must be ``application/json``, parse, and validate against the
  route's own request model (the same pydantic model, so the same strict checks,
  unknown fields refused, same maximum lengths);
* the route's answer comes from the same function the FastAPI route calls;
* a typed error goes to the app's own exception handler for its class, so a
  refusal reads exactly as it would through FastAPI.

Anything else -- another path or method, another content type, a body that does
not parse or validate -- is handed on to FastAPI unchanged (the body replayed),
which answers it as it always did: the OpenAPI document still describes these
routes from their FastAPI declarations, and every error body comes from one place.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: What a lean route runs: the validated body (None for a route without one) -> answer
#: (or an awaitable of it, for a route whose commit is shared with the loop turn's others).
Handler = Callable[[Any], Response | Awaitable[Response]]


@dataclass(frozen=True)
class LeanRoute:
    """One POST route answered here: its request model (None: no body) and its handler."""

    model: type[BaseModel] | None
    handle: Handler


class LeanRoutes:
    """ASGI middleware answering well-formed POSTs to ``routes`` (path -> LeanRoute)."""

    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI, routes: Mapping[str, LeanRoute]):
        self.app = app
        self.fastapi_app = fastapi_app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            answer = await _lean_answer(route, scope, receive)
        except Exception as exc:  # the body limit's error while reading, or the route's
            handler = self._handler_for(exc)
            if handler is None:
                raise  # unexpected: ServerErrorMiddleware answers a bare 500, as for any route
            answer = await handler(Request(scope), exc)
        if isinstance(answer, _Unparsed):
            await self.app(scope, _replay(answer.body, answer.complete, receive), send)
            return
        await answer(scope, receive, send)

    def _handler_for(
        self, exc: Exception
    ) -> Callable[[Request, Exception], Awaitable[Response]] | None:
        """The app's handler for ``exc``'s class, found as Starlette's ExceptionMiddleware would."""
        handlers = self.fastapi_app.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None  # ServerErrorMiddleware's, not a typed refusal
            handler = handlers.get(cls)
            if handler is not None:
                return handler  # type: ignore[return-value]
        return None


@dataclass(frozen=True)
class _Unparsed:
    """A request for FastAPI to answer: what was read of it, and whether that is all."""

    body: bytes
    complete: bool


async def _lean_answer(route: LeanRoute, scope: Scope, receive: Receive) -> Response | _Unparsed:
    """The route's answer, or what was read of a request the lean path does not take."""
    if route.model is None:  # a route without a body leaves it unread, as FastAPI does
        return await _answered(route.handle(None))
    body, complete = await _read_body(receive)
    parsed = _parsed(route.model, scope, body) if complete else None
    if parsed is None:
        return _Unparsed(body, complete)
    return await _answered(route.handle(parsed))


async def _answered(answer: Response | Awaitable[Response]) -> Response:
    return answer if isinstance(answer, Response) else await answer


def _parsed(model: type[BaseModel], scope: Scope, body: bytes) -> BaseModel | None:
    """The body validated by ``model``, or None to let FastAPI answer."""
    if not body or not _is_json(scope):
        return None
    try:
        return model.model_validate(json.loads(body))
    except (ValueError, ValidationError):  # JSONDecodeError and UnicodeDecodeError too
        return None


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            media_type: bytes = value.split(b";", 1)[0].strip().lower()
            return media_type == b"application/json"
    return False


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body, and whether it arrived whole (False: the client disconnected)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """A receive that gives what was read once (the body, or the disconnect), then the real one."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if complete:
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}
        return await receive()

    return replayed
