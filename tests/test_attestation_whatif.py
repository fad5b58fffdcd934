"""``hgs what-if``: a proposed change, evaluated against every host's last evidence."""

from __future__ import annotations

import pytest

from guardfab.attestation.baseline import baseline_from_log
from guardfab.attestation.policies import LockedPolicyError
from guardfab.attestation.result import AttestationStatus
from guardfab.attestation.summary import HostSummary
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.attestation.trust import CiPolicy, PolicyState, TrustState
from guardfab.attestation.whatif import (
    AddBaseline,
    AddCiPolicy,
    RemoveBaseline,
    RemoveCiPolicy,
    RevokeHost,
    SetPolicyState,
    TrustChange,
    WhatIfReport,
    what_if,
)
from guardfab.errors import UsageError
from test_attestation_fixtures import CI_POLICY, NONCE, NOW, Boot, SoftHost, trust_for

#: A fleet: golden, one after a db update, one whose boot loader loads no CI policy.
FLEET = {
    "golden": Boot(),
    "db-updated": Boot(db=b"db: 2027 CA"),
    "no-ci": Boot(ci_policy=None),
}


@pytest.fixture(scope="module")
def fleet() -> tuple[TrustState, list[HostSummary]]:
    hosts = [SoftHost(name, index=i, boot=boot) for i, (name, boot) in enumerate(FLEET.items())]
    trust = trust_for(*hosts)
    summaries = []
    for host in hosts:
        result = verify_tpm_evidence(host.evidence(), trust, nonce=NONCE, now=NOW)
        assert result.summary is not None, result.explain()
        summaries.append(result.summary)
    return trust, summaries


def run(fleet: tuple[TrustState, list[HostSummary]], change: TrustChange) -> WhatIfReport:
    trust, summaries = fleet
    return what_if(change, trust, summaries, now=NOW)


def test_today_only_the_golden_host_passes(fleet: tuple[TrustState, list[HostSummary]]) -> None:
    report = run(fleet, SetPolicyState("Hgs_FullBoot", PolicyState.ENABLED))
    assert [(h.host_id, h.before.value) for h in report.hosts] == [
        ("golden", "Passed"),
        ("db-updated", "InsecureHostConfiguration"),
        ("no-ci", "InsecureHostConfiguration"),
    ]
    assert report.newly_failing == report.newly_passing == ()


CHANGES: list[tuple[str, TrustChange, tuple[str, ...], tuple[str, ...]]] = [
    (
        "approve the db update as a baseline",
        AddBaseline(baseline_from_log("fw-2027", FLEET["db-updated"].log_bytes())),
        (),
        ("db-updated",),
    ),
    ("remove the golden baseline", RemoveBaseline("golden-2026"), ("golden",), ()),
    ("disable Hgs_CiPolicy", SetPolicyState("Hgs_CiPolicy", PolicyState.DISABLED), (), ("no-ci",)),
    ("remove the only CI policy", RemoveCiPolicy(CI_POLICY.name), ("golden",), ()),
    (
        "enable Hgs_DumpsDisabled (Linux cannot show it)",
        SetPolicyState("Hgs_DumpsDisabled", PolicyState.ENABLED),
        ("golden",),
        (),
    ),
    ("revoke the golden host", RevokeHost("golden"), ("golden",), ()),
    ("add an unrelated CI policy", AddCiPolicy(CiPolicy("other", b"\x01" * 32)), (), ()),
]


@pytest.mark.parametrize(
    ("change", "failing", "passing"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES]
)
def test_what_if_lists_the_hosts_that_flip(
    fleet: tuple[TrustState, list[HostSummary]],
    change: TrustChange,
    failing: tuple[str, ...],
    passing: tuple[str, ...],
) -> None:
    report = run(fleet, change)
    assert report.newly_failing == failing
    assert report.newly_passing == passing
    body = report.to_dict()
    assert body["change"] == change.describe()
    assert [h["host_id"] for h in body["hosts"] if h["flips"]] == [*failing, *passing]
    for host_id in (*failing, *passing):
        assert f"FLIPS {host_id}" in report.explain()


def test_what_if_names_the_policies_that_would_fail(
    fleet: tuple[TrustState, list[HostSummary]],
) -> None:
    report = run(fleet, RemoveBaseline("golden-2026"))
    golden = report.hosts[0]
    assert golden.failed_before == ()
    assert set(golden.failed_after) == {"Hgs_PcrBaseline", "Hgs_SecureBootSettings"}
    revoked = run(fleet, RevokeHost("golden")).hosts[0]
    assert revoked.after is AttestationStatus.UNAUTHORIZED_HOST


def test_what_if_refuses_a_change_that_is_not_allowed(
    fleet: tuple[TrustState, list[HostSummary]],
) -> None:
    with pytest.raises(LockedPolicyError):
        run(fleet, SetPolicyState("Hgs_SecureBootEnabled", PolicyState.DISABLED))
    with pytest.raises(UsageError):
        run(fleet, RemoveBaseline("no-such-baseline"))
    with pytest.raises(UsageError):
        run(fleet, RemoveCiPolicy("no-such-policy"))
    with pytest.raises(UsageError, match="registered twice"):
        run(fleet, AddCiPolicy(CI_POLICY))


def test_what_if_works_from_stored_summaries(
    fleet: tuple[TrustState, list[HostSummary]],
) -> None:
    """The service keeps summaries as JSON; what-if gives the same answer from them."""
    trust, summaries = fleet
    stored = [HostSummary.from_dict(s.to_dict()) for s in summaries]
    change = RemoveBaseline("golden-2026")
    assert what_if(change, trust, stored, now=NOW) == what_if(change, trust, summaries, now=NOW)
