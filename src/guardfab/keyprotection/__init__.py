"""The Key Protection Service's logic, pure: no I/O, no clock, no web framework, no store.

* :func:`release` -- the KPS's decision: health certificate + ingress KP in,
  keys wrapped to the host + egress KP out (:mod:`.release`);
* :func:`unwrap_release` -- the host's side: verify the answer, decrypt the keys
  (:mod:`.host`);
* :func:`load_signer_keys` -- trusted attestation signers from a JWK or JWK Set
  (:mod:`.signers`);
* the typed refusals, one per check (:mod:`.errors`).

The HGS wires these to its store and HTTPS API in :mod:`guardfab.hgs.kps`.
"""

from guardfab.keyprotection.errors import (
    CertificateDeniedError,
    CertificateExpiredError,
    CertificateRejectedError,
    ForeignKeyProtectorError,
    HostRevokedError,
    KeyProtectorRejectedError,
    KeyProtectorTamperedError,
    KeyReleaseError,
    RollbackError,
    UntrustedCertificateSignerError,
)
from guardfab.keyprotection.host import ReleasedKeys, unwrap_release
from guardfab.keyprotection.release import ReleaseResult, check_certificate, release
from guardfab.keyprotection.signers import load_signer_keys, public_signer_jwk

__all__ = [
    "CertificateDeniedError",
    "CertificateExpiredError",
    "CertificateRejectedError",
    "ForeignKeyProtectorError",
    "HostRevokedError",
    "KeyProtectorRejectedError",
    "KeyProtectorTamperedError",
    "KeyReleaseError",
    "ReleaseResult",
    "ReleasedKeys",
    "RollbackError",
    "UntrustedCertificateSignerError",
    "check_certificate",
    "load_signer_keys",
    "public_signer_jwk",
    "release",
    "unwrap_release",
]
