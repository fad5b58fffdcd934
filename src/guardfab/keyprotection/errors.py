"""Why a key release or a shielding data opening was refused: one typed error per check.

Every error is an :class:`~guardfab.errors.InvalidInputError` (the request, not
the service, is at fault) and carries:

* ``reason``: a short stable token for the audit log and for scripts
  (``untrusted-signer``, ``rollback``...), so an auditor can count refusals by
  cause without parsing messages;
* ``host_id`` / ``kp_id`` / ``generation`` / ``pdk_id``: what the KPS had
  verified about the request when it refused (``None`` when it never got that
  far), so the audit record names the host, the KP or the shielding data (PDK)
  only once they are proven.

Messages name what failed and never hold key material: callers describe what
was wrong, never echo the bytes that were wrong.
"""

from __future__ import annotations

from typing import ClassVar

from guardfab.errors import InvalidInputError


class KeyReleaseError(InvalidInputError):
    """A request the Key Protection Service refused: a key release or a PDK opening."""

    reason: ClassVar[str] = "refused"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.host_id: str | None = None
        self.kp_id: str | None = None
        self.generation: int | None = None
        self.pdk_id: str | None = None

    def annotate(
        self,
        *,
        host_id: str | None,
        kp_id: str | None = None,
        generation: int | None = None,
        pdk_id: str | None = None,
    ) -> None:
        """Record what was already verified when the request was refused (for the audit).

        Values an inner check already recorded are kept; ``None`` never erases one.
        """
        self.host_id = self.host_id if host_id is None else host_id
        self.kp_id = self.kp_id if kp_id is None else kp_id
        self.generation = self.generation if generation is None else generation
        self.pdk_id = self.pdk_id if pdk_id is None else pdk_id


class CertificateRejectedError(KeyReleaseError):
    """The health certificate is not a genuine, well-formed one: no release without it."""

    reason = "certificate-invalid"
    hint = "the host must attest to obtain a health certificate, then ask again"


class UntrustedCertificateSignerError(CertificateRejectedError):
    """The certificate is signed by an attestation service this KPS does not trust."""

    reason = "untrusted-signer"
    hint = (
        "the HGS administrator trusts attestation signers with 'guardfab hgs kps signer add';"
        " or the host attests with an HGS this KPS already trusts"
    )


class CertificateExpiredError(CertificateRejectedError):
    """The certificate is expired or not yet valid."""

    reason = "certificate-expired"
    hint = "the host must attest again to obtain a fresh health certificate"


class CertificateDeniedError(CertificateRejectedError):
    """The certificate was issued before the deny-before date the administrator set."""

    reason = "issued-before-deny-date"
    hint = (
        "health certificates issued before the deny-before date are refused;"
        " the host must attest again"
    )


class HostRevokedError(KeyReleaseError):
    """The certificate is genuine, but the HGS administrator revoked its host since."""

    reason = "host-revoked"
    hint = "a revoked host gets no keys until the HGS administrator reinstates it"


class KeyProtectorRejectedError(KeyReleaseError):
    """The key protector does not load or verify: malformed, or a signature fails."""

    reason = "kp-invalid"
    hint = "send the key protector exactly as stored with the VM (tampered KPs are refused)"


class KeyProtectorTamperedError(KeyProtectorRejectedError):
    """The KP verified, but this KPS's wrapping of the transport key does not authenticate."""

    reason = "kp-unwrap-failed"


class ForeignKeyProtectorError(KeyReleaseError):
    """The KP names none of this HGS's KPS guardians: it is for another fabric."""

    reason = "kp-for-another-fabric"
    hint = (
        "the VM owner must grant this fabric's guardian (see 'guardfab hgs kps metadata')"
        " before this HGS can release its keys"
    )


class RollbackError(KeyReleaseError):
    """An older generation of a KP than this KPS has already released: a replay or rollback."""

    reason = "rollback"
    hint = (
        "use the newest key protector of the VM (the egress KP of its last release);"
        " if it was lost, the VM owner can issue a newer generation"
    )


class ShieldingDataRejectedError(KeyReleaseError):
    """The shielding data (PDK) does not load or verify: malformed, or not its owner's signature."""

    reason = "pdk-invalid"
    hint = "send the shielding data file exactly as the VM owner made it (edited PDKs are refused)"


class ShieldingDataTamperedError(ShieldingDataRejectedError):
    """The PDK verified, but its secrets do not open with this KPS's key: tampered with."""

    reason = "pdk-unseal-failed"


class ForeignShieldingDataError(KeyReleaseError):
    """The PDK names none of this HGS's KPS guardians (or a key of it this KPS does not hold)."""

    reason = "pdk-for-another-fabric"
    hint = (
        "the VM owner must name this fabric's guardian (see 'guardfab hgs kps metadata')"
        " when making the shielding data"
    )
