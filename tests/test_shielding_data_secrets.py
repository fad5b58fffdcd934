"""Shielding secrets: the plaintext model, its limits (384 KiB of files), its loader,
and round trips through a whole shielding data file."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardfab.errors import FormatError
from guardfab.formats.encoding import b64url_encode, canonical_json
from guardfab.formats.guardian import sign_guardian_document
from guardfab.formats.shielding_data import (
    SecurityPolicy,
    create_shielding_data,
    load_shielding_data,
)
from guardfab.formats.shielding_secrets import (
    MAX_FILES,
    MAX_HOST_CERTIFICATE_BYTES,
    MAX_PASSWORD_CHARS,
    MAX_SECRET_FILES_BYTES,
    AdminCredentials,
    AnswerFile,
    AnswerFileKind,
    HostCertificate,
    HostCertificateKind,
    ShieldingSecrets,
)
from guardfab.tenant.guardians import GuardianKeys

ADMIN = AdminCredentials("Administrator", "pw")

# --- strategies -------------------------------------------------------------------------

_printable = st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S"]) | st.just(" ")
usernames = st.text(_printable, min_size=1, max_size=30).filter(lambda s: s.strip() == s)
passwords = st.text(_printable, min_size=1, max_size=60)
file_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
answer_files = st.none() | st.builds(
    AnswerFile,
    st.sampled_from([AnswerFileKind.UNATTEND, AnswerFileKind.CLOUD_INIT]),
    st.binary(min_size=1, max_size=300),
)
host_certificates = st.none() | st.builds(
    HostCertificate,
    st.sampled_from(list(HostCertificateKind)),
    st.binary(min_size=1, max_size=200),
    st.binary(min_size=1, max_size=200),
)
secrets_strategy = st.builds(
    ShieldingSecrets,
    admin=st.builds(AdminCredentials, usernames, passwords),
    answer_file=answer_files,
    files=st.dictionaries(file_names, st.binary(max_size=100), max_size=5),
    host_certificate=host_certificates,
)


@given(secrets_strategy)
def test_plaintext_round_trip(secrets: ShieldingSecrets) -> None:
    assert ShieldingSecrets.from_bytes(secrets.to_bytes()) == secrets
    assert secrets.to_bytes() == canonical_json(json.loads(secrets.to_bytes()))


@settings(max_examples=25, deadline=None)
@given(secrets=secrets_strategy, policy=st.sampled_from(list(SecurityPolicy)))
def test_whole_file_round_trip(
    guardian_keys: dict[str, GuardianKeys], secrets: ShieldingSecrets, policy: SecurityPolicy
) -> None:
    owner, fabric = guardian_keys["owner"], guardian_keys["fabric"]
    data = create_shielding_data(
        owner,
        [sign_guardian_document(fabric.guardian, fabric.signing_key)],
        policy=policy,
        secrets=secrets,
        name="vm",
        created_at=0,
    )
    loaded = load_shielding_data(data, expected_owner=owner.guardian.id)
    assert loaded.header.policy is policy
    assert loaded.header.answer_file_kind is secrets.answer_file_kind
    assert loaded.reveal(fabric) == secrets
    assert loaded.reveal(owner) == secrets


@given(st.binary(max_size=512))
def test_plaintext_loader_raises_only_format_errors(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        ShieldingSecrets.from_bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@given(
    st.dictionaries(
        st.sampled_from(["type", "version", "admin", "answer_file", "files", "host_certificate"]),
        json_values,
    )
)
def test_plaintext_loader_on_structured_garbage(value: dict[str, Any]) -> None:
    with contextlib.suppress(FormatError):
        ShieldingSecrets.from_dict(value)


# --- the 384 KiB limit ---------------------------------------------------------------------


def test_files_up_to_384_kib_are_accepted() -> None:
    half = MAX_SECRET_FILES_BYTES // 2
    answer = AnswerFile(AnswerFileKind.UNATTEND, b"a" * half)
    secrets = ShieldingSecrets(ADMIN, answer_file=answer, files={"b": b"b" * half})
    assert secrets.files_size == MAX_SECRET_FILES_BYTES == 393216


def test_one_byte_over_384_kib_is_refused_at_creation() -> None:
    half = MAX_SECRET_FILES_BYTES // 2
    answer = AnswerFile(AnswerFileKind.UNATTEND, b"a" * half)
    with pytest.raises(FormatError, match="384 KiB"):
        ShieldingSecrets(ADMIN, answer_file=answer, files={"b": b"b" * (half + 1)})
    with pytest.raises(FormatError, match="384 KiB"):
        ShieldingSecrets(ADMIN, files={"x": bytes(MAX_SECRET_FILES_BYTES + 1)})
    with pytest.raises(FormatError, match="answer file"):
        AnswerFile(AnswerFileKind.CLOUD_INIT, bytes(MAX_SECRET_FILES_BYTES + 1))


def test_over_384_kib_is_refused_when_loading_too() -> None:
    body = ShieldingSecrets(ADMIN).to_dict()
    body["files"] = {"a": b64url_encode(bytes(200_000)), "b": b64url_encode(bytes(200_000))}
    with pytest.raises(FormatError, match="384 KiB"):
        ShieldingSecrets.from_bytes(canonical_json(body))


def test_too_many_files_are_refused() -> None:
    files = {f"f{i}": b"" for i in range(MAX_FILES + 1)}
    with pytest.raises(FormatError, match="limit of 32"):
        ShieldingSecrets(ADMIN, files=files)


@pytest.mark.parametrize(
    "name", ["", ".hidden", "a/b", "..", "a\\b", "a b", "-rf", "é", "x" * 129, "a:b"]
)
def test_file_names_must_be_plain(name: str) -> None:
    with pytest.raises(FormatError, match="file names"):
        ShieldingSecrets(ADMIN, files={name: b"x"})


# --- credentials and certificates ------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "password", "match"),
    [
        ("", "pw", "user name"),
        (" root", "pw", "spaces"),
        ("ro\tot", "pw", "control"),
        ("root", "", "password must be 1"),
        ("root", "x" * (MAX_PASSWORD_CHARS + 1), "password must be 1"),
        ("root", "SECRET-VALUE\r", "control characters"),
        ("root", "SECRET-VALUE\nline", "newlines"),
    ],
)
def test_bad_credentials_are_refused_without_quoting_them(
    username: str, password: str, match: str
) -> None:
    with pytest.raises(FormatError, match=match) as info:
        AdminCredentials(username, password)
    assert "SECRET-VALUE" not in info.value.diagnostics()


def test_answer_file_must_have_a_real_kind_and_content() -> None:
    with pytest.raises(FormatError, match="'unattend' or 'cloud-init'"):
        AnswerFile(AnswerFileKind.NONE, b"x")
    with pytest.raises(FormatError, match="answer file kind"):
        AnswerFile("kickstart", b"x")  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="1 to"):
        AnswerFile(AnswerFileKind.UNATTEND, b"")


def test_host_certificate_limits() -> None:
    with pytest.raises(FormatError, match="host certificate must be"):
        HostCertificate(HostCertificateKind.RDP, b"", b"k")
    with pytest.raises(FormatError, match="host private key"):
        HostCertificate(HostCertificateKind.RDP, b"c", b"")
    with pytest.raises(FormatError, match="host certificate must be"):
        HostCertificate(HostCertificateKind.SSH, bytes(MAX_HOST_CERTIFICATE_BYTES + 1), b"k")
    with pytest.raises(FormatError, match="kind"):
        HostCertificate("vnc", b"c", b"k")  # type: ignore[arg-type]


def test_kinds_given_as_text_are_normalized() -> None:
    answer = AnswerFile("cloud-init", b"#cloud-config")  # type: ignore[arg-type]
    assert answer.kind is AnswerFileKind.CLOUD_INIT
    assert "cloud-init" in repr(answer)


def test_reprs_never_show_secrets() -> None:
    secrets = ShieldingSecrets(
        AdminCredentials("admin-NAME", "pass-WORD"),
        answer_file=AnswerFile(AnswerFileKind.UNATTEND, b"answer-TEXT"),
        files={"f": b"file-TEXT"},
        host_certificate=HostCertificate(HostCertificateKind.SSH, b"cert-TEXT", b"key-TEXT"),
    )
    shown = " ".join(
        repr(x) for x in (secrets, secrets.admin, secrets.answer_file, secrets.host_certificate)
    )
    for value in ("admin-NAME", "pass-WORD", "answer-TEXT", "file-TEXT", "cert-TEXT", "key-TEXT"):
        assert value not in shown


# --- the plaintext loader's refusals ----------------------------------------------------


def _body(**changes: Any) -> bytes:
    body: dict[str, Any] = {**ShieldingSecrets(ADMIN).to_dict(), **changes}
    return canonical_json({k: v for k, v in body.items() if v is not ...})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_body(version=2), "version 2 is not supported"),
        (_body(version="1"), "version '1'"),
        (_body(type="guardfab.kp"), "type must be"),
        (_body(extra=1), "unknown field"),
        (_body(admin=...), "admin: expected a JSON object"),
        (_body(admin={"username": "root"}), "password"),
        (_body(admin={"username": "root", "password": "x", "uid": 0}), "unknown field"),
        (_body(files=[]), "files: expected a JSON object"),
        (_body(files={"a": "!!"}), "base64url"),
        (_body(files={"a": 5}), "must be a string"),
        (_body(files={"../etc": ""}), "file names"),
        (_body(files={f"f{i}": "" for i in range(33)}), "more than 32"),
        (_body(answer_file={"kind": "none", "content": "eA"}), "'unattend' or 'cloud-init'"),
        (_body(answer_file={"kind": "unattend"}), "content"),
        (_body(host_certificate={"kind": "ssh", "certificate": "eA"}), "private_key"),
        (b"[]", "expected a JSON object"),
        (b"{", "not valid UTF-8 JSON"),
        (b"\xff", "not valid UTF-8 JSON"),
        (b" " * (700 * 1024), "larger than the limit"),
    ],
)
def test_plaintext_loader_refuses(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        ShieldingSecrets.from_bytes(data)
