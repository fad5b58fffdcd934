"""The lean path for challenge, attest and release answers exactly as FastAPI would.

Each request of the table goes to two apps over the same kind of state: one
with the lean routes (what the HGS serves), one leaving everything to FastAPI.
Status, content type and body must be the same -- for refusals by the service
(answered on the lean path by the app's own handlers), and for malformed
requests (handed on to FastAPI, body replayed). Success over real HTTPS is
what the attestation and key release end-to-end tests exercise, on this path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from guardfab.hgs.app import create_app
from guardfab.hgs.kps_api import RELEASE_PATH
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.hgs.web import MAX_BODY_BYTES
from guardfab.store.sqlite import SqliteStore

CHALLENGE = "/attestation/v1/challenge"
ATTEST = "/attestation/v1/attest"
JSON = {"content-type": "application/json"}


def _client(directory: Path, *, lean: bool) -> Iterator[TestClient]:
    store = SqliteStore(directory / "store.db")
    app = create_app(HgsService(HgsState(directory), store), lean_routes=lean)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client
    finally:
        store.close()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lean") / "hgs"
    init_state(directory, HgsConfig(service_name="lean-hgs"))
    return directory


@pytest.fixture(scope="module")
def lean(state_dir: Path) -> Iterator[TestClient]:
    yield from _client(state_dir, lean=True)


@pytest.fixture(scope="module")
def plain(state_dir: Path) -> Iterator[TestClient]:
    yield from _client(state_dir, lean=False)


def _answer(client: TestClient, path: str, body: bytes, headers: dict[str, str]) -> Any:
    response = client.post(path, content=body, headers=headers)
    content: Any = response.json() if response.content else None
    return response.status_code, response.headers.get("content-type"), content


def _nonce(client: TestClient) -> str:
    token: str = client.post(CHALLENGE).json()["nonce"]
    return token


# (path, body, headers): refusals the service makes, and requests FastAPI refuses.
CASES: dict[str, tuple[str, bytes, dict[str, str]]] = {
    "forged nonce": (ATTEST, b'{"nonce":"AAAA","evidence":{}}', JSON),
    "evidence of no mode": (ATTEST, b'{"nonce":"%NONCE%","evidence":{"mode":"x"}}', JSON),
    "unknown field": (ATTEST, b'{"nonce":"n","evidence":{},"extra":1}', JSON),
    "nonce not a string": (ATTEST, b'{"nonce":5,"evidence":"eyJ.secret.sig"}', JSON),
    "missing evidence": (ATTEST, b'{"nonce":"n"}', JSON),
    "not JSON": (ATTEST, b'{"nonce": "n", "evidence": {', JSON),
    "not UTF-8": (ATTEST, b'{"nonce":"\xff\xfe","evidence":{}}', JSON),
    "a JSON list": (ATTEST, b"[1, 2]", JSON),
    "empty body": (ATTEST, b"", JSON),
    "text/plain": (ATTEST, b'{"nonce":"n","evidence":{}}', {"content-type": "text/plain"}),
    "no content type": (ATTEST, b'{"nonce":"n","evidence":{}}', {}),
    "json with charset": (
        ATTEST,
        b'{"nonce":"AAAA","evidence":{}}',
        {"content-type": "Application/JSON; charset=utf-8"},
    ),
    "forged certificate": (
        RELEASE_PATH,
        b'{"health_certificate":"a.b.c","key_protector":"x"}',
        JSON,
    ),
    "KP too long": (
        RELEASE_PATH,
        json.dumps({"health_certificate": "a.b.c", "key_protector": "x" * 500_000}).encode(),
        JSON,
    ),
    "release unknown field": (
        RELEASE_PATH,
        b'{"health_certificate":"a","key_protector":"b","kp":"c"}',
        JSON,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusals_read_the_same_on_both_paths(
    lean: TestClient, plain: TestClient, case: str
) -> None:
    path, body, headers = CASES[case]
    answers = []
    for client in (lean, plain):
        sent = body.replace(b"%NONCE%", _nonce(client).encode())
        answers.append(_answer(client, path, sent, headers))
    assert answers[0] == answers[1]
    assert 400 <= answers[0][0] < 500
    assert b"secret" not in json.dumps(answers[0][2]).encode()


def test_the_challenge_answers_alike(lean: TestClient, plain: TestClient) -> None:
    for client in (lean, plain):
        for body in (b"", b'{"ignored": true}'):
            status, kind, content = _answer(client, CHALLENGE, body, JSON)
            assert (status, kind) == (200, "application/json")
            assert set(content) == {"nonce", "expires_at"}


def test_an_oversized_body_is_413_before_either_path(lean: TestClient) -> None:
    response = lean.post(ATTEST, content=b"x" * (MAX_BODY_BYTES + 1), headers=JSON)
    assert response.status_code == 413


@pytest.mark.parametrize("path", [ATTEST, RELEASE_PATH])
def test_a_chunked_body_over_the_limit_is_413(
    lean: TestClient, plain: TestClient, path: str
) -> None:
    """No Content-Length: the limit is found while reading, and named with its own 413.

    (FastAPI's own path turns any error while reading a body into a generic 400: the
    one place the two differ, and the lean path's answer is the body limit's own.)
    """
    chunk = b" " * (1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // len(chunk) + 1):
            yield chunk

    response = lean.post(path, content=chunks(), headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "request body too large"
    assert plain.post(path, content=chunks(), headers=JSON).status_code in (400, 413)


def test_other_methods_go_to_fastapi(lean: TestClient) -> None:
    assert lean.get(ATTEST).status_code == 405
    assert lean.get(RELEASE_PATH).status_code == 405


def test_an_unexpected_error_is_a_bare_500(
    lean: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: HgsService, *_args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(HgsService, "attest_batched", broken)
    body = json.dumps({"nonce": "n", "evidence": {}}).encode()
    response = lean.post(ATTEST, content=body, headers=JSON)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "InternalError"
    assert "secret" not in response.text


def test_the_openapi_document_still_describes_the_lean_routes(lean: TestClient) -> None:
    spec = lean.get("/openapi.json").json()
    attest = spec["paths"][ATTEST]["post"]
    release = spec["paths"][RELEASE_PATH]["post"]
    assert "requestBody" in attest
    assert "requestBody" in release
    schemas = spec["components"]["schemas"]
    assert schemas["ReleaseRequest"]["properties"]["key_protector"]["maxLength"] > 0
    assert schemas["ReleaseRequest"]["additionalProperties"] is False
    assert set(schemas["ReleaseResponse"]["properties"]) == {
        "release",
        "egress_key_protector",
        "kp_id",
        "generation",
        "egress_generation",
        "kps_guardian",
    }
    challenge = spec["paths"][CHALLENGE]["post"]["responses"]["200"]
    assert "ChallengeResponse" in json.dumps(challenge)
