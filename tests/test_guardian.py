"""Guardian documents and the local guardian store."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardfab.errors import (
    FormatError,
    InvalidInputError,
    NotAuthorizedError,
    UsageError,
    VerificationError,
)
from guardfab.formats import guardian as module
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.guardian import (
    GuardianKind,
    KeyAlgorithm,
    load_guardian_document,
    sign_guardian_document,
    validate_name,
)
from guardfab.tenant.guardians import GuardianKeys, GuardianStore, new_guardian_keys

# For hypothesis tests, which cannot take function-scoped fixtures.
_CACHED_KEYS = new_guardian_keys("cached", KeyAlgorithm.EC_P256)


def _document(keys: GuardianKeys) -> bytes:
    return sign_guardian_document(keys.guardian, keys.signing_key)


def test_document_round_trip(guardian_keys: dict[str, GuardianKeys]) -> None:
    keys = guardian_keys["owner"]
    loaded = load_guardian_document(_document(keys))
    assert loaded.id == keys.guardian.id
    assert loaded.encryption_kid == keys.guardian.encryption_kid
    assert loaded.name == "owner"
    assert loaded.kind is GuardianKind.TENANT


def _resign_payload(token: bytes, edit: dict[str, object], signer: jose.AsymmetricKey) -> bytes:
    """An attacker's document: the payload edited, then signed with ``signer``."""
    payload = json.loads(b64url_decode(token.decode().split(".")[1], what="t"))
    payload.update(edit)
    return jose.sign_compact(canonical_json(payload), signer, typ="guardfab-guardian+jws").encode()


def test_swapped_encryption_key_is_rejected(guardian_keys: dict[str, GuardianKeys]) -> None:
    owner, mallory = guardian_keys["owner"], guardian_keys["mallory"]
    doc = _document(owner)
    header, payload, sig = doc.decode().split(".")
    body = json.loads(b64url_decode(payload, what="t"))
    body["encryption_key"] = jose.public_jwk(mallory.encryption_key)
    forged = f"{header}.{b64url_encode(canonical_json(body))}.{sig}".encode()
    with pytest.raises(VerificationError):
        load_guardian_document(forged)


