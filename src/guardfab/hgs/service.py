"""The HGS service object: state directory + store + audit, shared by every request.

Stateless apart from the store: any number of these (threads, worker processes,
cluster nodes) can serve the same HGS. The HTTP layer (:mod:`guardfab.hgs.app`)
only translates requests into calls on this object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from guardfab.attestation.evidence import evidence_from_dict
from guardfab.attestation.trust import AkBinding
from guardfab.formats import jose
from guardfab.hgs.attest import Attestor, AttestOutcome
from guardfab.hgs.audit_batch import LoopBatcher
from guardfab.hgs.nonce import Nonce, check_nonce, issue_nonce
from guardfab.hgs.registry import Registry
from guardfab.hgs.state import AccessTable, HgsState
from guardfab.store.audit import AuditLog
from guardfab.store.base import Store

#: Threads for requests on a store that waits on the network: each mostly waits for
#: etcd, and every one in flight can join the audit log's next group commit.
STORE_THREADS = 32


class HgsService:
    """Everything a request handler needs, loaded once per process."""

    def __init__(
        self, state: HgsState, store: Store, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.state = state
        self.store = store
        self.clock = clock
        self.audit = AuditLog(store, clock=clock)
        self.audit_batcher = LoopBatcher(self.audit)
        #: Where whole requests run when every store call waits on the network (etcd).
        self.store_threads: ThreadPoolExecutor | None = None
        if getattr(store, "waits_on_network", False):
            self.store_threads = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="hgs-store")
        self.access: AccessTable = state.access()
        self._nonce_key = state.nonce_key()
        self._signing_key = state.attestation_signing_key()
        self.signer_id = jose.thumbprint(self._signing_key)
        self.registry = Registry(store)
        self.attestor = Attestor(
            registry=self.registry,
            audit=self.audit,
            signing_key=self._signing_key,
            issuer=state.config.service_name,
            certificate_lifetime=state.config.health_certificate_lifetime,
            clock=clock,
        )

    def challenge(self) -> Nonce:
        """A fresh attestation challenge."""
        return issue_nonce(self._nonce_key, now=self.clock(), ttl=self.state.config.nonce_ttl)

    def signers(self) -> dict[str, Any]:
        """The public attestation signing keys as a JWK Set (for Key Protection Services)."""
        public = jose.public_jwk(self._signing_key)
        return {"keys": [{**public, "kid": self.signer_id, "use": "sig"}]}

    def attest(self, nonce_token: str, evidence: Any) -> AttestOutcome:
        """Check the challenge, load the evidence strictly, and attest."""
        nonce = check_nonce(self._nonce_key, nonce_token, now=self.clock())
        return self.attestor.attest(nonce, evidence_from_dict(evidence))

    async def attest_batched(self, nonce_token: str, evidence: Any) -> AttestOutcome:
        """:meth:`attest` on the event loop, its commit shared with the loop turn's others.

        On a store that waits on the network the whole request runs on one of
        :attr:`store_threads` instead (its commit shared with the other threads'
        by the audit log's group commit), so the loop never waits for the store.
        """
        if self.store_threads is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self.store_threads, self.attest, nonce_token, evidence
            )
        nonce = check_nonce(self._nonce_key, nonce_token, now=self.clock())
        return await self.attestor.attest_batched(
            nonce, evidence_from_dict(evidence), self.audit_batcher
        )

    def activate(self, activation_id: str, secret: str) -> AkBinding:
        """Accept a host's ActivateCredential answer (binds its AK to its EK)."""
        return self.attestor.activate(activation_id, secret)
