"""What the HGS administrator registers for this host, and this host's boot as a baseline.

The identity is public: the EK's public key and its certificate (TPM mode), or
the public half of the host signing key (host-key mode). It is written as a PEM
bundle by default, because that is what the HGS admin commands read
(``hgs host add-tpm --ek-public F --ek-cert F`` find their own block in the same
file; ``hgs host add-key --public-key F``), or as a JSON document holding the
same facts plus the EK digest the HGS will compute, so both sides can compare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey, RSAKey

from guardfab.attestation.baseline import baseline_from_log
from guardfab.attestation.trust import ek_digest
from guardfab.formats import jose, keyfiles
from guardfab.formats.encoding import b64url_encode
from guardfab.host.signer import HostSigner
from guardfab.host.tpm import EndorsementKey
from guardfab.tpm.structures import public_key, unmarshal_public2b


@dataclass(frozen=True)
class HostIdentity:
    """This host's public identity for one attestation mode."""

    mode: str
    public_key_pem: bytes
    details: dict[str, Any]
    certificate_pem: bytes | None = None

    def to_pem(self) -> bytes:
        """A PEM bundle: the public key, then the certificate if there is one.

        No comment line before the first block: the HGS admin commands recognise
        PEM by its first line.
        """
        return self.public_key_pem + (self.certificate_pem or b"")

    def to_json(self) -> bytes:
        """The JSON document (base64url and PEM side by side)."""
        document = {
            "mode": self.mode,
            "public_key_pem": self.public_key_pem.decode(),
            **self.details,
        }
        document["certificate_pem"] = (
            None if self.certificate_pem is None else self.certificate_pem.decode()
        )
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


def tpm_identity(ek: EndorsementKey) -> HostIdentity:
    """The TPM identity: EK public (TPM2B_PUBLIC and PEM), EK certificate, EK digest.

    Raises:
        FormatError: the EK public area is not a usable key.
    """
    key = public_key(unmarshal_public2b(ek.public))
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert_pem = None
    details: dict[str, Any] = {
        "ek_profile": ek.profile,
        "ek_public": b64url_encode(ek.public),
        "ek_digest": ek_digest(ek.public).hex(),
        "ek_certificate_matches": None,
    }
    if ek.certificate is not None:
        cert = x509.load_der_x509_certificate(ek.certificate)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        details["ek_certificate_matches"] = ek_digest(cert) == ek_digest(ek.public)
        details["ek_certificate_issuer"] = cert.issuer.rfc4514_string()
    return HostIdentity("tpm", pem, details, cert_pem)


def host_key_identity(signing_key: HostSigner | jose.AsymmetricKey) -> HostIdentity:
    """The host-key identity: the signing key's public PEM, JWK and RFC 7638 id.

    ``signing_key`` is a signer (a key file or a PKCS#11 token key: only its
    public half is read) or a JOSE key.
    """
    key = signing_key if isinstance(signing_key, ECKey | RSAKey) else signing_key.public_key
    public = jose.import_public_jwk(jose.public_jwk(key), what="host signing key")
    pem = keyfiles.public_key_pem(public)
    details = {"public_jwk": jose.public_jwk(public), "key_id": jose.thumbprint(public)}
    return HostIdentity("host-key", pem, details)


def capture_baseline(name: str, event_log: bytes) -> dict[str, Any]:
    """This host's boot as a TPM baseline document (PCR values and the events behind them).

    For the HGS administrator to review; ``hgs baseline add`` takes the log itself.

    Raises:
        FormatError: the log does not parse or has no SHA-256 bank.
        UsageError: a bad name.
    """
    return baseline_from_log(name, event_log).to_dict()
