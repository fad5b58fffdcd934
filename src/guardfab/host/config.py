"""The guarded host's configuration file (``/etc/guardfab/host.json``).

Like the reference's ``Set-HgsClientConfiguration``, it names the HGS to attest
to and to ask for keys (a primary and, optionally, a fallback pair of URLs), the
CA that HGS's TLS certificate chains to, and how this host proves its health
(TPM or host key). It also says where the agent keeps its state and its socket,
how it schedules renewal and retries, where this host's VMs live (``vms_dir``)
and where the agent's management API listens (``manage_listen``; its TLS
material, tokens and audit log are under ``manage_dir``, by default
``state_dir/manage``). ``direct_boot_dir``, if set, is the one directory a VM's
directly booted kernel and initramfs may come from (absent: none may).

Loading is strict on purpose: an unknown field is a typo that would otherwise
be silently ignored (a misspelt ``fallback_attestation_url`` would leave the host
without a fallback nobody knew was missing), so it is refused with its name.
Paths must be absolute, since the agent runs from systemd with no meaningful
working directory, and URLs must be ``https``: the health certificate and the
key requests must never cross a network in clear.

The host signing key (host-key mode) is named by a path (``/PATH`` or
``file:/PATH``, a PEM file) or by an RFC 7512 ``pkcs11:`` URI (a key on a token;
see :mod:`guardfab.host.signer`). The URI is checked strictly when the file is
read, and :func:`load_config` also checks that its ``pin-source`` file exists
and is not readable by others. The host encryption key stays a file: the KPS
wraps VM keys to it with ECDH-ES, which this host computes in memory.
"""

from __future__ import annotations

import enum
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from guardfab.errors import FormatError, UsageError
from guardfab.files import PRIVATE, atomic_write, read_bounded
from guardfab.formats.encoding import load_json_document, reject_unknown_fields, require_dict
from guardfab.host.signer import Pkcs11Uri, SignerRef, parse_signer_ref
from guardfab.host.tpm import DEFAULT_AK_HANDLE, EK_CERT_INDEX

CONFIG_VERSION = 1
#: Where ``guardfab host`` looks without ``--config`` or ``$GUARDFAB_HOST_CONFIG``.
DEFAULT_CONFIG_PATH = Path("/etc/guardfab/host.json")
CONFIG_ENV = "GUARDFAB_HOST_CONFIG"
DEFAULT_TCTI = "device:/dev/tpmrm0"
DEFAULT_EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
DEFAULT_STATE_DIR = Path("/var/lib/guardfab/host")
DEFAULT_SOCKET = Path("/run/guardfab/host-agent.sock")
DEFAULT_ENCRYPTION_KEY = Path("/etc/guardfab/host-encryption.pem")
DEFAULT_SIGNING_KEY = Path("/etc/guardfab/host-signing.pem")
DEFAULT_VMS_DIR = Path("/var/lib/guardfab/vms")
#: The management API's address: loopback, so reaching it from elsewhere is a
#: deliberate change (a reverse proxy, or another address in the configuration).
DEFAULT_MANAGE_LISTEN = "127.0.0.1:7445"
_MAX_CONFIG_BYTES = 64 * 1024
_MAX_URL_CHARS = 2048

_FIELDS = {
    "version",
    "mode",
    "attestation_url",
    "key_protection_url",
    "fallback_attestation_url",
    "fallback_key_protection_url",
    "ca_file",
    "tcti",
    "event_log",
    "ci_policy",
    "encryption_key",
    "signing_key",
    "state_dir",
    "socket",
    "allowed_uid",
    "ak_handle",
    "ek_profile",
    "renewal",
    "retry",
    "vms_dir",
    "manage_listen",
    "manage_dir",
    "direct_boot_dir",
}


class HostMode(enum.StrEnum):
    """How this host proves its health to the HGS."""

    TPM = "tpm"
    HOST_KEY = "host-key"


def _number(obj: dict[str, Any], key: str, default: float, *, what: str) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FormatError(f"{what}: '{key}' must be a number")
    return float(value)


