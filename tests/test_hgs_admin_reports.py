"""Explain, what-if, candidate baselines, hosts and the audit log, over real HTTPS.

The HGS trusts the golden boot (baseline ``golden-2026``, the CI policy). Two
hosts have a last attestation on record, made by the real engine from soft-host
evidence: ``host-a`` booted the golden boot and passed; ``host-b`` booted after
a secure boot db update and failed Hgs_PcrBaseline and Hgs_SecureBootSettings.
A third, ``hk-host``, attested in host-key mode (no boot on record).

``host-a``'s record is stored as attestations now store it (its boot under
``hosts/boot/host-a``, named by digest); ``host-b``'s as the previous version
stored it (the events inline), which an HGS upgraded in place still reads.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from guardfab.formats.encoding import b64url_encode
from guardfab.hgs import registry as reg
from hgs_harness import RunningHgs
from test_attestation_fixtures import CI_POLICY, GOLDEN, SoftHost
from test_hgs_admin_fixtures import (
    UPDATED,
    Probe,
    attested,
    ek_public_b64,
    module_hgs,
    probe,
    unchanged,
)

__all__ = ["module_hgs", "probe"]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hgs-admin-reports")]

V1 = "/admin/v1"
HOST_A = SoftHost("host-a", ek_kind="p256-sha256-128", index=20)
HOST_B = SoftHost("host-b", ek_kind="p256-sha256-128", index=21, boot=UPDATED)


def call(
    hgs: RunningHgs, role: str | None, method: str, path: str, body: Any = None
) -> httpx.Response:
    with hgs.client(role) as client:
        return client.request(method, V1 + path, json=body)


@pytest.fixture(scope="module", autouse=True)
def fleet(module_hgs: RunningHgs, probe: Probe) -> Iterator[None]:
    """The trust and the hosts' last attestations described above."""
    setup = [
        ("/baselines", {"name": "golden-2026", "event_log": b64url_encode(GOLDEN.log_bytes())}),
        ("/ci-policies", {"name": CI_POLICY.name, "digest": CI_POLICY.digest.hex()}),
        ("/tpm-hosts", {"name": "host-a", "ek_public": ek_public_b64(HOST_A)}),
        ("/tpm-hosts", {"name": "host-b", "ek_public": ek_public_b64(HOST_B)}),
    ]
    for path, body in setup:
        assert call(module_hgs, "admin", "POST", path, body).status_code == 201
    probe.put_last(attested(HOST_A))
    probe.put_last_inline(attested(HOST_B))
    host_key_result = {
        "status": "Passed",
        "mode": "host-key",
        "host_id": "hk-host",
        "verified_at": "2026-06-01T12:00:00+00:00",
        "failed_policies": [],
    }
    probe.store.put(reg.LAST + "hk-host", reg.encode({"result": host_key_result, "summary": None}))
    return


def test_the_fixture_hosts_are_what_the_module_says() -> None:
    assert attested(HOST_A).passed
    assert set(attested(HOST_B).failed_policies) == {"Hgs_PcrBaseline", "Hgs_SecureBootSettings"}


def test_hosts_show_registration_and_last_status(module_hgs: RunningHgs) -> None:
    rows = {r["host_id"]: r for r in call(module_hgs, "reviewer", "GET", "/hosts").json()}
    assert rows["host-a"]["last"]["status"] == "Passed"
    assert rows["host-a"]["registrations"][0]["kind"] == "tpm"
    assert rows["host-b"]["last"]["status"] == "InsecureHostConfiguration"
    assert rows["host-b"]["last"]["verified_at"].startswith("2026-06-01")
    assert rows["hk-host"]["registrations"] == []


def test_explain_names_every_verdict_and_the_differing_events(module_hgs: RunningHgs) -> None:
    report = call(module_hgs, "reviewer", "GET", "/hosts/host-b/explain").json()
    diff = report["baseline_now"]
    assert diff["baseline"] == "golden-2026"
    assert not diff["matched"]
    assert diff["pcr_mismatches"] == [7]
    changed = [d for d in diff["differences"] if d["kind"] == "changed"]
    assert changed
    assert changed[0]["type"] == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    assert "db" in changed[0]["host"]["summary"]
    assert report["status_now"]["status"] == "InsecureHostConfiguration"
    text = "\n".join(report["explanation"])
    assert "closest baseline 'golden-2026'" in text
    assert "PCR 7 changed EV_EFI_VARIABLE_DRIVER_CONFIG" in text
    assert len(report["recorded"]["verdicts"]) == 10
    assert "! Hgs_PcrBaseline" in text
    assert "! Hgs_SecureBootSettings" in text


