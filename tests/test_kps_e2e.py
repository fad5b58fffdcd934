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
from guardfab.formats.guardian import load_guardian_document
from guardfab.formats.key_protector import load_key_protector
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


def test_rotation_needs_no_owner_and_survives_a_restore(tmp_path: Path) -> None:
    hgs = start_hgs(tmp_path / "hgs")
    try:
        host, owner, kp_b, egress_b1 = _rotation(hgs)
    finally:
        hgs.stop()
    _restore_drill(hgs, tmp_path, host, owner, kp_b, egress_b1)


def _kps_generation(kp: bytes, kps_id: str) -> int:
    return load_key_protector(kp).guardian(kps_id).key_generation


def _release(hgs: RunningHgs, host: Host, cert: str, kp: bytes) -> bytes:
    """A release through the product's host client: it checks the egress against ``kp``."""
    return request_release(hgs.url, Path(hgs.ca), cert, kp, host.encryption)[2]


def _on_old_keys(hgs: RunningHgs) -> list[tuple[str, int]]:
    rows = admin(hgs, "GET", "/admin/v1/kps/report")["on_old_keys"]
    return sorted((r["kp_id"], r["key_generation"]) for r in rows)


def _rotation(hgs: RunningHgs) -> tuple[Host, Tenant, bytes, bytes]:
    enable_modes(hgs, AttestationMode.HOST_KEY)
    host, cert = attested_host(hgs)
    tenant = Tenant()
    first_document = kps_document(hgs)
    kps_id = load_guardian_document(first_document).id
    kp_a, kp_b = tenant.kp(first_document), tenant.kp(first_document)
    egress_a1, egress_b1 = _release(hgs, host, cert, kp_a), _release(hgs, host, cert, kp_b)
    assert _kps_generation(egress_a1, kps_id) == 0

    # Rotate: a new encryption key for the same guardian, staged, then made current.
    staged = admin(hgs, "POST", "/admin/v1/kps/keys", json={})
    assert (staged["id"], staged["key_generation"], staged["current"]) == (kps_id, 1, False)
    assert load_guardian_document(kps_document(hgs)).key_generation == 0, "not published yet"
    made = admin(hgs, "POST", f"/admin/v1/kps/keys/{kps_id}/make-primary", json={})
    assert made == {"primary": kps_id, "key_generation": 1}
    published = load_guardian_document(kps_document(hgs))
    assert (published.id, published.key_generation) == (kps_id, 1)
    ids = [load_key_protector(k).kp_id for k in (kp_a, kp_b)]
    assert _on_old_keys(hgs) == sorted((i, 0) for i in ids)

    # The next release moves the KP to key 2 with no tenant action; the host checked it.
    egress_a2 = _release(hgs, host, cert, egress_a1)
    moved = load_key_protector(egress_a2, expected_owner=tenant.owner.guardian.id)
    assert (moved.version, moved.signer, _kps_generation(egress_a2, kps_id)) == (2, kps_id, 1)
    assert moved.guardian(kps_id).encryption_kid == published.encryption_kid
    assert moved.unwrap(tenant.owner), "the owner still unwraps the moved KP"
    assert _on_old_keys(hgs) == [(ids[1], 0)], "listed on key 1 until its next release"
    for old in (kp_a, egress_a1):
        with pytest.raises(KeyReleaseRefusedError) as refused:
            _release(hgs, host, cert, old)
        assert (refused.value.status, refused.value.reason) == (409, "rollback")
    assert _kps_generation(_release(hgs, host, cert, egress_a2), kps_id) == 1
    return host, tenant, kp_b, egress_b1


