"""The ``--store-etcd*`` options of ``hgs init`` and ``hgs import-state``, declared once.

Both commands take the same settings for an HGS whose state lives in an etcd
cluster (docs/adr/0022); :func:`etcd_store_options` adds the options and hands
the command one ``etcd`` argument: the checked
:class:`~guardfab.hgs.state.EtcdStoreSettings`, or None without ``--store-etcd``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from guardfab.errors import UsageError
from guardfab.hgs.state import EtcdStoreSettings

_path = click.Path(dir_okay=False, path_type=Path)
#: The option parameters, in the order :func:`etcd_settings` takes them.
_PARAMETERS = (
    "etcd_endpoints",
    "store_etcd_prefix",
    "store_etcd_ca",
    "store_etcd_cert",
    "store_etcd_key",
    "store_etcd_password_file",
    "store_etcd_user",
    "store_etcd_max_txn_ops",
)


def etcd_store_options(
    *, endpoint_help: str, prefix_help: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the ``--store-etcd*`` options; the command receives ``etcd`` instead of them.

    Put it right above the function (below ``handle_errors``), so that a bad
    combination of options is reported like any other usage error.
    """
    options = (
        click.option("--store-etcd", "etcd_endpoints", multiple=True, help=endpoint_help),
        click.option(
            "--store-etcd-prefix", default="guardfab/", show_default=True, help=prefix_help
        ),
        click.option(
            "--store-etcd-ca", type=_path, help="CA bundle of the etcd members' certificates."
        ),
        click.option("--store-etcd-cert", type=_path, help="Client certificate for etcd."),
        click.option("--store-etcd-key", type=_path, help="Private key of --store-etcd-cert."),
        click.option(
            "--store-etcd-user", help="etcd user name, if the cluster has authentication on."
        ),
        click.option(
            "--store-etcd-password-file",
            type=_path,
            help="File holding that user's password (read when the HGS starts; keep it 0600).",
        ),
        click.option(
            "--store-etcd-max-txn-ops",
            type=click.IntRange(min=128),
            default=128,
            show_default=True,
            help="The cluster's --max-txn-ops (512 lets every transaction through; ADR 0022).",
        ),
    )

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def with_settings(*args: Any, **kwargs: Any) -> Any:
            kwargs["etcd"] = etcd_settings(*(kwargs.pop(name) for name in _PARAMETERS))
            return command(*args, **kwargs)

        decorated: Callable[..., Any] = with_settings
        for option in reversed(options):
            decorated = option(decorated)
        return decorated

    return decorate


def etcd_settings(
    endpoints: tuple[str, ...],
    prefix: str,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    password_file: Path | None,
    username: str | None,
    max_txn_ops: int,
) -> EtcdStoreSettings | None:
    """The etcd store settings from the options, or None without ``--store-etcd``."""
    files = (ca, cert, key, password_file)
    if not endpoints:
        if any(files) or username:
            raise UsageError("the --store-etcd-* options need --store-etcd URL")
        return None
    resolved = [None if f is None else str(f.resolve()) for f in files]
    settings = EtcdStoreSettings(
        tuple(endpoints),
        prefix,
        ca_file=resolved[0],
        cert_file=resolved[1],
        key_file=resolved[2],
        username=username,
        password_file=resolved[3],
        max_txn_ops=max_txn_ops,
    )
    return EtcdStoreSettings.from_dict(settings.to_dict())  # the checks hgs.json gets
