"""``guardfab template``: template disk signing and verification.

Thin commands: each parses its options, calls :mod:`guardfab.tenant.template`
or :mod:`guardfab.formats.template`, writes at most its output files (atomically,
and only once everything succeeded) and prints a summary.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from guardfab.cli.common import passphrase_file_option, read_passphrase
from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.errors import UsageError
from guardfab.files import PRIVATE, PUBLIC, atomic_write, read_bounded
from guardfab.formats import jose, keyfiles
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.formats.template import (
    MAX_CATALOG_BYTES,
    MAX_SIGNATURE_BYTES,
    DiskVersion,
    PublisherKey,
    VerifiedDiskSignature,
    VersionRule,
    VolumeSignatureCatalog,
)
from guardfab.tenant import template as disks

_KEY_ALGORITHMS = {
    "es256": KeyAlgorithm.EC_P256,
    "es384": KeyAlgorithm.EC_P384,
    "ps256": KeyAlgorithm.RSA_3072,
}
_MAX_KEY_BYTES = 64 * 1024

_file = click.Path(dir_okay=False, path_type=Path)
_existing_file = click.Path(dir_okay=False, exists=True, path_type=Path)
_disk = click.Path(dir_okay=False, exists=True, readable=True, path_type=Path)
_force_option = click.option("--force", is_flag=True, help="Replace the output file if it exists.")
_name_option = click.option(
    "--name", required=True, help="Template name, e.g. 'ws2025-datacenter' (compared exactly)."
)
_version_option = click.option(
    "--version", "version", required=True, help="Template version a.b.c.d, e.g. 10.0.26100.1."
)


@click.group()
def template() -> None:
    """Sign and verify template disks; write volume signature catalogs and qualifiers.

    \b
    Publisher:  keygen, then protect each template disk, then catalog it.
    Tenant:     qualifier (from the publisher's catalog), then verify a disk.
    """


def _private_key(path: Path, passphrase_file: Path | None) -> jose.AsymmetricKey:
    data = read_bounded(path, limit=_MAX_KEY_BYTES, what="publisher key")
    passphrase = None
    if b"ENCRYPTED PRIVATE KEY" in data:
        passphrase = read_passphrase(passphrase_file, prompt=True)
    key = keyfiles.load_private_key(data, passphrase, what=f"publisher key {path}")
    jose.signing_alg_for(key)
    return key


def _refuse_existing(*paths: Path | None, force: bool) -> None:
    for path in paths:
        if path is not None and path.exists() and not force:
            raise UsageError(f"{path} already exists", hint="choose another path or pass --force")


@contextlib.contextmanager
def _progress(path: Path, label: str) -> Iterator[disks.ProgressCallback | None]:
    """A progress bar on stderr when it is a terminal; no output at all otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(
        length=disks.disk_size(path), label=label, file=sys.stderr, show_pos=False
    ) as bar:
        yield bar.update


@template.command()
@click.option("--out", required=True, type=_file, help="Private key file to write (mode 0600).")
@click.option(
    "--public-out", type=_file, default=None, help="Also write the public key (PEM) here."
)
@click.option(
    "--algorithm",
    type=click.Choice(sorted(_KEY_ALGORITHMS)),
    default="es384",
    show_default=True,
    help="Signature algorithm: ECDSA P-256/P-384 or RSA-PSS (3072-bit key).",
)
@click.option("--encrypt-key", is_flag=True, help="Encrypt the key (PKCS#8) under a passphrase.")
@passphrase_file_option
@_force_option
@json_option
@handle_errors
def keygen(
    out: Path,
    public_out: Path | None,
    algorithm: str,
    encrypt_key: bool,
    passphrase_file: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Create a template publisher key pair and print its key id (RFC 7638 thumbprint)."""
    _refuse_existing(out, public_out, force=force)
    passphrase = None
    if encrypt_key or passphrase_file:
        passphrase = read_passphrase(passphrase_file, prompt=True, confirm=True)
        if not passphrase:
            raise UsageError("--encrypt-key needs --passphrase-file or a terminal prompt")
    key = keyfiles.generate_key(_KEY_ALGORITHMS[algorithm])
    atomic_write(out, keyfiles.private_key_pem(key, passphrase), mode=PRIVATE, overwrite=force)
    if public_out is not None:
        try:
            atomic_write(public_out, keyfiles.public_key_pem(key), mode=PUBLIC, overwrite=force)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    kid = jose.thumbprint(key)
    data = {"key": str(out), "public_key": str(public_out) if public_out else None, "kid": kid}
    emit(as_json, data, f"wrote publisher key {out}\nkey id: {kid}")


@template.command()
@click.argument("disk", type=_disk)
@_name_option
@_version_option
@click.option("--key", "key_path", required=True, type=_existing_file, help="Publisher key (PEM).")
@click.option("--out", type=_file, default=None, help="Signature file [default: DISK.sig].")
@passphrase_file_option
@_force_option
@json_option
@handle_errors
def protect(
    disk: Path,
    name: str,
    version: str,
    key_path: Path,
    out: Path | None,
    passphrase_file: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Sign template DISK: write a detached signature {digest, size, name, version}.

    The signature is a compact JWS over a chunked SHA-256 (Merkle) digest of the
    whole disk. Nothing is written unless the disk was read and signed.
    """
    out = out or disk.with_name(disk.name + ".sig")
    _refuse_existing(out, force=force)
    disk_version = DiskVersion.parse(version)
    key = _private_key(key_path, passphrase_file)
    with _progress(disk, "hashing") as progress:
        statement, signature = disks.protect_disk(
            disk, key, name=name, version=disk_version, progress=progress
        )
    atomic_write(out, signature, mode=PUBLIC, overwrite=force)
    data = {"signature": str(out), "publisher": jose.thumbprint(key), **statement.to_dict()}
    emit(as_json, data, f"signed {disk} as {name} {disk_version}\nwrote {out}")


@template.command()
@click.argument("disk", type=_disk)
@click.option(
    "--signature", type=_existing_file, default=None, help="Signature file [default: DISK.sig]."
)
@click.option(
    "--publisher",
    required=True,
    type=_existing_file,
    help="Whom to trust: the publisher's public key (PEM or JWK), a volume signature catalog "
    "(also requires its name and exact version) or a volume ID qualifier (its rule).",
)
@json_option
@handle_errors
def verify(disk: Path, signature: Path | None, publisher: Path, as_json: bool) -> None:
    """Check that DISK is byte for byte what the trusted publisher signed.

    Exits non-zero, naming what failed, if the signature is not the publisher's,
    the name or version is not admitted, or any byte of the disk differs.
    """
    signature = signature or disk.with_name(disk.name + ".sig")
    if not signature.is_file():
        raise UsageError(f"signature file {signature} not found", hint="pass --signature FILE")
    data = read_bounded(signature, limit=MAX_SIGNATURE_BYTES, what="signature")
    anchor = disks.load_trust_anchor(
        read_bounded(publisher, limit=MAX_CATALOG_BYTES, what="publisher"),
        what=f"publisher {publisher}",
    )
    with _progress(disk, "verifying") as progress:
        verified = anchor.verify(disk, data, progress=progress)
    emit(as_json, _verified_dict(verified, anchor.source), lambda: _verified_text(disk, verified))


def _verified_dict(verified: VerifiedDiskSignature, source: str) -> dict[str, object]:
    return {
        "verified": True,
        "trusted_by": source,
        "publisher": verified.publisher.thumbprint,
        **verified.statement.to_dict(),
    }


def _verified_text(disk: Path, verified: VerifiedDiskSignature) -> str:
    s = verified.statement
    return (
        f"OK: {disk} is {s.name} {s.disk_version} ({s.size} bytes)\n"
        f"signed by {verified.publisher.thumbprint}"
    )


@template.command()
@click.option("--key", "key_path", required=True, type=_existing_file, help="Publisher key (PEM).")
@_name_option
@_version_option
@click.option("--out", required=True, type=_file, help="Catalog file to write.")
@passphrase_file_option
@_force_option
@json_option
@handle_errors
def catalog(
    key_path: Path,
    name: str,
    version: str,
    out: Path,
    passphrase_file: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a volume signature catalog (publisher key, name, version) for tenants.

    The catalog is self-signed with the publisher's private key, so it cannot be
    edited without it; tenants turn it into a qualifier with 'template qualifier'.
    """
    _refuse_existing(out, force=force)
    disk_version = DiskVersion.parse(version)
    key = _private_key(key_path, passphrase_file)
    vsc = VolumeSignatureCatalog(PublisherKey.from_key(key), name, disk_version)
    atomic_write(out, vsc.sign(key), mode=PUBLIC, overwrite=force)
    data = {"catalog": str(out), "publisher": vsc.publisher.thumbprint, "name": name}
    emit(as_json, {**data, "disk_version": version}, f"wrote catalog {out}")


@template.command()
@click.option(
    "--catalog", "catalog_path", required=True, type=_existing_file, help="Publisher's catalog."
)
@click.option(
    "--rule",
    required=True,
    type=click.Choice([rule.value for rule in VersionRule]),
    help="Which disk versions qualify, compared with the catalog's version.",
)
@click.option("--out", required=True, type=_file, help="Qualifier file to write.")
@_force_option
@json_option
@handle_errors
def qualifier(catalog_path: Path, rule: str, out: Path, force: bool, as_json: bool) -> None:
    """Write a volume ID qualifier: the catalog's publisher and name, plus a version rule.

    Shielding data carries qualifiers; a host provisions a VM only from a disk
    whose signature one of them admits.
    """
    _refuse_existing(out, force=force)
    data = read_bounded(catalog_path, limit=MAX_CATALOG_BYTES, what="catalog")
    vic = VolumeSignatureCatalog.from_bytes(data).qualifier(VersionRule.parse(rule))
    atomic_write(out, vic.to_bytes(), mode=PUBLIC, overwrite=force)
    summary = vic.to_dict()
    summary["publisher"] = vic.publisher.thumbprint
    emit(
        as_json,
        {"qualifier": str(out), **summary},
        f"wrote qualifier {out}: {vic.name} {rule} {vic.disk_version}",
    )
