"""End to end: the guarded-host agent against real HGS processes, with real swtpm TPMs.

The agent runs in this process (its scheduler thread and its real Unix socket),
with an injected fake clock, so the renewal point and the failback interval are
reached by moving time, not by sleeping; the HGS nodes (``guardfab hgs serve``
over HTTPS, the KPS included) and the TPMs are real processes. The restart test
in test_host_agent_process.py runs the agent as a process of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import swtpm_harness
from guardfab.formats import jose
from guardfab.formats.health_certificate import verify_health_certificate
from guardfab.formats.key_protector import load_key_protector
from guardfab.hgs.state import HgsState
from guardfab.host.agent import GuardedHostAgent
from guardfab.host.config import HostConfig, HostMode
from guardfab.host.keyrelease import KeyReleaseRefusedError
from guardfab.host.keys import load_or_create_key
from guardfab.host.localapi import AgentClient, AgentRequestError
from guardfab.host.service import AgentService, build_agent
from guardfab.host.status import StateFiles
from guardfab.host.tpm import HostTpm
from hgs_harness import RunningHgs
from host_agent_harness import (
    FakeClock,
    audit_kinds,
    ek_public_of,
    grep_tree,
    host_config,
    init_hgs,
    port_of,
    register_host_key,
    register_tpm_host,
    secret_spellings,
    serve_hgs,
)
from pdk_forgeries import SECRET_MARKERS, SECRETS, another_fabric, make_pdk
from swtpm_harness import Swtpm, simulate_measured_boot
from test_attestation_fixtures import Boot
from test_kps_fixtures import Tenant, kps_document

pytestmark = pytest.mark.slow

tpm_factory = swtpm_harness.tpm_factory
start_swtpm = swtpm_harness.start_swtpm

GOLDEN = Boot().log_bytes()
START = 1_900_000_000.0


@pytest.fixture
def hgs_dir(tmp_path: Path) -> Path:
    """An HGS state directory whose health certificates live 60 s (the minimum)."""
    directory = tmp_path / "hgs"
    init_hgs(directory, lifetime=60)
    return directory


@pytest.fixture
def nodes(hgs_dir: Path) -> Iterator[list[RunningHgs]]:
    """HGS nodes serving ``hgs_dir`` (the first one starts now); all stopped at teardown."""
    started = [serve_hgs(hgs_dir)]
    yield started
    for node in started:
        node.stop()


@pytest.fixture
def services() -> Iterator[list[AgentService]]:
    started: list[AgentService] = []
    yield started
    for service in started:
        service.stop()


def booted(start: Callable[[str], Swtpm], name: str, log: bytes = GOLDEN) -> Swtpm:
    """A fresh TPM whose PCRs hold the boot that ``log`` describes."""
    device = start(name)
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, log)
    return device


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def run_agent(
    config: HostConfig, clock: FakeClock, services: list[AgentService]
) -> GuardedHostAgent:
    agent = build_agent(config, clock=clock)
    services.append(AgentService(agent).start())
    return agent


def attested(agent: GuardedHostAgent, count: int) -> Callable[[], bool]:
    """True once the agent finished ``count`` attempts since it started (by last_attempt)."""
    seen: list[float | None] = []

    def check() -> bool:
        last = agent.status().last_attempt
        if last is not None and (not seen or seen[-1] != last):
            seen.append(last)
        return len(seen) >= count

    return check


def attestations(directory: Path) -> list[tuple[str, str]]:
    return [k for k in audit_kinds(directory) if k[0] in ("attestation", "activation")]


def tpm_host(
    tmp_path: Path,
    hgs_dir: Path,
    node: RunningHgs,
    start: Callable[[str], Swtpm],
    name: str,
    *,
    boot: bytes = GOLDEN,
    register: bool = True,
    **changes: object,
) -> HostConfig:
    """A booted swtpm host, registered (golden baseline) unless told otherwise."""
    device = booted(start, name, boot)
    if register:
        register_tpm_host(hgs_dir, name, ek_public_of(device.tcti), GOLDEN)
    return host_config(tmp_path / name, node, tcti=device.tcti, event_log=boot, **changes)


# --------------------------------------------------------------------------- both modes


def test_tpm_host_attests_renews_before_expiry_and_gets_keys(
    tmp_path: Path,
    hgs_dir: Path,
    nodes: list[RunningHgs],
    start_swtpm: Callable[[str], Swtpm],
    services: list[AgentService],
) -> None:
    config = tpm_host(tmp_path, hgs_dir, nodes[0], start_swtpm, "host-a")
    clock = FakeClock(START)
    agent = run_agent(config, clock, services)
    wait_for(lambda: agent.status().attestation_status == "Passed", "the first attestation")
    first = agent.status()
    assert (first.served_by, first.using_fallback) == (nodes[0].url, False)
    assert first.certificate_expires_at == START + 60
    assert first.next_attempt == START + 45, "renewed after 75% of its life"
    assert attestations(hgs_dir) == [
        ("attestation", "failure"),  # ActivationRequired on first contact
        ("activation", "success"),
        ("attestation", "success"),
    ]
    cached = StateFiles(config.state_dir).load_certificate()
    assert cached is not None
    signer = HgsState(hgs_dir).attestation_signing_key()
    cert = verify_health_certificate(
        cached.token, {jose.thumbprint(signer): signer}, now=time.time()
    )
    assert cert.host_id == "host-a"
    assert cert.host_key == jose.public_jwk(load_or_create_key(config.encryption_key))

    clock.advance(44)
    time.sleep(0.2)
    assert len(attestations(hgs_dir)) == 3, "nothing happens before the renewal point"
    clock.advance(2)
    wait_for(lambda: len(attestations(hgs_dir)) == 4, "the renewal")
    wait_for(lambda: agent.status().last_success == START + 46, "the renewal's status")
    assert agent.status().certificate_expires_at == START + 46 + 60
    assert attestations(hgs_dir)[-1] == ("attestation", "success"), "the AK is not activated again"

    tenant = Tenant()
    kp = tenant.kp(kps_document(nodes[0]))
    keys = AgentClient(config.socket).release(kp)
    assert keys.old_transport_key == load_key_protector(kp).unwrap(tenant.owner)
    assert keys.new_transport_key != keys.old_transport_key
    assert load_key_protector(keys.egress_kp).generation == 1


def test_host_key_host_attests_and_gets_keys(
    tmp_path: Path, hgs_dir: Path, nodes: list[RunningHgs], services: list[AgentService]
) -> None:
    config = host_config(tmp_path / "host-k", nodes[0], mode=HostMode.HOST_KEY)
    assert config.signing_key is not None
    register_host_key(hgs_dir, "host-k", load_or_create_key(config.signing_key))
    agent = run_agent(config, FakeClock(START), services)
    wait_for(lambda: agent.status().attestation_status == "Passed", "attestation")
    assert agent.status().ak_name is None
    tenant = Tenant()
    kp = tenant.kp(kps_document(nodes[0]))
    keys = AgentClient(config.socket).release(kp)
    assert keys.old_transport_key == load_key_protector(kp).unwrap(tenant.owner)


def test_the_agent_has_the_kps_open_a_pdk_for_provisioning(
    tmp_path: Path,
    hgs_dir: Path,
    nodes: list[RunningHgs],
    services: list[AgentService],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What provisioning calls: the KPS, a guardian of the PDK, opens it for this host."""
    caplog.set_level(logging.DEBUG)
    config = host_config(tmp_path / "host-p", nodes[0], mode=HostMode.HOST_KEY)
    assert config.signing_key is not None
    register_host_key(hgs_dir, "host-p", load_or_create_key(config.signing_key))
    agent = run_agent(config, FakeClock(START), services)
    owner = Tenant().owner
    pdk = make_pdk(owner, kps_document(nodes[0]))

    assert agent.open_shielding_data(pdk) == SECRETS  # attests on demand if it must

    assert ("shielding-data-open", "granted") in audit_kinds(hgs_dir)
    assert grep_tree(tmp_path / "host-p", list(SECRET_MARKERS)) == []
    assert not any(marker in caplog.text.encode() for marker in SECRET_MARKERS)
    with pytest.raises(KeyReleaseRefusedError) as refused:
        agent.open_shielding_data(another_fabric(pdk, owner))
    assert (refused.value.status, refused.value.reason) == (404, "pdk-for-another-fabric")
    assert audit_kinds(hgs_dir)[-1] == ("shielding-data-open", "refused")


