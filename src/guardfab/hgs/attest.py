"""The attestation protocol around the pure engine: nonces, records, certificates.

One attestation is: check the challenge (MAC, expiry), verify the evidence
against the current trust, then in ONE store transaction consume the nonce,
keep the host's last result (and its boot, unless the store holds it already:
:mod:`guardfab.hgs.known_boots`), file an activation challenge if one is
needed, and append the audit record. A replayed nonce loses that transaction
and changes nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from guardfab.attestation.activation import activation_challenge, binding_for
from guardfab.attestation.admin_group_mode import verify_admin_group_evidence
from guardfab.attestation.evidence import (
    AdminGroupEvidence,
    Evidence,
    HostKeyEvidence,
    TpmEvidence,
)
from guardfab.attestation.hostkey_mode import verify_host_key_evidence
from guardfab.attestation.result import ActivationRequest, AttestationResult, VerdictState
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.attestation.trust import AkBinding, TrustState
from guardfab.errors import FormatError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode
from guardfab.formats.health_certificate import HealthCertificate, issue_health_certificate
from guardfab.hgs import registry as reg
from guardfab.hgs.audit_batch import Commit, LoopBatcher, commit_now, run_now
from guardfab.hgs.known_boots import KnownBoots, write_boot
from guardfab.hgs.last_record import StoredBoot, encode_last_record, json_text
from guardfab.hgs.nonce import Nonce, NonceError
from guardfab.store.audit import AppendRequest, AuditLog
from guardfab.store.base import ABSENT, Txn
from guardfab.store.errors import ConflictError, StoreError

#: How long a host has to answer a MakeCredential challenge.
ACTIVATION_TTL = 300
#: Attempts of one attestation when trusted state keeps changing under it.
TRUST_RETRIES = 4

_Verifier = Callable[..., AttestationResult]
_VERIFIERS: dict[type, _Verifier] = {
    TpmEvidence: verify_tpm_evidence,
    HostKeyEvidence: verify_host_key_evidence,
    AdminGroupEvidence: verify_admin_group_evidence,
}


class ActivationFailedError(VerificationError):
    """The host's ActivateCredential answer was wrong, expired or already used."""

    hint = "attest again to get a fresh MakeCredential challenge"


