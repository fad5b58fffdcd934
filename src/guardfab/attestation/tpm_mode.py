"""TPM-trusted attestation: identity, AK binding, quote, event log, then policies.

The order is the order of trust (verify, then parse):

1. **identity**: the EK is registered, or (if the HGS admits them) its
   certificate chains to a configured TPM vendor CA; a revoked host stops here;
2. **AK**: fit for attestation (restricted signing key made in the TPM), and
   bound to this EK by an earlier MakeCredential/ActivateCredential; an AK
   never seen yields ActivationRequired with what MakeCredential needs;
3. **quote**: signature over the exact bytes received, then qualifying data =
   ``quote_qualifying_data(nonce, host_key)`` (binds the challenge and the host
   encryption key), then the host's reported PCR values against the digest;
4. **event log**: parsed and replayed in the SHA-256 bank; every quoted PCR the
   log extends, and every required PCR, must equal the quoted value (a log
   edited after the quote fails here);
5. only then facts, the baseline match and every policy.

Any stage that fails stops the pipeline with a named check; every policy still
gets a verdict (not evaluated), and no fact is ever read from a log that did not
replay to the quote.
"""

from __future__ import annotations

import datetime
import functools
import hmac
from collections.abc import Iterable, Mapping

from cryptography import x509

from guardfab.attestation.binding import qualifying_data
from guardfab.attestation.certchain import (
    UntrustedCertificateError,
    load_der_certificate,
    verify_ek_certificate,
)
from guardfab.attestation.evaluation import assess_summary, refused_result, require_mode
from guardfab.attestation.evidence import TpmEvidence, forget_decoded_logs
from guardfab.attestation.policies import DEFAULT_POLICY_SET, PolicySet
from guardfab.attestation.result import (
    ActivationRequest,
    AttestationResult,
    AttestationStatus,
    CheckFailure,
    Refusal,
)
from guardfab.attestation.summary import FactRecord, HostSummary, QuotedLog
from guardfab.attestation.trust import AttestationMode, TrustState, ek_digest
from guardfab.errors import FormatError, GuardfabError, VerificationError
from guardfab.tpm.constants import TpmAlg, TpmaObject
from guardfab.tpm.eventlog import EventLog, parse_event_log
from guardfab.tpm.quote import (
    AttestationKey,
    AttestationKeyError,
    NonceMismatchError,
    PcrDigestMismatchError,
    PcrSelectionError,
    VerifiedQuote,
    verify_quote,
)
from guardfab.tpm.structures import object_name, unmarshal_public2b

_SHA256 = int(TpmAlg.SHA256)
_INVALID = AttestationStatus.INVALID_EVIDENCE
_TPM_ERROR = AttestationStatus.TPM_ERROR
_UNAUTHORIZED = AttestationStatus.UNAUTHORIZED_HOST
_EK_ATTRIBUTES = (
    TpmaObject.RESTRICTED | TpmaObject.DECRYPT | TpmaObject.FIXED_TPM | TpmaObject.FIXED_PARENT
)


class EventLogMismatchError(VerificationError):
    """The event log does not replay to the PCR values the TPM quoted."""

    hint = (
        "send the unmodified binary_bios_measurements read at the time of the quote; "
        "a log edited after the quote, or from another boot, cannot replay to it"
    )


class _ActivationNeeded(Refusal):
    """The AK is fit but unknown: stop, and carry what MakeCredential needs."""

    def __init__(self, request: ActivationRequest) -> None:
        super().__init__(
            CheckFailure(
                "activation",
                AttestationStatus.ACTIVATION_REQUIRED,
                "",
                "the AK is not yet bound to this EK",
                "answer the MakeCredential challenge with TPM2_ActivateCredential",
            )
        )
        self.request = request


# --------------------------------------------------------------------------- identity


#: Parsed identities are cached by their exact bytes: a host presents the same EK
#: and AK at every attestation, and parsing is pure. A failure raises and is
#: never cached. Sized for a large fleet attesting every 8 hours.
_IDENTITY_CACHE = 8192


@functools.lru_cache(maxsize=_IDENTITY_CACHE)
def _ek_digest_of(ek_public: bytes) -> bytes:
    """Parse the EK public area, check it looks like an EK, and digest it."""
    ek = unmarshal_public2b(ek_public)
    if ek.object_attributes & _EK_ATTRIBUTES != _EK_ATTRIBUTES:
        raise FormatError("the EK is not a fixed, restricted decryption key")
    return ek_digest(ek)


