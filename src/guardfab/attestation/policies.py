"""Attestation policies: composable objects with one ``verify`` protocol.

Each policy (in the manner of sigstore-python's ``verify/policy.py``) has the
reference's name (``Hgs_SecureBootEnabled``...), says which evidence it reads,
and says honestly what a Linux host's evidence cannot show. ``verify`` returns
a :class:`Finding` when the policy holds and raises :class:`PolicyViolation`
when it does not, or :class:`NotEvaluable` when the evidence cannot decide.
:class:`PolicySet` runs every policy and turns each outcome into a
:class:`~guardfab.attestation.result.PolicyVerdict`, so a refusal names every
failed policy, not just the first.

Fail closed: an enforced (enabled or locked) policy that is not evaluable
refuses the host. An administrator who accepts that a host cannot show a fact
disables the policy (``hgs policy disable NAME``); a locked policy cannot be
disabled. Policies a Linux host can never show ship disabled, saying why, so
that enabling one is a deliberate choice that refuses such hosts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from guardfab.attestation.baseline import BaselineComparison, TpmBaseline, secure_boot_digests
from guardfab.attestation.result import PolicyVerdict, VerdictState
from guardfab.attestation.summary import FactRecord, HostSummary
from guardfab.attestation.trust import PolicyState, TrustState
from guardfab.errors import PolicyError, UsageError


class Finding(NamedTuple):
    """Why a policy holds, and the event numbers that show it."""

    reason: str
    events: tuple[int, ...] = ()


class PolicyViolation(PolicyError):  # noqa: N818 (reads as the policy's verdict)
    """The evidence shows the policy does not hold."""

    def __init__(self, reason: str, events: tuple[int, ...] = ()) -> None:
        super().__init__(reason)
        self.events = events


class NotEvaluable(PolicyError):  # noqa: N818
    """The evidence cannot show whether the policy holds."""

    def __init__(self, reason: str, events: tuple[int, ...] = ()) -> None:
        super().__init__(reason)
        self.events = events


class LockedPolicyError(PolicyError):
    """An attempt to disable a locked policy."""

    hint = "locked policies are always enforced; they cannot be disabled"


@dataclass(frozen=True)
class PolicyContext:
    """What a policy reads: the host's verified summary, the trust state, the baseline match."""

    summary: HostSummary
    trust: TrustState
    baseline: BaselineComparison | None


class Policy(Protocol):
    """One attestation policy."""

    @property
    def name(self) -> str:
        """The reference-style name, e.g. ``Hgs_SecureBootEnabled``."""

    @property
    def evidence(self) -> str:
        """What the policy reads, for the documentation and every verdict."""

    @property
    def linux_gap(self) -> str:
        """What a Linux host cannot show ("" when it can show everything)."""

    @property
    def default_state(self) -> PolicyState:
        """The state when the administrator has not set one."""

    def verify(self, ctx: PolicyContext) -> Finding:
        """Return why the policy holds; raise PolicyViolation or NotEvaluable."""


@dataclass(frozen=True)
class FactPolicy:
    """A policy that holds when one fact has the expected value (None: not evaluable)."""

    name: str
    fact: str
    expected: object
    evidence: str
    linux_gap: str = ""
    default_state: PolicyState = PolicyState.ENABLED

    def verify(self, ctx: PolicyContext) -> Finding:
        """Compare the fact with the expected value."""
        fact = ctx.summary.fact(self.fact)
        if fact.value is None:
            raise NotEvaluable(fact.note, fact.events)
        if fact.value != self.expected:
            raise PolicyViolation(fact.note, fact.events)
        return Finding(fact.note, fact.events)


@dataclass(frozen=True)
class PcrBaselinePolicy:
    """Hgs_PcrBaseline: the quoted PCRs equal a registered TPM baseline."""

    name: str = "Hgs_PcrBaseline"
    evidence: str = (
        "the quoted SHA-256 values of each baseline's PCR set (default 0-7), compared "
        "with every registered baseline; on a mismatch, the log events of the differing "
        "PCRs against the closest baseline's reference events"
    )
    linux_gap: str = ""
    default_state: PolicyState = PolicyState.LOCKED

    def verify(self, ctx: PolicyContext) -> Finding:
        """Pass on an exact match; otherwise name the closest baseline and the differing events."""
        match = ctx.baseline
        if match is None:
            raise PolicyViolation("no TPM baseline is registered (hgs baseline add)")
        name = match.baseline.name
        if match.matched:
            return _baseline_matched(name, match.baseline.pcr_set)
        events = tuple(d.host_event.number for d in match.differences if d.host_event)
        if match.unquoted:
            raise NotEvaluable(
                f"the quote does not cover PCR(s) {list(match.unquoted)} of baseline '{name}'"
            )
        raise PolicyViolation(
            f"no baseline matches; closest is '{name}' with {len(match.differences)} "
            f"differing event(s) in PCR(s) {list(match.pcr_mismatches)}",
            events,
        )


