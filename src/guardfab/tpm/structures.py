"""Strict TPM 2.0 wire structures: TPMT_PUBLIC, TPMS_ATTEST (quote) and TPMT_SIGNATURE.

Everything a guarded host sends about its TPM arrives as these big-endian
structures (TPM 2.0 Library Part 2). The HGS parses them itself, without libtss2,
so that a verifier needs no TPM software stack. The parsers are strict on purpose:
every size is bounded by the specification's maximum, every enumerated value must
be one guardfab knows, reserved bits must be clear, and the input must end exactly
where the structure does. What a TPM would never produce is rejected here with a
:class:`~guardfab.errors.FormatError` that names the field and its byte offset,
rather than being half-understood later.

Parsing uses ``struct.unpack_from`` at explicit offsets and builds one small
immutable object per structure, so a quote parses in microseconds: the HGS checks
about a thousand quotes a second. What every quote makes (TPMS_ATTEST and its
parts, TPMT_SIGNATURE) are named tuples: a frozen dataclass sets each field
through ``object.__setattr__``, which cost a verifier ~1 us per quote; keys
(TPMT_PUBLIC), parsed once per AK, stay frozen dataclasses. The marshal functions
are the exact inverses (tests and hypothesis round trips rely on
``marshal(unmarshal(b)) == b``), which also makes :func:`object_name` a hash of
exactly the bytes the TPM hashed.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from guardfab.errors import FormatError
from guardfab.tpm.constants import (
    ECC_SCHEMES,
    HASH_ALGS,
    KDF_SCHEMES,
    MAX_DIGEST_BYTES,
    MAX_ECC_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_PCR_BANKS,
    MAX_PCR_SELECT_BYTES,
    MAX_RSA_KEY_BYTES,
    RSA_KEY_BITS,
    RSA_SCHEMES,
    SYM_ALGS,
    SYM_KEY_BITS,
    SYM_MODES,
    TPM_GENERATED_VALUE,
    TPMA_OBJECT_RESERVED,
    TpmAlg,
    TpmEccCurve,
    TpmSt,
    alg_name,
    st_name,
)

#: Curves a public area can be turned into a ``cryptography`` key for.
_CURVES: dict[int, ec.EllipticCurve] = {
    TpmEccCurve.NIST_P256: ec.SECP256R1(),
    TpmEccCurve.NIST_P384: ec.SECP384R1(),
    TpmEccCurve.NIST_P521: ec.SECP521R1(),
}
_KNOWN_CURVES = frozenset(c.value for c in TpmEccCurve)

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HH = struct.Struct(">HH")
_PUBLIC_HEAD = struct.Struct(">HHI")  # type, nameAlg, objectAttributes
_ATTEST_HEAD = struct.Struct(">IH")  # magic, type
_CLOCK_FW = struct.Struct(">QIIBQ")  # clock, resetCount, restartCount, safe, firmwareVersion
_PCR_SEL_HEAD = struct.Struct(">HB")  # hash, sizeofSelect


# --------------------------------------------------------------------------- models


@dataclass(frozen=True, slots=True)
class SymDef:
    """TPMT_SYM_DEF_OBJECT: the symmetric cipher of a storage key (NULL for others)."""

    algorithm: int
    key_bits: int = 0
    mode: int = TpmAlg.NULL


SYM_NULL = SymDef(TpmAlg.NULL)


@dataclass(frozen=True, slots=True)
class Scheme:
    """A TPMT_*_SCHEME: a scheme identifier, its hash (NULL if none) and ECDAA count."""

    scheme: int
    hash_alg: int = TpmAlg.NULL
    count: int = 0


SCHEME_NULL = Scheme(TpmAlg.NULL)


@dataclass(frozen=True, slots=True)
class RsaParms:
    """TPMS_RSA_PARMS. An exponent of 0 means the default 65537, as on the wire."""

    symmetric: SymDef
    scheme: Scheme
    key_bits: int
    exponent: int = 0


@dataclass(frozen=True, slots=True)
class EccParms:
    """TPMS_ECC_PARMS."""

    symmetric: SymDef
    scheme: Scheme
    curve_id: int
    kdf: Scheme = SCHEME_NULL


@dataclass(frozen=True, slots=True)
class EccPoint:
    """TPMS_ECC_POINT: big-endian coordinates exactly as the TPM sized them."""

    x: bytes
    y: bytes


@dataclass(frozen=True, slots=True)
class TpmtPublic:
    """TPMT_PUBLIC of an RSA or ECC key; ``unique`` is the modulus or the point."""

    key_type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: RsaParms | EccParms
    unique: bytes | EccPoint


class TpmsPcrSelection(NamedTuple):
    """TPMS_PCR_SELECTION: one bank and a bitmap of PCRs (bit i of byte j = PCR 8j+i)."""

    hash_alg: int
    select: bytes

    def indices(self) -> tuple[int, ...]:
        """Return the selected PCR indices in ascending order, the order the TPM hashes."""
        return _selected_indices(self.select)


@functools.lru_cache(maxsize=256)
def _selected_indices(select: bytes) -> tuple[int, ...]:
    """The set bits of a pcrSelect bitmap (cached: hosts quote the same few selections).

    The bitmap is at most MAX_PCR_SELECT_BYTES long once parsed; the cache is
    bounded whatever callers pass.
    """
    return tuple(
        8 * byte_index + bit
        for byte_index, byte in enumerate(select)
        for bit in range(8)
        if byte >> bit & 1
    )


def pcr_selection(hash_alg: int, indices: list[int] | tuple[int, ...]) -> TpmsPcrSelection:
    """Build a selection of ``indices`` in one bank, with the usual 3-byte (24 PCR) bitmap."""
    select = bytearray(max(3, (max(indices, default=0) // 8) + 1))
    for index in indices:
        select[index // 8] |= 1 << (index % 8)
    return TpmsPcrSelection(hash_alg, bytes(select))


class TpmsClockInfo(NamedTuple):
    """TPMS_CLOCK_INFO: clock in ms, boot and resume counters, and the safe flag."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


