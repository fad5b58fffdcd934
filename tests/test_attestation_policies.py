"""Policy states: disabled policies are not evaluated, locked ones cannot be disabled,
enforced policies that cannot be evaluated fail closed, and every policy reports."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from guardfab.attestation.baseline import baseline_from_log
from guardfab.attestation.evaluation import assess_summary
from guardfab.attestation.policies import (
    POLICIES,
    Finding,
    LockedPolicyError,
    PolicyContext,
    PolicySet,
    effective_state,
    policy_named,
    set_policy_state,
)
from guardfab.attestation.result import AttestationStatus, VerdictState
from guardfab.attestation.summary import HostSummary
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.attestation.trust import PolicyState, TrustState
from guardfab.errors import UsageError
from test_attestation_fixtures import (
    GOLDEN,
    NONCE,
    NOW,
    Boot,
    SoftHost,
    golden_baseline,
    trust_for,
)

S = AttestationStatus
DOCS = Path(__file__).resolve().parents[1] / "docs"


def verified(boot: Boot = GOLDEN, **trust_changes: object) -> tuple[HostSummary, TrustState]:
    """A host's verified summary and a trust state whose baselines include its own boot,
    so that only the policy under test can refuse it."""
    host = SoftHost(boot=boot)
    own = baseline_from_log("own-boot", boot.log_bytes())
    trust = trust_for(host, baselines=(golden_baseline(), own), **trust_changes)
    result = verify_tpm_evidence(host.evidence(), trust, nonce=NONCE, now=NOW)
    assert result.summary is not None, result.explain()
    return result.summary, trust


def verdicts(summary: HostSummary, trust: TrustState) -> dict[str, object]:
    result = assess_summary(summary, trust, host_key=None, now=NOW)
    return {v.policy: v for v in result.verdicts}


@dataclass(frozen=True)
class Tripwire:
    """A policy that fails the test if it is ever evaluated."""

    name: str = "Hgs_UefiDebugDisabled"
    evidence: str = "nothing"
    linux_gap: str = ""
    default_state: PolicyState = PolicyState.ENABLED

    def verify(self, ctx: PolicyContext) -> Finding:
        pytest.fail(f"{self.name} was evaluated although disabled")


def test_a_disabled_policy_is_not_evaluated() -> None:
    summary, trust = verified(Boot(debug=True))
    trust = set_policy_state(trust, "Hgs_UefiDebugDisabled", PolicyState.DISABLED)
    spy = PolicySet([Tripwire()])
    (verdict,) = spy.evaluate(PolicyContext(summary, trust, None))
    assert verdict.state is VerdictState.DISABLED
    assert not verdict.blocking
    # And with the real policy, the debug-mode host passes once the policy is disabled.
    result = assess_summary(summary, trust, host_key=None, now=NOW)
    assert result.status is S.PASSED, result.explain()
    debug = {v.policy: v for v in result.verdicts}["Hgs_UefiDebugDisabled"]
    assert debug.state is VerdictState.DISABLED
    assert "disabled by an administrator" in debug.reason


def test_the_same_host_fails_while_the_policy_is_enabled() -> None:
    summary, trust = verified(Boot(debug=True))
    result = assess_summary(summary, trust, host_key=None, now=NOW)
    assert result.failed_policies == ("Hgs_UefiDebugDisabled",)


def test_the_planned_states_follow_every_change_of_the_stored_states() -> None:
    """One PolicySet keeps plans by the states' content: switching back and forth (and an
    administrator's explicit default) never reuses another configuration's verdicts."""
    summary, enabled = verified(Boot(debug=True))
    disabled = set_policy_state(enabled, "Hgs_UefiDebugDisabled", PolicyState.DISABLED)
    explicit = set_policy_state(enabled, "Hgs_UefiDebugDisabled", PolicyState.ENABLED)
    hibernation = set_policy_state(enabled, "Hgs_HibernationDisabled", PolicyState.ENABLED)
    for _ in range(2):
        assert verdicts(summary, enabled)["Hgs_UefiDebugDisabled"].blocking  # type: ignore[attr-defined]
        debug = verdicts(summary, disabled)["Hgs_UefiDebugDisabled"]
        assert debug.state is VerdictState.DISABLED  # type: ignore[attr-defined]
        assert verdicts(summary, explicit)["Hgs_UefiDebugDisabled"].blocking  # type: ignore[attr-defined]
        dumps = verdicts(summary, enabled)["Hgs_HibernationDisabled"]
        assert "disabled by default" in dumps.reason  # type: ignore[attr-defined]
        enforced = verdicts(summary, hibernation)["Hgs_HibernationDisabled"]
        assert enforced.state is VerdictState.NOT_EVALUABLE  # type: ignore[attr-defined]


def test_the_plan_key_is_the_stored_states_sorted_once() -> None:
    """The key plans are kept by is made with the trust state, from its own copy of the
    states: a caller's dict changed afterwards changes neither the states nor the key."""
    states = {"Hgs_IommuEnabled": PolicyState.ENABLED, "Hgs_CiPolicy": PolicyState.DISABLED}
    trust = TrustState(policy_states=states)
    expected = (("Hgs_CiPolicy", PolicyState.DISABLED), ("Hgs_IommuEnabled", PolicyState.ENABLED))
    assert trust.policy_states_key == expected
    states["Hgs_CiPolicy"] = PolicyState.ENABLED
    assert trust.policy_states_key == expected == tuple(sorted(trust.policy_states.items()))
    changed = set_policy_state(trust, "Hgs_CiPolicy", PolicyState.ENABLED)
    assert changed.policy_states_key == tuple(sorted(changed.policy_states.items())) != expected


