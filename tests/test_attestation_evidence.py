"""Evidence loading: strict shapes, size limits, canonical encodings, round trips."""

from __future__ import annotations

import contextlib
import hashlib
import json
import string
from dataclasses import FrozenInstanceError, fields, replace
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardfab.attestation import evidence as evidence_module
from guardfab.attestation.binding import host_key_digest
from guardfab.attestation.evidence import (
    MAX_CLAIMS_BYTES,
    MAX_EVENT_LOG_BYTES,
    AdminGroupEvidence,
    HostKeyEvidence,
    TpmEvidence,
    evidence_from_dict,
    load_evidence,
    load_host_key,
)
from guardfab.attestation.signing import host_key_evidence
from guardfab.errors import FormatError, InvalidInputError
from guardfab.formats.encoding import b64url_encode, canonical_json
from test_attestation_fixtures import NONCE, SoftHost, encryption_key, host_key_jwk
from test_attestation_hostkey import member, signing_key


def tpm_body() -> dict[str, Any]:
    return SoftHost().evidence().to_dict()


def hk_body() -> dict[str, Any]:
    return host_key_evidence(
        signing_key(), nonce=NONCE, host_key=host_key_jwk(), claims={"a": 1}
    ).to_dict()


def ag_body() -> dict[str, Any]:
    return member().evidence().to_dict()


BODIES = {"tpm": tpm_body, "host-key": hk_body, "admin-group": ag_body}


@pytest.mark.parametrize("mode", BODIES)
def test_each_mode_round_trips_through_json(mode: str) -> None:
    body = BODIES[mode]()
    evidence = load_evidence(json.dumps(body).encode())
    assert evidence.mode.value == mode
    assert evidence.to_dict() == body
    assert evidence_from_dict(evidence.to_dict()) == evidence


