"""The KPS opens a VM's shielding data (PDK) for an attested host (reference: provisioning).

In the reference the KPS, a guardian named in the PDK, opens the shielding data
for a host that proved its health, so the fabric administrator's tools never see
the secrets in clear. Pure, like :mod:`.release`: the caller passes the time,
the trusted signers, the revoked hosts and the KPS keys.

Checks, in order, each with its own error (:mod:`guardfab.keyprotection.errors`):

1. the health certificate, exactly as for a release
   (:func:`~guardfab.keyprotection.release.check_certificate`: trusted signer,
   validity, deny-before date, host not revoked; ``cnf`` is covered by the signature);
2. the PDK loads and its owner's signature verifies over the exact bytes
   (:func:`~guardfab.formats.shielding_data.load_shielding_data`: header in its
   normal form, secrets sealed to exactly the header's guardians, bound to the header);
3. it names one of this HGS's KPS guardians, at a key generation this KPS holds
   (else it is for another fabric);
4. the secrets open with that key generation's private key (else they were tampered with).

The answer holds the secrets and nothing else, encrypted to the host key the
certificate names in ``cnf`` (JWE, the release's key agreement), with AAD
binding the PDK's id and SHA-256, the host id and the certificate id; the whole
is a JWS by the PDK's KPS guardian, whose signing key the host reads from the
owner-signed PDK it sent (anyone can encrypt to a public key; only the KPS can
sign -- without the signature, whoever stood between host and KPS could hand
the VM an answer file of its own). The opening is not single use: one PDK
provisions many VMs (ADR 0010).
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardfab.errors import InvalidInputError, UsageError
from guardfab.formats import jose
from guardfab.formats.encoding import canonical_json
from guardfab.formats.guardian import Guardian
from guardfab.formats.health_certificate import HealthCertificate
from guardfab.formats.key_protector import GuardianKeyPair, KpsKeys
from guardfab.formats.shielding_data import ShieldingData, load_shielding_data
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.keyprotection.errors import (
    ForeignShieldingDataError,
    KeyReleaseError,
    ShieldingDataRejectedError,
    ShieldingDataTamperedError,
)
from guardfab.keyprotection.release import check_certificate

#: JOSE ``typ`` of the signed answer.
OPENING_JWS_TYPE = "guardfab-shielding-opening+jws"
#: ``type`` member of the answer's payload.
OPENING_PAYLOAD_TYPE = "guardfab.shielding-opening"
#: ``type`` member of the AAD of the encrypted secrets.
SECRETS_AAD_TYPE = "guardfab.shielding-opening-secrets"
OPENING_VERSION = 1


def secrets_aad(*, pdk_id: str, pdk_sha256: str, host_id: str, certificate_id: str) -> bytes:
    """The AAD of the encrypted secrets: which PDK, for which host and certificate.

    The host recomputes it from the PDK it sent and the signed payload, so a
    wrapping lifted from another opening (another PDK, host or certificate) fails
    the AES-GCM tag.
    """
    return canonical_json(
        {
            "type": SECRETS_AAD_TYPE,
            "version": OPENING_VERSION,
            "pdk_id": pdk_id,
            "pdk_sha256": pdk_sha256,
            "host_id": host_id,
            "certificate_id": certificate_id,
        }
    )


@dataclass(frozen=True)
class OpeningResult:
    """A granted opening: the answer for the host and the verified facts the audit records.

    Holds no secret in clear: the secrets exist only inside ``token``'s JWE,
    encrypted to the host key.
    """

    token: str = field(repr=False)
    pdk_id: str
    pdk_name: str
    owner: str
    host_id: str
    certificate_id: str
    attestation_signer: str
    kps_guardian: str
    key_generation: int

    def to_response(self) -> dict[str, Any]:
        """The JSON body of ``POST /keyprotection/v1/shielding-data/open``."""
        return {"opening": self.token, "pdk_id": self.pdk_id, "kps_guardian": self.kps_guardian}

    def audit_details(self) -> dict[str, Any]:
        """Non-secret facts for the audit record."""
        return {
            "pdk_name": self.pdk_name,
            "owner": self.owner,
            "kps_guardian": self.kps_guardian,
            "key_generation": self.key_generation,
            "certificate_id": self.certificate_id,
            "attestation_signer": self.attestation_signer,
        }


@dataclass(frozen=True)
class _GuardianKeys:
    """The PDK's view of our guardian with the private key of that key generation."""

    guardian: Guardian
    signing_key: jose.AsymmetricKey = field(repr=False)
    encryption_key: jose.AsymmetricKey = field(repr=False)


