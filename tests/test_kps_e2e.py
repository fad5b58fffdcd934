"""End to end: a real HGS releases a tenant's KP to hosts that attested, over HTTPS.

The tenant uses the tenant CLI (guardian import of the published KPS metadata,
``kp new``); hosts attest for real (host-key mode, and one TPM host on swtpm);
the host side is the product's own client (:mod:`guardfab.host.keyrelease`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import swtpm_harness
from guardfab.attestation.trust import AttestationMode
from guardfab.cli.main import cli
from guardfab.formats.key_protector import grant, load_key_protector
from guardfab.hgs.kps_keys import KpsKeyDirectory
from guardfab.host.attestation import HgsAttestationClient, attest_with_tpm
from guardfab.host.keyrelease import KeyReleaseRefusedError, request_release
from guardfab.host.tpm import HostTpm
from guardfab.tenant.guardians import GuardianStore
from hgs_harness import RunningHgs, start_hgs
from swtpm_harness import Swtpm, simulate_measured_boot
from test_hgs_attestation_e2e import LOG, register_tpm_host
from test_kps_fixtures import (
    Host,
    Tenant,
    admin,
    attested_host,
    enable_modes,
    kps_document,
    post_release,
    releases,
)

pytestmark = pytest.mark.slow

tpm_factory = swtpm_harness.tpm_factory
start_swtpm = swtpm_harness.start_swtpm


@pytest.fixture(scope="module")
def hgs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHgs]:
    running = start_hgs(tmp_path_factory.mktemp("kps") / "hgs")
    enable_modes(running, AttestationMode.HOST_KEY, AttestationMode.TPM)
    try:
        yield running
    finally:
        running.stop()


def _cli(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--home", str(home)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_tenant_imports_the_metadata_and_an_attested_host_gets_the_keys(
    hgs: RunningHgs, tmp_path: Path
) -> None:
    metadata = admin(hgs, "GET", "/keyprotection/v1/metadata")
    primary = metadata["guardians"][0]
    assert (metadata["primary"], primary["primary"]) == (primary["id"], True)
    document = tmp_path / "fabric.jws"
    document.write_bytes(kps_document(hgs))
    home = tmp_path / "home"
    _cli(home, "tenant", "guardian", "new", "owner", "--algorithm", "ec-p256")
    _cli(home, "tenant", "guardian", "import", str(document), "--expect-id", primary["id"],
         "--name", "fabric")  # fmt: skip
    _cli(home, "tenant", "kp", "new", "--owner", "owner", "--guardian", "fabric",
         "--out", str(tmp_path / "vm.kp"))  # fmt: skip
    kp = (tmp_path / "vm.kp").read_bytes()
    transport = load_key_protector(kp).unwrap(GuardianStore(home).keys("owner"))

    host, cert = attested_host(hgs, "host-tenant")
    current, new, egress = request_release(hgs.url, Path(hgs.ca), cert, kp, host.encryption)

    assert current == transport
    assert new != transport
    egress_kp = load_key_protector(egress, expected_owner=load_key_protector(kp).owner)
    assert (egress_kp.generation, egress_kp.signer) == (1, primary["id"])
    record = releases(hgs)[-1]
    assert (record.outcome, record.actor, record.subject) == (
        "granted",
        "host-tenant",
        egress_kp.kp_id,
    )
    assert record.details["egress_generation"] == 1


def test_refused_to_a_host_that_did_not_attest(hgs: RunningHgs) -> None:
    kp = Tenant().kp(kps_document(hgs))
    stranger = Host("host-stranger")  # never registered, never attested
    with pytest.raises(KeyReleaseRefusedError) as no_cert:
        request_release(hgs.url, Path(hgs.ca), "", kp, stranger.encryption)
    assert (no_cert.value.status, no_cert.value.reason) == (401, "certificate-invalid")
    response = post_release(hgs, "e30.e30.", kp)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("HealthCertificate")
    assert [r.outcome for r in releases(hgs)[-2:]] == ["refused", "refused"]


def test_rekeyed_on_every_release_and_older_kps_refused(hgs: RunningHgs) -> None:
    host, cert = attested_host(hgs, "host-chain")
    kp = Tenant().kp(kps_document(hgs))
    chain, keys = [kp], []
    for generation in (1, 2, 3):
        current, new, egress = request_release(
            hgs.url, Path(hgs.ca), cert, chain[-1], host.encryption
        )
        assert load_key_protector(egress).generation == generation
        keys.append((current, new))
        chain.append(egress)
    for (_, new), (current, _) in itertools.pairwise(keys):
        assert current == new, "each release opens what the previous one re-keyed to"
    assert len({k.reveal() for pair in keys for k in pair}) == 4
    for old in chain[:-1]:
        with pytest.raises(KeyReleaseRefusedError) as refused:
            request_release(hgs.url, Path(hgs.ca), cert, old, host.encryption)
        assert (refused.value.status, refused.value.reason) == (409, "rollback")


def test_concurrent_releases_of_one_generation_mint_one_egress(hgs: RunningHgs) -> None:
    _host, cert = attested_host(hgs, "host-race")
    kp = Tenant().kp(kps_document(hgs))
    statuses: list[int] = []
    barrier = threading.Barrier(4)

    def attempt() -> None:
        barrier.wait()
        statuses.append(post_release(hgs, cert, kp).status_code)

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 409, 409, 409]


def test_rotation_keeps_old_kps_working_and_the_report_lists_them(
    tmp_path: Path,
) -> None:
    hgs = start_hgs(tmp_path / "hgs")
    try:
        _rotation(hgs)
    finally:
        hgs.stop()


def _rotation(hgs: RunningHgs) -> None:
    enable_modes(hgs, AttestationMode.HOST_KEY)
    host, cert = attested_host(hgs)
    tenant = Tenant()
    old_document = kps_document(hgs)
    old_kp = tenant.kp(old_document)
    old_id = admin(hgs, "GET", "/keyprotection/v1/metadata")["primary"]

    added = admin(hgs, "POST", "/admin/v1/kps/keys", json={"make_primary": True, "name": "kps-2"})
    metadata = admin(hgs, "GET", "/keyprotection/v1/metadata")
    assert [g["id"] for g in metadata["guardians"]] == [added["id"], old_id]
    assert KpsKeyDirectory.of_state(hgs.directory).ids() == sorted([old_id, added["id"]])

    # The old KP still unwraps under the old key; its egress stays on the guardian it names.
    _, _, egress = request_release(hgs.url, Path(hgs.ca), cert, old_kp, host.encryption)
    assert load_key_protector(egress).signer == old_id
    report = admin(hgs, "GET", "/admin/v1/kps/report")
    assert report["primary"] == added["id"]
    assert [(r["kp_id"], r["kps_key"]) for r in report["on_old_keys"]] == [
        (load_key_protector(old_kp).kp_id, old_id)
    ]

    # The owner grants the new guardian; from then on releases use the primary key.
    moved = grant(load_key_protector(egress), tenant.owner, kps_document(hgs))
    _, _, egress = request_release(hgs.url, Path(hgs.ca), cert, moved, host.encryption)
    assert load_key_protector(egress).signer == added["id"]
    assert admin(hgs, "GET", "/admin/v1/kps/report")["on_old_keys"] == []
    # A KP made for the new primary alone is released too.
    fresh = tenant.kp(kps_document(hgs))
    assert request_release(hgs.url, Path(hgs.ca), cert, fresh, host.encryption)


@pytest.fixture
def booted_tpm(start_swtpm: Callable[[str], Swtpm]) -> Iterator[HostTpm]:
    device = start_swtpm("host-a")
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, LOG)
        yield tpm


def test_tpm_host_gets_the_keys(hgs: RunningHgs, booted_tpm: HostTpm) -> None:
    register_tpm_host(hgs, booted_tpm)
    host = Host("host-a")
    client = HgsAttestationClient(hgs.url, Path(hgs.ca))
    try:
        answer = attest_with_tpm(client, booted_tpm, host_key=host.public_key(), event_log=LOG)
    finally:
        client.close()
    tenant = Tenant()
    kp = tenant.kp(kps_document(hgs))
    current, _, egress = request_release(
        hgs.url, Path(hgs.ca), answer.health_certificate, kp, host.encryption
    )
    assert current == load_key_protector(kp).unwrap(tenant.owner)
    assert load_key_protector(egress).generation == 1
    assert releases(hgs)[-1].actor == "host-a"
