"""tenant.pdk: reading the pieces of a PDK from files, and host certificate checks
with real OpenSSH and X.509 certificates made on the spot."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from guardfab.errors import FormatError, UsageError, VerificationError
from guardfab.formats.shielding_secrets import (
    MAX_SECRET_FILES_BYTES,
    AnswerFileKind,
    HostCertificate,
    HostCertificateKind,
)
from guardfab.tenant import pdk

# --- certificate material ------------------------------------------------------------------


def ssh_host_certificate(
    cert_type: serialization.SSHCertificateType = serialization.SSHCertificateType.HOST,
) -> tuple[bytes, bytes, bytes]:
    """(certificate, its private key, another private key), OpenSSH formats."""
    ca = ed25519.Ed25519PrivateKey.generate()
    host = ed25519.Ed25519PrivateKey.generate()
    other = ed25519.Ed25519PrivateKey.generate()
    cert = (
        serialization.SSHCertificateBuilder()
        .public_key(host.public_key())
        .type(cert_type)
        .valid_principals([b"web01.example"])
        .valid_after(0)
        .valid_before(2**63)
        .sign(ca)
    )

    def pem(key: ed25519.Ed25519PrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )

    return cert.public_bytes() + b"\n", pem(host), pem(other)


def rdp_certificate() -> tuple[bytes, bytes, bytes]:
    """(PEM certificate, its PKCS#8 key, another key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web01.example")])
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )

    def pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    return cert.public_bytes(serialization.Encoding.PEM), pem(key), pem(other)


# --- host certificates -------------------------------------------------------------------


def test_matching_ssh_and_rdp_certificates_are_accepted(tmp_path: Path) -> None:
    for kind, (cert, key, _) in (
        (HostCertificateKind.SSH, ssh_host_certificate()),
        (HostCertificateKind.RDP, rdp_certificate()),
    ):
        (tmp_path / "c").write_bytes(cert)
        (tmp_path / "k").write_bytes(key)
        loaded = pdk.read_host_certificate(tmp_path / "c", tmp_path / "k", kind)
        assert loaded == HostCertificate(kind, cert, key)


@pytest.mark.parametrize("kind", list(HostCertificateKind))
def test_a_key_that_is_not_the_certificates_is_refused(kind: HostCertificateKind) -> None:
    cert, _, other = (
        ssh_host_certificate() if kind is HostCertificateKind.SSH else rdp_certificate()
    )
    with pytest.raises(VerificationError, match="does not belong"):
        pdk.check_host_certificate(HostCertificate(kind, cert, other))


def test_ssh_certificate_problems_are_named() -> None:
    cert, key, _ = ssh_host_certificate(serialization.SSHCertificateType.USER)
    with pytest.raises(FormatError, match="user certificate"):
        pdk.check_host_certificate(HostCertificate(HostCertificateKind.SSH, cert, key))
    host = ed25519.Ed25519PrivateKey.generate()
    plain = host.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    with pytest.raises(FormatError, match="plain public key"):
        pdk.check_host_certificate(HostCertificate(HostCertificateKind.SSH, plain, key))


def test_kinds_mixed_up_or_garbage_do_not_parse() -> None:
    ssh_cert, ssh_key, _ = ssh_host_certificate()
    rdp_cert, rdp_key, _ = rdp_certificate()
    for cert in (
        HostCertificate(HostCertificateKind.RDP, ssh_cert, ssh_key),
        HostCertificate(HostCertificateKind.SSH, rdp_cert, rdp_key),
        HostCertificate(HostCertificateKind.RDP, b"garbage", rdp_key),
    ):
        with pytest.raises(FormatError, match="does not parse") as info:
            pdk.check_host_certificate(cert)
        assert b"PRIVATE" not in info.value.diagnostics().encode()


def test_an_encrypted_host_key_is_refused_with_a_hint() -> None:
    cert, _, _ = rdp_certificate()
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(FormatError) as info:
        pdk.check_host_certificate(HostCertificate(HostCertificateKind.RDP, cert, key))
    assert "without a passphrase" in info.value.diagnostics()


# --- other inputs --------------------------------------------------------------------------


def test_admin_password_file_drops_one_line_ending_only(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_bytes(b" two words \r\n")
    assert pdk.read_admin_password(path) == " two words "
    path.write_bytes(b"pw\n\n")
    assert pdk.read_admin_password(path) == "pw\n"  # the model refuses the newline later
    path.write_bytes(b"\xff")
    with pytest.raises(FormatError, match="not UTF-8"):
        pdk.read_admin_password(path)
    with pytest.raises(UsageError, match="cannot read"):
        pdk.read_admin_password(tmp_path / "missing")


def test_other_files_keep_base_names_and_refuse_clashes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "setup.sh").write_bytes(b"1")
    (tmp_path / "b" / "setup.sh").write_bytes(b"2")
    (tmp_path / "a" / "x.txt").write_bytes(b"3")
    files = pdk.read_other_files([tmp_path / "a" / "setup.sh", tmp_path / "a" / "x.txt"])
    assert files == {"setup.sh": b"1", "x.txt": b"3"}
    with pytest.raises(UsageError, match="two files are named"):
        pdk.read_other_files([tmp_path / "a" / "setup.sh", tmp_path / "b" / "setup.sh"])
    (tmp_path / ".env").write_bytes(b"")
    with pytest.raises(FormatError, match="file names"):
        pdk.read_other_files([tmp_path / ".env"])


def test_other_files_over_384_kib_are_refused(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(bytes(MAX_SECRET_FILES_BYTES + 1))
    with pytest.raises(FormatError, match="larger than the limit"):
        pdk.read_other_files([tmp_path / "big"])
    (tmp_path / "h1").write_bytes(bytes(MAX_SECRET_FILES_BYTES // 2 + 1))
    (tmp_path / "h2").write_bytes(bytes(MAX_SECRET_FILES_BYTES // 2))
    with pytest.raises(FormatError, match="384 KiB"):
        pdk.read_other_files([tmp_path / "h1", tmp_path / "h2"])


def test_answer_file_is_read_as_opaque_bytes(tmp_path: Path) -> None:
    (tmp_path / "user-data").write_bytes(b"#cloud-config\x00\xff")
    answer = pdk.read_answer_file(tmp_path / "user-data", AnswerFileKind.CLOUD_INIT)
    assert answer.content == b"#cloud-config\x00\xff"
