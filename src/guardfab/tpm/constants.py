"""TPM 2.0 Library constants used by the structure parsers, quotes and credentials.

Values are those of TPM 2.0 Library Part 2 ("Structures"): TPM_ALG_ID (section 6.3),
TPM_ECC_CURVE (6.4), TPM_ST (6.9), TPM_GENERATED (6.2) and TPMA_OBJECT (8.3).
Only what guardfab reads or writes is listed: an identifier not here is rejected
by the parsers rather than carried along unread.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import hashes

#: TPM_GENERATED_VALUE: every TPMS_ATTEST the TPM signs starts with it, and a
#: restricted signing key refuses to sign external data that does, so a quote
#: carrying it was built inside the TPM.
TPM_GENERATED_VALUE = 0xFF544347


class TpmAlg(enum.IntEnum):
    """TPM_ALG_ID values: key types, hashes, schemes, symmetric ciphers and modes."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    MGF1 = 0x0007
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    SHA3_256 = 0x0027
    SHA3_384 = 0x0028
    SHA3_512 = 0x0029
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


class TpmSt(enum.IntEnum):
    """TPM_ST values that tag a TPMS_ATTEST (what the TPM says it attests)."""

    ATTEST_NV = 0x8014
    ATTEST_COMMAND_AUDIT = 0x8015
    ATTEST_SESSION_AUDIT = 0x8016
    ATTEST_CERTIFY = 0x8017
    ATTEST_QUOTE = 0x8018
    ATTEST_TIME = 0x8019
    ATTEST_CREATION = 0x801A
    ATTEST_NV_DIGEST = 0x801C


class TpmEccCurve(enum.IntEnum):
    """TPM_ECC_CURVE identifiers a TPM may report in a public area."""

    NIST_P192 = 0x0001
    NIST_P224 = 0x0002
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005
    BN_P256 = 0x0010
    BN_P638 = 0x0011
    SM2_P256 = 0x0020


class TpmaObject(enum.IntFlag):
    """TPMA_OBJECT bits: what a key may be used for and how it was made."""

    FIXED_TPM = 1 << 1
    ST_CLEAR = 1 << 2
    FIXED_PARENT = 1 << 4
    SENSITIVE_DATA_ORIGIN = 1 << 5
    USER_WITH_AUTH = 1 << 6
    ADMIN_WITH_POLICY = 1 << 7
    NO_DA = 1 << 10
    ENCRYPTED_DUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN_ENCRYPT = 1 << 18
    X509_SIGN = 1 << 19


#: TPMA_OBJECT bits the specification reserves; a TPM never sets them, so a public
#: area that does was not made by a TPM.
TPMA_OBJECT_RESERVED = 0xFFF0F309


# Sizes and value sets of Part 2 that bound what the parsers accept.

#: sizeof(TPMU_HA): the largest digest any TPM2B_DIGEST / TPM2B_DATA may hold.
MAX_DIGEST_BYTES = 64
#: sizeof(TPMU_NAME): a TPMT_HA (2 + 64 bytes); a handle name is 4 bytes.
MAX_NAME_BYTES = 2 + MAX_DIGEST_BYTES
#: MAX_RSA_KEY_BYTES for 4096-bit keys: bounds a modulus and an RSA signature.
MAX_RSA_KEY_BYTES = 512
#: MAX_ECC_KEY_BYTES for the largest curve the library defines (BN P638).
MAX_ECC_KEY_BYTES = 80
#: HASH_COUNT of the reference TSS (TPM2_NUM_PCR_BANKS): banks in one selection.
MAX_PCR_BANKS = 16
#: TPM2_PCR_SELECT_MAX: bytes of PCR bitmap per bank (32 PCRs).
MAX_PCR_SELECT_BYTES = 4
#: A quote is a few hundred bytes; refuse to hash more than this before parsing.
MAX_ATTEST_BYTES = 4096

RSA_KEY_BITS = frozenset({1024, 2048, 3072, 4096})
SYM_KEY_BITS = frozenset({128, 192, 256})
SYM_ALGS = frozenset({TpmAlg.AES, TpmAlg.SM4, TpmAlg.CAMELLIA})
SYM_MODES = frozenset({TpmAlg.CFB, TpmAlg.CTR, TpmAlg.OFB, TpmAlg.CBC, TpmAlg.ECB, TpmAlg.NULL})

# Schemes, each mapped to how many UINT16 detail fields follow its identifier:
# 0 = none (RSAES), 1 = hashAlg, 2 = hashAlg + count (ECDAA).
RSA_SCHEMES: dict[int, int] = {TpmAlg.RSASSA: 1, TpmAlg.RSAPSS: 1, TpmAlg.OAEP: 1, TpmAlg.RSAES: 0}
ECC_SCHEMES: dict[int, int] = {
    TpmAlg.ECDSA: 1,
    TpmAlg.ECDH: 1,
    TpmAlg.ECDAA: 2,
    TpmAlg.SM2: 1,
    TpmAlg.ECSCHNORR: 1,
    TpmAlg.ECMQV: 1,
}
KDF_SCHEMES: dict[int, int] = {
    TpmAlg.MGF1: 1,
    TpmAlg.KDF1_SP800_56A: 1,
    TpmAlg.KDF2: 1,
    TpmAlg.KDF1_SP800_108: 1,
}


class Hasher(Protocol):
    """The part of a hashlib object guardfab uses."""

    def update(self, data: bytes, /) -> None:
        """Feed more bytes."""

    def digest(self) -> bytes:
        """Return the digest of everything fed so far."""


@dataclass(frozen=True, slots=True)
class HashInfo:
    """What guardfab needs to know about one TPM hash algorithm."""

    name: str
    digest_size: int
    #: hashlib constructor: fastest for the small inputs PCR digests hash.
    new: Callable[..., Hasher]
    #: The same hash for ``cryptography`` signature, OAEP and HMAC APIs.
    algorithm: Callable[[], hashes.HashAlgorithm]


#: Hash algorithms a PCR bank, a name or a signature may use here. SM3 is left
#: out on purpose: neither hashlib nor every OpenSSL build has it.
HASH_ALGS: dict[int, HashInfo] = {
    TpmAlg.SHA1: HashInfo("sha1", 20, hashlib.sha1, hashes.SHA1),
    TpmAlg.SHA256: HashInfo("sha256", 32, hashlib.sha256, hashes.SHA256),
    TpmAlg.SHA384: HashInfo("sha384", 48, hashlib.sha384, hashes.SHA384),
    TpmAlg.SHA512: HashInfo("sha512", 64, hashlib.sha512, hashes.SHA512),
    TpmAlg.SHA3_256: HashInfo("sha3_256", 32, hashlib.sha3_256, hashes.SHA3_256),
    TpmAlg.SHA3_384: HashInfo("sha3_384", 48, hashlib.sha3_384, hashes.SHA3_384),
    TpmAlg.SHA3_512: HashInfo("sha3_512", 64, hashlib.sha3_512, hashes.SHA3_512),
}

_NAMES: dict[int, str] = {alg.value: alg.name.lower() for alg in TpmAlg}


def alg_name(alg: int) -> str:
    """Return a readable name for a TPM_ALG_ID (``sha256``), or its hex for unknown ids."""
    name = _NAMES.get(alg)
    return name if name is not None else f"0x{alg:04x}"


def st_name(tag: int) -> str:
    """Return a readable name for a TPM_ST attestation tag, or its hex."""
    try:
        return TpmSt(tag).name.lower()
    except ValueError:
        return f"0x{tag:04x}"
