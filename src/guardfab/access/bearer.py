"""Bearer-token roles for FastAPI routes, and the strict request-body base class.

A route names the roles it admits; the dependency reads ``Authorization: Bearer
<token>``, finds its role in the service's :class:`~guardfab.access.tokens.AccessTable`
and refuses anything else with a :class:`~guardfab.errors.NotAuthorizedError`
(HTTP 403 through the services' error handlers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Header, Request
from pydantic import BaseModel, ConfigDict

from guardfab.access.tokens import AccessTable
from guardfab.errors import NotAuthorizedError

#: Finds the access table of the service serving a request.
TableOf = Callable[[Request], AccessTable]


class Strict(BaseModel):
    """Request bodies reject unknown fields."""

    model_config = ConfigDict(extra="forbid")


class MissingCredentialError(NotAuthorizedError):
    """No bearer token on a request that needs one."""

    hint = "send 'Authorization: Bearer <token>' with an admin or reviewer token"


def bearer_token(authorization: str | None, *, what: str, hint: str | None = None) -> str:
    """The token of an ``Authorization: Bearer`` header; raises if there is none."""
    if not authorization or not authorization.startswith("Bearer "):
        raise MissingCredentialError(f"{what} is required", hint=hint)
    return authorization.removeprefix("Bearer ").strip()


def role_of_request(
    table: AccessTable,
    authorization: str | None,
    roles: tuple[str, ...],
    *,
    what: str,
    hint: str | None = None,
) -> str:
    """The role of the request's bearer token if it is one of ``roles``; raises otherwise."""
    role = table.role_of(bearer_token(authorization, what=what, hint=hint))
    if role not in roles:
        raise NotAuthorizedError(f"the {role} role may not do this")
    return role


def require_role(
    table_of: TableOf, *roles: str, what: str, hint: str | None = None
) -> Callable[..., str]:
    """A dependency that admits only bearer tokens of ``roles``; returns the role.

    ``what`` names the credential in the refusal ("an HGS access token"),
    ``hint`` says where to get one.
    """

    def dependency(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
        return role_of_request(table_of(request), authorization, roles, what=what, hint=hint)

    return dependency
