"""The admin client: TLS against the HGS CA, tokens from files, every failure typed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from guardfab.attestation.policies import LockedPolicyError
from guardfab.errors import (
    FormatError,
    InvalidInputError,
    NotAuthorizedError,
    TransportError,
    UsageError,
)
from guardfab.hgs.admin import AlreadyExistsError, InvalidRequestError, NotFoundError
from guardfab.hgs.client import (
    AdminClient,
    Connection,
    HgsServerError,
    HgsTlsError,
    HgsUnreachableError,
    encode_file,
    error_from_response,
    read_token,
    url_for_listen,
)
from hgs_harness import RunningHgs, free_port
from test_attestation_fixtures import make_ca
from test_hgs_admin_fixtures import module_hgs, pem, tokens_of

__all__ = ["module_hgs"]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hgs-admin-client")]


@pytest.fixture
def admin(module_hgs: RunningHgs) -> Iterator[AdminClient]:
    with AdminClient(Connection.from_state_dir(module_hgs.directory, url=module_hgs.url)) as c:
        yield c


def reviewer_connection(hgs: RunningHgs) -> Connection:
    return Connection(hgs.url, Path(hgs.ca), hgs.directory / "tokens" / "reviewer.token")


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (404, {"error": {"type": "NotFoundError", "message": "m", "hint": "h"}}, NotFoundError),
        (
            409,
            {"error": {"type": "LockedPolicyError", "message": "m", "hint": ""}},
            LockedPolicyError,
        ),
        (409, {"error": {"type": "SomethingNew", "message": "m", "hint": ""}}, UsageError),
        (403, {"error": {"type": "MissingCredentialError", "message": "m"}}, NotAuthorizedError),
        (400, {"error": {"type": "FormatError", "message": "m"}}, FormatError),
        (422, {"detail": [{"loc": ["body", "name"], "msg": "bad"}]}, InvalidRequestError),
        (418, "teapot", InvalidInputError),
    ],
)
def test_a_refusal_becomes_the_servers_typed_error(status: int, body: object, cls: type) -> None:
    error = error_from_response(status, body)
    assert isinstance(error, cls)


def test_a_schema_refusal_names_the_field_without_echoing_input() -> None:
    body = {"detail": [{"loc": ["body", "name"], "msg": "bad", "input": "s3cret"}]}
    error = error_from_response(422, body)
    assert "name: bad" in str(error)
    assert "s3cret" not in str(error)


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:8443", "https://127.0.0.1:8443"),
        ("0.0.0.0:443", "https://127.0.0.1:443"),
        ("[::]:8443", "https://[::1]:8443"),
        ("hgs.example:9000", "https://hgs.example:9000"),
    ],
)
def test_the_url_for_a_listen_address(listen: str, url: str) -> None:
    assert url_for_listen(listen) == url


def test_files_are_sent_as_text_or_base64url() -> None:
    assert encode_file(b"-----BEGIN CERTIFICATE-----\n").startswith("-----BEGIN")
    assert encode_file(b'{"kty": "EC"}') == '{"kty": "EC"}'
    assert encode_file(b"\x00\x01\xff") == "AAH_"


def test_an_empty_token_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("\n\n")
    with pytest.raises(UsageError, match="holds no token"):
        read_token(tmp_path / "t")


def test_typed_errors_come_back_from_the_server(admin: AdminClient) -> None:
    with pytest.raises(NotFoundError):
        admin.remove_baseline("nope")
    with pytest.raises(LockedPolicyError):
        admin.set_policy("Hgs_SecureBootEnabled", "disabled")
    admin.add_host_group("client-g")
    with pytest.raises(AlreadyExistsError):
        admin.add_host_group("client-g")
    with pytest.raises(InvalidRequestError, match="name"):
        admin.add_host_group("bad name")


def test_the_reviewer_token_reads_but_cannot_change(module_hgs: RunningHgs) -> None:
    with AdminClient(reviewer_connection(module_hgs)) as reviewer:
        assert reviewer.whoami() == {"role": "reviewer"}
        assert reviewer.host_groups() is not None
        with pytest.raises(NotAuthorizedError) as refused:
            reviewer.add_host_group("reviewer-g")
    assert all(token not in str(refused.value) for token in tokens_of(module_hgs))


def test_another_ca_is_a_tls_error_with_a_hint(module_hgs: RunningHgs, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_text(pem(make_ca("not the HGS CA").cert))
    conn = Connection(module_hgs.url, other, module_hgs.directory / "tokens" / "admin.token")
    with AdminClient(conn) as client, pytest.raises(HgsTlsError) as failed:
        client.whoami()
    assert "tls/ca.pem" in failed.value.hint
    assert all(token not in str(failed.value) for token in tokens_of(module_hgs))


def test_nothing_listening_is_an_unreachable_error(module_hgs: RunningHgs) -> None:
    conn = Connection(
        f"https://127.0.0.1:{free_port()}",
        Path(module_hgs.ca),
        module_hgs.directory / "tokens" / "admin.token",
    )
    with AdminClient(conn) as client, pytest.raises(HgsUnreachableError) as failed:
        client.whoami()
    assert isinstance(failed.value, TransportError)


@pytest.mark.parametrize(
    ("response", "cls"),
    [
        (httpx.Response(500, json={"error": {"type": "InternalError"}}), HgsServerError),
        (httpx.Response(200, content=b"<html>"), HgsServerError),
    ],
)
def test_an_injected_transport_and_server_failures(
    module_hgs: RunningHgs, response: httpx.Response, cls: type
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return response

    http = httpx.Client(base_url="https://hgs.test", transport=httpx.MockTransport(handler))
    conn = Connection(
        "https://hgs.test", Path(module_hgs.ca), module_hgs.directory / "tokens" / "admin.token"
    )
    with AdminClient(conn, http=http) as client, pytest.raises(cls):
        client.baselines()
    assert seen[0].headers["authorization"] == f"Bearer {tokens_of(module_hgs)[0]}"
    assert json.loads(seen[0].content or b"null") is None