# --------------------------------------------------------------------------- refusals


def test_extra_boot_measurement_is_insecure_host_configuration_and_gets_no_keys(
    tmp_path: Path,
    hgs_dir: Path,
    nodes: list[RunningHgs],
    start_swtpm: Callable[[str], Swtpm],
    services: list[AgentService],
) -> None:
    extended = Boot(extra_app=b"unexpected.efi").log_bytes()
    config = tpm_host(tmp_path, hgs_dir, nodes[0], start_swtpm, "host-a", boot=extended)
    agent = run_agent(config, FakeClock(START), services)
    wait_for(lambda: agent.status().attestation_status != "NotAttested", "attestation")
    status = agent.status()
    assert status.attestation_status == "InsecureHostConfiguration"
    assert status.sub_status == ["Hgs_PcrBaseline"]
    assert "Hgs_PcrBaseline" in {f["check"] for f in status.failures}
    assert not status.is_guarded(START)
    assert StateFiles(config.state_dir).load_certificate() is None
    with pytest.raises(AgentRequestError) as refused:
        AgentClient(config.socket).release(Tenant().kp(kps_document(nodes[0])))
    assert refused.value.type == "HostNotGuardedError"
    assert "InsecureHostConfiguration (Hgs_PcrBaseline)" in str(refused.value)


