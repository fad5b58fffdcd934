"""TPM2_MakeCredential in software: bind an attestation key to an endorsement key.

On first contact the HGS does not yet know that the AK a host presents lives in the
same TPM as the EK it showed (whose certificate chains to the TPM maker). It sends
a random credential encrypted so that only that TPM can recover it, and only if the
AK with the given Name is loaded next to the EK: TPM2_ActivateCredential checks
both. The host proves the binding by returning the credential.

The construction is TPM 2.0 Library Part 1, "Credential Protection" (section 24)
with the "Protected Storage" outer wrap, and Part 3 TPM2_MakeCredential:

* a random ``seed`` (the size of the EK's nameAlg digest) is shared with the EK:
  RSA-OAEP with the nameAlg hash and label "IDENTITY\\0" for an RSA EK; one-pass
  ECDH with an ephemeral key plus KDFe(label "IDENTITY") for an ECC EK;
* symKey = KDFa(nameAlg, seed, "STORAGE", AK Name, "", EK symmetric key bits);
* encIdentity = AES-CFB(symKey, IV = 0) of the marshalled TPM2B_DIGEST(credential);
* HMACkey = KDFa(nameAlg, seed, "INTEGRITY", "", "", nameAlg digest bits);
* outerHMAC = HMAC_nameAlg(HMACkey, encIdentity || AK Name);
* credentialBlob = TPM2B_ID_OBJECT(TPM2B_DIGEST(outerHMAC) || encIdentity).

Primitives all come from ``cryptography``. KDFa is SP 800-108 counter mode with
HMAC, a 32-bit counter before the fixed data and fixed data = label || 0x00 ||
contextU || contextV || [bits]32, which is exactly ``KBKDFHMAC`` with ``rlen=4``,
``llen=4``, ``BeforeFixed``; KDFe is the SP 800-56A concatenation KDF, exactly
``ConcatKDFHash``. The tests check both against independent implementations and
KDFa against the TPM reference implementation's self-test vector.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from typing import NamedTuple

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from guardfab.errors import FormatError
from guardfab.tpm.constants import HASH_ALGS, TpmAlg, TpmaObject, alg_name
from guardfab.tpm.structures import EccPoint, TpmtPublic, as_public, public_key

#: Labels of Part 1 section 24 (the TPM appends the terminating zero octet).
IDENTITY_LABEL = b"IDENTITY"
STORAGE_LABEL = b"STORAGE"
INTEGRITY_LABEL = b"INTEGRITY"

_U16 = struct.Struct(">H")
_EK_ATTRIBUTES = TpmaObject.RESTRICTED | TpmaObject.DECRYPT


class MadeCredential(NamedTuple):
    """What TPM2_MakeCredential returns, marshalled for TPM2_ActivateCredential."""

    #: TPM2B_ID_OBJECT: the HMAC-protected, encrypted credential.
    credential_blob: bytes
    #: TPM2B_ENCRYPTED_SECRET: the seed, encrypted to the EK.
    encrypted_secret: bytes


def _hash(alg: int) -> tuple[int, Callable[[], hashes.HashAlgorithm]]:
    info = HASH_ALGS.get(alg)
    if info is None:
        raise FormatError(f"{alg_name(alg)} is not a supported hash")
    return info.digest_size, info.algorithm


def kdfa(
    hash_alg: int,
    key: bytes,
    label: bytes,
    *,
    context_u: bytes = b"",
    context_v: bytes = b"",
    bits: int,
) -> bytes:
    """KDFa of TPM 2.0 Part 1 section 11.4.10.2 (SP 800-108 counter mode, HMAC).

    ``label`` may be given with or without its terminating zero octet, as in the TPM.

    Raises:
        ValueError: ``bits`` is not a positive multiple of 8 (the TPM's odd sizes
            are never needed here).
    """
    if bits <= 0 or bits % 8:
        raise ValueError("KDFa: bits must be a positive multiple of 8")
    _, algorithm = _hash(hash_alg)
    kdf = KBKDFHMAC(
        algorithm=algorithm(),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label.removesuffix(b"\0"),
        context=context_u + context_v,
        fixed=None,
    )
    return kdf.derive(key)


def kdfe(
    hash_alg: int, z: bytes, label: bytes, *, party_u: bytes, party_v: bytes, bits: int
) -> bytes:
    """KDFe of TPM 2.0 Part 1 section 11.4.10.3 (SP 800-56A concatenation KDF).

    Raises:
        ValueError: ``bits`` is not a positive multiple of 8.
    """
    if bits <= 0 or bits % 8:
        raise ValueError("KDFe: bits must be a positive multiple of 8")
    _, algorithm = _hash(hash_alg)
    other_info = label.removesuffix(b"\0") + b"\0" + party_u + party_v
    return ConcatKDFHash(algorithm=algorithm(), length=bits // 8, otherinfo=other_info).derive(z)


def _check_ek(ek: TpmtPublic) -> int:
    """Check the EK can protect a credential; return its AES key size in bits."""
    if ek.object_attributes & _EK_ATTRIBUTES != _EK_ATTRIBUTES:
        raise FormatError("EK public area: not a restricted decryption (storage) key")
    symmetric = ek.parameters.symmetric
    if symmetric.algorithm != TpmAlg.AES or symmetric.mode != TpmAlg.CFB:
        raise FormatError(
            f"EK public area: symmetric {alg_name(symmetric.algorithm)}-{alg_name(symmetric.mode)}"
            " is not AES-CFB"
        )
    if ek.parameters.scheme.scheme not in (TpmAlg.NULL, TpmAlg.OAEP):
        raise FormatError(
            f"EK public area: scheme {alg_name(ek.parameters.scheme.scheme)} cannot decrypt a seed"
        )
    return symmetric.key_bits


def _check_name(name: bytes) -> None:
    """An AK Name is nameAlg || digest; a handle or empty name binds nothing."""
    if len(name) < 2:
        raise FormatError("AK Name: shorter than a hash algorithm identifier")
    alg = _U16.unpack_from(name, 0)[0]
    info = HASH_ALGS.get(alg)
    if info is None or len(name) != 2 + info.digest_size:
        raise FormatError(f"AK Name: not a {alg_name(alg)} digest name")


def _rsa_seed(ek: TpmtPublic, key: rsa.RSAPublicKey) -> tuple[bytes, bytes]:
    """Return (seed, encrypted seed): RSA-OAEP with nameAlg and label IDENTITY\\0."""
    size, algorithm = _hash(ek.name_alg)
    seed = secrets.token_bytes(size)
    oaep = padding.OAEP(
        mgf=padding.MGF1(algorithm()), algorithm=algorithm(), label=IDENTITY_LABEL + b"\0"
    )
    return seed, key.encrypt(seed, oaep)


def _ecc_seed(ek: TpmtPublic, key: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    """Return (seed, marshalled ephemeral TPMS_ECC_POINT): one-pass ECDH + KDFe."""
    size, _ = _hash(ek.name_alg)
    coordinate = (key.curve.key_size + 7) // 8
    ephemeral = ec.generate_private_key(key.curve)
    z = ephemeral.exchange(ec.ECDH(), key)  # x of the shared point, curve-sized
    numbers = ephemeral.public_key().public_numbers()
    eph_x = numbers.x.to_bytes(coordinate, "big")
    eph_y = numbers.y.to_bytes(coordinate, "big")
    if not isinstance(ek.unique, EccPoint):
        raise FormatError("EK public area: an ECC key without an ECC point")
    ek_x = ek.unique.x.rjust(coordinate, b"\0")
    seed = kdfe(ek.name_alg, z, IDENTITY_LABEL, party_u=eph_x, party_v=ek_x, bits=size * 8)
    point = _U16.pack(coordinate) + eph_x + _U16.pack(coordinate) + eph_y
    return seed, point


def make_credential(
    ek_public: TpmtPublic | bytes, credential: bytes, ak_name: bytes
) -> MadeCredential:
    """Encrypt ``credential`` to the EK so only a TPM holding the named AK recovers it.

    Args:
        ek_public: the host's EK, parsed or as TPM2B_PUBLIC bytes (RSA or ECC,
            AES-CFB symmetric, as the TCG EK templates define).
        credential: the secret to return on success, at most the EK's nameAlg
            digest size (TPM2_MakeCredential refuses more).
        ak_name: the AK's Name (:func:`guardfab.tpm.structures.object_name`).

    Raises:
        FormatError: the EK cannot protect a credential, or the Name is malformed.
        ValueError: ``credential`` is empty or longer than the digest size.
    """
    ek = as_public(ek_public)
    sym_bits = _check_ek(ek)
    _check_name(ak_name)
    digest_size, algorithm = _hash(ek.name_alg)
    if not 0 < len(credential) <= digest_size:
        raise ValueError(f"credential must be 1 to {digest_size} bytes for this EK")
    key = public_key(ek)
    if isinstance(key, rsa.RSAPublicKey):
        seed, secret = _rsa_seed(ek, key)
    else:
        seed, secret = _ecc_seed(ek, key)
    sym_key = kdfa(ek.name_alg, seed, STORAGE_LABEL, context_u=ak_name, bits=sym_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_U16.pack(len(credential)) + credential)
    enc_identity += encryptor.finalize()
    hmac_key = kdfa(ek.name_alg, seed, INTEGRITY_LABEL, bits=digest_size * 8)
    mac = hmac.HMAC(hmac_key, algorithm())
    mac.update(enc_identity + ak_name)
    outer = mac.finalize()
    id_object = _U16.pack(len(outer)) + outer + enc_identity
    return MadeCredential(
        credential_blob=_U16.pack(len(id_object)) + id_object,
        encrypted_secret=_U16.pack(len(secret)) + secret,
    )
