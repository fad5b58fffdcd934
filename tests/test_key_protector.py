"""Key protectors under attack: every tampering, substitution or wrong signer is caught.

The attack table follows python-tuf's key-rotation tests: each row forges a KP
the way an attacker holding some keys (or none) could, and names the error the
loader -- or, when the forgery is self-consistent, the unwrap -- must raise.
Forgeries are re-signed by whoever the attacker can sign as, so each row is
caught only by the check it is about.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from joserfc.jwk import ECKey

from guardfab.errors import (
    FormatError,
    InvalidInputError,
    NotAuthorizedError,
    VerificationError,
)
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.guardian import (
    GUARDIAN_JWS_TYPE,
    Guardian,
    KeyAlgorithm,
    load_guardian_document,
    sign_guardian_document,
)
from guardfab.formats.key_protector import (
    GUARDIAN_SET_JWS_TYPE,
    KP_JWS_TYPE,
    MAX_GUARDIANS,
    MAX_KP_BYTES,
    create_key_protector,
    load_key_protector,
    wrapping_aad,
)
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys
from test_key_protector_keyring import (
    KPS,
    Ctx,
    assert_no_secret,
    flip_b64,
    make_ctx,
    sign_payload,
    sign_set,
    split,
)

# --- the honest KPs every attack starts from -------------------------------------------


@pytest.fixture(scope="module")
def ctx() -> Ctx:
    return make_ctx()


# --- forging helpers ------------------------------------------------------------------

Payload = dict[str, Any]


def forge(c: Ctx, mutate: Callable[[Payload], None], *, signer: str = "owner") -> bytes:
    """Edit the base KP's payload and re-sign it as ``signer``."""
    _, payload = split(c.base)
    payload = copy.deepcopy(payload)
    mutate(payload)
    return sign_payload(payload, c.ring[signer])


def unsigned_edit(data: bytes, mutate: Callable[[Payload], None]) -> bytes:
    """Edit the payload but keep the original header and signature."""
    header, payload, signature = data.decode("ascii").strip().split(".")
    body = json.loads(b64url_decode(payload, what="test"))
    mutate(body)
    return f"{header}.{b64url_encode(canonical_json(body))}.{signature}".encode()


def docs_by_id(payload: Payload) -> dict[str, str]:
    return {load_guardian_document(d.encode()).id: d for d in payload["guardians"]}


def recipients(payload: Payload) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = payload["wrapping"]["recipients"]
    return result


def resign_set_as(c: Ctx, payload: Payload, names: list[str], *, signer: str, owner: str) -> None:
    """Make ``payload`` a self-consistent KP for ``names`` owned by ``owner``, wrapping
    the real transport key (which a KPS or the owner could know) to that set."""
    rebuild(c, payload, [c.ring[n] for n in names], owner=c.ring[owner])
    payload["signer"] = c.guardian(signer).id


def rebuild(c: Ctx, payload: Payload, members: list[GuardianKeys], *, owner: GuardianKeys) -> None:
    """Owner, guardians, owner statement and wrapping, all consistent for ``members``."""
    ordered = sorted(members, key=lambda k: k.guardian.id)
    guardians = [k.guardian for k in ordered]
    generation, owner_id = payload["generation"], owner.guardian.id
    payload["owner"] = payload["signer"] = owner_id
    payload["guardians"] = [
        sign_guardian_document(k.guardian, k.signing_key).decode() for k in ordered
    ]
    payload["guardian_set"] = sign_set(owner, payload["kp_id"], generation, owner_id, guardians)
    aad = wrapping_aad(payload["kp_id"], generation, owner_id, [g.id for g in guardians])
    payload["wrapping"] = jose.encrypt_to_recipients(
        c.key.reveal(), [(g.encryption_kid, g.encryption_key) for g in guardians], aad=aad
    )


@functools.cache
def crowd() -> list[GuardianKeys]:
    """Enough extra guardians to go past the cap."""
    return [new_guardian_keys(f"extra-{i}", KeyAlgorithm.EC_P256) for i in range(MAX_GUARDIANS)]


def owner_built(members: Callable[[Ctx], list[GuardianKeys]]) -> Callable[[Ctx], bytes]:
    """A KP the owner builds by hand for ``members``, bypassing create_key_protector."""

    def make(c: Ctx) -> bytes:
        return forge(c, lambda p: rebuild(c, p, members(c), owner=c.ring["owner"]))

    return make


