"""The HGS state directory: configuration, signing keys, TLS material, access tokens.

Layout (``guardfab hgs init --dir D``)::

    D/hgs.json                         configuration (public)
    D/keys/attestation-signing.pem     signs health certificates (0600)
    D/keys/nonce.key                   MAC key for challenges (0600)
    D/keys/kps/<guardian id>/          the KPS guardian's keys (see hgs.kps_keys)
    D/tls/ca.pem                       trust anchor hosts and admins use (public)
    D/tls/server.pem, server.key       the HTTPS service certificate (key 0600)
    D/tokens/admin.token               HGS administrator credential (0600)
    D/tokens/reviewer.token            read-only reviewer credential (0600)
    D/access.json                      SHA-256 of each token and its role
    D/state.db                         the embedded SQLite store (or an etcd cluster:
                                       hgs.json names it, ADR 0022)

The directory is created complete or not at all: it is built under a temporary
name and renamed into place. Tokens and TLS material come from the shared
:mod:`guardfab.access` (the guarded-host agent's management API uses the same).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardfab.access.tokens import AccessTable, issue_tokens, token_digest
from guardfab.errors import FormatError, UsageError
from guardfab.files import PRIVATE, PUBLIC, atomic_write, read_bounded
from guardfab.formats import jose, keyfiles
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.hgs.kps_keys import create_first_kps_key
from guardfab.hgs.tls import TlsMaterial, make_private_ca_and_server
from guardfab.store.errors import StoreUsageError
from guardfab.store.etcd_gateway import check_endpoint

CONFIG_VERSION = 1
ROLES = ("admin", "reviewer")
STORE_BACKENDS = ("sqlite", "etcd")


@dataclass(frozen=True)
class EtcdStoreSettings:
    """Where an HGS on etcd keeps its state: ``hgs.json``'s ``store`` with ``backend: etcd``.

    No secret is kept here (``hgs.json`` is public): the password is read from
    ``password_file`` when the store is opened. Relative paths are relative to the
    HGS directory.
    """

    endpoints: tuple[str, ...]
    prefix: str = "guardfab/"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    timeout: float = 5.0
    max_txn_ops: int = 128

    def to_dict(self) -> dict[str, Any]:
        """The ``store`` member of ``hgs.json``."""
        data: dict[str, Any] = {
            "backend": "etcd",
            "endpoints": list(self.endpoints),
            "prefix": self.prefix,
            "timeout": self.timeout,
            "max_txn_ops": self.max_txn_ops,
        }
        for name in ("ca_file", "cert_file", "key_file", "username", "password_file"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EtcdStoreSettings:
        """Check and load the ``store`` member (``backend`` must be ``etcd``)."""
        endpoints = data.get("endpoints")
        if (
            not isinstance(endpoints, list)
            or not endpoints
            or not all(isinstance(e, str) and e for e in endpoints)
        ):
            raise FormatError("hgs.json: store.endpoints must be a non-empty list of URLs")
        for endpoint in endpoints:
            try:
                check_endpoint(endpoint)
            except StoreUsageError as exc:
                raise FormatError(f"hgs.json: store.endpoints: {exc}") from None
        optional = {}
        for name in ("ca_file", "cert_file", "key_file", "username", "password_file"):
            value = data.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                raise FormatError(f"hgs.json: store.{name} must be a non-empty string")
            optional[name] = value
        if (optional["username"] is None) != (optional["password_file"] is None):
            raise FormatError("hgs.json: store.username and store.password_file go together")
        prefix = data.get("prefix", "guardfab/")
        timeout = data.get("timeout", 5.0)
        max_txn_ops = data.get("max_txn_ops", 128)
        if not isinstance(prefix, str):
            raise FormatError("hgs.json: store.prefix must be a string")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= 300
        ):
            raise FormatError("hgs.json: store.timeout must be more than 0 and at most 300 s")
        if isinstance(max_txn_ops, bool) or not isinstance(max_txn_ops, int) or max_txn_ops < 128:
            raise FormatError("hgs.json: store.max_txn_ops must be an integer >= 128")
        return cls(
            tuple(endpoints), prefix, timeout=float(timeout), max_txn_ops=max_txn_ops, **optional
        )


def _check_store(store: dict[str, Any]) -> None:
    backend = store.get("backend")
    if backend not in STORE_BACKENDS:
        raise FormatError(f"hgs.json: store.backend must be one of {', '.join(STORE_BACKENDS)}")
    if backend == "etcd":
        EtcdStoreSettings.from_dict(store)


@dataclass(frozen=True)
class HgsConfig:
    """What ``hgs.json`` holds."""

    service_name: str
    listen: str = "127.0.0.1:8443"
    server_names: tuple[str, ...] = ("127.0.0.1", "localhost")
    store: dict[str, Any] = field(default_factory=lambda: {"backend": "sqlite", "path": "state.db"})
    health_certificate_lifetime: int = 8 * 3600
    nonce_ttl: int = 120

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with a version so later releases can migrate it."""
        return {
            "version": CONFIG_VERSION,
            "service_name": self.service_name,
            "listen": self.listen,
            "server_names": list(self.server_names),
            "store": self.store,
            "health_certificate_lifetime": self.health_certificate_lifetime,
            "nonce_ttl": self.nonce_ttl,
        }

    @classmethod
    def from_dict(cls, data: Any) -> HgsConfig:
        """Load and check ``hgs.json``."""
        if not isinstance(data, dict) or data.get("version") != CONFIG_VERSION:
            raise FormatError("hgs.json: not a version 1 HGS configuration")
        try:
            config = cls(
                service_name=str(data["service_name"]),
                listen=str(data["listen"]),
                server_names=tuple(str(n) for n in data["server_names"]),
                store=dict(data["store"]),
                health_certificate_lifetime=int(data["health_certificate_lifetime"]),
                nonce_ttl=int(data["nonce_ttl"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"hgs.json: missing or invalid field ({exc})") from exc
        if not 60 <= config.health_certificate_lifetime <= 7 * 24 * 3600:
            raise FormatError("hgs.json: health_certificate_lifetime must be 60 s to 7 days")
        if not 5 <= config.nonce_ttl <= 3600:
            raise FormatError("hgs.json: nonce_ttl must be 5 s to 1 hour")
        _check_store(config.store)
        return config


class HgsState:
    """An initialized HGS directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        config_path = self.dir / "hgs.json"
        if not config_path.is_file():
            raise UsageError(
                f"{self.dir} is not an HGS directory (no hgs.json)",
                hint="create one with 'guardfab hgs init --dir DIR'",
            )
        raw = read_bounded(config_path, limit=64 * 1024, what="HGS configuration")
        try:
            self.config = HgsConfig.from_dict(json.loads(raw))
        except ValueError as exc:
            raise FormatError("hgs.json: not JSON") from exc

    def path(self, *parts: str) -> Path:
        """A path inside the state directory."""
        return self.dir.joinpath(*parts)

    def attestation_signing_key(self) -> jose.AsymmetricKey:
        """The key that signs health certificates."""
        data = read_bounded(self.path("keys", "attestation-signing.pem"), limit=16384, what="key")
        return keyfiles.load_private_key(data, what="attestation signing key")

    def nonce_key(self) -> bytes:
        """The MAC key of attestation challenges."""
        return read_bounded(self.path("keys", "nonce.key"), limit=64, what="nonce key")

    def access(self) -> AccessTable:
        """The access-token table."""
        return AccessTable.load(self.path("access.json"))

    def store_path(self) -> Path:
        """Where the embedded SQLite store lives."""
        return self.path(str(self.config.store.get("path", "state.db")))

    def etcd_settings(self) -> EtcdStoreSettings:
        """The etcd store's settings, relative paths resolved against this directory.

        Raises:
            UsageError: this HGS keeps its state in SQLite, not etcd.
        """
        if self.config.store.get("backend") != "etcd":
            raise UsageError(f"{self.dir}: this HGS does not keep its state in etcd")
        settings = EtcdStoreSettings.from_dict(self.config.store)

        def resolve(value: str | None) -> str | None:
            return None if value is None else str(self.dir / value)

        return dataclasses.replace(
            settings,
            ca_file=resolve(settings.ca_file),
            cert_file=resolve(settings.cert_file),
            key_file=resolve(settings.key_file),
            password_file=resolve(settings.password_file),
        )


def default_server_names() -> tuple[str, ...]:
    """Names the service is reached by on this machine: loopback and the host name."""
    return ("127.0.0.1", "localhost", socket.gethostname())


def init_state(
    directory: Path,
    config: HgsConfig,
    *,
    tls: TlsMaterial | None = None,
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """Create a complete HGS directory; return the new access tokens by role (shown once)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory} exists and is not empty", hint="choose a new directory")
    now = now or datetime.datetime.now(datetime.UTC)
    staging = directory.parent / f".{directory.name}.init"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokens = _populate(staging, config, tls or _default_tls(config, now))
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return tokens


def _default_tls(config: HgsConfig, now: datetime.datetime) -> TlsMaterial:
    return make_private_ca_and_server(config.service_name, list(config.server_names), now=now)


def _populate(root: Path, config: HgsConfig, tls: TlsMaterial) -> dict[str, str]:
    for sub in ("keys", "tls", "tokens"):
        (root / sub).mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    signing = keyfiles.generate_key(KeyAlgorithm.EC_P256)
    atomic_write(
        root / "keys" / "attestation-signing.pem", keyfiles.private_key_pem(signing), mode=PRIVATE
    )
    atomic_write(root / "keys" / "nonce.key", secrets.token_bytes(32), mode=PRIVATE)
    create_first_kps_key(root, config.service_name)
    atomic_write(root / "tls" / "ca.pem", tls.ca_pem, mode=PUBLIC)
    atomic_write(root / "tls" / "server.pem", tls.server_chain_pem, mode=PUBLIC)
    atomic_write(root / "tls" / "server.key", tls.server_key_pem, mode=PRIVATE)
    tokens, table = issue_tokens(ROLES)
    for role, token in tokens.items():
        atomic_write(root / "tokens" / f"{role}.token", token.encode() + b"\n", mode=PRIVATE)
    atomic_write(root / "access.json", table.to_json(), mode=PRIVATE)
    atomic_write(root / "hgs.json", json.dumps(config.to_dict(), indent=2).encode(), mode=PUBLIC)
    return tokens


__all__ = [
    "CONFIG_VERSION",
    "ROLES",
    "STORE_BACKENDS",
    "AccessTable",
    "EtcdStoreSettings",
    "HgsConfig",
    "HgsState",
    "default_server_names",
    "init_state",
    "token_digest",
]
