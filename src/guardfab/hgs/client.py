"""A small client for the HGS admin API over HTTPS (what ``guardfab hgs ...`` uses).

TLS is verified against the HGS CA (``tls/ca.pem`` of the state directory, or
one the administrator was given); the bearer token is read from a file, never
taken from the command line (it would show in ``ps`` and shell history), and
never printed or put in an error. Failures come back typed:

* transport problems (refused connection, TLS verification, timeouts, 5xx)
  raise :class:`HgsUnreachableError` / :class:`HgsTlsError` /
  :class:`HgsServerError`, all :class:`~guardfab.errors.TransportError`, with a hint;
* a refused request (4xx) re-raises the server's typed error (its class by
  name, else by status) with the server's message and hint.

An ``httpx.Client`` may be injected (tests, other transports).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from guardfab.attestation.policies import LockedPolicyError
from guardfab.errors import (
    FormatError,
    GuardfabError,
    InvalidInputError,
    NotAuthorizedError,
    PolicyError,
    TransportError,
    UsageError,
    VerificationError,
)
from guardfab.files import read_bounded
from guardfab.formats.encoding import b64url_encode
from guardfab.hgs.admin import (
    AlreadyExistsError,
    ConcurrentChangeError,
    InvalidRequestError,
    NotFoundError,
)
from guardfab.hgs.admin_baselines import AlreadyDecidedError, NoVerifiedBootError
from guardfab.hgs.state import HgsState

#: The admin token an HGS directory holds by default (the reviewer's is tokens/reviewer.token).
DEFAULT_TOKEN = Path("tokens") / "admin.token"


class HgsUnreachableError(TransportError):
    """The HGS did not answer (refused, unreachable, timed out)."""

    hint = (
        "check the URL (or --dir's hgs.json 'listen'), that 'guardfab hgs serve' runs there, "
        "and the network"
    )


class HgsTlsError(HgsUnreachableError):
    """The HGS's TLS certificate did not verify against the given CA."""

    hint = (
        "use the HGS's CA certificate (tls/ca.pem of its state directory) with --ca, and a URL "
        "whose host name is in the HGS certificate; run 'guardfab hgs diagnose' on the HGS"
    )


class HgsServerError(TransportError):
    """The HGS failed while handling the request (5xx)."""

    hint = "look at the HGS's log; 'guardfab hgs diagnose --dir DIR' checks its configuration"


_KNOWN: tuple[type[GuardfabError], ...] = (
    FormatError,
    InvalidInputError,
    VerificationError,
    NotAuthorizedError,
    PolicyError,
    UsageError,
    NotFoundError,
    AlreadyExistsError,
    ConcurrentChangeError,
    InvalidRequestError,
    LockedPolicyError,
    AlreadyDecidedError,
    NoVerifiedBootError,
)
_BY_NAME = {cls.__name__: cls for cls in _KNOWN}
_BY_STATUS: dict[int, type[GuardfabError]] = {
    400: FormatError,
    403: NotAuthorizedError,
    404: NotFoundError,
    409: UsageError,
    413: FormatError,
    422: InvalidRequestError,
}


def error_from_response(status: int, body: Any) -> GuardfabError:
    """The typed error for a 4xx answer: the server's class (by name) and message."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        cls = _BY_NAME.get(str(error.get("type")), _BY_STATUS.get(status, InvalidInputError))
        hint = str(error.get("hint") or "") or None
        return cls(str(error.get("message") or f"HTTP {status}"), hint=hint)
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # a request the API's schema refused
        problems = [
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:]) or 'body'}: {item.get('msg')}"
            for item in detail[:5]
            if isinstance(item, dict)
        ]
        return InvalidRequestError("the HGS refused the request: " + "; ".join(problems))
    return _BY_STATUS.get(status, InvalidInputError)(f"the HGS refused the request (HTTP {status})")


def url_for_listen(listen: str) -> str:
    """The HTTPS URL to reach a ``host:port`` listen address from this machine."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"hgs.json: listen {listen!r} is not HOST:PORT")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"https://{host}:{port}"