@functools.lru_cache(maxsize=256)
def _baseline_matched(name: str, pcr_set: tuple[int, ...]) -> Finding:
    """The finding of a host that matches a baseline.

    The same text for every host that matches it, so it is formatted once per
    baseline name and PCR set rather than at every attestation.
    """
    return Finding(f"PCRs {list(pcr_set)} match baseline '{name}'")


@dataclass(frozen=True)
class SecureBootSettingsPolicy:
    """Hgs_SecureBootSettings: PK, KEK, db and dbx are what a registered baseline recorded."""

    name: str = "Hgs_SecureBootSettings"
    evidence: str = (
        "the SHA-256 digests of the one verified EV_EFI_VARIABLE_DRIVER_CONFIG measurement "
        "of each of PK, KEK, db and dbx in PCR 7, compared with those of every registered "
        "baseline"
    )
    linux_gap: str = ""
    default_state: PolicyState = PolicyState.ENABLED

    def verify(self, ctx: PolicyContext) -> Finding:
        """Pass if some baseline recorded exactly these four measurements."""
        fact = ctx.summary.fact("secure_boot_variables")
        # Every attestation gets here: the fact's hex digests are looked up as they
        # are, and parsed only when they are not a registered baseline's.
        match = ctx.trust.baseline_set.with_secure_boot_fact(fact.value)
        if match is None:
            match = self._parsed_match(ctx, fact)
        return Finding(f"PK, KEK, db and dbx match baseline '{match.name}'", fact.events)

    @staticmethod
    def _parsed_match(ctx: PolicyContext, fact: FactRecord) -> TpmBaseline:
        """The baseline with the fact's parsed digests; raise why there is none."""
        host = secure_boot_digests(fact.value)
        if host is None:
            raise NotEvaluable(fact.note, fact.events)
        match = ctx.trust.baseline_set.with_secure_boot(host)
        if match is not None:
            return match
        recorded = [b for b in ctx.trust.baseline_set if b.secure_boot_variables is not None]
        if not recorded:
            raise NotEvaluable("no registered baseline records the secure boot variables")

        def differing(baseline: TpmBaseline) -> list[str]:
            recorded_digests = baseline.secure_boot_variables or {}
            return [name for name, digest in host.items() if recorded_digests.get(name) != digest]

        closest = min(recorded, key=lambda b: (len(differing(b)), b.name))
        names = differing(closest)
        verb = "differs" if len(names) == 1 else "differ"
        raise PolicyViolation(
            f"{', '.join(names)} {verb} from the closest baseline '{closest.name}' "
            "(no baseline matches)",
            fact.events,
        )


@dataclass(frozen=True)
class CiPolicyPolicy:
    """Hgs_CiPolicy: the boot loader measured a registered CI policy file."""

    name: str = "Hgs_CiPolicy"
    evidence: str = (
        "the SHA-256 digests of the events in the CI policy PCR (default 9, where GRUB's "
        "tpm module measures each file it loads as EV_IPL), compared with the registered "
        "CI policy digests"
    )
    linux_gap: str = (
        "only boot loaders that measure the files they load (GRUB with its tpm module) "
        "show the policy; systemd-boot and direct EFI stub boots do not"
    )
    default_state: PolicyState = PolicyState.ENABLED

    def verify(self, ctx: PolicyContext) -> Finding:
        """Pass if a quoted event in the CI PCR carries a registered policy's digest."""
        pcr = ctx.trust.ci_policy_pcr
        if pcr not in ctx.summary.pcrs:
            raise NotEvaluable(
                f"the quote does not cover PCR {pcr}, where CI policies are measured"
            )
        events = ctx.summary.events_in(pcr)
        if not events:
            raise NotEvaluable(
                f"nothing is measured into PCR {pcr}: the boot loader does not measure "
                "the files it loads"
            )
        for event in events:
            policy = ctx.trust.ci_policy(event.digest)
            if policy is not None:
                return Finding(
                    f"CI policy '{policy.name}' was measured into PCR {pcr} (event {event.number})",
                    (event.number,),
                )
        if not ctx.trust.ci_policies:
            raise PolicyViolation("no CI policy is registered (hgs ci-policy add)")
        raise PolicyViolation(
            f"none of the {len(events)} measurement(s) in PCR {pcr} is a registered CI policy",
            tuple(event.number for event in events),
        )