@dataclass(frozen=True)
class RenewalSettings:
    """When a health certificate is renewed, and when it is too old to ask for keys with.

    Attributes:
        fraction: renew after this fraction of the certificate's life (an 8 h
            certificate is renewed after 6 h), leaving a quarter of its life for
            retries if the HGS is briefly unavailable.
        min_validity: a key request with less validity left than this attests
            first, so the KPS never sees a certificate that expires in transit.
    """

    fraction: float = 0.75
    min_validity: float = 30.0

    def __post_init__(self) -> None:
        if not 0.1 <= self.fraction <= 0.95:
            raise FormatError("renewal.fraction must be between 0.1 and 0.95")
        if not 0 <= self.min_validity <= 3600:
            raise FormatError("renewal.min_validity must be 0 to 3600 seconds")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"fraction": self.fraction, "min_validity": self.min_validity}

    @classmethod
    def from_dict(cls, value: Any) -> RenewalSettings:
        """Strict load of the ``renewal`` object."""
        obj = require_dict(value, what="renewal")
        reject_unknown_fields(obj, {"fraction", "min_validity"}, what="renewal")
        return cls(
            _number(obj, "fraction", cls.fraction, what="renewal"),
            _number(obj, "min_validity", cls.min_validity, what="renewal"),
        )


@dataclass(frozen=True)
class RetrySettings:
    """Backoff after a failed attestation, failover and failback, network timeouts.

    Attributes:
        initial_delay: seconds before the first retry; doubled after each failure.
        max_delay: the bound on that delay (so a host recovers within minutes of
            the HGS coming back, not hours).
        jitter: the fraction of each delay drawn at random, so a fabric of hosts
            that lost the HGS together does not come back in lock step.
        failback_after: seconds the agent keeps using the fallback HGS before it
            tries the primary first again.
        http_timeout: seconds to wait for one HGS request.
    """

    initial_delay: float = 5.0
    max_delay: float = 300.0
    jitter: float = 0.25
    failback_after: float = 900.0
    http_timeout: float = 15.0

    def __post_init__(self) -> None:
        if not 0.01 <= self.initial_delay <= self.max_delay <= 86400:
            raise FormatError("retry: need 0.01 <= initial_delay <= max_delay <= 86400")
        if not 0 <= self.jitter <= 1:
            raise FormatError("retry.jitter must be between 0 and 1")
        if not 0 <= self.failback_after <= 86400:
            raise FormatError("retry.failback_after must be 0 to 86400 seconds")
        if not 0.1 <= self.http_timeout <= 300:
            raise FormatError("retry.http_timeout must be 0.1 to 300 seconds")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "initial_delay": self.initial_delay,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
            "failback_after": self.failback_after,
            "http_timeout": self.http_timeout,
        }

    @classmethod
    def from_dict(cls, value: Any) -> RetrySettings:
        """Strict load of the ``retry`` object."""
        obj = require_dict(value, what="retry")
        names = set(cls().to_dict())
        reject_unknown_fields(obj, names, what="retry")
        defaults = cls().to_dict()
        return cls(**{name: _number(obj, name, defaults[name], what="retry") for name in names})


@dataclass(frozen=True)
class HgsSite:
    """One HGS the host can use: its attestation URL and its key protection URL."""

    attestation_url: str
    key_protection_url: str


def check_url(url: str, what: str) -> str:
    """Return ``url`` if it is a plain https URL; raise a FormatError naming ``what``.

    No credentials, query or fragment: the URL is shown in status and logs, and
    the client appends the API paths to it.
    """
    if not isinstance(url, str) or not url or len(url) > _MAX_URL_CHARS:
        raise FormatError(f"{what}: expected an https URL")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise FormatError(f"{what}: {url!r} is not an https URL (the HGS is only reached by TLS)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise FormatError(f"{what}: no credentials, query or fragment in the URL")
    return url.rstrip("/")


def check_key_path(value: str, what: str) -> Path:
    """An absolute key file path (the encryption key: a PKCS#11 URI is refused)."""
    if value.startswith("pkcs11:"):
        raise FormatError(
            f"{what}: PKCS#11 URIs are not supported for this key (only for signing_key); "
            "give the path of a PEM key file"
        )
    return check_path(value, what)


def check_signing_key(value: Any, what: str = "signing_key") -> SignerRef:
    """A key file path (``/PATH`` or ``file:/PATH``) or a strictly checked ``pkcs11:`` URI."""
    return parse_signer_ref(value, what)


def check_pin_source(uri: Pkcs11Uri) -> None:
    """The URI's PIN file exists, is a regular file and is not readable by others.

    Raises:
        UsageError: it is missing, not a regular file, or world-readable.
    """
    path = uri.pin_source
    try:
        info = path.lstat()
    except OSError as exc:
        raise UsageError(
            f"the PIN file {path} of the host signing key is not readable ({exc.strerror})",
            hint=f"write the token's user PIN to {path} (one line) and chmod 600 it",
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"the PIN file {path} is not a regular file", hint="name a plain file")
    if info.st_mode & 0o007:
        raise UsageError(f"the PIN file {path} is readable by others", hint=f"chmod 600 {path}")


def check_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 in brackets); port 0 lets the system choose (tests).

    Raises:
        FormatError: not ``HOST:PORT`` with a port from 0 to 65535.
    """
    host, sep, port_text = str(listen).rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise FormatError(f"manage_listen: {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port_text)


def check_path(value: Any, what: str) -> Path:
    """An absolute path (the agent runs with no meaningful working directory)."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise FormatError(f"{what}: expected a path")
    path = Path(value)
    if not path.is_absolute():
        raise FormatError(f"{what}: {value!r} must be an absolute path")
    return path


