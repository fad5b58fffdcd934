"""TPM 2.0 quote verification: the HGS's check that a host's PCRs are what it claims.

A quote is a TPMS_ATTEST the host's TPM built and signed with an attestation key
(AK). The order of the checks matters and follows "verify, then parse":

1. the AK must be fit for attestation (:func:`check_attestation_key`): a restricted,
   non-decrypting signing key that never left the TPM. Only such a key refuses to
   sign data starting with TPM_GENERATED_VALUE that the TPM did not produce itself,
   so without this check a host could sign a made-up quote;
2. the signature over the exact bytes received, with the AK's own scheme and hash;
3. only then are the bytes parsed, and the type, the nonce (qualifying data) and
   the PCR selection and digest are compared with what the verifier expects.

Each failure is its own :class:`~guardfab.errors.VerificationError` subclass that
says what did not match, so the HGS can report it and a test can tell them apart.
Nothing here does I/O; the caller supplies the AK, the nonce it issued and the
PCR values it expects (for example replayed from the host's event log).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from guardfab.errors import FormatError, VerificationError
from guardfab.tpm.constants import (
    HASH_ALGS,
    MAX_ATTEST_BYTES,
    TPM_GENERATED_VALUE,
    TpmAlg,
    TpmaObject,
    TpmSt,
    alg_name,
    st_name,
)
from guardfab.tpm.structures import (
    TpmsAttest,
    TpmsPcrSelection,
    TpmtPublic,
    TpmtSignature,
    as_public,
    attest_header,
    public_key,
    unmarshal_attest,
    unmarshal_signature,
)

#: PCR values by bank (TPM_ALG_ID) then PCR index, e.g. ``{TpmAlg.SHA256: {0: b"..."}}``.
PcrValues = Mapping[int, Mapping[int, bytes]]

#: Attributes an AK must have, with their names in the TPM specification.
_REQUIRED_ATTRIBUTES = (
    (TpmaObject.FIXED_TPM, "fixedTPM"),
    (TpmaObject.FIXED_PARENT, "fixedParent"),
    (TpmaObject.SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    (TpmaObject.RESTRICTED, "restricted"),
    (TpmaObject.SIGN_ENCRYPT, "sign"),
)
#: Signing schemes guardfab verifies, per key type.
_SIGNING_SCHEMES: dict[int, tuple[int, ...]] = {
    TpmAlg.RSA: (TpmAlg.RSASSA, TpmAlg.RSAPSS),
    TpmAlg.ECC: (TpmAlg.ECDSA,),
}
#: Hashes a quote may be signed (and its PCR digest computed) with. SHA-1 is refused:
#: a collision would let one signature stand for two quotes.
QUOTE_HASHES = frozenset({TpmAlg.SHA256, TpmAlg.SHA384, TpmAlg.SHA512})


class AttestationKeyError(VerificationError):
    """The AK's attributes or scheme do not make it a trustworthy attestation key."""

    hint = "create the AK as a restricted signing key in the TPM (e.g. tpm2_createak)"


class QuoteSchemeError(VerificationError):
    """The quote's signature uses another scheme or hash than the AK is bound to."""

    hint = "quote with the AK's own scheme (tpm2_quote -g must match the AK's hash)"


class QuoteSignatureError(VerificationError):
    """The signature does not verify over the quote bytes with this AK."""

    hint = "the quote was altered, or it was signed by a key other than the registered AK"


class QuoteTypeError(VerificationError):
    """The signed bytes are not a TPM-generated quote."""

    hint = "send the TPMS_ATTEST that TPM2_Quote returned, not another attestation"


class NonceMismatchError(VerificationError):
    """The quote's qualifying data is not the nonce the verifier issued."""

    hint = "the quote is stale or replayed: request a new challenge and quote again"


class PcrSelectionError(VerificationError):
    """The quote's PCR selection does not match the PCRs the verifier requires."""

    hint = "quote exactly the PCR banks and indices the verifier's policy names"


class PcrDigestMismatchError(VerificationError):
    """The quoted PCR digest does not match the expected PCR values."""

    hint = "the host's PCRs differ from the expected values (event log or baseline)"


