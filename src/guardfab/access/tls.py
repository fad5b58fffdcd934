"""TLS material for guardfab's HTTPS services: a private CA and a server certificate.

Shared by the HGS (``hgs init``) and the guarded-host agent's management API
(``host manage init``): a small private CA (ECDSA P-256) and a server
certificate for the names the service is reached by. Clients trust the CA
certificate (``tls/ca.pem``), which the service's administrator distributes. An
operator may instead bring a certificate from their own PKI (PEM or PKCS#12).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guardfab.errors import FormatError, NotAuthorizedError

CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=397)


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of the CA certificate, the server chain and the server key."""

    ca_pem: bytes
    server_chain_pem: bytes
    server_key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_private_ca_and_server(
    ca_name: str, server_names: list[str], *, now: datetime.datetime
) -> TlsMaterial:
    """Create a private CA named ``ca_name`` and a server certificate for ``server_names``.

    ``server_names`` are DNS names or IP addresses; the first is the subject's CN.
    """
    if not server_names:
        raise FormatError("at least one server name (DNS name or IP address) is needed")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(_alt_names(server_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return TlsMaterial(
        ca_pem=ca_cert.public_bytes(pem),
        server_chain_pem=server_cert.public_bytes(pem) + ca_cert.public_bytes(pem),
        server_key_pem=server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def load_given_pem(chain_pem: bytes, key_pem: bytes) -> TlsMaterial:
    """Use an operator's certificate chain and key (PEM); the last chain entry is the CA."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise FormatError("TLS certificate or key: not valid (unencrypted) PEM") from exc
    if _spki(chain[0].public_key()) != _spki(key.public_key()):
        raise FormatError("TLS key does not match the first certificate of the chain")
    pem = serialization.Encoding.PEM
    return TlsMaterial(
        ca_pem=chain[-1].public_bytes(pem),
        server_chain_pem=b"".join(c.public_bytes(pem) for c in chain),
        server_key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _spki(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        raise FormatError("TLS key type is not supported")
    der: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def load_given_pkcs12(data: bytes, passphrase: str | None) -> TlsMaterial:
    """Use an operator's PKCS#12 bundle (certificate, key, optional CA chain)."""
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(
            data, passphrase.encode() if passphrase else None
        )
    except ValueError:
        raise NotAuthorizedError("PKCS#12 bundle: wrong passphrase or not PKCS#12") from None
    if key is None or cert is None:
        raise FormatError("PKCS#12 bundle: it must hold a certificate and its private key")
    pem = serialization.Encoding.PEM
    chain = b"".join(c.public_bytes(pem) for c in [cert, *extra])
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return load_given_pem(chain, key_pem)