@functools.lru_cache(maxsize=_IDENTITY_CACHE)
def _attestation_key(ak_public: bytes) -> tuple[AttestationKey, bytes]:
    """Parse the AK, check it is fit for attestation, and return it with its Name."""
    ak = AttestationKey.of(unmarshal_public2b(ak_public))
    return ak, object_name(ak.public)


def _parse_ek(evidence: TpmEvidence) -> tuple[bytes, x509.Certificate | None]:
    """The EK digest and the EK certificate, if any."""
    try:
        digest = _ek_digest_of(evidence.ek_public)
        cert = None
        if evidence.ek_certificate is not None:
            cert = load_der_certificate(evidence.ek_certificate, what="EK certificate")
    except FormatError as exc:
        raise Refusal.of("ek-public", _INVALID, exc) from exc
    return digest, cert


def _certificate_matches(cert: x509.Certificate, digest: bytes) -> None:
    try:
        same = hmac.compare_digest(ek_digest(cert), digest)
    except (ValueError, TypeError) as exc:
        raise Refusal.of(
            "ek-certificate", _INVALID, "the EK certificate's key is unusable"
        ) from exc
    if not same:
        raise Refusal.of("ek-certificate", _INVALID, "the EK certificate is for another key")


def _admit_certified(
    cert: x509.Certificate | None, digest: bytes, trust: TrustState, now: datetime.datetime
) -> str:
    """Admit an unregistered EK through its certificate, if the HGS allows that."""
    if cert is None or not trust.admit_certified_eks or trust.ek_store is None:
        detail = "" if cert is None else "; EK certificates are not accepted instead"
        raise Refusal.of(
            "identity",
            _UNAUTHORIZED,
            f"the EK (digest {digest.hex()[:16]}...) is not registered{detail}",
            hint="register the host's EK at the HGS (hgs tpm-host add)",
        )
    try:
        verify_ek_certificate(cert, trust.ek_store, trust.ek_intermediates, now=now)
    except UntrustedCertificateError as exc:
        raise Refusal.of("ek-certificate", _UNAUTHORIZED, exc) from exc
    return "ek-" + digest.hex()[:16]


def _identify(
    evidence: TpmEvidence, trust: TrustState, now: datetime.datetime
) -> tuple[str, bytes]:
    """The host id and EK digest of a trusted, unrevoked EK."""
    digest, cert = _parse_ek(evidence)
    if cert is not None:
        _certificate_matches(cert, digest)
    host = trust.tpm_host(digest)
    host_id = host.host_id if host is not None else _admit_certified(cert, digest, trust, now)
    if trust.is_revoked(host_id):
        raise Refusal.of("revocation", _UNAUTHORIZED, f"host {host_id} is revoked")
    return host_id, digest


def _check_ak(
    evidence: TpmEvidence, host_id: str, digest: bytes, trust: TrustState
) -> AttestationKey:
    """A fit AK, bound to this EK; unknown AKs need activation first.

    The attributes are checked before the binding: an AK that could sign
    made-up quotes must never be offered a MakeCredential challenge.
    """
    try:
        ak, name = _attestation_key(evidence.ak_public)
    except AttestationKeyError as exc:
        raise Refusal.of("ak-attributes", _TPM_ERROR, exc) from exc
    except FormatError as exc:
        raise Refusal.of("ak-public", _INVALID, exc) from exc
    binding = trust.ak_binding(name)
    if binding is None:
        request = ActivationRequest(host_id, evidence.ek_public, evidence.ak_public, name, digest)
        raise _ActivationNeeded(request)
    if not hmac.compare_digest(binding.ek_digest, digest):
        raise Refusal.of(
            "ak-binding",
            _UNAUTHORIZED,
            "the AK was activated for another TPM's EK: the quote is not from this TPM",
        )
    return ak


# --------------------------------------------------------------------------- quote and log

#: Quote errors by class (first match wins), with the check name and status.
_QUOTE_CHECKS: tuple[tuple[type[GuardfabError], str, AttestationStatus], ...] = (
    (NonceMismatchError, "quote-nonce", _INVALID),
    (PcrSelectionError, "quote-pcr-selection", _INVALID),
    (PcrDigestMismatchError, "quote-pcr-digest", _INVALID),
    (VerificationError, "quote-signature", _TPM_ERROR),
    (FormatError, "quote-format", _INVALID),
)
_NONCE_HINT = (
    "the quote was made for another challenge or another host key: "
    "request a new challenge and quote with qualifying data = H(nonce || host key)"
)


