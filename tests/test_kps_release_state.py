"""A release decided under cached configuration and trust is never recorded once they moved.

The KPS decides a release under the configuration (signers, deny-before, keys) and
trust (revoked hosts) it last loaded, without reading their versions first; its
commit compares both. Each change here is made through a second store handle, as
another HGS worker or an administrator's CLI would, after the KPS has cached the
state it changes: a grant it would have made under the old state must be refused,
and a refusal it would have made must be granted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey

from guardfab.formats import jose
from guardfab.formats.encoding import b64url_encode
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.formats.health_certificate import HealthCertificate, issue_health_certificate
from guardfab.formats.key_protector import create_key_protector
from guardfab.hgs import registry as reg
from guardfab.hgs.kps import OWN_DISTRUSTED_KEY, KpsService, _config_txn
from guardfab.hgs.kps_config import GENERATIONS, VERSION_KEY
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.keyprotection import (
    HostRevokedError,
    ReleaseResult,
    RollbackError,
    UntrustedCertificateSignerError,
)
from guardfab.store import verify
from guardfab.store.audit import AuditLog
from guardfab.store.sqlite import SqliteStore
from guardfab.tenant.guardians import new_guardian_keys


@dataclass
class Fabric:
    directory: Path
    kps: KpsService
    store: SqliteStore
    certificate: str

    def kp(self) -> str:
        owner = new_guardian_keys("owner", KeyAlgorithm.EC_P256)
        data, _ = create_key_protector(owner, [self.kps.primary_document()])
        return b64url_encode(data)

    def elsewhere(self) -> SqliteStore:
        """A second handle on the same store: another worker, or the admin CLI."""
        return SqliteStore(HgsState(self.directory).store_path())

    def outcomes(self) -> list[str]:
        return [r.outcome for r in AuditLog(self.store).iter_records() if r.kind == "key-release"]

    def counters(self) -> int:
        return len(self.store.list(GENERATIONS))


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    directory = tmp_path / "hgs"
    init_state(directory, HgsConfig(service_name="kps-state"))
    state = HgsState(directory)
    store = SqliteStore(state.store_path())
    issued = int(time.time()) - 60
    claims = HealthCertificate(
        issuer="kps-state",
        host_id="host-a",
        mode="host-key",
        host_key=jose.public_jwk(ECKey.generate_key("P-256")),
        issued_at=issued,
        expires_at=issued + 3600,
    )
    certificate = issue_health_certificate(claims, state.attestation_signing_key())
    try:
        yield Fabric(directory, KpsService(HgsService(state, store)), store, certificate)
    finally:
        store.close()


def _certificate(fabric: Fabric, host_id: str) -> str:
    """A genuine certificate for another host, from the HGS's own attestation key."""
    issued = int(time.time()) - 60
    claims = HealthCertificate(
        issuer="kps-state",
        host_id=host_id,
        mode="host-key",
        host_key=jose.public_jwk(ECKey.generate_key("P-256")),
        issued_at=issued,
        expires_at=issued + 3600,
    )
    return issue_health_certificate(claims, HgsState(fabric.directory).attestation_signing_key())


def _commit_elsewhere(fabric: Fabric, txn: reg.Txn) -> None:
    other = fabric.elsewhere()
    try:
        txn.commit(other)
    finally:
        other.close()


def test_a_host_revoked_after_the_trust_was_cached_gets_nothing(fabric: Fabric) -> None:
    fabric.kps.release(fabric.certificate, fabric.kp())  # caches configuration and trust
    kp = fabric.kp()
    record = {"host_id": "host-a", "revoked_at": int(time.time())}
    _commit_elsewhere(fabric, reg.Registry.trust_txn([(reg.REVOKED + "host-a", record)]))
    with pytest.raises(HostRevokedError):
        fabric.kps.release(fabric.certificate, kp)
    assert fabric.outcomes() == ["granted", "refused"]
    assert fabric.counters() == 1  # the refused release wrote no counter


def test_a_signer_removed_after_the_configuration_was_cached_is_no_longer_trusted(
    fabric: Fabric,
) -> None:
    fabric.kps.release(fabric.certificate, fabric.kp())
    own, kp = fabric.kps.signers()[0]["kid"], fabric.kp()  # (reading the document loads config)
    _commit_elsewhere(fabric, _config_txn([(OWN_DISTRUSTED_KEY, {"kid": own})]))
    with pytest.raises(UntrustedCertificateSignerError):
        fabric.kps.release(fabric.certificate, kp)
    assert fabric.outcomes() == ["granted", "refused"]
    assert fabric.counters() == 1