def test_unregistered_tpm_is_unauthorized_host(
    tmp_path: Path,
    hgs_dir: Path,
    nodes: list[RunningHgs],
    start_swtpm: Callable[[str], Swtpm],
    services: list[AgentService],
) -> None:
    config = tpm_host(tmp_path, hgs_dir, nodes[0], start_swtpm, "host-a", register=False)
    clock = FakeClock(START)
    agent = run_agent(config, clock, services)
    wait_for(lambda: agent.status().attestation_status != "NotAttested", "attestation")
    status = agent.status()
    assert status.attestation_status == "UnauthorizedHost"
    assert status.consecutive_failures == 1
    assert START + 0.75 <= (status.next_attempt or 0) <= START + 1, "retried after backoff"
    clock.advance(1)
    wait_for(lambda: agent.status().consecutive_failures == 2, "the retry")
    assert START + 2.5 <= (agent.status().next_attempt or 0) <= START + 3, "the delay doubles"


# --------------------------------------------------------------------------- fallback


def test_primary_stops_the_agent_goes_on_through_the_fallback_and_comes_back(
    tmp_path: Path,
    hgs_dir: Path,
    nodes: list[RunningHgs],
    start_swtpm: Callable[[str], Swtpm],
    services: list[AgentService],
) -> None:
    nodes.append(serve_hgs(hgs_dir))  # a second node over the same store
    primary, fallback = nodes
    config = tpm_host(tmp_path, hgs_dir, primary, start_swtpm, "host-a", fallback=fallback)
    clock = FakeClock(START)
    agent = run_agent(config, clock, services)
    wait_for(lambda: agent.status().attestation_status == "Passed", "attestation")
    assert agent.status().served_by == primary.url

    primary.stop()
    clock.advance(46)
    wait_for(lambda: agent.status().last_attempt == START + 46, "the renewal")
    status = agent.status()
    assert (status.attestation_status, status.served_by) == ("Passed", fallback.url)
    assert status.using_fallback
    kp = Tenant().kp(kps_document(fallback))
    assert AgentClient(config.socket).release(kp).egress_kp, "keys come from the fallback KPS"

    nodes[0] = serve_hgs(hgs_dir, port=port_of(primary))  # the primary is back
    clock.advance(agent.next_attempt() - clock.now())  # 45 s later: still within failback_after
    wait_for(lambda: agent.status().last_attempt == START + 91, "the next renewal")
    assert agent.status().served_by == fallback.url
    clock.advance(config.retry.failback_after)
    wait_for(lambda: agent.status().served_by == primary.url, "the failback")
    assert not agent.status().using_fallback


# --------------------------------------------------------------------------- two hosts


def test_two_agents_on_one_machine_keep_their_own_tpms(
    tmp_path: Path,
    hgs_dir: Path,
    nodes: list[RunningHgs],
    start_swtpm: Callable[[str], Swtpm],
    services: list[AgentService],
) -> None:
    configs = [tpm_host(tmp_path, hgs_dir, nodes[0], start_swtpm, n) for n in ("host-a", "host-b")]
    agents = [run_agent(config, FakeClock(START), services) for config in configs]
    for agent in agents:
        wait_for(lambda a=agent: a.status().attestation_status == "Passed", "attestation")
    signer = HgsState(hgs_dir).attestation_signing_key()
    hosts = []
    for config in configs:
        cached = StateFiles(config.state_dir).load_certificate()
        assert cached is not None
        cert = verify_health_certificate(
            cached.token, {jose.thumbprint(signer): signer}, now=time.time()
        )
        hosts.append((cert.host_id, cert.host_key))
    assert hosts == [
        ("host-a", jose.public_jwk(load_or_create_key(configs[0].encryption_key))),
        ("host-b", jose.public_jwk(load_or_create_key(configs[1].encryption_key))),
    ]
    names = [AgentClient(c.socket).status().ak_name for c in configs]
    assert names[0]
    assert names[1]
    assert names[0] != names[1]
    kinds = attestations(hgs_dir)
    assert kinds.count(("activation", "success")) == 2


# --------------------------------------------------------------------------- secrets


def test_key_material_never_reaches_status_files_or_logs(
    tmp_path: Path,
    hgs_dir: Path,
    nodes: list[RunningHgs],
    start_swtpm: Callable[[str], Swtpm],
    services: list[AgentService],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = tpm_host(tmp_path, hgs_dir, nodes[0], start_swtpm, "host-a")
    agent = run_agent(config, FakeClock(START), services)
    wait_for(lambda: agent.status().attestation_status == "Passed", "attestation")
    keys = AgentClient(config.socket).release(Tenant().kp(kps_document(nodes[0])))
    secrets = [keys.old_transport_key.reveal(), keys.new_transport_key.reveal()]
    needles = [s for secret in secrets for s in secret_spellings(secret)]
    assert grep_tree(tmp_path / "host-a", needles) == []
    log_text = caplog.text.encode()
    assert caplog.records, "the agent logs"
    assert not any(needle in log_text for needle in needles)
    assert "released" in caplog.text
    assert (config.socket.stat().st_mode & 0o777, config.socket.parent.stat().st_mode & 0o777) == (
        0o600,
        0o700,
    )
    status_file = StateFiles(config.state_dir).status_path.read_bytes()
    cached = StateFiles(config.state_dir).load_certificate()
    assert cached is not None
    assert cached.token.encode() not in status_file
