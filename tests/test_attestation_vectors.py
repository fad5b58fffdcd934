"""TPM-mode attestation over the real firmware logs in shared/vectors.

The logs were captured on real machines (tpm2-tools test fixtures); here each
is carried in evidence whose quote covers the PCRs tpm2_eventlog printed for
it, so the engine's parse, replay, facts and CI-policy reading run on real
firmware output, including a SHA-1-only log that TPM mode must refuse.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from guardfab.attestation.activation import activation_challenge
from guardfab.attestation.binding import quote_qualifying_data
from guardfab.attestation.evidence import TpmEvidence
from guardfab.attestation.result import AttestationStatus, VerdictState
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.attestation.trust import CiPolicy, TrustState
from guardfab.tpm.structures import unmarshal_public2b
from test_attestation_fixtures import (
    NONCE,
    NOW,
    SoftHost,
    host_key_jwk,
    make_quote,
    trust_for,
    vectors_dir,
)
from test_tpm_quote import soft_sign

HOST = SoftHost()
S = AttestationStatus


def yaml_sha256_pcrs(path: Path) -> dict[int, bytes]:
    """The SHA-256 PCRs tpm2_eventlog printed in a vector's .yaml (none for SHA-1 logs)."""
    document = yaml.safe_load(path.read_text())
    bank = document.get("pcrs", {}).get("sha256", {})
    return {int(index): int(value).to_bytes(32, "big") for index, value in bank.items()}


def _vector_case(name: str) -> tuple[TpmEvidence, TrustState]:
    """Evidence carrying a real firmware log, quoted over the PCRs tpm2-tools printed."""
    folder = vectors_dir() / "eventlogs"
    log = (folder / name).read_bytes()
    pcrs = yaml_sha256_pcrs(folder / f"{name}.yaml")
    quoted = {pcr: pcrs.get(pcr, bytes(32)) for pcr in range(10)}
    attest = make_quote(quote_qualifying_data(NONCE, host_key_jwk()), quoted)
    evidence = replace(
        HOST.evidence(),
        pcrs=quoted,
        event_log=log,
        quote_attest=attest,
        quote_signature=soft_sign(HOST.ak, attest),
    )
    return evidence, trust_for(HOST)


def test_a_real_gce_log_verifies_and_its_facts_are_read() -> None:
    evidence, trust = _vector_case("event-gce-ubuntu-2104-log.bin")
    grub_cfg = "(hd0,gpt15)/EFI/ubuntu/grub.cfg"
    result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert result.summary is not None
    # The quote and log verified; this VM booted with secure boot off.
    assert not result.failures
    by_name = {v.policy: v for v in result.verdicts}
    assert by_name["Hgs_SecureBootEnabled"].state is VerdictState.FAILED
    assert by_name["Hgs_UefiDebugDisabled"].state is VerdictState.PASSED
    # Register the digest GRUB measured for a file in PCR 9 as a CI policy: it is found.
    first_file = result.summary.events_in(9)[0]
    assert grub_cfg in first_file.describe()
    trust = replace(trust, ci_policies=(CiPolicy("gce-grub-cfg", first_file.digest),))
    again = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert {v.policy: v for v in again.verdicts}["Hgs_CiPolicy"].state is VerdictState.PASSED


@pytest.mark.parametrize("name", ["event-arch-linux.bin", "event-sd-boot-fedora37.bin"])
def test_real_logs_without_grub_files_cannot_show_a_ci_policy(name: str) -> None:
    evidence, trust = _vector_case(name)
    result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert not result.failures, result.explain()
    verdict = {v.policy: v for v in result.verdicts}["Hgs_CiPolicy"]
    assert verdict.state in (VerdictState.NOT_EVALUABLE, VerdictState.FAILED)
    assert verdict.blocking


def test_a_sha1_only_log_is_refused_in_tpm_mode() -> None:
    evidence, trust = _vector_case("event-uefi-sha1-log.bin")
    result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert result.status is S.INVALID_EVIDENCE
    assert result.failures[0].check == "event-log-format"
    assert "SHA-256" in result.failures[0].reason


def test_quote_vector_ak_is_accepted_as_an_ak() -> None:
    """The real swtpm AKs pass the same AK checks the engine applies."""
    ak = (vectors_dir() / "quotes" / "rsa" / "ak.pub").read_bytes()
    activation_challenge(HOST.ek.public, unmarshal_public2b(ak), b"s" * 32)
