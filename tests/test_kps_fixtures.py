"""Helpers for the KPS tests against a real HGS: hosts that attest, tenants, store snapshots.

Hosts attest for real (host-key mode, which needs no TPM, is the cheapest way to
a genuine health certificate); registration goes straight to the HGS store, as
in test_hgs_attestation_e2e.py. Nothing here is a test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from joserfc.jwk import ECKey

from guardfab.attestation.trust import AttestationMode, HostKey
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_encode
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.formats.health_certificate import HealthCertificate, issue_health_certificate
from guardfab.formats.key_protector import create_key_protector
from guardfab.hgs import registry as reg
from guardfab.hgs.state import HgsState
from guardfab.host.attestation import HgsAttestationClient, attest_with_host_key
from guardfab.store.audit import AuditLog
from guardfab.store.audit_chain import AuditRecord
from guardfab.store.sqlite import SqliteStore
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys
from hgs_harness import RunningHgs

RELEASE = "/keyprotection/v1/release"
OPEN_SHIELDING_DATA = "/keyprotection/v1/shielding-data/open"
#: The store keys a request may change and still count as "nothing else changed".
AUDIT_PREFIX = "audit/"


def open_store(hgs: RunningHgs) -> SqliteStore:
    return SqliteStore(HgsState(hgs.directory).store_path())


def register(hgs: RunningHgs, puts: list[tuple[str, object]]) -> None:
    """Write trusted state into the HGS's store, as the admin API would."""
    store = open_store(hgs)
    try:
        reg.Registry.trust_txn(puts).commit(store)
    finally:
        store.close()


def enable_modes(hgs: RunningHgs, *modes: AttestationMode) -> None:
    register(hgs, [(reg.MODES_KEY, [m.value for m in modes])])


@dataclass
class Host:
    """A guarded host in host-key mode: its registered signing key and its encryption key."""

    host_id: str
    signing: ECKey = field(default_factory=lambda: ECKey.generate_key("P-256"))
    encryption: ECKey = field(default_factory=lambda: ECKey.generate_key("P-384"))

    def public_key(self) -> dict[str, Any]:
        """The host encryption key the HGS binds into the certificate (cnf)."""
        return jose.public_jwk(self.encryption)

    def register(self, hgs: RunningHgs) -> None:
        key = HostKey(jose.thumbprint(self.signing), self.host_id, jose.public_jwk(self.signing))
        register(hgs, [(reg.HOST_KEYS + key.key_id, key.to_dict())])

    def attest(self, hgs: RunningHgs) -> str:
        """Attest for real; return the health certificate."""
        client = HgsAttestationClient(hgs.url, Path(hgs.ca))
        try:
            answer = attest_with_host_key(
                client, self.signing, host_key=jose.public_jwk(self.encryption)
            )
        finally:
            client.close()
        return answer.health_certificate


def attested_host(hgs: RunningHgs, host_id: str = "host-a") -> tuple[Host, str]:
    """A registered host-key host and the health certificate it just obtained."""
    host = Host(host_id)
    host.register(hgs)
    return host, host.attest(hgs)


def minted_certificate(
    hgs: RunningHgs, host: Host, *, issued: float | None = None, lifetime: int = 8 * 3600
) -> str:
    """A certificate signed with the HGS's real attestation key (to isolate time checks)."""
    issued_at = int(time.time() - 60 if issued is None else issued)
    cert = HealthCertificate(
        issuer="test-hgs",
        host_id=host.host_id,
        mode="host-key",
        host_key=jose.public_jwk(host.encryption),
        issued_at=issued_at,
        expires_at=issued_at + lifetime,
    )
    return issue_health_certificate(cert, HgsState(hgs.directory).attestation_signing_key())


def kps_document(hgs: RunningHgs) -> bytes:
    """The HGS's primary KPS guardian document, as a tenant downloads it."""
    with hgs.client() as client:
        response = client.get("/keyprotection/v1/metadata/guardian.jws")
    response.raise_for_status()
    return response.content


@dataclass
class Tenant:
    """A VM owner with its guardian, making KPs for fabrics."""

    owner: GuardianKeys = field(
        default_factory=lambda: new_guardian_keys("owner", KeyAlgorithm.EC_P256)
    )

    def kp(self, *documents: bytes) -> bytes:
        data, _ = create_key_protector(self.owner, list(documents))
        return data


def post_release(hgs: RunningHgs, cert: str, kp: bytes) -> httpx.Response:
    with hgs.client() as client:
        return client.post(
            RELEASE, json={"health_certificate": cert, "key_protector": b64url_encode(kp)}
        )


def post_open(hgs: RunningHgs, cert: str, pdk: bytes) -> httpx.Response:
    """Ask the KPS to open a shielding data file (PDK) for the certificate's host."""
    with hgs.client() as client:
        return client.post(
            OPEN_SHIELDING_DATA,
            json={"health_certificate": cert, "shielding_data": b64url_encode(pdk)},
        )


def snapshot(hgs: RunningHgs) -> dict[str, tuple[bytes, int]]:
    """Every store entry but the audit log, with its revision."""
    store = open_store(hgs)
    try:
        return {
            e.key: (e.value, e.revision)
            for e in store.list("")
            if not e.key.startswith(AUDIT_PREFIX)
        }
    finally:
        store.close()


def audit_records(hgs: RunningHgs) -> list[AuditRecord]:
    store = open_store(hgs)
    try:
        return list(AuditLog(store).iter_records())
    finally:
        store.close()


def releases(hgs: RunningHgs) -> list[AuditRecord]:
    return [r for r in audit_records(hgs) if r.kind == "key-release"]


def openings(hgs: RunningHgs) -> list[AuditRecord]:
    return [r for r in audit_records(hgs) if r.kind == "shielding-data-open"]


def admin(hgs: RunningHgs, method: str, path: str, **kwargs: Any) -> Any:
    with hgs.client("admin") as client:
        response = client.request(method, path, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()