_NOT_IN_LINUX_LOG = "not measured into the TCG log by Linux or its boot loaders"

#: The policies, in the order verdicts are listed.
POLICIES: tuple[Policy, ...] = (
    FactPolicy(
        "Hgs_SecureBootEnabled",
        "secure_boot",
        expected=True,
        evidence="the one verified SecureBoot variable measurement "
        "(EV_EFI_VARIABLE_DRIVER_CONFIG) in PCR 7; 01 = enabled",
        default_state=PolicyState.LOCKED,
    ),
    FactPolicy(
        "Hgs_UefiDebugDisabled",
        "uefi_debug_disabled",
        expected=True,
        evidence="every PCR 7 digest (none may be H('UEFI Debug Mode')) and PCR 7's "
        "verified separator",
    ),
    SecureBootSettingsPolicy(),
    CiPolicyPolicy(),
    FactPolicy(
        "Hgs_FullBoot",
        "resumed",
        expected=False,
        evidence="TPMS_CLOCK_INFO.restartCount in the verified quote (0: no S3 resume or "
        "TPM restart since the last full boot)",
        linux_gap="a resume from hibernation (S4) is a full firmware boot on Linux and "
        "looks like one; see Hgs_HibernationDisabled",
    ),
    FactPolicy(
        "Hgs_IommuEnabled",
        "dma_protection",
        expected=True,
        evidence="every PCR 7 digest: H('DMA Protection Disabled') means pre-boot DMA "
        "protection is off",
        linux_gap="firmware measures only the disabled state, and whether Linux enabled "
        "the IOMMU (intel_iommu/amd_iommu) is " + _NOT_IN_LINUX_LOG,
        default_state=PolicyState.DISABLED,
    ),
    FactPolicy(
        "Hgs_HibernationDisabled",
        "hibernation_disabled",
        expected=True,
        evidence="nothing a Linux host can show (Windows measures its hibernation setting)",
        linux_gap="the hibernation setting and an S4 resume are " + _NOT_IN_LINUX_LOG,
        default_state=PolicyState.DISABLED,
    ),
    FactPolicy(
        "Hgs_DumpsDisabled",
        "dumps_disabled",
        expected=True,
        evidence="nothing a Linux host can show (Windows measures its crash dump setting)",
        linux_gap="kdump and core dump settings are " + _NOT_IN_LINUX_LOG,
        default_state=PolicyState.DISABLED,
    ),
    FactPolicy(
        "Hgs_DumpEncryption",
        "dump_encryption",
        expected=True,
        evidence="nothing a Linux host can show (Windows measures dump encryption)",
        linux_gap="crash dump encryption is " + _NOT_IN_LINUX_LOG,
        default_state=PolicyState.DISABLED,
    ),
    PcrBaselinePolicy(),
)

_BY_NAME: dict[str, Policy] = {policy.name: policy for policy in POLICIES}


def policy_named(name: str) -> Policy:
    """A policy by name.

    Raises:
        UsageError: no policy has that name.
    """
    policy = _BY_NAME.get(name)
    if policy is None:
        raise UsageError(f"no attestation policy is named {name!r}", hint=", ".join(_BY_NAME))
    return policy


def effective_state(trust: TrustState, policy: Policy) -> PolicyState:
    """The state a policy is evaluated in (a default-locked policy stays locked)."""
    if policy.default_state is PolicyState.LOCKED:
        return PolicyState.LOCKED
    return trust.policy_states.get(policy.name, policy.default_state)


def set_policy_state(trust: TrustState, name: str, state: PolicyState) -> TrustState:
    """Return the trust state with one policy's state changed (pure; the service stores it).

    Locking is one-way: a locked policy cannot be enabled-but-unlocked or disabled.

    Raises:
        UsageError: unknown policy name.
        LockedPolicyError: the policy is locked and ``state`` is not LOCKED.
    """
    policy = policy_named(name)
    if effective_state(trust, policy) is PolicyState.LOCKED and state is not PolicyState.LOCKED:
        raise LockedPolicyError(f"policy {name} is locked and cannot be set to {state.value}")
    states = {**trust.policy_states, name: state}
    return dataclasses.replace(trust, policy_states=states)