class TpmsQuoteInfo(NamedTuple):
    """TPMS_QUOTE_INFO: which PCRs were quoted and the digest of their values."""

    pcr_select: tuple[TpmsPcrSelection, ...]
    pcr_digest: bytes


class TpmsAttest(NamedTuple):
    """TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE (the magic is implied: it was checked)."""

    qualified_signer: bytes
    extra_data: bytes
    clock_info: TpmsClockInfo
    firmware_version: int
    quote: TpmsQuoteInfo
    attest_type: int = TpmSt.ATTEST_QUOTE


class TpmtSignature(NamedTuple):
    """TPMT_SIGNATURE: RSASSA/RSAPSS carry ``sig``; ECDSA carries ``r`` and ``s``."""

    sig_alg: int
    hash_alg: int
    sig: bytes = b""
    r: bytes = b""
    s: bytes = b""


# --------------------------------------------------------------- low-level reading


def _truncated(what: str, offset: int, need: int, have: int) -> FormatError:
    return FormatError(
        f"{what} at offset {offset}: truncated (needs {need} bytes, {max(have, 0)} remain)",
        hint="the structure was cut short; send the complete TPM output",
    )


def _u16(data: bytes, off: int, end: int, what: str) -> tuple[int, int]:
    if end - off < 2:
        raise _truncated(what, off, 2, end - off)
    return _U16.unpack_from(data, off)[0], off + 2


def _tpm2b(data: bytes, off: int, end: int, what: str, max_size: int) -> tuple[bytes, int]:
    """Read a TPM2B (UINT16 size + bytes) whose size may not exceed ``max_size``.

    The size is read inline (not by :func:`_u16`): every quote reads several,
    and the field name for an error is only built when there is one.
    """
    if end - off < 2:
        raise _truncated(f"{what}.size", off, 2, end - off)
    (size,) = _U16.unpack_from(data, off)
    start = off + 2
    if size > max_size:
        raise FormatError(f"{what} at offset {off}: size {size} exceeds the maximum {max_size}")
    if size > end - start:
        raise _truncated(what, start, size, end - start)
    return data[start : start + size], start + size


