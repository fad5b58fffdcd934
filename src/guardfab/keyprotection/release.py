"""The key release decision: health certificate + ingress KP in, wrapped keys + egress KP out.

This is power-on steps 5 to 7 of the reference (a guarded host presents its
health certificate and the VM's key protector; the KPS checks the certificate,
decrypts its own wrapping and returns the keys encrypted to the host). Pure: the
caller passes the time, the trusted signers, the revoked hosts and the highest
generation already seen per KP; nothing here reads a store, a file or a clock.

Checks, in order, each with its own error (:mod:`guardfab.keyprotection.errors`):

1. the health certificate: a trusted attestation signer (the algorithm comes
   from the trusted key, never the token, so ``alg: none`` and HMAC-with-the-
   public-key tokens fail here), within its validity, issued no earlier than the
   deny-before date, for a host that is not revoked;
2. the KP loads and verifies (outer signature, the owner's guardian-set statement);
3. it names one of this HGS's KPS guardians (else it is for another fabric);
4. its generation is not older than the newest this KPS already issued for that
   ``kp_id`` -- the egress of a release is generation + 1, so presenting the same
   ingress twice is refused as a replay, and an older KP after a re-key as a rollback;
5. this KPS's wrapping unwraps (else the wrapping was tampered with);

then the KP is re-keyed (:func:`guardfab.formats.key_protector.rekey`: same
guardians, generation + 1, a fresh transport key, signed by the KPS guardian,
wrapped to its current key generation when the KP is version 2 -- so a rotated
KPS moves each KP to its new key on the KP's next release, owner or no owner) and
both keys -- the *current* one, which opens the VM's key vault now, and the
*new* one, which the host re-encrypts the vault under -- are encrypted to the
host encryption key the certificate names in ``cnf`` (JWE, ECDH-ES+A256KW or
RSA-OAEP-256, A256GCM), with AAD binding kp_id, both generations, the host id
and the certificate id. The release is returned as a JWS signed by the same KPS
guardian that signed the egress KP, over the JWE and the SHA-256 of the egress
KP, so the host can prove that the keys came from the KPS and belong with that
egress KP (anyone can encrypt to a public key; only the KPS can sign).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardfab.errors import InvalidInputError, UsageError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_encode, canonical_json
from guardfab.formats.health_certificate import (
    ExpiredCertificateError,
    HealthCertificate,
    UntrustedSignerError,
    verify_health_certificate,
)
from guardfab.formats.key_protector import (
    GuardianKeyPair,
    KeyProtector,
    TransportKey,
    egress_key_generation,
    load_key_protector,
    rekey,
)
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

#: JOSE ``typ`` of the signed release a KPS answers.
RELEASE_JWS_TYPE = "guardfab-key-release+jws"
#: ``type`` member of the release payload.
RELEASE_PAYLOAD_TYPE = "guardfab.key-release"
#: ``type`` member of the AAD of the wrapped keys.
KEYS_AAD_TYPE = "guardfab.key-release-keys"
RELEASE_VERSION = 1
#: What the wrapped plaintext holds, in order: 32 bytes each.
KEY_ORDER = ("current", "new")

#: The highest generation already issued per kp_id: a lookup function or a mapping.
HighestGeneration = Callable[[str], int | None] | Mapping[str, int]


def rollback_counter(kp_id: str, owner: str) -> str:
    """The key the KPS counts a KP's generations under: its kp_id AND its owner.

    A kp_id is only a random label that anyone can copy into a KP of their own
    (signed by their own owner key). Counted by kp_id alone, such a copy with a huge
    generation would make the KPS refuse every real generation as a rollback; counted
    per owner, it only moves its own counter.
    """
    return f"{kp_id}/{owner}"


def keys_aad(
    *, kp_id: str, generation: int, egress_generation: int, host_id: str, certificate_id: str
) -> bytes:
    """The AAD of the wrapped keys: which KP generation, for which host and certificate.

    A wrapping lifted from one release cannot be passed off as another's: the
    AES-GCM tag covers these fields and the host recomputes them.
    """
    return canonical_json(
        {
            "type": KEYS_AAD_TYPE,
            "version": RELEASE_VERSION,
            "kp_id": kp_id,
            "generation": generation,
            "egress_generation": egress_generation,
            "host_id": host_id,
            "certificate_id": certificate_id,
            "keys": list(KEY_ORDER),
        }
    )


@dataclass(frozen=True)
class ReleaseResult:
    """A granted release: what the host gets, and the verified ids the audit records.

    Holds no key in clear: the transport keys exist only inside ``release_token``'s
    JWE, encrypted to the host key.
    """

    release_token: str = field(repr=False)
    egress_kp: bytes = field(repr=False)
    host_id: str
    certificate_id: str
    attestation_signer: str
    kp_id: str
    owner: str
    generation: int
    egress_generation: int
    kps_guardian: str
    primary: bool
    #: The KPS key generation the ingress was wrapped to, and the egress is.
    ingress_key_generation: int = 0
    key_generation: int = 0

    @property
    def counter(self) -> str:
        """Where the KPS counts this KP's generations (:func:`rollback_counter`)."""
        return rollback_counter(self.kp_id, self.owner)

    def to_response(self) -> dict[str, Any]:
        """The JSON body of ``POST /keyprotection/v1/release``."""
        return {
            "release": self.release_token,
            "egress_key_protector": b64url_encode(self.egress_kp),
            "kp_id": self.kp_id,
            "generation": self.generation,
            "egress_generation": self.egress_generation,
            "kps_guardian": self.kps_guardian,
        }

    def audit_details(self) -> dict[str, Any]:
        """Non-secret facts for the audit record."""
        return {
            "generation": self.generation,
            "egress_generation": self.egress_generation,
            "owner": self.owner,
            "kps_guardian": self.kps_guardian,
            "primary_key": self.primary,
            "ingress_key_generation": self.ingress_key_generation,
            "key_generation": self.key_generation,
            "certificate_id": self.certificate_id,
            "attestation_signer": self.attestation_signer,
        }


