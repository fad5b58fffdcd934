"""The release route's own work, in process: the answer's bytes and the key ring it re-keys with.

A real HGS state directory, store and app (no TLS: what is checked here is what
the route writes, which the HTTPS suites in test_kps_e2e.py then read).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey

from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.formats.health_certificate import HealthCertificate, issue_health_certificate
from guardfab.formats.key_protector import create_key_protector, load_key_protector
from guardfab.hgs.app import create_app
from guardfab.hgs.kps import KpsService
from guardfab.hgs.kps_api import RELEASE_PATH, ReleaseResponse, release_body
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.keyprotection import unwrap_release
from guardfab.store.sqlite import SqliteStore
from guardfab.tenant.guardians import new_guardian_keys


@dataclass
class Hgs:
    client: TestClient
    kps: KpsService
    certificate: str
    host_key: ECKey


@pytest.fixture(scope="module")
def hgs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hgs]:
    directory = tmp_path_factory.mktemp("kps-path") / "hgs"
    init_state(directory, HgsConfig(service_name="kps-path"))
    state = HgsState(directory)
    store = SqliteStore(state.store_path())
    app = create_app(HgsService(state, store))
    host_key = ECKey.generate_key("P-256")
    issued = int(time.time()) - 60
    claims = HealthCertificate(
        issuer="kps-path",
        host_id="host-a",
        mode="host-key",
        host_key=jose.public_jwk(host_key),
        issued_at=issued,
        expires_at=issued + 3600,
    )
    certificate = issue_health_certificate(claims, state.attestation_signing_key())
    try:
        with TestClient(app) as client:
            yield Hgs(client, app.state.kps, certificate, host_key)
    finally:
        store.close()


def _kp(hgs: Hgs) -> bytes:
    owner = new_guardian_keys("owner", KeyAlgorithm.EC_P256)
    data, _ = create_key_protector(owner, [hgs.kps.primary_document()])
    return data


def _release(hgs: Hgs, kp: bytes) -> Any:
    body = {"health_certificate": hgs.certificate, "key_protector": b64url_encode(kp)}
    return hgs.client.post(RELEASE_PATH, json=body)


def test_a_release_answer_is_byte_for_byte_what_jsonresponse_would_send(hgs: Hgs) -> None:
    kp = _kp(hgs)
    response = _release(hgs, kp)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = json.loads(response.content)
    assert response.content == JSONResponse(answer).body
    assert set(answer) == set(ReleaseResponse.model_fields)  # what the OpenAPI document says
    keys = unwrap_release(answer, hgs.host_key, ingress=load_key_protector(kp))
    assert keys.egress_kp == b64url_decode(answer["egress_key_protector"], what="test")


@pytest.mark.parametrize(
    "answer",
    [
        {"a": "base64url-_09AZaz", "n": 2**53 - 1, "t": True, "none": None},
        {'quote"and\\slash': "tab\tnewline\ncontrol\x01"},
        {},
    ],
)
def test_release_body_matches_jsonresponse_for_ascii(answer: dict[str, Any]) -> None:
    assert release_body(answer) == JSONResponse(answer).body


def test_release_body_escapes_non_ascii_rather_than_failing() -> None:
    """Not what a release answers, but never a crash or invalid JSON if it ever did."""
    answer = {"name": "h\u00f4te-\U0001f511"}
    assert json.loads(release_body(answer)) == answer


def test_the_key_ring_is_built_once_per_configuration_and_follows_rotation(hgs: Hgs) -> None:
    before = hgs.kps.config()
    assert before.release_keys() is before.release_keys()
    assert hgs.kps.config().release_keys() is before.release_keys()  # nothing changed
    hgs.kps.add_key(actor="test", make_primary=True)
    after = hgs.kps.config()
    assert after is not before
    current = after.release_keys()[0]
    assert current.guardian.key_generation == before.release_keys()[0].guardian.key_generation + 1
    assert current.signing_key_id == current.guardian.id
    kp = _kp(hgs)  # made for the document now published: the rotated generation
    response = _release(hgs, kp)
    assert response.status_code == 200, response.text
    egress = load_key_protector(b64url_decode(response.json()["egress_key_protector"], what="t"))
    assert egress.guardian(current.guardian.id).key_generation == current.guardian.key_generation