def _expect_end(off: int, end: int, what: str) -> None:
    if off != end:
        raise FormatError(f"{what}: {end - off} unexpected trailing bytes at offset {off}")


def _hash_alg(alg: int, what: str, off: int) -> int:
    if alg not in HASH_ALGS:
        raise FormatError(f"{what} at offset {off}: {alg_name(alg)} is not a supported hash")
    return alg


# -------------------------------------------------------------------- TPMT_PUBLIC


def _sym_def(data: bytes, off: int, end: int, what: str) -> tuple[SymDef, int]:
    alg, pos = _u16(data, off, end, f"{what}.algorithm")
    if alg == TpmAlg.NULL:
        return SYM_NULL, pos
    if alg not in SYM_ALGS:
        raise FormatError(f"{what} at offset {off}: {alg_name(alg)} is not a symmetric cipher")
    if end - pos < 4:
        raise _truncated(f"{what}.keyBits", pos, 4, end - pos)
    key_bits, mode = _HH.unpack_from(data, pos)
    if key_bits not in SYM_KEY_BITS:
        raise FormatError(f"{what}.keyBits at offset {pos}: {key_bits} is not 128, 192 or 256")
    if mode not in SYM_MODES:
        raise FormatError(f"{what}.mode at offset {pos + 2}: {alg_name(mode)} is not a mode")
    return SymDef(alg, key_bits, mode), pos + 4


def _scheme(
    data: bytes, off: int, end: int, what: str, allowed: dict[int, int]
) -> tuple[Scheme, int]:
    alg, pos = _u16(data, off, end, f"{what}.scheme")
    if alg == TpmAlg.NULL:
        return SCHEME_NULL, pos
    details = allowed.get(alg)
    if details is None:
        raise FormatError(f"{what} at offset {off}: {alg_name(alg)} is not allowed here")
    if details == 0:
        return Scheme(alg), pos
    hash_alg, after = _u16(data, pos, end, f"{what}.hashAlg")
    _hash_alg(hash_alg, f"{what}.hashAlg", pos)
    if details == 1:
        return Scheme(alg, hash_alg), after
    count, after = _u16(data, after, end, f"{what}.count")
    return Scheme(alg, hash_alg, count), after


def _rsa_parms(data: bytes, off: int, end: int) -> tuple[RsaParms, int]:
    symmetric, off = _sym_def(data, off, end, "TPMS_RSA_PARMS.symmetric")
    scheme, off = _scheme(data, off, end, "TPMS_RSA_PARMS.scheme", RSA_SCHEMES)
    key_bits, off = _u16(data, off, end, "TPMS_RSA_PARMS.keyBits")
    if key_bits not in RSA_KEY_BITS:
        raise FormatError(f"TPMS_RSA_PARMS.keyBits at offset {off - 2}: {key_bits} unsupported")
    if end - off < 4:
        raise _truncated("TPMS_RSA_PARMS.exponent", off, 4, end - off)
    exponent = _U32.unpack_from(data, off)[0]
    return RsaParms(symmetric, scheme, key_bits, exponent), off + 4


def _ecc_parms(data: bytes, off: int, end: int) -> tuple[EccParms, int]:
    symmetric, off = _sym_def(data, off, end, "TPMS_ECC_PARMS.symmetric")
    scheme, off = _scheme(data, off, end, "TPMS_ECC_PARMS.scheme", ECC_SCHEMES)
    curve_id, off = _u16(data, off, end, "TPMS_ECC_PARMS.curveID")
    if curve_id not in _KNOWN_CURVES:
        raise FormatError(f"TPMS_ECC_PARMS.curveID at offset {off - 2}: 0x{curve_id:04x} unknown")
    kdf, off = _scheme(data, off, end, "TPMS_ECC_PARMS.kdf", KDF_SCHEMES)
    return EccParms(symmetric, scheme, curve_id, kdf), off


