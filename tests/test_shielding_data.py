"""Shielding data files: round trips, and attacks on the owner signature, the header
binding and the sealed secrets (each attack fails if the check it aims at is removed)."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey

from guardfab.errors import (
    FormatError,
    InvalidInputError,
    NotAuthorizedError,
    VerificationError,
)
from guardfab.formats import jose
from guardfab.formats import shielding_data as sd
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.guardian import (
    GuardianKind,
    KeyAlgorithm,
    load_guardian_document,
    sign_guardian_document,
)
from guardfab.formats.shielding_data import (
    MAX_SHIELDING_DATA_BYTES,
    PDK_JWS_TYPE,
    SecurityPolicy,
    ShieldingData,
    ShieldingDataHeader,
    create_shielding_data,
    load_shielding_data,
)
from guardfab.formats.shielding_secrets import (
    AdminCredentials,
    AnswerFile,
    AnswerFileKind,
    HostCertificate,
    HostCertificateKind,
    ShieldingSecrets,
    seal,
    unseal,
)
from guardfab.formats.template import (
    DiskVersion,
    PublisherKey,
    VersionRule,
    VolumeIdQualifier,
)
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys

PASSWORD = "correct horse battery staple"
SECRETS = ShieldingSecrets(
    admin=AdminCredentials("Administrator", PASSWORD),
    answer_file=AnswerFile(AnswerFileKind.UNATTEND, b"<unattend>secret-answer</unattend>"),
    files={"setup.ps1": b"Write-Host secret-file"},
    host_certificate=HostCertificate(HostCertificateKind.SSH, b"cert", b"secret-host-key"),
)
CREATED_AT = 1_700_000_000
#: A guardian a forger adds to the header; not one of the file's guardians.
INTRUDER = new_guardian_keys("intruder", KeyAlgorithm.EC_P256)
Keys = dict[str, GuardianKeys]


def doc(keys: GuardianKeys) -> bytes:
    return sign_guardian_document(keys.guardian, keys.signing_key)


@pytest.fixture(scope="module")
def qualifier() -> VolumeIdQualifier:
    publisher = PublisherKey.from_key(ECKey.generate_key("P-256"))
    return VolumeIdQualifier(
        publisher, "ws2022", DiskVersion(10, 0, 20348, 1), VersionRule.GREATER_THAN_OR_EQUAL
    )


@pytest.fixture(scope="module")
def pdk(guardian_keys: Keys, qualifier: VolumeIdQualifier) -> bytes:
    """A genuine PDK: owner 'owner', guardians 'fabric' and 'fabric2'."""
    return create_shielding_data(
        guardian_keys["owner"],
        [doc(guardian_keys["fabric"]), doc(guardian_keys["fabric2"])],
        policy=SecurityPolicy.SHIELDED,
        secrets=SECRETS,
        qualifiers=[qualifier],
        name="web01",
        created_at=CREATED_AT,
    )


# --- helpers that forge files -----------------------------------------------------------


def body_of(data: bytes) -> dict[str, Any]:
    payload = data.decode().strip().split(".")[1]
    body: dict[str, Any] = json.loads(b64url_decode(payload, what="test"))
    return body


def keep_signature(data: bytes, body: dict[str, Any]) -> bytes:
    """An edited payload under the original header and signature."""
    head, _, sig = data.decode().strip().split(".")
    return f"{head}.{b64url_encode(canonical_json(body))}.{sig}".encode()


def signed(payload: Any, signer: GuardianKeys, *, typ: str = PDK_JWS_TYPE) -> bytes:
    raw = payload if isinstance(payload, bytes) else canonical_json(payload)
    return jose.sign_compact(raw, signer.signing_key, typ=typ).encode()


def renormalize(header: dict[str, Any]) -> None:
    """Sort guardians and recompute kp_guardians, as a careful forger would."""
    ids = {d: load_guardian_document(d.encode()).id for d in header["guardians"]}
    header["guardians"] = sorted(header["guardians"], key=ids.__getitem__)
    owner_id = load_guardian_document(header["owner"].encode()).id
    header["kp_guardians"] = sorted([owner_id, *ids.values()])


def relabel_recipients(body: dict[str, Any]) -> None:
    """Give the JWE one wrapping per guardian the header names, junk ones where needed.

    The public recipient check sees kids only; a forger can always fake them.
    """
    header = ShieldingDataHeader.from_dict(body["header"])
    expected = [kid for kid, _ in header.recipients()]
    entries = body["secrets"]["recipients"]
    kept = [e for e in entries if e["header"]["kid"] in expected]
    have = {e["header"]["kid"] for e in kept}
    for kid in expected:
        if kid not in have:
            kept.append({**entries[0], "header": {**entries[0]["header"], "kid": kid}})
    body["secrets"]["recipients"] = kept


def become_owner(body: dict[str, Any], attacker: GuardianKeys) -> bytes:
    """The attacker names itself owner, fakes every public binding and signs.

    The result passes every public check -- it is a valid file of the attacker's
    -- so only the AAD inside the AEAD can keep the original secrets shut.
    """
    body = copy.deepcopy(body)
    body["header"]["owner"] = doc(attacker).decode()
    renormalize(body["header"])
    relabel_recipients(body)
    body["secrets"]["aad"] = b64url_encode(ShieldingDataHeader.from_dict(body["header"]).aad())
    return signed(body, attacker)


# --- round trips --------------------------------------------------------------------------


def test_round_trip_for_owner_and_every_guardian(
    pdk: bytes, guardian_keys: Keys, qualifier: VolumeIdQualifier
) -> None:
    loaded = load_shielding_data(pdk, expected_owner=guardian_keys["owner"].guardian.id)
    header = loaded.header
    assert header.name == "web01"
    assert header.policy is SecurityPolicy.SHIELDED
    assert header.created_at == CREATED_AT
    assert header.answer_file_kind is AnswerFileKind.UNATTEND
    assert header.qualifiers == (qualifier,)
    assert loaded.owner.id == guardian_keys["owner"].guardian.id
    expected = sorted(guardian_keys[n].guardian.id for n in ("owner", "fabric", "fabric2"))
    assert list(header.kp_guardians) == expected
    for name in ("owner", "fabric", "fabric2"):
        assert loaded.reveal(guardian_keys[name]) == SECRETS


def test_header_is_public_and_secrets_are_not_in_clear(pdk: bytes) -> None:
    header = load_shielding_data(pdk).header.summary()
    assert header["name"] == "web01"
    assert header["policy"] == "shielded"
    assert {g["name"] for g in header["guardians"]} == {"fabric", "fabric2"}
    flat = json.dumps(body_of(pdk))
    for secret in (PASSWORD, "secret-answer", "secret-file", "secret-host-key"):
        assert secret not in flat
        assert b64url_encode(secret.encode()) not in flat


def test_each_file_gets_a_fresh_pdk_id(guardian_keys: Keys) -> None:
    ids = {
        load_shielding_data(
            create_shielding_data(
                guardian_keys["owner"],
                [doc(guardian_keys["fabric"])],
                policy=SecurityPolicy.ENCRYPTION_SUPPORTED,
                secrets=ShieldingSecrets(admin=AdminCredentials("root", "pw")),
                name="n",
                created_at=0,
            )
        ).header.pdk_id
        for _ in range(3)
    }
    assert len(ids) == 3


def test_reprs_hide_secrets(pdk: bytes, guardian_keys: Keys) -> None:
    loaded = load_shielding_data(pdk)
    secrets = loaded.reveal(guardian_keys["fabric"])
    for text in (repr(loaded), repr(secrets), repr(secrets.admin), str(secrets)):
        assert PASSWORD not in text
        assert "Administrator" not in text
        assert "secret" not in text


# --- signed by a non-owner ----------------------------------------------------------------


def test_resigned_by_a_non_owner_keeping_the_owner_document(
    pdk: bytes, guardian_keys: Keys
) -> None:
    forged = signed(body_of(pdk), guardian_keys["mallory"])
    with pytest.raises(VerificationError, match="signature does not verify"):
        load_shielding_data(forged)


def test_owner_replaced_by_the_signer_is_caught_by_the_pin_and_by_the_aad(
    pdk: bytes, guardian_keys: Keys
) -> None:
    forged = become_owner(body_of(pdk), guardian_keys["mallory"])
    owner_id = guardian_keys["owner"].guardian.id
    with pytest.raises(VerificationError, match="not the expected owner"):
        load_shielding_data(forged, expected_owner=owner_id)
    # Unpinned, it is a valid file of mallory's -- but the owner's secrets stay shut.
    loaded = load_shielding_data(forged)
    assert loaded.owner.id == guardian_keys["mallory"].guardian.id
    with pytest.raises(VerificationError, match="decryption failed"):
        loaded.reveal(guardian_keys["fabric"])


def test_owner_replaced_without_faking_the_bindings_fails_the_public_checks(
    pdk: bytes, guardian_keys: Keys
) -> None:
    body = body_of(pdk)
    body["header"]["owner"] = doc(guardian_keys["mallory"]).decode()
    renormalize(body["header"])
    with pytest.raises(VerificationError, match="not bound to this header"):
        load_shielding_data(signed(body, guardian_keys["mallory"]))
    body["secrets"]["aad"] = b64url_encode(ShieldingDataHeader.from_dict(body["header"]).aad())
    with pytest.raises(VerificationError, match="not an expected key wrapping"):
        load_shielding_data(signed(body, guardian_keys["mallory"]))


def test_key_id_must_name_the_owner(pdk: bytes, guardian_keys: Keys) -> None:
    owner = guardian_keys["owner"]
    header = {"alg": "ES256", "typ": PDK_JWS_TYPE, "kid": guardian_keys["mallory"].guardian.id}
    token = jws.serialize_compact(header, canonical_json(body_of(pdk)), owner.signing_key)
    with pytest.raises(VerificationError, match="key id"):
        load_shielding_data(token.encode())


def test_another_owner_signed_document_type_is_not_a_pdk(pdk: bytes, guardian_keys: Keys) -> None:
    forged = signed(body_of(pdk), guardian_keys["owner"], typ="guardfab-guardian+jws")
    with pytest.raises(VerificationError, match="expected type"):
        load_shielding_data(forged)
    with pytest.raises(FormatError, match="type is not"):
        load_shielding_data(doc(guardian_keys["owner"]))


def test_sealed_secrets_swapped_under_the_owner_signature(pdk: bytes, guardian_keys: Keys) -> None:
    """AEAD does not authenticate a sender: the owner signature must cover the JWE."""
    body = body_of(pdk)
    header = ShieldingDataHeader.from_dict(body["header"])
    evil = ShieldingSecrets(admin=AdminCredentials("Administrator", "attacker-chosen"))
    body["secrets"] = seal(evil, header.recipients(), aad=header.aad())
    with pytest.raises(VerificationError, match="signature does not verify"):
        load_shielding_data(keep_signature(pdk, body))


# --- header edits --------------------------------------------------------------------------


def _policy(h: dict[str, Any], _: Keys) -> None:
    h["policy"] = "encryption-supported"


def _drop_guardian(h: dict[str, Any], _: Keys) -> None:
    h["guardians"] = h["guardians"][:1]


def _add_guardian(h: dict[str, Any], _: Keys) -> None:
    h["guardians"].append(doc(INTRUDER).decode())


def _qualifier_rule(h: dict[str, Any], _: Keys) -> None:
    h["qualifiers"][0]["rule"] = "greater-than"
    h["qualifiers"][0]["disk_version"] = "0.0.0.0"


def _drop_qualifier(h: dict[str, Any], _: Keys) -> None:
    h["qualifiers"] = []


def _answer_kind(h: dict[str, Any], _: Keys) -> None:
    h["answer_file_kind"] = "cloud-init"


def _rename(h: dict[str, Any], _: Keys) -> None:
    h["name"] = "db01"


HEADER_EDITS: dict[str, Callable[[dict[str, Any], Keys], None]] = {
    "policy shielded -> encryption-supported": _policy,
    "a guardian removed": _drop_guardian,
    "a guardian added": _add_guardian,
    "a qualifier loosened": _qualifier_rule,
    "a qualifier removed": _drop_qualifier,
    "answer file kind changed": _answer_kind,
    "renamed": _rename,
}


@pytest.mark.parametrize("edit", HEADER_EDITS, ids=list(HEADER_EDITS))
def test_header_edit_under_the_owner_signature_is_rejected(
    edit: str, pdk: bytes, guardian_keys: Keys
) -> None:
    body = body_of(pdk)
    HEADER_EDITS[edit](body["header"], guardian_keys)
    renormalize(body["header"])
    with pytest.raises(VerificationError, match="signature does not verify"):
        load_shielding_data(keep_signature(pdk, body))


@pytest.mark.parametrize("edit", HEADER_EDITS, ids=list(HEADER_EDITS))
def test_header_edit_resigned_by_an_attacker_owner_does_not_open_the_secrets(
    edit: str, pdk: bytes, guardian_keys: Keys
) -> None:
    body = body_of(pdk)
    HEADER_EDITS[edit](body["header"], guardian_keys)
    forged = load_shielding_data(become_owner(body, guardian_keys["mallory"]))
    readers = [
        n for n in ("fabric", "fabric2") if forged.header.guardian(guardian_keys[n].guardian.id)
    ]
    assert readers
    for name in readers:
        with pytest.raises(VerificationError, match="decryption failed"):
            forged.reveal(guardian_keys[name])


# --- malformed, truncated, oversized, wrong version ----------------------------------------


def _resigned_by_owner(edit: Callable[[dict[str, Any]], None]) -> Callable[[bytes, Keys], bytes]:
    """Forgeries only the owner could make: they test parsing behind the signature."""

    def forge(data: bytes, keys: Keys) -> bytes:
        body = body_of(data)
        edit(body)
        return signed(body, keys["owner"])

    return forge


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = body
        for part in parents:
            target = target[part]
        target[last] = value

    return edit


def _flip_ciphertext(body: dict[str, Any]) -> None:
    ciphertext = bytearray(b64url_decode(body["secrets"]["ciphertext"], what="t"))
    ciphertext[len(ciphertext) // 2] ^= 0x01
    body["secrets"]["ciphertext"] = b64url_encode(bytes(ciphertext))


def _drop_recipient(body: dict[str, Any]) -> None:
    body["secrets"]["recipients"] = body["secrets"]["recipients"][:-1]


def _unsorted_guardians(body: dict[str, Any]) -> None:
    body["header"]["guardians"].reverse()


def _stale_kp(body: dict[str, Any]) -> None:
    body["header"]["kp_guardians"] = body["header"]["kp_guardians"][:-1]


def _zip_header(body: dict[str, Any]) -> None:
    body["secrets"]["protected"] = b64url_encode(b'{"enc":"A256GCM","zip":"DEF"}')


def _wrong_wrapping_alg(body: dict[str, Any]) -> None:
    body["secrets"]["recipients"][0]["header"]["alg"] = "RSA-OAEP-256"


def _non_canonical(data: bytes, keys: Keys) -> bytes:
    return signed(json.dumps(body_of(data), indent=1).encode(), keys["owner"])


def _duplicate_key(data: bytes, keys: Keys) -> bytes:
    raw = canonical_json(body_of(data))
    return signed(b'{"version":2,' + raw[1:], keys["owner"])


def _kps_owner(data: bytes, _: Keys) -> bytes:
    kps = new_guardian_keys("kps-owner", KeyAlgorithm.EC_P256, GuardianKind.KPS)
    body = body_of(data)
    body["header"]["owner"] = doc(kps).decode()
    renormalize(body["header"])
    return signed(body, kps)


def _huge_created_at(data: bytes, keys: Keys) -> bytes:
    """An integer JSON allows but RFC 8785 cannot represent (above 2**53)."""
    body = body_of(data)
    body["header"]["created_at"] = 2**60
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return signed(raw, keys["owner"])


FORGERIES: dict[str, tuple[Callable[[bytes, Keys], bytes], type[Exception], str]] = {
    "version 2": (_resigned_by_owner(_set("version", 2)), FormatError, "version 2"),
    "version as text": (_resigned_by_owner(_set("version", "1")), FormatError, "version '1'"),
    "version true": (_resigned_by_owner(_set("version", True)), FormatError, "version True"),
    "another type": (_resigned_by_owner(_set("type", "guardfab.kp")), FormatError, "type"),
    "unknown top field": (_resigned_by_owner(_set("extra", 1)), FormatError, "unknown field"),
    "unknown header field": (
        _resigned_by_owner(_set("header.comment", "x")),
        FormatError,
        "unknown field",
    ),
    "created_at negative": (
        _resigned_by_owner(_set("header.created_at", -1)),
        FormatError,
        "created_at",
    ),
    "created_at beyond 2**53": (_huge_created_at, FormatError, "cannot be canonical"),
    "policy unknown": (_resigned_by_owner(_set("header.policy", "open")), FormatError, "policy"),
    "pdk_id short": (_resigned_by_owner(_set("header.pdk_id", "abc")), FormatError, "pdk_id"),
    "guardians unsorted": (_resigned_by_owner(_unsorted_guardians), FormatError, "sorted"),
    "no guardians": (_resigned_by_owner(_set("header.guardians", [])), FormatError, "1 to 15"),
    "kp_guardians stale": (_resigned_by_owner(_stale_kp), FormatError, "normal form"),
    "guardian not a document": (
        _resigned_by_owner(_set("header.guardians", [7])),
        FormatError,
        "guardian document",
    ),
    "owner is a KPS guardian": (_kps_owner, FormatError, "tenant guardian"),
    "ciphertext flipped": (_resigned_by_owner(_flip_ciphertext), None, "decryption failed"),
    "a guardian's wrapping dropped": (
        _resigned_by_owner(_drop_recipient),
        VerificationError,
        "not sealed for exactly",
    ),
    "wrapping algorithm swapped": (
        _resigned_by_owner(_wrong_wrapping_alg),
        VerificationError,
        "not an expected key wrapping",
    ),
    "compression requested": (_resigned_by_owner(_zip_header), FormatError, "exactly enc"),
    "secrets not a JWE": (
        _resigned_by_owner(_set("secrets", "sealed")),
        FormatError,
        "JSON object",
    ),
    "payload not canonical": (_non_canonical, FormatError, "canonical"),
    "duplicate JSON key": (_duplicate_key, FormatError, "canonical"),
}


@pytest.mark.parametrize("forgery", FORGERIES, ids=list(FORGERIES))
def test_malformed_files_are_refused(forgery: str, pdk: bytes, guardian_keys: Keys) -> None:
    forge, error, match = FORGERIES[forgery]
    data = forge(pdk, guardian_keys)
    if error is None:  # passes the public checks; only decryption can tell
        loaded = load_shielding_data(data)
        with pytest.raises(VerificationError, match=match):
            loaded.reveal(guardian_keys["fabric"])
        return
    with pytest.raises(error, match=match):
        load_shielding_data(data)


@pytest.mark.parametrize("cut", [0, 1, 10, 100, 1000, -100, -10, -2])
def test_truncated_files_are_refused(cut: int, pdk: bytes) -> None:
    with pytest.raises(InvalidInputError):
        load_shielding_data(pdk[:cut])


def test_oversized_files_are_refused_before_parsing() -> None:
    with pytest.raises(FormatError, match="larger than the limit"):
        load_shielding_data(b"a" * (MAX_SHIELDING_DATA_BYTES + 1))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xfe", b"a.b", b"a.b.c", b"..", "é.é.é".encode(), b"{}", b"null"],
)
def test_garbage_is_refused_with_a_typed_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        load_shielding_data(data)


def test_a_flipped_signature_byte_is_refused(pdk: bytes) -> None:
    head, payload, sig = pdk.decode().strip().split(".")
    raw = bytearray(b64url_decode(sig, what="t"))
    raw[0] ^= 0x80
    with pytest.raises(VerificationError):
        load_shielding_data(f"{head}.{payload}.{b64url_encode(bytes(raw))}".encode())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_refused_or_harmless(pdk: bytes, position: int, bit: int) -> None:
    """Base64 has spare bits in a segment's last character; those change no byte."""
    data = bytearray(pdk)
    data[position % len(data)] ^= 1 << bit
    try:
        loaded = load_shielding_data(bytes(data))
    except InvalidInputError:
        return
    assert loaded.header == load_shielding_data(pdk).header


