"""A TPM host's verified boot is stored once per boot, and every record resolves to it.

Each attestation writes ``hosts/last/<host>`` naming its boot by digest; the
boot itself goes to ``hosts/boot/<host>`` only when the store does not hold it
already (:mod:`guardfab.hgs.known_boots`). Two HGS services over one SQLite
file stand for ``hgs serve``'s two worker processes: separate connections,
separate caches, one store. The attack is the interleaving of reboots across
them: a worker that skips the boot's put on what it saw earlier must never
leave a record naming a boot the store no longer holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardfab.attestation.summary import HostSummary
from guardfab.hgs import known_boots
from guardfab.hgs import registry as reg
from guardfab.hgs.attest import AttestOutcome
from guardfab.hgs.backup import (
    BackupSecret,
    RestoreOptions,
    export_state,
    import_state,
    new_key_file,
)
from guardfab.hgs.last_record import StoredBoot, read_last_record
from guardfab.hgs.nonce import NonceError
from guardfab.hgs.server import HISTORY_WITHOUT_VALUES
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.store import verify
from guardfab.store.base import Txn
from guardfab.store.sqlite import SqliteStore
from test_attestation_fixtures import CI_POLICY, Boot, SoftHost, golden_baseline

#: One host, two boots: the golden one, and after a secure boot db update.
BOOT_A = SoftHost("host-a", index=30)
BOOT_B = SoftHost("host-a", index=30, boot=Boot(db=b"db: vendor CA + 2026 update CA"))
BOOT_KEY = reg.BOOT + "host-a"


class Workers:
    """One HGS directory and two worker services over its store, plus a reader's connection."""

    def __init__(self, directory: Path) -> None:
        init_state(directory, HgsConfig(service_name="test-hgs"))
        self.directory = directory
        state = HgsState(directory)
        self.stores = [SqliteStore(state.store_path()) for _ in range(2)]
        self.services = [HgsService(state, store) for store in self.stores]
        self.reader = SqliteStore(state.store_path())
        host = BOOT_A
        trust = [
            (reg.TPM_HOSTS + host.host_id, host.registration().to_dict()),
            (reg.AK_BINDINGS + host.ak_name.hex(), host.binding().to_dict()),
            (reg.BASELINES + "golden-2026", golden_baseline().to_dict()),
            (reg.CI_POLICIES + CI_POLICY.digest.hex(), CI_POLICY.to_dict()),
        ]
        reg.Registry.trust_txn(trust).commit(self.reader)

    def attest(self, worker: int, host: SoftHost) -> AttestOutcome:
        service = self.services[worker]
        nonce = service.challenge()
        return service.attest(nonce.token, host.evidence(nonce.value).to_dict())

    def boot_revision(self) -> int | None:
        entry = self.reader.get(BOOT_KEY)
        return None if entry is None else entry.revision

    def recorded_log(self) -> bytes:
        """The boot log the host's last record resolves to (raises if it does not)."""
        record = read_last_record(self.reader, "host-a")
        assert record is not None
        source = HostSummary.from_dict(record["summary"]).source
        assert source is not None
        return source.data

    def close(self) -> None:
        for store in [*self.stores, self.reader]:
            store.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    made = Workers(tmp_path / "hgs")
    try:
        yield made
    finally:
        made.close()


def test_attestations_of_one_boot_write_it_once(workers: Workers) -> None:
    assert workers.attest(0, BOOT_A).result.passed
    written = workers.boot_revision()
    assert written is not None
    for _ in range(3):
        before = workers.reader.get(reg.LAST + "host-a")
        assert workers.attest(0, BOOT_A).result.passed
        after = workers.reader.get(reg.LAST + "host-a")
        assert before is not None
        assert after is not None
        assert after.revision > before.revision  # a new record each time...
        assert workers.boot_revision() == written  # ...naming the boot written once
        assert workers.recorded_log() == BOOT_A.boot.log_bytes()


def test_a_new_boot_replaces_the_stored_one(workers: Workers) -> None:
    workers.attest(0, BOOT_A)
    first = workers.boot_revision()
    outcome = workers.attest(0, BOOT_B)
    assert not outcome.result.passed  # the db update does not match the golden baseline
    assert outcome.result.summary is not None
    assert workers.boot_revision() != first
    assert workers.recorded_log() == BOOT_B.boot.log_bytes()
    workers.attest(0, BOOT_A)  # and back
    assert workers.recorded_log() == BOOT_A.boot.log_bytes()


#: Which worker attests which boot, in order: each worker keeps what it saw of
#: the boot key while the other one replaces it (A, B, back to an identical A).
INTERLEAVING = [(0, BOOT_A), (0, BOOT_A), (1, BOOT_B), (1, BOOT_B), (0, BOOT_A), (1, BOOT_B),
                (1, BOOT_A), (0, BOOT_A), (1, BOOT_A), (0, BOOT_B), (1, BOOT_A)]  # fmt: skip


def _run_interleaving(workers: Workers) -> list[str]:
    """Attest INTERLEAVING; return every step whose record did not resolve to its boot."""
    wrong = []
    for step, (worker, host) in enumerate(INTERLEAVING):
        outcome = workers.attest(worker, host)
        assert outcome.result.summary is not None
        try:
            log = workers.recorded_log()
        except Exception as exc:  # noqa: BLE001 -- what the step left is the finding
            wrong.append(f"step {step}: {exc}")
            continue
        if log != host.boot.log_bytes():
            wrong.append(f"step {step}: the record resolves to another boot")
    return wrong