def _public_head(data: bytes, off: int, end: int) -> tuple[int, int, int]:
    """Read and check TPMT_PUBLIC's type, nameAlg and objectAttributes."""
    if end - off < _PUBLIC_HEAD.size:
        raise _truncated("TPMT_PUBLIC", off, _PUBLIC_HEAD.size, end - off)
    key_type, name_alg, attributes = _PUBLIC_HEAD.unpack_from(data, off)
    if key_type not in (TpmAlg.RSA, TpmAlg.ECC):
        raise FormatError(
            f"TPMT_PUBLIC.type at offset {off}: {alg_name(key_type)} is not an RSA or ECC key"
        )
    _hash_alg(name_alg, "TPMT_PUBLIC.nameAlg", off + 2)
    if attributes & TPMA_OBJECT_RESERVED:
        raise FormatError(
            f"TPMT_PUBLIC.objectAttributes at offset {off + 4}: reserved bits "
            f"0x{attributes & TPMA_OBJECT_RESERVED:08x} are set"
        )
    return key_type, name_alg, attributes


def _public_area(data: bytes, off: int, end: int) -> tuple[TpmtPublic, int]:
    key_type, name_alg, attributes = _public_head(data, off, end)
    policy_at = off + _PUBLIC_HEAD.size
    auth_policy, off = _tpm2b(data, policy_at, end, "TPMT_PUBLIC.authPolicy", MAX_DIGEST_BYTES)
    if auth_policy and len(auth_policy) != HASH_ALGS[name_alg].digest_size:
        raise FormatError(
            f"TPMT_PUBLIC.authPolicy at offset {policy_at}: {len(auth_policy)} bytes is not "
            f"empty or a {alg_name(name_alg)} digest"
        )
    parameters: RsaParms | EccParms
    unique: bytes | EccPoint
    if key_type == TpmAlg.RSA:
        parameters, off = _rsa_parms(data, off, end)
        unique, off = _tpm2b(data, off, end, "TPMT_PUBLIC.unique.rsa", MAX_RSA_KEY_BYTES)
    else:
        parameters, off = _ecc_parms(data, off, end)
        x, off = _tpm2b(data, off, end, "TPMT_PUBLIC.unique.ecc.x", MAX_ECC_KEY_BYTES)
        y, off = _tpm2b(data, off, end, "TPMT_PUBLIC.unique.ecc.y", MAX_ECC_KEY_BYTES)
        unique = EccPoint(x, y)
    return TpmtPublic(key_type, name_alg, attributes, auth_policy, parameters, unique), off


def unmarshal_public(data: bytes) -> TpmtPublic:
    """Parse a TPMT_PUBLIC that must fill ``data`` exactly.

    Raises:
        FormatError: truncated, oversized, unknown or reserved values, or trailing bytes.
    """
    public, off = _public_area(data, 0, len(data))
    _expect_end(off, len(data), "TPMT_PUBLIC")
    return public


def unmarshal_public2b(data: bytes) -> TpmtPublic:
    """Parse a TPM2B_PUBLIC (what ``tpm2_createak -u`` writes) that must fill ``data``.

    Raises:
        FormatError: the size field disagrees with the TPMT_PUBLIC inside, or as
            :func:`unmarshal_public`.
    """
    size, start = _u16(data, 0, len(data), "TPM2B_PUBLIC.size")
    if size == 0:
        raise FormatError("TPM2B_PUBLIC at offset 0: empty (size 0)")
    end = start + size
    if end > len(data):
        raise _truncated("TPM2B_PUBLIC", start, size, len(data) - start)
    public, off = _public_area(data, start, end)
    _expect_end(off, end, "TPM2B_PUBLIC.publicArea")
    _expect_end(end, len(data), "TPM2B_PUBLIC")
    return public


