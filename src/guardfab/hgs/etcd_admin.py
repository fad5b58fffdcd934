"""Connections to an HGS's etcd cluster for the admin tools (diagnose, restore).

``hgs serve`` opens its store through :func:`guardfab.hgs.server.open_etcd_store`
from an HGS directory; a restore has settings but no directory yet, and
``diagnose`` asks each member on its own. Both start here, from
:class:`~guardfab.hgs.state.EtcdStoreSettings` with paths already resolved. The
password is read from its file when needed and goes only to the gateway.
"""

from __future__ import annotations

from pathlib import Path

from guardfab.errors import UsageError
from guardfab.files import read_bounded
from guardfab.hgs.state import EtcdStoreSettings
from guardfab.store.etcd import EtcdStore
from guardfab.store.etcd_cluster import GatewayFactory
from guardfab.store.etcd_gateway import EtcdGateway

#: Longest etcd password file read (as ``hgs serve`` reads it).
MAX_PASSWORD_FILE = 4096


def read_password(settings: EtcdStoreSettings) -> str | None:
    """The etcd password from ``settings.password_file`` (None without one)."""
    if settings.password_file is None:
        return None
    raw = read_bounded(
        Path(settings.password_file), limit=MAX_PASSWORD_FILE, what="etcd password file"
    )
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise UsageError(f"{settings.password_file}: the etcd password is not UTF-8") from None


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def gateway_factory(settings: EtcdStoreSettings, *, timeout: float | None = None) -> GatewayFactory:
    """Return a function that builds a gateway to some of the members, as configured."""
    password = read_password(settings)

    def connect(endpoints: list[str]) -> EtcdGateway:
        return EtcdGateway(
            endpoints,
            ca_file=_path(settings.ca_file),
            cert_file=_path(settings.cert_file),
            key_file=_path(settings.key_file),
            username=settings.username,
            password=password,
            timeout=timeout or settings.timeout,
        )

    return connect


def open_settings_store(settings: EtcdStoreSettings) -> EtcdStore:
    """Open the store ``settings`` name and check a member answers (as ``hgs serve`` does)."""
    store = EtcdStore(
        list(settings.endpoints),
        prefix=settings.prefix,
        ca_file=_path(settings.ca_file),
        cert_file=_path(settings.cert_file),
        key_file=_path(settings.key_file),
        username=settings.username,
        password=read_password(settings),
        timeout=settings.timeout,
        max_txn_ops=settings.max_txn_ops,
    )
    try:
        store.current_revision()
    except BaseException:
        store.close()
        raise
    return store