@given(st.binary(max_size=2048))
def test_loader_raises_only_invalid_input(data: bytes) -> None:
    with contextlib.suppress(InvalidInputError):
        load_shielding_data(data)


# --- opened by a non-guardian and other reveal attacks -------------------------------------


def test_opened_by_a_non_guardian(pdk: bytes, guardian_keys: Keys) -> None:
    loaded = load_shielding_data(pdk)
    with pytest.raises(NotAuthorizedError, match="neither its owner nor one of its guardians"):
        loaded.reveal(guardian_keys["mallory"])


def test_a_non_guardian_cannot_decrypt_even_past_the_id_check(
    pdk: bytes, guardian_keys: Keys
) -> None:
    """The id check is a courtesy: the cryptography refuses a key that is not wrapped for."""
    loaded = load_shielding_data(pdk)
    fabric_kid = guardian_keys["fabric"].guardian.encryption_kid
    with pytest.raises(VerificationError):
        unseal(
            loaded.sealed_secrets,
            fabric_kid,
            guardian_keys["mallory"].encryption_key,
            aad=loaded.header.aad(),
        )


def test_a_guardian_identity_with_someone_elses_encryption_key(
    pdk: bytes, guardian_keys: Keys
) -> None:
    fabric, mallory = guardian_keys["fabric"], guardian_keys["mallory"]
    impostor = GuardianKeys(fabric.guardian, mallory.signing_key, mallory.encryption_key)
    with pytest.raises(NotAuthorizedError, match="encryption key given"):
        load_shielding_data(pdk).reveal(impostor)