def test_explain_reads_a_boot_stored_apart_from_the_record(module_hgs: RunningHgs) -> None:
    report = call(module_hgs, "reviewer", "GET", "/hosts/host-a/explain").json()
    assert report["baseline_now"]["baseline"] == "golden-2026"
    assert report["baseline_now"]["matched"]
    assert report["status_now"]["status"] == "Passed"


def test_a_record_naming_a_boot_the_store_lacks_is_named_never_used(
    module_hgs: RunningHgs, probe: Probe
) -> None:
    """A store edited by hand or an old backup: explain, candidates and what-if say which host."""
    probe.put_last(attested(SoftHost("host-c", ek_kind="p256-sha256-128", index=22)))
    probe.store.delete(reg.BOOT + "host-c")
    try:
        with unchanged(probe):
            explain = call(module_hgs, "admin", "GET", "/hosts/host-c/explain")
            body = {"host_id": "host-c", "name": "from-c"}
            filed = call(module_hgs, "admin", "POST", "/candidates", body)
            change = {"kind": "remove-baseline", "name": "golden-2026"}
            report = call(module_hgs, "reviewer", "POST", "/what-if", {"change": change}).json()
        for response in (explain, filed):
            assert response.status_code == 409, response.text
            error = response.json()["error"]
            assert error["type"] == "UnresolvedBootError"
            assert "host 'host-c'" in error["message"]
            assert "hosts/boot/host-c" in error["message"]
        skipped = {s["host_id"]: s["reason"] for s in report["skipped"]}
        assert "hosts/boot/host-c" in skipped["host-c"]
        assert report["newly_failing"] == ["host-a"]  # the others still evaluated
    finally:
        probe.store.delete(reg.LAST + "host-c")


def test_explain_of_a_host_without_a_boot_on_record(module_hgs: RunningHgs) -> None:
    report = call(module_hgs, "admin", "GET", "/hosts/hk-host/explain").json()
    assert report["baseline_now"] is None
    assert "no verified boot was recorded" in report["explanation"][-1]
    assert call(module_hgs, "admin", "GET", "/hosts/nobody/explain").status_code == 404


WHAT_IF = {
    "remove-baseline": ({"kind": "remove-baseline", "name": "golden-2026"}, ["host-a"], []),
    "add-baseline": (
        {"kind": "add-baseline", "name": "update", "event_log": b64url_encode(UPDATED.log_bytes())},
        [],
        ["host-b"],
    ),
    "revoke-host": ({"kind": "revoke-host", "host_id": "host-a"}, ["host-a"], []),
    "remove-ci-policy": ({"kind": "remove-ci-policy", "name": CI_POLICY.name}, ["host-a"], []),
    "disable-policy": (
        {"kind": "set-policy-state", "policy": "Hgs_SecureBootSettings", "state": "disabled"},
        [],
        [],
    ),
    "enable-unevaluable-policy": (
        {"kind": "set-policy-state", "policy": "Hgs_HibernationDisabled", "state": "enabled"},
        ["host-a"],
        [],
    ),
}


@pytest.mark.parametrize("name", list(WHAT_IF))
def test_what_if_lists_the_hosts_that_flip_and_changes_nothing(
    module_hgs: RunningHgs, probe: Probe, name: str
) -> None:
    change, failing, passing = WHAT_IF[name]
    with unchanged(probe):
        report = call(module_hgs, "reviewer", "POST", "/what-if", {"change": change}).json()
    assert report["newly_failing"] == failing
    assert report["newly_passing"] == passing
    assert {h["host_id"] for h in report["hosts"]} == {"host-a", "host-b"}
    assert report["skipped"] == [{"host_id": "hk-host", "reason": "no verified TPM boot on record"}]


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"kind": "set-policy-state", "policy": "Hgs_PcrBaseline", "state": "disabled"}, 409),
        ({"kind": "set-policy-state", "policy": "Hgs_Nope", "state": "disabled"}, 404),
        ({"kind": "remove-baseline", "name": "nope"}, 404),
        ({"kind": "remove-ci-policy", "name": "nope"}, 404),
        ({"kind": "add-ci-policy", "name": "again", "digest": CI_POLICY.digest.hex()}, 409),
        ({"kind": "add-baseline", "name": "golden-2026", "event_log": "AAAA"}, 400),
        ({"kind": "explode"}, 422),
    ],
)
def test_what_if_refuses_a_change_that_could_not_be_made(
    module_hgs: RunningHgs, probe: Probe, change: dict[str, Any], status: int
) -> None:
    with unchanged(probe):
        response = call(module_hgs, "admin", "POST", "/what-if", {"change": change})
    assert response.status_code == status, response.text


