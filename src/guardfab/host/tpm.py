"""The guarded host's TPM: endorsement key, attestation key, credential activation and quotes.

Everything the host tells the HGS about its TPM comes through :class:`HostTpm`, which
speaks ESAPI (tpm2-pytss) over a TCTI: ``device:/dev/tpmrm0`` on a real host,
``swtpm:host=127.0.0.1,port=P`` in tests. No tpm2-tools binary is involved. The rest
of the agent depends only on the small :class:`TpmDevice` protocol, so tests of the
agent can swap in a simulator; every failure of the device surfaces as one
:class:`TpmDeviceError` (a :class:`~guardfab.errors.TransportError`).

Traps this module handles, all met on swtpm (see PLATFORM-NOTES):

* a raw TPM socket has no resource manager: three leaked transient objects (or
  sessions) and the TPM answers "out of memory for object contexts". Opening
  flushes every loaded transient object and session (a crashed earlier run leaks
  them), and every object or session created here is flushed in a ``finally``;
* ``TPM2_PCR_Read`` returns at most eight PCRs and silently drops the rest, so
  PCRs are read in chunks until every requested one has been returned;
* the PCR values returned with a quote must be the ones it signed: after quoting,
  the PCRs are read and their digest is compared with the quote's ``pcrDigest``;
  an extend in between makes the comparison fail and the quote is taken again.
* ``create_ek_template``'s NV reader probes indices that usually do not exist and
  libtss2 logs every probe as an error; probing only listed indices keeps the
  success path silent without touching ``TSS2_LOG`` (the operator's to set).

The AK is created under the endorsement hierarchy (a child of the EK, as
``tpm2_createak`` does), so quotes carry the real reset and restart counters, and it is
persisted so that the Name the HGS registered survives agent restarts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

# tpm2-pytss ships no type information (no py.typed): its values are Any, and are
# converted (bytes(...), int(...)) where they enter guardfab's typed data.
import tpm2_pytss as tss  # type: ignore[import-untyped]
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template  # type: ignore[import-untyped]

from guardfab.errors import GuardfabError, TransportError, VerificationError
from guardfab.tpm.constants import HASH_ALGS, TpmAlg, TpmaObject, alg_name
from guardfab.tpm.quote import AttestationKeyError, check_attestation_key, pcr_digest
from guardfab.tpm.structures import (
    TpmsPcrSelection,
    pcr_selection,
    unmarshal_attest,
    unmarshal_public2b,
    unmarshal_signature,
)

#: Where the agent keeps its AK unless configured otherwise (TCG guidance reserves
#: 0x81010001 for the RSA EK; 0x81010002 is the usual first AK handle).
DEFAULT_AK_HANDLE = 0x81010002
#: PC Client TPMs have 24 PCRs; a 3-byte selection bitmap covers them.
PCR_COUNT = 24
#: TPM2_PCR_Read returns at most this many PCRs per call.
PCR_READ_CHUNK = 8
#: Quote attempts before giving up on PCRs that keep changing under the quote.
QUOTE_ATTEMPTS = 3

#: EK profiles of the TCG EK Credential Profile that tpm2-pytss has templates for,
#: with the NV index of their certificate. swtpm 0.7 provisions EK-RSA2048 and
#: EK-HIGH-ECC384 (an ECC P-384 EK whose certificate is at 0x01c00016).
EK_CERT_INDEX: dict[str, int] = {
    "EK-RSA2048": 0x01C00002,
    "EK-ECC256": 0x01C0000A,
    "EK-HIGH-RSA2048": 0x01C00012,
    "EK-HIGH-ECC256": 0x01C00014,
    "EK-HIGH-ECC384": 0x01C00016,
}

_HT_TRANSIENT = 0x80000000
_HT_LOADED_SESSION = 0x02000000  # lists HMAC and policy sessions alike
_HT_PERSISTENT = 0x81000000
_HT_NV_INDEX = 0x01000000
_RC_FAILURE = 0x101
_AK_ATTRIBUTES = TpmaObject.FIXED_TPM | TpmaObject.FIXED_PARENT | TpmaObject.SENSITIVE_DATA_ORIGIN
_AK_ATTRIBUTES |= TpmaObject.USER_WITH_AUTH | TpmaObject.RESTRICTED | TpmaObject.SIGN_ENCRYPT
#: Banks libtss2's TPMU_HA can carry (no SHA-3); its members are named like HASH_ALGS.
_TPMU_HA_BANKS = frozenset({TpmAlg.SHA1, TpmAlg.SHA256, TpmAlg.SHA384, TpmAlg.SHA512})


class TpmDeviceError(TransportError):
    """The TPM did not answer, or refused a command for a reason of its own."""

    hint = (
        "check that the TPM is reachable (the TCTI string, /dev/tpmrm0 permissions, "
        "swtpm running) and run 'guardfab host diagnose'"
    )


class CredentialRejectedError(VerificationError):
    """The TPM refused a credential: it was not made for this EK and this AK's Name.

    Not a :class:`TpmDeviceError`: the TPM worked, the input was wrong, and
    retrying the same credential fails again.
    """

    hint = "the HGS must make the credential with this host's registered EK and AK Name"


class AkType(enum.Enum):
    """The attestation key algorithms guardfab creates (both verified by the HGS)."""

    RSA = "rsa2048:rsassa-sha256:null"
    ECC = "ecc256:ecdsa-sha256:null"


@dataclass(frozen=True, slots=True)
class EndorsementKey:
    """The EK as the HGS registers it: TPM2B_PUBLIC, Name and DER certificate (if any)."""

    profile: str
    public: bytes
    name: bytes
    certificate: bytes | None


@dataclass(frozen=True, slots=True)
class AttestationKey:
    """The persisted AK: TPM2B_PUBLIC, Name (what MakeCredential binds) and handle."""

    public: bytes
    name: bytes
    handle: int


class Quote(NamedTuple):
    """A quote and the PCR values it covers, by bank then index (what ``verify_quote`` takes)."""

    attest: bytes
    signature: bytes
    pcrs: dict[int, dict[int, bytes]]


class TpmDevice(Protocol):
    """What the guarded-host agent needs from a TPM; :class:`HostTpm` is the real one."""

    def pcr_banks(self) -> tuple[int, ...]:
        """Return the allocated PCR banks (TPM_ALG_IDs)."""

    def read_ek(self, profile: str | None = None) -> EndorsementKey:
        """Return the EK of ``profile`` (the configured one by default) and its certificate."""

    def ensure_ak(self) -> AttestationKey:
        """Return the persisted AK, creating it the first time."""

    def activate_credential(
        self, credential_blob: bytes, encrypted_secret: bytes, *, ek_profile: str | None = None
    ) -> bytes:
        """Recover an HGS credential bound to the EK and the AK."""

    def quote(
        self, qualifying_data: bytes, pcrs: Iterable[int] | None = None, bank: int = TpmAlg.SHA256
    ) -> Quote:
        """Quote PCRs with the AK over ``qualifying_data``."""

    def extend(self, pcr: int, digests_by_bank: Mapping[int, bytes]) -> None:
        """Extend one PCR in the given banks."""

    def close(self) -> None:
        """Release the connection to the TPM."""


@contextmanager
def _device(what: str) -> Iterator[None]:
    """Turn a tpm2-pytss failure into a TpmDeviceError naming the operation."""
    try:
        yield
    except tss.TSS2_Exception as exc:
        raise TpmDeviceError(f"TPM {what} failed: {exc} (rc 0x{int(exc.rc):x})") from exc


def _pcr_selection(bank: int, indices: Sequence[int]) -> tss.TPML_PCR_SELECTION:
    select = pcr_selection(bank, tuple(indices)).select
    return tss.TPML_PCR_SELECTION(
        [tss.TPMS_PCR_SELECTION(hash=bank, sizeofSelect=3, pcrSelect=select)]
    )


def _indices(sel: tss.TPMS_PCR_SELECTION) -> tuple[int, ...]:
    """The PCR indices a tpm2-pytss TPMS_PCR_SELECTION selects, ascending."""
    return TpmsPcrSelection(0, bytes(sel.pcrSelect)[: int(sel.sizeofSelect)]).indices()


def _check_pcrs(pcrs: Iterable[int]) -> tuple[int, ...]:
    indices = tuple(sorted(set(pcrs)))
    if not indices or not all(0 <= i < PCR_COUNT for i in indices):
        raise ValueError(f"PCR indices must be a non-empty subset of 0..{PCR_COUNT - 1}")
    return indices


def _trim_der(data: bytes) -> bytes:
    """Cut the padding after a DER certificate (ST33 TPMs fill the NV index with 0xff)."""
    if len(data) < 2 or data[0] != 0x30:
        return data
    if data[1] < 0x80:
        return data[: 2 + data[1]]
    count = data[1] & 0x7F
    length = int.from_bytes(data[2 : 2 + count], "big")
    return data[: 2 + count + length]


class HostTpm:
    """The host's TPM through tpm2-pytss (ESAPI); one instance per connection, one thread.

    Args:
        tcti: a TCTI string, e.g. ``device:/dev/tpmrm0`` or ``swtpm:host=127.0.0.1,port=P``.
        ak_handle: the persistent handle of the AK.
        ak_type: the algorithm of an AK created here.
        ek_profile: the EK that parents the AK and, by default, activates credentials.
        pcrs: the PCRs quoted by default.
        owner_auth: the owner hierarchy's authorization (needed to persist the AK).
        endorsement_auth: the endorsement hierarchy's authorization.

    Raises:
        TpmDeviceError: the TPM cannot be reached or refuses the initial clean-up.
    """

    def __init__(
        self,
        tcti: str,
        *,
        ak_handle: int = DEFAULT_AK_HANDLE,
        ak_type: AkType = AkType.RSA,
        ek_profile: str = "EK-RSA2048",
        pcrs: Iterable[int] = range(PCR_COUNT),
        owner_auth: bytes = b"",
        endorsement_auth: bytes = b"",
    ) -> None:
        if ek_profile not in EK_CERT_INDEX:
            raise ValueError(f"unknown EK profile {ek_profile!r}")
        if ak_handle >> 24 != _HT_PERSISTENT >> 24:
            raise ValueError(f"0x{ak_handle:08x} is not a persistent handle")
        self.ak_handle = ak_handle
        self.ak_type = ak_type
        self.ek_profile = ek_profile
        self.pcrs = _check_pcrs(pcrs)
        with _device(f"connection ({tcti.split(':', 1)[0]})"):
            self._ectx = tss.ESAPI(tcti)
        try:
            with _device("setup"):
                self._ectx.tr_set_auth(tss.ESYS_TR.OWNER, owner_auth)
                self._ectx.tr_set_auth(tss.ESYS_TR.ENDORSEMENT, endorsement_auth)
            self.flush_all_transients()
        except BaseException:
            self._ectx.close()
            raise
        self._ak_tr: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the connection (objects persisted in the TPM stay); safe to call twice."""
        if self._ectx is not None:
            self._ectx.close()
            self._ectx = None

    def __enter__(self) -> HostTpm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _handles(self, first: int) -> list[int]:
        """List the TPM handles of one type (following ``moreData``)."""
        found: list[int] = []
        start, more = first, True
        while more:
            with _device("GetCapability(handles)"):
                more, data = self._ectx.get_capability(tss.TPM2_CAP.HANDLES, start, 64)
            batch = [int(h) for h in data.data.handles]
            if not batch:
                break
            found += batch
            start = batch[-1] + 1
        return found

    def flush_all_transients(self) -> int:
        """Flush every loaded transient object and session; return how many there were.

        On a raw TPM (swtpm's socket, /dev/tpm0) what a crashed process left loaded
        stays until the TPM restarts and blocks new objects after about three. Under
        a resource manager (/dev/tpmrm0) only this connection's own handles are
        visible, so this never disturbs another process.
        """
        handles = self._handles(_HT_TRANSIENT) + self._handles(_HT_LOADED_SESSION)
        for handle in handles:
            with _device(f"flush of 0x{handle:08x}"):
                self._ectx.flush_context(self._ectx.tr_from_tpmpublic(handle))
        return len(handles)

    def _flush(self, handle: int) -> None:
        """Flush an object or session made here, ignoring one the TPM already dropped."""
        # A policy session may already be gone after a failed command.
        with suppress(tss.TSS2_Exception):
            self._ectx.flush_context(handle)

    # ------------------------------------------------------------------ PCRs

    def pcr_banks(self) -> tuple[int, ...]:
        """Return the banks with at least one PCR allocated, as TPM_ALG_IDs."""
        with _device("GetCapability(PCRs)"):
            _, data = self._ectx.get_capability(tss.TPM2_CAP.PCRS, 0, 1)
        return tuple(int(sel.hash) for sel in data.data.assignedPCR if _indices(sel))

    def read_pcrs(self, pcrs: Iterable[int], bank: int = TpmAlg.SHA256) -> dict[int, bytes]:
        """Read PCRs of one bank, eight at a time, until the TPM returned every one.

        Raises:
            TpmDeviceError: the bank is not allocated (the TPM returns nothing).
        """
        pending = list(_check_pcrs(pcrs))
        values: dict[int, bytes] = {}
        while pending:
            with _device("PCR_Read"):
                _, out, digests = self._ectx.pcr_read(
                    _pcr_selection(bank, pending[:PCR_READ_CHUNK])
                )
            got = [i for sel in list(out.pcrSelections)[: int(out.count)] for i in _indices(sel)]
            if not got:
                raise TpmDeviceError(f"PCR_Read returned no PCR of bank {alg_name(bank)}")
            for index, digest in zip(got, list(digests.digests)[: int(digests.count)], strict=True):
                values[index] = bytes(digest)
            pending = [i for i in pending if i not in values]
        return values

    def extend(self, pcr: int, digests_by_bank: Mapping[int, bytes]) -> None:
        """Extend PCR ``pcr`` with one digest per bank (TPM2_PCR_Extend).

        Raises:
            ValueError: an unknown bank or a digest of the wrong size.
            TpmDeviceError: the TPM refused (e.g. a PCR not extendable at locality 0).
        """
        digests = []
        for bank, digest in digests_by_bank.items():
            if bank not in _TPMU_HA_BANKS or len(digest) != HASH_ALGS[bank].digest_size:
                raise ValueError(f"cannot extend bank {alg_name(bank)} with {len(digest)} bytes")
            ha = tss.TPMT_HA(hashAlg=bank)
            # TPMT_HA(digest=bytes) fails in tpm2-pytss 3.0: set the union member.
            setattr(ha.digest, HASH_ALGS[bank].name, digest)
            digests.append(ha)
        _check_pcrs([pcr])
        with _device(f"PCR_Extend({pcr})"):
            self._ectx.pcr_extend(tss.ESYS_TR.PCR0 + pcr, tss.TPML_DIGEST_VALUES(digests))

    # ------------------------------------------------------------------ EK

    def available_eks(self) -> tuple[str, ...]:
        """Return the EK profiles whose certificate the TPM maker stored in NV."""
        defined = set(self._handles(_HT_NV_INDEX))
        return tuple(p for p, index in EK_CERT_INDEX.items() if index in defined)

    @contextmanager
    def _loaded_ek(self, profile: str) -> Iterator[tuple[int, tss.TPM2B_PUBLIC, bytes | None]]:
        """Recreate the EK of ``profile`` from its template; flush it afterwards.

        Yields the ESYS handle, the TPM2B_PUBLIC and the certificate (None if the
        TPM has none). The template comes from NV when the maker stored one there,
        so the key matches the certificate.
        """
        if profile not in EK_CERT_INDEX:
            raise ValueError(f"unknown EK profile {profile!r}")
        try:
            with _device(f"read of the {profile} certificate and template"):
                reader = _NvReader(self._ectx, set(self._handles(_HT_NV_INDEX)))
                cert, template = create_ek_template(profile, reader)
        except ValueError as exc:  # a high-range profile without a certificate
            raise TpmDeviceError(
                f"the TPM has no {profile} (available: {', '.join(self.available_eks())})"
            ) from exc
        with _device(f"CreatePrimary({profile})"):
            handle, public, *_ = self._ectx.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)
        try:
            yield handle, public, None if cert is None else _trim_der(bytes(cert))
        finally:
            self._flush(handle)

    def read_ek(self, profile: str | None = None) -> EndorsementKey:
        """Return the EK of an :data:`EK_CERT_INDEX` profile and its DER certificate from NV.

        Raises:
            TpmDeviceError: the TPM has no such EK, or failed.
        """
        profile = profile or self.ek_profile
        with self._loaded_ek(profile) as (handle, public, cert):
            with _device("TR_GetName(EK)"):
                name = bytes(self._ectx.tr_get_name(handle))
            return EndorsementKey(profile, bytes(public.marshal()), name, cert)

    @contextmanager
    def _ek_user_session(self, public: tss.TPM2B_PUBLIC) -> Iterator[int]:
        """Authorize use of the EK: its policy when it has one, else its empty authValue.

        Low-range EK templates (EK-RSA2048, EK-ECC256) clear userWithAuth, so only
        their policy, PolicySecret(TPM_RH_ENDORSEMENT), opens them; high-range
        templates set userWithAuth with an empty authValue.
        """
        if int(public.publicArea.objectAttributes) & TpmaObject.USER_WITH_AUTH:
            yield tss.ESYS_TR.PASSWORD
            return
        none, sym_null = tss.ESYS_TR.NONE, tss.TPMT_SYM_DEF(algorithm=tss.TPM2_ALG.NULL)
        name_alg = int(public.publicArea.nameAlg)  # a policy session hashes like the EK
        with _device("StartAuthSession(policy)"):
            session = self._ectx.start_auth_session(
                none, none, tss.TPM2_SE.POLICY, sym_null, name_alg
            )
        try:
            with _device("PolicySecret(endorsement)"):
                self._ectx.policy_secret(tss.ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            yield session
        finally:
            self._flush(session)

    # ------------------------------------------------------------------ AK

    def _persistent_ak(self) -> int | None:
        """Return the ESYS handle of the AK at ``ak_handle``, or None if the slot is empty."""
        if self._ak_tr is None and self.ak_handle in self._handles(_HT_PERSISTENT):
            with _device(f"ReadPublic(0x{self.ak_handle:08x})"):
                self._ak_tr = self._ectx.tr_from_tpmpublic(self.ak_handle)
        return self._ak_tr

    def _describe_ak(self, handle: int) -> AttestationKey:
        """Read the AK's public area and check that it is fit to attest."""
        with _device("ReadPublic(AK)"):
            public, name, _ = self._ectx.read_public(handle)
        public_bytes = bytes(public.marshal())
        try:
            check_attestation_key(unmarshal_public2b(public_bytes))
        except AttestationKeyError as exc:
            raise TpmDeviceError(
                f"persistent handle 0x{self.ak_handle:08x} holds a key that is not an AK: {exc}",
                hint="configure another AK handle, or evict that object if it is unused",
            ) from exc
        return AttestationKey(public_bytes, bytes(name), self.ak_handle)

    def ensure_ak(self) -> AttestationKey:
        """Return the persisted AK, creating it under the EK the first time.

        The AK is a restricted signing key (``ak_type``) made inside the TPM and
        never exportable; its Name is what the HGS binds with MakeCredential, and
        persisting it keeps that Name across restarts of the agent. An AK already at
        the handle is reused whatever ``ak_type`` says: it is the one the HGS knows.

        Raises:
            TpmDeviceError: the TPM failed, or the handle holds something else.
        """
        handle = self._persistent_ak()
        if handle is None:
            handle = self._create_ak()
        return self._describe_ak(handle)

    def _create_ak(self) -> int:
        template = tss.TPM2B_PUBLIC.parse(self.ak_type.value, objectAttributes=int(_AK_ATTRIBUTES))
        with self._loaded_ek(self.ek_profile) as (ek, ek_public, _):
            with self._ek_user_session(ek_public) as session, _device("Create(AK)"):
                private, public, *_ = self._ectx.create(ek, None, template, session1=session)
            with self._ek_user_session(ek_public) as session, _device("Load(AK)"):
                transient = self._ectx.load(ek, private, public, session1=session)
            try:
                with _device(f"EvictControl(AK -> 0x{self.ak_handle:08x})"):
                    self._ak_tr = self._ectx.evict_control(
                        tss.ESYS_TR.OWNER, transient, self.ak_handle
                    )
            finally:
                self._flush(transient)
        return self._ak_tr

    # ------------------------------------------------------------------ credential

    def activate_credential(
        self, credential_blob: bytes, encrypted_secret: bytes, *, ek_profile: str | None = None
    ) -> bytes:
        """Recover the HGS's credential: proof that the AK lives next to the EK.

        Args:
            credential_blob: TPM2B_ID_OBJECT from MakeCredential.
            encrypted_secret: TPM2B_ENCRYPTED_SECRET from MakeCredential.
            ek_profile: the EK the credential was made for (the configured one by default).

        Raises:
            CredentialRejectedError: the TPM refused the blob (another EK or AK Name,
                or tampered bytes).
            TpmDeviceError: the TPM failed for another reason.
            ValueError: the inputs are not the marshalled structures.
        """
        blob = _unmarshal_exact(tss.TPM2B_ID_OBJECT, credential_blob, "credential blob")
        secret = _unmarshal_exact(tss.TPM2B_ENCRYPTED_SECRET, encrypted_secret, "encrypted secret")
        ak = self._persistent_ak()
        if ak is None:
            raise TpmDeviceError(
                f"no AK at 0x{self.ak_handle:08x}", hint="create the AK (ensure_ak) first"
            )
        with (
            self._loaded_ek(ek_profile or self.ek_profile) as (ek, ek_public, _),
            self._ek_user_session(ek_public) as session,
        ):
            try:
                credential = self._ectx.activate_credential(
                    ak, ek, blob, secret, session1=tss.ESYS_TR.PASSWORD, session2=session
                )
            except tss.TSS2_Exception as exc:
                raise self._activation_error(exc) from exc
        return bytes(credential)

    def _activation_error(self, exc: tss.TSS2_Exception) -> GuardfabError:
        """Tell a refused credential from a failing TPM.

        A TPM refuses a bad credential with an error on parameter 1 or 2 (blob,
        secret): TPM_RC_INTEGRITY for another AK Name, TPM_RC_VALUE for a seed that
        does not decrypt. libtpms before 0.10 (Debian 12 ships 0.9.2) answers the
        latter with TPM_RC_FAILURE instead (fixed in libtpms PR #444), which would
        read as a broken TPM; a TPM whose self-test result is still clean refused
        the input, not itself.
        """
        rc = int(exc.rc)
        refused = rc >> 16 == 0 and exc.fmt1 and exc.parameter in (1, 2)
        if rc == _RC_FAILURE:
            with suppress(tss.TSS2_Exception):
                refused = int(self._ectx.get_test_result()[1]) == 0
        if refused:
            return CredentialRejectedError(
                f"the TPM refused the credential ({exc}): it was made for another EK or AK"
            )
        return TpmDeviceError(f"TPM ActivateCredential failed: {exc} (rc 0x{rc:x})")

    # ------------------------------------------------------------------ quote

    def quote(
        self, qualifying_data: bytes, pcrs: Iterable[int] | None = None, bank: int = TpmAlg.SHA256
    ) -> Quote:
        """Quote PCRs with the AK and return the PCR values that the quote covers.

        The values are read right after the quote and their digest is compared
        with the signed ``pcrDigest``; if an extend slipped in between, the quote is
        taken again (up to :data:`QUOTE_ATTEMPTS` times). So the returned values are
        exactly what the signature vouches for, and the HGS can compare them with
        the event log's replay. ``qualifying_data`` (at most 64 bytes) is normally
        ``binding.quote_qualifying_data``; ``pcrs`` defaults to the configured ones.
        Without a persisted AK, one is created first (as :meth:`ensure_ak`).

        Raises:
            TpmDeviceError: the TPM failed, or the PCRs changed under every attempt.
        """
        if len(qualifying_data) > 64:
            raise ValueError("qualifying data is at most 64 bytes (a TPM2B_DATA)")
        indices = self.pcrs if pcrs is None else _check_pcrs(pcrs)
        handle = self._persistent_ak()
        if handle is None:
            handle = self._create_ak()
        for _ in range(QUOTE_ATTEMPTS):
            with _device("Quote"):
                attest, signature = self._ectx.quote(
                    handle, _pcr_selection(bank, indices), qualifying_data
                )
            attest_bytes, signature_bytes = bytes(attest), bytes(signature.marshal())
            values = {bank: self.read_pcrs(indices, bank)}
            parsed = unmarshal_attest(attest_bytes)
            hash_alg = unmarshal_signature(signature_bytes).hash_alg
            if pcr_digest(parsed.quote.pcr_select, values, hash_alg) == parsed.quote.pcr_digest:
                return Quote(attest_bytes, signature_bytes, values)
        raise TpmDeviceError(
            f"the PCRs changed during each of {QUOTE_ATTEMPTS} quotes",
            hint="something keeps extending PCRs (e.g. IMA); quote fewer PCRs or retry later",
        )


class _NvReader(NVReadEK):  # type: ignore[misc]  # NVReadEK is untyped
    """The NV callback of ``create_ek_template`` that knows which indices exist.

    NVReadEK alone probes missing indices (the template and nonce indices usually
    are) and libtss2 logs each failed probe as an error; checking the list of
    defined indices first avoids both the round trip and the noise.
    """

    def __init__(self, ectx: tss.ESAPI, defined: set[int]) -> None:
        super().__init__(ectx)
        self._defined = defined

    def __call__(self, index: int) -> bytes:
        if int(index) not in self._defined:
            raise NoSuchIndex(index)
        return bytes(super().__call__(index))


def _unmarshal_exact(kind: Any, data: bytes, what: str) -> object:
    """Unmarshal a TPM2B with tpm2-pytss, refusing trailing or missing bytes."""
    try:
        value, used = kind.unmarshal(data)
    except (tss.TSS2_Exception, ValueError, TypeError) as exc:
        raise ValueError(f"the {what} is not a marshalled TPM2B") from exc
    if used != len(data):
        raise ValueError(f"the {what} has {len(data) - int(used)} trailing bytes")
    return value