def _set(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``body`` with the dotted ``path`` set (or deleted when value is ...)."""
    out = json.loads(json.dumps(body))
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


BAD_TPM: list[tuple[str, str, Any, str]] = [
    ("unknown top-level field", "ci_policy_digest", "00", "unknown field"),
    ("unknown quote field", "quote.extra", "AA", "unknown field"),
    ("missing field", "ak_public", ..., "ak_public"),
    ("wrong mode", "mode", "TPM", "mode"),
    ("padded base64", "ek_public", "AAAA==", "base64url"),
    ("standard base64 alphabet", "ak_public", "ab+/", "base64url"),
    ("empty field", "ak_public", "", "empty"),
    ("oversized log", "event_log", "A" * (MAX_EVENT_LOG_BYTES * 4 // 3 + 8), "larger than"),
    ("oversized quote", "quote.attest", "A" * 6000, "larger than"),
    ("a sha1 bank", "pcrs.sha1", {"0": "00" * 20}, "only sha256"),
    ("PCR index with a leading zero", "pcrs.sha256.07", "00" * 32, "decimal"),
    ("PCR 24", "pcrs.sha256.24", "00" * 32, "not below 24"),
    ("PCR index in superscript digits", "pcrs.sha256.\u00b2", "00" * 32, "decimal"),
    ("PCR value with spaces", "pcrs.sha256.0", "00 " * 21, "lower-case hex"),
    ("event log with a non-ASCII character", "event_log", "AAA\u00e9", "base64url"),
    ("upper-case hex", "pcrs.sha256.0", "AB" * 32, "lower-case hex"),
    ("short PCR value", "pcrs.sha256.0", "00" * 20, "32 bytes"),
    ("a number for a PCR value", "pcrs.sha256.0", 0, "string"),
    ("64 characters with spaces", "pcrs.sha256.0", "  " + "00" * 31, "32 bytes"),
    ("64 characters, one not hex", "pcrs.sha256.0", "0g" + "00" * 31, "not hex"),
    ("64 characters, one upper-case", "pcrs.sha256.0", "0A" + "00" * 31, "lower-case hex"),
    ("EK certificate not base64", "ek_certificate", 5, "base64url"),
    ("host key with a kid", "host_key.kid", "k1", "unknown field"),
    ("host key with a private part", "host_key.d", "AAAA", "unknown field"),
    ("host key missing y", "host_key.y", ..., "missing"),
    ("symmetric host key", "host_key", {"kty": "oct", "k": "AAAA"}, "EC or RSA"),
    ("host key type a list", "host_key.kty", ["EC"], "EC or RSA"),
    ("host key not on the curve", "host_key.x", b64url_encode(b"\x01" * 32), "JWK"),
]


@pytest.mark.parametrize(
    ("path", "value", "pattern"), [b[1:] for b in BAD_TPM], ids=[b[0] for b in BAD_TPM]
)
def test_bad_tpm_evidence_is_refused_with_the_field_named(
    path: str, value: Any, pattern: str
) -> None:
    with pytest.raises(FormatError, match=pattern):
        evidence_from_dict(_set(tpm_body(), path, value))


@pytest.mark.filterwarnings("ignore:Key size should be")
def test_a_weak_rsa_host_key_is_refused() -> None:
    weak = {"kty": "RSA", "n": b64url_encode(b"\xc1" * 128), "e": "AQAB"}
    with pytest.raises(FormatError, match="too small"):
        evidence_from_dict(_set(tpm_body(), "host_key", weak))


BAD_HOST_KEY: list[tuple[str, str, Any, str]] = [
    ("not a thumbprint", "host_key_id", "key-1", "thumbprint"),
    ("signature with a payload", "signature", "a.b.c", "detached"),
    ("signature not a JWS", "signature", "abc", "detached"),
    ("claims not an object", "claims", [1], "JSON object"),
    ("claims too large", "claims", {"x": "y" * MAX_CLAIMS_BYTES}, "larger than"),
    ("claims with a huge integer", "claims", {"n": 2**64}, "canonicalized"),
    ("unknown field", "nonce", "AAAA", "unknown field"),
]


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [b[1:] for b in BAD_HOST_KEY],
    ids=[b[0] for b in BAD_HOST_KEY],
)
def test_bad_host_key_evidence_is_refused(path: str, value: Any, pattern: str) -> None:
    with pytest.raises(FormatError, match=pattern):
        evidence_from_dict(_set(hk_body(), path, value))


def test_claims_with_nan_are_refused() -> None:
    """Python's json accepts NaN; canonical JSON cannot carry it."""
    text = json.dumps(hk_body()).replace('"claims": {"a": 1}', '"claims": {"a": NaN}')
    with pytest.raises(FormatError, match="canonicalized"):
        load_evidence(text.encode())


@pytest.mark.parametrize(
    ("value", "pattern"),
    [([], "1 to 4"), (["A"] * 5, "1 to 4"), ("AAAA", "1 to 4"), ([5], "base64url")],
)
def test_bad_certificate_lists_are_refused(value: Any, pattern: str) -> None:
    with pytest.raises(FormatError, match=pattern):
        evidence_from_dict(_set(ag_body(), "certificates", value))


@pytest.mark.parametrize(
    "data",
    [
        *(b"", b"[]", b"{}", b"\xff", b"[" * 100_000, b"1e999999"),
        *(b'{"mode": 5}', b'{"mode": "x"}', b'{"mode": []}', b'{"mode": {}}'),
    ],
)
def test_garbage_bodies_are_format_errors(data: bytes) -> None:
    with pytest.raises(FormatError):
        load_evidence(data)


def test_a_body_over_the_limit_is_refused_before_parsing() -> None:
    with pytest.raises(FormatError, match="larger than the limit"):
        load_evidence(b" " * (2 * 1024 * 1024 + 1))


# ------------------------------------------------------------------ hypothesis

_bytes = st.binary(min_size=1, max_size=64)
_pcrs = st.dictionaries(st.integers(0, 23), st.binary(min_size=32, max_size=32), max_size=24)
_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1), st.text(max_size=20)
)
_claims = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        _json_scalar,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    ),
    max_size=5,
)
_host_keys = st.sampled_from([host_key_jwk(0), host_key_jwk(1)])
_jws = st.builds(
    lambda h, s: f"{h}..{s}",
    st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=40),
    st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=90),
)


@settings(max_examples=150, deadline=None)
@given(
    ek=_bytes,
    cert=st.none() | _bytes,
    ak=_bytes,
    attest=_bytes,
    sig=_bytes,
    pcrs=_pcrs,
    log=st.binary(min_size=1, max_size=512),
    host_key=_host_keys,
)
def test_tpm_evidence_round_trips(
    ek: bytes,
    cert: bytes | None,
    ak: bytes,
    attest: bytes,
    sig: bytes,
    pcrs: dict[int, bytes],
    log: bytes,
    host_key: dict[str, Any],
) -> None:
    evidence = TpmEvidence(ek, cert, ak, attest, sig, pcrs, log, host_key)
    body = json.loads(json.dumps(evidence.to_dict()))
    assert TpmEvidence.from_dict(body) == evidence