class VerifiedQuote(NamedTuple):
    """A quote whose signature, nonce and PCR digest all verified.

    ``pcrs`` holds exactly the values the PCR digest covered, by bank and index.
    A named tuple (one per attestation), like the structures it holds.
    """

    attest: TpmsAttest
    signature: TpmtSignature
    hash_alg: int
    pcrs: dict[int, dict[int, bytes]]


def check_attestation_key(public: TpmtPublic) -> None:
    """Check that a public area describes a key the TPM will only sign quotes with.

    restricted + sign: the TPM refuses to sign external data that looks like a
    TPMS_ATTEST, so every valid signature covers TPM-made content. fixedTPM,
    fixedParent, sensitiveDataOrigin: the private key was made in this TPM and
    cannot leave it. Not decrypt: a restricted decryption key has other rules.
    Every problem is listed, not just the first.

    Raises:
        AttestationKeyError: naming each missing or forbidden attribute and an
            unsupported signing scheme or hash.
    """
    attributes = public.object_attributes
    problems = [
        f"{name} is not set" for flag, name in _REQUIRED_ATTRIBUTES if not attributes & flag
    ]
    if attributes & TpmaObject.DECRYPT:
        problems.append("decrypt is set")
    scheme = public.parameters.scheme
    if scheme.scheme not in _SIGNING_SCHEMES.get(public.key_type, ()):
        problems.append(f"signing scheme {alg_name(scheme.scheme)} is not supported")
    elif scheme.hash_alg not in QUOTE_HASHES:
        problems.append(f"scheme hash {alg_name(scheme.hash_alg)} is not accepted")
    if problems:
        raise AttestationKeyError("the AK is not an attestation key: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class AttestationKey:
    """An AK checked by :func:`check_attestation_key`, with its verifying key made once.

    A host quotes with the same AK at every attestation: a verifier that keeps
    this object (cached by the AK's exact bytes) skips re-checking the
    attributes and rebuilding the ``cryptography`` key, never the signature.
    Build it with :meth:`of`, which runs the check; the quote's signature
    scheme must still equal the AK's on every quote.
    """

    public: TpmtPublic
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = field(repr=False, compare=False)
    algorithm: hashes.HashAlgorithm = field(repr=False, compare=False)
    padding: padding.AsymmetricPadding | None = field(repr=False, compare=False)
    #: The ECDSA signature algorithm object (ECC AKs), made once like the padding.
    ecdsa: ec.ECDSA | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A quote's verifier tells the key type by the padding (see _verify_signature).
        if (self.padding is not None) != isinstance(self.key, rsa.RSAPublicKey):
            raise AttestationKeyError("the AK has a padding exactly when its key is RSA")

    @classmethod
    def of(cls, public: TpmtPublic | bytes) -> AttestationKey:
        """Check the AK (raises AttestationKeyError, FormatError) and prepare its key."""
        ak = as_public(public)
        check_attestation_key(ak)
        scheme = ak.parameters.scheme
        algorithm = HASH_ALGS[scheme.hash_alg].algorithm()
        pad: padding.AsymmetricPadding | None = None
        ecdsa = None
        if scheme.scheme == TpmAlg.RSASSA:
            pad = padding.PKCS1v15()
        elif scheme.scheme == TpmAlg.RSAPSS:
            # TPMs salt with the digest size, older ones with the maximum: AUTO reads it.
            pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
        else:
            ecdsa = ec.ECDSA(algorithm)
        return cls(ak, public_key(ak), algorithm, pad, ecdsa)


def _verify_signature(message: bytes, signature: TpmtSignature, ak: AttestationKey) -> None:
    """Verify ``signature`` over ``message`` with the AK, in the AK's own scheme."""
    scheme = ak.public.parameters.scheme
    if signature.sig_alg != scheme.scheme or signature.hash_alg != scheme.hash_alg:
        raise QuoteSchemeError(
            f"the quote is signed with {alg_name(signature.sig_alg)}/"
            f"{alg_name(signature.hash_alg)} but the AK's scheme is "
            f"{alg_name(scheme.scheme)}/{alg_name(scheme.hash_alg)}"
        )
    # An AttestationKey has a padding exactly when its key is RSA (checked when it is
    # made): testing that is cheaper than isinstance against cryptography's key ABCs
    # (an ABC check, ~0.2 us, at every quote).
    pad = ak.padding
    try:
        if pad is not None:
            cast("rsa.RSAPublicKey", ak.key).verify(signature.sig, message, pad, ak.algorithm)
        else:
            der = encode_dss_signature(
                int.from_bytes(signature.r, "big"), int.from_bytes(signature.s, "big")
            )
            key = cast("ec.EllipticCurvePublicKey", ak.key)
            key.verify(der, message, ak.ecdsa or ec.ECDSA(ak.algorithm))
    except InvalidSignature as exc:
        raise QuoteSignatureError("the quote signature does not verify with the AK") from exc


def _parse_quote(message: bytes) -> TpmsAttest:
    """Parse signed TPMS_ATTEST bytes, telling a wrong kind of attestation apart.

    The parser checks the magic and the type itself; the header is read again
    only when it refuses the bytes, to say whether they are another attestation.
    """
    try:
        return unmarshal_attest(message)
    except FormatError as exc:
        if len(message) < 6:  # too short for a header: the parser said so
            raise
        magic, attest_type = attest_header(message)
        if magic != TPM_GENERATED_VALUE:
            raise QuoteTypeError(
                f"the signed data is not TPM-generated (magic 0x{magic:08x}, expected 0xff544347)"
            ) from exc
        if attest_type != TpmSt.ATTEST_QUOTE:
            raise QuoteTypeError(
                f"the signed data is a {st_name(attest_type)}, not a quote"
            ) from exc
        raise


#: A quote's selection as (bank, ascending PCR indices) pairs, in selection order.
_Banks = list[tuple[int, tuple[int, ...]]]


def _banks(selection: Sequence[TpmsPcrSelection]) -> _Banks:
    return [(sel.hash_alg, sel.indices()) for sel in selection]


def _selected_values(
    banks: _Banks, pcr_values: PcrValues
) -> tuple[dict[int, dict[int, bytes]], list[bytes]]:
    """The expected value of every selected PCR, by bank, checked for presence and size,
    and all of them in the order the TPM hashes them.

    That order is selection by selection, ascending index within each: the
    values of each selection are gathered from its indices, in one
    comprehension, and their sizes checked together (a quote is checked at
    every attestation); only a failure goes through them one by one to say
    which PCR is wrong.
    """
    out: dict[int, dict[int, bytes]] = {}
    ordered: list[bytes] = []
    for hash_alg, indices in banks:
        bank = HASH_ALGS.get(hash_alg)
        if bank is None:
            raise FormatError(f"PCR selection: {alg_name(hash_alg)} is not a supported bank")
        values = pcr_values.get(hash_alg, {})
        try:
            chosen = {index: values[index] for index in indices}
        except KeyError:
            chosen = {}
        sizes = set(map(len, chosen.values()))
        if len(chosen) != len(indices) or sizes - {bank.digest_size}:
            _explain_values(hash_alg, indices, values, bank.digest_size)
        ordered += chosen.values()
        if hash_alg in out:  # a bank listed twice (a caller's selection, never a quote's)
            out[hash_alg].update(chosen)
        else:
            out[hash_alg] = chosen
    return out, ordered


def _explain_values(
    hash_alg: int, indices: tuple[int, ...], values: Mapping[int, bytes], size: int
) -> None:
    """Raise the error for the first selected PCR without a value, or of the wrong size."""
    for index in indices:
        value = values.get(index)
        if value is None:
            raise PcrSelectionError(
                f"the quote selects PCR {alg_name(hash_alg)}:{index} "
                "but no expected value was given for it"
            )
        if len(value) != size:
            raise FormatError(
                f"PCR {alg_name(hash_alg)}:{index}: {len(value)} bytes, expected {size}"
            )


def _digest(ordered: list[bytes], hash_alg: int) -> bytes:
    """H(the selected values in the TPM's order, as :func:`_selected_values` lists them)."""
    digest_info = HASH_ALGS.get(hash_alg)
    if digest_info is None:
        raise FormatError(f"PCR digest: {alg_name(hash_alg)} is not a supported hash")
    return digest_info.new(b"".join(ordered)).digest()


def pcr_digest(
    selection: Sequence[TpmsPcrSelection], pcr_values: PcrValues, hash_alg: int
) -> bytes:
    """Compute a quote's pcrDigest: H(values of the selected PCRs, in selection order).

    The TPM concatenates the PCRs bank by bank as the selection lists them, and
    within a bank in ascending index order, then hashes with the quote's hash.

    Raises:
        PcrSelectionError: a selected PCR has no value in ``pcr_values``.
        FormatError: an unknown hash, or a value of the wrong size for its bank.
    """
    if hash_alg not in HASH_ALGS:
        raise FormatError(f"PCR digest: {alg_name(hash_alg)} is not a supported hash")
    return _digest(_selected_values(_banks(selection), pcr_values)[1], hash_alg)


def _check_coverage(required: PcrValues, selected: dict[int, dict[int, bytes]]) -> None:
    """Every PCR the verifier has a value for must be in the quote's selection.

    ``selected`` is :func:`_selected_values`' answer: it holds every selected
    PCR (or that raised) and only PCRs that have a required value, so a bank's
    required PCRs are all selected exactly when there are as many of them as
    selected values; the missing ones are worked out only to name them.
    """
    if not any(selected.values()):
        raise PcrSelectionError("the quote covers no PCRs at all")
    if all(len(values) == len(selected.get(bank, ())) for bank, values in required.items()):
        return
    missing = [
        f"{alg_name(bank)}:{index}"
        for bank, values in required.items()
        for index in sorted(values)
        if index not in selected.get(bank, ())
    ]
    raise PcrSelectionError(f"the quote does not cover required PCR(s) {', '.join(missing)}")


def verify_quote(
    attest_bytes: bytes,
    signature_bytes: bytes,
    ak_public: AttestationKey | TpmtPublic | bytes,
    *,
    expected_nonce: bytes,
    pcr_values: PcrValues,
) -> VerifiedQuote:
    """Verify a TPM2_Quote and return its parsed content.

    Args:
        attest_bytes: the TPMS_ATTEST exactly as the TPM returned it.
        signature_bytes: the TPMT_SIGNATURE over ``attest_bytes``.
        ak_public: the registered AK, as TPM2B_PUBLIC bytes, parsed, or already
            checked and prepared (:class:`AttestationKey`, which a verifier caches).
        expected_nonce: the qualifying data the verifier asked the host to quote.
        pcr_values: the PCR values the verifier expects, by bank then index. The
            quote must select every one of them and nothing else.

    Raises:
        FormatError: malformed AK, signature or quote bytes.
        AttestationKeyError, QuoteSchemeError, QuoteSignatureError, QuoteTypeError,
        NonceMismatchError, PcrSelectionError, PcrDigestMismatchError: the quote
            does not prove what the verifier requires; the error says which part.
    """
    ak = ak_public if isinstance(ak_public, AttestationKey) else AttestationKey.of(ak_public)
    if len(attest_bytes) > MAX_ATTEST_BYTES:
        raise FormatError(f"TPMS_ATTEST: {len(attest_bytes)} bytes is larger than any quote")
    signature = unmarshal_signature(signature_bytes)
    _verify_signature(attest_bytes, signature, ak)
    attest = _parse_quote(attest_bytes)
    if not hmac.compare_digest(attest.extra_data, expected_nonce):
        raise NonceMismatchError("the quote's qualifying data is not the expected nonce")
    banks = _banks(attest.quote.pcr_select)
    pcrs, ordered = _selected_values(banks, pcr_values)
    _check_coverage(pcr_values, pcrs)
    if not hmac.compare_digest(_digest(ordered, signature.hash_alg), attest.quote.pcr_digest):
        raise PcrDigestMismatchError(
            "the quoted PCR digest does not match the digest of the expected PCR values"
        )
    return VerifiedQuote(attest, signature, signature.hash_alg, pcrs)