def test_secrets_that_disagree_with_the_header_are_refused(pdk: bytes, guardian_keys: Keys) -> None:
    """Only the owner can make this file; a careless tool might."""
    body = body_of(pdk)
    body["header"]["answer_file_kind"] = "none"
    header = ShieldingDataHeader.from_dict(body["header"])
    body["secrets"] = seal(SECRETS, header.recipients(), aad=header.aad())
    loaded = load_shielding_data(signed(body, guardian_keys["owner"]))
    with pytest.raises(FormatError, match="not the kind the header names"):
        loaded.reveal(guardian_keys["fabric"])


# --- refusals at creation ---------------------------------------------------------------


def _create(keys: Keys, guardians: list[bytes], **changes: Any) -> bytes:
    args: dict[str, Any] = {
        "policy": SecurityPolicy.SHIELDED,
        "secrets": SECRETS,
        "name": "web01",
        "created_at": CREATED_AT,
        **changes,
    }
    return create_shielding_data(keys["owner"], guardians, **args)


def test_creation_refuses_a_bad_guardian_set(guardian_keys: Keys) -> None:
    fabric = doc(guardian_keys["fabric"])
    with pytest.raises(FormatError, match="1 to 15"):
        _create(guardian_keys, [])
    with pytest.raises(FormatError, match="listed twice"):
        _create(guardian_keys, [fabric, fabric])
    with pytest.raises(FormatError, match="owner is listed again"):
        _create(guardian_keys, [fabric, doc(guardian_keys["owner"])])
    many = [doc(new_guardian_keys(f"g{i}", KeyAlgorithm.EC_P256)) for i in range(16)]
    with pytest.raises(FormatError, match="1 to 15"):
        _create(guardian_keys, many)


