"""A software guarded host for the attestation tests: EK, AK, boot log, quote, evidence.

Everything a real host would send is built here with software keys: EK and AK
public areas (``test_tpm_credential.soft_ek`` / ``test_tpm_quote.soft_ak``), a
PFP-shaped crypto-agile boot log from :class:`guardfab.softhost.boot.Boot` (policy
variables and separators, firmware and boot loader images, GRUB's PCR 8 commands
and PCR 9 files, among them the CI policy file) with PCR values by its independent
reference replay, and a TPMS_ATTEST marshalled and signed like TPM2_Quote. The tests at the
bottom check the host itself: its log parses, replays to its PCRs, and it
passes attestation against the trust state made for it.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc.jwk import ECKey

from guardfab.attestation.baseline import TpmBaseline, baseline_from_log
from guardfab.attestation.binding import quote_qualifying_data
from guardfab.attestation.evidence import TpmEvidence
from guardfab.attestation.result import AttestationStatus
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.attestation.trust import AkBinding, CiPolicy, TpmHost, TrustState, ek_digest
from guardfab.formats import jose
from guardfab.softhost.boot import CI_POLICY_FILE, QUOTED_PCRS, Boot
from guardfab.softhost.eventlog import SHA256
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.eventlog import parse_event_log
from guardfab.tpm.quote import pcr_digest
from guardfab.tpm.structures import (
    TpmsAttest,
    TpmsClockInfo,
    TpmsQuoteInfo,
    marshal_attest,
    marshal_public2b,
    object_name,
    pcr_selection,
)
from test_tpm_credential import SoftEk, soft_ek
from test_tpm_quote import SoftAk, soft_ak, soft_sign

#: The shared vectors beside the repository; fixtures fail loudly when missing.
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
NONCE = b"challenge-nonce-0123456789abcdef"


def vectors_dir() -> Path:
    """shared/vectors, or a loud failure (never a skip)."""
    if not (VECTORS / "eventlogs" / "event-gce-ubuntu-2104-log.bin").is_file():
        pytest.fail(f"shared vectors not found under {VECTORS}: clone shared/ beside the repo")
    return VECTORS


def make_quote(
    qualifying_data: bytes, pcrs: Mapping[int, bytes], *, restart_count: int = 0
) -> bytes:
    """TPMS_ATTEST bytes as TPM2_Quote builds them over the SHA-256 bank."""
    selection = (pcr_selection(SHA256, sorted(pcrs)),)
    digest = pcr_digest(selection, {SHA256: dict(pcrs)}, SHA256)
    clock = TpmsClockInfo(123456, 7, restart_count, True)
    attest = TpmsAttest(
        b"\x00\x0b" + bytes(32),
        qualifying_data,
        clock,
        0x20240101,
        TpmsQuoteInfo(selection, digest),
    )
    return marshal_attest(attest)


@functools.cache
def encryption_key(index: int = 0) -> ECKey:
    """A host encryption key (EC P-256) the KPS would wrap VM keys to."""
    return ECKey.import_key(ec.generate_private_key(ec.SECP256R1()))


def host_key_jwk(index: int = 0) -> dict[str, Any]:
    """The public JWK of a host encryption key, exactly its RFC 7638 members."""
    return jose.public_jwk(encryption_key(index))


@dataclass(frozen=True)
class SoftHost:
    """A software guarded host: EK, AK, host key and what it booted."""

    host_id: str = "host-a"
    ek_kind: str = "rsa2048-sha256-128"
    index: int = 0
    boot: Boot = field(default_factory=Boot)

    @property
    def ek(self) -> SoftEk:
        return soft_ek(self.ek_kind, self.index)

    @property
    def ak(self) -> SoftAk:
        return soft_ak("ecc", index=self.index)

    @property
    def ek_digest(self) -> bytes:
        return ek_digest(self.ek.public)

    @property
    def ak_name(self) -> bytes:
        return object_name(self.ak.public)

    def registration(self) -> TpmHost:
        return TpmHost(self.host_id, self.ek_digest)

    def binding(self) -> AkBinding:
        return AkBinding(self.ak_name, self.ek_digest, self.host_id)

    def evidence(
        self,
        nonce: bytes = NONCE,
        *,
        host_key: dict[str, Any] | None = None,
        quoted: Iterable[int] = QUOTED_PCRS,
        restart_count: int = 0,
        signer: SoftAk | None = None,
        ek_certificate: bytes | None = None,
    ) -> TpmEvidence:
        """Honest evidence for ``nonce``: quote bound to the nonce and host key."""
        host_key = host_key or host_key_jwk(self.index)
        pcrs = self.boot.pcrs(quoted)
        attest = make_quote(
            quote_qualifying_data(nonce, host_key), pcrs, restart_count=restart_count
        )
        return TpmEvidence(
            ek_public=marshal_public2b(self.ek.public),
            ek_certificate=ek_certificate,
            ak_public=marshal_public2b(self.ak.public),
            quote_attest=attest,
            quote_signature=soft_sign(signer or self.ak, attest),
            pcrs=pcrs,
            event_log=self.boot.log_bytes(),
            host_key=host_key,
        )


GOLDEN = Boot()


@functools.cache
def golden_baseline() -> TpmBaseline:
    """The baseline of the golden boot, made from its log as an admin would."""
    return baseline_from_log("golden-2026", GOLDEN.log_bytes())


CI_POLICY = CiPolicy("ima-appraise-2026", hashlib.sha256(CI_POLICY_FILE).digest())


def trust_for(*hosts: SoftHost, **changes: Any) -> TrustState:
    """A trust state that registers and binds ``hosts``, with the golden baseline and CI policy."""
    base = TrustState(
        tpm_hosts=tuple(h.registration() for h in hosts),
        ak_bindings=tuple(h.binding() for h in hosts),
        baselines=(golden_baseline(),),
        ci_policies=(CI_POLICY,),
    )
    return replace(base, **changes)


# ------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Ca:
    """A certificate authority made here: a TPM vendor or an enterprise host CA."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def issue(
        self,
        public_key: Any,
        *,
        subject: x509.Name | None = None,
        extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
        not_after: datetime.datetime = NOW + datetime.timedelta(days=3650),
    ) -> x509.Certificate:
        """Issue a leaf certificate for ``public_key``."""
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject if subject is not None else x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=30))
            .not_valid_after(not_after)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self.key, hashes.SHA256())


