"""Assessing a verified summary: each shortcut the hot path takes gives the answer the
careful path gives, and the careful path still refuses what it refused.

The shortcuts: Hgs_SecureBootSettings looks the fact's hex digests up without parsing
them; a baseline match hands out a comparison made once per baseline; the overall
status of a verified attestation reads only the verdicts.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import MISSING, FrozenInstanceError, fields, replace
from typing import Any

import pytest

from guardfab.attestation.baseline import (
    BaselineComparison,
    BaselineSet,
    TpmBaseline,
    baseline_from_log,
)
from guardfab.attestation.evaluation import assess_summary
from guardfab.attestation.policies import (
    POLICIES,
    Finding,
    NotEvaluable,
    PolicyContext,
    PolicySet,
    PolicyViolation,
    SecureBootSettingsPolicy,
    effective_state,
)
from guardfab.attestation.result import (
    AttestationResult,
    AttestationStatus,
    CheckFailure,
    PolicyVerdict,
    VerdictState,
    overall_status,
)
from guardfab.attestation.summary import HostSummary
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.attestation.trust import AttestationMode, PolicyState, TrustState
from test_attestation_fixtures import GOLDEN, NONCE, NOW, Boot, SoftHost, golden_baseline, trust_for

S = AttestationStatus
SB = SecureBootSettingsPolicy()


def verified(boot: Boot = GOLDEN, *baselines: TpmBaseline) -> tuple[HostSummary, TrustState]:
    host = SoftHost(boot=boot)
    trust = trust_for(host, baselines=baselines or (golden_baseline(),))
    result = verify_tpm_evidence(host.evidence(), trust, nonce=NONCE, now=NOW)
    assert result.summary is not None, result.explain()
    return result.summary, trust


def with_sb_value(summary: HostSummary, value: Any) -> HostSummary:
    fact = summary.fact("secure_boot_variables")
    return summary.replace(
        facts={**summary.facts, "secure_boot_variables": fact._replace(value=value)}
    )


def outcome(ctx: PolicyContext, verify: Any) -> tuple[str, str]:
    """What a policy call ends in: the finding's reason, or the exception's type and words."""
    try:
        found = verify(ctx)
    except (PolicyViolation, NotEvaluable) as exc:
        return type(exc).__name__, str(exc)
    if isinstance(found, Finding):
        return "Finding", found.reason
    return "Finding", f"PK, KEK, db and dbx match baseline '{found.name}'"


def sb_values(honest: dict[str, Any]) -> list[Any]:
    """The honest value and every way a fact's value can be off."""
    upper = {name: {bank: d.upper() for bank, d in banks.items()} for name, banks in honest.items()}
    swapped = copy.deepcopy(honest)
    swapped["PK"], swapped["KEK"] = honest["KEK"], honest["PK"]
    changed = copy.deepcopy(honest)
    changed["db"]["sha256"] = "00" * 32
    no_dbx = {name: banks for name, banks in honest.items() if name != "dbx"}
    no_bank = copy.deepcopy(honest)
    del no_bank["PK"]["sha256"]
    unhashable = copy.deepcopy(honest)
    unhashable["KEK"]["sha256"] = [honest["KEK"]["sha256"]]
    not_hex = copy.deepcopy(honest)
    not_hex["dbx"]["sha256"] = "zz" * 32
    as_bytes = copy.deepcopy(honest)
    as_bytes["db"]["sha256"] = bytes.fromhex(honest["db"]["sha256"])
    return [honest, upper, swapped, changed, no_dbx, no_bank, unhashable, not_hex, as_bytes,
            None, [], "PK", {"PK": None}]  # fmt: skip


# ------------------------------------------------------------ Hgs_SecureBootSettings


def test_the_honest_fact_is_found_without_parsing() -> None:
    summary, trust = verified()
    value = summary.fact("secure_boot_variables").value
    assert trust.baseline_set.with_secure_boot_fact(value) == golden_baseline()
    found = SB.verify(PolicyContext(summary, trust, None))
    assert found.reason == "PK, KEK, db and dbx match baseline 'golden-2026'"


def test_looking_the_fact_up_and_parsing_it_agree_on_every_value() -> None:
    summary, trust = verified()
    honest = summary.fact("secure_boot_variables").value
    assert isinstance(honest, dict)
    for value in sb_values(honest):
        ctx = PolicyContext(with_sb_value(summary, value), trust, None)
        fact = ctx.summary.fact("secure_boot_variables")
        careful = outcome(ctx, lambda c, f=fact: SB._parsed_match(c, f))
        assert outcome(ctx, SB.verify) == careful, value


