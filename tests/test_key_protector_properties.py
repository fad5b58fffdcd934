"""Property tests: KPs round-trip for any guardian set, and the loader only ever
returns an equal KP or raises InvalidInputError, whatever the bytes."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardfab.errors import InvalidInputError, NotAuthorizedError
from guardfab.formats.encoding import b64url_decode
from guardfab.formats.key_protector import (
    KeyProtector,
    TransportKey,
    create_key_protector,
    grant,
    load_key_protector,
    rekey,
    revoke,
)
from test_key_protector_keyring import KPS, TENANT, flip_b64, keyring, sign_payload, split

RING = keyring()
OWNERS = RING.named(TENANT)
# Every guardian except the slow-to-use RSA one (it has a test of its own) may be a member.
MEMBERS = sorted(n for n in RING.keys if n != "kps-rsa")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_content(a: KeyProtector, b: KeyProtector) -> bool:
    """Equal in everything that matters (the file bytes may differ, e.g. a newline)."""
    return dataclasses.replace(a, raw=b"") == dataclasses.replace(b, raw=b"")


@st.composite
def protectors(draw: st.DrawFn) -> tuple[bytes, TransportKey, str, list[str]]:
    owner = draw(st.sampled_from(OWNERS))
    others = draw(
        st.lists(st.sampled_from([m for m in MEMBERS if m != owner]), min_size=1, unique=True)
    )
    data, key = create_key_protector(RING[owner], [RING.doc(n) for n in others])
    return data, key, owner, others


@FAST
@given(protectors())
def test_round_trip_for_any_guardian_set(made: tuple[bytes, TransportKey, str, list[str]]) -> None:
    data, key, owner, others = made
    kp = load_key_protector(data, expected_owner=RING[owner].guardian.id)
    members = [owner, *others]
    assert set(kp.guardian_ids) == {RING[n].guardian.id for n in members}
    assert list(kp.guardian_ids) == sorted(kp.guardian_ids)
    assert {g.kind for g in kp.guardians} == {RING[n].guardian.kind for n in members}
    assert (kp.generation, kp.signer) == (0, kp.owner)
    for name in members:
        assert kp.unwrap(RING[name]) == key
    for name in set(RING.keys) - set(members):
        try:
            kp.unwrap(RING[name])
        except NotAuthorizedError:
            continue
        raise AssertionError(f"{name} unwrapped a KP it is no guardian of")
    assert same_content(load_key_protector(kp.raw), kp)


Op = tuple[str, str]


@FAST
@given(
    protectors(),
    st.lists(
        st.tuples(st.sampled_from(["grant", "revoke", "rekey"]), st.sampled_from(MEMBERS)),
        max_size=6,
    ),
)
def test_any_history_of_grants_revokes_and_rekeys(
    made: tuple[bytes, TransportKey, str, list[str]], ops: list[Op]
) -> None:
    """A model of the set and the key stays in step with every KP generation."""
    data, key, owner, others = made
    model = {owner, *others}
    kp = load_key_protector(data)
    for op, name in ops:
        kp, key, model = apply(kp, key, model, owner, op, name)
        assert set(kp.guardian_ids) == {RING[n].guardian.id for n in model}
        assert kp.unwrap(RING[owner]) == key
        assert kp.owner == RING[owner].guardian.id


def apply(
    kp: KeyProtector, key: TransportKey, model: set[str], owner: str, op: str, name: str
) -> tuple[KeyProtector, TransportKey, set[str]]:
    """Do ``op`` if the model says it is allowed; otherwise keep the KP as it is."""
    before = kp.generation
    if op == "grant" and name not in model:
        kp = load_key_protector(grant(kp, RING[owner], RING.doc(name)))
        model = model | {name}
    elif op == "revoke" and name in model and name != owner and len(model) > 2:
        kp = load_key_protector(revoke(kp, RING[owner], RING[name].guardian.id))
        model = model - {name}
    elif op == "rekey" and name in model and RING[name].guardian.kind is KPS:
        data, old, new = rekey(kp, RING[name])
        assert old == key
        assert new != key
        kp, key = load_key_protector(data), new
    else:
        return kp, key, model
    assert kp.generation == before + 1
    return kp, key, model


#: A few made KPs (owner-made, re-keyed, RSA member) to mutate: making one per example
#: would only slow the tests down.
SAMPLES = [
    create_key_protector(RING["owner"], [RING.doc("kps1")])[0],
    rekey(
        load_key_protector(
            create_key_protector(RING["owner2"], [RING.doc("kps2"), RING.doc("cotenant")])[0]
        ),
        RING["kps2"],
    )[0],
    create_key_protector(RING["owner"], [RING.doc("kps-rsa")])[0],
]


def base_kp() -> st.SearchStrategy[bytes]:
    return st.sampled_from(SAMPLES)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_kp(), st.data())
def test_any_byte_change_is_rejected_or_harmless(data: bytes, choice: st.DataObject) -> None:
    original = load_key_protector(data)
    index = choice.draw(st.integers(0, len(data) - 1), label="index")
    value = choice.draw(st.integers(0, 255).filter(lambda v: v != data[index]), label="value")
    mutated = data[:index] + bytes([value]) + data[index + 1 :]
    assert_rejected_or_same(mutated, original)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_kp(), st.data())
def test_any_truncation_is_rejected(data: bytes, choice: st.DataObject) -> None:
    original = load_key_protector(data)
    cut = choice.draw(st.integers(0, len(data) - 1), label="length")
    assert_rejected_or_same(data[:cut], original)


def assert_rejected_or_same(mutated: bytes, original: KeyProtector) -> None:
    """Reject, or (white space, a base64 spare bit in the signature) load the same KP."""
    try:
        loaded = load_key_protector(mutated)
    except InvalidInputError:
        return
    assert same_content(loaded, original)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_invalid_input(data: bytes) -> None:
    with contextlib.suppress(InvalidInputError):
        load_key_protector(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
#: Where a value can be swapped in: top-level fields and the wrapping's insides.
PATHS = [
    ("version",),
    ("kp_id",),
    ("generation",),
    ("owner",),
    ("signer",),
    ("guardians",),
    ("guardians", 0),
    ("guardian_set",),
    ("wrapping",),
    ("wrapping", "protected"),
    ("wrapping", "aad"),
    ("wrapping", "iv"),
    ("wrapping", "recipients"),
    ("wrapping", "recipients", 0),
    ("wrapping", "recipients", 0, "header"),
    ("wrapping", "recipients", 0, "header", "epk"),
    ("wrapping", "recipients", 0, "header", "alg"),
    ("wrapping", "recipients", 0, "encrypted_key"),
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), JSON)
def test_owner_signed_nonsense_in_any_field_is_rejected(path: tuple[Any, ...], value: Any) -> None:
    """Past the signature check (the owner signs it), any field may hold any JSON."""
    _, payload = split(SAMPLES[0])
    target = payload
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with contextlib.suppress(InvalidInputError):
        load_key_protector(sign_payload(payload, RING["owner"]))


WRAPPING_PARTS = ["iv", "ciphertext", "tag", "aad"]


@FAST
@given(base_kp(), st.sampled_from(WRAPPING_PARTS), st.data())
def test_unwrap_of_a_tampered_wrapping_raises_only_invalid_input(
    data: bytes, part: str, choice: st.DataObject
) -> None:
    """Even when the loader's checks are skipped, a wrong byte never yields a key."""
    kp = load_key_protector(data)
    size = len(b64url_decode(kp.wrapping[part], what="test"))
    index = choice.draw(st.integers(0, size - 1), label="byte")
    wrapping: dict[str, Any] = {**kp.wrapping, part: flip_b64(kp.wrapping[part], index)}
    forged = dataclasses.replace(kp, wrapping=wrapping)
    holder = next(n for n in RING.keys if RING[n].guardian.id == kp.signer)
    try:
        forged.unwrap(RING[holder])
    except InvalidInputError:
        return
    raise AssertionError(f"a flipped byte in {part} still unwrapped")