@functools.cache
def make_ca(name: str) -> Ca:
    """A self-signed root CA (cached by name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=365))
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(key, cert)


#: TCG EK Credential Profile: a directoryName SAN with TPM manufacturer, model, version.
_TPM_SAN = x509.SubjectAlternativeName(
    [
        x509.DirectoryName(
            x509.Name(
                [
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:49465800"),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "SLB9672"),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.3"), "id:000F0000"),
                ]
            )
        )
    ]
)


def ek_certificate(host: SoftHost, ca: Ca, **kwargs: Any) -> bytes:
    """A DER EK certificate shaped like a vendor's: empty subject, TPM SAN, EK EKU."""
    cert = ca.issue(
        host.ek.private.public_key(),
        extensions=[
            (_TPM_SAN, True),
            (x509.ExtendedKeyUsage([x509.ObjectIdentifier("2.23.133.8.1")]), False),
        ],
        **kwargs,
    )
    return cert.public_bytes(serialization.Encoding.DER)


# ------------------------------------------------------------------ the host's own checks


def test_the_soft_host_log_replays_to_its_reference_pcrs() -> None:
    log = parse_event_log(GOLDEN.log_bytes())
    replayed = log.replay([TpmAlg.SHA256])[TpmAlg.SHA256]
    pcrs = GOLDEN.pcrs()
    assert all(replayed[pcr] == pcrs[pcr] for pcr in replayed)
    assert len(log.events) > 90
    facts = log.facts(TpmAlg.SHA256)
    assert facts.secure_boot.value is True
    assert facts.separators_ok.value is True


def test_the_golden_host_passes() -> None:
    host = SoftHost()
    result = verify_tpm_evidence(host.evidence(), trust_for(host), nonce=NONCE, now=NOW)
    assert result.status is AttestationStatus.PASSED, result.explain()
    assert result.host_id == "host-a"
    assert result.host_key == host_key_jwk()


def test_the_vectors_are_present() -> None:
    assert (vectors_dir() / "eventlogs" / "event-arch-linux.bin").is_file()
