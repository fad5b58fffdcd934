"""Template models: versions and rules at their boundaries, signed statements, catalogs,
qualifiers, and every loader's refusals."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from guardfab.errors import FormatError, InvalidInputError, NotAuthorizedError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.template import (
    MAX_DISK_SIZE,
    MAX_VERSION_COMPONENT,
    DiskDigest,
    DiskSignatureStatement,
    DiskVersion,
    PublisherKey,
    VerifiedDiskSignature,
    VersionRule,
    VolumeIdQualifier,
    VolumeSignatureCatalog,
    verify_disk_signature,
)

ROOT = bytes(range(32))
_FIXED_KEY = ECKey.generate_key("P-256").as_dict(private=True)


@pytest.fixture(scope="module")
def publisher() -> ECKey:
    return ECKey.generate_key("P-256")


@pytest.fixture(scope="module")
def other_publisher() -> ECKey:
    return ECKey.generate_key("P-256")


def statement(name: str = "ws2025", version: str = "10.0.1.0") -> DiskSignatureStatement:
    digest = DiskDigest(root=ROOT, chunk_size=4 * 1024 * 1024)
    return DiskSignatureStatement(name, DiskVersion.parse(version), 123_456, digest)


# --- DiskVersion -----------------------------------------------------------------------

versions = st.builds(DiskVersion, *[st.integers(min_value=0, max_value=MAX_VERSION_COMPONENT)] * 4)


@given(versions)
def test_version_text_round_trip(version: DiskVersion) -> None:
    assert DiskVersion.parse(str(version)) == version


@given(versions, versions)
def test_version_order_is_numeric_not_textual(a: DiskVersion, b: DiskVersion) -> None:
    as_tuple = (a.major, a.minor, a.build, a.revision) < (b.major, b.minor, b.build, b.revision)
    assert (a < b) == as_tuple


def test_version_ten_is_above_nine() -> None:
    assert DiskVersion.parse("1.0.0.10") > DiskVersion.parse("1.0.0.9")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1.2.3",
        "1.2.3.4.5",
        "01.2.3.4",
        "1.2.3.-4",
        "+1.2.3.4",
        " 1.2.3.4",
        "1.2.3.4 ",
        "1..3.4",
        "1.2.3.a",
        "1.2.3.\u0664",  # an Arabic-Indic digit is not a version digit
        "1.2.3.2147483648",
        "1.2.3.99999999999",
        None,
        1234,
    ],
)
def test_version_parse_rejects(text: Any) -> None:
    with pytest.raises(FormatError):
        DiskVersion.parse(text)


def test_version_component_limits() -> None:
    assert str(DiskVersion.parse(f"0.0.0.{MAX_VERSION_COMPONENT}")).endswith("2147483647")
    with pytest.raises(FormatError):
        DiskVersion(0, 0, 0, -1)
    with pytest.raises(FormatError):
        DiskVersion(True, 0, 0, 0)


# --- VersionRule at its boundaries -----------------------------------------------------

RULE_TABLE = [
    # rule, disk version, reference, admitted
    ("equals", "2.0.0.0", "2.0.0.0", True),
    ("equals", "2.0.0.1", "2.0.0.0", False),
    ("equals", "1.9.9.9", "2.0.0.0", False),
    ("greater-than", "2.0.0.0", "2.0.0.0", False),
    ("greater-than", "2.0.0.1", "2.0.0.0", True),
    ("greater-than", "1.999.999.999", "2.0.0.0", False),
    ("greater-than", "3.0.0.0", "2.9.9.9", True),
    ("greater-than-or-equal", "2.0.0.0", "2.0.0.0", True),
    ("greater-than-or-equal", "2.0.0.1", "2.0.0.0", True),
    ("greater-than-or-equal", "1.9.9.9", "2.0.0.0", False),
    ("greater-than-or-equal", "2.0.0.0", "2.0.0.1", False),
]


@pytest.mark.parametrize(("rule", "disk", "reference", "admitted"), RULE_TABLE)
def test_version_rule_boundaries(
    rule: str, disk: str, reference: str, admitted: bool, publisher: ECKey
) -> None:
    key = PublisherKey.from_key(publisher)
    qualifier = VolumeIdQualifier(key, "ws2025", DiskVersion.parse(reference), VersionRule(rule))
    signature = verify_disk_signature(statement(version=disk).sign(publisher), key)
    assert qualifier.matches(signature) is admitted
    if admitted:
        qualifier.check(signature)
    else:
        with pytest.raises(NotAuthorizedError, match=f"is not {rule} {reference}"):
            qualifier.check(signature)


@pytest.mark.parametrize("text", ["Equals", "gt", "", None, "greater_than"])
def test_version_rule_parse_rejects(text: Any) -> None:
    with pytest.raises(FormatError, match="must be one of"):
        VersionRule.parse(text)


# --- signed statements ------------------------------------------------------------------

names = st.text(min_size=1, max_size=40).filter(str.isprintable)


@given(name=names, version=versions, size=st.integers(min_value=1, max_value=MAX_DISK_SIZE))
def test_statement_sign_verify_round_trip(
    name: str, version: DiskVersion, size: int, publisher: ECKey
) -> None:
    original = DiskSignatureStatement(name, version, size, DiskDigest(ROOT, 1024))
    verified = verify_disk_signature(original.sign(publisher), PublisherKey.from_key(publisher))
    assert verified.statement == original
    assert verified.publisher.thumbprint == jose.thumbprint(publisher)


def test_statement_from_another_publisher_is_refused(
    publisher: ECKey, other_publisher: ECKey
) -> None:
    signed = statement().sign(other_publisher)
    with pytest.raises(VerificationError) as caught:
        verify_disk_signature(signed, PublisherKey.from_key(publisher))
    assert jose.thumbprint(other_publisher) in caught.value.diagnostics()


def test_rsa_pss_publishers_work() -> None:
    key = RSAKey.generate_key(2048)
    signed = statement().sign(key)
    assert b'"PS256"' in b64url_decode(signed.split(b".")[0].decode(), what="header")
    verify_disk_signature(signed, PublisherKey.from_key(key))


def _resign(publisher: ECKey, payload: dict[str, Any]) -> str:
    # Plain json.dumps: an attacker holding a key need not produce canonical JSON.
    data = json.dumps(payload).encode()
    return jose.sign_compact(data, publisher, typ="guardfab-disk-signature+jws")


def _payload(**changes: Any) -> dict[str, Any]:
    base = statement().to_dict()
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


PAYLOAD_ATTACKS = {
    "wrong format version": (_payload(version=2), "format version 2"),
    "version as bool": (_payload(version=True), "format version"),
    "wrong type": (_payload(type="guardfab-guardian"), "type must be"),
    "unknown field": ({**_payload(), "note": "x"}, "unknown field"),
    "missing size": ({k: v for k, v in _payload().items() if k != "size"}, "size"),
    "zero size": (_payload(size=0), "size must be"),
    "negative size": (_payload(size=-1), "non-negative"),
    "huge size": (_payload(size=MAX_DISK_SIZE + 1), "size must be"),
    "bad version text": (_payload(disk_version="1.0"), "a.b.c.d"),
    "empty name": (_payload(name=""), "1 to 255"),
    "control char name": (_payload(name="ws\n2025"), "control"),
    "long name": (_payload(name="x" * 256), "longer than"),
    "digest alg": (_payload(digest={**statement().digest.to_dict(), "alg": "md5"}), "algorithm"),
    "digest root short": (_payload(digest={**statement().digest.to_dict(), "root": "00"}), "hex"),
    "digest root upper": (
        _payload(digest={**statement().digest.to_dict(), "root": "AB" * 32}),
        "lowercase",
    ),
    "digest extra": (_payload(digest={**statement().digest.to_dict(), "x": 1}), "unknown"),
    "chunk not power of two": (
        _payload(digest={**statement().digest.to_dict(), "chunk_size": 3000}),
        "power of two",
    ),
    "chunk too large": (
        _payload(digest={**statement().digest.to_dict(), "chunk_size": 2**30}),
        "power of two",
    ),
    "chunk too small": (
        _payload(digest={**statement().digest.to_dict(), "chunk_size": 512}),
        "power of two",
    ),
}


@pytest.mark.parametrize("attack", sorted(PAYLOAD_ATTACKS))
def test_signed_but_malformed_statements_are_refused(attack: str, publisher: ECKey) -> None:
    payload, message = PAYLOAD_ATTACKS[attack]
    token = _resign(publisher, payload).encode()
    with pytest.raises(FormatError, match=message):
        verify_disk_signature(token, PublisherKey.from_key(publisher))


def _swap_payload(token: bytes, payload: dict[str, Any]) -> bytes:
    header, _, signature = token.strip().split(b".")
    return b".".join([header, b64url_encode(canonical_json(payload)).encode(), signature])


ENVELOPE_ATTACKS = {
    "raised version": lambda t: _swap_payload(t, _payload(disk_version="99.0.0.0")),
    "changed size": lambda t: _swap_payload(t, _payload(size=123_457)),
    "truncated": lambda t: t[: len(t) // 2],
    "signature dropped": lambda t: t.rsplit(b".", 1)[0] + b".",
    "one signature byte": lambda t: t[:-3] + (b"A" if t[-3:-2] != b"A" else b"B") + t[-2:],
    "alg none": lambda t: b".".join(
        [
            b64url_encode(b'{"alg":"none","typ":"guardfab-disk-signature+jws"}').encode(),
            t.split(b".")[1],
            b"",
        ]
    ),
    "non-ascii": lambda t: t + "\u00e9".encode(),
    "oversized": lambda t: t + b" " * 20_000,
    "empty": lambda t: b"",
}


@pytest.mark.parametrize("attack", sorted(ENVELOPE_ATTACKS))
def test_tampered_signature_files_are_refused(attack: str, publisher: ECKey) -> None:
    token = ENVELOPE_ATTACKS[attack](statement().sign(publisher))
    with pytest.raises((FormatError, VerificationError)):
        verify_disk_signature(token, PublisherKey.from_key(publisher))


def test_a_statement_with_another_jws_type_is_refused(publisher: ECKey) -> None:
    token = jose.sign_compact(canonical_json(_payload()), publisher, typ="JWT")
    with pytest.raises(VerificationError, match="expected type"):
        verify_disk_signature(token.encode(), PublisherKey.from_key(publisher))


def test_a_catalog_signature_is_not_a_disk_signature(publisher: ECKey) -> None:
    vsc = VolumeSignatureCatalog(PublisherKey.from_key(publisher), "ws", DiskVersion(1, 0, 0, 0))
    token = json.loads(vsc.sign(publisher))["catalog"].encode()
    with pytest.raises(VerificationError, match="expected type"):
        verify_disk_signature(token, PublisherKey.from_key(publisher))


@given(st.binary(max_size=600))
def test_signature_loader_raises_only_invalid_input(data: bytes) -> None:
    key = PublisherKey.from_key(ECKey.import_key(_FIXED_KEY))
    with contextlib.suppress(InvalidInputError):
        verify_disk_signature(data, key)


# --- catalogs ----------------------------------------------------------------------------


@given(name=names, version=versions)
def test_catalog_round_trip(name: str, version: DiskVersion, publisher: ECKey) -> None:
    vsc = VolumeSignatureCatalog(PublisherKey.from_key(publisher), name, version)
    assert VolumeSignatureCatalog.from_bytes(vsc.sign(publisher)) == vsc


def test_catalog_signed_by_another_key_is_refused(publisher: ECKey, other_publisher: ECKey) -> None:
    vsc = VolumeSignatureCatalog(PublisherKey.from_key(publisher), "ws", DiskVersion(1, 0, 0, 0))
    with pytest.raises(NotAuthorizedError):
        vsc.sign(other_publisher)


def _catalog_document(publisher: ECKey) -> dict[str, Any]:
    vsc = VolumeSignatureCatalog(PublisherKey.from_key(publisher), "ws", DiskVersion(1, 0, 0, 0))
    document: dict[str, Any] = json.loads(vsc.sign(publisher))
    return document


def test_catalog_key_swap_is_refused(publisher: ECKey, other_publisher: ECKey) -> None:
    document = _catalog_document(publisher)
    document["publisher"] = jose.public_jwk(other_publisher)
    with pytest.raises(VerificationError):
        VolumeSignatureCatalog.from_bytes(json.dumps(document).encode())


def test_catalog_resigned_by_another_key_names_the_mismatch(
    publisher: ECKey, other_publisher: ECKey
) -> None:
    # Mallory re-signs Alice's payload (which names Alice's key) under Mallory's key.
    document = _catalog_document(publisher)
    payload = b64url_decode(document["catalog"].split(".")[1], what="payload")
    document["catalog"] = jose.sign_compact(payload, other_publisher, typ="guardfab-vsc+jws")
    document["publisher"] = jose.public_jwk(other_publisher)
    with pytest.raises(VerificationError, match="does not match the enclosed key"):
        VolumeSignatureCatalog.from_bytes(json.dumps(document).encode())


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda d: d.update(extra=1), FormatError),
        (lambda d: d.pop("catalog"), FormatError),
        (lambda d: d["publisher"].update(d="AAAA"), FormatError),
        (lambda d: d.update(catalog=d["catalog"][:-4]), VerificationError),
        (lambda d: d.update(catalog=d["catalog"].replace(".", "", 1)), FormatError),
        (lambda d: d["publisher"].update(kty="oct"), FormatError),
    ],
)
def test_catalog_loader_refuses_tampering(
    mutate: Any, error: type[Exception], publisher: ECKey
) -> None:
    document = _catalog_document(publisher)
    mutate(document)
    with pytest.raises(error):
        VolumeSignatureCatalog.from_bytes(json.dumps(document).encode())


@pytest.mark.parametrize("data", [b"", b"[]", b"{", b"\xff", b"{}" + b" " * 20_000, b"null"])
def test_catalog_loader_refuses_garbage(data: bytes) -> None:
    with pytest.raises(FormatError):
        VolumeSignatureCatalog.from_bytes(data)


# --- qualifiers --------------------------------------------------------------------------


@given(name=names, version=versions, rule=st.sampled_from(VersionRule))
def test_qualifier_round_trip(
    name: str, version: DiskVersion, rule: VersionRule, publisher: ECKey
) -> None:
    qualifier = VolumeIdQualifier(PublisherKey.from_key(publisher), name, version, rule)
    assert VolumeIdQualifier.from_dict(qualifier.to_dict()) == qualifier
    assert VolumeIdQualifier.from_bytes(qualifier.to_bytes()) == qualifier
    assert json.loads(json.dumps(qualifier.to_dict())) == qualifier.to_dict()


def _qualifier(publisher: ECKey, rule: str = "equals") -> VolumeIdQualifier:
    key = PublisherKey.from_key(publisher)
    return VolumeIdQualifier(key, "ws2025", DiskVersion(10, 0, 1, 0), VersionRule(rule))


def test_qualifier_names_every_failed_condition(publisher: ECKey, other_publisher: ECKey) -> None:
    signed = statement(name="ws2019", version="9.0.0.0").sign(other_publisher)
    signature = verify_disk_signature(signed, PublisherKey.from_key(other_publisher))
    with pytest.raises(NotAuthorizedError) as caught:
        _qualifier(publisher).check(signature)
    message = str(caught.value)
    assert "publisher" in message
    assert "name 'ws2019' is not 'ws2025'" in message
    assert "version 9.0.0.0 is not equals 10.0.1.0" in message


@pytest.mark.parametrize(
    ("name", "version", "fails"),
    [
        ("ws2025", "10.0.1.0", None),
        ("WS2025", "10.0.1.0", "name"),
        ("ws2025", "10.0.1.1", "version"),
    ],
)
def test_qualifier_verify_is_the_provisioning_check(
    name: str, version: str, fails: str | None, publisher: ECKey
) -> None:
    signed = statement(name=name, version=version).sign(publisher)
    if fails is None:
        assert _qualifier(publisher).verify(signed).statement.name == name
    else:
        with pytest.raises(NotAuthorizedError, match=fails):
            _qualifier(publisher).verify(signed)


def test_qualifier_verify_refuses_another_publishers_disk(
    publisher: ECKey, other_publisher: ECKey
) -> None:
    # Same name and version, signed by someone else: the signature itself fails.
    with pytest.raises(VerificationError):
        _qualifier(publisher).verify(statement().sign(other_publisher))


def test_a_forged_verified_signature_object_still_fails_on_publisher(
    publisher: ECKey, other_publisher: ECKey
) -> None:
    forged = VerifiedDiskSignature(statement(), PublisherKey.from_key(other_publisher))
    with pytest.raises(NotAuthorizedError, match="publisher"):
        _qualifier(publisher).check(forged)


QUALIFIER_ATTACKS = {
    "format version 2": lambda d: d.update(version=2),
    "unknown field": lambda d: d.update(extra=True),
    "private key inside": lambda d: d["publisher"].update(d="AAAA"),
    "bad rule": lambda d: d.update(rule="less-than"),
    "bad version": lambda d: d.update(disk_version="10.0.1"),
    "no publisher": lambda d: d.pop("publisher"),
    "wrong type": lambda d: d.update(type="guardfab-volume-signature-catalog"),
    "symmetric key": lambda d: d.update(publisher={"kty": "oct", "k": "AAAA"}),
    "weak curve": lambda d: d["publisher"].update(crv="secp256k1"),
}


@pytest.mark.parametrize("attack", sorted(QUALIFIER_ATTACKS))
def test_qualifier_loader_refuses(attack: str, publisher: ECKey) -> None:
    document = _qualifier(publisher).to_dict()
    QUALIFIER_ATTACKS[attack](document)
    with pytest.raises(FormatError):
        VolumeIdQualifier.from_dict(document)


@given(st.binary(max_size=600))
def test_qualifier_and_catalog_loaders_raise_only_invalid_input(data: bytes) -> None:
    with contextlib.suppress(InvalidInputError):
        VolumeIdQualifier.from_bytes(data)
    with contextlib.suppress(InvalidInputError):
        VolumeSignatureCatalog.from_bytes(data)


def test_a_signature_whose_key_id_names_another_key_is_refused(publisher: ECKey) -> None:
    header = {"alg": "ES256", "typ": "guardfab-disk-signature+jws", "kid": "x" * 43}
    token = jws.serialize_compact(header, canonical_json(_payload()), publisher)
    with pytest.raises(VerificationError, match="key id"):
        verify_disk_signature(token.encode(), PublisherKey.from_key(publisher))


@given(st.text(max_size=40))
def test_version_and_rule_parsers_raise_only_format_errors(text: str) -> None:
    with contextlib.suppress(FormatError):
        assert str(DiskVersion.parse(text)) == text
    with contextlib.suppress(FormatError):
        assert VersionRule.parse(text).value == text
