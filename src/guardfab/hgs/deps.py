"""What every HGS route module shares: the service lookup, access roles, strict bodies.

Roles and strict bodies are the shared :mod:`guardfab.access.bearer`, bound here
to the HGS's access table.

Kept apart from :mod:`guardfab.hgs.app` so the route modules (admin, key
protection) and the app factory can import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request

from guardfab.access import bearer
from guardfab.access.bearer import MissingCredentialError, Strict
from guardfab.access.tokens import AccessTable
from guardfab.hgs.service import HgsService

_MISSING_HINT = "send 'Authorization: Bearer <token>' with an HGS admin or reviewer token"


def service_of_app(app: FastAPI) -> HgsService:
    """The HgsService bound to ``app``."""
    service: HgsService = app.state.service
    return service


def service_of(request: Request) -> HgsService:
    """The HgsService bound to the running app."""
    return service_of_app(request.app)


def _access_of(request: Request) -> AccessTable:
    return service_of(request).access


def require_role(*roles: str) -> Callable[..., str]:
    """A dependency that admits only bearer tokens of ``roles``; returns the role."""
    return bearer.require_role(_access_of, *roles, what="an HGS access token", hint=_MISSING_HINT)


ADMIN = require_role("admin")
READER = require_role("admin", "reviewer")

__all__ = [
    "ADMIN",
    "READER",
    "MissingCredentialError",
    "Strict",
    "require_role",
    "service_of",
    "service_of_app",
]