def test_only_the_registered_digests_pass() -> None:
    summary, trust = verified()
    honest = summary.fact("secure_boot_variables").value
    expected = ["Finding", "Finding"] + ["PolicyViolation"] * 2 + ["NotEvaluable"] * 9
    got = [outcome(PolicyContext(with_sb_value(summary, v), trust, None), SB.verify)[0]
           for v in sb_values(honest)]  # fmt: skip
    assert got == expected


def test_an_upper_case_spelling_takes_the_careful_path_and_still_matches() -> None:
    summary, trust = verified()
    honest = summary.fact("secure_boot_variables").value
    upper = sb_values(honest)[1]
    assert trust.baseline_set.with_secure_boot_fact(upper) is None
    found = SB.verify(PolicyContext(with_sb_value(summary, upper), trust, None))
    assert "'golden-2026'" in found.reason


def test_a_changed_db_is_refused_and_named() -> None:
    summary, trust = verified(Boot(db=b"db: attacker CA"))
    verdict = {v.policy: v for v in assess_summary(summary, trust, host_key=None, now=NOW).verdicts}
    sb = verdict["Hgs_SecureBootSettings"]
    assert sb.state is VerdictState.FAILED
    assert sb.reason == "db differs from the closest baseline 'golden-2026' (no baseline matches)"


def test_of_two_baselines_with_the_same_variables_the_first_is_named_either_way() -> None:
    summary, trust = verified()
    other = baseline_from_log("other", Boot(shim=b"shim 16").log_bytes())
    for order in ((other, golden_baseline()), (golden_baseline(), other)):
        trust_n = replace(trust, baselines=order)
        ctx = PolicyContext(summary, trust_n, None)
        fact = summary.fact("secure_boot_variables")
        assert SB.verify(ctx).reason.endswith(f"'{order[0].name}'")
        assert SB._parsed_match(ctx, fact).name == order[0].name


def test_no_recorded_variables_is_not_evaluable() -> None:
    summary, trust = verified()
    bare = replace(golden_baseline(), secure_boot_variables=None)
    trust = replace(trust, baselines=(bare,))
    with pytest.raises(NotEvaluable, match="no registered baseline records"):
        SB.verify(PolicyContext(summary, trust, None))


# ------------------------------------------------------------ baseline match


@pytest.mark.parametrize("uintn", [4, 8, 2])
def test_a_match_equals_a_freshly_made_comparison(uintn: int) -> None:
    summary, trust = verified()
    summary = summary.replace(uintn_size=uintn)
    match = trust.baseline_set.match(summary)
    assert match == BaselineComparison(golden_baseline(), True, host_uintn=uintn)
    assert match is not None
    assert match.matched
    assert match.host_uintn == uintn


def test_an_unquoted_pcr_never_matches() -> None:
    summary, _ = verified()
    pcrs = {pcr: value for pcr, value in summary.pcrs.items() if pcr != 3}
    match = BaselineSet([golden_baseline()]).match(summary.replace(pcrs=pcrs))
    assert match is not None
    assert not match.matched
    assert match.unquoted == (3,)


def test_a_match_is_reported_with_its_own_baseline_name_and_pcrs() -> None:
    summary, _ = verified()
    for name, pcrs in (("golden-2026", range(8)), ("wider", range(10)), ("golden-2026", range(10))):
        baseline = baseline_from_log(name, GOLDEN.log_bytes(), pcrs=pcrs)
        trust = trust_for(SoftHost(), baselines=(baseline,))
        pcr = {v.policy: v for v in assess_summary(summary, trust, host_key=None, now=NOW).verdicts}
        assert pcr["Hgs_PcrBaseline"].reason == f"PCRs {list(pcrs)} match baseline '{name}'"
        assert pcr["Hgs_PcrBaseline"].state is VerdictState.PASSED


# ------------------------------------------------------------ policies not evaluated


def states_configurations() -> list[dict[str, PolicyState]]:
    return [
        {},
        {"Hgs_UefiDebugDisabled": PolicyState.DISABLED},
        {"Hgs_UefiDebugDisabled": PolicyState.ENABLED},
        {"Hgs_HibernationDisabled": PolicyState.ENABLED, "Hgs_CiPolicy": PolicyState.LOCKED},
        {"Hgs_SecureBootEnabled": PolicyState.DISABLED, "Hgs_DumpsDisabled": PolicyState.DISABLED},
    ]


def test_not_evaluated_verdicts_follow_each_policy_state() -> None:
    """The plan's verdicts for disabled policies, the reason given for every other one."""
    policies = PolicySet()
    for _ in range(2):  # the second round reads the kept plans
        for states in states_configurations():
            trust = TrustState(policy_states=states)
            for reason in ("not evaluated: check 'quote' failed first", "host-key: TPM only"):
                got = policies.not_evaluated(trust, reason)
                assert [v.policy for v in got] == [p.name for p in POLICIES]
                for verdict, policy in zip(got, POLICIES, strict=True):
                    state = effective_state(trust, policy)
                    assert verdict.policy_state is state
                    assert not verdict.blocking
                    assert verdict.evidence == policy.evidence
                    if state is PolicyState.DISABLED:
                        assert verdict.state is VerdictState.DISABLED
                        explicit = policy.name in states
                        assert ("by an administrator" in verdict.reason) is explicit
                    else:
                        assert verdict.state is VerdictState.NOT_EVALUABLE
                        assert verdict.reason == reason


