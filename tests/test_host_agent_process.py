"""The agent as the systemd unit runs it: ``guardfab host agent``, a process of its own.

It is configured with ``guardfab host configure``, tells systemd it is ready
(a real NOTIFY_SOCKET), attests with a real swtpm to a real HGS, serves keys from
the real KPS, is killed as by a crash, and comes back without anybody's help:
the cached certificate and the persisted AK are reused, nothing is activated
again, and its log holds no key.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import swtpm_harness
from guardfab.cli.main import cli
from guardfab.formats.key_protector import load_key_protector
from guardfab.host.config import load_config
from guardfab.host.localapi import AgentClient
from guardfab.host.status import StateFiles
from guardfab.host.tpm import HostTpm
from hgs_harness import RunningHgs, start_hgs
from host_agent_harness import audit_kinds, register_tpm_host, secret_spellings
from swtpm_harness import Swtpm, simulate_measured_boot
from test_attestation_fixtures import Boot
from test_kps_fixtures import Tenant, kps_document

pytestmark = pytest.mark.slow

tpm_factory = swtpm_harness.tpm_factory
start_swtpm = swtpm_harness.start_swtpm

GOLDEN = Boot().log_bytes()


class AgentProcess:
    """``guardfab host agent`` with its own NOTIFY_SOCKET and log file."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.log = workdir / "agent.log"
        self.notify_path = workdir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(30)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> list[str]:
        """Start it and return what it told systemd until READY=1."""
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path))
        command = [sys.executable, "-m", "guardfab", "host", "agent", "--config", str(self.config)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        messages = []
        while "READY=1" not in messages:
            messages.append(self.notify.recv(4096).decode())
        return messages

    def stop(self, sig: int = signal.SIGTERM) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(sig)
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        self.notify.close()


@pytest.fixture
def hgs(tmp_path: Path) -> Iterator[RunningHgs]:
    running = start_hgs(tmp_path / "hgs")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[[Path], AgentProcess]]:
    made: list[AgentProcess] = []

    def make(config: Path) -> AgentProcess:
        made.append(AgentProcess(config, tmp_path))
        return made[-1]

    yield make
    for agent in made:
        agent.close()


def configure(tmp_path: Path, hgs: RunningHgs, device: Swtpm) -> Path:
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes(GOLDEN)
    config = tmp_path / "etc" / "host.json"
    result = CliRunner().invoke(
        cli,
        [
            "host",
            "configure",
            "--config",
            str(config),
            "--mode",
            "tpm",
            "--attestation-url",
            hgs.url,
            "--key-protection-url",
            hgs.url,
            "--ca",
            hgs.ca,
            "--tcti",
            device.tcti,
            "--event-log",
            str(log),
            "--state-dir",
            str(tmp_path / "state"),
            "--socket",
            str(tmp_path / "run" / "agent.sock"),
        ],
    )
    assert result.exit_code == 0, result.output
    return config


def test_agent_process_recovers_from_a_crash_without_admin_action(
    tmp_path: Path,
    hgs: RunningHgs,
    start_swtpm: Callable[[str], Swtpm],
    agent_process: Callable[[Path], AgentProcess],
) -> None:
    device = start_swtpm("host-a")
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, GOLDEN)
        register_tpm_host(hgs.directory, "host-a", tpm.read_ek().public, GOLDEN)
    config_path = configure(tmp_path, hgs, device)
    config = load_config(config_path)
    agent = agent_process(config_path)
    assert agent.start() == ["READY=1"]
    client = AgentClient(config.socket)
    _wait(lambda: client.status().attestation_status == "Passed")
    before = client.status()
    tenant = Tenant()
    kp = tenant.kp(kps_document(hgs))
    keys = client.release(kp)
    assert keys.old_transport_key == load_key_protector(kp).unwrap(tenant.owner)
    records = audit_kinds(hgs.directory)
    assert records.count(("activation", "success")) == 1

    agent.stop(signal.SIGKILL)  # a crash: the socket file stays behind
    assert config.socket.exists()
    assert agent.start() == ["READY=1"]
    after = client.status()
    assert after.attestation_status == "Passed"
    assert after.last_success == before.last_success, "the cached certificate is reused"
    assert after.certificate_expires_at == before.certificate_expires_at
    assert after.ak_name == before.ak_name
    keys = client.release(keys.egress_kp)
    assert load_key_protector(keys.egress_kp).generation == 2
    assert audit_kinds(hgs.directory)[len(records) :] == [("key-release", "granted")], (
        "no attestation and no activation after the restart"
    )

    result = CliRunner().invoke(cli, ["host", "attest", "--config", str(config_path), "--json"])
    assert result.exit_code == 0, result.output
    assert '"agent_running": true' in result.output
    new = [k for k in audit_kinds(hgs.directory) if k[0] in ("attestation", "activation")]
    assert new[-1] == ("attestation", "success")
    assert new.count(("activation", "success")) == 1, "the persisted AK needs no activation"

    assert agent.stop() == 0
    assert not config.socket.exists()
    secrets = [k.reveal() for k in (keys.old_transport_key, keys.new_transport_key)]
    log = agent.log.read_bytes()
    assert b"attestation Passed" in log
    assert not any(s in log for secret in secrets for s in secret_spellings(secret))
    cached = StateFiles(config.state_dir).load_certificate()
    assert cached is not None


def _wait(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
