"""MakeCredential: KDF known answers, and an independent ActivateCredential round trip.

No TPM is available to the tests (swtpm and tpm2-tools are not installed), so the
other side of the protocol is written out here from TPM 2.0 Part 1 section 24 and
Part 3 TPM2_ActivateCredential, with hashlib/hmac for KDFa and KDFe instead of the
``cryptography`` KDF classes that :mod:`guardfab.tpm.credential` uses. Agreement of
the two, plus the TPM reference implementation's own KDFa self-test vector, is
what shows that a real TPM will accept the blob.
"""

from __future__ import annotations

import functools
import hmac
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given
from hypothesis import strategies as st

from guardfab.errors import FormatError
from guardfab.tpm.constants import HASH_ALGS, TpmAlg, TpmaObject, TpmEccCurve
from guardfab.tpm.credential import kdfa, kdfe, make_credential
from guardfab.tpm.structures import (
    SCHEME_NULL,
    SYM_NULL,
    EccParms,
    EccPoint,
    RsaParms,
    SymDef,
    TpmtPublic,
    marshal_public2b,
    object_name,
    unmarshal_public2b,
)

SHA256 = TpmAlg.SHA256

# --------------------------------------------------------------- KDF known answers

# The KDFa self-test vector of the TPM 2.0 reference implementation (TCG/Microsoft,
# as shipped in libtpms src/tpm2/KdfTestData.h): key, label "KDFSELFTESTLABEL\0",
# contextU, contextV, 160 bits out, one expected output per hash.
KDF_TEST_KEY = bytes.fromhex("271FA08BBDC5060EC3DFA928FF9B73123A12DA0C")
KDF_TEST_LABEL = b"KDFSELFTESTLABEL\0"
KDF_TEST_CONTEXT_U = bytes.fromhex("CE244F395DCA7391")
KDF_TEST_CONTEXT_V = bytes.fromhex("DA504031DDF12E83")
KDF_TEST_OUT = {
    TpmAlg.SHA1: "55b5a7184aa07423c47dae766c26a2377d7cf851",
    TpmAlg.SHA256: "bb0259e1c8ba607e6a2cd704b69a902e9ade84c4",
    TpmAlg.SHA384: "1dce70c9113eb2dba47bd9cfc72bf46f45b09312",
    TpmAlg.SHA512: "8be2c1b85b78569b9fa759f5857c56d684810fd3",
}


@pytest.mark.parametrize("hash_alg", sorted(KDF_TEST_OUT))
def test_kdfa_matches_the_tpm_reference_self_test(hash_alg: int) -> None:
    out = kdfa(
        hash_alg,
        KDF_TEST_KEY,
        KDF_TEST_LABEL,
        context_u=KDF_TEST_CONTEXT_U,
        context_v=KDF_TEST_CONTEXT_V,
        bits=160,
    )
    assert out.hex() == KDF_TEST_OUT[hash_alg]


