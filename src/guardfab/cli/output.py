"""Shared CLI plumbing: ``--json``, error display and exit codes.

Commands stay thin: parse, call the library, then print through :func:`emit`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from guardfab.errors import GuardfabError, InvalidInputError, TransportError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: 1 = invalid/untrusted input, 2 = usage (as click), 3 = transport.
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_TRANSPORT = 3

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
)


def emit(as_json: bool, data: Any, human: str | Callable[[], str]) -> None:
    """Print ``data`` as JSON, or the human text (a string or a function making one)."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(human() if callable(human) else human)


def handle_errors(func: F) -> F:
    """Turn a GuardfabError into its diagnostics on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GuardfabError as exc:
            click.echo(exc.diagnostics(), err=True)
            sys.exit(_exit_code(exc))

    return wrapper  # type: ignore[return-value]


def _exit_code(exc: GuardfabError) -> int:
    if isinstance(exc, InvalidInputError):
        return EXIT_INVALID
    if isinstance(exc, TransportError):
        return EXIT_TRANSPORT
    return EXIT_USAGE