def test_creation_refuses_a_tampered_guardian_document(guardian_keys: Keys) -> None:
    fabric, mallory = guardian_keys["fabric"], guardian_keys["mallory"]
    head, payload, sig = doc(fabric).decode().split(".")
    body = json.loads(b64url_decode(payload, what="t"))
    body["encryption_key"] = jose.public_jwk(mallory.encryption_key)
    swapped = f"{head}.{b64url_encode(canonical_json(body))}.{sig}".encode()
    with pytest.raises(VerificationError, match="guardian"):
        _create(guardian_keys, [swapped])


def test_creation_refuses_bad_header_values(
    guardian_keys: Keys, qualifier: VolumeIdQualifier
) -> None:
    fabric = [doc(guardian_keys["fabric"])]
    with pytest.raises(FormatError, match="name"):
        _create(guardian_keys, fabric, name="")
    with pytest.raises(FormatError, match="control"):
        _create(guardian_keys, fabric, name="a\nb")
    with pytest.raises(FormatError, match="created_at"):
        _create(guardian_keys, fabric, created_at=-5)
    with pytest.raises(FormatError, match="policy"):
        _create(guardian_keys, fabric, policy="lax")
    with pytest.raises(FormatError, match="qualifier is listed twice"):
        _create(guardian_keys, fabric, qualifiers=[qualifier, qualifier])


