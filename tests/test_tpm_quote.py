"""Quote verification: real swtpm quotes accepted, every substitution and tampering refused.

The real vectors (shared/vectors/quotes, made by swtpm + tpm2-tools) prove that the
verifier accepts what a TPM produces, and that their PCR digest is the one the
event log replays to. Software "AKs" made here with ``cryptography`` cover what a
real TPM would never sign (other types, wrong magic) and what a cheating host
could sign with a key that is not a restricted TPM key.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from guardfab.errors import FormatError, InvalidInputError
from guardfab.tpm.constants import (
    HASH_ALGS,
    MAX_ATTEST_BYTES,
    TpmAlg,
    TpmaObject,
    TpmEccCurve,
    TpmSt,
)
from guardfab.tpm.quote import (
    AttestationKey,
    AttestationKeyError,
    NonceMismatchError,
    PcrDigestMismatchError,
    PcrSelectionError,
    QuoteSchemeError,
    QuoteSignatureError,
    QuoteTypeError,
    check_attestation_key,
    pcr_digest,
    verify_quote,
)
from guardfab.tpm.structures import (
    SYM_NULL,
    EccParms,
    EccPoint,
    RsaParms,
    Scheme,
    TpmsAttest,
    TpmsClockInfo,
    TpmsPcrSelection,
    TpmsQuoteInfo,
    TpmtPublic,
    TpmtSignature,
    marshal_attest,
    marshal_public2b,
    marshal_signature,
    pcr_selection,
    unmarshal_attest,
    unmarshal_public2b,
)

SHA256 = TpmAlg.SHA256
KINDS = ("rsa", "ecc")
OTHER = {"rsa": "ecc", "ecc": "rsa"}


# ------------------------------------------------------------------ the vectors


@dataclass(frozen=True)
class Vector:
    """One real quote with everything a verifier needs to accept it."""

    attest: bytes
    signature: bytes
    ak: bytes
    nonce: bytes
    pcrs: dict[int, dict[int, bytes]]

    def args(self, **changes: Any) -> dict[str, Any]:
        """verify_quote keyword arguments, with some replaced."""
        args = {
            "attest_bytes": self.attest,
            "signature_bytes": self.signature,
            "ak_public": self.ak,
            "expected_nonce": self.nonce,
            "pcr_values": self.pcrs,
        }
        args.update(changes)
        return args


def read_tpm2_tools_pcrs(blob: bytes) -> dict[int, dict[int, bytes]]:
    """Read ``tpm2_quote -o`` output: C structs in host (little-endian) order, not marshalled.

    TPML_PCR_SELECTION {UINT32 count; 16 x {UINT16 hash; UINT8 sizeofSelect;
    BYTE pcrSelect[4]; pad}} (132 bytes), UINT32 number of TPML_DIGEST, then each
    TPML_DIGEST {UINT32 count; 8 x {UINT16 size; BYTE buffer[64]}} (532 bytes). The
    digests follow the selection: bank by bank, ascending PCR index.
    """
    count = struct.unpack_from("<I", blob, 0)[0]
    wanted: list[tuple[int, int]] = []
    for slot in range(count):
        hash_alg, size = struct.unpack_from("<HB", blob, 4 + 8 * slot)
        select = blob[4 + 8 * slot + 3 : 4 + 8 * slot + 3 + size]
        wanted += [(hash_alg, i) for i in TpmsPcrSelection(hash_alg, select).indices()]
    lists = struct.unpack_from("<I", blob, 132)[0]
    assert len(blob) == 136 + 532 * lists, "unexpected tpm2-tools PCR file size"
    values: list[bytes] = []
    for n in range(lists):
        base = 136 + 532 * n
        for i in range(struct.unpack_from("<I", blob, base)[0]):
            size = struct.unpack_from("<H", blob, base + 4 + 66 * i)[0]
            values.append(blob[base + 6 + 66 * i : base + 6 + 66 * i + size])
    assert len(values) == len(wanted)
    result: dict[int, dict[int, bytes]] = {}
    for (bank, index), value in zip(wanted, values, strict=True):
        result.setdefault(bank, {})[index] = value
    return result


@pytest.fixture(scope="module")
def shared() -> Path:
    """shared/vectors beside the repository; missing vectors fail, never skip."""
    path = Path(__file__).resolve().parents[2] / "shared" / "vectors"
    if not (path / "quotes" / "rsa" / "quote.msg").is_file():
        pytest.fail(f"TPM quote vectors not found under {path}: clone shared/ beside the repo")
    return path


@pytest.fixture(scope="module")
def vectors(shared: Path) -> dict[str, Vector]:
    def load(kind: str) -> Vector:
        folder = shared / "quotes" / kind
        return Vector(
            attest=(folder / "quote.msg").read_bytes(),
            signature=(folder / "quote.sig").read_bytes(),
            ak=(folder / "ak.pub").read_bytes(),
            nonce=(folder / "nonce.bin").read_bytes(),
            pcrs=read_tpm2_tools_pcrs((folder / "quote.pcrs").read_bytes()),
        )

    return {kind: load(kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_real_quote_is_accepted_with_its_own_ak_and_nonce(
    vectors: dict[str, Vector], kind: str
) -> None:
    vector = vectors[kind]
    verified = verify_quote(**vector.args())
    assert verified.hash_alg == SHA256
    assert verified.attest.extra_data == vector.nonce
    assert verified.pcrs == vector.pcrs
    assert sorted(verified.pcrs[SHA256]) == list(range(8))
    # Parsed AK works as well as TPM2B_PUBLIC bytes.
    assert verify_quote(**vector.args(ak_public=unmarshal_public2b(vector.ak))) == verified


# ------------------------------------------------------- PCR digest vs event log


def replay_extends(path: Path) -> dict[int, bytes]:
    """Replay ``tpm2_pcrextend`` arguments (``index:sha256=hex``) from all-zero PCRs."""
    pcrs: dict[int, bytes] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        index, extend = line.split(":", 1)
        bank, digest = extend.split("=", 1)
        assert bank == "sha256", line
        old = pcrs.get(int(index), bytes(32))
        pcrs[int(index)] = hashlib.sha256(old + bytes.fromhex(digest)).digest()
    return pcrs


def eventlog_yaml_pcrs(path: Path) -> dict[int, bytes]:
    """The sha256 PCRs tpm2_eventlog printed at the end of a log's .yaml."""
    section = path.read_text().split("pcrs:\n  sha256:\n", 1)[1]
    return {
        int(m.group(1)): bytes.fromhex(m.group(2))
        for m in re.finditer(r"^ +(\d+) +: 0x([0-9a-f]{64})$", section, re.MULTILINE)
    }


