"""The Key Protection Service's logic, pure: no I/O, no clock, no web framework, no store.

* :func:`release` -- the KPS's decision: health certificate + ingress KP in,
  keys wrapped to the host + egress KP out (:mod:`.release`);
* :func:`unwrap_release` -- the host's side: verify the answer, decrypt the keys
  (:mod:`.host`);
* :func:`open_shielding_data` -- the KPS opens a VM's shielding data (PDK) for
  an attested host (:mod:`.shielding`), and :func:`open_shielding_answer` -- the
  host verifies and decrypts the answer (:mod:`.shielding_host`);
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
    ForeignShieldingDataError,
    HostRevokedError,
    KeyProtectorRejectedError,
    KeyProtectorTamperedError,
    KeyReleaseError,
    RollbackError,
    ShieldingDataRejectedError,
    ShieldingDataTamperedError,
    UntrustedCertificateSignerError,
)
from guardfab.keyprotection.host import ReleasedKeys, unwrap_release
from guardfab.keyprotection.release import ReleaseResult, check_certificate, release
from guardfab.keyprotection.shielding import OpeningResult, open_shielding_data
from guardfab.keyprotection.shielding_host import open_shielding_answer
from guardfab.keyprotection.signers import load_signer_keys, public_signer_jwk

__all__ = [
    "CertificateDeniedError",
    "CertificateExpiredError",
    "CertificateRejectedError",
    "ForeignKeyProtectorError",
    "ForeignShieldingDataError",
    "HostRevokedError",
    "KeyProtectorRejectedError",
    "KeyProtectorTamperedError",
    "KeyReleaseError",
    "OpeningResult",
    "ReleaseResult",
    "ReleasedKeys",
    "RollbackError",
    "ShieldingDataRejectedError",
    "ShieldingDataTamperedError",
    "UntrustedCertificateSignerError",
    "check_certificate",
    "load_signer_keys",
    "open_shielding_answer",
    "open_shielding_data",
    "public_signer_jwk",
    "release",
    "unwrap_release",
]
