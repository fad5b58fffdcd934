"""``guardfab hgs kps`` and ``hgs export-state`` / ``import-state``: the Key Protection Service.

Thin commands: the KPS admin commands call the HGS admin API over HTTPS
(through :class:`guardfab.hgs.client.AdminClient`, with the same ``--dir`` or
``--url/--ca/--token-file`` connection as every ``hgs`` admin command); the
backup commands work on a local state directory (:mod:`guardfab.hgs.backup`).
Passphrases and key files are read from files or a hidden prompt, never from
the command line.
"""

from __future__ import annotations

import datetime
import json
import ssl
import time
from pathlib import Path
from typing import Any

import click
import httpx

from guardfab.cli.common import IdArgumentCommand, read_passphrase
from guardfab.cli.etcd_options import etcd_store_options
from guardfab.cli.hgs import hgs
from guardfab.cli.hgs_admin_common import ConnectionOptions, call, connection_options, table
from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.errors import FormatError, TransportError, UsageError
from guardfab.files import PRIVATE, PUBLIC, atomic_write, read_bounded
from guardfab.formats.encoding import load_json_document
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.hgs import backup
from guardfab.hgs.state import EtcdStoreSettings

_file = click.Path(dir_okay=False, path_type=Path)
_existing = click.Path(exists=True, dir_okay=False, path_type=Path)
_directory = click.Path(file_okay=False, path_type=Path)
_MAX_JWK_FILE = 64 * 1024


@hgs.group("kps")
def kps() -> None:
    """The Key Protection Service: trusted signers, deny-before, KPS keys, rotation report.

    \b
    signer       attestation signers whose health certificates are honoured
    deny-before  refuse health certificates issued before a date
    key          KPS guardians: add one, make one primary (old ones still unwrap)
    report       key protectors still seen on non-primary keys
    metadata     the KPS guardian document tenants import
    """


# --------------------------------------------------------------------- signers


@kps.group("signer")
def signer() -> None:
    """Trusted attestation signers (Add-HgsKeyProtectionAttestationSignerCertificate)."""


