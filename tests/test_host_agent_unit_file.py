"""The shipped systemd unit: it parses, runs 'guardfab host agent' and is hardened.

The unit's paths must agree with the defaults of the host configuration (the
state directory and the socket's directory are its only writable paths), and
systemd itself must accept it (``systemd-analyze verify``).
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from guardfab.cli.main import cli
from guardfab.host.config import DEFAULT_CONFIG_PATH, DEFAULT_SOCKET, DEFAULT_STATE_DIR

UNIT = Path(__file__).resolve().parent.parent / "packaging/systemd/guardfab-host-agent.service"


def load() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_parses_as_ini_and_runs_the_agent_with_the_default_config() -> None:
    unit = load()
    assert unit.sections() == ["Unit", "Service", "Install"]
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert Path(argv[0]).name == "guardfab"
    assert argv[1:] == ["host", "agent", "--config", str(DEFAULT_CONFIG_PATH)]
    assert unit["Unit"]["ConditionPathExists"] == str(DEFAULT_CONFIG_PATH)
    assert unit["Service"]["Type"] == "notify"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    result = CliRunner().invoke(cli, [*argv[1:], "--help"])
    assert result.exit_code == 0, "the CLI accepts the unit's arguments"


def test_unit_is_hardened_and_writes_only_its_state_and_socket() -> None:
    service = load()["Service"]
    expected = {
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "DevicePolicy": "closed",
        "DeviceAllow": "/dev/tpmrm0 rw",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "StateDirectoryMode": "0700",
        "RuntimeDirectoryMode": "0700",
    }
    assert {k: service.get(k) for k in expected} == expected
    writable = service["ReadWritePaths"].split()
    assert writable == [str(DEFAULT_STATE_DIR), str(DEFAULT_SOCKET.parent)]
    assert f"/var/lib/{service['StateDirectory']}" == str(DEFAULT_STATE_DIR)
    assert f"/run/{service['RuntimeDirectory']}" == str(DEFAULT_SOCKET.parent)


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd is part of the test platform"
    guardfab = Path(sys.executable).parent / "guardfab"
    text = UNIT.read_text().replace("/usr/local/bin/guardfab", str(guardfab))
    (tmp_path / UNIT.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / UNIT.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
