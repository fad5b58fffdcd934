"""The management API's directory: TLS material, role tokens and their digests.

Layout (``guardfab host manage init``)::

    D/ca.pem                  the private CA clients trust (public)
    D/server.pem, server.key  the API's certificate chain and key (key 0600)
    D/admin.token             the fabric administrator's token (0600): may change VMs
    D/reviewer.token          a read-only token (0600): may list and show VMs
    D/access.json             SHA-256 of each valid token and its role (0600)
    D/audit.db                the audit log (created by the agent)

The directory is created complete or not at all. The agent reads ``access.json``
on every request, so a token rotated with ``host manage rotate`` is refused at
once, without restarting the agent.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

from guardfab.access.tls import make_private_ca_and_server
from guardfab.access.tokens import (
    ACCESS_FILE,
    AccessTable,
    issue_tokens,
    new_token,
    token_digest,
    token_files,
    write_access_table,
)
from guardfab.errors import UsageError
from guardfab.files import PRIVATE, PUBLIC, atomic_write, create_directory_atomically

ROLES = ("admin", "reviewer")
#: What the admin role may do beyond the reviewer's reads.
ADMIN_ROLES = ("admin",)
READ_ROLES = ("admin", "reviewer")


class ManagementFiles:
    """Paths of one management directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    @property
    def ca(self) -> Path:
        """The CA certificate clients verify the API with."""
        return self.dir / "ca.pem"

    @property
    def server_cert(self) -> Path:
        """The API's certificate chain."""
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        """The API's TLS key (0600)."""
        return self.dir / "server.key"

    @property
    def access_file(self) -> Path:
        """The digests of valid tokens and their roles."""
        return self.dir / ACCESS_FILE

    @property
    def audit_db(self) -> Path:
        """The SQLite store of the audit log."""
        return self.dir / "audit.db"

    def token_file(self, role: str) -> Path:
        """The token file of ``role``."""
        if role not in ROLES:
            raise UsageError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        return self.dir / f"{role}.token"

    def ready(self) -> bool:
        """Whether the directory was initialized (the agent serves the API only then)."""
        return all(p.is_file() for p in (self.ca, self.server_cert, self.server_key))

    def access(self) -> AccessTable:
        """The current access table (read from disk each time: rotation applies at once)."""
        return AccessTable.load(self.access_file)


def default_server_names() -> list[str]:
    """Names the API is reached by on this machine: loopback and the host name."""
    return ["127.0.0.1", "localhost", socket.gethostname()]


def init_management(
    directory: Path, server_names: list[str] | None = None, *, now: datetime.datetime | None = None
) -> ManagementFiles:
    """Create a complete management directory (TLS, tokens, access table).

    Raises:
        UsageError: ``directory`` exists already.
        FormatError: no server name.
    """
    files = ManagementFiles(directory)
    when = now or datetime.datetime.now(datetime.UTC)
    names = server_names or default_server_names()
    tls = make_private_ca_and_server("guardfab host management CA", names, now=when)
    tokens, table = issue_tokens(ROLES)
    contents = {
        "ca.pem": (tls.ca_pem, PUBLIC),
        "server.pem": (tls.server_chain_pem, PUBLIC),
        "server.key": (tls.server_key_pem, PRIVATE),
        ACCESS_FILE: (table.to_json(), PRIVATE),
        **token_files(tokens),
    }
    create_directory_atomically(files.dir, contents)
    return files


def rotate_token(files: ManagementFiles, role: str) -> Path:
    """Give ``role`` a new token; the old one is refused from the next request on.

    The new digest replaces the old in ``access.json`` first, then the token file
    is rewritten: a crash in between leaves the old token revoked (fail closed).
    """
    path = files.token_file(role)
    token = new_token()
    table = files.access()
    entries = {d: r for d, r in table.entries.items() if r != role}
    entries[token_digest(token)] = role
    write_access_table(files.access_file, AccessTable(entries))
    atomic_write(path, token.encode() + b"\n", mode=PRIVATE, overwrite=True)
    return path