@pytest.mark.parametrize("kind", KINDS)
def test_pcr_digest_matches_the_pcrs_and_the_replayed_event_log(
    shared: Path, vectors: dict[str, Vector], kind: str
) -> None:
    vector = vectors[kind]
    attest = unmarshal_attest(vector.attest)
    selection = attest.quote.pcr_select
    quoted = attest.quote.pcr_digest

    from_pcr_file = pcr_digest(selection, vector.pcrs, SHA256)
    naive = hashlib.sha256(b"".join(vector.pcrs[SHA256][i] for i in range(8))).digest()
    assert from_pcr_file == naive == quoted

    replayed = replay_extends(shared / "quotes" / "pcr_extends_sd-boot-fedora37.txt")
    boot_pcrs = {i: replayed[i] for i in range(8)}
    assert boot_pcrs == vector.pcrs[SHA256]
    assert pcr_digest(selection, {SHA256: boot_pcrs}, SHA256) == quoted

    log_yaml = shared / "eventlogs" / "event-sd-boot-fedora37.bin.yaml"
    assert {i: v for i, v in eventlog_yaml_pcrs(log_yaml).items() if i < 8} == boot_pcrs


def test_pcr_digest_rejects_values_of_the_wrong_size() -> None:
    selection = [pcr_selection(SHA256, [0])]
    with pytest.raises(FormatError, match="PCR sha256:0: 20 bytes, expected 32"):
        pcr_digest(selection, {SHA256: {0: bytes(20)}}, SHA256)