def _disabled_reason(trust: TrustState, policy: Policy) -> str:
    if policy.name in trust.policy_states:
        return "disabled by an administrator; not evaluated"
    gap = f": {policy.linux_gap}" if policy.linux_gap else ""
    return f"disabled by default{gap}; not evaluated"


#: One step of an evaluation: the policy, its effective state, and its verdict
#: when that is known without evidence (a disabled policy), else None.
_Step = tuple[Policy, PolicyState, PolicyVerdict | None]
#: Distinct policy-state configurations whose plans are kept (a few per HGS).
_PLANS_KEPT = 32


def _disabled_verdict(trust: TrustState, policy: Policy) -> PolicyVerdict:
    return PolicyVerdict(
        policy.name,
        VerdictState.DISABLED,
        PolicyState.DISABLED,
        False,
        _disabled_reason(trust, policy),
        policy.evidence,
    )


class PolicySet:
    """All policies evaluated together (AllOf): a verdict for every one.

    What the policy states alone decide (each policy's effective state, and the
    whole verdict of a disabled one) is worked out once per distinct set of
    stored states, keyed by their content, and reused; every enforced policy
    is verified against the evidence every time.
    """

    def __init__(self, policies: Iterable[Policy] = POLICIES) -> None:
        self.policies = tuple(policies)
        self._plans: dict[tuple[tuple[str, PolicyState], ...], tuple[_Step, ...]] = {}

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies)

    def evaluate(self, ctx: PolicyContext) -> tuple[PolicyVerdict, ...]:
        """Evaluate every policy; enforced policies that fail or cannot be evaluated block."""
        # A list made in one go, then a tuple: a generator would be resumed per policy.
        return tuple(
            [
                self._verdict(policy, state, ctx) if verdict is None else verdict
                for policy, state, verdict in self._plan(ctx.trust)
            ]
        )

    def _plan(self, trust: TrustState) -> tuple[_Step, ...]:
        """Each policy's state and, if disabled, its verdict (cached by the states' content)."""
        key = trust.policy_states_key
        plan = self._plans.get(key)
        if plan is None:
            plan = tuple(self._step(trust, policy) for policy in self.policies)
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    @staticmethod
    def _step(trust: TrustState, policy: Policy) -> _Step:
        state = effective_state(trust, policy)
        if state is PolicyState.DISABLED:
            return policy, state, _disabled_verdict(trust, policy)
        return policy, state, None

    @staticmethod
    def _verdict(policy: Policy, state: PolicyState, ctx: PolicyContext) -> PolicyVerdict:
        try:
            found = policy.verify(ctx)
        except PolicyViolation as exc:
            return PolicyVerdict(
                policy.name, VerdictState.FAILED, state, True, str(exc), policy.evidence, exc.events
            )
        except NotEvaluable as exc:
            return PolicyVerdict(
                policy.name,
                VerdictState.NOT_EVALUABLE,
                state,
                True,
                f"{exc} (enforced policies fail closed; disable the policy to accept this)",
                policy.evidence,
                exc.events,
            )
        return PolicyVerdict(
            policy.name,
            VerdictState.PASSED,
            state,
            False,
            found.reason,
            policy.evidence,
            found.events,
        )

    def not_evaluated(self, trust: TrustState, reason: str) -> tuple[PolicyVerdict, ...]:
        """Verdicts when policies were not run: the evidence stopped earlier, or has no
        measurements (host-key and admin-group modes). They never block by themselves:
        the failed check (if any) already decides the status.
        """
        # Disabled policies' verdicts come from the plan, as in :meth:`evaluate`.
        return tuple(
            [
                PolicyVerdict(
                    policy.name, VerdictState.NOT_EVALUABLE, state, False, reason, policy.evidence
                )
                if verdict is None
                else verdict
                for policy, state, verdict in self._plan(trust)
            ]
        )

    def catalog(self, trust: TrustState) -> list[dict[str, Any]]:
        """Every policy with its state, evidence and Linux gap (``hgs policy list``)."""
        return [
            {
                "name": policy.name,
                "state": effective_state(trust, policy).value,
                "default_state": policy.default_state.value,
                "evidence": policy.evidence,
                "linux_gap": policy.linux_gap,
            }
            for policy in self.policies
        ]


DEFAULT_POLICY_SET = PolicySet()
