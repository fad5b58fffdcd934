"""Key releases: decided under cached state, committed with the state's versions compared.

:class:`KeyReleases` is the release half of :class:`guardfab.hgs.kps.KpsService`
(which keeps the configuration, the administration and the audit of refusals).
The pure decision is :func:`guardfab.keyprotection.release`; here it is fed the
configuration and trust as last loaded (no store read for either per release),
and the grant's transaction compares ``kps/version`` and ``trust/version``
besides the KP's counter, so a grant under a state that moved is decided again
under the fresh one (ADR 0007). :meth:`KeyReleases.release_batched` queues that
transaction with the others of its event-loop turn (``hgs.audit_batch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from guardfab.errors import GuardfabError
from guardfab.hgs import registry as reg
from guardfab.hgs.audit_batch import Commit, LoopBatcher, commit_now, run_now
from guardfab.hgs.kps_config import (
    GENERATIONS,
    MAX_KP_TEXT,
    RELEASE_KIND,
    SEEN,
    STATE_RETRIES,
    VERSION_KEY,
    KpsConfig,
    KpsUnavailableError,
    ReleaseState,
    decode_request_file,
    printable,
)
from guardfab.hgs.registry import decode, encode, version_condition
from guardfab.keyprotection import (
    KeyProtectorRejectedError,
    ReleaseResult,
    RollbackError,
    release,
)
from guardfab.store.audit import AppendRequest, AuditLog
from guardfab.store.base import ABSENT, Entry, Store, Txn
from guardfab.store.errors import ConflictError

TRUST_VERSION_KEY = reg.VERSION_KEY


class ReleaseSource(Protocol):
    """What releases need of their KPS: the store, audit log, trust, clock, configuration."""

    store: Store
    audit: AuditLog
    registry: reg.Registry
    clock: Callable[[], float]

    def loaded_config(self, *, fresh: bool) -> tuple[int, KpsConfig]: ...

    def audit_refusal(self, exc: GuardfabError) -> None: ...


class KeyReleases:
    """The releases of one KPS (see the module docstring)."""

    def __init__(self, kps: ReleaseSource) -> None:
        self._kps = kps

    def release(self, health_certificate: str, key_protector: str) -> ReleaseResult:
        """Decide one release and record it at once (see :meth:`_release`)."""
        return run_now(
            self._release(health_certificate, key_protector, commit_now(self._kps.audit))
        )

    async def release_batched(
        self, health_certificate: str, key_protector: str, batcher: LoopBatcher
    ) -> ReleaseResult:
        """:meth:`release` with its commit queued on ``batcher`` (the event loop's path).

        The same decision and the same transaction, committed with the other
        requests that reached their commit in this loop turn (``hgs.audit_batch``);
        a replay of the same KP in the same turn loses its counter's compare.
        """
        return await self._release(health_certificate, key_protector, batcher.append)

    async def _release(
        self, health_certificate: str, key_protector: str, commit: Commit
    ) -> ReleaseResult:
        """Decide one release and record it (see the module docstring).

        Decided under the configuration and trust last loaded, without reading
        their versions first: the commit compares both (``kps/version``,
        ``trust/version``), so a grant is never recorded under a configuration or
        trust that moved meanwhile (a signer removed, a host revoked): it is decided
        again under the fresh ones. A refusal made under cached state is
        re-decided the same way if either version moved.

        Raises:
            KeyReleaseError: refused (audited; nothing else changed).
            KpsUnavailableError: the KPS keys or configuration do not load (audited).
        """
        state = self._audited_state(fresh=False)
        for _ in range(STATE_RETRIES):
            decided = self._decision(state, health_certificate, key_protector)
            if isinstance(decided, ReleaseState):
                state = decided
                continue
            result, record = decided
            try:
                await commit(record)
            except ConflictError as exc:
                state = self._after_conflict(exc, result)
                continue
            return result
        raise self._kept_moving()

    def _decision(
        self, state: ReleaseState, health_certificate: str, key_protector: str
    ) -> ReleaseState | tuple[ReleaseResult, AppendRequest]:
        """The grant and what must commit for it; or the fresh state to decide again under."""
        try:
            result, read = self._decide(state, health_certificate, key_protector)
        except GuardfabError as exc:
            return self._after_refusal(state, exc)
        return result, self._record(result, read, state)

    def _after_refusal(self, state: ReleaseState, refusal: GuardfabError) -> ReleaseState:
        """The fresh state to decide again under if ``state`` moved; else audit and raise."""
        if state.cached and self._moved(state):
            return self._audited_state(fresh=True)
        self._kps.audit_refusal(refusal)
        raise refusal

    def _after_conflict(self, exc: ConflictError, result: ReleaseResult) -> ReleaseState:
        """A lost version compare: decide again. A lost counter compare: a concurrent replay."""
        if exc.key in (VERSION_KEY, TRUST_VERSION_KEY):
            return self._audited_state(fresh=True)
        refusal = RollbackError(
            f"key protector {result.kp_id} generation {result.generation} was released"
            " by a concurrent request: this one is refused as a replay"
        )
        refusal.annotate(host_id=result.host_id, kp_id=result.kp_id, generation=result.generation)
        self._kps.audit_refusal(refusal)
        raise refusal from exc

    def _audited_state(self, *, fresh: bool) -> ReleaseState:
        """The state to decide under (cached, or read afresh); a failure to load it is audited."""
        try:
            return self._state(fresh=fresh)
        except GuardfabError as exc:
            self._kps.audit_refusal(exc)
            raise

    def _kept_moving(self) -> KpsUnavailableError:
        error = KpsUnavailableError(
            f"the KPS configuration or trusted state changed {STATE_RETRIES} times during"
            " one release",
            hint="retry; something is changing the HGS configuration in a loop",
        )
        self._kps.audit_refusal(error)
        return error

    def _state(self, *, fresh: bool) -> ReleaseState:
        """The configuration and trust a release is decided under, with their versions.

        Not fresh: as last loaded (no store read once both are loaded). Fresh:
        both versions read now, and reloaded if they moved.
        """
        try:
            version, config = self._kps.loaded_config(fresh=fresh)
        except GuardfabError as exc:
            raise KpsUnavailableError(f"the KPS configuration does not load: {exc}") from exc
        if not config.ring:
            raise KpsUnavailableError("this HGS has no KPS key")
        registry = self._kps.registry
        trust_version, trust = registry.current_trust() if fresh else registry.cached_trust()
        return ReleaseState(version, config, trust_version, trust, cached=not fresh)

    def _moved(self, state: ReleaseState) -> bool:
        """Whether the configuration or trust changed since ``state`` was loaded."""
        entry = self._kps.store.get(VERSION_KEY)
        version = 0 if entry is None else entry.revision
        return (
            version != state.version or self._kps.registry.current_trust()[0] != state.trust_version
        )

    def _decide(
        self, state: ReleaseState, health_certificate: str, key_protector: str
    ) -> tuple[ReleaseResult, Entry | None]:
        """The pure release under ``state``; the counter entry its rollback check read."""
        reads: dict[str, Entry | None] = {}

        def highest(counter: str) -> int | None:
            entry = self._kps.store.get(GENERATIONS + counter)
            reads[counter] = entry
            if entry is None:  # no counter of its own yet: the kp_id's pre-owner counter, if any
                entry = self._kps.store.get(GENERATIONS + counter.partition("/")[0])
            return None if entry is None else int(decode(entry.value, what=counter)["generation"])

        result = release(
            health_certificate,
            decode_kp(key_protector),
            kps_keys=state.config.release_keys(),
            trusted_signers=state.config.signers,
            now=self._kps.clock(),
            deny_before=state.config.deny_before,
            revoked_hosts=state.trust.revoked_hosts,
            highest_generation_seen=highest,
        )
        return result, reads[result.counter]

    def _record(
        self, result: ReleaseResult, read: Entry | None, state: ReleaseState
    ) -> AppendRequest:
        """The audit record of a grant, with the state change it commits with."""
        now = int(self._kps.clock())
        key = GENERATIONS + result.counter
        txn = Txn().compare(key, ABSENT if read is None else read.revision)
        txn.compare(VERSION_KEY, version_condition(state.version))
        txn.compare(TRUST_VERSION_KEY, version_condition(state.trust_version))
        txn.put(key, encode({"generation": result.egress_generation, "at": now}))
        seen = {
            "kps_key": result.kps_guardian,
            "key_generation": result.key_generation,
            "owner": result.owner,
            "generation": result.egress_generation,
            "host_id": result.host_id,
            "at": now,
        }
        txn.put(SEEN + result.counter, encode(seen))
        return AppendRequest(
            kind=RELEASE_KIND,
            actor=printable(result.host_id),
            subject=result.kp_id,
            outcome="granted",
            details=result.audit_details(),
            txn=txn,
        )


def decode_kp(text: str) -> bytes:
    """The KP file from the request's base64url text (size-bounded first)."""
    return decode_request_file(
        text, max_text=MAX_KP_TEXT, what="key protector", rejected=KeyProtectorRejectedError
    )
