"""The HGS over real HTTPS: challenges, signer keys, access roles, limits, OpenAPI."""

from __future__ import annotations

import ssl

import httpx
import pytest

from guardfab.formats import jose
from guardfab.hgs.nonce import check_nonce
from hgs_harness import RunningHgs

pytestmark = pytest.mark.slow


def test_challenge_is_a_valid_nonce(running_hgs: RunningHgs) -> None:
    with running_hgs.client() as client:
        first = client.post("/attestation/v1/challenge").json()
        second = client.post("/attestation/v1/challenge").json()
    assert first["nonce"] != second["nonce"]
    key = (running_hgs.directory / "keys" / "nonce.key").read_bytes()
    nonce = check_nonce(key, first["nonce"], now=first["expires_at"] - 1)
    assert nonce.expires_at == first["expires_at"]


def test_signers_publish_the_attestation_key(running_hgs: RunningHgs) -> None:
    with running_hgs.client() as client:
        keys = client.get("/attestation/v1/signers").json()["keys"]
    assert len(keys) == 1
    key = jose.import_public_jwk({k: keys[0][k] for k in ("kty", "crv", "x", "y")}, what="signer")
    assert jose.thumbprint(key) == keys[0]["kid"]


def test_tls_is_verified_against_the_hgs_ca(running_hgs: RunningHgs) -> None:
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=ssl.create_default_context()) as c:
        c.get(f"{running_hgs.url}/healthz")


@pytest.mark.parametrize(("role", "status"), [(None, 403), ("reviewer", 200), ("admin", 200)])
def test_admin_routes_need_a_token(running_hgs: RunningHgs, role: str | None, status: int) -> None:
    with running_hgs.client(role) as client:
        response = client.get("/admin/v1/whoami")
    assert response.status_code == status
    if status == 200:
        assert response.json() == {"role": role}
    else:
        assert response.json()["error"]["type"] == "MissingCredentialError"


def test_wrong_token_is_refused_without_echo(running_hgs: RunningHgs) -> None:
    with running_hgs.client() as client:
        response = client.get(
            "/admin/v1/whoami", headers={"Authorization": "Bearer guessed-token-value"}
        )
    assert response.status_code == 403
    assert "guessed-token-value" not in response.text


def test_oversized_body_is_refused(running_hgs: RunningHgs) -> None:
    with running_hgs.client() as client:
        response = client.post("/attestation/v1/challenge", content=b"x" * (13 * 1024 * 1024))
    assert response.status_code == 413


def test_openapi_document_lists_the_routes(running_hgs: RunningHgs) -> None:
    with running_hgs.client() as client:
        spec = client.get("/openapi.json").json()
    assert "/attestation/v1/challenge" in spec["paths"]
    assert "/admin/v1/whoami" in spec["paths"]


def test_malformed_body_is_named_without_echoing_it(running_hgs: RunningHgs) -> None:
    secret_looking = "eyJhbGciOiJFUzI1NiJ9.c2VjcmV0LWxvb2tpbmc.c2ln"
    with running_hgs.client() as client:
        response = client.post(
            "/attestation/v1/attest", json={"nonce": 5, "evidence": secret_looking}
        )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "InvalidRequestError"
    assert "evidence" in error["message"]
    assert secret_looking not in response.text


def test_answers_do_not_name_the_server_software(running_hgs: RunningHgs) -> None:
    with running_hgs.client() as client:
        response = client.get("/healthz", headers={"X-Forwarded-Proto": "http"})
    assert response.status_code == 200
    assert "server" not in response.headers