def test_pcr_digest_rejects_one_wrong_size_among_right_ones() -> None:
    """Values are size-checked together (the fast path): one short and one long value
    among right ones, whose total length is right, still name the first wrong PCR."""
    selection = [pcr_selection(SHA256, [0, 1, 2, 3])]
    values = {0: bytes(32), 1: bytes(32), 2: bytes(31), 3: bytes(33)}
    with pytest.raises(FormatError, match="PCR sha256:2: 31 bytes, expected 32"):
        pcr_digest(selection, {SHA256: values}, SHA256)
    with pytest.raises(PcrSelectionError, match="selects PCR sha256:1 but no expected value"):
        pcr_digest(selection, {SHA256: {0: bytes(32), 2: bytes(32), 3: bytes(32)}}, SHA256)


def test_pcr_digest_rejects_an_unknown_hash() -> None:
    with pytest.raises(FormatError, match="sm3_256 is not a supported hash"):
        pcr_digest([], {}, TpmAlg.SM3_256)


def test_pcr_digest_hashes_in_selection_order_even_a_bank_listed_twice() -> None:
    """As the TPM does: selection by selection (the parser refuses a repeated bank, a
    hand-built selection may not), ascending index within each."""
    a, b = b"a" * 32, b"b" * 32
    values = {SHA256: {0: a, 1: b}}
    split = [TpmsPcrSelection(SHA256, b"\x02\0\0"), TpmsPcrSelection(SHA256, b"\x01\0\0")]
    assert pcr_digest(split, values, SHA256) == hashlib.sha256(b + a).digest()
    both = [TpmsPcrSelection(SHA256, b"\x03\0\0")]
    assert pcr_digest(both, values, SHA256) == hashlib.sha256(a + b).digest()


# ------------------------------------------------------------- attack table


def _patched(blob: bytes, offset: int, new: bytes) -> bytes:
    return blob[:offset] + new + blob[offset + len(new) :]


def _with_pcr(v: Vector, bank: int, index: int, value: bytes) -> dict[int, dict[int, bytes]]:
    pcrs = {b: dict(values) for b, values in v.pcrs.items()}
    pcrs.setdefault(bank, {})[index] = value
    return pcrs


def _without_pcr(v: Vector, index: int) -> dict[int, dict[int, bytes]]:
    return {SHA256: {i: x for i, x in v.pcrs[SHA256].items() if i != index}}


Attack = Callable[[dict[str, Vector], str], dict[str, Any]]

