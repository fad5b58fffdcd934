"""The admin API over real HTTPS: every change by role, bad input, duplicates, locked policies.

Each row of the table is one administrative change. For every row: the
reviewer is refused (403) and nothing is stored; each bad variant gets its 4xx
and nothing is stored; then the administrator's request succeeds and stores
exactly one change with exactly one audit record (kind admin, actor admin) that
holds no token. "Nothing is stored" is read from the store file itself: its
revision moves on every write.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from guardfab.formats import jose, keyfiles
from guardfab.formats.encoding import b64url_encode
from hgs_harness import RunningHgs
from test_attestation_fixtures import GOLDEN, SoftHost, ek_certificate, make_ca
from test_hgs_admin_fixtures import (
    UPDATED,
    Probe,
    ek_public_b64,
    module_hgs,
    new_public_key_pem,
    pem,
    probe,
    tokens_of,
    unchanged,
)

__all__ = ["module_hgs", "probe"]  # fixtures used by name below
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hgs-admin-api")]

V1 = "/admin/v1"
VENDOR = make_ca("admin-api vendor root")
INTERMEDIATE = make_ca("admin-api vendor intermediate")
GROUP_CA = make_ca("admin-api host CA")
LEAF = VENDOR.issue(ec.generate_private_key(ec.SECP256R1()).public_key())
HOST_KEY = new_public_key_pem()
KID = hashlib.sha256(b"no such key").digest()[:32]
UNKNOWN_KID = b64url_encode(KID)
PRIVATE_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode()
)


def soft(index: int) -> SoftHost:
    return SoftHost(f"soft-{index}", ek_kind="p256-sha256-128", index=index)


def ek(index: int) -> str:
    return ek_public_b64(soft(index))


def ek_cert(index: int) -> str:
    return b64url_encode(ek_certificate(soft(index), VENDOR))


def ca_id(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Call = tuple[str, str, dict[str, Any] | None]


@dataclass(frozen=True)
class Row:
    """One administrative change: setup, the request, its status, and bad variants."""

    request: Call
    status: int
    bad: tuple[tuple[Call, int], ...] = ()
    setup: tuple[Call, ...] = field(default_factory=tuple)


def key_id_of(public_pem: str) -> str:
    return jose.thumbprint(keyfiles.load_public_key(public_pem.encode(), what="key"))


KEY_REVOKE, KEY_REMOVE, KEY_DUP = new_public_key_pem(), new_public_key_pem(), new_public_key_pem()

ROWS: dict[str, Row] = {
    "set-mode": Row(
        ("PUT", "/mode", {"modes": ["tpm", "host-key"]}),
        200,
        bad=(
            (("PUT", "/mode", {"modes": []}), 422),
            (("PUT", "/mode", {"modes": ["bogus"]}), 422),
            (("PUT", "/mode", {"modes": ["tpm"], "extra": 1}), 422),
        ),
    ),
    "settings": Row(
        ("PATCH", "/settings", {"admit_certified_eks": True}),
        200,
        bad=(
            (("PATCH", "/settings", {"ci_policy_pcr": 24}), 422),
            (("PATCH", "/settings", {"admit_certified_eks": "maybe"}), 422),
        ),
    ),
    "add-tpm-host-by-ek-public": Row(
        ("POST", "/tpm-hosts", {"name": "h-ekpub", "ek_public": ek(3)}),
        201,
        bad=(
            (("POST", "/tpm-hosts", {"name": "h-x"}), 400),
            (("POST", "/tpm-hosts", {"name": "h-x", "ek_public": "AAAA"}), 400),
            (("POST", "/tpm-hosts", {"name": "bad name", "ek_public": ek(3)}), 422),
            (
                ("POST", "/tpm-hosts", {"name": "h-x", "ek_public": "-----BEGIN PUBLIC KEY-----"}),
                400,
            ),
        ),
    ),
    "add-tpm-host-by-ek-certificate": Row(
        ("POST", "/tpm-hosts", {"name": "h-ekcert", "ek_certificate": ek_cert(4)}),
        201,
        bad=(
            (
                (
                    "POST",
                    "/tpm-hosts",
                    {"name": "h-y", "ek_public": ek(5), "ek_certificate": ek_cert(4)},
                ),
                400,
            ),
            (("POST", "/tpm-hosts", {"name": "h-y", "ek_certificate": "AAAA"}), 400),
        ),
    ),
    "remove-tpm-host": Row(
        ("DELETE", "/tpm-hosts/h-remove", None),
        200,
        bad=(
            (("DELETE", "/tpm-hosts/h-nope", None), 404),
            (("DELETE", "/tpm-hosts/bad%20name", None), 422),
        ),
        setup=(("POST", "/tpm-hosts", {"name": "h-remove", "ek_public": ek(6)}),),
    ),
    "add-ek-root": Row(
        ("POST", "/ek-cas", {"certificate": pem(VENDOR.cert)}),
        201,
        bad=(
            (("POST", "/ek-cas", {"certificate": pem(LEAF)}), 400),
            (("POST", "/ek-cas", {"certificate": "not a certificate"}), 400),
            (("POST", "/ek-cas", {"certificate": pem(VENDOR.cert), "kind": "leaf"}), 422),
        ),
    ),
    "remove-ek-intermediate": Row(
        ("DELETE", f"/ek-cas/{ca_id(INTERMEDIATE.cert)}", None),
        200,
        bad=(
            (("DELETE", f"/ek-cas/{'0' * 64}", None), 404),
            (("DELETE", "/ek-cas/xyz", None), 422),
        ),
        setup=(
            ("POST", "/ek-cas", {"certificate": pem(INTERMEDIATE.cert), "kind": "intermediate"}),
        ),
    ),
    "add-host-key": Row(
        ("POST", "/host-keys", {"name": "hk-1", "public_key": HOST_KEY}),
        201,
        bad=(
            (("POST", "/host-keys", {"name": "hk-1", "public_key": PRIVATE_PEM}), 400),
            (("POST", "/host-keys", {"name": "hk-1", "public_key": "{}"}), 400),
        ),
    ),
    "revoke-host-key": Row(
        ("POST", f"/host-keys/{key_id_of(KEY_REVOKE)}/revoke", None),
        200,
        bad=((("POST", f"/host-keys/{UNKNOWN_KID[:43]}/revoke", None), 404),),
        setup=(("POST", "/host-keys", {"name": "hk-2", "public_key": KEY_REVOKE}),),
    ),
    "remove-host-key": Row(
        ("DELETE", f"/host-keys/{key_id_of(KEY_REMOVE)}", None),
        200,
        bad=((("DELETE", f"/host-keys/{UNKNOWN_KID[:43]}", None), 404),),
        setup=(("POST", "/host-keys", {"name": "hk-3", "public_key": KEY_REMOVE}),),
    ),
    "add-host-group": Row(
        ("POST", "/host-groups", {"name": "g-1"}),
        201,
        bad=((("POST", "/host-groups", {"name": ""}), 422),),
    ),
    "remove-host-group": Row(
        ("DELETE", "/host-groups/g-2", None),
        200,
        bad=((("DELETE", "/host-groups/g-nope", None), 404),),
        setup=(("POST", "/host-groups", {"name": "g-2"}),),
    ),
    "add-group-ca": Row(
        ("POST", "/group-cas", {"certificate": pem(GROUP_CA.cert)}),
        201,
        bad=((("POST", "/group-cas", {"certificate": pem(LEAF)}), 400),),
    ),
    "add-ci-policy-by-digest": Row(
        ("POST", "/ci-policies", {"name": "ci-1", "digest": sha(b"policy 1")}),
        201,
        bad=(
            (("POST", "/ci-policies", {"name": "ci-x"}), 400),
            (("POST", "/ci-policies", {"name": "ci-x", "digest": "zz"}), 422),
            (("POST", "/ci-policies", {"name": "ci-x", "digest": sha(b"x"), "content": "AA"}), 400),
        ),
    ),
    "add-ci-policy-by-content": Row(
        ("POST", "/ci-policies", {"name": "ci-2", "content": b64url_encode(b"policy 2")}),
        201,
    ),
    "remove-ci-policy": Row(
        ("DELETE", "/ci-policies/ci-3", None),
        200,
        bad=((("DELETE", "/ci-policies/ci-nope", None), 404),),
        setup=(("POST", "/ci-policies", {"name": "ci-3", "digest": sha(b"policy 3")}),),
    ),
    "add-baseline": Row(
        ("POST", "/baselines", {"name": "golden", "event_log": b64url_encode(GOLDEN.log_bytes())}),
        201,
        bad=(
            (("POST", "/baselines", {"name": "b-x", "event_log": "AAAA"}), 400),
            (("POST", "/baselines", {"name": "b-x", "event_log": "**"}), 422),
            (("POST", "/baselines", {"name": "b-x", "event_log": "AAAA", "pcrs": [24]}), 422),
        ),
    ),
    "remove-baseline": Row(
        ("DELETE", "/baselines/b-remove", None),
        200,
        bad=((("DELETE", "/baselines/b-nope", None), 404),),
        setup=(
            (
                "POST",
                "/baselines",
                {"name": "b-remove", "event_log": b64url_encode(UPDATED.log_bytes())},
            ),
        ),
    ),
    "enable-policy": Row(
        ("PUT", "/policies/Hgs_DumpsDisabled", {"state": "enabled"}),
        200,
        bad=(
            (("PUT", "/policies/Hgs_Nope", {"state": "enabled"}), 404),
            (("PUT", "/policies/Hgs_SecureBootEnabled", {"state": "disabled"}), 409),
            (("PUT", "/policies/Hgs_DumpsDisabled", {"state": "off"}), 422),
        ),
    ),
    "revoke-host": Row(
        ("POST", "/revocations", {"host_id": "h-revoke", "reason": "stolen"}),
        201,
        bad=((("POST", "/revocations", {"host_id": "h-unknown"}), 404),),
        setup=(("POST", "/tpm-hosts", {"name": "h-revoke", "ek_public": ek(7)}),),
    ),
    "unrevoke-host": Row(
        ("DELETE", "/revocations/h-unrevoke", None),
        200,
        bad=((("DELETE", "/revocations/h-unknown", None), 404),),
        setup=(
            ("POST", "/tpm-hosts", {"name": "h-unrevoke", "ek_public": ek(8)}),
            ("POST", "/revocations", {"host_id": "h-unrevoke"}),
        ),
    ),
}


def send(hgs: RunningHgs, role: str | None, call: Call) -> Any:
    method, path, body = call
    with hgs.client(role) as client:
        return client.request(method, V1 + path, json=body)


@pytest.mark.parametrize("name", list(ROWS))
def test_each_change_is_admin_only_validated_and_audited(
    module_hgs: RunningHgs, probe: Probe, name: str
) -> None:
    row = ROWS[name]
    for call in row.setup:
        assert send(module_hgs, "admin", call).status_code in (200, 201), call
    with unchanged(probe):
        refused = send(module_hgs, "reviewer", row.request)
    assert refused.status_code == 403, refused.text
    for call, status in row.bad:
        with unchanged(probe):
            response = send(module_hgs, "admin", call)
        assert response.status_code == status, (call, response.text)
        assert all(token not in response.text for token in tokens_of(module_hgs))
    before = probe.audit_seq()
    response = send(module_hgs, "admin", row.request)
    assert response.status_code == row.status, response.text
    assert probe.audit_seq() == before + 1
    record = probe.last_audit()
    assert (record["kind"], record["actor"], record["outcome"]) == ("admin", "admin", "success")
    assert all(token not in str(record) for token in tokens_of(module_hgs))


DUPLICATES = {
    "tpm host name": (
        "/tpm-hosts",
        {"name": "dup-h", "ek_public": ek(10)},
        {"name": "dup-h", "ek_public": ek(11)},
    ),
    "tpm host EK": (
        "/tpm-hosts",
        {"name": "dup-e1", "ek_public": ek(12)},
        {"name": "dup-e2", "ek_certificate": ek_cert(12)},
    ),
    "host key": (
        "/host-keys",
        {"name": "dup-k1", "public_key": KEY_DUP},
        {"name": "dup-k2", "public_key": KEY_DUP},
    ),
    "CI policy digest": (
        "/ci-policies",
        {"name": "dup-c1", "digest": sha(b"dup")},
        {"name": "dup-c2", "digest": sha(b"dup")},
    ),
    "CI policy name": (
        "/ci-policies",
        {"name": "dup-c3", "digest": sha(b"dup 3")},
        {"name": "dup-c3", "digest": sha(b"dup 4")},
    ),
    "baseline": (
        "/baselines",
        {"name": "dup-b", "event_log": b64url_encode(GOLDEN.log_bytes())},
        {"name": "dup-b", "event_log": b64url_encode(UPDATED.log_bytes())},
    ),
    "host group": ("/host-groups", {"name": "dup-g"}, {"name": "dup-g"}),
    "EK CA": (
        "/ek-cas",
        {"certificate": pem(make_ca("dup vendor").cert)},
        {"certificate": pem(make_ca("dup vendor").cert), "kind": "intermediate"},
    ),
}


@pytest.mark.parametrize("name", list(DUPLICATES))
def test_a_duplicate_registration_is_409_and_changes_nothing(
    module_hgs: RunningHgs, probe: Probe, name: str
) -> None:
    path, first, second = DUPLICATES[name]
    created = send(module_hgs, "admin", ("POST", path, first))
    assert created.status_code == 201, created.text
    with unchanged(probe):
        again = send(module_hgs, "admin", ("POST", path, second))
    assert again.status_code == 409, again.text
    assert again.json()["error"]["type"] == "AlreadyExistsError"


def test_a_locked_policy_can_never_be_disabled_or_unlocked(
    module_hgs: RunningHgs, probe: Probe
) -> None:
    locked = send(module_hgs, "admin", ("PUT", "/policies/Hgs_FullBoot", {"state": "locked"}))
    assert locked.status_code == 200
    for state in ("disabled", "enabled"):
        with unchanged(probe):
            refused = send(module_hgs, "admin", ("PUT", "/policies/Hgs_FullBoot", {"state": state}))
        assert refused.status_code == 409
        assert refused.json()["error"]["type"] == "LockedPolicyError"
    policies = send(module_hgs, "reviewer", ("GET", "/policies", None)).json()
    assert {p["name"]: p["state"] for p in policies}["Hgs_FullBoot"] == "locked"


READS = (
    "/mode",
    "/settings",
    "/tpm-hosts",
    "/host-keys",
    "/host-groups",
    "/ek-cas",
    "/group-cas",
    "/ci-policies",
    "/baselines",
    "/candidates",
    "/policies",
    "/hosts",
    "/revocations",
    "/audit",
    "/audit/verify",
)


@pytest.mark.parametrize("path", READS)
def test_reads_need_a_token_and_admit_the_reviewer(
    module_hgs: RunningHgs, probe: Probe, path: str
) -> None:
    with unchanged(probe):
        assert send(module_hgs, None, ("GET", path, None)).status_code == 403
        assert send(module_hgs, "reviewer", ("GET", path, None)).status_code == 200


def test_switching_to_admin_group_warns_and_says_certificates_stay_valid(
    module_hgs: RunningHgs,
) -> None:
    answer = send(module_hgs, "admin", ("PUT", "/mode", {"modes": ["tpm", "admin-group"]})).json()
    assert any("deprecated" in warning for warning in answer["warnings"])
    assert "stay valid until they expire" in answer["note"]
    shown = send(module_hgs, "reviewer", ("GET", "/mode", None)).json()
    assert shown["modes"] == ["admin-group", "tpm"]
    send(module_hgs, "admin", ("PUT", "/mode", {"modes": ["tpm"]}))


def test_the_store_file_never_holds_a_token(module_hgs: RunningHgs, probe: Probe) -> None:
    send(module_hgs, "admin", ("POST", "/host-groups", {"name": "token-check"}))
    data = (module_hgs.directory / "state.db").read_bytes()
    wal = module_hgs.directory / "state.db-wal"
    data += wal.read_bytes() if wal.exists() else b""
    assert probe.audit_seq() > 0
    assert all(token.encode() not in data for token in tokens_of(module_hgs))