def twin_of_cotenant(c: Ctx) -> list[GuardianKeys]:
    """owner, cotenant, and a guardian with its own signing key but cotenant's encryption key."""
    signing = new_guardian_keys("twin", KeyAlgorithm.EC_P256).signing_key
    cotenant = c.ring["cotenant"]
    twin = Guardian(
        "twin",
        cotenant.guardian.kind,
        jose.import_public_jwk(jose.public_jwk(signing), what="test"),
        cotenant.guardian.encryption_key,
    )
    return [c.ring["owner"], cotenant, GuardianKeys(twin, signing, cotenant.encryption_key)]


def set_field(name: str, value: Any) -> Callable[[Payload], None]:
    def mutate(payload: Payload) -> None:
        payload[name] = value

    return mutate


def flip_wrapping(name: str) -> Callable[[Payload], None]:
    def mutate(payload: Payload) -> None:
        payload["wrapping"][name] = flip_b64(payload["wrapping"][name])

    return mutate


def flip_all_encrypted_keys(payload: Payload) -> None:
    for r in recipients(payload):
        r["encrypted_key"] = flip_b64(r["encrypted_key"])


def swap_all_epks(payload: Payload) -> None:
    """Replace every ephemeral key with a fresh one on the same curve."""
    for r in recipients(payload):
        crv = r["header"]["epk"]["crv"]
        r["header"]["epk"] = jose.public_jwk(ECKey.generate_key(crv))


# --- file-level attacks (no key at all) ------------------------------------------------


def flipped_payload_not_resigned(c: Ctx) -> bytes:
    return unsigned_edit(c.base, flip_wrapping("ciphertext"))


def flipped_signature(c: Ctx) -> bytes:
    header, payload, signature = c.base.decode().strip().split(".")
    return f"{header}.{payload}.{flip_b64(signature, 5)}".encode()


def kid_points_at_kps(c: Ctx) -> bytes:
    header, payload, signature = c.base.decode().strip().split(".")
    fields = json.loads(b64url_decode(header, what="test"))
    fields["kid"] = c.guardian("kps1").id
    return f"{b64url_encode(canonical_json(fields))}.{payload}.{signature}".encode()


def alg_none(c: Ctx) -> bytes:
    header = {"alg": "none", "typ": KP_JWS_TYPE, "kid": c.owner_id}
    payload = c.base.decode().strip().split(".")[1]
    return f"{b64url_encode(canonical_json(header))}.{payload}.".encode()


def hs256_with_public_key(c: Ctx) -> bytes:
    """The classic confusion: HMAC keyed with the owner's *public* key."""
    header = {"alg": "HS256", "typ": KP_JWS_TYPE, "kid": c.owner_id}
    payload = c.base.decode().strip().split(".")[1]
    signing_input = f"{b64url_encode(canonical_json(header))}.{payload}".encode()
    secret = canonical_json(jose.public_jwk(c.guardian("owner").signing_key))
    mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return signing_input + b"." + b64url_encode(mac).encode()


def removed_guardian_not_resigned(c: Ctx) -> bytes:
    cotenant = c.guardian("cotenant")

    def mutate(payload: Payload) -> None:
        payload["guardians"] = [d for i, d in docs_by_id(payload).items() if i != cotenant.id]
        payload["wrapping"]["recipients"] = [
            r for r in recipients(payload) if r["header"]["kid"] != cotenant.encryption_kid
        ]

    return unsigned_edit(c.base, mutate)


# --- forgeries signed by the owner (isolate the format and wrapping checks) ----------


def with_extra_field(payload: Payload) -> None:
    payload["note"] = "unsigned data riding along"


def non_canonical(c: Ctx) -> bytes:
    _, payload = split(c.base)
    return sign_payload(json.dumps(payload, indent=1).encode(), c.ring["owner"])


def unsorted_guardians(payload: Payload) -> None:
    payload["guardians"] = list(reversed(payload["guardians"]))


def duplicated_guardian(payload: Payload) -> None:
    payload["guardians"] = [payload["guardians"][0], *payload["guardians"]]


def too_many_guardians(payload: Payload) -> None:
    payload["guardians"] = payload["guardians"][:1] * (MAX_GUARDIANS + 1)


