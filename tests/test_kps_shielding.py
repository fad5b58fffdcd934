"""The KPS opens a VM's shielding data (PDK) for an attested host, over real HTTPS.

A real HGS (``guardfab hgs serve``), hosts that attest for real (host-key mode),
a tenant's PDK naming the HGS's published guardian. Granted: the host's own
client (:func:`guardfab.host.keyrelease.request_shielding_secrets`) gets exactly
what the tenant sealed. Refused: every certificate attack of the release's table
and every PDK forgery (pdk_forgeries.py), each with its 4xx and reason, one
audit record and nothing else changed in the store.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from guardfab.attestation.trust import AttestationMode
from guardfab.errors import FormatError, VerificationError
from guardfab.formats.shielding_data import load_shielding_data
from guardfab.host.keyrelease import (
    HttpsKpsTransport,
    KeyReleaseRefusedError,
    open_shielding_data,
    request_shielding_secrets,
)
from guardfab.keyprotection import open_shielding_answer
from hgs_harness import RunningHgs, running_hgs
from pdk_forgeries import PDK_ATTACKS, SECRET_MARKERS, SECRETS, PdkAttack, make_pdk
from test_kps_attacks import ATTACKS, Attack, Fabric, fabric
from test_kps_fixtures import (
    Host,
    Tenant,
    admin,
    attested_host,
    enable_modes,
    kps_document,
    minted_certificate,
    openings,
    post_open,
    snapshot,
)

__all__ = ["fabric", "running_hgs"]  # fixtures, imported for pytest

pytestmark = pytest.mark.slow

#: The release's certificate attacks (the rows whose KP is genuine).
CERTIFICATE_ATTACKS = [a for a in ATTACKS if a.kp is Fabric.kp]


def _pdk(fabric: Fabric) -> bytes:
    return make_pdk(fabric.tenant.owner, kps_document(fabric.hgs))


def _clean(text: str) -> None:
    """An answer or error body carries no secret of the PDK and no key material."""
    assert not any(marker in text.encode() for marker in SECRET_MARKERS)
    for marker in ("PRIVATE KEY", '"d":'):
        assert marker not in text


def _refused_once(
    fabric: Fabric, cert: str, pdk: bytes, status: int, reason: str
) -> tuple[str, str]:
    """Post, expect the refusal, one audit record and nothing else; return (actor, subject)."""
    before, audited = snapshot(fabric.hgs), len(openings(fabric.hgs))
    response = post_open(fabric.hgs, cert, pdk)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["reason"], bool(error["message"]), bool(error["hint"])) == (reason, True, True)
    _clean(response.text)
    assert len(response.text) < 2048, "an error body describes; it does not carry"
    assert snapshot(fabric.hgs) == before, "a refused opening changed the store"
    (record,) = openings(fabric.hgs)[audited:]
    assert (record.outcome, record.details["reason"]) == ("refused", reason)
    return record.actor, record.subject


# --------------------------------------------------------------------------- granted


def test_an_attested_host_gets_exactly_the_secrets_the_tenant_sealed(fabric: Fabric) -> None:
    pdk = _pdk(fabric)
    before, audited = snapshot(fabric.hgs), len(openings(fabric.hgs))

    secrets = request_shielding_secrets(
        fabric.hgs.url, Path(fabric.hgs.ca), fabric.cert, pdk, fabric.host.encryption
    )

    assert secrets == SECRETS
    assert snapshot(fabric.hgs) == before, "an opening writes its audit record and nothing else"
    (record,) = openings(fabric.hgs)[audited:]
    header = load_shielding_data(pdk).header
    assert (record.outcome, record.actor, record.subject) == ("granted", "host-a", header.pdk_id)
    assert record.details["owner"] == fabric.tenant.owner.guardian.id
    assert record.details["pdk_name"] == "web01"
    _clean(str(record.details))


def test_the_same_pdk_opens_again_it_provisions_many_vms(fabric: Fabric) -> None:
    pdk = _pdk(fabric)
    for _ in range(2):
        response = post_open(fabric.hgs, fabric.cert, pdk)
        assert response.status_code == 200
        _clean(response.text)
        assert open_shielding_answer(response.json(), fabric.host.encryption, pdk=pdk) == SECRETS


def test_a_certificate_of_host_a_presented_by_host_b_gives_secrets_only_a_opens(
    fabric: Fabric,
) -> None:
    pdk = _pdk(fabric)
    response = post_open(fabric.hgs, fabric.cert, pdk)  # host B replays A's certificate
    assert response.status_code == 200
    with pytest.raises(VerificationError, match="no wrapping for key"):
        open_shielding_answer(response.json(), Host("host-b").encryption, pdk=pdk)
    other = _pdk(fabric)
    with pytest.raises(VerificationError, match="another shielding data file"):
        open_shielding_answer(response.json(), fabric.host.encryption, pdk=other)


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize("attack", CERTIFICATE_ATTACKS, ids=[a.name for a in CERTIFICATE_ATTACKS])
def test_a_bad_certificate_is_refused_audited_and_changes_nothing(
    fabric: Fabric, attack: Attack
) -> None:
    actor, subject = _refused_once(
        fabric, attack.cert(fabric), _pdk(fabric), attack.status, attack.reason
    )
    assert subject == "unidentified-pdk", "the PDK is not looked at before the certificate"
    if attack.reason == "host-revoked":
        assert actor == "host-revoked"


@pytest.mark.parametrize("attack", PDK_ATTACKS, ids=[a.name for a in PDK_ATTACKS])
def test_a_forged_pdk_is_refused_audited_and_changes_nothing(
    fabric: Fabric, attack: PdkAttack
) -> None:
    forged = attack.forge(_pdk(fabric), fabric.tenant.owner)
    actor, subject = _refused_once(fabric, fabric.cert, forged, attack.status, attack.reason)
    assert actor == "host-a"
    if attack.reason in ("pdk-unseal-failed", "pdk-for-another-fabric"):
        assert subject == load_shielding_data(forged).header.pdk_id
    else:
        assert subject == "unidentified-pdk"


def test_a_certificate_issued_before_the_deny_date_is_refused(fabric: Fabric) -> None:
    issued = time.time() - 600
    old = minted_certificate(fabric.hgs, fabric.host, issued=issued)
    pdk = _pdk(fabric)
    admin(fabric.hgs, "PUT", "/admin/v1/kps/deny-before", json={"deny_before": int(issued) + 60})
    try:
        actor, _ = _refused_once(fabric, old, pdk, 401, "issued-before-deny-date")
        assert actor == "host-a"
        fresh = fabric.host.attest(fabric.hgs)
        assert post_open(fabric.hgs, fresh, pdk).status_code == 200
    finally:
        admin(fabric.hgs, "DELETE", "/admin/v1/kps/deny-before")


def test_the_host_client_reports_refusals_and_sends_no_malformed_pdk(fabric: Fabric) -> None:
    pdk = _pdk(fabric)
    host = fabric.host.encryption
    with pytest.raises(KeyReleaseRefusedError) as refused:
        request_shielding_secrets(fabric.hgs.url, Path(fabric.hgs.ca), "", pdk, host)
    assert (refused.value.status, refused.value.reason) == (401, "certificate-invalid")
    assert "to open the shielding data" in str(refused.value)
    audited = len(openings(fabric.hgs))
    transport = HttpsKpsTransport(fabric.hgs.url, Path(fabric.hgs.ca))
    try:
        with pytest.raises(FormatError):
            open_shielding_data(transport, fabric.cert, b"not a pdk", host)
    finally:
        transport.close()
    assert len(openings(fabric.hgs)) == audited, "nothing was sent"


def test_malformed_requests_are_refused_without_echo(fabric: Fabric) -> None:
    path = "/keyprotection/v1/shielding-data/open"
    with fabric.hgs.client() as client:
        missing = client.post(path, json={"health_certificate": fabric.cert})
        extra = client.post(
            path, json={"health_certificate": "x", "shielding_data": "AA", "debug": True}
        )
        not_b64 = client.post(
            path, json={"health_certificate": fabric.cert, "shielding_data": "***"}
        )
    assert (missing.status_code, extra.status_code, not_b64.status_code) == (422, 422, 422)
    assert not_b64.json()["error"]["reason"] == "pdk-invalid"
    assert fabric.cert not in missing.text


def test_the_openapi_document_describes_the_route(fabric: Fabric) -> None:
    with fabric.hgs.client() as client:
        spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/keyprotection/v1/shielding-data/open"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert set(schema["required"]) == {"health_certificate", "shielding_data"}
    assert schema["additionalProperties"] is False


# --------------------------------------------------------------------------- rotation


def test_a_pdk_made_before_a_kps_key_rotation_still_opens(running_hgs: RunningHgs) -> None:
    enable_modes(running_hgs, AttestationMode.HOST_KEY)
    host, cert = attested_host(running_hgs, "host-r")
    owner = Tenant().owner
    before = make_pdk(owner, kps_document(running_hgs))
    admin(running_hgs, "POST", "/admin/v1/kps/keys", json={"make_primary": True})
    after = make_pdk(owner, kps_document(running_hgs))
    for pdk, key_generation in ((before, 0), (after, 1)):
        secrets = request_shielding_secrets(
            running_hgs.url, Path(running_hgs.ca), cert, pdk, host.encryption
        )
        assert secrets == SECRETS
        assert openings(running_hgs)[-1].details["key_generation"] == key_generation