def _restore_drill(
    hgs: RunningHgs, tmp_path: Path, host: Host, owner: Tenant, kp_b: bytes, egress_b1: bytes
) -> None:
    """Back up the rotated HGS, restore it fresh: key 1 still unwraps, key 2 is current."""
    key_file, backup = tmp_path / "backup.key", tmp_path / "hgs.backup"
    runner = CliRunner()
    exported = runner.invoke(cli, ["hgs", "export-state", "--dir", str(hgs.directory),
                                   "--out", str(backup), "--key-file", str(key_file),
                                   "--new-key-file"])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    imported = runner.invoke(cli, ["hgs", "import-state", "--dir", str(tmp_path / "restored"),
                                   "--in", str(backup), "--key-file", str(key_file)])  # fmt: skip
    assert imported.exit_code == 0, imported.output
    restored = start_hgs(tmp_path / "restored", init=False)
    try:
        cert = host.attest(restored)
        kps_id = load_key_protector(egress_b1).signer
        egress_b2 = _release(restored, host, cert, egress_b1)
        assert _kps_generation(egress_b2, kps_id) == 1
        assert load_key_protector(egress_b2).unwrap(owner.owner)
        assert _on_old_keys(restored) == []
        with pytest.raises(KeyReleaseRefusedError) as refused:
            _release(restored, host, cert, kp_b)
        assert refused.value.reason == "rollback"
    finally:
        restored.stop()


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


def _copy_of_kp_id(kp: bytes, generation: int) -> bytes:
    """A KP of the attacker's own (own owner key) that copies ``kp``'s kp_id at ``generation``.

    A kp_id is a label anyone who saw the KP file can copy; the attacker signs as its own owner.
    """
    from guardfab.formats import key_protector as kpf  # noqa: PLC0415 -- private minting, for the attack

    victim = load_key_protector(kp)
    attacker = Tenant().owner
    own_doc = kpf.sign_guardian_document(attacker.guardian, attacker.signing_key).decode("ascii")
    members = [kpf._Member(attacker.guardian, own_doc)]
    for guardian, document in zip(victim.guardians, victim.documents, strict=True):
        if guardian.id != victim.owner:
            members = kpf._with_member(members, kpf._Member(guardian, document))
    draft = kpf._Draft(victim.kp_id, generation, attacker.guardian.id, members)
    return kpf._mint_as_owner(draft, attacker, kpf.TransportKey.generate())


def test_a_copied_kp_id_under_another_owner_cannot_spend_the_real_kps_generations(
    hgs: RunningHgs,
) -> None:
    host, cert = attested_host(hgs, "host-copier")
    real = Tenant().kp(kps_document(hgs))
    copy = _copy_of_kp_id(real, 1_000_000)
    assert load_key_protector(copy).kp_id == load_key_protector(real).kp_id
    # The copy is a valid KP of its own owner: released, and counted apart ...
    request_release(hgs.url, Path(hgs.ca), cert, copy, host.encryption)
    # ... so the real KP's generation 0 is no rollback, and its chain goes on.
    _current, _new, egress = request_release(hgs.url, Path(hgs.ca), cert, real, host.encryption)
    assert load_key_protector(egress).generation == 1
    with pytest.raises(KeyReleaseRefusedError) as refused:
        request_release(hgs.url, Path(hgs.ca), cert, real, host.encryption)
    assert (refused.value.status, refused.value.reason) == (409, "rollback")


def test_a_counter_written_before_owners_counted_still_refuses_older_generations(
    hgs: RunningHgs,
) -> None:
    """Stores from before the per-owner counter hold kps/generations/<kp_id>: still enforced."""
    from guardfab.hgs.kps_config import GENERATIONS  # noqa: PLC0415
    from guardfab.hgs.registry import encode  # noqa: PLC0415
    from guardfab.store.sqlite import SqliteStore  # noqa: PLC0415

    host, cert = attested_host(hgs, "host-legacy")
    kp = Tenant().kp(kps_document(hgs))
    store = SqliteStore(hgs.directory / "state.db")
    try:
        store.put(GENERATIONS + load_key_protector(kp).kp_id, encode({"generation": 3, "at": 0}))
    finally:
        store.close()
    with pytest.raises(KeyReleaseRefusedError) as refused:
        request_release(hgs.url, Path(hgs.ca), cert, kp, host.encryption)
    assert (refused.value.status, refused.value.reason) == (409, "rollback")