def test_creation_refuses_a_file_over_the_document_limit(
    guardian_keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sd, "MAX_SHIELDING_DATA_BYTES", 1000)
    with pytest.raises(FormatError, match="over the limit"):
        _create(guardian_keys, [doc(guardian_keys["fabric"])])


def test_largest_allowed_pdk_round_trips(guardian_keys: Keys) -> None:
    """384 KiB of files, the biggest certificate and key: within every limit on the way."""
    files = {f"f{i:02d}": bytes([i]) * (12 * 1024) for i in range(31)}
    answer = AnswerFile(AnswerFileKind.CLOUD_INIT, b"#" * (384 * 1024 - 31 * 12 * 1024))
    big = ShieldingSecrets(
        admin=AdminCredentials("root", "p" * 1024),
        answer_file=answer,
        files=files,
        host_certificate=HostCertificate(HostCertificateKind.RDP, b"c" * 16384, b"k" * 16384),
    )
    data = _create(guardian_keys, [doc(guardian_keys["fabric"])], secrets=big)
    assert len(data) < MAX_SHIELDING_DATA_BYTES
    assert load_shielding_data(data).reveal(guardian_keys["fabric"]) == big


def test_loaded_header_survives_its_own_dict(pdk: bytes) -> None:
    header = load_shielding_data(pdk).header
    assert ShieldingDataHeader.from_dict(header.to_dict()) == header
    assert isinstance(load_shielding_data(pdk), ShieldingData)