# ------------------------------------------------------------ overall status


def verdict(blocking: bool) -> PolicyVerdict:
    state = VerdictState.FAILED if blocking else VerdictState.PASSED
    return PolicyVerdict("P", state, PolicyState.ENABLED, blocking, "why", "what")


def failure(status: AttestationStatus) -> CheckFailure:
    return CheckFailure("check", status, "", "why")


@pytest.mark.parametrize(
    ("failures", "verdicts", "expected"),
    [
        ((), (), S.PASSED),
        ((), (verdict(False), verdict(False)), S.PASSED),
        ((), (verdict(False), verdict(True)), S.INSECURE_HOST_CONFIGURATION),
        ((failure(S.TPM_ERROR),), (verdict(True),), S.TPM_ERROR),
        ((failure(S.INVALID_EVIDENCE),), (verdict(False),), S.INVALID_EVIDENCE),
        ((failure(S.INVALID_EVIDENCE), failure(S.UNAUTHORIZED_HOST)), (), S.UNAUTHORIZED_HOST),
        ((failure(S.INSECURE_HOST_CONFIGURATION),), (), S.INSECURE_HOST_CONFIGURATION),
    ],
)
def test_the_overall_status(
    failures: tuple[CheckFailure, ...], verdicts: tuple[PolicyVerdict, ...], expected: S
) -> None:
    assert overall_status(failures, verdicts) is expected


def test_a_revoked_host_with_a_clean_boot_is_unauthorized() -> None:
    summary, trust = verified()
    trust = replace(trust, revoked_hosts=frozenset({summary.host_id}))
    result = assess_summary(summary, trust, host_key=None, now=NOW)
    assert result.status is S.UNAUTHORIZED_HOST
    assert not result.failed_policies


# ------------------------------------------------------------ JSON form


@pytest.mark.parametrize("state", list(VerdictState))
@pytest.mark.parametrize("policy_state", list(PolicyState))
def test_a_verdicts_json_states_are_plain_strings_of_the_values(
    state: VerdictState, policy_state: PolicyState
) -> None:
    as_json = PolicyVerdict("P", state, policy_state, False, "why", "what", (3,)).to_dict()
    assert type(as_json["verdict"]) is str
    assert as_json["verdict"] == state.value
    assert type(as_json["policy_state"]) is str
    assert as_json["policy_state"] == policy_state.value
    assert as_json["events"] == [3]


@pytest.mark.parametrize("status", list(AttestationStatus))
@pytest.mark.parametrize("mode", list(AttestationMode))
def test_a_results_json_status_and_mode_are_plain_strings_of_the_values(
    status: AttestationStatus, mode: AttestationMode
) -> None:
    result = AttestationResult(status, mode, "h", NOW, ())
    as_json = result.to_dict()
    assert type(as_json["status"]) is str
    assert as_json["status"] == status.value
    assert type(as_json["mode"]) is str
    assert as_json["mode"] == mode.value


def test_attestation_result_fields() -> None:
    """AttestationResult's own __init__ (one update instead of a setattr per field) takes
    exactly the dataclass's fields, in order, with their defaults, sets every one, and the
    result stays frozen, comparable and copyable with ``replace``."""
    params = list(inspect.signature(AttestationResult.__init__).parameters.values())[1:]
    declared = fields(AttestationResult)
    assert [p.name for p in params] == [f.name for f in declared]
    for param, field in zip(params, declared, strict=True):
        assert param.default == (
            inspect.Parameter.empty if field.default is MISSING else field.default
        ), field.name
    values = {
        "status": AttestationStatus.PASSED,
        "mode": AttestationMode.TPM,
        "host_id": "h",
        "verified_at": NOW,
        "verdicts": (),
        "failures": (CheckFailure("c", AttestationStatus.TPM_ERROR, "E", "r"),),
        "host_key": {"kty": "EC"},
        "baseline": None,
        "activation": None,
        "warnings": ("w",),
        "summary": None,
    }
    result = AttestationResult(**values)
    assert vars(result) == values
    assert result == AttestationResult(**values)
    assert result != replace(result, host_id="other")
    assert replace(result, host_id="other").warnings == ("w",)
    with pytest.raises(FrozenInstanceError):
        result.host_id = "other"  # type: ignore[misc]
