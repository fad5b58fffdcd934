"""``guardfab hgs``: run and administer a Host Guardian Service."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from guardfab.cli.common import read_passphrase
from guardfab.cli.etcd_options import etcd_store_options
from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.files import read_bounded
from guardfab.hgs.state import EtcdStoreSettings, HgsConfig, default_server_names, init_state
from guardfab.hgs.tls import TlsMaterial, load_given_pem, load_given_pkcs12

_MAX_TLS_FILE = 256 * 1024


@click.group()
def hgs() -> None:
    """The Host Guardian Service: attests hosts and releases VM keys to healthy ones.

    \b
    HGS administrator:  init, serve, then the admin commands (hosts, baselines,
                        CI policies, attestation policies, mode, audit).
    Reviewer:           the read-only commands with the reviewer token.
    """


def _given_tls(
    cert: Path | None, key: Path | None, pkcs12: Path | None, passphrase_file: Path | None
) -> TlsMaterial | None:
    if pkcs12 is not None:
        data = read_bounded(pkcs12, limit=_MAX_TLS_FILE, what="PKCS#12 bundle")
        return load_given_pkcs12(data, read_passphrase(passphrase_file, prompt=True))
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise click.UsageError("--tls-cert and --tls-key go together")
    return load_given_pem(
        read_bounded(cert, limit=_MAX_TLS_FILE, what="TLS certificate chain"),
        read_bounded(key, limit=_MAX_TLS_FILE, what="TLS private key"),
    )


_path = click.Path(dir_okay=False, path_type=Path)


@hgs.command("init")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New HGS state directory (must not exist or be empty).",
)
@click.option(
    "--name",
    "service_name",
    default="guardfab",
    show_default=True,
    help="Service name: the health certificates' issuer.",
)
@click.option(
    "--listen",
    default="127.0.0.1:8443",
    show_default=True,
    help="Address:port 'hgs serve' listens on by default.",
)
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="DNS name or IP hosts use to reach this HGS; repeat. "
    "[default: 127.0.0.1, localhost and this machine's host name]",
)
@click.option(
    "--tls-cert", type=_path, help="Use this PEM certificate chain instead of a private CA."
)
@click.option("--tls-key", type=_path, help="Unencrypted PEM private key of --tls-cert.")
@click.option("--tls-pkcs12", type=_path, help="Use this PKCS#12 bundle (certificate + key).")
@click.option("--passphrase-file", type=_path, help="Passphrase of --tls-pkcs12 (else a prompt).")
@json_option
@handle_errors
@etcd_store_options(
    endpoint_help="Keep the state in this etcd cluster instead of DIR/state.db: a member's "
    "client URL (https://HOST:2379); repeat for every member.",
    prefix_help="Key prefix of this HGS in etcd (one per fabric; every HGS node of it the same).",
)
def init(
    directory: Path,
    service_name: str,
    listen: str,
    server_names: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_pkcs12: Path | None,
    passphrase_file: Path | None,
    etcd: EtcdStoreSettings | None,
    as_json: bool,
) -> None:
    """Create the HGS state: signing keys, TLS certificate, access tokens, store.

    The administrator and reviewer tokens are written to DIR/tokens/ (0600) and
    shown nowhere else; hosts trust DIR/tls/ca.pem.
    """
    config = HgsConfig(
        service_name=service_name,
        listen=listen,
        server_names=server_names or default_server_names(),
    )
    if etcd is not None:
        config = dataclasses.replace(config, store=etcd.to_dict())
    tls = _given_tls(tls_cert, tls_key, tls_pkcs12, passphrase_file)
    init_state(directory, config, tls=tls)
    data = {
        "dir": str(directory),
        "ca": str(directory / "tls" / "ca.pem"),
        "admin_token_file": str(directory / "tokens" / "admin.token"),
        "reviewer_token_file": str(directory / "tokens" / "reviewer.token"),
    }
    emit(
        as_json,
        data,
        lambda: (
            f"HGS state created in {directory}\n"
            f"  hosts trust:     {data['ca']}\n"
            f"  admin token:     {data['admin_token_file']} (keep it private)\n"
            f"  reviewer token:  {data['reviewer_token_file']}\n"
            f"next: guardfab hgs serve --dir {directory}"
        ),
    )


@hgs.command("serve")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="HGS state directory made by 'hgs init'.",
)
@click.option("--listen", default=None, help="HOST:PORT to listen on [default: from hgs.json].")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes (one per core is a good start).",
)
@handle_errors
def serve(directory: Path, listen: str | None, workers: int) -> None:
    """Serve the attestation, key protection and admin APIs over HTTPS.

    The OpenAPI document is at /openapi.json; hosts need no credential, admin
    routes need the admin (or, read-only, the reviewer) token as a bearer token.
    """
    from guardfab.hgs.server import serve as run  # noqa: PLC0415 - keep the CLI quick to start

    run(directory, listen, workers)