def as_public(value: TpmtPublic | bytes) -> TpmtPublic:
    """Accept a parsed public area or TPM2B_PUBLIC bytes, so callers may pass either."""
    if isinstance(value, TpmtPublic):
        return value
    return unmarshal_public2b(value)


def _m2b(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def _marshal_scheme(scheme: Scheme) -> bytes:
    if scheme.scheme == TpmAlg.NULL:
        return _U16.pack(TpmAlg.NULL)
    if scheme.scheme == TpmAlg.RSAES:
        return _U16.pack(scheme.scheme)
    if scheme.scheme == TpmAlg.ECDAA:
        return struct.pack(">HHH", scheme.scheme, scheme.hash_alg, scheme.count)
    return _HH.pack(scheme.scheme, scheme.hash_alg)


def _marshal_sym(sym: SymDef) -> bytes:
    if sym.algorithm == TpmAlg.NULL:
        return _U16.pack(TpmAlg.NULL)
    return struct.pack(">HHH", sym.algorithm, sym.key_bits, sym.mode)


def marshal_public(public: TpmtPublic) -> bytes:
    """Serialize a TPMT_PUBLIC: the exact inverse of :func:`unmarshal_public`."""
    parms = public.parameters
    head = _PUBLIC_HEAD.pack(public.key_type, public.name_alg, public.object_attributes)
    out = [head, _m2b(public.auth_policy), _marshal_sym(parms.symmetric)]
    out.append(_marshal_scheme(parms.scheme))
    if isinstance(parms, RsaParms) and isinstance(public.unique, bytes):
        out += [_U16.pack(parms.key_bits), _U32.pack(parms.exponent), _m2b(public.unique)]
    elif isinstance(parms, EccParms) and isinstance(public.unique, EccPoint):
        out += [_U16.pack(parms.curve_id), _marshal_scheme(parms.kdf)]
        out += [_m2b(public.unique.x), _m2b(public.unique.y)]
    else:
        raise FormatError("TPMT_PUBLIC: parameters and unique are of different key types")
    return b"".join(out)


def marshal_public2b(public: TpmtPublic) -> bytes:
    """Serialize a TPM2B_PUBLIC around :func:`marshal_public`."""
    return _m2b(marshal_public(public))


def object_name(public: TpmtPublic) -> bytes:
    """Return the TPM Name of a key: nameAlg (UINT16) || H_nameAlg(TPMT_PUBLIC).

    The Name is what MakeCredential binds a credential to and what the TPM checks
    in ActivateCredential, so it must hash exactly the marshalled public area.
    """
    digest = HASH_ALGS[public.name_alg].new(marshal_public(public)).digest()
    return _U16.pack(public.name_alg) + digest


def public_key(public: TpmtPublic) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """Convert a TPMT_PUBLIC to a ``cryptography`` public key.

    Raises:
        FormatError: the modulus does not have the declared size, the curve is not
            one guardfab verifies with, or the point is not on the curve.
    """
    parms, unique = public.parameters, public.unique
    if isinstance(parms, RsaParms) and isinstance(unique, bytes):
        modulus = int.from_bytes(unique, "big")
        if modulus.bit_length() != parms.key_bits:
            raise FormatError(
                f"TPMT_PUBLIC.unique.rsa: the modulus is {modulus.bit_length()} bits, "
                f"keyBits says {parms.key_bits}"
            )
        try:
            return rsa.RSAPublicNumbers(parms.exponent or 65537, modulus).public_key()
        except ValueError as exc:
            raise FormatError(f"TPMT_PUBLIC: not a valid RSA public key ({exc})") from exc
    if isinstance(parms, EccParms) and isinstance(unique, EccPoint):
        curve = _CURVES.get(parms.curve_id)
        if curve is None:
            raise FormatError(f"TPMT_PUBLIC: ECC curve 0x{parms.curve_id:04x} is not supported")
        size = (curve.key_size + 7) // 8
        if len(unique.x) > size or len(unique.y) > size:
            raise FormatError(f"TPMT_PUBLIC.unique.ecc: a coordinate is longer than {size}")
        encoded = b"\x04" + unique.x.rjust(size, b"\0") + unique.y.rjust(size, b"\0")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, encoded)
        except ValueError as exc:
            raise FormatError("TPMT_PUBLIC.unique.ecc: the point is not on the curve") from exc
    raise FormatError("TPMT_PUBLIC: parameters and unique are of different key types")


