"""What the guarded host remembers between attestations: its certificate and its status.

Two files in the agent's state directory (0700):

* ``health-certificate.json`` (0600): the last health certificate and when it was
  obtained. A restarted agent reuses it while it is valid, so a restart costs the
  HGS nothing and the host stays guarded throughout. The certificate is not a
  key (the KPS wraps VM keys to the host encryption key it names, which never
  leaves this host), but it is still kept root-only.
* ``status.json`` (0644): what ``guardfab host status`` shows, in the spirit of
  ``Get-HgsClientConfiguration``: the attestation status and sub-status (the
  failed policies), the failed checks, when the certificate expires and which HGS
  served it. It holds no secret and no certificate, so monitoring may read it.

Times are the host's own clock (seconds since the epoch). A certificate's life is
measured on the host's clock from the moment it arrived, using the lifetime the
HGS gave it (``exp - iat``), so a host whose clock is off by minutes still renews
on time. The lifetime is read from the certificate without verifying its
signature: it only schedules renewal, and the KPS verifies the certificate.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardfab.errors import FormatError, GuardfabError, UsageError
from guardfab.files import PRIVATE, PUBLIC, atomic_write, read_bounded
from guardfab.formats.encoding import b64url_decode, load_json_document, require_dict
from guardfab.host.attestation import AttestationAnswer

logger = logging.getLogger(__name__)

CERTIFICATE_FILE = "health-certificate.json"
STATUS_FILE = "status.json"
_MAX_STATE_BYTES = 256 * 1024
#: A certificate obtained this far in the future means the clock went back: distrust it.
_CLOCK_BACK_TOLERANCE = 300.0


class HostStatus:
    """Attestation statuses beyond the HGS's own (Passed, UnauthorizedHost, ...)."""

    NOT_ATTESTED = "NotAttested"
    #: No HGS answered (network, TLS, HGS down): retried with backoff.
    TRANSIENT_ERROR = "TransientError"
    #: This host could not build evidence (TPM, event log, keys): fix the host.
    HOST_ERROR = "HostError"
    PASSED = "Passed"


def _claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWT, unverified (see the module docstring for why)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise FormatError("health certificate: not a compact JWT")
    raw = b64url_decode(parts[1], what="health certificate payload")
    payload = load_json_document(raw, what="health certificate claims", max_bytes=64 * 1024)
    return require_dict(payload, what="health certificate claims")


@dataclass(frozen=True)
class CachedCertificate:
    """A health certificate and what the agent needs to schedule around it."""

    token: str = field(repr=False)
    obtained_at: float
    lifetime: float
    expires_at: int
    served_by: str
    host_key_id: str

    @classmethod
    def from_answer(
        cls, answer: AttestationAnswer, *, now: float, served_by: str, host_key_id: str
    ) -> CachedCertificate:
        """Record a certificate that just arrived.

        Raises:
            FormatError: the token is not a JWT with integer ``iat`` and ``exp``.
        """
        claims = _claims(answer.health_certificate)
        issued, expires = claims.get("iat"), claims.get("exp")
        if not isinstance(issued, int) or not isinstance(expires, int) or expires <= issued:
            raise FormatError("health certificate: missing or inconsistent iat/exp")
        return cls(
            answer.health_certificate, now, float(expires - issued), expires, served_by, host_key_id
        )

    @property
    def local_expiry(self) -> float:
        """When the certificate expires, on this host's clock."""
        return self.obtained_at + self.lifetime

    def renew_at(self, fraction: float) -> float:
        """When to attest again (after ``fraction`` of the certificate's life)."""
        return self.obtained_at + fraction * self.lifetime

    def usable(self, now: float, min_validity: float = 0.0) -> bool:
        """Whether a key request may carry this certificate at ``now``."""
        if now < self.obtained_at - _CLOCK_BACK_TOLERANCE:
            return False  # the clock went back: the age of the certificate is unknown
        return now < self.local_expiry - min_validity

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the 0600 file)."""
        return {
            "health_certificate": self.token,
            "obtained_at": self.obtained_at,
            "lifetime": self.lifetime,
            "expires_at": self.expires_at,
            "served_by": self.served_by,
            "host_key_id": self.host_key_id,
        }

    @classmethod
    def from_dict(cls, value: Any) -> CachedCertificate:
        """Load the cached certificate file's content.

        Raises:
            FormatError: a field is missing or of the wrong type.
        """
        obj = require_dict(value, what="cached health certificate")
        try:
            cached = cls(
                str(obj["health_certificate"]),
                float(obj["obtained_at"]),
                float(obj["lifetime"]),
                int(obj["expires_at"]),
                str(obj["served_by"]),
                str(obj["host_key_id"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"cached health certificate: invalid ({exc})") from exc
        if cached.lifetime <= 0:
            raise FormatError("cached health certificate: lifetime must be positive")
        return cached


@dataclass
class AgentStatus:
    """The host's attestation status, as ``guardfab host status`` shows it."""

    mode: str
    attestation_status: str = HostStatus.NOT_ATTESTED
    #: The failed policies (the reference's AttestationSubstatus).
    sub_status: list[str] = field(default_factory=list)
    #: Every failed check: {"check": ..., "reason": ..., "hint": ...}.
    failures: list[dict[str, str]] = field(default_factory=list)
    last_attempt: float | None = None
    last_success: float | None = None
    certificate_expires_at: float | None = None
    served_by: str | None = None
    using_fallback: bool = False
    consecutive_failures: int = 0
    next_attempt: float | None = None
    ak_name: str | None = None
    updated_at: float | None = None

    def is_guarded(self, now: float) -> bool:
        """True while the host holds an unexpired health certificate."""
        return self.certificate_expires_at is not None and now < self.certificate_expires_at

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the status file and the local API's answer)."""
        return {
            "mode": self.mode,
            "attestation_status": self.attestation_status,
            "sub_status": list(self.sub_status),
            "failures": [dict(f) for f in self.failures],
            "last_attempt": self.last_attempt,
            "last_success": self.last_success,
            "certificate_expires_at": self.certificate_expires_at,
            "served_by": self.served_by,
            "using_fallback": self.using_fallback,
            "consecutive_failures": self.consecutive_failures,
            "next_attempt": self.next_attempt,
            "ak_name": self.ak_name,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, value: Any) -> AgentStatus:
        """Load a status written by :meth:`to_dict` (unknown fields are ignored: it is a report).

        Raises:
            FormatError: a known field has the wrong type.
        """
        obj = require_dict(value, what="host status")
        known = {k: obj[k] for k in cls("").to_dict() if k in obj}
        try:
            status = cls(**known)
        except TypeError as exc:
            raise FormatError(f"host status: invalid ({exc})") from exc
        if not isinstance(status.mode, str) or not isinstance(status.sub_status, list):
            raise FormatError("host status: invalid field types")
        return status