ATTACKS: list[tuple[str, Attack, type[InvalidInputError], str]] = [
    (
        "the other AK",
        lambda vs, k: vs[k].args(ak_public=vs[OTHER[k]].ak),
        QuoteSchemeError,
        "but the AK's scheme is",
    ),
    (
        "another AK of the same kind",
        lambda vs, k: vs[k].args(ak_public=marshal_public2b(soft_ak(k).public)),
        QuoteSignatureError,
        "does not verify",
    ),
    (
        "the other quote's signature",
        lambda vs, k: vs[k].args(signature_bytes=vs[OTHER[k]].signature),
        QuoteSchemeError,
        "signed with",
    ),
    (
        "the other quote's bytes",
        lambda vs, k: vs[k].args(attest_bytes=vs[OTHER[k]].attest),
        QuoteSignatureError,
        "does not verify",
    ),
    (
        "another nonce",
        lambda vs, k: vs[k].args(expected_nonce=secrets.token_bytes(20)),
        NonceMismatchError,
        "not the expected nonce",
    ),
    (
        "a prefix of the nonce",
        lambda vs, k: vs[k].args(expected_nonce=vs[k].nonce[:-1]),
        NonceMismatchError,
        "not the expected nonce",
    ),
    (
        "an empty nonce",
        lambda vs, k: vs[k].args(expected_nonce=b""),
        NonceMismatchError,
        "not the expected nonce",
    ),
    (
        "one PCR differs from the baseline",
        lambda vs, k: vs[k].args(pcr_values=_with_pcr(vs[k], SHA256, 4, bytes(32))),
        PcrDigestMismatchError,
        "does not match",
    ),
    (
        "a required PCR is not quoted",
        lambda vs, k: vs[k].args(pcr_values=_with_pcr(vs[k], SHA256, 8, bytes(32))),
        PcrSelectionError,
        r"does not cover required PCR\(s\) sha256:8",
    ),
    (
        "a required bank is not quoted",
        lambda vs, k: vs[k].args(pcr_values=_with_pcr(vs[k], TpmAlg.SHA1, 0, bytes(20))),
        PcrSelectionError,
        r"sha1:0",
    ),
    (
        "a quoted PCR has no expected value",
        lambda vs, k: vs[k].args(pcr_values=_without_pcr(vs[k], 7)),
        PcrSelectionError,
        "selects PCR sha256:7 but no expected value",
    ),
    (
        "truncated quote",
        lambda vs, k: vs[k].args(attest_bytes=vs[k].attest[:-1]),
        QuoteSignatureError,
        "does not verify",
    ),
    (
        "quote with a trailing byte",
        lambda vs, k: vs[k].args(attest_bytes=vs[k].attest + b"\0"),
        QuoteSignatureError,
        "does not verify",
    ),
    (
        "AK claims decrypt",
        lambda vs, k: vs[k].args(ak_public=_patched(vs[k].ak, 6, b"\x00\x07\x00\x72")),
        AttestationKeyError,
        "decrypt is set",
    ),
    (
        "AK not restricted",
        lambda vs, k: vs[k].args(ak_public=_patched(vs[k].ak, 6, b"\x00\x04\x00\x72")),
        AttestationKeyError,
        "restricted is not set",
    ),
    (
        "AK not fixedTPM",
        lambda vs, k: vs[k].args(ak_public=_patched(vs[k].ak, 6, b"\x00\x05\x00\x70")),
        AttestationKeyError,
        "fixedTPM is not set",
    ),
    (
        "malformed signature",
        lambda vs, k: vs[k].args(signature_bytes=vs[k].signature[:-1]),
        FormatError,
        "TPMT_SIGNATURE",
    ),
    (
        "malformed AK",
        lambda vs, k: vs[k].args(ak_public=vs[k].ak[:-1]),
        FormatError,
        "TPM2B_PUBLIC",
    ),
    (
        "oversized quote",
        lambda vs, k: vs[k].args(attest_bytes=vs[k].attest + bytes(MAX_ATTEST_BYTES)),
        FormatError,
        "larger than any quote",
    ),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("attack", "error", "pattern"),
    [case[1:] for case in ATTACKS],
    ids=[case[0] for case in ATTACKS],
)
def test_attack_is_refused(
    vectors: dict[str, Vector],
    kind: str,
    attack: Attack,
    error: type[InvalidInputError],
    pattern: str,
) -> None:
    with pytest.raises(error, match=pattern) as info:
        verify_quote(**attack(vectors, kind))
    assert type(info.value) is error  # exactly this failure, not a sibling


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("attack", "error", "pattern"),
    [case[1:] for case in ATTACKS],
    ids=[case[0] for case in ATTACKS],
)
def test_a_prepared_ak_refuses_every_attack_alike(
    vectors: dict[str, Vector],
    kind: str,
    attack: Attack,
    error: type[InvalidInputError],
    pattern: str,
) -> None:
    """A verifier that keeps AttestationKey objects skips no check: same error, same words.

    An AK that cannot be prepared fails in AttestationKey.of with the error
    verify_quote gives it; every other attack fails in verify_quote as before.
    """
    with pytest.raises(error, match=pattern) as info:
        _verify_with_prepared_ak(attack(vectors, kind))
    assert type(info.value) is error