# -------------------------------------------------------------------- TPMS_ATTEST


def _pcr_selections(data: bytes, off: int, end: int) -> tuple[tuple[TpmsPcrSelection, ...], int]:
    """Read a TPML_PCR_SELECTION; a bank listed twice is rejected."""
    what = "TPML_PCR_SELECTION"
    if end - off < 4:
        raise _truncated(f"{what}.count", off, 4, end - off)
    count = _U32.unpack_from(data, off)[0]
    if count > MAX_PCR_BANKS:
        raise FormatError(f"{what}.count at offset {off}: {count} banks (maximum {MAX_PCR_BANKS})")
    off += 4
    selections: list[TpmsPcrSelection] = []
    banks: list[int] = []
    for _ in range(count):
        if end - off < 3:
            raise _truncated("TPMS_PCR_SELECTION", off, 3, end - off)
        hash_alg, size = _PCR_SEL_HEAD.unpack_from(data, off)
        _hash_alg(hash_alg, "TPMS_PCR_SELECTION.hash", off)
        if hash_alg in banks:
            raise FormatError(f"TPMS_PCR_SELECTION at offset {off}: bank listed twice")
        banks.append(hash_alg)
        if size > MAX_PCR_SELECT_BYTES:
            raise FormatError(
                f"TPMS_PCR_SELECTION.sizeofSelect at offset {off + 2}: {size} "
                f"(maximum {MAX_PCR_SELECT_BYTES})"
            )
        if end - off - 3 < size:
            raise _truncated("TPMS_PCR_SELECTION.pcrSelect", off + 3, size, end - off - 3)
        selections.append(TpmsPcrSelection(hash_alg, data[off + 3 : off + 3 + size]))
        off += 3 + size
    return tuple(selections), off


def attest_header(data: bytes) -> tuple[int, int]:
    """Return (magic, type) of TPMS_ATTEST bytes, so a verifier can name a wrong type.

    Raises:
        FormatError: fewer than six bytes.
    """
    if len(data) < _ATTEST_HEAD.size:
        raise _truncated("TPMS_ATTEST", 0, _ATTEST_HEAD.size, len(data))
    magic, attest_type = _ATTEST_HEAD.unpack_from(data, 0)
    return magic, attest_type


def unmarshal_attest(data: bytes) -> TpmsAttest:
    """Parse a TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE that must fill ``data`` exactly.

    Parse only bytes whose signature was verified first: the fields mean nothing
    until then (see :func:`guardfab.tpm.quote.verify_quote`).

    Raises:
        FormatError: wrong magic or type, truncation, oversize fields or trailing bytes.
    """
    magic, attest_type = attest_header(data)
    if magic != TPM_GENERATED_VALUE:
        raise FormatError(f"TPMS_ATTEST.magic at offset 0: 0x{magic:08x} is not 0xff544347")
    if attest_type != TpmSt.ATTEST_QUOTE:
        raise FormatError(
            f"TPMS_ATTEST.type at offset 4: {st_name(attest_type)} is not attest_quote"
        )
    end = len(data)
    signer, off = _tpm2b(data, 6, end, "TPMS_ATTEST.qualifiedSigner", MAX_NAME_BYTES)
    extra, off = _tpm2b(data, off, end, "TPMS_ATTEST.extraData", MAX_DIGEST_BYTES)
    if end - off < _CLOCK_FW.size:
        raise _truncated("TPMS_ATTEST.clockInfo", off, _CLOCK_FW.size, end - off)
    clock, reset_count, restart_count, safe, firmware = _CLOCK_FW.unpack_from(data, off)
    if safe > 1:
        raise FormatError(f"TPMS_CLOCK_INFO.safe at offset {off + 16}: {safe} is not 0 or 1")
    selections, off = _pcr_selections(data, off + _CLOCK_FW.size, end)
    digest, off = _tpm2b(data, off, end, "TPMS_QUOTE_INFO.pcrDigest", MAX_DIGEST_BYTES)
    _expect_end(off, end, "TPMS_ATTEST")
    clock_info = TpmsClockInfo(clock, reset_count, restart_count, bool(safe))
    return TpmsAttest(signer, extra, clock_info, firmware, TpmsQuoteInfo(selections, digest))


