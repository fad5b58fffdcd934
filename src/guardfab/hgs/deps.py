"""What every HGS route module shares: the service lookup, access roles, strict bodies.

Kept apart from :mod:`guardfab.hgs.app` so the route modules (admin, key
protection) and the app factory can import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import FastAPI, Header, Request
from pydantic import BaseModel, ConfigDict

from guardfab.errors import NotAuthorizedError
from guardfab.hgs.service import HgsService


class Strict(BaseModel):
    """Request bodies reject unknown fields."""

    model_config = ConfigDict(extra="forbid")


class MissingCredentialError(NotAuthorizedError):
    """No bearer token on an admin request."""

    hint = "send 'Authorization: Bearer <token>' with an HGS admin or reviewer token"


def service_of_app(app: FastAPI) -> HgsService:
    """The HgsService bound to ``app``."""
    service: HgsService = app.state.service
    return service


def service_of(request: Request) -> HgsService:
    """The HgsService bound to the running app."""
    return service_of_app(request.app)


def require_role(*roles: str) -> Callable[..., str]:
    """A dependency that admits only bearer tokens of ``roles``; returns the role."""

    def dependency(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            raise MissingCredentialError("an HGS access token is required")
        role = service_of(request).access.role_of(authorization.removeprefix("Bearer ").strip())
        if role not in roles:
            raise NotAuthorizedError(f"the {role} role may not do this")
        return role

    return dependency


ADMIN = require_role("admin")
READER = require_role("admin", "reviewer")