def test_a_refusal_made_under_cached_state_is_decided_again_when_it_moved(
    fabric: Fabric,
) -> None:
    record = {"host_id": "host-a", "revoked_at": int(time.time())}
    _commit_elsewhere(fabric, reg.Registry.trust_txn([(reg.REVOKED + "host-a", record)]))
    with pytest.raises(HostRevokedError):
        fabric.kps.release(fabric.certificate, fabric.kp())  # caches the revocation
    _commit_elsewhere(fabric, reg.Registry.trust_txn(deletes=[reg.REVOKED + "host-a"]))
    result = fabric.kps.release(fabric.certificate, fabric.kp())
    assert result.egress_generation == 1
    assert fabric.outcomes() == ["refused", "granted"]


def test_a_release_under_unchanged_state_reads_neither_version(
    fabric: Fabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the compare at commit buys: no read of either version per release."""
    fabric.kps.release(fabric.certificate, fabric.kp())
    kp = fabric.kp()  # the tenant downloads the KPS document first (a read of its own)
    read: list[str] = []
    get = fabric.store.get

    def counting_get(key: str) -> object:
        read.append(key)
        return get(key)

    monkeypatch.setattr(fabric.store, "get", counting_get)
    fabric.kps.release(fabric.certificate, kp)
    assert VERSION_KEY not in read
    assert reg.VERSION_KEY not in read
    assert any(key.startswith(GENERATIONS) for key in read)  # the rollback check still reads


# --- releases of one event-loop turn share one commit (hgs.audit_batch) ------------------


def _release_together(fabric: Fabric, kps: list[str], certificate: str | None = None) -> list[Any]:
    """Release every KP concurrently on one loop: all reach their commit in one turn."""
    cert = certificate or fabric.certificate

    async def run() -> list[Any]:
        calls = [fabric.kps.release_batched(cert, kp, fabric.kps.batcher) for kp in kps]
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(run())


def test_one_turn_of_releases_is_one_commit(fabric: Fabric) -> None:
    kps = [fabric.kp() for _ in range(4)]
    before = fabric.store.current_revision()
    results = _release_together(fabric, kps)
    assert all(isinstance(r, ReleaseResult) for r in results), results
    assert fabric.store.current_revision() == before + 1  # one transaction for all four
    assert fabric.outcomes() == ["granted"] * 4
    assert fabric.counters() == 4
    assert verify(fabric.store).records == 4


def test_a_replay_in_the_same_turn_is_refused_and_the_others_pass(fabric: Fabric) -> None:
    kps = [fabric.kp() for _ in range(3)]
    results = _release_together(fabric, [*kps, kps[1]])
    assert all(isinstance(r, ReleaseResult) for r in results[:3]), results
    assert isinstance(results[3], RollbackError)
    assert sorted(fabric.outcomes()) == ["granted"] * 3 + ["refused"]
    again = _release_together(fabric, [kps[2]])
    assert isinstance(again[0], RollbackError)  # and not in a later turn either
    assert fabric.counters() == 3


def test_a_revocation_by_another_process_reaches_the_whole_batch(fabric: Fabric) -> None:
    assert all(isinstance(r, ReleaseResult) for r in _release_together(fabric, [fabric.kp()]))
    other_host = _certificate(fabric, "host-b")
    kps = [fabric.kp() for _ in range(3)]
    record = {"host_id": "host-a", "revoked_at": int(time.time())}
    _commit_elsewhere(fabric, reg.Registry.trust_txn([(reg.REVOKED + "host-a", record)]))

    async def run() -> list[Any]:
        batcher = fabric.kps.batcher
        calls = [
            fabric.kps.release_batched(fabric.certificate, kps[0], batcher),
            fabric.kps.release_batched(other_host, kps[1], batcher),
            fabric.kps.release_batched(fabric.certificate, kps[2], batcher),
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[0], HostRevokedError)
    assert isinstance(results[1], ReleaseResult)
    assert isinstance(results[2], HostRevokedError)
    assert fabric.counters() == 2