def failure_entry(error: GuardfabError, check: str) -> dict[str, str]:
    """A status failure from a local error (its message and hint are free of secrets)."""
    return {"check": check, "reason": str(error), "hint": error.hint}


class StateFiles:
    """The agent's state directory: the cached certificate and the status file."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def ensure(self) -> None:
        """Create the directory (0700, root-only) if needed.

        Raises:
            UsageError: it cannot be created.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.dir.chmod(0o700)
        except OSError as exc:
            message = f"cannot create the state directory {self.dir}: {exc.strerror}"
            raise UsageError(message) from exc

    @property
    def certificate_path(self) -> Path:
        """The cached certificate file."""
        return self.dir / CERTIFICATE_FILE

    @property
    def status_path(self) -> Path:
        """The status file."""
        return self.dir / STATUS_FILE

    def _load(self, path: Path, what: str) -> Any:
        if not path.exists():
            return None
        return load_json_document(read_bounded(path, limit=_MAX_STATE_BYTES, what=what), what=what)

    def load_certificate(self) -> CachedCertificate | None:
        """The cached certificate, or None if there is none or it is unreadable.

        An unreadable file is not fatal: the agent attests again, which is what an
        administrator would do anyway.
        """
        try:
            data = self._load(self.certificate_path, "cached health certificate")
            return None if data is None else CachedCertificate.from_dict(data)
        except GuardfabError as exc:
            logger.warning("ignoring the cached health certificate: %s", exc)
            return None

    def save_certificate(self, cached: CachedCertificate) -> None:
        """Keep the certificate for restarts (0600, atomic)."""
        data = json.dumps(cached.to_dict(), sort_keys=True).encode()
        atomic_write(self.certificate_path, data, mode=PRIVATE, overwrite=True)

    def drop_certificate(self) -> None:
        """Forget the cached certificate (the HGS refused the host)."""
        with contextlib.suppress(FileNotFoundError):
            self.certificate_path.unlink()

    def load_status(self) -> AgentStatus | None:
        """The last status written, or None if there is none.

        Raises:
            FormatError, UsageError: the file is unreadable.
        """
        data = self._load(self.status_path, "host status")
        return None if data is None else AgentStatus.from_dict(data)

    def save_status(self, status: AgentStatus) -> None:
        """Write the status file (0644, atomic: a reader never sees half of it)."""
        data = json.dumps(status.to_dict(), indent=2, sort_keys=True).encode()
        atomic_write(self.status_path, data, mode=PUBLIC, overwrite=True)