@dataclass(frozen=True)
class AttestOutcome:
    """What the API answers: the result, and a certificate or activation challenge.

    ``result_json`` is the result's JSON text (:func:`json_text` of its
    ``to_dict()``), made once per attestation for both the stored last record
    and this answer.
    """

    result: AttestationResult
    result_json: str
    health_certificate: str | None = None
    expires_at: int | None = None
    activation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON body for the host, as an object."""
        body = self.result.to_dict()
        body.update(self._added())
        return body

    def body(self) -> bytes:
        """The JSON body for the host: the same bytes as ``json_text(self.to_dict())``."""
        if self.activation is not None:
            # Replaces the result's own "activation" member in place: rare (first
            # contact only), so made from the object rather than spliced.
            return json_text(self.to_dict()).encode("utf-8")
        # The result's members, then ours: a result's JSON is a non-empty object.
        return (self.result_json[:-1] + "," + json_text(self._added())[1:]).encode("utf-8")

    def _added(self) -> dict[str, Any]:
        added: dict[str, Any] = {
            "health_certificate": self.health_certificate,
            "expires_at": self.expires_at,
        }
        if self.activation is not None:
            added["activation"] = self.activation  # the challenge, in the result's request's place
        return added


@dataclass
class Attestor:
    """Runs attestations and activations for one HGS (shared by request handlers)."""

    registry: reg.Registry
    audit: AuditLog
    signing_key: jose.AsymmetricKey
    issuer: str
    certificate_lifetime: int
    clock: Callable[[], float]
    #: The boots this worker knows the store holds (made from the registry's store).
    boots: KnownBoots = field(init=False)

    def __post_init__(self) -> None:
        self.boots = KnownBoots(self.registry.store)

    def attest(self, nonce: Nonce, evidence: Evidence) -> AttestOutcome:
        """Verify ``evidence`` bound to ``nonce``, record and answer at once (:meth:`_attest`)."""
        return run_now(self._attest(nonce, evidence, commit_now(self.audit)))

    async def attest_batched(
        self, nonce: Nonce, evidence: Evidence, batcher: LoopBatcher
    ) -> AttestOutcome:
        """:meth:`attest` with its commit shared with the other requests of this loop turn."""
        return await self._attest(nonce, evidence, batcher.append)

    async def _attest(self, nonce: Nonce, evidence: Evidence, commit: Commit) -> AttestOutcome:
        """Judge, commit, answer; judge again if trust moved before the commit.

        The evidence is judged under the cached trust (no store read), and the
        commit requires ``trust/version`` unchanged since that trust was loaded:
        if an admin changed trust meanwhile (a revocation, a new baseline), the
        commit fails, nothing is written, and the evidence is judged again under
        the trust just read. No answer rests on trust older than its commit.

        The boot's compare (:mod:`guardfab.hgs.known_boots`) is not a trust
        retry: when another worker wrote another boot of the host meanwhile, the
        same decision commits again with the boot written instead of compared.
        """
        version, trust = self.registry.cached_trust()
        for _ in range(TRUST_RETRIES):
            decision = self._decide(nonce, evidence, version, trust)
            try:
                await self._commit(decision, commit)
            except ConflictError as exc:
                _raise_unless_trust_moved(exc)
                version, trust = self.registry.current_trust()
                continue
            return decision.outcome
        raise _trust_kept_moving()

    async def _commit(self, decision: _Decision, commit: Commit) -> None:
        """Commit ``decision``; once more with its boot written if the boot's compare lost."""
        try:
            await commit(decision.record)
        except ConflictError as exc:
            boot = decision.compared_boot
            if boot is None or exc.key != reg.BOOT + boot.host_id:
                raise
            self.boots.forget(boot.host_id)
            txn = write_boot(decision.record.txn or Txn(), boot.host_id, boot.boot)
            await commit(replace(decision.record, txn=txn))

    def _decide(
        self, nonce: Nonce, evidence: Evidence, version: int, trust: TrustState
    ) -> _Decision:
        """Judge ``evidence`` under ``trust``; the answer and what must commit for it."""
        now = self.clock()
        when = datetime.datetime.fromtimestamp(now, datetime.UTC)
        verify = _VERIFIERS[type(evidence)]
        result = verify(evidence, trust, nonce=nonce.value, now=when)
        txn = Txn().compare(reg.NONCES + nonce.nonce_id, ABSENT)
        txn.compare(reg.VERSION_KEY, reg.version_condition(version))
        txn.put(reg.NONCES + nonce.nonce_id, b"", ttl=max(1.0, nonce.expires_at - now + 1))
        result_json = json_text(result.to_dict())
        outcome = self._outcome(result, result_json, int(now), txn)
        compared_boot = None
        if result.host_id is not None:
            last, boot = encode_last_record(result, result_json)
            txn.put(reg.LAST + result.host_id, last)
            if boot is not None and self.boots.add_to(txn, result.host_id, boot):
                compared_boot = _HostBoot(result.host_id, boot)
        host = result.host_id or "unidentified-host"
        record = AppendRequest(
            kind="attestation",
            actor=host,
            subject=host,
            outcome="success" if result.passed else "failure",
            details=_audit_details(result, outcome),
            txn=txn,
        )
        return _Decision(outcome, record, compared_boot)

    def _outcome(
        self, result: AttestationResult, result_json: str, now: int, txn: Txn
    ) -> AttestOutcome:
        if result.passed and result.host_id is not None and result.host_key is not None:
            cert = HealthCertificate(
                issuer=self.issuer,
                host_id=result.host_id,
                mode=result.mode.value,
                host_key=result.host_key,
                issued_at=now,
                expires_at=now + self.certificate_lifetime,
                policies=tuple(v.policy for v in result.verdicts if v.state is VerdictState.PASSED),
            )
            token = issue_health_certificate(cert, self.signing_key)
            return AttestOutcome(result, result_json, token, cert.expires_at)
        if result.activation is not None:
            activation = self._file_activation(result.activation, txn)
            return AttestOutcome(result, result_json, activation=activation)
        return AttestOutcome(result, result_json)

    def _file_activation(self, request: ActivationRequest, txn: Txn) -> dict[str, Any]:
        secret = secrets.token_bytes(32)
        challenge = activation_challenge(request.ek_public, request.ak_public, secret)
        activation_id = secrets.token_urlsafe(16)
        record = {
            "secret_sha256": hashlib.sha256(secret).hexdigest(),
            "binding": binding_for(request).to_dict(),
        }
        txn.put(reg.ACTIVATIONS + activation_id, reg.encode(record), ttl=ACTIVATION_TTL)
        return {"activation_id": activation_id, **challenge.to_dict()}

    def activate(self, activation_id: str, answer_b64: str) -> AkBinding:
        """Check a host's ActivateCredential answer; bind its AK to its EK once."""
        answer = b64url_decode(answer_b64, what="activation secret")
        key = reg.ACTIVATIONS + _safe_id(activation_id)
        entry = self.registry.store.get(key)
        if entry is None:
            raise ActivationFailedError("activation: unknown or expired activation id")
        record = reg.decode(entry.value, what=key)
        expected = bytes.fromhex(record["secret_sha256"])
        if not hmac.compare_digest(expected, hashlib.sha256(answer).digest()):
            raise ActivationFailedError("activation: the answer does not match the challenge")
        binding = AkBinding.from_dict(record["binding"])
        txn = reg.Registry.trust_txn(
            puts=[(reg.AK_BINDINGS + binding.ak_name.hex(), record["binding"])]
        )
        txn.compare(key, entry.revision).delete(key)
        try:
            self.audit.append(
                kind="activation", actor=binding.host_id, subject=binding.host_id,
                outcome="success", details={"ak_name": binding.ak_name.hex()}, txn=txn,
            )  # fmt: skip
        except ConflictError as exc:
            raise ActivationFailedError("activation: already used") from exc
        return binding


