"""End to end: a real HGS over HTTPS attests a host backed by a real swtpm, and a host-key host.

The host side is the product's own client (``guardfab.host.attestation``) driving
its TPM through tpm2-pytss; the HGS is a separate ``guardfab hgs serve`` process.
Registration goes straight to the HGS store here (the admin API has its own tests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from joserfc.jwk import ECKey

import swtpm_harness
from guardfab.attestation.baseline import baseline_from_log
from guardfab.attestation.trust import (
    AttestationMode,
    CiPolicy,
    HostKey,
    TpmHost,
    ek_digest,
)
from guardfab.formats import jose
from guardfab.formats.health_certificate import verify_health_certificate
from guardfab.hgs import registry as reg
from guardfab.hgs.state import HgsState
from guardfab.host.attestation import (
    AttestationRefusedError,
    HgsAttestationClient,
    attest_with_host_key,
    attest_with_tpm,
)
from guardfab.host.tpm import HostTpm
from guardfab.store.audit import AuditLog
from guardfab.store.sqlite import SqliteStore
from hgs_harness import RunningHgs
from swtpm_harness import Swtpm, simulate_measured_boot
from test_attestation_fixtures import CI_POLICY_FILE, Boot

pytestmark = pytest.mark.slow

tpm_factory = swtpm_harness.tpm_factory
start_swtpm = swtpm_harness.start_swtpm

HOST_KEY = jose.public_jwk(ECKey.generate_key("P-384"))
LOG = Boot().log_bytes()


def register(hgs: RunningHgs, puts: list[tuple[str, object]]) -> None:
    """Write trusted state into the running HGS's store, as the admin API would."""
    store = SqliteStore(HgsState(hgs.directory).store_path())
    try:
        reg.Registry.trust_txn(puts).commit(store)
    finally:
        store.close()


@pytest.fixture
def booted_tpm(start_swtpm: Callable[[str], Swtpm]) -> Iterator[HostTpm]:
    """A host TPM whose PCRs hold the golden boot (the log the host will send)."""
    device = start_swtpm("host-a")
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, LOG)
        yield tpm


def register_tpm_host(hgs: RunningHgs, tpm: HostTpm, *, log: bytes = LOG) -> None:
    ek = tpm.read_ek()
    host = TpmHost("host-a", ek_digest(ek.public))
    baseline = baseline_from_log("golden", log)
    ci = CiPolicy("ima-appraise", hashlib.sha256(CI_POLICY_FILE).digest())
    register(hgs, [
        (reg.TPM_HOSTS + host.host_id, host.to_dict()),
        (reg.BASELINES + baseline.name, baseline.to_dict()),
        (reg.CI_POLICIES + ci.digest.hex(), ci.to_dict()),
    ])  # fmt: skip


def signers(hgs: RunningHgs) -> dict[str, jose.AsymmetricKey]:
    key = HgsState(hgs.directory).attestation_signing_key()
    return {jose.thumbprint(key): key}


def test_tpm_host_activates_then_gets_a_health_certificate(
    running_hgs: RunningHgs, booted_tpm: HostTpm
) -> None:
    register_tpm_host(running_hgs, booted_tpm)
    client = HgsAttestationClient(running_hgs.url, Path(running_hgs.ca))
    try:
        answer = attest_with_tpm(client, booted_tpm, host_key=HOST_KEY, event_log=LOG)
        # A second attestation needs no activation: the AK binding persisted.
        again = attest_with_tpm(client, booted_tpm, host_key=HOST_KEY, event_log=LOG)
    finally:
        client.close()
    cert = verify_health_certificate(
        answer.health_certificate, signers(running_hgs), now=answer.expires_at - 3600
    )
    assert cert.host_id == "host-a"
    assert cert.host_key == HOST_KEY
    assert cert.expires_at - cert.issued_at == 8 * 3600
    assert again.body["status"] == "Passed"
    store = SqliteStore(HgsState(running_hgs.directory).store_path())
    try:
        records = list(AuditLog(store).iter_records())
        assert [r.kind for r in records] == [
            "attestation",
            "activation",
            "attestation",
            "attestation",
        ]
        assert [r.outcome for r in records] == ["failure", "success", "success", "success"]
        assert store.list(reg.AK_BINDINGS)
    finally:
        store.close()


