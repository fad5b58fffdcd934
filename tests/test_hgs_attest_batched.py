"""Attestations of one event-loop turn share one store commit, and keep every check.

The host-facing route awaits ``HgsService.attest_batched``: each request's
decision is its own, and its commit (nonce consumed, last record, audit record)
is queued with the others that reached the same point in the same loop turn,
then committed together (``hgs.audit_batch``). These tests run several
attestations concurrently on one loop and attack what sharing could break:
a replayed nonce, a revocation made by another process meanwhile, the chain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey

from guardfab.attestation.trust import HostKey
from guardfab.formats import jose
from guardfab.hgs import registry as reg
from guardfab.hgs.attest import AttestOutcome
from guardfab.hgs.audit_batch import LoopBatcher, run_now
from guardfab.hgs.nonce import NonceError
from guardfab.host.attestation import host_key_evidence
from guardfab.store import AuditLog, AuditRecord, SqliteStore, verify
from guardfab.store.audit import AppendRequest
from test_hgs_attest_trust import Fabric

HOSTS = 4


class Fleet(Fabric):
    """The Fabric's HGS with HOSTS registered host-key hosts."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.signers = [ECKey.generate_key("P-256") for _ in range(HOSTS)]
        keys = [
            HostKey(jose.thumbprint(s), f"host-{i}", jose.public_jwk(s))
            for i, s in enumerate(self.signers)
        ]
        self.change([(reg.HOST_KEYS + key.key_id, key.to_dict()) for key in keys])

    def bodies(self) -> list[tuple[str, dict[str, Any]]]:
        """One fresh challenge and its evidence per host."""
        made = []
        for signer in self.signers:
            nonce = self.service.challenge()
            evidence = host_key_evidence(signer, nonce=nonce.value, host_key=self.host_key)
            made.append((nonce.token, evidence.to_dict()))
        return made

    def attest_together(self, bodies: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Attest every body concurrently on one loop (all reach the commit in one turn)."""

        async def run() -> list[Any]:
            calls = [self.service.attest_batched(token, body) for token, body in bodies]
            return await asyncio.gather(*calls, return_exceptions=True)

        return asyncio.run(run())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(tmp_path / "hgs")
    try:
        yield made
    finally:
        made.close()


def test_one_turn_of_attestations_is_one_commit(fleet: Fleet) -> None:
    before = fleet.other.current_revision()
    outcomes = fleet.attest_together(fleet.bodies())
    assert all(isinstance(o, AttestOutcome) for o in outcomes)
    assert [o.result.host_id for o in outcomes] == [f"host-{i}" for i in range(HOSTS)]
    assert all(o.health_certificate for o in outcomes)
    assert fleet.other.current_revision() == before + 1  # one transaction for all of them
    assert all(fleet.other.get(reg.LAST + f"host-{i}") for i in range(HOSTS))
    assert verify(fleet.other).records == HOSTS


def test_a_replay_in_the_same_turn_is_refused_and_the_others_pass(fleet: Fleet) -> None:
    bodies = fleet.bodies()
    outcomes = fleet.attest_together([*bodies, bodies[1]])
    assert all(isinstance(o, AttestOutcome) and o.health_certificate for o in outcomes[:HOSTS])
    assert isinstance(outcomes[HOSTS], NonceError)
    assert verify(fleet.other).records == HOSTS  # nothing recorded for the replay
    again = fleet.attest_together([bodies[2]])
    assert isinstance(again[0], NonceError)  # and not in a later turn either


def test_a_revocation_by_another_process_reaches_the_whole_batch(fleet: Fleet) -> None:
    assert all(isinstance(o, AttestOutcome) for o in fleet.attest_together(fleet.bodies()))
    revoked = {"host_id": "host-2", "revoked_at": int(time.time())}
    fleet.change([(reg.REVOKED + "host-2", revoked)])  # this process's cache is stale
    outcomes = fleet.attest_together(fleet.bodies())
    assert all(isinstance(o, AttestOutcome) for o in outcomes)
    assert [o.health_certificate is not None for o in outcomes] == [True, True, False, True]
    assert not outcomes[2].result.passed
    assert verify(fleet.other).records == 2 * HOSTS


def test_run_now_finishes_an_operation_that_never_waits_and_refuses_one_that_does() -> None:
    async def committed() -> int:
        return 7

    async def at_once() -> int:
        return await committed()  # it awaits, but nothing it awaits suspends

    assert run_now(at_once()) == 7

    async def waits() -> int:
        await asyncio.sleep(0)
        return 7

    with pytest.raises(RuntimeError, match="waited for an event loop"):
        run_now(waits())


def test_a_loop_that_stopped_before_its_commit_does_not_stall_the_next(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    batcher = LoopBatcher(AuditLog(store))
    first = asyncio.new_event_loop()
    abandoned = first.create_task(batcher.append(AppendRequest("attestation", "a", "a", "success")))
    first.call_soon(first.stop)  # runs before the commit the append schedules
    first.run_forever()
    assert not abandoned.done()  # it waits for a commit that will never run
    first.close()

    async def next_append() -> AuditRecord:
        request = AppendRequest("attestation", "b", "b", "success")
        return await asyncio.wait_for(batcher.append(request), timeout=10)

    record = asyncio.run(next_append())
    assert record.actor == "b"
    assert verify(store).records == 1  # the abandoned request was never committed
    store.close()