@pytest.mark.parametrize("name", ["Hgs_SecureBootEnabled", "Hgs_PcrBaseline"])
@pytest.mark.parametrize("state", [PolicyState.DISABLED, PolicyState.ENABLED])
def test_a_locked_policy_cannot_be_disabled_or_unlocked(name: str, state: PolicyState) -> None:
    trust = TrustState()
    with pytest.raises(LockedPolicyError, match="locked") as info:
        set_policy_state(trust, name, state)
    assert info.value.hint


def test_a_stored_disabled_state_does_not_unlock_a_default_locked_policy() -> None:
    """Even if the store says 'disabled', a locked-by-design policy is enforced."""
    summary, trust = verified(
        Boot(secure_boot=b"\x00"), policy_states={"Hgs_SecureBootEnabled": PolicyState.DISABLED}
    )
    secure_boot = verdicts(summary, trust)["Hgs_SecureBootEnabled"]
    assert secure_boot.state is VerdictState.FAILED  # type: ignore[attr-defined]
    assert secure_boot.policy_state is PolicyState.LOCKED  # type: ignore[attr-defined]


def test_locking_is_one_way() -> None:
    trust = set_policy_state(TrustState(), "Hgs_CiPolicy", PolicyState.LOCKED)
    assert effective_state(trust, policy_named("Hgs_CiPolicy")) is PolicyState.LOCKED
    with pytest.raises(LockedPolicyError):
        set_policy_state(trust, "Hgs_CiPolicy", PolicyState.DISABLED)
    assert set_policy_state(trust, "Hgs_CiPolicy", PolicyState.LOCKED) == trust


def test_an_unknown_policy_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="Hgs_Nope"):
        set_policy_state(TrustState(), "Hgs_Nope", PolicyState.DISABLED)


def test_set_policy_state_is_pure() -> None:
    trust = TrustState()
    changed = set_policy_state(trust, "Hgs_CiPolicy", PolicyState.DISABLED)
    assert trust.policy_states == {}
    assert changed.policy_states == {"Hgs_CiPolicy": PolicyState.DISABLED}


def test_enforced_but_not_evaluable_fails_closed_until_disabled() -> None:
    summary, trust = verified(
        Boot(), policy_states={"Hgs_HibernationDisabled": PolicyState.ENABLED}
    )
    hibernation = verdicts(summary, trust)["Hgs_HibernationDisabled"]
    assert hibernation.state is VerdictState.NOT_EVALUABLE  # type: ignore[attr-defined]
    assert hibernation.blocking  # type: ignore[attr-defined]
    assert "fail closed" in hibernation.reason  # type: ignore[attr-defined]
    relaxed = set_policy_state(trust, "Hgs_HibernationDisabled", PolicyState.DISABLED)
    assert assess_summary(summary, relaxed, host_key=None, now=NOW).passed


@pytest.mark.parametrize(
    "name",
    ["Hgs_IommuEnabled", "Hgs_HibernationDisabled", "Hgs_DumpsDisabled", "Hgs_DumpEncryption"],
)
def test_policies_linux_cannot_show_ship_disabled_and_say_why(name: str) -> None:
    policy = policy_named(name)
    assert policy.default_state is PolicyState.DISABLED
    assert policy.linux_gap
    summary, trust = verified()
    verdict = verdicts(summary, trust)[name]
    assert verdict.state is VerdictState.DISABLED  # type: ignore[attr-defined]
    assert "disabled by default" in verdict.reason  # type: ignore[attr-defined]
    assert policy.linux_gap in verdict.reason  # type: ignore[attr-defined]


def test_no_baseline_registered_fails_the_baseline_policy() -> None:
    summary, trust = verified()
    trust = replace(trust, baselines=())
    by_name = verdicts(summary, trust)
    assert "no TPM baseline is registered" in by_name["Hgs_PcrBaseline"].reason  # type: ignore[attr-defined]
    sb = by_name["Hgs_SecureBootSettings"]
    assert sb.state is VerdictState.NOT_EVALUABLE  # type: ignore[attr-defined]


def test_no_ci_policy_registered_fails_the_ci_policy() -> None:
    summary, trust = verified()
    trust = replace(trust, ci_policies=())
    ci = verdicts(summary, trust)["Hgs_CiPolicy"]
    assert ci.state is VerdictState.FAILED  # type: ignore[attr-defined]
    assert "no CI policy is registered" in ci.reason  # type: ignore[attr-defined]


def test_every_policy_reports_its_evidence() -> None:
    summary, trust = verified()
    result = assess_summary(summary, trust, host_key=None, now=NOW)
    assert [v.policy for v in result.verdicts] == [p.name for p in POLICIES]
    for verdict, policy in zip(result.verdicts, POLICIES, strict=True):
        assert verdict.evidence == policy.evidence
        assert verdict.reason


def test_the_catalog_lists_states_evidence_and_gaps() -> None:
    trust = set_policy_state(TrustState(), "Hgs_CiPolicy", PolicyState.DISABLED)
    catalog = {row["name"]: row for row in PolicySet().catalog(trust)}
    assert set(catalog) == {p.name for p in POLICIES}
    assert catalog["Hgs_CiPolicy"]["state"] == "disabled"
    assert catalog["Hgs_CiPolicy"]["default_state"] == "enabled"
    assert catalog["Hgs_SecureBootEnabled"]["state"] == "locked"
    assert catalog["Hgs_DumpsDisabled"]["linux_gap"]


def test_the_admin_policy_table_documents_every_policy() -> None:
    table = (DOCS / "attestation-policies.md").read_text()
    for policy in POLICIES:
        assert f"`{policy.name}`" in table