def test_pcr_extended_behind_the_logs_back_is_invalid_evidence(
    running_hgs: RunningHgs, booted_tpm: HostTpm
) -> None:
    register_tpm_host(running_hgs, booted_tpm)
    client = HgsAttestationClient(running_hgs.url, Path(running_hgs.ca))
    try:
        attest_with_tpm(client, booted_tpm, host_key=HOST_KEY, event_log=LOG)
        # Something measured after boot that the log does not show.
        booted_tpm.extend(4, {0x000B: hashlib.sha256(b"rootkit").digest()})
        with pytest.raises(AttestationRefusedError) as refused:
            attest_with_tpm(client, booted_tpm, host_key=HOST_KEY, event_log=LOG)
    finally:
        client.close()
    assert refused.value.body["status"] == "InvalidEvidence"
    assert "event-log-replay" in {f["check"] for f in refused.value.body["failures"]}
    assert refused.value.body["health_certificate"] is None


def test_tampered_boot_is_insecure_host_configuration(
    running_hgs: RunningHgs, start_swtpm: Callable[[str], Swtpm]
) -> None:
    device = start_swtpm("host-a")
    tampered = Boot(secure_boot=b"\x00").log_bytes()
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, tampered)
        register_tpm_host(running_hgs, tpm, log=LOG)  # the baseline is the golden boot
        client = HgsAttestationClient(running_hgs.url, Path(running_hgs.ca))
        try:
            with pytest.raises(AttestationRefusedError) as refused:
                attest_with_tpm(client, tpm, host_key=HOST_KEY, event_log=tampered)
        finally:
            client.close()
    body = refused.value.body
    assert body["status"] == "InsecureHostConfiguration"
    assert "Hgs_SecureBootEnabled" in body["failed_policies"]
    assert body["baseline"]["differences"], (
        "the refusal shows the events that differ from the baseline"
    )


def test_boot_measuring_more_than_the_baseline_fails_pcr_baseline(
    running_hgs: RunningHgs, start_swtpm: Callable[[str], Swtpm]
) -> None:
    device = start_swtpm("host-a")
    extended = Boot(extra_app=b"unexpected.efi").log_bytes()
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, extended)
        register_tpm_host(running_hgs, tpm, log=LOG)
        client = HgsAttestationClient(running_hgs.url, Path(running_hgs.ca))
        try:
            with pytest.raises(AttestationRefusedError) as refused:
                attest_with_tpm(client, tpm, host_key=HOST_KEY, event_log=extended)
        finally:
            client.close()
    body = refused.value.body
    assert body["status"] == "InsecureHostConfiguration"
    assert body["failed_policies"] == ["Hgs_PcrBaseline"]
    (difference,) = body["baseline"]["differences"]
    assert (difference["kind"], difference["pcr"]) == ("extra", 4)
    assert difference["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"


def test_unregistered_tpm_is_unauthorized(running_hgs: RunningHgs, booted_tpm: HostTpm) -> None:
    client = HgsAttestationClient(running_hgs.url, Path(running_hgs.ca))
    try:
        with pytest.raises(AttestationRefusedError) as refused:
            attest_with_tpm(client, booted_tpm, host_key=HOST_KEY, event_log=LOG)
    finally:
        client.close()
    assert refused.value.body["status"] == "UnauthorizedHost"


def test_host_key_host_attests(running_hgs: RunningHgs) -> None:
    signing = ECKey.generate_key("P-256")
    key = HostKey(jose.thumbprint(signing), "host-k", jose.public_jwk(signing))
    register(running_hgs, [
        (reg.MODES_KEY, [AttestationMode.HOST_KEY.value]),
        (reg.HOST_KEYS + key.key_id, key.to_dict()),
    ])  # fmt: skip
    client = HgsAttestationClient(running_hgs.url, Path(running_hgs.ca))
    try:
        answer = attest_with_host_key(client, signing, host_key=HOST_KEY)
        with pytest.raises(AttestationRefusedError) as refused:
            attest_with_host_key(client, ECKey.generate_key("P-256"), host_key=HOST_KEY)
    finally:
        client.close()
    cert = verify_health_certificate(
        answer.health_certificate, signers(running_hgs), now=answer.expires_at - 60
    )
    assert (cert.host_id, cert.mode) == ("host-k", "host-key")
    assert refused.value.body["status"] == "UnauthorizedHost"
