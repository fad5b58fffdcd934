"""Plumbing of the ``guardfab hgs`` admin commands: where the HGS is, and printing.

Connection: ``--dir D`` on the HGS machine (URL from ``hgs.json``'s listen
address, CA ``tls/ca.pem``, token ``tokens/admin.token``), or ``--url``,
``--ca`` and ``--token-file`` from anywhere (e.g. a reviewer with the reviewer
token). Tokens are only ever read from files.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from guardfab.errors import UsageError
from guardfab.files import read_bounded

if TYPE_CHECKING:  # the client (httpx, the engine's errors) loads only when a command runs
    from guardfab.hgs.client import AdminClient, Connection

F = TypeVar("F", bound=Callable[..., Any])
_file = click.Path(dir_okay=False, path_type=Path)


@dataclass(frozen=True)
class ConnectionOptions:
    """The connection options of one command, resolved when the command runs."""

    directory: Path | None
    url: str | None
    ca: Path | None
    token_file: Path | None

    def connection(self) -> Connection:
        """The connection these options name.

        Raises:
            UsageError: neither --dir nor all of --url, --ca and --token-file.
        """
        from guardfab.hgs.client import Connection  # noqa: PLC0415

        if self.directory is not None:
            conn = Connection.from_state_dir(
                self.directory, url=self.url, token_file=self.token_file
            )
            return Connection(conn.url, self.ca or conn.ca, conn.token_file)
        if self.url and self.ca and self.token_file:
            return Connection(self.url, self.ca, self.token_file)
        raise UsageError(
            "say where the HGS is: --dir DIR (on the HGS machine), or --url, --ca and --token-file"
        )

    def client(self) -> AdminClient:
        """An admin API client for these options."""
        from guardfab.hgs.client import AdminClient  # noqa: PLC0415

        return AdminClient(self.connection())


def connection_options(func: F) -> F:
    """Add --dir/--url/--ca/--token-file, passed to the command as ``conn``."""

    @click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="HGS state directory (on the HGS machine): URL, CA and admin token from it.",
    )
    @click.option("--url", default=None, help="HGS base URL, e.g. https://hgs.example:8443.")
    @click.option("--ca", type=_file, default=None, help="CA certificate the HGS's TLS chains to.")
    @click.option(
        "--token-file",
        type=_file,
        default=None,
        help="File holding the admin or reviewer token (never pass a token as an argument).",
    )
    @functools.wraps(func)
    def wrapper(
        *args: Any,
        directory: Path | None,
        url: str | None,
        ca: Path | None,
        token_file: Path | None,
        **kwargs: Any,
    ) -> Any:
        conn = ConnectionOptions(directory, url, ca, token_file)
        return func(*args, conn=conn, **kwargs)

    return wrapper  # type: ignore[return-value]


def call(conn: ConnectionOptions, operation: Callable[[AdminClient], Any]) -> Any:
    """Run one API operation on a fresh client."""
    with conn.client() as client:
        return operation(client)


def table(rows: Iterable[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain text table for a person."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    if len(cells) == 1:
        return "(none)"
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells
    )


def with_notes(text: str, data: Any) -> str:
    """``text`` followed by the warnings and note an answer carries."""
    lines = [text]
    if isinstance(data, dict):
        lines += [f"warning: {w}" for w in data.get("warnings", [])]
        if data.get("note"):
            lines.append(f"note: {data['note']}")
    return "\n".join(lines)


def read_input(path: Path, *, limit: int, what: str) -> bytes:
    """A file given on the command line, bounded."""
    return read_bounded(path, limit=limit, what=what)