def tampered_guardian_document(payload: Payload) -> None:
    header, body, signature = payload["guardians"][0].split(".")
    payload["guardians"][0] = f"{header}.{body}.{flip_b64(signature, 3)}"


def kps_document_of_another_signing_key(c: Ctx) -> bytes:
    """kps1's place taken by a ``kps`` document of mallory's signing key, same name, a newer
    key generation: a KPS is its signing key, so the owner's statement (kps1's id) fails."""

    def mutate(payload: Payload) -> None:
        real, mallory = c.guardian("kps1"), c.ring["mallory"]
        impostor = dataclasses.replace(
            real, signing_key=mallory.guardian.signing_key, key_generation=1
        )
        documents = docs_by_id(payload)
        documents.pop(real.id)
        documents[impostor.id] = sign_guardian_document(impostor, mallory.signing_key).decode()
        payload["guardians"] = [documents[i] for i in sorted(documents)]

    return forge(c, mutate)


def kps_generation_signed_by_another_key(c: Ctx) -> bytes:
    """A key-generation-1 document naming kps1's signing key (so kps1's id) and mallory's
    encryption key, signed by mallory: only kps1's key can make one, so it fails to verify."""

    def mutate(payload: Payload) -> None:
        real, mallory = c.guardian("kps1"), c.ring["mallory"]
        claimed = dataclasses.replace(
            real, encryption_key=mallory.guardian.encryption_key, key_generation=1
        )
        document = jose.sign_compact(
            canonical_json(claimed.payload()), mallory.signing_key, typ=GUARDIAN_JWS_TYPE
        )
        payload["guardians"] = [
            document if i == real.id else d for i, d in sorted(docs_by_id(payload).items())
        ]

    return forge(c, mutate)


def recipient_removed(payload: Payload) -> None:
    payload["wrapping"]["recipients"] = recipients(payload)[:-1]


def recipient_duplicated(payload: Payload) -> None:
    payload["wrapping"]["recipients"] = [recipients(payload)[0]] * len(recipients(payload))


def zip_in_protected_header(payload: Payload) -> None:
    protected = {"enc": "A256GCM", "zip": "DEF"}
    payload["wrapping"]["protected"] = b64url_encode(canonical_json(protected))


def rsa_alg_for_ec_key(payload: Payload) -> None:
    header = recipients(payload)[0]["header"]
    header["alg"] = "RSA-OAEP-256"
    del header["epk"]


def epk_removed(payload: Payload) -> None:
    del recipients(payload)[0]["header"]["epk"]


def iv_of_16_bytes(payload: Payload) -> None:
    payload["wrapping"]["iv"] = b64url_encode(bytes(16))


def swap_recipient_for(name: str) -> Callable[[Ctx], bytes]:
    """Relabel the last wrapping as ``name``'s (the count stays right)."""

    def make(c: Ctx) -> bytes:
        def mutate(payload: Payload) -> None:
            recipients(payload)[-1]["header"]["kid"] = c.guardian(name).encryption_kid

        return forge(c, mutate)

    return make


def padded_document(payload: Payload) -> None:
    payload["guardians"][0] += "\n"


def epk_on_another_curve(payload: Payload) -> None:
    for r in recipients(payload):
        other = "P-384" if r["header"]["epk"]["crv"] == "P-256" else "P-256"
        r["header"]["epk"] = jose.public_jwk(ECKey.generate_key(other))


def edit_epks(edit: Callable[[dict[str, Any]], None]) -> Callable[[Payload], None]:
    """Apply ``edit`` to every wrapping's ephemeral key (the KP is then re-signed)."""

    def mutate(payload: Payload) -> None:
        for r in recipients(payload):
            if "epk" in r["header"]:
                edit(r["header"]["epk"])

    return mutate


def _epk_off_curve(epk: dict[str, Any]) -> None:
    epk["y"] = epk["x"]  # (x, x) is on none of the curves for these keys


def _epk_with_private_part(epk: dict[str, Any]) -> None:
    epk["d"] = epk["x"]


def _epk_of_kind_rsa(epk: dict[str, Any]) -> None:
    epk["kty"] = "RSA"


def _epk_coordinate_too_long(epk: dict[str, Any]) -> None:
    epk["x"] = b64url_encode(b"\0" + b64url_decode(epk["x"], what="test"))