def read_token(path: Path) -> str:
    """An access token from its file (first line, whitespace stripped)."""
    text = read_bounded(path, limit=4096, what="access token file").decode("utf-8", "replace")
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token or not token.isascii() or not token.isprintable():
        raise UsageError(f"access token file {path} holds no token")
    return token


def encode_file(data: bytes) -> str:
    """A key or certificate file for the API: PEM and JWK text as is, binary as base64url."""
    head = data.lstrip()[:16]
    if head.startswith((b"-----BEGIN", b"{")):
        return data.decode("ascii", "replace")
    return b64url_encode(data)


@dataclass(frozen=True)
class Connection:
    """Where the HGS is and how to talk to it: URL, CA certificate, token file."""

    url: str
    ca: Path
    token_file: Path

    @classmethod
    def from_state_dir(
        cls, directory: Path, *, url: str | None = None, token_file: Path | None = None
    ) -> Connection:
        """From an HGS state directory: hgs.json's listen address, tls/ca.pem, the admin token."""
        state = HgsState(directory)
        return cls(
            url or url_for_listen(state.config.listen),
            state.path("tls", "ca.pem"),
            token_file or state.path(*DEFAULT_TOKEN.parts),
        )


def _tls_context(ca: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the HGS CA certificate {ca}", hint="give --ca FILE") from exc


class AdminClient:
    """Calls the ``/admin/v1`` API; one method per operation (see :mod:`guardfab.hgs.admin_api`)."""

    def __init__(
        self, connection: Connection, *, http: httpx.Client | None = None, timeout: float = 60
    ) -> None:
        token = read_token(connection.token_file)
        self._headers = {"Authorization": f"Bearer {token}"}
        self.url = connection.url.rstrip("/")
        self._http = http or httpx.Client(
            base_url=self.url, verify=_tls_context(connection.ca), timeout=timeout
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request; return the JSON answer or raise the typed error."""
        try:
            response = self._http.request(
                method, path, json=body, params=params, headers=self._headers
            )
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate" in str(exc).lower():
                raise HgsTlsError(f"TLS with {self.url} failed: {exc}") from None
            raise HgsUnreachableError(f"cannot connect to {self.url}: {exc}") from None
        except httpx.TimeoutException:
            raise HgsUnreachableError(f"{self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise HgsUnreachableError(f"talking to {self.url} failed: {exc}") from None
        if response.status_code >= 500:
            raise HgsServerError(f"the HGS failed ({response.status_code}) on {method} {path}")
        try:
            data = response.json()
        except ValueError:
            raise HgsServerError(f"the HGS answered {method} {path} with non-JSON") from None
        if response.status_code >= 400:
            raise error_from_response(response.status_code, data)
        return data

    # ------------------------------------------------------------ modes and settings

    def whoami(self) -> Any:
        """The role of this client's token."""
        return self.request("GET", "/admin/v1/whoami")

    def modes(self) -> Any:
        """The active attestation modes."""
        return self.request("GET", "/admin/v1/mode")

    def set_modes(self, modes: list[str]) -> Any:
        """Set the attestation modes."""
        return self.request("PUT", "/admin/v1/mode", body={"modes": modes})

    def settings(self) -> Any:
        """The trust settings."""
        return self.request("GET", "/admin/v1/settings")

    def update_settings(
        self, *, admit_certified_eks: bool | None = None, ci_policy_pcr: int | None = None
    ) -> Any:
        """Change trust settings (None keeps a value)."""
        body = {"admit_certified_eks": admit_certified_eks, "ci_policy_pcr": ci_policy_pcr}
        changes = {key: value for key, value in body.items() if value is not None}
        return self.request("PATCH", "/admin/v1/settings", body=changes)

    # ------------------------------------------------------------ hosts

    def hosts(self) -> Any:
        """Every known host with its last attestation."""
        return self.request("GET", "/admin/v1/hosts")

    def tpm_hosts(self) -> Any:
        """Registered TPM hosts."""
        return self.request("GET", "/admin/v1/tpm-hosts")

    def add_tpm_host(
        self, name: str, *, ek_public: bytes | None = None, ek_certificate: bytes | None = None
    ) -> Any:
        """Register a TPM host from its EK public file and/or EK certificate file."""
        body: dict[str, Any] = {"name": name}
        if ek_public is not None:
            body["ek_public"] = encode_file(ek_public)
        if ek_certificate is not None:
            body["ek_certificate"] = encode_file(ek_certificate)
        return self.request("POST", "/admin/v1/tpm-hosts", body=body)

    def remove_tpm_host(self, name: str) -> Any:
        """Remove a TPM host."""
        return self.request("DELETE", f"/admin/v1/tpm-hosts/{segment(name)}")

    def host_keys(self) -> Any:
        """Registered host keys."""
        return self.request("GET", "/admin/v1/host-keys")

    def add_host_key(self, name: str, public_key: bytes) -> Any:
        """Register a host key (PEM or JWK file content)."""
        body = {"name": name, "public_key": encode_file(public_key)}
        return self.request("POST", "/admin/v1/host-keys", body=body)

    def revoke_host_key(self, key_id: str) -> Any:
        """Refuse a host key from now on."""
        return self.request("POST", f"/admin/v1/host-keys/{segment(key_id)}/revoke")

    def remove_host_key(self, key_id: str) -> Any:
        """Forget a host key."""
        return self.request("DELETE", f"/admin/v1/host-keys/{segment(key_id)}")

    def revocations(self) -> Any:
        """Revoked hosts."""
        return self.request("GET", "/admin/v1/revocations")

    def revoke_host(self, host_id: str, reason: str = "") -> Any:
        """Revoke a host."""
        body = {"host_id": host_id, "reason": reason}
        return self.request("POST", "/admin/v1/revocations", body=body)

    def unrevoke_host(self, host_id: str) -> Any:
        """Lift a host's revocation."""
        return self.request("DELETE", f"/admin/v1/revocations/{segment(host_id)}")

    def explain(self, host_id: str) -> Any:
        """A host's last attestation explained."""
        return self.request("GET", f"/admin/v1/hosts/{segment(host_id)}/explain")

    # ------------------------------------------------------------ CAs and groups

    def cas(self, family: str) -> Any:
        """Trusted CAs of ``family`` (``ek`` or ``group``)."""
        return self.request("GET", f"/admin/v1/{segment(family)}-cas")

    def add_ca(self, family: str, certificate: bytes, *, intermediate: bool = False) -> Any:
        """Trust a CA certificate (PEM or DER file content)."""
        body: dict[str, Any] = {"certificate": encode_file(certificate)}
        if family == "ek":
            body["kind"] = "intermediate" if intermediate else "root"
        return self.request("POST", f"/admin/v1/{segment(family)}-cas", body=body)

    def remove_ca(self, family: str, cert_id: str) -> Any:
        """Stop trusting a CA certificate."""
        return self.request("DELETE", f"/admin/v1/{segment(family)}-cas/{segment(cert_id)}")

    def host_groups(self) -> Any:
        """Registered host groups."""
        return self.request("GET", "/admin/v1/host-groups")

    def add_host_group(self, name: str) -> Any:
        """Trust a host group (admin-group mode)."""
        return self.request("POST", "/admin/v1/host-groups", body={"name": name})

    def remove_host_group(self, name: str) -> Any:
        """Stop trusting a host group."""
        return self.request("DELETE", f"/admin/v1/host-groups/{segment(name)}")

    # ------------------------------------------------------------ CI policies, baselines

    def ci_policies(self) -> Any:
        """Registered CI policies."""
        return self.request("GET", "/admin/v1/ci-policies")

    def add_ci_policy(
        self, name: str, *, digest: str | None = None, content: bytes | None = None
    ) -> Any:
        """Register a CI policy by the SHA-256 of its file, or the file itself."""
        body: dict[str, Any] = {"name": name}
        if digest is not None:
            body["digest"] = digest
        if content is not None:
            body["content"] = b64url_encode(content)
        return self.request("POST", "/admin/v1/ci-policies", body=body)

    def remove_ci_policy(self, name: str) -> Any:
        """Remove a CI policy."""
        return self.request("DELETE", f"/admin/v1/ci-policies/{segment(name)}")

    def baselines(self) -> Any:
        """Registered TPM baselines."""
        return self.request("GET", "/admin/v1/baselines")

    def baseline(self, name: str) -> Any:
        """One TPM baseline in full."""
        return self.request("GET", f"/admin/v1/baselines/{segment(name)}")

    def add_baseline(self, name: str, log: bytes, pcrs: list[int] | None = None) -> Any:
        """Add a TPM baseline from a reference event log."""
        body: dict[str, Any] = {"name": name, "event_log": b64url_encode(log)}
        if pcrs:
            body["pcrs"] = pcrs
        return self.request("POST", "/admin/v1/baselines", body=body)

    def remove_baseline(self, name: str) -> Any:
        """Remove a TPM baseline."""
        return self.request("DELETE", f"/admin/v1/baselines/{segment(name)}")

    def candidates(self, state: str | None = None) -> Any:
        """Candidate baselines (all, or those in ``state``)."""
        params = None if state is None else {"state": state}
        return self.request("GET", "/admin/v1/candidates", params=params)

    def file_candidate(self, host_id: str, name: str, reason: str = "") -> Any:
        """File a host's last verified boot as a candidate baseline."""
        body = {"host_id": host_id, "name": name, "reason": reason}
        return self.request("POST", "/admin/v1/candidates", body=body)

    def approve_candidate(self, cid: str, name: str | None = None) -> Any:
        """Approve a candidate (optionally under another name)."""
        body = {} if name is None else {"name": name}
        return self.request("POST", f"/admin/v1/candidates/{segment(cid)}/approve", body=body)

    def reject_candidate(self, cid: str, reason: str) -> Any:
        """Reject a candidate."""
        body = {"reason": reason}
        return self.request("POST", f"/admin/v1/candidates/{segment(cid)}/reject", body=body)

    # ------------------------------------------------------------ policies, reports, audit

    def policies(self) -> Any:
        """Every attestation policy and its state."""
        return self.request("GET", "/admin/v1/policies")

    def set_policy(self, name: str, state: str) -> Any:
        """Enable, disable or lock a policy."""
        body = {"state": state}
        return self.request("PUT", f"/admin/v1/policies/{segment(name)}", body=body)

    def what_if(self, change: dict[str, Any]) -> Any:
        """Evaluate a proposed change (build it with one of the ``*_change`` functions)."""
        return self.request("POST", "/admin/v1/what-if", body={"change": change})

    def audit(self, *, since: int = 0, limit: int = 100, kind: str | None = None) -> Any:
        """A page of audit records."""
        params: dict[str, Any] = {"since": since, "limit": limit}
        if kind is not None:
            params["kind"] = kind
        return self.request("GET", "/admin/v1/audit", params=params)

    def verify_audit(self) -> Any:
        """Verify the audit chain."""
        return self.request("GET", "/admin/v1/audit/verify")


def segment(value: str) -> str:
    """A URL path segment (names are checked by the server; this keeps them one segment)."""
    return quote(value, safe="")


def policy_change(name: str, state: str) -> dict[str, Any]:
    """What-if: set a policy's state."""
    return {"kind": "set-policy-state", "policy": name, "state": state}


def add_baseline_change(name: str, log: bytes) -> dict[str, Any]:
    """What-if: add a baseline from a reference event log."""
    return {"kind": "add-baseline", "name": name, "event_log": b64url_encode(log)}


def remove_baseline_change(name: str) -> dict[str, Any]:
    """What-if: remove a baseline."""
    return {"kind": "remove-baseline", "name": name}


def add_ci_policy_change(name: str, digest: str) -> dict[str, Any]:
    """What-if: add a CI policy by its file's SHA-256 (hex)."""
    return {"kind": "add-ci-policy", "name": name, "digest": digest}


def remove_ci_policy_change(name: str) -> dict[str, Any]:
    """What-if: remove a CI policy."""
    return {"kind": "remove-ci-policy", "name": name}


def revoke_host_change(host_id: str) -> dict[str, Any]:
    """What-if: revoke a host."""
    return {"kind": "revoke-host", "host_id": host_id}