def release(
    health_certificate: str,
    ingress_kp: bytes,
    *,
    kps_keys: Sequence[GuardianKeyPair],
    trusted_signers: Mapping[str, jose.AsymmetricKey],
    now: float,
    deny_before: float | None = None,
    revoked_hosts: Container[str] = frozenset(),
    highest_generation_seen: HighestGeneration | None = None,
) -> ReleaseResult:
    """Decide a key release and, if granted, re-key the KP and wrap both keys to the host.

    Args:
        health_certificate: the host's health certificate (a compact JWT, untrusted).
        ingress_kp: the KP file bytes the host presents (untrusted).
        kps_keys: this HGS's KPS guardians with their private keys, primary first
            (:class:`~guardfab.formats.key_protector.KpsKeys` carry every key
            generation still held: older ones unwrap, the current one re-keys).
        trusted_signers: attestation signer id -> public key.
        now: the current time (Unix seconds).
        deny_before: refuse certificates issued before this time.
        revoked_hosts: host ids the administrator revoked.
        highest_generation_seen: the newest generation already issued per
            :func:`rollback_counter` (kp_id and owner).

    Raises:
        KeyReleaseError: a subclass naming the failed check, annotated with what
            was verified before it failed.
        UsageError: ``kps_keys`` is empty.
    """
    if not kps_keys:
        raise UsageError("this HGS has no KPS key", hint="add one with 'guardfab hgs kps key add'")
    host_id: str | None = None
    kp: KeyProtector | None = None
    try:
        cert = check_certificate(
            health_certificate,
            trusted_signers,
            now=now,
            deny_before=deny_before,
            revoked_hosts=revoked_hosts,
        )
        host_id = cert.host_id
        kp = _load(ingress_kp)
        keys = _kps_guardian_for(kp, kps_keys)
        _check_generation(kp, highest_generation_seen)
        return _grant(cert, kp, keys, primary=keys.guardian.id == kps_keys[0].guardian.id)
    except KeyReleaseError as exc:
        exc.annotate(
            host_id=host_id,
            kp_id=None if kp is None else kp.kp_id,
            generation=None if kp is None else kp.generation,
        )
        raise


def check_certificate(
    token: str,
    trusted_signers: Mapping[str, jose.AsymmetricKey],
    *,
    now: float,
    deny_before: float | None = None,
    revoked_hosts: Container[str] = frozenset(),
) -> HealthCertificate:
    """Verify a health certificate for a key release (step 1 above).

    Raises:
        UntrustedCertificateSignerError: not signed by a trusted attestation signer.
        CertificateExpiredError: expired or not yet valid.
        CertificateDeniedError: issued before ``deny_before``.
        CertificateRejectedError: malformed, forged, or with bad claims.
        HostRevokedError: genuine, but the host is revoked.
    """
    try:
        cert = verify_health_certificate(token, trusted_signers, now=now)
    except UntrustedSignerError as exc:
        raise UntrustedCertificateSignerError(str(exc)) from exc
    except ExpiredCertificateError as exc:
        raise CertificateExpiredError(str(exc)) from exc
    except InvalidInputError as exc:
        raise CertificateRejectedError(f"health certificate refused: {exc}") from exc
    refusal: KeyReleaseError | None = None
    if deny_before is not None and cert.issued_at < deny_before:
        refusal = CertificateDeniedError(
            f"health certificate {cert.cert_id} of host {cert.host_id} was issued before"
            " the deny-before date set by the HGS administrator"
        )
    elif cert.host_id in revoked_hosts:
        refusal = HostRevokedError(f"host {cert.host_id} is revoked: no keys are released to it")
    if refusal is not None:
        refusal.annotate(host_id=cert.host_id, kp_id=None, generation=None)  # it is genuine
        raise refusal
    return cert