@dataclass(frozen=True)
class HostConfig:
    """The guarded host's configuration (see the module docstring for the rules)."""

    mode: HostMode
    primary: HgsSite
    ca_file: Path
    fallback: HgsSite | None = None
    tcti: str = DEFAULT_TCTI
    event_log: Path = DEFAULT_EVENT_LOG
    ci_policy: Path | None = None
    encryption_key: Path = DEFAULT_ENCRYPTION_KEY
    signing_key: SignerRef | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    socket: Path = DEFAULT_SOCKET
    allowed_uid: int = 0
    ak_handle: int = DEFAULT_AK_HANDLE
    ek_profile: str = "EK-RSA2048"
    renewal: RenewalSettings = field(default_factory=RenewalSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    vms_dir: Path = DEFAULT_VMS_DIR
    manage_listen: str = DEFAULT_MANAGE_LISTEN
    manage_dir: Path | None = None
    #: The only directory a VM's direct kernel/initrd may come from through the
    #: management API (:mod:`guardfab.hypervisor.bootpaths`); ``None``: none may.
    direct_boot_dir: Path | None = None

    def __post_init__(self) -> None:
        check_listen(self.manage_listen)
        if self.mode is HostMode.HOST_KEY and self.signing_key is None:
            raise FormatError("host-key mode needs 'signing_key' (the registered host key)")
        if self.ek_profile not in EK_CERT_INDEX:
            raise FormatError(f"ek_profile: one of {', '.join(EK_CERT_INDEX)}")
        if self.ak_handle >> 24 != 0x81:
            raise FormatError(f"ak_handle: 0x{self.ak_handle:08x} is not a persistent handle")
        if not 0 <= self.allowed_uid < 2**32:
            raise FormatError("allowed_uid: not a user id")
        if not self.tcti or len(self.tcti) > 1024:
            raise FormatError("tcti: expected a TCTI string such as device:/dev/tpmrm0")

    @property
    def management_dir(self) -> Path:
        """The management API's TLS material, tokens and audit log (``state_dir/manage``)."""
        return self.manage_dir if self.manage_dir is not None else self.state_dir / "manage"

    @property
    def sites(self) -> tuple[HgsSite, ...]:
        """The primary HGS, then the fallback if one is configured."""
        return (self.primary,) if self.fallback is None else (self.primary, self.fallback)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``host.json``."""
        fallback = self.fallback
        return {
            "version": CONFIG_VERSION,
            "mode": self.mode.value,
            "attestation_url": self.primary.attestation_url,
            "key_protection_url": self.primary.key_protection_url,
            "fallback_attestation_url": fallback.attestation_url if fallback else None,
            "fallback_key_protection_url": fallback.key_protection_url if fallback else None,
            "ca_file": str(self.ca_file),
            "tcti": self.tcti,
            "event_log": str(self.event_log),
            "ci_policy": None if self.ci_policy is None else str(self.ci_policy),
            "encryption_key": str(self.encryption_key),
            "signing_key": None if self.signing_key is None else str(self.signing_key),
            "state_dir": str(self.state_dir),
            "socket": str(self.socket),
            "allowed_uid": self.allowed_uid,
            "ak_handle": self.ak_handle,
            "ek_profile": self.ek_profile,
            "renewal": self.renewal.to_dict(),
            "retry": self.retry.to_dict(),
            "vms_dir": str(self.vms_dir),
            "manage_listen": self.manage_listen,
            "manage_dir": None if self.manage_dir is None else str(self.manage_dir),
            "direct_boot_dir": None if self.direct_boot_dir is None else str(self.direct_boot_dir),
        }

    @classmethod
    def from_dict(cls, value: Any) -> HostConfig:
        """Strictly load a configuration object.

        Raises:
            FormatError: a wrong version, an unknown or missing field, or a value
                out of range (the message names it).
        """
        obj = require_dict(value, what="host configuration")
        if obj.get("version") != CONFIG_VERSION:
            raise FormatError(f"host configuration: not a version {CONFIG_VERSION} configuration")
        reject_unknown_fields(obj, _FIELDS, what="host configuration")
        try:
            return cls(**_fields_from(obj))
        except KeyError as exc:
            raise FormatError(f"host configuration: missing field {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise FormatError(f"host configuration: invalid value ({exc})") from exc


def _site(obj: dict[str, Any], prefix: str) -> HgsSite | None:
    attestation = obj.get(f"{prefix}attestation_url")
    key_protection = obj.get(f"{prefix}key_protection_url")
    if attestation is None and key_protection is None:
        return None
    if attestation is None or key_protection is None:
        raise FormatError(f"give both {prefix}attestation_url and {prefix}key_protection_url")
    return HgsSite(
        check_url(attestation, f"{prefix}attestation_url"),
        check_url(key_protection, f"{prefix}key_protection_url"),
    )


def _int(obj: dict[str, Any], key: str, default: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"host configuration: '{key}' must be an integer")
    return value


def _fields_from(obj: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of :class:`HostConfig`, each field checked."""
    primary = _site(obj, "")
    if primary is None:
        raise FormatError("host configuration: attestation_url and key_protection_url are needed")
    signing = obj.get("signing_key")
    ci_policy = obj.get("ci_policy")
    manage_dir = obj.get("manage_dir")
    boot_dir = obj.get("direct_boot_dir")
    tcti = obj.get("tcti", DEFAULT_TCTI)
    if not isinstance(tcti, str):
        raise FormatError("host configuration: 'tcti' must be a string")
    return {
        "mode": HostMode(obj["mode"]),
        "primary": primary,
        "fallback": _site(obj, "fallback_"),
        "ca_file": check_path(obj["ca_file"], "ca_file"),
        "tcti": tcti,
        "event_log": check_path(obj.get("event_log", str(DEFAULT_EVENT_LOG)), "event_log"),
        "ci_policy": None if ci_policy is None else check_path(ci_policy, "ci_policy"),
        "encryption_key": check_key_path(
            str(obj.get("encryption_key", DEFAULT_ENCRYPTION_KEY)), "encryption_key"
        ),
        "signing_key": None if signing is None else check_signing_key(signing),
        "state_dir": check_path(obj.get("state_dir", str(DEFAULT_STATE_DIR)), "state_dir"),
        "socket": check_path(obj.get("socket", str(DEFAULT_SOCKET)), "socket"),
        "allowed_uid": _int(obj, "allowed_uid", 0),
        "ak_handle": _int(obj, "ak_handle", DEFAULT_AK_HANDLE),
        "ek_profile": str(obj.get("ek_profile", "EK-RSA2048")),
        "renewal": RenewalSettings.from_dict(obj.get("renewal", {})),
        "retry": RetrySettings.from_dict(obj.get("retry", {})),
        "vms_dir": check_path(obj.get("vms_dir", str(DEFAULT_VMS_DIR)), "vms_dir"),
        "manage_listen": _string(obj, "manage_listen", DEFAULT_MANAGE_LISTEN),
        "manage_dir": None if manage_dir is None else check_path(manage_dir, "manage_dir"),
        "direct_boot_dir": None if boot_dir is None else check_path(boot_dir, "direct_boot_dir"),
    }


def _string(obj: dict[str, Any], key: str, default: str) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise FormatError(f"host configuration: '{key}' must be a string")
    return value


def config_path(explicit: Path | None = None) -> Path:
    """The configuration file: ``explicit``, else ``$GUARDFAB_HOST_CONFIG``, else the default."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> HostConfig:
    """Load and check the configuration file at ``path``.

    Raises:
        UsageError: the file does not exist (the host is not configured).
        FormatError: the file is not a valid configuration (the message says why).
        UsageError: also when the PKCS#11 PIN file is missing or readable by others.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(
            f"{path} does not exist: this host is not configured",
            hint="run 'guardfab host configure ...' (see 'guardfab host configure --help')",
        )
    data = read_bounded(path, limit=_MAX_CONFIG_BYTES, what="host configuration")
    try:
        config = HostConfig.from_dict(load_json_document(data, what=str(path)))
    except FormatError as exc:
        hint = "fix the file, or write it again with 'guardfab host configure'"
        raise FormatError(f"{path}: {exc}", hint=hint) from exc
    if isinstance(config.signing_key, Pkcs11Uri):
        check_pin_source(config.signing_key)
    return config


def save_config(path: Path, config: HostConfig) -> None:
    """Write ``config`` to ``path`` atomically (0600), creating its directory if needed.

    0600 although nothing in it is secret: it decides which HGS this host trusts,
    so only root should read (and, through the directory, change) it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode("utf-8"), mode=PRIVATE, overwrite=True)