def _epk_not_base64url(epk: dict[str, Any]) -> None:
    epk["x"] = epk["x"][:-1] + "+"


def _epk_coordinate_missing(epk: dict[str, Any]) -> None:
    del epk["y"]


def make_recipient_for(name: str) -> Callable[[Ctx], bytes]:
    """An extra wrapping entry for ``name`` (an attacker cannot wrap the real CEK)."""

    def make(c: Ctx) -> bytes:
        def mutate(payload: Payload) -> None:
            extra = copy.deepcopy(recipients(payload)[0])
            extra["header"]["kid"] = c.guardian(name).encryption_kid
            recipients(payload).append(extra)

        return forge(c, mutate)

    return make


def spliced_guardian_set(c: Ctx) -> bytes:
    """The owner's statement for another KP with the very same guardians."""
    other, _ = create_key_protector(c.ring["owner"], [c.ring.doc("kps1"), c.ring.doc("cotenant")])
    return forge(c, set_field("guardian_set", split(other)[1]["guardian_set"]))


def signer_field_lies(c: Ctx) -> bytes:
    return forge(c, set_field("signer", c.guardian("kps1").id))


# --- set changes without the owner's key ----------------------------------------------


def egress_of(c: Ctx, mutate: Callable[[Payload], None], *, signer: str) -> bytes:
    """Forge from the base KP at generation 1, signed as ``signer``."""

    def edit(payload: Payload) -> None:
        payload["generation"] = 1
        payload["signer"] = c.guardian(signer).id
        mutate(payload)

    return forge(c, edit, signer=signer)


def kps_rewraps_without(name: str) -> Callable[[Ctx], bytes]:
    """A KPS (who knows the key) re-wraps to the set minus ``name``, keeping the owner's
    statement: only that statement shows the set is not the owner's."""

    def make(c: Ctx) -> bytes:
        def mutate(payload: Payload) -> None:
            statement = payload["guardian_set"]
            names = [n for n in ("owner", "kps1", "cotenant") if n != name]
            resign_set_as(c, payload, names, signer="kps1", owner="owner")
            payload["guardian_set"] = statement

        return egress_of(c, mutate, signer="kps1")

    return make


def kps_rewraps_with(name: str, *, signer: str = "kps1") -> Callable[[Ctx], bytes]:
    def make(c: Ctx) -> bytes:
        def mutate(payload: Payload) -> None:
            statement = payload["guardian_set"]
            resign_set_as(
                c, payload, ["owner", "kps1", "cotenant", name], signer=signer, owner="owner"
            )
            payload["guardian_set"] = statement

        return egress_of(c, mutate, signer=signer)

    return make


def kps_swaps(old: str, new: str) -> Callable[[Ctx], bytes]:
    def make(c: Ctx) -> bytes:
        def mutate(payload: Payload) -> None:
            statement = payload["guardian_set"]
            names = [new if n == old else n for n in ("owner", "kps1", "cotenant")]
            resign_set_as(c, payload, names, signer="kps1", owner="owner")
            payload["guardian_set"] = statement

        return egress_of(c, mutate, signer="kps1")

    return make


def signed_by(name: str, generation: int = 0) -> Callable[[Ctx], bytes]:
    def make(c: Ctx) -> bytes:
        def mutate(payload: Payload) -> None:
            payload["generation"] = generation
            payload["signer"] = c.guardian(name).id

        return forge(c, mutate, signer=name)

    return make


def tenant_claims_kps(c: Ctx) -> bytes:
    """cotenant re-issues its own document as kind kps (it can: the document is
    self-signed) and signs an egress KP."""
    keys = c.ring["cotenant"]
    as_kps = dataclasses.replace(keys.guardian, kind=KPS)
    document = sign_guardian_document(as_kps, keys.signing_key).decode()

    def mutate(payload: Payload) -> None:
        payload["guardians"] = [
            document if i == as_kps.id else d for i, d in sorted(docs_by_id(payload).items())
        ]

    return egress_of(c, mutate, signer="cotenant")


def owner_with_stale_statement(c: Ctx) -> bytes:
    _, payload = split(c.egress)
    payload["signer"] = c.owner_id
    return sign_payload(payload, c.ring["owner"])


