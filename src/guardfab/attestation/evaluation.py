"""From verified evidence to a result: baseline match, policies, revocation.

Shared by the three mode verifiers and by ``what-if``, so a host's verdicts in
a what-if are computed by exactly the code that decides a real attestation.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from guardfab.attestation.evidence import load_host_key
from guardfab.attestation.policies import DEFAULT_POLICY_SET, PolicyContext, PolicySet
from guardfab.attestation.result import (
    ActivationRequest,
    AttestationResult,
    AttestationStatus,
    CheckFailure,
    Refusal,
    overall_status,
)
from guardfab.attestation.summary import HostSummary
from guardfab.attestation.trust import AttestationMode, TrustState
from guardfab.errors import FormatError


def revoked_failure(host_id: str) -> CheckFailure:
    """The failure every mode reports for a revoked host."""
    return CheckFailure(
        "revocation",
        AttestationStatus.UNAUTHORIZED_HOST,
        "",
        f"host {host_id} is revoked",
        "an HGS administrator revoked this host; re-register it to attest again",
    )


def require_mode(
    trust: TrustState,
    mode: AttestationMode,
    host_key: Mapping[str, Any],
    now: datetime.datetime,
    *,
    key_checked: bool = False,
) -> None:
    """Refuse evidence in a mode the HGS does not accept now, or with an unusable host key.

    The host key is checked again here (it was checked when the evidence was
    loaded) because a passed result hands it to the KPS, whatever built the
    evidence object. ``key_checked`` says the loader checked this very mapping
    (:meth:`~guardfab.attestation.evidence.TpmEvidence.key_checked`): the check
    is then not repeated. A naive ``now`` is a programming error.

    Raises:
        ValueError: ``now`` has no time zone.
        Refusal: the mode is not active, or the host key is not a usable public JWK.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    if mode not in trust.modes:
        active = ", ".join(sorted(m.value for m in trust.modes)) or "none"
        raise Refusal.of(
            "mode",
            AttestationStatus.MODE_NOT_ACTIVE,
            f"the HGS does not accept {mode.value} attestation (active: {active})",
            hint="configure the host for the HGS's attestation mode",
        )
    if key_checked:
        return
    try:
        load_host_key(dict(host_key))
    except FormatError as exc:
        raise Refusal.of("host-encryption-key", AttestationStatus.INVALID_EVIDENCE, exc) from exc


def assess_summary(
    summary: HostSummary,
    trust: TrustState,
    *,
    host_key: Mapping[str, Any] | None,
    now: datetime.datetime,
    policies: PolicySet = DEFAULT_POLICY_SET,
) -> AttestationResult:
    """Evaluate a verified TPM summary: revocation, closest baseline, every policy."""
    baseline = trust.baseline_set.match(summary)
    verdicts = policies.evaluate(PolicyContext(summary, trust, baseline))
    failures = (revoked_failure(summary.host_id),) if trust.is_revoked(summary.host_id) else ()
    return AttestationResult(
        status=overall_status(failures, verdicts),
        mode=AttestationMode.TPM,
        host_id=summary.host_id,
        verified_at=now,
        verdicts=verdicts,
        failures=failures,
        host_key=None if host_key is None else dict(host_key),
        baseline=baseline,
        summary=summary,
    )


def refused_result(
    mode: AttestationMode,
    refusal: Refusal,
    trust: TrustState,
    *,
    host_id: str | None,
    host_key: Mapping[str, Any] | None,
    now: datetime.datetime,
    activation: ActivationRequest | None = None,
    warnings: tuple[str, ...] = (),
    policies: PolicySet = DEFAULT_POLICY_SET,
) -> AttestationResult:
    """The result of evidence stopped by a check: every policy marked not evaluated."""
    failure = refusal.failure
    reason = f"not evaluated: check '{failure.check}' failed first"
    verdicts = policies.not_evaluated(trust, reason)
    return AttestationResult(
        status=overall_status((failure,), verdicts),
        mode=mode,
        host_id=host_id,
        verified_at=now,
        verdicts=verdicts,
        failures=(failure,),
        host_key=None if host_key is None else dict(host_key),
        activation=activation,
        warnings=warnings,
    )


def unmeasured_result(
    mode: AttestationMode,
    trust: TrustState,
    *,
    host_id: str,
    host_key: Mapping[str, Any],
    now: datetime.datetime,
    warnings: tuple[str, ...] = (),
    policies: PolicySet = DEFAULT_POLICY_SET,
) -> AttestationResult:
    """A passed identity check in a mode without boot measurements (host key, admin group).

    As in the reference, these modes validate only who the host is; the
    measured-boot policies cannot apply and do not block.
    """
    reason = f"{mode.value} attestation carries no boot measurements; applies in TPM mode only"
    verdicts = policies.not_evaluated(trust, reason)
    return AttestationResult(
        status=AttestationStatus.PASSED,
        mode=mode,
        host_id=host_id,
        verified_at=now,
        verdicts=verdicts,
        host_key=dict(host_key),
        warnings=warnings,
    )