def _verify_quote(
    evidence: TpmEvidence, ak: AttestationKey, trust: TrustState, nonce: bytes
) -> VerifiedQuote:
    """Verify the quote over the exact bytes, bound to the nonce and the host key."""
    if not evidence.pcrs.keys() >= trust.quote_pcrs:
        missing = sorted(trust.quote_pcrs - evidence.pcrs.keys())
        error = PcrSelectionError(f"the quote does not cover required PCR(s) {missing}")
        raise Refusal.of("quote-pcr-selection", _INVALID, error)
    expected = qualifying_data(nonce, evidence.key_digest())
    try:
        return verify_quote(
            evidence.quote_attest,
            evidence.quote_signature,
            ak,
            expected_nonce=expected,
            pcr_values={_SHA256: evidence.pcrs},
        )
    except GuardfabError as exc:
        for kind, check, status in _QUOTE_CHECKS:
            if isinstance(exc, kind):
                hint = _NONCE_HINT if check == "quote-nonce" else ""
                raise Refusal.of(check, status, exc, hint) from exc
        raise


#: Quote selections remembered per cached log (a host quotes the same PCRs every time).
_SELECTIONS_PER_LOG = 4


class _ParsedLog:
    """What the log's bytes alone determine: parse, SHA-256 replay, facts, quoted events.

    Pure functions of the bytes (and, for the events, of the quote's PCR
    selection), so they are computed once per distinct log and shared;
    everything that depends on the quote's values or the trust (which PCRs must
    match, what policies read) is still checked on every attestation.
    """

    __slots__ = ("_facts", "_measured", "_quoted", "data", "log", "replayed")

    def __init__(self, data: bytes, log: EventLog) -> None:
        self.data = data
        self.log = log
        self.replayed: Mapping[int, bytes] = log.replay([_SHA256])[_SHA256]
        self._facts: dict[str, FactRecord] | None = None
        self._quoted: dict[frozenset[int], QuotedLog] = {}
        self._measured: dict[int, tuple[tuple[str, ...], tuple[int, ...]]] = {}

    def facts(self) -> dict[str, FactRecord]:
        """The log's SHA-256 facts as records (a fresh dict: callers add their own)."""
        if self._facts is None:
            self._facts = self.log.facts(_SHA256)._asdict()
        return dict(self._facts)

    def measured_in(self, events: QuotedLog, pcr: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The hex SHA-256 digests and numbers of a quoted PCR's events (kept per PCR).

        What the CI policy fact shows at every attestation; the events come
        from (and stay in) the quoted log, where the CI policy reads them.
        """
        found = self._measured.get(pcr)
        if found is None:
            records = events.events_in(pcr)
            # Lists, then tuples: a generator is resumed once per event (here at every new log).
            found = (tuple([e.digest.hex() for e in records]), tuple([e.number for e in records]))
            if pcr in events.pcrs:  # (none for a PCR this quote left out says nothing of the log)
                self._measured[pcr] = found
        return found

    def quoted(self, pcrs: Iterable[int]) -> QuotedLog:
        """The log with the quoted PCRs: the summary's events, made when read (shared)."""
        key = frozenset(pcrs)
        found = self._quoted.get(key)
        if found is None:
            found = QuotedLog(self.data, self.log, key)
            if len(self._quoted) < _SELECTIONS_PER_LOG:
                self._quoted[key] = found
        return found


def forget_logs() -> None:
    """Drop every cached log (decoded texts and what was parsed from them).

    The next check of any log pays its full decode, parse, replay and facts:
    what a benchmark of a host's first attestation after a reboot measures.
    """
    forget_decoded_logs()


def _parsed_log(evidence: TpmEvidence) -> _ParsedLog:
    """Parse and replay the evidence's log, or find it parsed with its decoded text.

    A log is kept where the loader keeps its text (``evidence.decoded``, ADR
    0012): the bytes are a pure function of the exact text, so a log seen again
    costs no second lookup and no hash of its bytes. Evidence built without the
    loader (or a copy with another log) is parsed every time; the identity check
    is the link from the entry to exactly these bytes.
    """
    data = evidence.event_log
    decoded = evidence.decoded
    if decoded is not None and decoded.data is not data:
        decoded = None  # not the loader's bytes: nothing to find or keep there
    if decoded is not None and isinstance(decoded.derived, _ParsedLog):
        return decoded.derived
    try:
        log = parse_event_log(data)
    except FormatError as exc:
        raise Refusal.of("event-log-format", _INVALID, exc) from exc
    if _SHA256 not in log.replayable_banks:
        raise Refusal.of("event-log-format", _INVALID, "the event log has no SHA-256 bank")
    parsed = _ParsedLog(data, log)
    if decoded is not None:
        decoded.derived = parsed  # kept only once it parsed and replayed
    return parsed


def _replayed_log(
    evidence: TpmEvidence, quoted: Mapping[int, bytes], trust: TrustState
) -> _ParsedLog:
    """Parse and replay the log; it must reproduce every quoted PCR it touches."""
    parsed = _parsed_log(evidence)
    wrong = []
    for pcr, value in quoted.items():
        expected = parsed.replayed.get(pcr)
        if expected is None:
            if pcr not in trust.quote_pcrs:
                continue  # a PCR the firmware log does not cover (e.g. IMA's PCR 10)
            expected = parsed.log.initial_pcrs(_SHA256)[pcr]  # reset value (rarely asked)
        if not hmac.compare_digest(expected, value):
            wrong.append(f"PCR {pcr}: log {expected.hex()[:16]}..., quote {value.hex()[:16]}...")
    if wrong:
        error = EventLogMismatchError(
            "the event log does not replay to the quoted PCRs (" + "; ".join(wrong) + ")"
        )
        raise Refusal.of("event-log-replay", _INVALID, error)
    return parsed


# --------------------------------------------------------------------------- facts


@functools.lru_cache(maxsize=64)
def _resumed(restart_count: int) -> FactRecord:
    """The quote's resume fact (immutable, so one per counter value is shared)."""
    return FactRecord(
        restart_count != 0,
        (),
        f"restartCount = {restart_count} in the verified quote's TPMS_CLOCK_INFO "
        "(0: no S3 resume or TPM restart since the last full boot)",
    )


def _summarize(
    host_id: str,
    parsed: _ParsedLog,
    quote: VerifiedQuote,
    trust: TrustState,
    now: datetime.datetime,
) -> HostSummary:
    """The verified record: quoted PCRs, their events, and the facts policies read."""
    log = parsed.log
    pcrs = quote.pcrs[_SHA256]
    events = parsed.quoted(pcrs)
    facts = parsed.facts()
    clock = quote.attest.clock_info
    facts["resumed"] = _resumed(clock.restart_count)
    facts["boot_count"] = FactRecord(
        clock.reset_count, (), "resetCount in the verified quote (TPM resets, not OS boots)"
    )
    ci_pcr = trust.ci_policy_pcr
    if ci_pcr in pcrs:
        digests, numbers = parsed.measured_in(events, ci_pcr)
        facts["ci_policy"] = FactRecord(
            list(digests),  # a list of its own: a fact's value is handed to callers
            numbers,
            f"digests measured into PCR {ci_pcr}, where GRUB measures each file it loads; "
            "Hgs_CiPolicy compares them with the registered CI policies",
        )
    else:
        facts["ci_policy"] = FactRecord(None, (), f"the quote does not cover PCR {ci_pcr}")
    return HostSummary(host_id, now, pcrs, events, facts, uintn_size=log.uintn_size)


def verify_tpm_evidence(
    evidence: TpmEvidence,
    trust: TrustState,
    *,
    nonce: bytes,
    now: datetime.datetime,
    policies: PolicySet = DEFAULT_POLICY_SET,
) -> AttestationResult:
    """Verify TPM evidence against the trust state; return the full result.

    Args:
        evidence: the loaded evidence (:meth:`TpmEvidence.from_dict`).
        trust: what the HGS trusts now.
        nonce: the challenge nonce the service issued (and checked for expiry
            and single use) for this attestation.
        now: the caller's clock (certificate validity, result time).
        policies: the policies to evaluate (all of them by default).

    Returns:
        The result: Passed only if every check passed and no enforced policy blocks.
    """
    host_id: str | None = None
    try:
        require_mode(
            trust, AttestationMode.TPM, evidence.host_key, now, key_checked=evidence.key_checked()
        )
        host_id, digest = _identify(evidence, trust, now)
        ak = _check_ak(evidence, host_id, digest, trust)
        quote = _verify_quote(evidence, ak, trust, nonce)
        log = _replayed_log(evidence, quote.pcrs[_SHA256], trust)
    except Refusal as refusal:
        activation = refusal.request if isinstance(refusal, _ActivationNeeded) else None
        return refused_result(
            AttestationMode.TPM,
            refusal,
            trust,
            host_id=host_id,
            host_key=evidence.host_key,
            now=now,
            activation=activation,
            policies=policies,
        )
    summary = _summarize(host_id, log, quote, trust, now)
    return assess_summary(summary, trust, host_key=evidence.host_key, now=now, policies=policies)