def _load(data: bytes) -> KeyProtector:
    try:
        return load_key_protector(data)
    except InvalidInputError as exc:
        raise KeyProtectorRejectedError(f"key protector refused: {exc}") from exc


def _kps_guardian_for(kp: KeyProtector, kps_keys: Sequence[GuardianKeyPair]) -> GuardianKeyPair:
    """The first of our KPS guardians (primary first) that the KP names."""
    named = set(kp.guardian_ids)
    for keys in kps_keys:
        if keys.guardian.id in named:
            return keys
    raise ForeignKeyProtectorError(
        f"key protector {kp.kp_id} names none of this HGS's KPS guardians:"
        " it is a KP for another fabric"
    )


def _highest(lookup: HighestGeneration | None, kp_id: str) -> int | None:
    if lookup is None:
        return None
    if isinstance(lookup, Mapping):
        return lookup.get(kp_id)
    return lookup(kp_id)


def _check_generation(kp: KeyProtector, lookup: HighestGeneration | None) -> None:
    """Refuse a generation older than the newest this KPS issued for the KP (replay, rollback)."""
    highest = _highest(lookup, rollback_counter(kp.kp_id, kp.owner))
    if highest is not None and kp.generation < highest:
        raise RollbackError(
            f"key protector {kp.kp_id} generation {kp.generation} is older than generation"
            f" {highest}, which this KPS already issued: a replayed or rolled-back KP"
        )


def _grant(
    cert: HealthCertificate, kp: KeyProtector, keys: GuardianKeyPair, *, primary: bool
) -> ReleaseResult:
    """Re-key the KP, wrap both keys to the host, sign the release."""
    try:
        egress, current, new = rekey(kp, keys)
    except InvalidInputError as exc:
        raise KeyProtectorTamperedError(
            f"key protector {kp.kp_id}: this KPS's wrapping does not unwrap ({exc})"
        ) from exc
    egress_generation = kp.generation + 1
    token = _sign_release(cert, kp, keys, egress, (current, new))
    return ReleaseResult(
        release_token=token,
        egress_kp=egress,
        host_id=cert.host_id,
        certificate_id=cert.cert_id,
        attestation_signer=cert.signer,
        kp_id=kp.kp_id,
        owner=kp.owner,
        generation=kp.generation,
        egress_generation=egress_generation,
        kps_guardian=keys.guardian.id,
        primary=primary,
        ingress_key_generation=kp.guardian(keys.guardian.id).key_generation,
        key_generation=egress_key_generation(kp, keys),
    )


def _sign_release(
    cert: HealthCertificate,
    kp: KeyProtector,
    keys: GuardianKeyPair,
    egress: bytes,
    transport_keys: tuple[TransportKey, TransportKey],
) -> str:
    host_kid, host_key = _host_recipient(cert.host_key)
    binding: dict[str, Any] = {
        "kp_id": kp.kp_id,
        "generation": kp.generation,
        "egress_generation": kp.generation + 1,
        "host_id": cert.host_id,
        "certificate_id": cert.cert_id,
    }
    current, new = transport_keys
    wrapped = jose.encrypt_to_recipients(
        current.reveal() + new.reveal(),
        [(host_kid, host_key)],
        aad=keys_aad(**binding),
    )
    payload = {
        "type": RELEASE_PAYLOAD_TYPE,
        "version": RELEASE_VERSION,
        **binding,
        "kps_guardian": keys.guardian.id,
        "egress_kp_sha256": hashlib.sha256(egress).hexdigest(),
        "keys": wrapped,
    }
    return jose.sign_compact(canonical_json(payload), keys.signing_key, typ=RELEASE_JWS_TYPE)


def _host_recipient(jwk: dict[str, Any]) -> tuple[str, jose.AsymmetricKey]:
    """The host key a release is encrypted to, and its id (RFC 7638 thumbprint).

    A host presents the same key in every release until it attests anew: its
    import and thumbprint are kept by the JWK's exact members, like
    :func:`guardfab.formats.jose.import_known_public_jwk` keeps the key alone.
    """
    if all(isinstance(v, str) for v in jwk.values()):
        return _known_host_recipient(tuple(sorted(jwk.items())))
    key = jose.import_public_jwk(jwk, what="health certificate cnf key")  # refuses it: not strings
    return jose.thumbprint(key), key


@functools.lru_cache(maxsize=jose.KNOWN_KEYS_CACHE_SIZE)
def _known_host_recipient(members: tuple[tuple[str, str], ...]) -> tuple[str, jose.AsymmetricKey]:
    """(thumbprint, key) of a host key; only keys that import are kept (errors propagate)."""
    key = jose.import_known_public_jwk(dict(members), what="health certificate cnf key")
    return jose.thumbprint(key), key