def test_document_signed_by_other_key_is_rejected(guardian_keys: dict[str, GuardianKeys]) -> None:
    # Payload names the owner's signing key but the signature is Mallory's.
    forged = _resign_payload(
        _document(guardian_keys["owner"]), {}, guardian_keys["mallory"].signing_key
    )
    with pytest.raises(VerificationError):
        load_guardian_document(forged)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"version": 2}, "version"),
        ({"type": "guardfab.other"}, "type"),
        ({"kind": "root"}, "kind"),
        ({"name": "../etc"}, "name"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_bad_fields_are_rejected(
    guardian_keys: dict[str, GuardianKeys], edit: dict[str, object], message: str
) -> None:
    keys = guardian_keys["owner"]
    forged = _resign_payload(_document(keys), edit, keys.signing_key)
    with pytest.raises(FormatError, match=message):
        load_guardian_document(forged)


def test_private_key_in_document_is_rejected(guardian_keys: dict[str, GuardianKeys]) -> None:
    keys = guardian_keys["owner"]
    leaky = {"encryption_key": keys.encryption_key.as_dict(private=True)}
    with pytest.raises(FormatError, match="private"):
        load_guardian_document(_resign_payload(_document(keys), leaky, keys.signing_key))


@pytest.mark.parametrize(
    "data",
    [b"", b"not a jws", b"a.b.c", b"\xff\xfe", b"x" * 20000, b"e30.e30.e30"],
    ids=["empty", "text", "parts", "binary", "oversized", "empty-json"],
)
def test_garbage_is_rejected_with_format_error(data: bytes) -> None:
    with pytest.raises((FormatError, VerificationError)):
        load_guardian_document(data)


@given(st.integers(min_value=1, max_value=400))
@settings(max_examples=30, deadline=None)
def test_truncated_document_is_rejected(cut: int) -> None:
    keys = _CACHED_KEYS
    doc = _document(keys)
    with pytest.raises((FormatError, VerificationError)):
        load_guardian_document(doc[: max(0, len(doc) - cut)])


@given(st.text(min_size=1, max_size=40))
def test_validate_name_accepts_only_safe_names(name: str) -> None:
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if set(name) <= safe and not name.startswith("."):
        assert validate_name(name) == name
    else:
        with pytest.raises(FormatError):
            validate_name(name)


def test_store_creates_private_keys_0600(home: Path) -> None:
    store = GuardianStore(home)
    g = store.create("alice", KeyAlgorithm.EC_P256)
    directory = home / "guardians" / "alice"
    for name in ("signing-key.pem", "encryption-key.pem"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert store.keys("alice").guardian.id == g.id


def test_store_passphrase_protects_keys(home: Path) -> None:
    store = GuardianStore(home)
    store.create("alice", KeyAlgorithm.EC_P256, passphrase="correct horse")
    pem = (home / "guardians" / "alice" / "signing-key.pem").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    with pytest.raises(NotAuthorizedError):
        store.keys("alice")
    with pytest.raises(NotAuthorizedError):
        store.keys("alice", "wrong")
    assert store.keys("alice", "correct horse").guardian.name == "alice"


def test_store_refuses_duplicate_and_leaves_no_staging(home: Path) -> None:
    store = GuardianStore(home)
    store.create("alice", KeyAlgorithm.EC_P256)
    before = sorted(p.name for p in (home / "guardians").iterdir())
    with pytest.raises(UsageError):
        store.create("alice", KeyAlgorithm.EC_P256)
    assert sorted(p.name for p in (home / "guardians").iterdir()) == before


def test_store_import_is_public_only(home: Path, guardian_keys: dict[str, GuardianKeys]) -> None:
    store = GuardianStore(home)
    g = store.add_public(_document(guardian_keys["fabric"]), name="hgs")
    assert store.names() == ["hgs"]
    assert not store.has_private_keys("hgs")
    assert store.find_by_id(g.id) == "hgs"
    with pytest.raises(UsageError, match="no private key"):
        store.keys("hgs")


def test_store_detects_mismatched_private_key(home: Path) -> None:
    store = GuardianStore(home)
    store.create("alice", KeyAlgorithm.EC_P256)
    store.create("bob", KeyAlgorithm.EC_P256)
    alice_dir, bob_dir = home / "guardians" / "alice", home / "guardians" / "bob"
    (alice_dir / "encryption-key.pem").write_bytes((bob_dir / "encryption-key.pem").read_bytes())
    with pytest.raises(FormatError, match="encryption key does not match"):
        store.keys("alice")


def test_failed_import_writes_nothing(home: Path) -> None:
    store = GuardianStore(home)
    with pytest.raises((FormatError, VerificationError)):
        store.add_public(b"garbage")
    assert store.names() == []


def test_kps_key_generations_are_self_signed_and_written_only_from_1() -> None:
    kps = new_guardian_keys("kps", KeyAlgorithm.EC_P256, GuardianKind.KPS)
    first = sign_guardian_document(kps.guardian, kps.signing_key)
    assert b"key_generation" not in b64url_decode(first.split(b".")[1].decode(), what="t")
    later = dataclasses.replace(kps.guardian, key_generation=3)
    loaded = load_guardian_document(sign_guardian_document(later, kps.signing_key))
    assert (loaded.id, loaded.key_generation) == (kps.guardian.id, 3)
    zero = {**kps.guardian.payload(), "key_generation": 0}
    token = jose.sign_compact(canonical_json(zero), kps.signing_key, typ=module.GUARDIAN_JWS_TYPE)
    with pytest.raises(FormatError, match="only from 1 on"):
        load_guardian_document(token.encode())
    tenant = new_guardian_keys("tenant", KeyAlgorithm.EC_P256)
    with pytest.raises(FormatError, match="only a 'kps' guardian"):
        dataclasses.replace(tenant.guardian, key_generation=1)
    claimed = {**tenant.guardian.payload(), "key_generation": 1}
    token = jose.sign_compact(
        canonical_json(claimed), tenant.signing_key, typ=module.GUARDIAN_JWS_TYPE
    )
    with pytest.raises(FormatError, match="only a 'kps' guardian"):
        load_guardian_document(token.encode())


def test_verified_documents_are_cached_by_their_exact_bytes() -> None:
    keys = new_guardian_keys("cached", KeyAlgorithm.EC_P256)
    document = sign_guardian_document(keys.guardian, keys.signing_key)
    assert load_guardian_document(document) is load_guardian_document(bytearray(document))
    header, body, signature = document.split(b".")
    tampered = b".".join(
        [header, body, signature[:-2] + (b"AA" if signature[-2:] != b"AA" else b"BA")]
    )
    with pytest.raises(InvalidInputError):
        load_guardian_document(tampered)
    with pytest.raises(InvalidInputError):  # failures are never cached
        load_guardian_document(tampered)
    for i in range(module.DOCUMENT_CACHE_SIZE + 1):
        other = new_guardian_keys(f"g{i}", KeyAlgorithm.EC_P256) if i < 2 else keys
        load_guardian_document(sign_guardian_document(other.guardian, other.signing_key))
    assert len(module._VERIFIED._items) <= module.DOCUMENT_CACHE_SIZE
