"""The attestation result: a report, never the verification itself.

Verification steps raise typed errors; the mode verifiers catch them at one
place and turn them into an :class:`AttestationResult` that names every failed
check and carries a verdict for every policy. The result is what the service
answers (``to_dict``), what the audit log records and what ``hgs explain``
prints (``explain``). Statuses follow the reference's names (Passed,
UnauthorizedHost, InsecureHostConfiguration, TpmError, ...); a refusal never
carries the secret that the evidence did not earn.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

from guardfab.attestation.baseline import BaselineComparison
from guardfab.attestation.summary import HostSummary
from guardfab.attestation.trust import AttestationMode, PolicyState
from guardfab.errors import GuardfabError
from guardfab.formats.encoding import b64url_encode


class AttestationStatus(enum.StrEnum):
    """The overall outcome, named as the reference names its attestation statuses."""

    PASSED = "Passed"
    #: Identity not established or not trusted: unknown/revoked EK, key or group.
    UNAUTHORIZED_HOST = "UnauthorizedHost"
    #: The evidence verified, and one or more enforced policies failed.
    INSECURE_HOST_CONFIGURATION = "InsecureHostConfiguration"
    #: What the TPM produced did not verify: AK attributes, quote signature or type.
    TPM_ERROR = "TpmError"
    #: Malformed or inconsistent evidence: stale nonce, swapped host key, a log
    #: that does not replay to the quote, bad signatures in host-key modes.
    INVALID_EVIDENCE = "InvalidEvidence"
    #: The AK is not yet bound to the EK: the service must run MakeCredential.
    ACTIVATION_REQUIRED = "ActivationRequired"
    #: The evidence is for an attestation mode the HGS does not currently accept.
    MODE_NOT_ACTIVE = "ModeNotActive"


#: When several checks fail, the status of the most fundamental one wins.
_PRECEDENCE = (
    AttestationStatus.MODE_NOT_ACTIVE,
    AttestationStatus.UNAUTHORIZED_HOST,
    AttestationStatus.ACTIVATION_REQUIRED,
    AttestationStatus.TPM_ERROR,
    AttestationStatus.INVALID_EVIDENCE,
    AttestationStatus.INSECURE_HOST_CONFIGURATION,
)


class VerdictState(enum.StrEnum):
    """One policy's verdict for one host."""

    PASSED = "passed"
    FAILED = "failed"
    DISABLED = "disabled"
    #: The evidence cannot show the fact (or was not verified far enough to).
    NOT_EVALUABLE = "not-evaluable"


class PolicyVerdict(NamedTuple):
    """A policy's verdict: its state, whether it blocks, why, and the evidence read.

    A named tuple: every attestation makes one per policy (a frozen dataclass's
    per-field setattr cost three times as much).

    ``blocking`` is True when this verdict alone refuses the host: a failure of
    an enforced policy, or an enforced policy that could not be evaluated (fail
    closed; an administrator who accepts that gap disables the policy).
    """

    policy: str
    state: VerdictState
    policy_state: PolicyState
    blocking: bool
    reason: str
    evidence: str
    events: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form.

        ``str()`` of a StrEnum member is its value as a plain ``str``, in one C
        call; ``.value`` is a Python-level property, and every result the HGS
        answers and stores turns ten verdicts into JSON, twice.
        """
        return {
            "policy": self.policy,
            "verdict": str(self.state),
            "policy_state": str(self.policy_state),
            "blocking": self.blocking,
            "reason": self.reason,
            "evidence": self.evidence,
            "events": list(self.events),
        }


@dataclass(frozen=True, slots=True)
class CheckFailure:
    """A named check that failed, the status it implies, and the error's own words."""

    check: str
    status: AttestationStatus
    error: str
    reason: str
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "check": self.check,
            "status": self.status.value,
            "error": self.error,
            "reason": self.reason,
            "hint": self.hint,
        }