def _signer_document(
    jwk: Path | None, jwks: Path | None, from_hgs: str | None, ca: Path | None
) -> dict[str, Any]:
    chosen = [v for v in (jwk, jwks, from_hgs) if v is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --jwk, --jwks and --from-hgs")
    if from_hgs is not None:
        return {"jwks": _fetch_signers(from_hgs, ca)}
    path = jwk or jwks
    assert path is not None
    document = load_json_document(
        read_bounded(path, limit=_MAX_JWK_FILE, what="JWK file"), what="JWK file"
    )
    return {"jwk": document} if jwk is not None else {"jwks": document}


def _fetch_signers(url: str, ca: Path | None) -> Any:
    """The /attestation/v1/signers JWK Set of another HGS, over verified TLS."""
    if ca is None:
        raise click.UsageError("--from-hgs needs --from-ca: the other HGS's CA certificate")
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(base_url=url.rstrip("/"), verify=context, timeout=30) as client:
            response = client.get("/attestation/v1/signers")
    except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot fetch the signers of {url} ({type(exc).__name__})") from None
    if response.status_code != 200:
        raise TransportError(f"{url} answered {response.status_code} for its signers")
    return load_json_document(response.content, what="signer JWK Set")


@signer.command("add")
@click.option("--jwk", type=_existing, help="A JSON file holding the signer's public JWK.")
@click.option("--jwks", type=_existing, help="A JSON file holding a JWK Set of signers.")
@click.option("--from-hgs", default=None, help="Fetch the signers of another HGS at this URL.")
@click.option("--from-ca", type=_existing, help="The CA certificate of --from-hgs.")
@connection_options
@json_option
@handle_errors
def signer_add(
    jwk: Path | None,
    jwks: Path | None,
    from_hgs: str | None,
    from_ca: Path | None,
    conn: ConnectionOptions,
    as_json: bool,
) -> None:
    """Trust an attestation signer: its health certificates unlock keys here.

    Compare the ids printed with those the other HGS's administrator gave you.
    """
    body = _signer_document(jwk, jwks, from_hgs, from_ca)
    data = call(conn, lambda c: c.request("POST", "/admin/v1/kps/signers", body=body))
    emit(as_json, data, lambda: "trusted signers added: " + ", ".join(data["added"]))


@signer.command("remove", cls=IdArgumentCommand)
@click.argument("kid")
@connection_options
@json_option
@handle_errors
def signer_remove(kid: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Stop trusting signer KID (Remove-HgsKeyProtectionAttestationSignerCertificate)."""
    data = call(conn, lambda c: c.request("DELETE", f"/admin/v1/kps/signers/{kid}"))
    emit(as_json, data, f"signer {kid} is no longer trusted")


@signer.command("list")
@connection_options
@json_option
@handle_errors
def signer_list(conn: ConnectionOptions, as_json: bool) -> None:
    """The trusted attestation signers (Get-HgsKeyProtectionAttestationSignerCertificate)."""
    data = call(conn, lambda c: c.request("GET", "/admin/v1/kps/signers"))
    rows = [
        (s["kid"], s.get("source", ""), s["jwk"].get("crv", s["jwk"]["kty"]))
        for s in data["signers"]
    ]
    emit(as_json, data, lambda: table(rows, ["kid", "source", "key"]))


# --------------------------------------------------------------------- deny-before


def parse_date(text: str, *, now: float) -> int:
    """``now``, a date (UTC midnight) or an ISO 8601 time; returns Unix seconds."""
    if text == "now":
        return int(now)
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise FormatError(
            f"{text!r} is not a date like 2026-11-27 or 2026-11-27T10:00:00Z"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp())


@kps.command("deny-before")
@click.argument("date", required=False)
@click.option("--clear", is_flag=True, help="Remove the deny-before date.")
@connection_options
@json_option
@handle_errors
def deny_before(date: str | None, clear: bool, conn: ConnectionOptions, as_json: bool) -> None:
    """Refuse health certificates issued before DATE ('now', 2026-11-27, or ISO 8601 UTC).

    Use it after a compromise: every host must attest again before it gets keys.
    Without DATE or --clear, show the current setting.
    """
    if clear and date:
        raise click.UsageError("give DATE or --clear, not both")
    if clear:
        data = call(conn, lambda c: c.request("DELETE", "/admin/v1/kps/deny-before"))
    elif date:
        body = {"deny_before": parse_date(date, now=time.time())}
        data = call(conn, lambda c: c.request("PUT", "/admin/v1/kps/deny-before", body=body))
    else:
        data = call(conn, lambda c: c.request("GET", "/admin/v1/kps/deny-before"))
    emit(as_json, data, lambda: f"deny-before: {_time_text(data['deny_before'])}")


def _time_text(value: int | None) -> str:
    if value is None:
        return "not set"
    return datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------- KPS keys


@kps.group("key")
def key() -> None:
    """KPS guardians (the HGS's encryption and signing keys, Add-HgsKeyProtectionCertificate)."""


def _keys_table(rows: list[dict[str, Any]]) -> str:
    return table(
        [
            (
                k["id"],
                k["name"],
                k["signing_alg"],
                str(k["key_generation"]),
                "primary" if k["primary"] else "",
                _time_text(k["created_at"]),
            )
            for k in rows
        ],
        ["id", "name", "alg", "key gen", "", "created"],
    )


@key.command("add")
@click.option(
    "--new-guardian",
    is_flag=True,
    help="Make a second KPS guardian (a new signing key tenants must grant) instead.",
)
@click.option("--name", default=None, help="With --new-guardian: its name [SERVICE-kps-DATE].")
@click.option(
    "--algorithm",
    type=click.Choice([a.value for a in KeyAlgorithm]),
    default=KeyAlgorithm.EC_P256.value,
    show_default=True,
    help="With --new-guardian: its key family (a new generation keeps the guardian's).",
)
@click.option("--make-primary", is_flag=True, help="Make it current (and primary) at once.")
@connection_options
@json_option
@handle_errors
def key_add(
    new_guardian: bool,
    name: str | None,
    algorithm: str,
    make_primary: bool,
    conn: ConnectionOptions,
    as_json: bool,
) -> None:
    """Rotate: a new encryption key (key generation) for the primary KPS guardian.

    Same guardian id, no tenant action: each KP moves to the current generation
    on its next release, and older generations keep unwrapping until then.
    Without --make-primary the generation is staged: copy keys/kps/ to every
    node, then 'key make-primary'.
    """
    body = {
        "name": name,
        "algorithm": algorithm,
        "make_primary": make_primary,
        "new_guardian": new_guardian,
    }
    data = call(conn, lambda c: c.request("POST", "/admin/v1/kps/keys", body=body))
    emit(
        as_json,
        data,
        lambda: (
            f"added KPS key {data['id']} ({data['name']}) key generation {data['key_generation']}"
            + (" as current primary" if make_primary else "")
        ),
    )


@key.command("make-primary", cls=IdArgumentCommand)
@click.argument("key_id")
@click.option(
    "--key-generation", type=click.IntRange(min=0), default=None, help="Default: the newest."
)
@connection_options
@json_option
@handle_errors
def key_make_primary(
    key_id: str, key_generation: int | None, conn: ConnectionOptions, as_json: bool
) -> None:
    """Make KEY_ID, at a key generation, primary (Set-HgsKeyProtectionCertificate -IsPrimary)."""
    body = {"key_generation": key_generation}
    path = f"/admin/v1/kps/keys/{key_id}/make-primary"
    data = call(conn, lambda c: c.request("POST", path, body=body))
    emit(
        as_json,
        data,
        lambda: (
            f"KPS key {key_id} key generation {data['key_generation']} is now primary;"
            " see 'guardfab hgs kps report'"
        ),
    )


@key.command("list")
@connection_options
@json_option
@handle_errors
def key_list(conn: ConnectionOptions, as_json: bool) -> None:
    """The KPS keys, primary first (Get-HgsKeyProtectionCertificate)."""
    data = call(conn, lambda c: c.request("GET", "/admin/v1/kps/keys"))
    emit(as_json, data, lambda: _keys_table(data["keys"]))


@kps.command("report")
@connection_options
@json_option
@handle_errors
def report(conn: ConnectionOptions, as_json: bool) -> None:
    """Key protectors whose last egress is wrapped to a key other than the current primary.

    A version-2 KP moves to the current key generation on its next release, with
    no owner involved; a version-1 KP (or one on another guardian) needs its
    owner ('guardfab tenant kp upgrade', or 'grant'). A key generation is no
    longer needed by the KPs seen once none shows here under it.
    """
    data = call(conn, lambda c: c.request("GET", "/admin/v1/kps/report"))
    rows = [
        (
            r["kp_id"],
            r["kps_key"],
            str(r["key_generation"]),
            r["owner"],
            r["generation"],
            _time_text(r["at"]),
        )
        for r in data["on_old_keys"]
    ]

    def human() -> str:
        if not rows:
            return (
                f"every KP seen is on the primary key {data['primary']}"
                f" generation {data['key_generation']}"
            )
        headers = ["kp_id", "kps key", "key gen", "owner", "generation", "last release"]
        return table(rows, headers)

    emit(as_json, data, human)


@kps.command("metadata")
@click.option(
    "--out", "-o", type=_file, required=True, help="Where to write the guardian document."
)
@click.option("--all", "everything", is_flag=True, help="Write every KPS guardian as JSON instead.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@connection_options
@json_option
@handle_errors
def metadata(
    out: Path, everything: bool, force: bool, conn: ConnectionOptions, as_json: bool
) -> None:
    """Write the primary KPS guardian document for tenants ('tenant guardian import').

    Give tenants its id (printed) by another channel, for 'import --expect-id'.
    """
    data = call(conn, lambda c: c.request("GET", "/keyprotection/v1/metadata"))
    primary = data["guardians"][0]
    if everything:
        content = json.dumps(data, indent=2).encode() + b"\n"
    else:
        content = primary["document"].encode("ascii") + b"\n"
    atomic_write(out, content, mode=PUBLIC, overwrite=force)
    emit(
        as_json,
        {**primary, "path": str(out)},
        f"wrote {out}: KPS guardian {primary['name']}, id {primary['id']}",
    )


# --------------------------------------------------------------------- backup


def _secret(
    passphrase_file: Path | None, key_file: Path | None, *, new_key: bool, confirm: bool
) -> backup.BackupSecret:
    if passphrase_file is not None and key_file is not None:
        raise click.UsageError("give --passphrase-file or --key-file, not both")
    if key_file is not None:
        if new_key:
            atomic_write(key_file, backup.new_key_file(), mode=PRIVATE)
        return backup.BackupSecret.from_key_file(
            read_bounded(key_file, limit=4096, what="backup key file")
        )
    if new_key:
        raise click.UsageError("--new-key-file goes with --key-file")
    passphrase = read_passphrase(passphrase_file, prompt=True, confirm=confirm)
    if not passphrase:
        raise UsageError(
            "a backup needs --passphrase-file, --key-file, or a passphrase at the prompt"
        )
    return backup.BackupSecret.from_passphrase(passphrase)


@hgs.command("export-state")
@click.option("--dir", "directory", type=_directory, required=True, help="The HGS state directory.")
@click.option("--out", "-o", type=_file, required=True, help="The backup file to write (0600).")
@click.option(
    "--passphrase-file", type=_existing, help="Encrypt under the passphrase in this file."
)
@click.option("--key-file", type=_file, help="Encrypt under this 256-bit key file (a JWK).")
@click.option("--new-key-file", is_flag=True, help="Create --key-file first (0600).")
@json_option
@handle_errors
def export_state(
    directory: Path,
    out: Path,
    passphrase_file: Path | None,
    key_file: Path | None,
    new_key_file: bool,
    as_json: bool,
) -> None:
    """Back up the whole HGS (keys, policies, hosts, signers, audit log) into one encrypted file.

    PBES2-HS512+A256KW (600,000 iterations) under a passphrase, or A256KW under a
    key file; content A256GCM. Keep the passphrase or key file apart from the backup.
    """
    secret = _secret(passphrase_file, key_file, new_key=new_key_file, confirm=True)
    data = backup.export_state(directory, secret, now=time.time())
    atomic_write(out, data, mode=PRIVATE)
    emit(as_json, {"path": str(out), "bytes": len(data)}, f"wrote backup {out} ({len(data)} bytes)")


@hgs.command("import-state")
@click.option(
    "--dir", "directory", type=_directory, required=True, help="The NEW HGS state directory."
)
@click.option("--in", "source", type=_existing, required=True, help="The backup file.")
@click.option("--passphrase-file", type=_existing, help="The backup's passphrase, in a file.")
@click.option("--key-file", type=_existing, help="The backup's key file.")
@click.option(
    "--keep-tls", is_flag=True, help="Restore the backup's TLS CA and certificate (takeover)."
)
@click.option(
    "--server-name", "server_names", multiple=True, help="Names for the new TLS certificate."
)
@click.option("--listen", default=None, help="HOST:PORT for 'hgs serve' [default: the backup's].")
@json_option
@handle_errors
@etcd_store_options(
    endpoint_help="Restore the state into this etcd cluster instead of DIR/state.db: a "
    "member's client URL; repeat for every member.",
    prefix_help="Key prefix to restore into; it must be empty.",
)
def import_state(
    directory: Path,
    source: Path,
    passphrase_file: Path | None,
    key_file: Path | None,
    keep_tls: bool,
    server_names: tuple[str, ...],
    listen: str | None,
    etcd: EtcdStoreSettings | None,
    as_json: bool,
) -> None:
    """Restore a backup into a new HGS directory, ready for 'guardfab hgs serve'.

    The store goes into DIR/state.db (also the way to move an HGS off etcd), or
    with --store-etcd into an etcd prefix that must be empty (the way onto etcd).
    A new private TLS CA and certificate are made unless --keep-tls: hosts then
    trust DIR/tls/ca.pem. Take the original HGS out of service first: two HGSs
    with the same KPS keys would each re-key the same VMs.
    """
    secret = _secret(passphrase_file, key_file, new_key=False, confirm=False)
    data = read_bounded(source, limit=2 * backup.MAX_BACKUP_BYTES, what="backup")
    options = backup.RestoreOptions(
        keep_tls=keep_tls, server_names=server_names or None, listen=listen, etcd=etcd
    )
    config = backup.import_state(data, secret, directory, options, now=time.time())
    where = "state.db" if etcd is None else f"etcd prefix {etcd.prefix!r}"
    result = {
        "dir": str(directory),
        "service_name": config.service_name,
        "ca": str(directory / "tls" / "ca.pem"),
        "store": config.store["backend"],
    }
    emit(
        as_json,
        result,
        f"restored HGS {config.service_name} into {directory} (store: {where})\n"
        f"next: guardfab hgs serve --dir {directory}",
    )
