"""The management API's client (what ``guardfab vm`` uses): HTTPS with the agent's CA, a token file.

A refused request raises the server's typed error again (its message and hint
as the agent wrote them); an agent that does not answer raises
:class:`ManagementUnavailableError` (a transport error, exit code 3).
"""

from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from guardfab.errors import TransportError, UsageError
from guardfab.files import read_bounded
from guardfab.hgs.client import error_from_response
from guardfab.host.config import HostConfig, check_listen
from guardfab.host.manage.api import PREFIX
from guardfab.host.manage.material import ManagementFiles

DEFAULT_TIMEOUT = 300.0  # a migration or a checkpoint takes seconds; a provisioning copies a disk


class ManagementUnavailableError(TransportError):
    """The agent's management API did not answer (or its TLS did not verify)."""

    hint = (
        "is the agent running ('guardfab host agent' / systemctl status guardfab-host-agent) "
        "with its management directory initialized ('guardfab host manage init')?"
    )


class ManagementServerError(TransportError):
    """The agent failed while handling the request (5xx)."""

    hint = "look at the agent's log (journalctl -u guardfab-host-agent)"


def read_token_file(path: Path) -> str:
    """A token from its file, which must be readable by its owner only (0600).

    Raises:
        UsageError: missing, readable by group or others, or empty.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path} ({exc.strerror})") from exc
    if stat.S_IMODE(mode) & 0o077:
        raise UsageError(f"the token file {path} is readable by others", hint=f"chmod 600 {path}")
    text = read_bounded(path, limit=4096, what="token file").decode("utf-8", "replace").strip()
    if not text or not text.isascii() or not text.isprintable():
        raise UsageError(f"the token file {path} holds no token")
    return text


def url_for(listen: str) -> str:
    """The HTTPS URL of a ``HOST:PORT`` listen address, from this machine."""
    host, port = check_listen(listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    return f"https://{f'[{host}]' if ':' in host else host}:{port}"


@dataclass(frozen=True)
class ManagementConnection:
    """Where the API is and how to talk to it: URL, CA certificate, token file."""

    url: str
    ca: Path
    token_file: Path

    @classmethod
    def of_host(
        cls,
        config: HostConfig,
        *,
        url: str | None = None,
        ca: Path | None = None,
        token_file: Path | None = None,
        role: str = "admin",
    ) -> ManagementConnection:
        """From the host configuration; each part may be overridden."""
        files = ManagementFiles(config.management_dir)
        return cls(
            url or url_for(config.manage_listen),
            ca or files.ca,
            token_file or files.token_file(role),
        )


class ManagementClient:
    """Calls ``/manage/v1``; one method per operation."""

    def __init__(self, connection: ManagementConnection, *, timeout: float = DEFAULT_TIMEOUT):
        token = read_token_file(connection.token_file)
        try:
            context = ssl.create_default_context(cafile=str(connection.ca))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"cannot load the management CA certificate {connection.ca}",
                hint="give --ca FILE (ca.pem of the agent's management directory)",
            ) from exc
        self.url = connection.url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url + PREFIX,
            verify=context,
            timeout=timeout,
            headers={"Authorization": f"Bearer {token}"},
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; the answer's JSON, or the server's typed error raised again."""
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ManagementUnavailableError(
                f"the management API at {self.url} did not answer ({type(exc).__name__})"
            ) from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 500:
            raise _server_error(response.status_code, data)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, data)
        return data

    def list(self) -> list[dict[str, Any]]:
        """The VMs on the host."""
        data: list[dict[str, Any]] = self.call("GET", "/vms")
        return data

    def show(self, name: str) -> dict[str, Any]:
        """One VM."""
        return dict(self.call("GET", f"/vms/{name}"))

    def provision(self, body: dict[str, Any]) -> dict[str, Any]:
        """Provision a VM (see ``ProvisionBody``)."""
        return dict(self.call("POST", "/vms", body))

    def action(self, name: str, operation: str, body: dict[str, Any] | None = None) -> Any:
        """``POST /vms/NAME/OPERATION`` (start, stop, checkpoint, restore, migrate, console...)."""
        return self.call("POST", f"/vms/{name}/{operation}", body)

    def settings(self, name: str, *, console: bool) -> dict[str, Any]:
        """Change a VM's settings."""
        return dict(self.call("PATCH", f"/vms/{name}/settings", {"console": console}))


def _server_error(status: int, data: Any) -> ManagementServerError:
    """A 5xx answer: the agent's error type, message and hint, kept."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return ManagementServerError(f"the agent failed (HTTP {status})")
    kind, message = str(error.get("type", "")), str(error.get("message", ""))
    hint = str(error.get("hint") or "") or None
    return ManagementServerError(f"the agent failed: {kind}: {message}", hint=hint)


__all__ = [
    "ManagementClient",
    "ManagementConnection",
    "ManagementServerError",
    "ManagementUnavailableError",
    "read_token_file",
    "url_for",
]