class Refusal(Exception):  # noqa: N818 (control flow inside the engine, not an error type)
    """Raised by a verification stage to stop the pipeline with a named failure."""

    def __init__(self, failure: CheckFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure

    @classmethod
    def of(
        cls, check: str, status: AttestationStatus, error: GuardfabError | str, hint: str = ""
    ) -> Refusal:
        """A refusal from a typed error (its class, message and hint) or a plain reason."""
        if isinstance(error, GuardfabError):
            failure = CheckFailure(
                check, status, type(error).__name__, str(error), hint or error.hint
            )
        else:
            failure = CheckFailure(check, status, "", error, hint)
        return cls(failure)


@dataclass(frozen=True)
class ActivationRequest:
    """What the service needs to send a MakeCredential challenge (status ActivationRequired)."""

    host_id: str
    ek_public: bytes
    ak_public: bytes
    ak_name: bytes
    ek_digest: bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON form (public values only)."""
        return {
            "host_id": self.host_id,
            "ek_public": b64url_encode(self.ek_public),
            "ak_public": b64url_encode(self.ak_public),
            "ak_name": self.ak_name.hex(),
            "ek_digest": self.ek_digest.hex(),
        }


def overall_status(
    failures: tuple[CheckFailure, ...], verdicts: tuple[PolicyVerdict, ...]
) -> AttestationStatus:
    """The status of the most fundamental failure; Passed if nothing failed or blocks."""
    if not failures:  # every verified attestation: only the verdicts can refuse
        for verdict in verdicts:
            if verdict.blocking:
                return AttestationStatus.INSECURE_HOST_CONFIGURATION
        return AttestationStatus.PASSED
    statuses = {failure.status for failure in failures}
    if any(verdict.blocking for verdict in verdicts):
        statuses.add(AttestationStatus.INSECURE_HOST_CONFIGURATION)
    for status in _PRECEDENCE:
        if status in statuses:
            return status
    return AttestationStatus.PASSED


@dataclass(frozen=True, init=False)
class AttestationResult:
    """The outcome of one attestation, for the API, the audit log and people.

    Attributes:
        status: overall status (see :class:`AttestationStatus`).
        mode: the mode the evidence was in.
        host_id: the host's identity, once established (None before).
        verified_at: the time the caller passed in.
        verdicts: one per policy, always all of them.
        failures: every non-policy check that failed, by name.
        host_key: the host encryption key (public JWK) the evidence bound; a
            health certificate names it in ``cnf`` only if ``passed``.
        baseline: the matching or closest baseline and its diff (TPM mode).
        activation: for ActivationRequired, what MakeCredential needs.
        warnings: e.g. that admin-group mode is deprecated.
        summary: the verified per-host record to keep for what-if and explain
            (TPM mode, only when the quote and log verified).
    """

    status: AttestationStatus
    mode: AttestationMode
    host_id: str | None
    verified_at: datetime.datetime
    verdicts: tuple[PolicyVerdict, ...]
    failures: tuple[CheckFailure, ...] = ()
    host_key: dict[str, Any] | None = None
    baseline: BaselineComparison | None = None
    activation: ActivationRequest | None = None
    warnings: tuple[str, ...] = ()
    summary: HostSummary | None = None

    def __init__(
        self,
        status: AttestationStatus,
        mode: AttestationMode,
        host_id: str | None,
        verified_at: datetime.datetime,
        verdicts: tuple[PolicyVerdict, ...],
        *,
        failures: tuple[CheckFailure, ...] = (),
        host_key: dict[str, Any] | None = None,
        baseline: BaselineComparison | None = None,
        activation: ActivationRequest | None = None,
        warnings: tuple[str, ...] = (),
        summary: HostSummary | None = None,
    ) -> None:
        # The dataclass's own __init__ for a frozen class sets each field through
        # object.__setattr__ (11 calls, ~0.4 us more than this) at every attestation;
        # the fields are set in one update instead, and the class stays frozen.
        # (test_attestation_result_fields keeps this signature equal to the fields.)
        self.__dict__.update(
            status=status,
            mode=mode,
            host_id=host_id,
            verified_at=verified_at,
            verdicts=verdicts,
            failures=failures,
            host_key=host_key,
            baseline=baseline,
            activation=activation,
            warnings=warnings,
            summary=summary,
        )

    @property
    def passed(self) -> bool:
        """True only for status Passed: the one outcome that earns a health certificate."""
        return self.status is AttestationStatus.PASSED

    @property
    def failed_policies(self) -> tuple[str, ...]:
        """Names of the policies whose verdict refuses the host."""
        return tuple(verdict.policy for verdict in self.verdicts if verdict.blocking)

    def to_dict(self) -> dict[str, Any]:
        """The API/audit JSON form."""
        return {
            "status": str(self.status),  # the value, as in PolicyVerdict.to_dict
            "mode": str(self.mode),
            "host_id": self.host_id,
            "verified_at": self.verified_at.isoformat(),
            "failed_policies": list(self.failed_policies),
            "failures": [failure.to_dict() for failure in self.failures],
            "verdicts": [verdict.to_dict() for verdict in self.verdicts],
            "host_key": self.host_key,
            "facts": {} if self.summary is None else self.summary.facts_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "warnings": list(self.warnings),
        }

    def explain(self) -> str:
        """A report for a person: status, failed checks, every verdict, the baseline diff."""
        lines = [f"host: {self.host_id or '(not identified)'}  mode: {self.mode.value}"]
        status = f"status: {self.status.value}"
        if self.failed_policies:
            status += f" (failed policies: {', '.join(self.failed_policies)})"
        lines.append(status)
        lines += [f"warning: {warning}" for warning in self.warnings]
        for failure in self.failures:
            lines.append(f"FAILED check {failure.check} [{failure.error}]: {failure.reason}")
            if failure.hint:
                lines.append(f"  hint: {failure.hint}")
        lines.append("policies:")
        width = max((len(v.policy) for v in self.verdicts), default=0)
        for verdict in self.verdicts:
            mark = "!" if verdict.blocking else " "
            lines.append(
                f" {mark} {verdict.policy:<{width}}  {verdict.state.value:<13} "
                f"({verdict.policy_state.value}) {verdict.reason}"
            )
        if self.baseline is not None:
            lines.append("baseline:")
            lines += ["  " + line for line in self.baseline.lines()]
        return "\n".join(lines)
