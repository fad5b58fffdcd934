"""X.509 path validation for EK certificates and admin-group client certificates.

Both use ``cryptography.x509.verification`` (``PolicyBuilder``), the vetted,
RFC 5280 path builder, rather than a hand-written chain walk.

EK certificates do not fit the Web PKI profile that ``PolicyBuilder`` defaults
to: the TCG EK Credential Profile gives them an empty subject, a
directoryName SAN with TPM manufacturer attributes (or none at all on older
parts), no serverAuth/clientAuth EKU (tcg-kp-EKCertificate or nothing), and
vendor CAs that often lack the key usage or key identifier extensions Web PKI
requires. So the EK verifier keeps everything that matters for trust (chain
building, signatures, validity at the caller's time, key sizes and signature
algorithms) and relaxes only the extension profile: the leaf may carry any
extensions, and a CA must carry basicConstraints with ``cA`` true. The leaf's
key is then compared with the TPM's EK, which is the actual identity check.

Admin-group client certificates are ordinary TLS client certificates, so they
get ``PolicyBuilder``'s default client profile (clientAuth EKU, Web PKI extensions).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
)
from cryptography.x509.verification import (
    VerificationError as X509VerificationError,
)

from guardfab.errors import FormatError, VerificationError

#: The SAN URI prefix that names a host's group in admin-group mode.
GROUP_URI_PREFIX = "urn:guardfab:group:"


class UntrustedCertificateError(VerificationError):
    """A certificate does not chain to a configured root at the given time."""

    hint = "check that the issuing CA is configured at the HGS and the certificate is valid now"


def load_der_certificate(data: bytes, *, what: str) -> x509.Certificate:
    """Parse a DER certificate, naming ``what`` if it does not parse."""
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise FormatError(f"{what}: not a DER X.509 certificate") from exc


def _require_ca(_policy: Any, _cert: x509.Certificate, ext: Any) -> None:
    if not isinstance(ext, x509.BasicConstraints) or not ext.ca:
        raise ValueError("basicConstraints does not say cA")


_EK_CA_POLICY = ExtensionPolicy.permit_all().require_present(
    x509.BasicConstraints, Criticality.AGNOSTIC, _require_ca
)


def verify_ek_certificate(
    cert: x509.Certificate,
    store: Store,
    intermediates: Sequence[x509.Certificate],
    *,
    now: datetime.datetime,
) -> None:
    """Check that an EK certificate chains to a TPM vendor root in ``store`` at ``now``.

    Raises:
        UntrustedCertificateError: no valid path (unknown CA, bad signature, expired).
    """
    builder = (
        PolicyBuilder()
        .store(store)
        .time(now)
        .extension_policies(ca_policy=_EK_CA_POLICY, ee_policy=ExtensionPolicy.permit_all())
    )
    try:
        builder.build_client_verifier().verify(cert, list(intermediates))
    except X509VerificationError as exc:
        raise UntrustedCertificateError(
            f"the EK certificate does not chain to a trusted TPM vendor CA ({exc})"
        ) from exc


def verify_client_chain(
    chain: Sequence[x509.Certificate], store: Store, *, now: datetime.datetime
) -> list[x509.GeneralName]:
    """Verify a client certificate chain (leaf first); return the leaf's SAN names.

    Raises:
        UntrustedCertificateError: no valid path to a root in ``store`` at ``now``.
    """
    verifier = PolicyBuilder().store(store).time(now).build_client_verifier()
    try:
        verified = verifier.verify(chain[0], list(chain[1:]))
    except X509VerificationError as exc:
        raise UntrustedCertificateError(
            f"the host certificate does not chain to a configured host CA ({exc})"
        ) from exc
    return list(verified.subjects or [])


def groups_and_host(names: Sequence[x509.GeneralName]) -> tuple[list[str], str | None]:
    """The groups (``urn:guardfab:group:<name>`` SAN URIs) and host id (first DNS name)."""
    groups = [
        name.value.removeprefix(GROUP_URI_PREFIX)
        for name in names
        if isinstance(name, x509.UniformResourceIdentifier)
        and name.value.startswith(GROUP_URI_PREFIX)
    ]
    hosts = [name.value for name in names if isinstance(name, x509.DNSName)]
    return groups, (hosts[0] if hosts else None)