@settings(max_examples=150, deadline=None)
@given(claims=_claims, host_key=_host_keys, signature=_jws)
def test_host_key_evidence_round_trips(
    claims: dict[str, Any], host_key: dict[str, Any], signature: str
) -> None:
    key_id = "A" * 43
    evidence = HostKeyEvidence(key_id, signature, claims, host_key)
    body = json.loads(json.dumps(evidence.to_dict()))
    assert HostKeyEvidence.from_dict(body) == evidence


@settings(max_examples=100, deadline=None)
@given(certs=st.lists(_bytes, min_size=1, max_size=4), host_key=_host_keys, signature=_jws)
def test_admin_group_evidence_round_trips(
    certs: list[bytes], host_key: dict[str, Any], signature: str
) -> None:
    evidence = AdminGroupEvidence(tuple(certs), signature, host_key)
    assert AdminGroupEvidence.from_dict(evidence.to_dict()) == evidence


_json = st.recursive(
    _json_scalar | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(["tpm", "host-key", "admin-group"]),
    key=st.text(max_size=12),
    value=_json,
)
def test_any_field_value_is_loaded_or_refused_with_a_format_error(
    base: str, key: str, value: Any
) -> None:
    body = {**_BODIES_ONCE[base], key: value}
    with contextlib.suppress(InvalidInputError):
        evidence_from_dict(body)


_BODIES_ONCE = {mode: make() for mode, make in BODIES.items()}


def test_the_host_key_cache_still_refuses_a_bad_key() -> None:
    """Validation is cached for good keys only: a bad key is refused every time."""
    bad = {**host_key_jwk(), "x": b64url_encode(b"\x02" * 32)}
    for _ in range(2):
        with pytest.raises(FormatError):
            evidence_from_dict(_set(tpm_body(), "host_key", bad))
    assert encryption_key(0).as_dict(private=False)["x"] == host_key_jwk()["x"]


def test_the_host_key_checks_and_digests_are_cached_only_for_string_members() -> None:
    """Caches keyed by a JWK's members hold only all-string JWKs: 1 and True are equal as
    keys but not as JSON, so a JWK with another value type is never mistaken for another."""
    one, true = {"kty": "EC", "crv": 1}, {"kty": "EC", "crv": True}
    assert host_key_digest(one) != host_key_digest(true)
    assert host_key_digest(one) == hashlib.sha256(b'{"crv":1,"kty":"EC"}').digest()
    jwk = host_key_jwk()
    assert host_key_digest(jwk) == hashlib.sha256(canonical_json(jwk)).digest()
    assert host_key_digest({**jwk, "x": host_key_jwk(1)["x"]}) != host_key_digest(jwk)
    for value in (1, True, None):
        with pytest.raises(FormatError, match="must be a string"):
            load_host_key({**jwk, "crv": value})


def test_the_loaders_host_key_digest_is_that_keys_and_follows_a_swap() -> None:
    """The loader keeps the host key's binding digest, found with the key's check; a copy
    with another key, or another key set under it, gets that key's digest."""
    loaded = evidence_from_dict(tpm_body())
    assert isinstance(loaded, TpmEvidence)
    assert loaded.key_digest() == host_key_digest(host_key_jwk())
    other = host_key_jwk(9)
    assert replace(loaded, host_key=other).key_digest() == host_key_digest(other)
    object.__setattr__(loaded, "host_key", MappingProxyType(other))
    assert loaded.key_digest() == host_key_digest(other)


def test_only_the_loaders_own_host_key_counts_as_checked() -> None:
    """``key_checked`` (the verifier skips its second check of the key) holds only for the
    very mapping the loader checked: not for evidence built otherwise, a copy, or a key
    set under loaded evidence afterwards."""
    loaded = evidence_from_dict(tpm_body())
    assert isinstance(loaded, TpmEvidence)
    assert loaded.key_checked()
    assert not replace(loaded, host_key=dict(loaded.host_key)).key_checked()
    built = TpmEvidence(**{f.name: getattr(loaded, f.name) for f in fields(TpmEvidence) if f.init})
    assert built == loaded
    assert not built.key_checked()
    object.__setattr__(loaded, "host_key", MappingProxyType(dict(loaded.host_key)))
    assert not loaded.key_checked()


