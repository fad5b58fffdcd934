"""``hgs what-if``: who would pass or fail under a proposed trust change, before it is made.

Every host's last verified attestation is kept as a
:class:`~guardfab.attestation.summary.HostSummary` (facts, quoted PCRs, event
digests; no secrets). A proposed change is a pure function of the trust state
(:class:`TrustChange`); the report evaluates each host's summary before and
after with the same code that decides real attestations
(:func:`~guardfab.attestation.evaluation.assess_summary`) and lists the hosts
that flip. Applying a change that is not allowed (disabling a locked policy,
removing an unknown baseline) raises, exactly as the real change would.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from guardfab.attestation.baseline import TpmBaseline
from guardfab.attestation.evaluation import assess_summary
from guardfab.attestation.policies import DEFAULT_POLICY_SET, PolicySet, set_policy_state
from guardfab.attestation.result import AttestationStatus
from guardfab.attestation.summary import HostSummary
from guardfab.attestation.trust import CiPolicy, PolicyState, TrustState
from guardfab.errors import UsageError


class TrustChange(Protocol):
    """A proposed change to the trust state."""

    def apply(self, trust: TrustState) -> TrustState:
        """Return the trust state with the change made (raise if it is not allowed)."""

    def describe(self) -> str:
        """One line for a person."""


@dataclass(frozen=True)
class SetPolicyState:
    """Enable, disable or lock a policy."""

    name: str
    state: PolicyState

    def apply(self, trust: TrustState) -> TrustState:
        """See :func:`~guardfab.attestation.policies.set_policy_state`."""
        return set_policy_state(trust, self.name, self.state)

    def describe(self) -> str:
        """One line for a person."""
        return f"set policy {self.name} to {self.state.value}"


@dataclass(frozen=True)
class AddBaseline:
    """Register a TPM baseline."""

    baseline: TpmBaseline

    def apply(self, trust: TrustState) -> TrustState:
        """Add the baseline (a duplicate name raises UsageError)."""
        return dataclasses.replace(trust, baselines=(*trust.baselines, self.baseline))

    def describe(self) -> str:
        """One line for a person."""
        return f"add baseline {self.baseline.name}"


@dataclass(frozen=True)
class RemoveBaseline:
    """Remove a TPM baseline by name."""

    name: str

    def apply(self, trust: TrustState) -> TrustState:
        """Remove the baseline; an unknown name raises UsageError."""
        kept = tuple(b for b in trust.baselines if b.name != self.name)
        if len(kept) == len(trust.baselines):
            raise UsageError(f"no baseline is named {self.name!r}")
        return dataclasses.replace(trust, baselines=kept)

    def describe(self) -> str:
        """One line for a person."""
        return f"remove baseline {self.name}"


@dataclass(frozen=True)
class AddCiPolicy:
    """Register a CI policy."""

    policy: CiPolicy

    def apply(self, trust: TrustState) -> TrustState:
        """Add the CI policy (a duplicate digest raises UsageError)."""
        return dataclasses.replace(trust, ci_policies=(*trust.ci_policies, self.policy))

    def describe(self) -> str:
        """One line for a person."""
        return f"add CI policy {self.policy.name} ({self.policy.digest.hex()[:16]}...)"


@dataclass(frozen=True)
class RemoveCiPolicy:
    """Remove a CI policy by name."""

    name: str

    def apply(self, trust: TrustState) -> TrustState:
        """Remove the CI policy; an unknown name raises UsageError."""
        kept = tuple(p for p in trust.ci_policies if p.name != self.name)
        if len(kept) == len(trust.ci_policies):
            raise UsageError(f"no CI policy is named {self.name!r}")
        return dataclasses.replace(trust, ci_policies=kept)

    def describe(self) -> str:
        """One line for a person."""
        return f"remove CI policy {self.name}"


@dataclass(frozen=True)
class RevokeHost:
    """Revoke a host."""

    host_id: str

    def apply(self, trust: TrustState) -> TrustState:
        """Add the host to the revoked set."""
        return dataclasses.replace(trust, revoked_hosts=trust.revoked_hosts | {self.host_id})

    def describe(self) -> str:
        """One line for a person."""
        return f"revoke host {self.host_id}"


@dataclass(frozen=True)
class HostOutcome:
    """One host before and after: status and blocking policies."""

    host_id: str
    before: AttestationStatus
    after: AttestationStatus
    failed_before: tuple[str, ...]
    failed_after: tuple[str, ...]

    @property
    def flips(self) -> bool:
        """True when the host goes from passing to failing or back."""
        passed = AttestationStatus.PASSED
        return (self.before is passed) != (self.after is passed)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "host_id": self.host_id,
            "before": self.before.value,
            "after": self.after.value,
            "failed_before": list(self.failed_before),
            "failed_after": list(self.failed_after),
            "flips": self.flips,
        }


@dataclass(frozen=True)
class WhatIfReport:
    """The outcome of a proposed change for every host with a stored summary."""

    change: str
    hosts: tuple[HostOutcome, ...]

    @property
    def newly_failing(self) -> tuple[str, ...]:
        """Hosts that pass now and would fail after the change."""
        return tuple(h.host_id for h in self.hosts if h.flips and h.before.value == "Passed")

    @property
    def newly_passing(self) -> tuple[str, ...]:
        """Hosts that fail now and would pass after the change."""
        return tuple(h.host_id for h in self.hosts if h.flips and h.after.value == "Passed")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "change": self.change,
            "newly_failing": list(self.newly_failing),
            "newly_passing": list(self.newly_passing),
            "hosts": [h.to_dict() for h in self.hosts],
        }

    def explain(self) -> str:
        """A table for a person."""
        lines = [f"what if: {self.change}"]
        for host in self.hosts:
            mark = "FLIPS" if host.flips else "     "
            lines.append(f"  {mark} {host.host_id}: {host.before.value} -> {host.after.value}")
            if host.failed_after:
                lines.append(f"        failed after: {', '.join(host.failed_after)}")
        lines.append(
            f"{len(self.newly_failing)} host(s) would start failing, "
            f"{len(self.newly_passing)} would start passing"
        )
        return "\n".join(lines)


def what_if(
    change: TrustChange,
    trust: TrustState,
    hosts: Iterable[HostSummary],
    *,
    now: datetime.datetime,
    policies: PolicySet = DEFAULT_POLICY_SET,
) -> WhatIfReport:
    """Evaluate ``change`` against every host's last verified summary.

    Raises:
        UsageError, LockedPolicyError: the change itself is not allowed.
    """
    after_trust = change.apply(trust)
    rows = []
    for summary in hosts:
        before = assess_summary(summary, trust, host_key=None, now=now, policies=policies)
        after = assess_summary(summary, after_trust, host_key=None, now=now, policies=policies)
        rows.append(
            HostOutcome(
                summary.host_id,
                before.status,
                after.status,
                before.failed_policies,
                after.failed_policies,
            )
        )
    return WhatIfReport(change.describe(), tuple(rows))