def _verify_with_prepared_ak(args: dict[str, Any]) -> object:
    return verify_quote(**{**args, "ak_public": AttestationKey.of(args["ak_public"])})


@pytest.mark.parametrize("kind", KINDS)
def test_a_prepared_ak_must_pair_a_padding_with_an_rsa_key(
    vectors: dict[str, Vector], kind: str
) -> None:
    """The verifier tells an RSA AK by its padding: an AttestationKey put together by hand
    with a padding and an ECC key, or an RSA key without one, cannot be made."""
    good = AttestationKey.of(vectors[kind].ak)
    other = AttestationKey.of(vectors[OTHER[kind]].ak)
    with pytest.raises(AttestationKeyError, match="padding exactly when its key is RSA"):
        AttestationKey(good.public, good.key, good.algorithm, other.padding, other.ecdsa)
    # Built by hand with its own parts, it verifies as the prepared one does.
    same = AttestationKey(good.public, good.key, good.algorithm, good.padding, good.ecdsa)
    assert verify_quote(**vectors[kind].args(ak_public=same)) == verify_quote(
        **vectors[kind].args()
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_prepared_ak_gives_the_same_verified_quote(vectors: dict[str, Vector], kind: str) -> None:
    vector = vectors[kind]
    prepared = AttestationKey.of(vector.ak)
    assert verify_quote(**vector.args(ak_public=prepared)) == verify_quote(**vector.args())
    # The prepared key is the AK's own: another kind's prepared AK is refused.
    other = AttestationKey.of(vectors[OTHER[kind]].ak)
    with pytest.raises(QuoteSchemeError):
        verify_quote(**vector.args(ak_public=other))


@pytest.mark.parametrize("kind", KINDS)
def test_every_flipped_quote_byte_breaks_the_signature(
    vectors: dict[str, Vector], kind: str
) -> None:
    vector = vectors[kind]
    for position in range(len(vector.attest)):
        for mask in (0x01, 0x80):
            tampered = bytearray(vector.attest)
            tampered[position] ^= mask
            with pytest.raises(QuoteSignatureError):
                verify_quote(**vector.args(attest_bytes=bytes(tampered)))


@pytest.mark.parametrize("kind", KINDS)
def test_every_flipped_signature_byte_is_refused(vectors: dict[str, Vector], kind: str) -> None:
    vector = vectors[kind]
    signature = vector.signature
    # Signature value bytes (after the 4-byte header and each 2-byte size).
    values = range(6, len(signature)) if kind == "rsa" else [*range(6, 38), *range(40, 72)]
    for position in range(len(signature)):
        tampered = bytearray(signature)
        tampered[position] ^= 0x01
        expected = QuoteSignatureError if position in values else InvalidInputError
        with pytest.raises(expected):
            verify_quote(**vector.args(signature_bytes=bytes(tampered)))


# ----------------------------------------------------------- software AKs

AK_ATTRIBUTES = (
    TpmaObject.FIXED_TPM
    | TpmaObject.FIXED_PARENT
    | TpmaObject.SENSITIVE_DATA_ORIGIN
    | TpmaObject.USER_WITH_AUTH
    | TpmaObject.RESTRICTED
    | TpmaObject.SIGN_ENCRYPT
)
_CURVES = {TpmEccCurve.NIST_P256: ec.SECP256R1(), TpmEccCurve.NIST_P384: ec.SECP384R1()}


@dataclass(frozen=True)
class SoftAk:
    """A key pair shaped like an AK, whose private half the test holds."""

    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    public: TpmtPublic


@functools.cache
def _rsa_private(index: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@functools.cache
def _ec_private(curve: int, index: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVES[curve])


def soft_ak(
    kind: str,
    *,
    scheme: int | None = None,
    hash_alg: int = SHA256,
    attributes: int = AK_ATTRIBUTES,
    curve: int = TpmEccCurve.NIST_P256,
    index: int = 0,
) -> SoftAk:
    """An AK-shaped public area over a key generated here (cached per parameters)."""
    if kind == "rsa":
        key = _rsa_private(index)
        parms = RsaParms(SYM_NULL, Scheme(scheme or TpmAlg.RSASSA, hash_alg), 2048)
        unique: bytes | EccPoint = key.public_key().public_numbers().n.to_bytes(256, "big")
        public = TpmtPublic(TpmAlg.RSA, SHA256, attributes, b"", parms, unique)
        return SoftAk(key, public)
    ec_key = _ec_private(curve, index)
    size = (ec_key.curve.key_size + 7) // 8
    numbers = ec_key.public_key().public_numbers()
    point = EccPoint(numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big"))
    ecc = EccParms(SYM_NULL, Scheme(scheme or TpmAlg.ECDSA, hash_alg), curve)
    return SoftAk(ec_key, TpmtPublic(TpmAlg.ECC, SHA256, attributes, b"", ecc, point))


def soft_sign(
    ak: SoftAk, message: bytes, *, sig_alg: int | None = None, hash_alg: int | None = None
) -> bytes:
    """A TPMT_SIGNATURE over ``message``; the header says what the AK's scheme says."""
    scheme = ak.public.parameters.scheme
    sig_alg = sig_alg or scheme.scheme
    hash_alg = hash_alg or scheme.hash_alg
    algorithm = HASH_ALGS[hash_alg].algorithm()
    if isinstance(ak.private, rsa.RSAPrivateKey):
        pad: padding.AsymmetricPadding = padding.PKCS1v15()
        if sig_alg == TpmAlg.RSAPSS:
            pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        sig = ak.private.sign(message, pad, algorithm)
        return marshal_signature(TpmtSignature(sig_alg, hash_alg, sig=sig))
    r, s = decode_dss_signature(ak.private.sign(message, ec.ECDSA(algorithm)))
    size = (ak.private.curve.key_size + 7) // 8
    return marshal_signature(
        TpmtSignature(sig_alg, hash_alg, r=r.to_bytes(size, "big"), s=s.to_bytes(size, "big"))
    )


BOOT_PCRS = {SHA256: {i: hashlib.sha256(bytes([i])).digest() for i in range(8)}}


def soft_quote(
    nonce: bytes,
    pcrs: dict[int, dict[int, bytes]] = BOOT_PCRS,
    *,
    hash_alg: int = SHA256,
    attest_type: int = TpmSt.ATTEST_QUOTE,
    digest: bytes | None = None,
) -> bytes:
    """TPMS_ATTEST bytes as a TPM would build them for ``pcrs`` (banks in dict order)."""
    selection = tuple(pcr_selection(bank, sorted(values)) for bank, values in pcrs.items())
    if digest is None:
        digest = pcr_digest(selection, pcrs, hash_alg)
    clock = TpmsClockInfo(1000, 1, 0, True)
    attest = TpmsAttest(
        b"\x00\x0b" + bytes(32), nonce, clock, 7, TpmsQuoteInfo(selection, digest), attest_type
    )
    return marshal_attest(attest)


SCHEMES = [
    ("rsa", TpmAlg.RSASSA, SHA256, TpmEccCurve.NIST_P256),
    ("rsa", TpmAlg.RSASSA, TpmAlg.SHA512, TpmEccCurve.NIST_P256),
    ("rsa", TpmAlg.RSAPSS, SHA256, TpmEccCurve.NIST_P256),
    ("rsa", TpmAlg.RSAPSS, TpmAlg.SHA384, TpmEccCurve.NIST_P256),
    ("ecc", TpmAlg.ECDSA, SHA256, TpmEccCurve.NIST_P256),
    ("ecc", TpmAlg.ECDSA, TpmAlg.SHA384, TpmEccCurve.NIST_P384),
]


@pytest.mark.parametrize(("kind", "scheme", "hash_alg", "curve"), SCHEMES)
def test_every_supported_scheme_verifies(kind: str, scheme: int, hash_alg: int, curve: int) -> None:
    ak = soft_ak(kind, scheme=scheme, hash_alg=hash_alg, curve=curve)
    nonce = secrets.token_bytes(32)
    message = soft_quote(nonce, hash_alg=hash_alg)
    verified = verify_quote(
        message, soft_sign(ak, message), ak.public, expected_nonce=nonce, pcr_values=BOOT_PCRS
    )
    # The PCR digest is computed with the signing hash, whatever the bank's hash.
    assert verified.hash_alg == hash_alg
    assert len(verified.attest.quote.pcr_digest) == HASH_ALGS[hash_alg].digest_size


def test_pss_with_maximum_salt_verifies() -> None:
    """Older TPMs salt RSAPSS with the maximum length instead of the digest size."""
    ak = soft_ak("rsa", scheme=TpmAlg.RSAPSS)
    assert isinstance(ak.private, rsa.RSAPrivateKey)
    nonce = secrets.token_bytes(20)
    message = soft_quote(nonce)
    algorithm = HASH_ALGS[SHA256].algorithm()
    pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.MAX_LENGTH)
    sig = ak.private.sign(message, pss, algorithm)
    signature = marshal_signature(TpmtSignature(TpmAlg.RSAPSS, SHA256, sig=sig))
    verify_quote(message, signature, ak.public, expected_nonce=nonce, pcr_values=BOOT_PCRS)


def test_multi_bank_digest_follows_the_selection_order() -> None:
    """The TPM hashes bank by bank in selection order; computed here with hashlib alone."""
    ak = soft_ak("ecc")
    nonce = secrets.token_bytes(20)
    sha1 = {i: hashlib.sha1(bytes([i])).digest() for i in (0, 1)}
    sha256 = {0: bytes(32), 1: b"\1" * 32}
    pcrs = {TpmAlg.SHA1: sha1, SHA256: sha256}
    by_hand = hashlib.sha256(sha1[0] + sha1[1] + sha256[0] + sha256[1]).digest()
    message = soft_quote(nonce, pcrs, digest=by_hand)
    verified = verify_quote(
        message, soft_sign(ak, message), ak.public, expected_nonce=nonce, pcr_values=pcrs
    )
    assert [sel.hash_alg for sel in verified.attest.quote.pcr_select] == [TpmAlg.SHA1, SHA256]
    # The verifier's dict order does not matter; the quote's selection order does.
    reordered = {SHA256: sha256, TpmAlg.SHA1: sha1}
    verify_quote(
        message, soft_sign(ak, message), ak.public, expected_nonce=nonce, pcr_values=reordered
    )
    other_order = hashlib.sha256(sha256[0] + sha256[1] + sha1[0] + sha1[1]).digest()
    wrong = soft_quote(nonce, pcrs, digest=other_order)
    with pytest.raises(PcrDigestMismatchError):
        verify_quote(wrong, soft_sign(ak, wrong), ak.public, expected_nonce=nonce, pcr_values=pcrs)


def test_unrestricted_key_cannot_vouch_for_a_forged_quote() -> None:
    """A host signing a made-up quote with an ordinary key: the signature is valid."""
    forger = soft_ak("rsa", attributes=AK_ATTRIBUTES & ~TpmaObject.RESTRICTED)
    nonce = secrets.token_bytes(20)
    forged = soft_quote(nonce)  # claims exactly the PCRs the verifier wants to see
    with pytest.raises(AttestationKeyError, match="restricted is not set"):
        verify_quote(
            forged,
            soft_sign(forger, forged),
            forger.public,
            expected_nonce=nonce,
            pcr_values=BOOT_PCRS,
        )


def test_attestation_key_check_lists_every_problem() -> None:
    bare = soft_ak("ecc", attributes=TpmaObject.SIGN_ENCRYPT | TpmaObject.DECRYPT)
    with pytest.raises(AttestationKeyError) as info:
        check_attestation_key(bare.public)
    message = str(info.value)
    for problem in (
        "fixedTPM is not set",
        "fixedParent is not set",
        "sensitiveDataOrigin is not set",
        "restricted is not set",
        "decrypt is set",
    ):
        assert problem in message
    assert "sign is not set" not in message
    assert info.value.hint


@pytest.mark.parametrize(
    ("kind", "scheme", "hash_alg", "pattern"),
    [
        ("rsa", TpmAlg.RSASSA, TpmAlg.SHA1, "scheme hash sha1 is not accepted"),
        ("ecc", TpmAlg.ECDSA, TpmAlg.SHA1, "scheme hash sha1 is not accepted"),
        ("ecc", TpmAlg.ECDAA, SHA256, "signing scheme ecdaa is not supported"),
        ("rsa", TpmAlg.NULL, TpmAlg.NULL, "signing scheme null is not supported"),
    ],
)
def test_attestation_key_scheme_must_be_verifiable(
    kind: str, scheme: int, hash_alg: int, pattern: str
) -> None:
    ak = soft_ak(kind, scheme=scheme, hash_alg=hash_alg)
    with pytest.raises(AttestationKeyError, match=pattern):
        check_attestation_key(ak.public)


def test_vector_aks_are_attestation_keys(vectors: dict[str, Vector]) -> None:
    for vector in vectors.values():
        check_attestation_key(unmarshal_public2b(vector.ak))


def _signed(ak: SoftAk, message: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "attest_bytes": message,
        "signature_bytes": soft_sign(ak, message, **extra),
        "ak_public": ak.public,
        "expected_nonce": NONCE,
        "pcr_values": BOOT_PCRS,
    }


NONCE = b"n" * 20
SIGNED_CASES: list[tuple[str, Callable[[SoftAk], dict[str, Any]], type[Exception], str]] = [
    (
        "a certify attestation",
        lambda ak: _signed(ak, soft_quote(NONCE, attest_type=TpmSt.ATTEST_CERTIFY)),
        QuoteTypeError,
        "attest_certify, not a quote",
    ),
    (
        "data without TPM_GENERATED_VALUE",
        lambda ak: _signed(ak, b"\0\0\0\0" + soft_quote(NONCE)[4:]),
        QuoteTypeError,
        "not TPM-generated",
    ),
    (
        "a signed quote with a trailing byte",
        lambda ak: _signed(ak, soft_quote(NONCE) + b"\0"),
        FormatError,
        "trailing bytes",
    ),
    (
        "a signature header naming another hash",
        lambda ak: _signed(ak, soft_quote(NONCE), hash_alg=TpmAlg.SHA384),
        QuoteSchemeError,
        "ecdsa/sha384 but the AK's scheme is ecdsa/sha256",
    ),
    (
        "a quote selecting no PCRs",
        lambda ak: _signed(ak, soft_quote(NONCE, {})),
        PcrSelectionError,
        "covers no PCRs",
    ),
    (
        "the quote of another nonce",
        lambda ak: _signed(ak, soft_quote(b"m" * 20)),
        NonceMismatchError,
        "not the expected nonce",
    ),
    (
        "an ECDSA signature of zeros",
        lambda ak: {
            **_signed(ak, soft_quote(NONCE)),
            "signature_bytes": marshal_signature(
                TpmtSignature(TpmAlg.ECDSA, SHA256, r=bytes(32), s=bytes(32))
            ),
        },
        QuoteSignatureError,
        "does not verify",
    ),
]


@pytest.mark.parametrize(
    ("case", "error", "pattern"),
    [case[1:] for case in SIGNED_CASES],
    ids=[case[0] for case in SIGNED_CASES],
)
def test_correctly_signed_but_unacceptable(
    case: Callable[[SoftAk], dict[str, Any]], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        verify_quote(**case(soft_ak("ecc")))


def test_errors_explain_themselves(vectors: dict[str, Vector]) -> None:
    with pytest.raises(NonceMismatchError) as info:
        verify_quote(**vectors["rsa"].args(expected_nonce=b"stale"))
    text = info.value.diagnostics()
    assert "error: the quote's qualifying data is not the expected nonce" in text
    assert "hint: the quote is stale or replayed" in text
