"""``guardfab host diagnose``: a healthy host passes; each broken piece FAILs with its fix.

Real swtpm, real HGS over HTTPS (and a second HGS whose CA this host does not
trust, for the TLS failure); the broken pieces are made the way they break on
real hosts: a TPM that is not there, a PCR extended behind the log's back, a key
file others can read, an HGS that is down, a clock that is off.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import swtpm_harness
from guardfab.cli.main import cli
from guardfab.diagnostics import Status
from guardfab.host.config import HgsSite, HostConfig, HostMode, save_config
from guardfab.host.diagnose import check_clock, run_checks
from guardfab.host.status import StateFiles
from guardfab.host.tpm import HostTpm
from hgs_harness import RunningHgs, start_hgs
from host_agent_harness import host_config
from swtpm_harness import Swtpm, simulate_measured_boot
from test_attestation_fixtures import CI_POLICY_FILE, Boot

pytestmark = pytest.mark.slow

tpm_factory = swtpm_harness.tpm_factory
start_swtpm = swtpm_harness.start_swtpm

GOLDEN = Boot().log_bytes()


@pytest.fixture(scope="module")
def hgs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHgs]:
    running = start_hgs(tmp_path_factory.mktemp("diagnose") / "hgs")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def healthy(tmp_path: Path, hgs: RunningHgs, start_swtpm: Callable[[str], Swtpm]) -> HostConfig:
    """A TPM host whose TPM, log, CI policy, keys and HGS are all right."""
    device = start_swtpm("host-a")
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, GOLDEN)
    policy = tmp_path / "ima-policy"
    policy.write_bytes(CI_POLICY_FILE)
    config = host_config(
        tmp_path / "host", hgs, tcti=device.tcti, event_log=GOLDEN, ci_policy=policy
    )
    StateFiles(config.state_dir).ensure()  # as 'host configure' does
    return config


def results(config: HostConfig, now: float | None = None) -> dict[str, tuple[Status, str, str]]:
    checks = run_checks(config, (lambda: now) if now is not None else time.time)
    return {c.name: (c.status, c.message, c.fix) for c in checks}


def cli_diagnose(config: HostConfig, tmp_path: Path) -> tuple[int, dict[str, object]]:
    path = tmp_path / "host.json"
    save_config(path, config)
    result = CliRunner().invoke(cli, ["host", "diagnose", "--config", str(path), "--json"])
    return result.exit_code, json.loads(result.output)


def test_a_healthy_host_passes_every_check(healthy: HostConfig, tmp_path: Path) -> None:
    found = results(healthy)
    passed = {name for name, (outcome, _, _) in found.items() if outcome is Status.OK}
    assert passed == {
        "hgs-ca",
        "host-encryption-key",
        "state-dir",
        "tpm",
        "ek",
        "ak",
        "pcr-bank",
        "event-log",
        "log-replay",
        "ci-policy",
        "hgs",
        "clock",
    }
    assert found["hgs-fallback"][0] is Status.SKIP
    assert found["agent"][0] is Status.WARN, "no agent runs in this test"
    assert "systemctl enable --now guardfab-host-agent" in found["agent"][2]
    assert hashlib.sha256(CI_POLICY_FILE).hexdigest() in found["ci-policy"][1]
    code, report = cli_diagnose(healthy, tmp_path)
    assert code == 0
    assert report["ok"] is True
    checks = report["checks"]
    assert isinstance(checks, list)
    assert checks[0] == {
        "check": "config",
        "status": "OK",
        "message": checks[0]["message"],
        "fix": "",
    }


def test_an_unreachable_tpm_fails_with_the_fix(healthy: HostConfig, tmp_path: Path) -> None:
    found = results(replace(healthy, tcti="swtpm:host=127.0.0.1,port=1"))
    outcome, detail, fix = found["tpm"]
    assert outcome is Status.FAIL
    assert "cannot open the TPM" in detail
    assert "start the TPM simulator" in fix
    device = results(replace(healthy, tcti="device:/dev/tpmrm9"))["tpm"]
    assert device[0] is Status.FAIL
    assert "modprobe tpm_crb" in device[2]
    code, report = cli_diagnose(replace(healthy, tcti="swtpm:host=127.0.0.1,port=1"), tmp_path)
    assert code == 1
    assert report["ok"] is False


def test_a_pcr_extended_behind_the_logs_back_fails_the_replay(healthy: HostConfig) -> None:
    with HostTpm(healthy.tcti) as tpm:
        tpm.extend(4, {0x000B: hashlib.sha256(b"rootkit").digest()})
    outcome, detail, fix = results(healthy)["log-replay"]
    assert outcome is Status.FAIL
    assert "PCR(s) [4] differ" in detail
    assert "InvalidEvidence" in fix


def test_log_and_ci_policy_problems(healthy: HostConfig, tmp_path: Path) -> None:
    missing = results(replace(healthy, event_log=tmp_path / "nothing"))["event-log"]
    assert missing[0] is Status.FAIL
    assert "securityfs" in missing[2]
    other_policy = tmp_path / "other-policy"
    other_policy.write_bytes(b"measure func=FILE_CHECK\n")
    unmeasured = results(replace(healthy, ci_policy=other_policy))["ci-policy"]
    assert unmeasured[0] is Status.WARN
    assert "hgs ci-policy add" in unmeasured[2]


def test_a_key_others_can_read_fails(healthy: HostConfig) -> None:
    healthy.encryption_key.chmod(0o644)
    outcome, detail, fix = results(healthy)["host-encryption-key"]
    assert outcome is Status.FAIL
    assert "readable by group or others" in detail
    assert fix == f"chmod 600 {healthy.encryption_key}"


def test_hgs_down_untrusted_tls_and_fallback(
    healthy: HostConfig, hgs: RunningHgs, tmp_path: Path
) -> None:
    other = start_hgs(tmp_path / "other-hgs")  # a different CA
    try:
        config = replace(
            healthy, primary=HgsSite(other.url, other.url), fallback=HgsSite(hgs.url, hgs.url)
        )
        found = results(config)
    finally:
        other.stop()
    outcome, detail, fix = found["hgs"]
    assert outcome is Status.FAIL
    assert "TLS verification failed" in detail
    assert "does not chain to the configured CA" in fix
    assert found["hgs-fallback"][0] is Status.OK
    assert found["clock"][0] is Status.OK, "the fallback's time is used"
    stopped = results(replace(config, fallback=HgsSite(other.url, other.url)))
    assert stopped["hgs-fallback"][0] is Status.FAIL
    assert "unreachable" in stopped["hgs-fallback"][1]
    assert stopped["clock"][0] is Status.SKIP


def test_clock_skew_against_the_hgs(healthy: HostConfig) -> None:
    assert check_clock(1000.0, 1005.0).status is Status.OK
    assert check_clock(1000.0, 1030.0).status is Status.WARN
    late = check_clock(1000.0, 880.0)
    assert late.status is Status.FAIL
    assert "-120 s" in late.message
    assert "NTP" in late.fix
    ahead = results(healthy, now=time.time() + 600)["clock"]  # the HGS's Date header says now
    assert ahead[0] is Status.FAIL
    assert "from the HGS's" in ahead[1]


def test_host_key_mode_checks_the_signing_key(hgs: RunningHgs, tmp_path: Path) -> None:
    config = host_config(tmp_path / "host-k", hgs, mode=HostMode.HOST_KEY)
    found = results(config)
    assert found["host-signing-key"][0] is Status.OK
    assert "tpm" not in found
    assert config.signing_key is not None
    config.signing_key.unlink()
    missing = results(config)["host-signing-key"]
    assert missing[0] is Status.FAIL
    assert "host configure" in missing[2]


def test_an_invalid_config_fails_first(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text('{"version": 1, "mode": "tpm"}')
    result = CliRunner().invoke(cli, ["host", "diagnose", "--config", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"host diagnose: {path}\nFAIL config:")
    assert "fix:" in result.output