def attacker_owned_copy(c: Ctx) -> bytes:
    """mallory makes herself owner in place of the real one, keeps the real fabric
    wrappings (she cannot make new ones), signs her own set statement and the KP,
    and recomputes the AAD: a self-consistent KP that only the AEAD tag exposes."""
    _, payload = split(c.base)
    real_owner, mallory = c.guardian("owner"), c.guardian("mallory")
    guardians = [mallory, c.guardian("kps1"), c.guardian("cotenant")]
    documents = docs_by_id(payload) | {mallory.id: c.ring.doc("mallory").decode()}
    documents.pop(real_owner.id)
    payload["owner"] = payload["signer"] = mallory.id
    payload["guardians"] = [documents[i] for i in sorted(documents)]
    payload["guardian_set"] = sign_set(
        c.ring["mallory"], payload["kp_id"], 0, mallory.id, guardians
    )
    for r in recipients(payload):
        if r["header"]["kid"] == real_owner.encryption_kid:
            r["header"]["kid"] = mallory.encryption_kid
    aad = wrapping_aad(payload["kp_id"], 0, mallory.id, [g.id for g in guardians])
    payload["wrapping"]["aad"] = b64url_encode(aad)
    return sign_payload(payload, c.ring["mallory"])


def kps_owned_copy(c: Ctx) -> bytes:
    def mutate(payload: Payload) -> None:
        resign_set_as(c, payload, ["kps1", "cotenant", "kps2"], signer="kps1", owner="kps1")

    return forge(c, mutate, signer="kps1")


# --- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    make: Callable[[Ctx], bytes]
    error: type[InvalidInputError]
    #: "load": the loader rejects it; "unwrap": it loads, and no real guardian can unwrap.
    at: str = "load"
    #: Pin the owner's id when loading (a verifier that knows its owner).
    pinned: bool = True


