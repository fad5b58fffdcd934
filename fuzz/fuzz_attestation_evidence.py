"""Fuzz the attestation evidence loader and the mode verifiers behind it.

Whatever loads must survive a JSON round trip unchanged and then go through its
mode's verifier against a trust state with every mode active and nothing
registered: the loader may only raise InvalidInputError, and a verifier must
never raise at all (it reports). Seeds in ``fuzz/corpus/attestation_evidence``
are one evidence body per mode (TPM with a small boot log, host key, admin
group), made by the software host of tests/test_attestation_fixtures.py.
"""

from __future__ import annotations

import datetime
import json
import sys

import atheris

with atheris.instrument_imports():
    from guardfab.attestation.admin_group_mode import verify_admin_group_evidence
    from guardfab.attestation.evidence import (
        AdminGroupEvidence,
        HostKeyEvidence,
        TpmEvidence,
        evidence_from_dict,
        load_evidence,
    )
    from guardfab.attestation.hostkey_mode import verify_host_key_evidence
    from guardfab.attestation.tpm_mode import verify_tpm_evidence
    from guardfab.attestation.trust import AttestationMode, TrustState

from fuzz_common import expect_only_invalid_input

TRUST = TrustState(modes=frozenset(AttestationMode))
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
NONCE = b"fuzz-nonce"


def _load_and_use(data: bytes) -> None:
    evidence = load_evidence(data)
    again = evidence_from_dict(json.loads(json.dumps(evidence.to_dict())))
    if again != evidence:
        raise AssertionError("evidence does not survive a JSON round trip")
    if isinstance(evidence, TpmEvidence):
        result = verify_tpm_evidence(evidence, TRUST, nonce=NONCE, now=NOW)
    elif isinstance(evidence, HostKeyEvidence):
        result = verify_host_key_evidence(evidence, TRUST, nonce=NONCE, now=NOW)
    elif isinstance(evidence, AdminGroupEvidence):
        result = verify_admin_group_evidence(evidence, TRUST, nonce=NONCE, now=NOW)
    if result.passed:
        raise AssertionError("fuzzed evidence passed against an empty trust state")
    json.dumps(result.to_dict())
    result.explain()


def test_one_input(data: bytes) -> None:
    expect_only_invalid_input(_load_and_use, data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
