"""HGS administration: what the HGS trusts -- TPM hosts, CAs, host keys, groups, CI policies.

Every function follows :mod:`guardfab.hgs.admin`'s pattern: validate fully
against a snapshot, then one transaction with the audit record. Inputs that
carry keys or certificates are public material; nothing here handles a secret.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from guardfab.attestation.admin_group_mode import DEPRECATION_WARNING
from guardfab.attestation.trust import CiPolicy, HostKey, TpmHost, ek_digest
from guardfab.formats import jose, keyfiles
from guardfab.formats.encoding import b64url_decode
from guardfab.hgs import registry as reg
from guardfab.hgs.admin import (
    Admin,
    AlreadyExistsError,
    Change,
    InvalidRequestError,
    NotFoundError,
    check_name,
    valid,
)
from guardfab.store.base import ABSENT

#: Largest certificate or public key accepted (PEM text).
MAX_PEM_CHARS = 64 * 1024


# --------------------------------------------------------------------- TPM hosts


def _pem_or_b64url(text: str, what: str) -> tuple[bool, bytes]:
    if not isinstance(text, str) or len(text) > MAX_PEM_CHARS:
        raise InvalidRequestError(f"{what}: at most {MAX_PEM_CHARS} characters")
    if text.lstrip().startswith("-----BEGIN"):
        return True, text.encode("ascii", "replace")
    return False, b64url_decode(text, what=what)


def _spki_digest(pem: bytes) -> bytes:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError("EK public key: not a valid PEM public key") from exc
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        pass
    elif not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidRequestError("EK public key: RSA (2048 bits or more) or EC only")
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def ek_digest_of(ek_public: str | None, ek_certificate: str | None) -> bytes:
    """The EK digest from a TPM2B_PUBLIC (base64url) or PEM key and/or an EK certificate.

    Raises:
        InvalidRequestError, FormatError: neither given, one malformed, or they disagree.
    """
    digests = []
    if ek_public is not None:
        is_pem, data = _pem_or_b64url(ek_public, "EK public (TPM2B_PUBLIC)")
        digests.append(_spki_digest(data) if is_pem else ek_digest(data))
    if ek_certificate is not None:
        digests.append(ek_digest(load_certificate(ek_certificate, "EK certificate")))
    if not digests:
        raise InvalidRequestError("give the EK public key, the EK certificate, or both")
    if len(set(digests)) != 1:
        raise InvalidRequestError("the EK certificate is not for this EK public key")
    return digests[0]


def add_tpm_host(
    admin: Admin, name: str, *, ek_public: str | None = None, ek_certificate: str | None = None
) -> dict[str, Any]:
    """Register a TPM host by its EK (Add-HgsAttestationTpmHost)."""
    check_name(name, "host name")
    host = valid(lambda: TpmHost(name, ek_digest_of(ek_public, ek_certificate)), "TPM host")
    snap = admin.snapshot()
    if any(h.host_id == name for h in snap.trust.tpm_hosts):
        raise AlreadyExistsError(f"a TPM host named {name!r} is already registered")
    other = snap.trust.tpm_host(host.ek_digest)
    if other is not None:
        raise AlreadyExistsError(f"this EK is already registered as host {other.host_id!r}")
    key = reg.TPM_HOSTS + name
    record = host.to_dict()
    admin.commit(
        snap,
        Change("add-tpm-host", f"host:{name}", record, [(key, record)], expect=[(key, ABSENT)]),
    )
    return record


def remove_tpm_host(admin: Admin, name: str) -> dict[str, Any]:
    """Remove a TPM host and its AK bindings (Remove-HgsAttestationTpmHost)."""
    check_name(name, "host name")
    snap = admin.snapshot()
    record, revision = admin.load(reg.TPM_HOSTS + name, f"TPM host {name!r}")
    bindings = [b for b in snap.trust.ak_bindings if b.host_id == name]
    deletes = [reg.TPM_HOSTS + name] + [reg.AK_BINDINGS + b.ak_name.hex() for b in bindings]
    details = {**record, "ak_bindings_removed": len(bindings)}
    admin.commit(
        snap,
        Change(
            "remove-tpm-host",
            f"host:{name}",
            details,
            deletes=deletes,
            expect=[(reg.TPM_HOSTS + name, revision)],
        ),
    )
    return details


def list_tpm_hosts(admin: Admin) -> list[dict[str, Any]]:
    """Registered TPM hosts (Get-HgsAttestationTpmHost)."""
    return [h.to_dict() for h in admin.registry.trust().tpm_hosts]


# --------------------------------------------------------------------- CA certificates


class CaKind(enum.StrEnum):
    """Which CA list a certificate goes to."""

    EK_ROOT = "ek-root"
    EK_INTERMEDIATE = "ek-intermediate"
    GROUP_ROOT = "group-root"


EK_CAS = (CaKind.EK_ROOT, CaKind.EK_INTERMEDIATE)
GROUP_CAS = (CaKind.GROUP_ROOT,)
_CA_PREFIX = {
    CaKind.EK_ROOT: reg.EK_ROOTS,
    CaKind.EK_INTERMEDIATE: reg.EK_INTERMEDIATES,
    CaKind.GROUP_ROOT: reg.GROUP_ROOTS,
}


def load_certificate(text: str, what: str) -> x509.Certificate:
    """A certificate from PEM text or base64url DER."""
    is_pem, data = _pem_or_b64url(text, what)
    try:
        if is_pem:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise InvalidRequestError(f"{what}: not an X.509 certificate") from exc


def _ca_summary(kind: CaKind, cert: x509.Certificate) -> dict[str, Any]:
    return {
        "id": reg.certificate_key(cert),
        "kind": kind.value,
        "subject": cert.subject.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _require_ca(cert: x509.Certificate) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError as exc:
        raise InvalidRequestError("CA certificate: malformed extensions") from exc
    if constraints is None or not constraints.ca:
        raise InvalidRequestError("the certificate is not a CA (basicConstraints cA is not set)")


def add_ca(admin: Admin, kind: CaKind, text: str) -> dict[str, Any]:
    """Trust a TPM vendor CA (the reference's TrustedTpm_RootCA / _IntermediateCA stores)
    or, for admin-group mode, a host CA.
    """
    cert = load_certificate(text, "CA certificate")
    _require_ca(cert)
    summary = _ca_summary(kind, cert)
    now = admin.now()
    warnings = (
        []
        if cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
        else ["the certificate is not valid now: chains through it fail until it is"]
    )
    if kind is CaKind.GROUP_ROOT:
        warnings.append(DEPRECATION_WARNING)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    key = _CA_PREFIX[kind] + summary["id"]
    snap = admin.snapshot()
    family = EK_CAS if kind in EK_CAS else GROUP_CAS
    for registered in family:
        if admin.store.get(_CA_PREFIX[registered] + summary["id"]) is not None:
            raise AlreadyExistsError(f"this CA is already registered as {registered.value}")
    admin.commit(
        snap,
        Change(
            "add-ca", f"ca:{summary['id']}", summary, [(key, {"pem": pem})], expect=[(key, ABSENT)]
        ),
    )
    return {**summary, "warnings": warnings}


def remove_ca(admin: Admin, cert_id: str, kinds: Iterable[CaKind]) -> dict[str, Any]:
    """Stop trusting a CA certificate of one of ``kinds`` (by its id: SHA-256 of its DER)."""
    if not re.fullmatch(r"[0-9a-f]{64}", cert_id):
        raise InvalidRequestError("CA id: the SHA-256 (64 lower-case hex) of the certificate")
    snap = admin.snapshot()
    for kind in kinds:
        key = _CA_PREFIX[kind] + cert_id
        entry = admin.store.get(key)
        if entry is None:
            continue
        record = reg.decode(entry.value, what=key)
        summary = _ca_summary(kind, x509.load_pem_x509_certificate(record["pem"].encode()))
        change = Change("remove-ca", f"ca:{cert_id}", summary, [], [key], [(key, entry.revision)])
        admin.commit(snap, change)
        return summary
    raise NotFoundError(f"no such CA certificate is registered ({cert_id})")


def list_cas(admin: Admin, kinds: Iterable[CaKind]) -> list[dict[str, Any]]:
    """The trusted CA certificates of ``kinds``."""
    out = []
    for kind in kinds:
        for record in admin.registry.records(_CA_PREFIX[kind], dict):
            out.append(_ca_summary(kind, x509.load_pem_x509_certificate(record["pem"].encode())))
    return out


# --------------------------------------------------------------------- host keys


def add_host_key(admin: Admin, name: str, public_key: str) -> dict[str, Any]:
    """Register a host's signing key for host-key mode (Add-HgsAttestationHostKey).

    ``public_key`` is a PEM SubjectPublicKeyInfo or a JWK (JSON text); its id is
    the RFC 7638 thumbprint, which the host names in its evidence.
    """
    check_name(name, "host name")
    if not isinstance(public_key, str) or len(public_key) > MAX_PEM_CHARS:
        raise InvalidRequestError(f"host key: at most {MAX_PEM_CHARS} characters")
    key = keyfiles.load_public_key(public_key.encode("utf-8"), what="host key")
    key_id = jose.thumbprint(key)
    host_key = valid(lambda: HostKey(key_id, name, jose.public_jwk(key)), "host key")
    snap = admin.snapshot()
    existing = snap.trust.host_key(key_id)
    if existing is not None:
        raise AlreadyExistsError(f"this key is already registered for host {existing.host_id!r}")
    store_key = reg.HOST_KEYS + key_id
    details = {"key_id": key_id, "host_id": name, "alg": jose.signing_alg_for(key)}
    admin.commit(
        snap,
        Change(
            "add-host-key",
            f"host:{name}",
            details,
            [(store_key, host_key.to_dict())],
            expect=[(store_key, ABSENT)],
        ),
    )
    return host_key.to_dict()


def _key_id(key_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}", key_id):
        raise InvalidRequestError("host key id: an RFC 7638 SHA-256 thumbprint (43 base64url)")
    return key_id


def revoke_host_key(admin: Admin, key_id: str) -> dict[str, Any]:
    """Refuse one host key from now on, keeping it on record (Remove-HgsAttestationHostKey
    removes it instead; see :func:`remove_host_key`).
    """
    store_key = reg.HOST_KEYS + _key_id(key_id)
    snap = admin.snapshot()
    record, revision = admin.load(store_key, f"host key {key_id}")
    if record.get("revoked"):
        raise AlreadyExistsError(f"host key {key_id} is already revoked")
    record["revoked"] = True
    admin.commit(
        snap,
        Change(
            "revoke-host-key",
            f"host:{record['host_id']}",
            {"key_id": key_id, "host_id": record["host_id"]},
            [(store_key, record)],
            expect=[(store_key, revision)],
        ),
    )
    return dict(record)


def remove_host_key(admin: Admin, key_id: str) -> dict[str, Any]:
    """Forget a host key (Remove-HgsAttestationHostKey)."""
    store_key = reg.HOST_KEYS + _key_id(key_id)
    snap = admin.snapshot()
    record, revision = admin.load(store_key, f"host key {key_id}")
    admin.commit(
        snap,
        Change(
            "remove-host-key",
            f"host:{record['host_id']}",
            {"key_id": key_id, "host_id": record["host_id"]},
            deletes=[store_key],
            expect=[(store_key, revision)],
        ),
    )
    return dict(record)


def list_host_keys(admin: Admin) -> list[dict[str, Any]]:
    """Registered host keys (Get-HgsAttestationHostKey)."""
    return [k.to_dict() for k in admin.registry.trust().host_keys]


# --------------------------------------------------------------------- host groups


def add_host_group(admin: Admin, name: str) -> dict[str, Any]:
    """Trust hosts whose certificate names this group (Add-HgsAttestationHostGroup).

    Admin-group mode is deprecated, as in the reference: it proves membership, not health.
    """
    check_name(name, "group name")
    key = reg.HOST_GROUPS + name
    snap = admin.snapshot()
    if name in snap.trust.host_groups:
        raise AlreadyExistsError(f"host group {name!r} is already registered")
    record = {"name": name}
    admin.commit(
        snap,
        Change("add-host-group", f"group:{name}", record, [(key, record)], [], [(key, ABSENT)]),
    )
    return {**record, "warnings": [DEPRECATION_WARNING]}


def remove_host_group(admin: Admin, name: str) -> dict[str, Any]:
    """Stop trusting a host group (Remove-HgsAttestationHostGroup)."""
    check_name(name, "group name")
    key = reg.HOST_GROUPS + name
    snap = admin.snapshot()
    record, revision = admin.load(key, f"host group {name!r}")
    admin.commit(
        snap, Change("remove-host-group", f"group:{name}", record, [], [key], [(key, revision)])
    )
    return dict(record)


def list_host_groups(admin: Admin) -> list[str]:
    """Registered host groups (Get-HgsAttestationHostGroup)."""
    return sorted(admin.registry.trust().host_groups)


# --------------------------------------------------------------------- CI policies


def ci_policy_digest(digest_hex: str | None, content_b64: str | None) -> bytes:
    """The SHA-256 of a CI policy: given as hex, or computed from the file (base64url).

    Raises:
        InvalidRequestError: neither or both given, or the hex is not a SHA-256.
    """
    if (digest_hex is None) == (content_b64 is None):
        raise InvalidRequestError("give the CI policy file's SHA-256 or its content, not both")
    if content_b64 is not None:
        return hashlib.sha256(b64url_decode(content_b64, what="CI policy content")).digest()
    assert digest_hex is not None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", digest_hex):
        raise InvalidRequestError("CI policy digest: 64 hex digits (SHA-256 of the policy file)")
    return bytes.fromhex(digest_hex)


def add_ci_policy(admin: Admin, name: str, digest: bytes) -> dict[str, Any]:
    """Register a code integrity policy by name and file digest (Add-HgsAttestationCIPolicy)."""
    check_name(name, "CI policy name")
    policy = valid(lambda: CiPolicy(name, digest), "CI policy")
    snap = admin.snapshot()
    if any(p.name == name for p in snap.trust.ci_policies):
        raise AlreadyExistsError(f"a CI policy named {name!r} is already registered")
    other = snap.trust.ci_policy(digest)
    if other is not None:
        raise AlreadyExistsError(f"this policy file is already registered as {other.name!r}")
    key = reg.CI_POLICIES + digest.hex()
    record = policy.to_dict()
    admin.commit(
        snap,
        Change("add-ci-policy", f"ci-policy:{name}", record, [(key, record)], [], [(key, ABSENT)]),
    )
    return record


def remove_ci_policy(admin: Admin, name: str) -> dict[str, Any]:
    """Remove a CI policy by name (Remove-HgsAttestationCIPolicy)."""
    check_name(name, "CI policy name")
    snap = admin.snapshot()
    found = [p for p in snap.trust.ci_policies if p.name == name]
    if not found:
        raise NotFoundError(f"no CI policy is named {name!r}")
    key = reg.CI_POLICIES + found[0].digest.hex()
    record = found[0].to_dict()
    admin.commit(snap, Change("remove-ci-policy", f"ci-policy:{name}", record, [], [key]))
    return record


def list_ci_policies(admin: Admin) -> list[dict[str, Any]]:
    """Registered CI policies."""
    return [p.to_dict() for p in admin.registry.trust().ci_policies]