ATTACKS = [
    # the file as received, edited by someone holding no key
    Attack("payload byte flipped, not re-signed", flipped_payload_not_resigned, VerificationError),
    Attack("signature byte flipped", flipped_signature, VerificationError),
    Attack("header kid pointed at a KPS", kid_points_at_kps, VerificationError),
    Attack("guardian removed, not re-signed", removed_guardian_not_resigned, VerificationError),
    Attack("alg none", alg_none, VerificationError),
    Attack("HS256 keyed with the owner's public key", hs256_with_public_key, VerificationError),
    Attack("truncated to 10%", lambda c: c.base[: len(c.base) // 10], FormatError),
    Attack("truncated to 60%", lambda c: c.base[: len(c.base) * 6 // 10], FormatError),
    Attack("truncated inside the signature", lambda c: c.base[:-20], VerificationError),
    Attack("oversized", lambda c: c.base + b" " * MAX_KP_BYTES, FormatError),
    Attack("empty", lambda c: b"", FormatError),
    Attack("not ASCII", lambda c: "é".encode() + c.base, FormatError),
    Attack("a guardian document instead", lambda c: c.ring.doc("owner"), FormatError),
    Attack(
        "KP payload signed as another JWS type",
        lambda c: sign_payload(split(c.base)[1], c.ring["owner"], typ=GUARDIAN_SET_JWS_TYPE),
        VerificationError,
    ),
    # format checks, re-signed by the owner so the signature does not catch them
    Attack("unknown version", lambda c: forge(c, set_field("version", 3)), FormatError),
    Attack(
        "version 2 KP relabelled version 1",
        lambda c: forge(c, set_field("version", 1)),
        VerificationError,
    ),
    Attack("wrong type", lambda c: forge(c, set_field("type", "guardfab.pdk")), FormatError),
    Attack("unknown field", lambda c: forge(c, with_extra_field), FormatError),
    Attack("non-canonical JSON", non_canonical, FormatError),
    Attack("kp_id not 128 bits", lambda c: forge(c, set_field("kp_id", "abc")), FormatError),
    Attack("generation is a bool", lambda c: forge(c, set_field("generation", True)), FormatError),
    Attack(
        "generation past 2**53", lambda c: forge(c, set_field("generation", 2**53)), FormatError
    ),
    Attack("guardian document with a newline", lambda c: forge(c, padded_document), FormatError),
    Attack("guardians not sorted", lambda c: forge(c, unsorted_guardians), FormatError),
    Attack("guardian listed twice", lambda c: forge(c, duplicated_guardian), FormatError),
    Attack("too many guardians", lambda c: forge(c, too_many_guardians), FormatError),
    Attack(
        "too many guardians, all consistent",
        owner_built(lambda c: [c.ring["owner"], *crowd()]),
        FormatError,
    ),
    Attack("only the owner, consistent", owner_built(lambda c: [c.ring["owner"]]), FormatError),
    Attack("two guardians share an encryption key", owner_built(twin_of_cotenant), FormatError),
    Attack(
        "embedded guardian document tampered",
        lambda c: forge(c, tampered_guardian_document),
        VerificationError,
    ),
    Attack("signer field names another guardian", signer_field_lies, VerificationError),
    # KP format 2: a KPS guardian's documents are bound by its signing key, not by the owner
    Attack(
        "KPS document of another signing key, same name",
        kps_document_of_another_signing_key,
        VerificationError,
    ),
    Attack(
        "KPS key generation signed by another key, same claimed id",
        kps_generation_signed_by_another_key,
        VerificationError,
    ),
    Attack("owner's set statement of another KP", spliced_guardian_set, VerificationError),
    # the wrapping, re-signed by the owner: the AEAD must catch what the signature does not
    Attack(
        "wrapping encrypted_key flipped",
        lambda c: forge(c, flip_all_encrypted_keys),
        VerificationError,
        at="unwrap",
    ),
    Attack(
        "wrapping ciphertext flipped",
        lambda c: forge(c, flip_wrapping("ciphertext")),
        VerificationError,
        at="unwrap",
    ),
    Attack(
        "wrapping tag flipped",
        lambda c: forge(c, flip_wrapping("tag")),
        VerificationError,
        at="unwrap",
    ),
    Attack(
        "wrapping iv flipped",
        lambda c: forge(c, flip_wrapping("iv")),
        VerificationError,
        at="unwrap",
    ),
    Attack(
        "wrapping ephemeral keys swapped",
        lambda c: forge(c, swap_all_epks),
        VerificationError,
        at="unwrap",
    ),
    Attack("wrapping aad flipped", lambda c: forge(c, flip_wrapping("aad")), VerificationError),
    Attack("wrapping recipient removed", lambda c: forge(c, recipient_removed), VerificationError),
    Attack(
        "wrapping recipient duplicated", lambda c: forge(c, recipient_duplicated), VerificationError
    ),
    Attack(
        "wrapping recipient added for mallory", make_recipient_for("mallory"), VerificationError
    ),
    Attack("wrapping compressed (zip)", lambda c: forge(c, zip_in_protected_header), FormatError),
    Attack("wrapping algorithm swapped", lambda c: forge(c, rsa_alg_for_ec_key), FormatError),
    Attack("wrapping ephemeral key removed", lambda c: forge(c, epk_removed), FormatError),
    Attack("wrapping iv of 16 bytes", lambda c: forge(c, iv_of_16_bytes), FormatError),
    Attack("wrapping relabelled for mallory", swap_recipient_for("mallory"), VerificationError),
    Attack(
        "wrapping ephemeral key on another curve",
        lambda c: forge(c, epk_on_another_curve),
        FormatError,
    ),
    *(
        Attack(f"wrapping ephemeral key {label}", lambda c, e=edit: forge(c, edit_epks(e)), error)
        for label, edit, error in (
            ("off the curve", _epk_off_curve, FormatError),
            ("with a private part", _epk_with_private_part, FormatError),
            ("of kind RSA", _epk_of_kind_rsa, FormatError),
            ("with a coordinate too long", _epk_coordinate_too_long, FormatError),
            ("not base64url", _epk_not_base64url, FormatError),
            ("without its y coordinate", _epk_coordinate_missing, FormatError),
        )
    ),
    # the guardian set, changed by someone without the owner's signing key
    Attack("KPS re-wraps without a guardian", kps_rewraps_without("cotenant"), VerificationError),
    Attack("KPS re-wraps without the owner", kps_rewraps_without("owner"), VerificationError),
    Attack("KPS re-wraps adding mallory", kps_rewraps_with("mallory"), VerificationError),
    Attack(
        "KPS re-wraps swapping cotenant for kps2", kps_swaps("cotenant", "kps2"), VerificationError
    ),
    Attack(
        "rogue KPS adds itself and signs",
        kps_rewraps_with("rogue-kps", signer="rogue-kps"),
        VerificationError,
    ),
    Attack("attacker-owned copy, owner pinned", attacker_owned_copy, NotAuthorizedError),
    Attack(
        "attacker-owned copy, not pinned",
        attacker_owned_copy,
        VerificationError,
        at="unwrap",
        pinned=False,
    ),
    Attack("KPS-owned copy", kps_owned_copy, VerificationError, pinned=False),
    # wrong signers
    Attack("signed by a tenant guardian of the set", signed_by("cotenant"), NotAuthorizedError),
    Attack("signed by an outsider", signed_by("mallory"), NotAuthorizedError),
    Attack("egress signed by a KPS not in the set", signed_by("rogue-kps", 1), NotAuthorizedError),
    Attack("egress signed by a tenant guardian", signed_by("cotenant", 1), NotAuthorizedError),
    Attack("tenant guardian re-issued as kind kps signs", tenant_claims_kps, VerificationError),
    Attack("KPS signs without re-keying (generation 0)", signed_by("kps1", 0), VerificationError),
    Attack("owner signs with a stale set statement", owner_with_stale_statement, VerificationError),
    Attack("another owner expected", lambda c: c.base, NotAuthorizedError, pinned=False),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_caught(ctx: Ctx, attack: Attack) -> None:
    data = attack.make(ctx)
    expected_owner = ctx.owner_id if attack.pinned else None
    if attack.name == "another owner expected":
        expected_owner = ctx.guardian("owner2").id
    if attack.at == "load":
        with pytest.raises(attack.error) as caught:
            load_key_protector(data, expected_owner=expected_owner)
        assert type(caught.value) is attack.error
        assert_no_secret(str(caught.value), ctx.key)
        return
    kp = load_key_protector(data, expected_owner=expected_owner)
    holders = [
        n for n in ("owner", "kps1", "cotenant", "mallory") if ctx.guardian(n).id in kp.guardian_ids
    ]
    assert holders
    for name in holders:
        with pytest.raises(attack.error) as caught:
            kp.unwrap(ctx.ring[name])
        assert_no_secret(str(caught.value), ctx.key)


def test_the_table_forgeries_are_otherwise_well_formed(ctx: Ctx) -> None:
    """Guard against vacuous rows: the honest KPs load and unwrap."""
    for data, key in ((ctx.base, ctx.key), (ctx.egress, ctx.egress_key)):
        kp = load_key_protector(data, expected_owner=ctx.owner_id)
        for name in ("owner", "kps1", "cotenant"):
            assert kp.unwrap(ctx.ring[name]) == key


def test_aad_binding_holds_even_if_the_loader_check_is_skipped(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.base)
    forged = dataclasses.replace(kp, wrapping={**kp.wrapping, "aad": flip_b64(kp.wrapping["aad"])})
    with pytest.raises(VerificationError):
        forged.unwrap(ctx.ring["kps1"])
    relabelled = dataclasses.replace(kp, generation=7)
    with pytest.raises(VerificationError):
        relabelled.unwrap(ctx.ring["kps1"])


def test_an_ephemeral_key_with_a_short_coordinate_still_loads_and_unwraps(ctx: Ctx) -> None:
    """A JWK import reads a coordinate written without its leading zero bytes; so does
    the loader's cheaper point check (it pads), and the guardian still unwraps."""
    ring = ctx.ring
    for _ in range(2000):
        data, key = create_key_protector(ring["owner"], [ring.doc("kps1"), ring.doc("cotenant")])
        _, payload = split(data)
        leading_zero = [
            r
            for r in recipients(payload)
            if b64url_decode(r["header"]["epk"]["x"], what="t")[0] == 0
        ]
        if leading_zero:
            break
    else:
        pytest.fail("no ephemeral key with a leading zero byte in 2000 KPs")
    epk = leading_zero[0]["header"]["epk"]
    epk["x"] = b64url_encode(b64url_decode(epk["x"], what="test")[1:])
    kp = load_key_protector(sign_payload(payload, ring["owner"]), expected_owner=ctx.owner_id)
    holder = next(
        n for n in ("owner", "kps1", "cotenant")
        if ctx.guardian(n).encryption_kid == leading_zero[0]["header"]["kid"]
    )  # fmt: skip
    assert kp.unwrap(ring[holder]) == key
