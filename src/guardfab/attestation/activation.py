"""First contact: bind an AK to an EK with MakeCredential / ActivateCredential.

When a TPM host presents an AK the HGS has never seen, the result is
ActivationRequired with an :class:`~guardfab.attestation.result.ActivationRequest`.
The service then picks a random secret, sends :func:`activation_challenge`'s
blobs to the host, and keeps the secret (or a MAC of it) server-side. The TPM
releases the secret (TPM2_ActivateCredential) only if the AK with that exact
Name is loaded beside that EK, so a correct answer proves the AK is in the
registered TPM. :func:`check_activation_response` compares in constant time;
on success the service stores :func:`binding_for`'s record.

Pure: no clock, no storage. The secret is the caller's; ``make_credential``
draws its own encryption seed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from guardfab.attestation.result import ActivationRequest
from guardfab.attestation.trust import AkBinding, ek_digest
from guardfab.errors import VerificationError
from guardfab.formats.encoding import b64url_encode
from guardfab.tpm.credential import make_credential
from guardfab.tpm.quote import check_attestation_key
from guardfab.tpm.structures import TpmtPublic, as_public, object_name

#: Secret size the service should use: the SHA-256 digest size, the most an EK
#: with nameAlg SHA-256 accepts.
SECRET_BYTES = 32


class ActivationError(VerificationError):
    """The host's answer is not the secret the challenge protected."""

    hint = (
        "run TPM2_ActivateCredential with the same AK loaded beside the EK, and send "
        "the recovered secret for this challenge"
    )


@dataclass(frozen=True)
class ActivationChallenge:
    """What the host receives: the blobs TPM2_ActivateCredential takes."""

    credential_blob: bytes
    encrypted_secret: bytes
    ak_name: bytes
    ek_digest: bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the host (public data only; the secret is inside, encrypted)."""
        return {
            "credential_blob": b64url_encode(self.credential_blob),
            "encrypted_secret": b64url_encode(self.encrypted_secret),
            "ak_name": self.ak_name.hex(),
        }


def activation_challenge(
    ek_public: TpmtPublic | bytes, ak_public: TpmtPublic | bytes, secret: bytes
) -> ActivationChallenge:
    """Encrypt ``secret`` so that only the EK's TPM, holding this AK, can recover it.

    Raises:
        AttestationKeyError: the AK is not fit for attestation (never bind such a key).
        FormatError: the EK cannot protect a credential, or a malformed public area.
        ValueError: the secret is empty or longer than the EK's digest size.
    """
    ek = as_public(ek_public)
    ak = as_public(ak_public)
    check_attestation_key(ak)
    name = object_name(ak)
    made = make_credential(ek, secret, name)
    return ActivationChallenge(made.credential_blob, made.encrypted_secret, name, ek_digest(ek))


def check_activation_response(expected_secret: bytes, answer: bytes) -> None:
    """Check the host's answer against the secret, in constant time.

    Raises:
        ActivationError: the answer differs (or either side is empty).
    """
    if not expected_secret or not hmac.compare_digest(expected_secret, answer):
        raise ActivationError("the activation answer does not match the challenge secret")


def binding_for(request: ActivationRequest) -> AkBinding:
    """The AK binding to store once the host answered correctly."""
    return AkBinding(request.ak_name, request.ek_digest, request.host_id)
