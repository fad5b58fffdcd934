"""Shielding data on the tenant's machine: read the pieces from files, build and open PDKs.

This is the I/O edge around :mod:`guardfab.formats.shielding_data`: it reads
bounded files, checks that a host certificate and its key belong together (a
mistake found here costs a minute; found at first boot it costs a VM), and looks
guardians up in the local store. Secrets read here are never logged or echoed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from guardfab.errors import FormatError, UsageError, VerificationError
from guardfab.files import read_bounded
from guardfab.formats.shielding_data import (
    MAX_SHIELDING_DATA_BYTES,
    SecurityPolicy,
    ShieldingData,
    ShieldingDataHeader,
    create_shielding_data,
    load_shielding_data,
)
from guardfab.formats.shielding_secrets import (
    MAX_FILES,
    MAX_HOST_CERTIFICATE_BYTES,
    MAX_HOST_KEY_BYTES,
    MAX_SECRET_FILES_BYTES,
    AnswerFile,
    AnswerFileKind,
    HostCertificate,
    HostCertificateKind,
    ShieldingSecrets,
    check_file_name,
)
from guardfab.formats.template import MAX_QUALIFIER_BYTES, VolumeIdQualifier
from guardfab.tenant.guardians import GuardianKeys, GuardianStore

_MAX_PASSWORD_FILE_BYTES = 4096


def read_admin_password(path: Path) -> str:
    """The administrator password from ``path``, minus one trailing newline.

    Only one line ending is dropped: spaces are kept, since they may be part of
    the password; any other control character is refused later by the model.
    """
    data = read_bounded(path, limit=_MAX_PASSWORD_FILE_BYTES, what="admin password file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"admin password file {path} is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


def read_answer_file(path: Path, kind: AnswerFileKind) -> AnswerFile:
    """Read an unattend.xml or cloud-init user-data file (opaque bytes, 384 KiB at most)."""
    return AnswerFile(kind, read_bounded(path, limit=MAX_SECRET_FILES_BYTES, what="answer file"))


def read_other_files(paths: Sequence[Path]) -> dict[str, bytes]:
    """Read the other files, each kept under its base name (384 KiB in all).

    Raises:
        UsageError: two paths share a base name, or there are too many files.
        FormatError: a name is not a plain file name, or the files are too large.
    """
    if len(paths) > MAX_FILES:
        raise UsageError(f"at most {MAX_FILES} files can ride in shielding data")
    files: dict[str, bytes] = {}
    for path in paths:
        name = check_file_name(Path(path).name)
        if name in files:
            raise UsageError(f"two files are named {name!r}", hint="rename one of them")
        files[name] = read_bounded(path, limit=MAX_SECRET_FILES_BYTES, what="file")
    total = sum(len(content) for content in files.values())
    if total > MAX_SECRET_FILES_BYTES:
        raise FormatError(
            f"the files take {total} bytes, more than the limit of {MAX_SECRET_FILES_BYTES}"
            " (384 KiB, answer file included)"
        )
    return files


def read_qualifiers(paths: Sequence[Path]) -> list[VolumeIdQualifier]:
    """Read volume ID qualifier files (``guardfab template`` writes them)."""
    return [
        VolumeIdQualifier.from_bytes(
            read_bounded(path, limit=MAX_QUALIFIER_BYTES, what="volume ID qualifier")
        )
        for path in paths
    ]


def read_host_certificate(
    certificate: Path, private_key: Path, kind: HostCertificateKind
) -> HostCertificate:
    """Read an RDP or SSH host certificate and its key, and check they belong together."""
    cert = HostCertificate(
        kind=kind,
        certificate=read_bounded(
            certificate, limit=MAX_HOST_CERTIFICATE_BYTES, what="host certificate"
        ),
        private_key=read_bounded(private_key, limit=MAX_HOST_KEY_BYTES, what="host private key"),
    )
    check_host_certificate(cert)
    return cert


def check_host_certificate(cert: HostCertificate) -> None:
    """Refuse a host certificate that does not parse or whose key is not its key.

    SSH: an OpenSSH *host* certificate and an unencrypted OpenSSH private key.
    RDP: a PEM X.509 certificate and an unencrypted PEM private key. The key is
    stored unencrypted because the shielding data itself is what protects it.

    Raises:
        FormatError: either part does not parse, or the key is passphrase-protected.
        VerificationError: the private key does not match the certificate.
    """
    try:
        if cert.kind is HostCertificateKind.SSH:
            certified, actual = _ssh_public_keys(cert)
        else:
            certified, actual = _x509_public_keys(cert)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FormatError(
            f"{cert.kind.value} host certificate or key does not parse ({exc.__class__.__name__})",
            hint="give the key without a passphrase: the shielding data encrypts it",
        ) from None
    if certified != actual:
        raise VerificationError(
            f"the {cert.kind.value} host private key does not belong to the host certificate"
        )


def _ssh_public_keys(cert: HostCertificate) -> tuple[bytes, bytes]:
    identity = serialization.load_ssh_public_identity(cert.certificate.strip())
    if not isinstance(identity, serialization.SSHCertificate):
        raise FormatError("the SSH host certificate is a plain public key, not a certificate")
    if identity.type is not serialization.SSHCertificateType.HOST:
        raise FormatError("the SSH certificate is a user certificate, not a host certificate")
    key = serialization.load_ssh_private_key(cert.private_key, password=None)
    openssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    return identity.public_key().public_bytes(*openssh), key.public_key().public_bytes(*openssh)


def _x509_public_keys(cert: HostCertificate) -> tuple[bytes, bytes]:
    certificate = x509.load_pem_x509_certificate(cert.certificate)
    key = serialization.load_pem_private_key(cert.private_key, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return certificate.public_key().public_bytes(*spki), key.public_key().public_bytes(*spki)


@dataclass(frozen=True)
class PdkRequest:
    """What a tenant asks for: the public choices; the secrets come separately."""

    name: str
    guardians: tuple[str, ...]
    policy: SecurityPolicy
    qualifiers: tuple[VolumeIdQualifier, ...] = ()


def build_shielding_data(
    store: GuardianStore,
    owner_keys: GuardianKeys,
    request: PdkRequest,
    secrets: ShieldingSecrets,
    *,
    created_at: int,
) -> bytes:
    """Seal ``secrets`` for the owner and the stored guardians ``request.guardians``."""
    if not request.guardians:
        raise UsageError(
            "name at least one guardian: the HGS guardian of a fabric that may run the VM",
            hint="import it with 'guardfab tenant guardian import'",
        )
    documents = [store.document(name) for name in request.guardians]
    return create_shielding_data(
        owner_keys,
        documents,
        policy=request.policy,
        secrets=secrets,
        qualifiers=request.qualifiers,
        name=request.name,
        created_at=created_at,
    )


def read_shielding_data(path: Path, *, expected_owner: str | None = None) -> ShieldingData:
    """Read and verify a shielding data file (nothing is decrypted)."""
    data = read_bounded(path, limit=MAX_SHIELDING_DATA_BYTES, what="shielding data file")
    return load_shielding_data(data, expected_owner=expected_owner)


def revealing_guardian(store: GuardianStore, header: ShieldingDataHeader) -> str:
    """The local name of a guardian that can open ``header``'s secrets, the owner first.

    Raises:
        UsageError: no guardian of this file has its private keys in ``store``.
    """
    for guardian_id in (header.owner.id, *(g.id for g in header.guardians)):
        name = store.find_by_id(guardian_id)
        if name is not None and store.has_private_keys(name):
            return name
    raise UsageError(
        f"none of the guardians of shielding data {header.name!r} has private keys here",
        hint="only the owner or a listed guardian can reveal the secrets",
    )