def test_two_workers_alternating_boots_leave_every_record_resolvable(workers: Workers) -> None:
    assert _run_interleaving(workers) == []
    assert verify(workers.reader).records == len(INTERLEAVING)  # one audit record each, no more


def test_the_interleaving_catches_a_skipped_put_without_the_compare(
    workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above has teeth: trusting the worker's memory without a compare breaks it."""

    def add_without_compare(
        self: known_boots.KnownBoots, txn: Txn, host_id: str, boot: StoredBoot
    ) -> bool:
        if self._revision_holding(host_id, boot) is None:
            txn.put(reg.BOOT + host_id, boot.value)
        return False

    monkeypatch.setattr(known_boots.KnownBoots, "add_to", add_without_compare)
    wrong = _run_interleaving(workers)
    assert wrong
    assert "host 'host-a'" in wrong[0]
    assert "another boot" in wrong[0]


def test_a_lost_boot_compare_is_not_taken_for_a_replay(workers: Workers) -> None:
    workers.attest(0, BOOT_A)
    workers.attest(0, BOOT_A)  # worker 0 now knows the boot key's revision
    workers.attest(1, BOOT_B)  # worker 1 replaces it
    audit_before = verify(workers.reader).records
    outcome = workers.attest(0, BOOT_A)  # worker 0's compare loses: it writes the boot
    assert outcome.health_certificate is not None
    assert verify(workers.reader).records == audit_before + 1
    assert workers.recorded_log() == BOOT_A.boot.log_bytes()


def test_a_replay_is_still_refused_when_the_boot_compare_would_fail_too(
    workers: Workers,
) -> None:
    service = workers.services[0]
    workers.attest(0, BOOT_A)
    workers.attest(0, BOOT_A)
    nonce = service.challenge()
    body = BOOT_A.evidence(nonce.value).to_dict()
    service.attest(nonce.token, body)
    workers.attest(1, BOOT_B)  # worker 0's knowledge of the boot is stale as well
    before = workers.reader.current_revision()
    with pytest.raises(NonceError):
        service.attest(nonce.token, body)
    assert workers.reader.current_revision() == before  # nothing written
    assert workers.recorded_log() == BOOT_B.boot.log_bytes()


def test_the_batched_path_writes_the_boot_again_after_a_lost_compare(workers: Workers) -> None:
    """On the event loop the commit is shared with the turn's others; the retry is the same."""
    workers.attest(0, BOOT_A)
    workers.attest(0, BOOT_A)
    workers.attest(1, BOOT_B)
    service = workers.services[0]
    nonce = service.challenge()
    body = BOOT_A.evidence(nonce.value).to_dict()
    outcome = asyncio.run(service.attest_batched(nonce.token, body))
    assert outcome.health_certificate is not None
    assert workers.recorded_log() == BOOT_A.boot.log_bytes()


def test_a_restored_hgs_resolves_every_record_and_keeps_the_boot(
    workers: Workers, tmp_path: Path
) -> None:
    """A backup copies hosts/boot/ with hosts/last/ (one read of the store: the pair agrees).

    A worker of the restored HGS starts with no memory of boots: it reads the
    boot key once, finds the very boot it would write, and compares instead.
    """
    workers.attest(0, BOOT_B)
    workers.attest(1, BOOT_A)
    secret = BackupSecret.from_key_file(new_key_file())
    data = export_state(workers.directory, secret, now=time.time())
    restored_dir = tmp_path / "restored"
    import_state(data, secret, restored_dir, RestoreOptions(), now=time.time())
    restored = SqliteStore(HgsState(restored_dir).store_path())
    try:
        record = read_last_record(restored, "host-a")
        assert record is not None
        source = HostSummary.from_dict(record["summary"]).source
        assert source is not None
        assert source.data == BOOT_A.boot.log_bytes()
        boot = restored.get(BOOT_KEY)
        assert boot is not None
        service = HgsService(HgsState(restored_dir), restored)
        for _ in range(2):
            nonce = service.challenge()
            evidence = BOOT_A.evidence(nonce.value).to_dict()
            assert service.attest(nonce.token, evidence).health_certificate is not None
        again = restored.get(BOOT_KEY)
        assert again is not None
        assert again.revision == boot.revision
    finally:
        restored.close()


def test_served_store_keeps_no_boot_or_record_values_in_watch_history(tmp_path: Path) -> None:
    """Nobody watches hosts/last/ or hosts/boot/: the served store's history drops their values."""
    store = SqliteStore(tmp_path / "hgs.db", history_without_values=HISTORY_WITHOUT_VALUES)
    watch = store.watch("", start_revision=1)
    store.put(reg.BOOT + "host-a", b"x" * 20_000)
    store.put(reg.LAST + "host-a", b"y" * 10_000)
    store.put(reg.TPM_HOSTS + "host-a", b"z")
    events = [watch.next_event(timeout=5) for _ in range(3)]
    watch.cancel()
    store.close()
    assert [(e.key, e.value) for e in events if e is not None] == [
        (reg.BOOT + "host-a", None),
        (reg.LAST + "host-a", None),
        (reg.TPM_HOSTS + "host-a", b"z"),
    ]