def marshal_attest(attest: TpmsAttest) -> bytes:
    """Serialize a quote TPMS_ATTEST: the exact inverse of :func:`unmarshal_attest`."""
    clock = attest.clock_info
    out = [
        _ATTEST_HEAD.pack(TPM_GENERATED_VALUE, attest.attest_type),
        _m2b(attest.qualified_signer),
        _m2b(attest.extra_data),
        _CLOCK_FW.pack(
            clock.clock,
            clock.reset_count,
            clock.restart_count,
            int(clock.safe),
            attest.firmware_version,
        ),
        _U32.pack(len(attest.quote.pcr_select)),
    ]
    for sel in attest.quote.pcr_select:
        out.append(_PCR_SEL_HEAD.pack(sel.hash_alg, len(sel.select)) + sel.select)
    out.append(_m2b(attest.quote.pcr_digest))
    return b"".join(out)


# ------------------------------------------------------------------ TPMT_SIGNATURE


def unmarshal_signature(data: bytes) -> TpmtSignature:
    """Parse a TPMT_SIGNATURE (RSASSA, RSAPSS or ECDSA) that must fill ``data`` exactly.

    Raises:
        FormatError: another signature scheme, an unknown hash, truncation or
            trailing bytes.
    """
    end = len(data)
    if end < 4:
        raise _truncated("TPMT_SIGNATURE", 0, 4, end)
    sig_alg, hash_alg = _HH.unpack_from(data, 0)
    if sig_alg in (TpmAlg.RSASSA, TpmAlg.RSAPSS):
        _hash_alg(hash_alg, "TPMT_SIGNATURE.hash", 2)
        sig, off = _tpm2b(data, 4, end, "TPMT_SIGNATURE.sig", MAX_RSA_KEY_BYTES)
        _expect_end(off, end, "TPMT_SIGNATURE")
        return TpmtSignature(sig_alg, hash_alg, sig=sig)
    if sig_alg == TpmAlg.ECDSA:
        _hash_alg(hash_alg, "TPMT_SIGNATURE.hash", 2)
        r, off = _tpm2b(data, 4, end, "TPMT_SIGNATURE.signatureR", MAX_ECC_KEY_BYTES)
        s, off = _tpm2b(data, off, end, "TPMT_SIGNATURE.signatureS", MAX_ECC_KEY_BYTES)
        _expect_end(off, end, "TPMT_SIGNATURE")
        return TpmtSignature(sig_alg, hash_alg, r=r, s=s)
    raise FormatError(
        f"TPMT_SIGNATURE.sigAlg at offset 0: {alg_name(sig_alg)} is not RSASSA, RSAPSS or ECDSA"
    )


def marshal_signature(signature: TpmtSignature) -> bytes:
    """Serialize a TPMT_SIGNATURE: the exact inverse of :func:`unmarshal_signature`."""
    head = _HH.pack(signature.sig_alg, signature.hash_alg)
    if signature.sig_alg == TpmAlg.ECDSA:
        return head + _m2b(signature.r) + _m2b(signature.s)
    return head + _m2b(signature.sig)