def test_a_verified_boot_is_filed_then_approved_in_one_command(
    module_hgs: RunningHgs, probe: Probe
) -> None:
    body = {"host_id": "host-b", "name": "golden-2026-update", "reason": "db update"}
    with unchanged(probe):
        assert call(module_hgs, "reviewer", "POST", "/candidates", body).status_code == 403
        missing = call(module_hgs, "admin", "POST", "/candidates", {**body, "host_id": "nobody"})
        no_boot = call(module_hgs, "admin", "POST", "/candidates", {**body, "host_id": "hk-host"})
    assert (missing.status_code, no_boot.status_code) == (404, 409)
    filed = call(module_hgs, "admin", "POST", "/candidates", body)
    assert filed.status_code == 201, filed.text
    cid = filed.json()["id"]
    with unchanged(probe):
        assert call(module_hgs, "admin", "POST", "/candidates", body).status_code == 409
        assert (
            call(module_hgs, "reviewer", "POST", f"/candidates/{cid}/approve", {}).status_code
            == 403
        )
    pending = call(module_hgs, "reviewer", "GET", "/candidates?state=pending").json()
    assert [c["id"] for c in pending] == [cid]
    approved = call(module_hgs, "admin", "POST", f"/candidates/{cid}/approve", {})
    assert approved.status_code == 200, approved.text
    assert probe.last_audit()["details"]["action"] == "approve-candidate"
    report = call(module_hgs, "admin", "GET", "/hosts/host-b/explain").json()
    assert report["baseline_now"] == {
        **report["baseline_now"],
        "matched": True,
        "baseline": "golden-2026-update",
    }
    assert report["status_now"]["status"] == "Passed"
    assert report["recorded"]["status"] == "InsecureHostConfiguration"
    with unchanged(probe):
        again = call(module_hgs, "admin", "POST", f"/candidates/{cid}/approve", {})
    assert again.json()["error"]["type"] == "AlreadyDecidedError"
    assert call(module_hgs, "admin", "DELETE", "/baselines/golden-2026-update").status_code == 200


def test_a_candidate_is_rejected_with_a_reason(module_hgs: RunningHgs, probe: Probe) -> None:
    filed = call(module_hgs, "admin", "POST", "/candidates", {"host_id": "host-a", "name": "dup"})
    cid = filed.json()["id"]
    with unchanged(probe):
        assert call(module_hgs, "admin", "POST", f"/candidates/{cid}/reject", {}).status_code == 422
    rejected = call(module_hgs, "admin", "POST", f"/candidates/{cid}/reject", {"reason": "same"})
    assert rejected.json()["state"] == "rejected"
    with unchanged(probe):
        assert (
            call(module_hgs, "admin", "POST", f"/candidates/{cid}/approve", {}).status_code == 409
        )


def test_the_audit_log_pages_and_verifies(module_hgs: RunningHgs, probe: Probe) -> None:
    first = call(module_hgs, "reviewer", "GET", "/audit?limit=2").json()
    assert [r["seq"] for r in first["records"]] == [1, 2]
    assert first["next_since"] == 2
    rest = call(module_hgs, "reviewer", "GET", "/audit?since=2&limit=1000&kind=admin").json()
    assert rest["records"][0]["seq"] == 3
    assert rest["next_since"] is None
    verified = call(module_hgs, "reviewer", "GET", "/audit/verify").json()
    assert verified["ok"]
    assert verified["records"] == probe.audit_seq()
    assert verified["kinds"] == {"admin": probe.audit_seq()}


def test_audit_verify_finds_a_record_edited_in_the_sqlite_file(running_hgs: RunningHgs) -> None:
    for name in ("g-1", "g-2", "g-3"):
        assert call(running_hgs, "admin", "POST", "/host-groups", {"name": name}).status_code == 201
    assert call(running_hgs, "admin", "GET", "/audit/verify").json()["ok"]
    with sqlite3.connect(running_hgs.directory / "state.db") as db:
        key = "audit/" + "2".zfill(20)
        (value,) = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        db.execute("UPDATE kv SET value = ? WHERE key = ?", (value.replace(b"g-2", b"g-9"), key))
    report = call(running_hgs, "reviewer", "GET", "/audit/verify").json()
    assert not report["ok"]
    assert report["seq"] == 2
    assert "audit record 2" in report["message"]