class _LyingText(str):
    """A text that says it equals any text and hashes like another."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash(tpm_body()["ak_public"])


def test_identity_fields_are_decoded_once_per_exact_text() -> None:
    """The EK and AK texts repeat at every attestation: one bytes object per text."""
    body = tpm_body()
    first, second = (
        evidence_from_dict({**body, "ak_public": "".join(body["ak_public"])}) for _ in range(2)
    )
    assert isinstance(first, TpmEvidence)
    assert isinstance(second, TpmEvidence)
    assert first.ak_public is second.ak_public
    assert first.ek_public is second.ek_public
    # Another AK's text is decoded for itself; a bad one is refused every time, never kept.
    another_ak = first.ak_public + b"\x01"
    other = b64url_encode(another_ak)
    assert evidence_from_dict({**body, "ak_public": other}).ak_public == another_ak
    for _ in range(2):
        with pytest.raises(FormatError, match="ak_public"):
            evidence_from_dict({**body, "ak_public": body["ak_public"] + "="})
    # A str subclass is never looked up: it is decoded for what it holds.
    lying = _LyingText(other)
    assert evidence_from_dict({**body, "ak_public": lying}).ak_public == another_ak
    # A text longer than the cache keeps (an EK certificate may be) is decoded every time.
    long_cert = b"\x30" * (evidence_module.IDENTITY_TEXT_MAX_CHARS * 3 // 4 + 3)
    texts = {**body, "ek_certificate": b64url_encode(long_cert)}
    first_cert, second_cert = (evidence_from_dict(dict(texts)) for _ in range(2))
    assert isinstance(first_cert, TpmEvidence)
    assert isinstance(second_cert, TpmEvidence)
    assert first_cert.ek_certificate == second_cert.ek_certificate == long_cert
    assert first_cert.ek_certificate is not second_cert.ek_certificate


class _LyingPcr(str):
    """A PCR value that says it equals any text and hashes like PCR 0's."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash(tpm_body()["pcrs"]["sha256"]["0"])


def test_pcr_values_are_read_once_per_exact_text_and_never_on_a_claim() -> None:
    body = tpm_body()
    values = body["pcrs"]["sha256"]
    first, second = (
        evidence_from_dict(_set(body, "pcrs.sha256.0", "".join(values["0"]))) for _ in range(2)
    )
    assert isinstance(first, TpmEvidence)
    assert isinstance(second, TpmEvidence)
    assert first.pcrs[0] is second.pcrs[0] == bytes.fromhex(values["0"])
    for _ in range(2):  # refused every time: a failure is never kept
        with pytest.raises(FormatError, match="lower-case hex"):
            evidence_from_dict(_set(body, "pcrs.sha256.0", values["0"].upper()))
    for other in ("ab" * 32, "cd" * 32):  # each claims to equal the other (and PCR 0)
        lying = evidence_from_dict(_set(body, "pcrs.sha256.0", _LyingPcr(other)))
        assert isinstance(lying, TpmEvidence)
        assert lying.pcrs[0] == bytes.fromhex(other)


def test_loaded_tpm_evidence_has_every_field_read_only() -> None:
    """The loader fills the instance without __init__: it must set every dataclass field,
    as read-only mappings, and equal the evidence built the usual way."""
    built = SoftHost().evidence()
    loaded = evidence_from_dict(built.to_dict())
    assert isinstance(loaded, TpmEvidence)
    assert set(vars(loaded)) == {f.name for f in fields(TpmEvidence)}
    assert loaded == built
    assert type(loaded.pcrs) is MappingProxyType
    assert type(loaded.host_key) is MappingProxyType
    with pytest.raises(FrozenInstanceError):
        loaded.event_log = b""  # type: ignore[misc]


def test_a_host_key_in_another_member_order_has_the_same_digest() -> None:
    """The JWK caches are keyed by the members in the order sent (not sorted): each order
    is its own entry, and both give the canonical digest."""
    jwk = host_key_jwk()
    reordered = dict(reversed(list(jwk.items())))
    assert list(reordered) != list(jwk)
    expected = hashlib.sha256(canonical_json(jwk)).digest()
    assert host_key_digest(reordered) == host_key_digest(jwk) == expected
    loaded = [evidence_from_dict(_set(tpm_body(), "host_key", key)) for key in (jwk, reordered)]
    assert [e.key_digest() for e in loaded if isinstance(e, TpmEvidence)] == [expected] * 2