def ref_kdfa(hash_alg: int, key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """KDFa written out: K(i) = HMAC(key, [i]32 || label || 0x00 || context || [bits]32)."""
    name = HASH_ALGS[hash_alg].name
    out = b""
    counter = 1
    while len(out) < bits // 8:
        fixed = label + b"\0" + context + struct.pack(">I", bits)
        out += hmac.new(key, struct.pack(">I", counter) + fixed, name).digest()
        counter += 1
    return out[: bits // 8]


def ref_kdfe(
    hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int
) -> bytes:
    """KDFe written out: K(i) = H([i]32 || Z || label || 0x00 || partyUInfo || partyVInfo)."""
    new = HASH_ALGS[hash_alg].new
    out = b""
    counter = 1
    while len(out) < bits // 8:
        out += new(struct.pack(">I", counter) + z + label + b"\0" + party_u + party_v).digest()
        counter += 1
    return out[: bits // 8]


labels = st.binary(max_size=16).map(lambda b: b.replace(b"\0", b"L"))
hashes_ = st.sampled_from(sorted(HASH_ALGS))
bit_sizes = st.integers(1, 130).map(lambda n: n * 8)


@given(hashes_, st.binary(min_size=1, max_size=64), labels, st.binary(max_size=40), bit_sizes)
def test_kdfa_matches_the_specification(
    hash_alg: int, key: bytes, label: bytes, context: bytes, bits: int
) -> None:
    expected = ref_kdfa(hash_alg, key, label, context, bits)
    assert kdfa(hash_alg, key, label, context_u=context, bits=bits) == expected
    # The TPM adds the zero octet only if the label does not end with one.
    assert kdfa(hash_alg, key, label + b"\0", context_u=context, bits=bits) == expected


@given(hashes_, st.binary(min_size=1, max_size=66), labels, st.binary(max_size=66), bit_sizes)
def test_kdfe_matches_the_specification(
    hash_alg: int, z: bytes, label: bytes, party: bytes, bits: int
) -> None:
    expected = ref_kdfe(hash_alg, z, label, party, party[::-1], bits)
    assert kdfe(hash_alg, z, label, party_u=party, party_v=party[::-1], bits=bits) == expected


@pytest.mark.parametrize("bits", [0, 7, 100, -8])
def test_kdfs_refuse_odd_sizes(bits: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        kdfa(SHA256, b"k", b"L", bits=bits)
    with pytest.raises(ValueError, match="multiple of 8"):
        kdfe(SHA256, b"z", b"L", party_u=b"", party_v=b"", bits=bits)


# --------------------------------------------------------------- software EKs

#: The TCG EK template attributes: fixedTPM, fixedParent, sensitiveDataOrigin,
#: adminWithPolicy, restricted, decrypt (TCG EK Credential Profile, template L-1).
EK_ATTRIBUTES = (
    TpmaObject.FIXED_TPM
    | TpmaObject.FIXED_PARENT
    | TpmaObject.SENSITIVE_DATA_ORIGIN
    | TpmaObject.ADMIN_WITH_POLICY
    | TpmaObject.RESTRICTED
    | TpmaObject.DECRYPT
)
#: PolicySecret(TPM_RH_ENDORSEMENT), the authPolicy of the SHA-256 EK templates.
EK_POLICY_SHA256 = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
_CURVES = {TpmEccCurve.NIST_P256: ec.SECP256R1(), TpmEccCurve.NIST_P384: ec.SECP384R1()}


@dataclass(frozen=True)
class SoftEk:
    """An EK-shaped public area over a key whose private half the test holds."""

    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    public: TpmtPublic


@functools.cache
def soft_ek(kind: str, index: int = 0) -> SoftEk:
    """EKs by template: kind = key-namealg-aesbits; cached, key generation is slow."""
    key_kind, hash_name, sym_bits = kind.split("-")
    name_alg = {"sha256": SHA256, "sha384": TpmAlg.SHA384}[hash_name]
    policy = EK_POLICY_SHA256 if name_alg == SHA256 else b""
    symmetric = SymDef(TpmAlg.AES, int(sym_bits), TpmAlg.CFB)
    if key_kind.startswith("rsa"):
        bits = int(key_kind[3:])
        private = rsa.generate_private_key(65537, bits)
        modulus = private.public_key().public_numbers().n.to_bytes(bits // 8, "big")
        parms = RsaParms(symmetric, SCHEME_NULL, bits)
        return SoftEk(
            private, TpmtPublic(TpmAlg.RSA, name_alg, EK_ATTRIBUTES, policy, parms, modulus)
        )
    curve = {"p256": TpmEccCurve.NIST_P256, "p384": TpmEccCurve.NIST_P384}[key_kind]
    ec_private = ec.generate_private_key(_CURVES[curve])
    size = (ec_private.curve.key_size + 7) // 8
    numbers = ec_private.public_key().public_numbers()
    point = EccPoint(numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big"))
    ecc = EccParms(symmetric, SCHEME_NULL, curve)
    return SoftEk(ec_private, TpmtPublic(TpmAlg.ECC, name_alg, EK_ATTRIBUTES, policy, ecc, point))


EK_KINDS = ["rsa2048-sha256-128", "p256-sha256-128", "p384-sha384-256", "rsa3072-sha384-256"]


# ------------------------------------------------ ActivateCredential, written out


class ActivationFailed(Exception):
    """What the TPM returns as TPM_RC_INTEGRITY, TPM_RC_SIZE or a decryption failure."""


def _tpm2b(data: bytes, what: str) -> tuple[bytes, bytes]:
    if len(data) < 2:
        raise ActivationFailed(f"{what}: truncated")
    size = struct.unpack_from(">H", data)[0]
    if len(data) < 2 + size:
        raise ActivationFailed(f"{what}: truncated")
    return data[2 : 2 + size], data[2 + size :]


def recover_seed(ek: SoftEk, encrypted_secret: bytes) -> bytes:
    """CryptSecretDecrypt: RSA-OAEP(label IDENTITY\\0) or ECDH + KDFe(IDENTITY)."""
    secret, rest = _tpm2b(encrypted_secret, "TPM2B_ENCRYPTED_SECRET")
    if rest:
        raise ActivationFailed("TPM2B_ENCRYPTED_SECRET: trailing bytes")
    info = HASH_ALGS[ek.public.name_alg]
    if isinstance(ek.private, rsa.RSAPrivateKey):
        algorithm = info.algorithm()
        oaep = padding.OAEP(padding.MGF1(algorithm), algorithm, b"IDENTITY\0")
        try:
            return ek.private.decrypt(secret, oaep)
        except ValueError as exc:
            raise ActivationFailed("seed does not decrypt") from exc
    x, rest = _tpm2b(secret, "TPMS_ECC_POINT.x")
    y, rest = _tpm2b(rest, "TPMS_ECC_POINT.y")
    if rest:
        raise ActivationFailed("TPMS_ECC_POINT: trailing bytes")
    curve = ek.private.curve
    try:
        numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x), int.from_bytes(y), curve)
        z = ek.private.exchange(ec.ECDH(), numbers.public_key())
    except ValueError as exc:
        raise ActivationFailed("ephemeral point is not on the curve") from exc
    assert isinstance(ek.public.unique, EccPoint)
    return ref_kdfe(ek.public.name_alg, z, b"IDENTITY", x, ek.public.unique.x, info.digest_size * 8)


def activate_credential(ek: SoftEk, ak_name: bytes, blob: bytes, encrypted_secret: bytes) -> bytes:
    """TPM2_ActivateCredential with the EK private key in hand: check, then decrypt."""
    info = HASH_ALGS[ek.public.name_alg]
    seed = recover_seed(ek, encrypted_secret)
    id_object, rest = _tpm2b(blob, "TPM2B_ID_OBJECT")
    if rest:
        raise ActivationFailed("TPM2B_ID_OBJECT: trailing bytes")
    integrity, enc_identity = _tpm2b(id_object, "integityHMAC")
    hmac_key = ref_kdfa(ek.public.name_alg, seed, b"INTEGRITY", b"", info.digest_size * 8)
    expected = hmac.new(hmac_key, enc_identity + ak_name, info.name).digest()
    if not hmac.compare_digest(expected, integrity):
        raise ActivationFailed("integrity")
    sym_bits = ek.public.parameters.symmetric.key_bits
    sym_key = ref_kdfa(ek.public.name_alg, seed, b"STORAGE", ak_name, sym_bits)
    plain = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).decryptor().update(enc_identity)
    credential, rest = _tpm2b(plain, "TPM2B_DIGEST")
    if rest:
        raise ActivationFailed("credential: size")
    return credential


# ---------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def ak_names() -> dict[str, bytes]:
    """Names of the real AKs in shared/vectors/quotes; missing vectors fail, never skip."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "quotes"
    if not (folder / "rsa" / "ak.pub").is_file():
        pytest.fail(f"TPM quote vectors not found at {folder}: clone shared/ beside the repo")
    return {
        k: object_name(unmarshal_public2b((folder / k / "ak.pub").read_bytes()))
        for k in ("rsa", "ecc")
    }


@pytest.mark.parametrize("kind", EK_KINDS)
def test_activation_recovers_the_credential(ak_names: dict[str, bytes], kind: str) -> None:
    ek = soft_ek(kind)
    size = HASH_ALGS[ek.public.name_alg].digest_size
    for credential in (secrets.token_bytes(size), b"\x01", secrets.token_bytes(16)):
        made = make_credential(ek.public, credential, ak_names["rsa"])
        assert activate_credential(ek, ak_names["rsa"], *made) == credential


@pytest.mark.parametrize("kind", EK_KINDS)
def test_another_ak_name_fails_the_integrity_check(ak_names: dict[str, bytes], kind: str) -> None:
    ek = soft_ek(kind)
    made = make_credential(ek.public, b"secret", ak_names["rsa"])
    with pytest.raises(ActivationFailed, match="integrity"):
        activate_credential(ek, ak_names["ecc"], *made)


@pytest.mark.parametrize("kind", EK_KINDS)
def test_every_tampered_blob_byte_fails(ak_names: dict[str, bytes], kind: str) -> None:
    ek = soft_ek(kind)
    blob, secret = make_credential(ek.public, b"secret", ak_names["rsa"])
    for position in range(len(blob)):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(ActivationFailed):
            activate_credential(ek, ak_names["rsa"], bytes(tampered), secret)


@pytest.mark.parametrize("kind", EK_KINDS)
def test_every_tampered_secret_byte_fails(ak_names: dict[str, bytes], kind: str) -> None:
    ek = soft_ek(kind)
    blob, secret = make_credential(ek.public, b"secret", ak_names["rsa"])
    for position in range(len(secret)):
        tampered = bytearray(secret)
        tampered[position] ^= 0x01
        with pytest.raises(ActivationFailed):
            activate_credential(ek, ak_names["rsa"], blob, bytes(tampered))


@pytest.mark.parametrize("kind", EK_KINDS)
def test_another_tpm_cannot_activate(ak_names: dict[str, bytes], kind: str) -> None:
    made = make_credential(soft_ek(kind).public, b"secret", ak_names["rsa"])
    impostor = replace(soft_ek(kind, index=1), public=soft_ek(kind).public)
    with pytest.raises(ActivationFailed):
        activate_credential(impostor, ak_names["rsa"], *made)


@pytest.mark.parametrize(
    ("kind", "secret_size"),
    [("rsa2048-sha256-128", 2 + 256), ("p256-sha256-128", 2 + 68), ("p384-sha384-256", 2 + 100)],
)
def test_wire_layout(ak_names: dict[str, bytes], kind: str, secret_size: int) -> None:
    ek = soft_ek(kind)
    digest = HASH_ALGS[ek.public.name_alg].digest_size
    credential = b"c" * 20
    blob, secret = make_credential(marshal_public2b(ek.public), credential, ak_names["ecc"])
    # TPM2B_ID_OBJECT = size || TPM2B_DIGEST(outer HMAC) || encrypted TPM2B_DIGEST(credential)
    assert struct.unpack_from(">HH", blob) == (len(blob) - 2, digest)
    assert len(blob) == 2 + 2 + digest + 2 + len(credential)
    assert len(secret) == secret_size
    assert struct.unpack_from(">H", secret)[0] == secret_size - 2


def test_each_credential_uses_a_fresh_seed(ak_names: dict[str, bytes]) -> None:
    ek = soft_ek("p256-sha256-128").public
    first = make_credential(ek, b"same", ak_names["rsa"])
    second = make_credential(ek, b"same", ak_names["rsa"])
    assert first.credential_blob != second.credential_blob
    assert first.encrypted_secret != second.encrypted_secret


@pytest.mark.parametrize("credential", [b"", bytes(33)])
def test_credential_size_is_bounded_by_the_name_digest(
    ak_names: dict[str, bytes], credential: bytes
) -> None:
    with pytest.raises(ValueError, match="1 to 32 bytes"):
        make_credential(soft_ek("rsa2048-sha256-128").public, credential, ak_names["rsa"])


def _with_parms(ek: TpmtPublic, **changes: object) -> TpmtPublic:
    return replace(ek, parameters=replace(ek.parameters, **changes))


BAD_EKS = [
    ("a signing key", lambda ek: replace(ek, object_attributes=0x50072), "restricted decryption"),
    (
        "not restricted",
        lambda ek: replace(ek, object_attributes=EK_ATTRIBUTES & ~TpmaObject.RESTRICTED),
        "restricted decryption",
    ),
    (
        "no symmetric cipher",
        lambda ek: _with_parms(ek, symmetric=SYM_NULL),
        "null-null is not AES-CFB",
    ),
    (
        "AES-CBC",
        lambda ek: _with_parms(ek, symmetric=SymDef(TpmAlg.AES, 128, TpmAlg.CBC)),
        "aes-cbc is not AES-CFB",
    ),
]


@pytest.mark.parametrize(
    ("change", "pattern"), [case[1:] for case in BAD_EKS], ids=[case[0] for case in BAD_EKS]
)
def test_ek_must_be_a_storage_key(
    ak_names: dict[str, bytes], change: Callable[[TpmtPublic], TpmtPublic], pattern: str
) -> None:
    ek = change(soft_ek("rsa2048-sha256-128").public)
    with pytest.raises(FormatError, match=pattern):
        make_credential(ek, b"secret", ak_names["rsa"])


@pytest.mark.parametrize(
    "name",
    [b"", b"\x00", b"\x40\x00\x00\x0b", b"\x00\x0b" + bytes(31), b"\x00\x0b" + bytes(33)],
    ids=["empty", "one byte", "a handle", "short digest", "long digest"],
)
def test_ak_name_must_be_a_digest_name(name: bytes) -> None:
    with pytest.raises(FormatError, match="AK Name"):
        make_credential(soft_ek("p256-sha256-128").public, b"secret", name)
