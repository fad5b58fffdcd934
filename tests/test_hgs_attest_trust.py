"""The attestation path judges evidence under cached trust, and never commits a stale decision.

``Attestor.attest`` skips the per-request store read of ``trust/version`` by
using the Registry's cached TrustState, and makes its commit conditional on that
version. These tests attack the gap: trust changed by another HGS process (so
this process's cache is stale) must still be enforced on the very next
attestation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey

from guardfab.attestation.trust import AttestationMode, HostKey
from guardfab.formats import jose
from guardfab.hgs import registry as reg
from guardfab.hgs.attest import TRUST_RETRIES, AttestOutcome
from guardfab.hgs.nonce import NonceError
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.host.attestation import host_key_evidence
from guardfab.store.base import Entry
from guardfab.store.errors import StoreError
from guardfab.store.sqlite import SqliteStore


class CountingStore(SqliteStore):
    """A SqliteStore that counts reads of each key."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: dict[str, int] = {}

    def get(self, key: str) -> Entry | None:
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key)


class Fabric:
    """One HGS directory, the service of one worker process, and a second process's store."""

    def __init__(self, directory: Path) -> None:
        init_state(directory, HgsConfig(service_name="test-hgs"))
        self.state = HgsState(directory)
        self.store = CountingStore(self.state.store_path())
        self.service = HgsService(self.state, self.store)
        self.other = SqliteStore(self.state.store_path())  # another worker or the admin CLI
        self.signing = ECKey.generate_key("P-256")
        self.host_key = jose.public_jwk(ECKey.generate_key("P-256"))
        key = HostKey(jose.thumbprint(self.signing), "host-a", jose.public_jwk(self.signing))
        self.change([(reg.MODES_KEY, [AttestationMode.HOST_KEY.value]),
                     (reg.HOST_KEYS + key.key_id, key.to_dict())])  # fmt: skip

    def change(self, puts: list[tuple[str, Any]]) -> None:
        """Change trusted state from the other process (this one's cache is not told)."""
        reg.Registry.trust_txn(puts).commit(self.other)

    def attest(self) -> AttestOutcome:
        nonce = self.service.challenge()
        evidence = host_key_evidence(self.signing, nonce=nonce.value, host_key=self.host_key)
        return self.service.attest(nonce.token, evidence.to_dict())

    def close(self) -> None:
        self.store.close()
        self.other.close()


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    made = Fabric(tmp_path / "hgs")
    try:
        yield made
    finally:
        made.close()


def test_attestations_reuse_the_cached_trust_without_reading_its_version(fabric: Fabric) -> None:
    assert fabric.attest().result.passed
    reads = fabric.store.reads.get(reg.VERSION_KEY, 0)
    for _ in range(3):
        assert fabric.attest().result.passed
    assert fabric.store.reads.get(reg.VERSION_KEY, 0) == reads


def test_a_revocation_by_another_process_is_enforced_on_the_next_attestation(
    fabric: Fabric,
) -> None:
    assert fabric.attest().result.passed  # the cache now holds trust without the revocation
    fabric.change([(reg.REVOKED + "host-a", {"host_id": "host-a", "revoked_at": int(time.time())})])
    outcome = fabric.attest()
    assert not outcome.result.passed
    assert outcome.health_certificate is None
    assert fabric.attest().health_certificate is None  # and from now on, from the new cache


def test_a_mode_switched_off_is_enforced_on_the_next_attestation(fabric: Fabric) -> None:
    assert fabric.attest().result.passed
    fabric.change([(reg.MODES_KEY, [AttestationMode.TPM.value])])  # host-key mode switched off
    assert fabric.attest().health_certificate is None


def test_a_replayed_nonce_is_still_a_replay(fabric: Fabric) -> None:
    nonce = fabric.service.challenge()
    body = host_key_evidence(fabric.signing, nonce=nonce.value, host_key=fabric.host_key)
    assert fabric.service.attest(nonce.token, body.to_dict()).result.passed
    fabric.change([(reg.SETTINGS_KEY, {"admit_certified_eks": False})])  # trust moved too
    with pytest.raises(NonceError):
        fabric.service.attest(nonce.token, body.to_dict())


def test_trust_changing_on_every_attempt_gives_up_with_a_store_error(
    fabric: Fabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fabric.attest().result.passed
    registry = fabric.service.registry
    reload = registry.current_trust

    def moving() -> tuple[int, Any]:
        fabric.change([(reg.SETTINGS_KEY, {"admit_certified_eks": False})])
        return reload()[0] - 1, reload()[1]  # always one change behind

    monkeypatch.setattr(registry, "current_trust", moving)
    fabric.change([(reg.SETTINGS_KEY, {"admit_certified_eks": False})])
    with pytest.raises(StoreError, match=f"{TRUST_RETRIES} times"):
        fabric.attest()
