"""TPM 2.0 structure parsing: real swtpm vectors, malformed input, hypothesis round trips.

The vectors in shared/vectors/quotes were made by swtpm + tpm2-tools (see the README
there); they are the ground truth that the parsers read what a TPM writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from guardfab.errors import FormatError
from guardfab.tpm.constants import (
    HASH_ALGS,
    MAX_ECC_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_RSA_KEY_BYTES,
    RSA_KEY_BITS,
    SYM_MODES,
    TPMA_OBJECT_RESERVED,
    TpmAlg,
    TpmEccCurve,
    TpmSt,
)
from guardfab.tpm.structures import (
    SCHEME_NULL,
    SYM_NULL,
    EccParms,
    EccPoint,
    RsaParms,
    Scheme,
    SymDef,
    TpmsAttest,
    TpmsClockInfo,
    TpmsPcrSelection,
    TpmsQuoteInfo,
    TpmtPublic,
    TpmtSignature,
    as_public,
    marshal_attest,
    marshal_public,
    marshal_public2b,
    marshal_signature,
    object_name,
    pcr_selection,
    public_key,
    unmarshal_attest,
    unmarshal_public,
    unmarshal_public2b,
    unmarshal_signature,
)

KINDS = ("rsa", "ecc")


@pytest.fixture(scope="module")
def vectors() -> Path:
    """The shared quote vectors beside the repository; missing vectors fail, never skip."""
    path = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "quotes"
    if not (path / "rsa" / "quote.msg").is_file():
        pytest.fail(f"TPM quote vectors not found at {path}: clone shared/ beside the repo")
    return path


def _read(vectors: Path, kind: str, name: str) -> bytes:
    return (vectors / kind / name).read_bytes()


# ------------------------------------------------------------------ real vectors


@pytest.mark.parametrize("kind", KINDS)
def test_vectors_round_trip_byte_for_byte(vectors: Path, kind: str) -> None:
    ak = _read(vectors, kind, "ak.pub")
    msg = _read(vectors, kind, "quote.msg")
    sig = _read(vectors, kind, "quote.sig")
    assert marshal_public2b(unmarshal_public2b(ak)) == ak
    assert marshal_public(unmarshal_public(ak[2:])) == ak[2:]
    assert marshal_attest(unmarshal_attest(msg)) == msg
    assert marshal_signature(unmarshal_signature(sig)) == sig


@pytest.mark.parametrize("kind", KINDS)
def test_public_key_equals_the_pem_tpm2_tools_wrote(vectors: Path, kind: str) -> None:
    key = public_key(unmarshal_public2b(_read(vectors, kind, "ak.pub")))
    pem = serialization.load_pem_public_key(_read(vectors, kind, "ak.pem"))
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_bytes(der, spki) == pem.public_bytes(der, spki)


def test_rsa_ak_fields(vectors: Path) -> None:
    ak = unmarshal_public2b(_read(vectors, "rsa", "ak.pub"))
    assert (ak.key_type, ak.name_alg, ak.object_attributes) == (TpmAlg.RSA, TpmAlg.SHA256, 0x50072)
    assert ak.parameters == RsaParms(SYM_NULL, Scheme(TpmAlg.RSASSA, TpmAlg.SHA256), 2048, 0)
    assert isinstance(ak.unique, bytes)
    assert len(ak.unique) == 256


def test_ecc_ak_fields(vectors: Path) -> None:
    ak = unmarshal_public2b(_read(vectors, "ecc", "ak.pub"))
    assert ak.key_type == TpmAlg.ECC
    assert ak.parameters == EccParms(
        SYM_NULL, Scheme(TpmAlg.ECDSA, TpmAlg.SHA256), TpmEccCurve.NIST_P256, SCHEME_NULL
    )
    assert isinstance(ak.unique, EccPoint)
    assert (len(ak.unique.x), len(ak.unique.y)) == (32, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_quote_fields(vectors: Path, kind: str) -> None:
    attest = unmarshal_attest(_read(vectors, kind, "quote.msg"))
    assert attest.attest_type == TpmSt.ATTEST_QUOTE
    assert attest.extra_data == _read(vectors, kind, "nonce.bin")
    assert attest.qualified_signer[:2] == b"\x00\x0b"
    assert len(attest.qualified_signer) == 34
    assert attest.clock_info.reset_count == 2
    assert attest.clock_info.restart_count == 0
    assert attest.clock_info.safe is True
    (selection,) = attest.quote.pcr_select
    assert selection.hash_alg == TpmAlg.SHA256
    assert selection.indices() == (0, 1, 2, 3, 4, 5, 6, 7)
    assert len(attest.quote.pcr_digest) == 32


@pytest.mark.parametrize(
    ("kind", "sig_alg", "lengths"),
    [("rsa", TpmAlg.RSASSA, (256, 0, 0)), ("ecc", TpmAlg.ECDSA, (0, 32, 32))],
)
def test_signature_fields(vectors: Path, kind: str, sig_alg: int, lengths: tuple[int, ...]) -> None:
    sig = unmarshal_signature(_read(vectors, kind, "quote.sig"))
    assert (sig.sig_alg, sig.hash_alg) == (sig_alg, TpmAlg.SHA256)
    assert (len(sig.sig), len(sig.r), len(sig.s)) == lengths


@pytest.mark.parametrize("kind", KINDS)
def test_object_name_is_name_alg_and_hash_of_the_public_area(vectors: Path, kind: str) -> None:
    raw = _read(vectors, kind, "ak.pub")
    name = object_name(unmarshal_public2b(raw))
    assert name == b"\x00\x0b" + hashlib.sha256(raw[2:]).digest()


def test_as_public_accepts_parsed_or_tpm2b(vectors: Path) -> None:
    raw = _read(vectors, "rsa", "ak.pub")
    parsed = unmarshal_public2b(raw)
    assert as_public(raw) == parsed
    assert as_public(parsed) is parsed


# ------------------------------------------------------------ malformed input

PARSERS = {
    "quote.msg": (unmarshal_attest, "TPM"),
    "quote.sig": (unmarshal_signature, "TPMT_SIGNATURE"),
    "ak.pub": (unmarshal_public2b, "TPM"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_truncation_is_a_format_error_with_an_offset(
    vectors: Path, kind: str, name: str
) -> None:
    parser, structure = PARSERS[name]
    blob = _read(vectors, kind, name)
    for cut in range(len(blob)):
        with pytest.raises(FormatError) as info:
            parser(blob[:cut])
        message = str(info.value)
        assert structure in message, message
        assert "offset" in message, message


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(PARSERS))
def test_trailing_bytes_are_rejected(vectors: Path, kind: str, name: str) -> None:
    parser, _ = PARSERS[name]
    blob = _read(vectors, kind, name)
    with pytest.raises(FormatError, match=rf"trailing bytes at offset {len(blob)}"):
        parser(blob + b"\0")


def _u16(value: int) -> bytes:
    return struct.pack(">H", value)


def _patch(blob: bytes, offset: int, new: bytes) -> bytes:
    return blob[:offset] + new + blob[offset + len(new) :]


# Offsets in the RSA quote: magic 0, type 4, qualifiedSigner 6 (2+34), extraData 42
# (2+20), clockInfo 64 (safe at 80), firmwareVersion 81, pcrSelect.count 89, hash 93,
# sizeofSelect 95, pcrSelect 96, pcrDigest 99.
ATTEST_CASES = [
    ("magic", 0, b"\xff\x54\x43\x48", r"TPMS_ATTEST\.magic at offset 0"),
    ("certify type", 4, b"\x80\x17", r"TPMS_ATTEST\.type at offset 4: attest_certify"),
    ("signer too long", 6, b"\x00\x43", r"qualifiedSigner at offset 6: size 67 exceeds"),
    ("extraData too long", 42, b"\x00\x41", r"extraData at offset 42: size 65 exceeds"),
    ("safe not boolean", 80, b"\x02", r"TPMS_CLOCK_INFO\.safe at offset 80"),
    ("too many banks", 89, b"\x00\x00\x00\x11", r"TPML_PCR_SELECTION\.count at offset 89"),
    ("bank hash unknown", 93, b"\x00\x12", r"TPMS_PCR_SELECTION\.hash at offset 93: sm3_256"),
    ("bank hash null", 93, b"\x00\x10", r"TPMS_PCR_SELECTION\.hash at offset 93: null"),
    ("sizeofSelect 5", 95, b"\x05", r"sizeofSelect at offset 95: 5"),
    ("digest too long", 99, b"\x00\x41", r"pcrDigest at offset 99: size 65 exceeds"),
    ("digest past the end", 99, b"\x00\x21", r"pcrDigest at offset 101: truncated \(needs 33"),
    ("digest shorter", 99, b"\x00\x1f", r"TPMS_ATTEST: 1 unexpected trailing bytes at offset 132"),
]


@pytest.mark.parametrize(
    ("offset", "new", "pattern"),
    [case[1:] for case in ATTEST_CASES],
    ids=[case[0] for case in ATTEST_CASES],
)
def test_malformed_attest(vectors: Path, offset: int, new: bytes, pattern: str) -> None:
    blob = _patch(_read(vectors, "rsa", "quote.msg"), offset, new)
    with pytest.raises(FormatError, match=pattern):
        unmarshal_attest(blob)


def test_bank_listed_twice_is_rejected(vectors: Path) -> None:
    attest = unmarshal_attest(_read(vectors, "rsa", "quote.msg"))
    selection = attest.quote.pcr_select * 2
    quote = TpmsQuoteInfo(selection, attest.quote.pcr_digest)
    blob = marshal_attest(TpmsAttest(b"", b"", attest.clock_info, 0, quote))
    with pytest.raises(FormatError, match="listed twice"):
        unmarshal_attest(blob)


# Offsets in the RSA ak.pub (TPM2B_PUBLIC): size 0, type 2, nameAlg 4, attributes 6,
# authPolicy 10, symmetric 12, scheme 14 (hash 16), keyBits 18, exponent 20, unique 24.
PUBLIC_CASES = [
    ("keyedhash type", 2, b"\x00\x08", r"TPMT_PUBLIC\.type at offset 2: keyedhash"),
    ("null nameAlg", 4, b"\x00\x10", r"TPMT_PUBLIC\.nameAlg at offset 4: null"),
    ("reserved attribute", 6, b"\x00\x05\x00\x73", r"objectAttributes at offset 6: reserved"),
    ("high reserved attribute", 6, b"\x80\x05\x00\x72", r"reserved bits 0x80000000"),
    ("authPolicy not a digest", 10, b"\x00\x05", r"authPolicy at offset 10: 5 bytes"),
    ("authPolicy too long", 10, b"\x00\x41", r"authPolicy at offset 10: size 65 exceeds"),
    ("symmetric not a cipher", 12, b"\x00\x0b", r"symmetric at offset 12: sha256 is not"),
    ("scheme of ECC", 14, b"\x00\x18", r"TPMS_RSA_PARMS\.scheme at offset 14: ecdsa"),
    ("scheme hash null", 16, b"\x00\x10", r"scheme\.hashAlg at offset 16: null"),
    ("keyBits 1000", 18, b"\x03\xe8", r"TPMS_RSA_PARMS\.keyBits at offset 18: 1000"),
    ("modulus too long", 24, b"\x02\x01", r"unique\.rsa at offset 24: size 513 exceeds"),
    ("TPM2B empty", 0, b"\x00\x00", r"TPM2B_PUBLIC at offset 0: empty"),
    ("TPM2B too long", 0, b"\x01\x19", r"TPM2B_PUBLIC at offset 2: truncated"),
    ("TPM2B too short", 0, b"\x01\x17", r"unique\.rsa at offset 26: truncated"),
]


@pytest.mark.parametrize(
    ("offset", "new", "pattern"),
    [case[1:] for case in PUBLIC_CASES],
    ids=[case[0] for case in PUBLIC_CASES],
)
def test_malformed_public(vectors: Path, offset: int, new: bytes, pattern: str) -> None:
    blob = _patch(_read(vectors, "rsa", "ak.pub"), offset, new)
    with pytest.raises(FormatError, match=pattern):
        unmarshal_public2b(blob)


def test_tpm2b_size_larger_than_the_public_area(vectors: Path) -> None:
    raw = _read(vectors, "rsa", "ak.pub")
    blob = _u16(len(raw) - 1) + raw[2:] + b"\0"
    with pytest.raises(FormatError, match=r"publicArea: 1 unexpected trailing bytes at offset 282"):
        unmarshal_public2b(blob)


# ECC ak.pub: scheme at 14, curveID at 18, kdf at 20, unique.x at 22.
ECC_PUBLIC_CASES = [
    ("scheme of RSA", 14, b"\x00\x14", r"TPMS_ECC_PARMS\.scheme at offset 14: rsassa"),
    ("unknown curve", 18, b"\x00\x99", r"curveID at offset 18: 0x0099 unknown"),
    ("kdf not a kdf", 20, b"\x00\x18", r"TPMS_ECC_PARMS\.kdf at offset 20: ecdsa"),
    ("x too long", 22, b"\x00\x51", r"unique\.ecc\.x at offset 22: size 81 exceeds"),
]


@pytest.mark.parametrize(
    ("offset", "new", "pattern"),
    [case[1:] for case in ECC_PUBLIC_CASES],
    ids=[case[0] for case in ECC_PUBLIC_CASES],
)
def test_malformed_ecc_public(vectors: Path, offset: int, new: bytes, pattern: str) -> None:
    blob = _patch(_read(vectors, "ecc", "ak.pub"), offset, new)
    with pytest.raises(FormatError, match=pattern):
        unmarshal_public2b(blob)


SIGNATURE_CASES = [
    ("hmac", "rsa", 0, b"\x00\x05", r"sigAlg at offset 0: hmac is not"),
    ("sm2", "ecc", 0, b"\x00\x1b", r"sigAlg at offset 0: sm2 is not"),
    ("unknown hash", "rsa", 2, b"\x00\x99", r"TPMT_SIGNATURE\.hash at offset 2: 0x0099"),
    ("rsa sig too long", "rsa", 4, b"\x02\x01", r"sig at offset 4: size 513 exceeds"),
    ("ecdsa r too long", "ecc", 4, b"\x00\x51", r"signatureR at offset 4: size 81 exceeds"),
    ("ecdsa s truncated", "ecc", 38, b"\x00\x21", r"signatureS at offset 40: truncated"),
]


@pytest.mark.parametrize(
    ("kind", "offset", "new", "pattern"),
    [case[1:] for case in SIGNATURE_CASES],
    ids=[case[0] for case in SIGNATURE_CASES],
)
def test_malformed_signature(
    vectors: Path, kind: str, offset: int, new: bytes, pattern: str
) -> None:
    blob = _patch(_read(vectors, kind, "quote.sig"), offset, new)
    with pytest.raises(FormatError, match=pattern):
        unmarshal_signature(blob)


# ------------------------------------------------------------ key conversion


def _rsa_public(modulus: bytes, key_bits: int = 2048, exponent: int = 0) -> TpmtPublic:
    scheme = Scheme(TpmAlg.RSASSA, TpmAlg.SHA256)
    parms = RsaParms(SYM_NULL, scheme, key_bits, exponent)
    return TpmtPublic(TpmAlg.RSA, TpmAlg.SHA256, 0x50072, b"", parms, modulus)


def _ecc_public(curve: int, point: EccPoint) -> TpmtPublic:
    parms = EccParms(SYM_NULL, Scheme(TpmAlg.ECDSA, TpmAlg.SHA256), curve)
    return TpmtPublic(TpmAlg.ECC, TpmAlg.SHA256, 0x50072, b"", parms, point)


def test_public_key_rejects_a_modulus_of_the_wrong_size() -> None:
    key = rsa.generate_private_key(65537, 1024).public_key()
    modulus = key.public_numbers().n.to_bytes(128, "big")
    with pytest.raises(FormatError, match="modulus is 1024 bits, keyBits says 2048"):
        public_key(_rsa_public(modulus))
    assert public_key(_rsa_public(modulus, key_bits=1024)).key_size == 1024


def test_public_key_rejects_an_even_exponent() -> None:
    key = rsa.generate_private_key(65537, 1024).public_key()
    modulus = key.public_numbers().n.to_bytes(128, "big")
    with pytest.raises(FormatError, match="not a valid RSA public key"):
        public_key(_rsa_public(modulus, key_bits=1024, exponent=4))


def test_public_key_rejects_a_point_off_the_curve() -> None:
    with pytest.raises(FormatError, match="not on the curve"):
        public_key(_ecc_public(TpmEccCurve.NIST_P256, EccPoint(b"\1" * 32, b"\2" * 32)))


def test_public_key_rejects_unsupported_curves() -> None:
    with pytest.raises(FormatError, match="curve 0x0001 is not supported"):
        public_key(_ecc_public(TpmEccCurve.NIST_P192, EccPoint(b"\1" * 24, b"\2" * 24)))


def test_public_key_accepts_short_coordinates() -> None:
    """A TPM may drop leading zero octets of a coordinate; they are padded back."""
    # Deterministic: the first private scalar whose public x has a leading zero octet.
    for scalar in range(1, 10_000):
        numbers = ec.derive_private_key(scalar, ec.SECP256R1()).public_key().public_numbers()
        if numbers.x < 2**248:
            break
    else:
        pytest.fail("no short coordinate found")
    point = EccPoint(numbers.x.to_bytes(31, "big"), numbers.y.to_bytes(32, "big"))
    key = public_key(_ecc_public(TpmEccCurve.NIST_P256, point))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.public_numbers() == numbers


def test_pcr_selection_helper_and_indices() -> None:
    selection = pcr_selection(TpmAlg.SHA256, [0, 7, 9, 23])
    assert selection.select == b"\x81\x02\x80"
    assert selection.indices() == (0, 7, 9, 23)
    assert pcr_selection(TpmAlg.SHA1, [31]).select == b"\0\0\0\x80"


# ------------------------------------------------------------ hypothesis

hash_algs = st.sampled_from(sorted(HASH_ALGS))
sym_defs = st.one_of(
    st.just(SYM_NULL),
    st.builds(
        SymDef,
        st.sampled_from([TpmAlg.AES, TpmAlg.SM4, TpmAlg.CAMELLIA]),
        st.sampled_from([128, 192, 256]),
        st.sampled_from(sorted(SYM_MODES)),
    ),
)
rsa_schemes = st.one_of(
    st.just(SCHEME_NULL),
    st.just(Scheme(TpmAlg.RSAES)),
    st.builds(Scheme, st.sampled_from([TpmAlg.RSASSA, TpmAlg.RSAPSS, TpmAlg.OAEP]), hash_algs),
)
ecc_schemes = st.one_of(
    st.just(SCHEME_NULL),
    st.builds(
        Scheme,
        st.sampled_from([TpmAlg.ECDSA, TpmAlg.ECDH, TpmAlg.SM2, TpmAlg.ECSCHNORR, TpmAlg.ECMQV]),
        hash_algs,
    ),
    st.builds(Scheme, st.just(TpmAlg.ECDAA), hash_algs, st.integers(0, 0xFFFF)),
)
kdf_schemes = st.one_of(
    st.just(SCHEME_NULL),
    st.builds(
        Scheme,
        st.sampled_from([TpmAlg.MGF1, TpmAlg.KDF1_SP800_56A, TpmAlg.KDF2, TpmAlg.KDF1_SP800_108]),
        hash_algs,
    ),
)
ecc_params = st.binary(max_size=MAX_ECC_KEY_BYTES)


@st.composite
def publics(draw: st.DrawFn) -> TpmtPublic:
    name_alg = draw(hash_algs)
    size = HASH_ALGS[name_alg].digest_size
    policy = draw(st.one_of(st.just(b""), st.binary(min_size=size, max_size=size)))
    attributes = draw(st.integers(0, 2**32 - 1)) & ~TPMA_OBJECT_RESERVED
    symmetric = draw(sym_defs)
    if draw(st.booleans()):
        bits = draw(st.sampled_from(sorted(RSA_KEY_BITS)))
        parms: RsaParms | EccParms = RsaParms(
            symmetric, draw(rsa_schemes), bits, draw(st.integers(0, 2**32 - 1))
        )
        unique: bytes | EccPoint = draw(st.binary(max_size=MAX_RSA_KEY_BYTES))
        key_type = TpmAlg.RSA
    else:
        curve = draw(st.sampled_from(sorted(TpmEccCurve)))
        parms = EccParms(symmetric, draw(ecc_schemes), curve, draw(kdf_schemes))
        unique = EccPoint(draw(ecc_params), draw(ecc_params))
        key_type = TpmAlg.ECC
    return TpmtPublic(key_type, name_alg, attributes, policy, parms, unique)


attests = st.builds(
    TpmsAttest,
    qualified_signer=st.binary(max_size=MAX_NAME_BYTES),
    extra_data=st.binary(max_size=64),
    clock_info=st.builds(
        TpmsClockInfo,
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.booleans(),
    ),
    firmware_version=st.integers(0, 2**64 - 1),
    quote=st.builds(
        TpmsQuoteInfo,
        st.lists(hash_algs, unique=True).flatmap(
            lambda banks: st.tuples(
                *(st.builds(TpmsPcrSelection, st.just(b), st.binary(max_size=4)) for b in banks)
            )
        ),
        st.binary(max_size=64),
    ),
    attest_type=st.just(TpmSt.ATTEST_QUOTE),  # a named tuple's defaulted field is drawn too
)
signatures = st.one_of(
    st.builds(
        TpmtSignature,
        st.sampled_from([TpmAlg.RSASSA, TpmAlg.RSAPSS]),
        hash_algs,
        sig=st.binary(max_size=MAX_RSA_KEY_BYTES),
        r=st.just(b""),  # named-tuple fields with defaults are drawn unless given
        s=st.just(b""),
    ),
    st.builds(
        TpmtSignature,
        st.just(TpmAlg.ECDSA),
        hash_algs,
        sig=st.just(b""),
        r=ecc_params,
        s=ecc_params,
    ),
)


@given(publics())
def test_public_round_trip(public: TpmtPublic) -> None:
    blob = marshal_public(public)
    assert unmarshal_public(blob) == public
    assert unmarshal_public2b(marshal_public2b(public)) == public


@given(attests)
def test_attest_round_trip(attest: TpmsAttest) -> None:
    assert unmarshal_attest(marshal_attest(attest)) == attest


@given(signatures)
def test_signature_round_trip(signature: TpmtSignature) -> None:
    assert unmarshal_signature(marshal_signature(signature)) == signature


@settings(max_examples=300)
@given(
    kind=st.sampled_from(KINDS),
    name=st.sampled_from(sorted(PARSERS)),
    edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_vectors_parse_canonically_or_raise_format_error(
    vectors: Path, kind: str, name: str, edits: list[tuple[int, int]]
) -> None:
    """Whatever parses re-marshals to the very same bytes: no two encodings of one value."""
    blob = bytearray(_read(vectors, kind, name))
    for position, value in edits:
        blob[position % len(blob)] = value
    data = bytes(blob)
    parser, _ = PARSERS[name]
    try:
        parsed = parser(data)
    except FormatError:
        return
    if isinstance(parsed, TpmtPublic):
        assert marshal_public2b(parsed) == data
    elif isinstance(parsed, TpmsAttest):
        assert marshal_attest(parsed) == data
    else:
        assert marshal_signature(parsed) == data


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_format_error(data: bytes) -> None:
    for parser in (unmarshal_attest, unmarshal_signature, unmarshal_public2b, unmarshal_public):
        with contextlib.suppress(FormatError):
            parser(data)