@dataclass(frozen=True)
class _HostBoot:
    """A host's boot that a decision's transaction compares instead of writing."""

    host_id: str
    boot: StoredBoot


@dataclass(frozen=True)
class _Decision:
    """An attestation's answer and the audit record (with its state change) it stands on."""

    outcome: AttestOutcome
    record: AppendRequest
    #: The boot the record names, when the transaction relies on the store holding it.
    compared_boot: _HostBoot | None = None


def _raise_unless_trust_moved(exc: ConflictError) -> None:
    """A lost compare on trust/version means retry; any other is the nonce's reuse.

    (The boot's compare, the only other one an attestation makes, is settled in
    ``Attestor._commit`` before this sees a conflict.)
    """
    if exc.key != reg.VERSION_KEY:
        raise NonceError("nonce: already used (replayed request)") from exc


def _trust_kept_moving() -> StoreError:
    return StoreError(
        f"attestation: trusted state changed {TRUST_RETRIES} times during one attestation",
        hint="retry; trust is being changed in a loop",
    )


def _safe_id(value: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isascii():
        raise FormatError("activation id: not a valid id")
    return value


def _audit_details(result: AttestationResult, outcome: AttestOutcome) -> dict[str, object]:
    return {
        "status": result.status.value,
        "mode": result.mode.value,
        "failed_policies": list(result.failed_policies),
        "failed_checks": [f.check for f in result.failures],
        "certificate_expires_at": outcome.expires_at,
    }