def open_shielding_data(
    health_certificate: str,
    pdk: bytes,
    *,
    kps_keys: Sequence[GuardianKeyPair],
    trusted_signers: Mapping[str, jose.AsymmetricKey],
    now: float,
    deny_before: float | None = None,
    revoked_hosts: Container[str] = frozenset(),
) -> OpeningResult:
    """Decide an opening and, if granted, seal the PDK's secrets to the host.

    Args:
        health_certificate: the host's health certificate (a compact JWT, untrusted).
        pdk: the shielding data file bytes the host presents (untrusted).
        kps_keys: this HGS's KPS guardians, primary first; as
            :class:`~guardfab.formats.key_protector.KpsKeys`, with every key
            generation still held (a PDK names the generation it was made for).
        trusted_signers: attestation signer id -> public key.
        now: the current time (Unix seconds).
        deny_before: refuse certificates issued before this time.
        revoked_hosts: host ids the administrator revoked.

    Raises:
        KeyReleaseError: a subclass naming the failed check, annotated with the
            host and the PDK once they are verified.
        UsageError: ``kps_keys`` is empty.
    """
    if not kps_keys:
        raise UsageError("this HGS has no KPS key", hint="add one with 'guardfab hgs kps key add'")
    host_id: str | None = None
    data: ShieldingData | None = None
    try:
        cert = check_certificate(
            health_certificate,
            trusted_signers,
            now=now,
            deny_before=deny_before,
            revoked_hosts=revoked_hosts,
        )
        host_id = cert.host_id
        data = _load(pdk)
        keys = _our_guardian(data, kps_keys)
        secrets = _reveal(data, keys)
        return _grant(cert, data, pdk, keys, secrets)
    except KeyReleaseError as exc:
        exc.annotate(host_id=host_id, pdk_id=None if data is None else data.header.pdk_id)
        raise


def _load(pdk: bytes) -> ShieldingData:
    try:
        return load_shielding_data(pdk)
    except InvalidInputError as exc:
        raise ShieldingDataRejectedError(f"shielding data refused: {exc}") from exc


def _held_keys(keys: GuardianKeyPair) -> Mapping[str, jose.AsymmetricKey]:
    """Every private encryption key held for a guardian, by key id."""
    if isinstance(keys, KpsKeys):
        return keys.encryption_keys
    return {keys.guardian.encryption_kid: keys.encryption_key}


def _our_guardian(data: ShieldingData, kps_keys: Sequence[GuardianKeyPair]) -> _GuardianKeys:
    """Our first KPS guardian (primary first) the PDK names, with that generation's key.

    The PDK embeds the guardian document it was sealed to, self-signed by our
    signing key (so it is genuinely ours) at some key generation; the private key
    of that generation opens it, whichever generation is current now.
    """
    header = data.header
    for keys in kps_keys:
        named = next((g for g in header.guardians if g.id == keys.guardian.id), None)
        if named is None:
            continue
        private = _held_keys(keys).get(named.guardian.encryption_kid)
        if private is None:
            raise ForeignShieldingDataError(
                f"shielding data {header.pdk_id} is sealed to key generation"
                f" {named.guardian.key_generation} of KPS guardian {keys.guardian.id},"
                " which this HGS does not hold",
                hint="copy the KPS key files under keys/kps/ from another node, or restore a"
                " backup",
            )
        return _GuardianKeys(named.guardian, keys.signing_key, private)
    raise ForeignShieldingDataError(
        f"shielding data {header.pdk_id} names none of this HGS's KPS guardians:"
        " it is for another fabric"
    )


def _reveal(data: ShieldingData, keys: _GuardianKeys) -> ShieldingSecrets:
    try:
        return data.reveal(keys)
    except InvalidInputError as exc:
        raise ShieldingDataTamperedError(
            f"shielding data {data.header.pdk_id}: its secrets do not open with this KPS's key"
            f" ({exc})"
        ) from exc


def _grant(
    cert: HealthCertificate,
    data: ShieldingData,
    pdk: bytes,
    keys: _GuardianKeys,
    secrets: ShieldingSecrets,
) -> OpeningResult:
    """Encrypt the secrets to the host's ``cnf`` key and sign the answer as our guardian."""
    host_key = jose.import_public_jwk(cert.host_key, what="health certificate cnf key")
    binding = {
        "pdk_id": data.header.pdk_id,
        "pdk_sha256": hashlib.sha256(pdk).hexdigest(),
        "host_id": cert.host_id,
        "certificate_id": cert.cert_id,
    }
    sealed = jose.encrypt_to_recipients(
        secrets.to_bytes(), [(jose.thumbprint(host_key), host_key)], aad=secrets_aad(**binding)
    )
    payload = {
        "type": OPENING_PAYLOAD_TYPE,
        "version": OPENING_VERSION,
        **binding,
        "kps_guardian": keys.guardian.id,
        "secrets": sealed,
    }
    token = jose.sign_compact(canonical_json(payload), keys.signing_key, typ=OPENING_JWS_TYPE)
    return OpeningResult(
        token=token,
        pdk_id=data.header.pdk_id,
        pdk_name=data.header.name,
        owner=data.owner.id,
        host_id=cert.host_id,
        certificate_id=cert.cert_id,
        attestation_signer=cert.signer,
        kps_guardian=keys.guardian.id,
        key_generation=keys.guardian.key_generation,
    )
