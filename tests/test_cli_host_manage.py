"""``guardfab host manage`` and ``host audit`` without an agent: files, refusals, rotation."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner

from guardfab.access.tokens import AccessTable, token_digest
from guardfab.cli.main import cli
from guardfab.host.config import HgsSite, HostConfig, HostMode, save_config
from guardfab.host.manage.material import ManagementFiles


def _config(tmp_path: Path) -> Path:
    config = HostConfig(
        mode=HostMode.TPM,
        primary=HgsSite("https://hgs.test", "https://hgs.test"),
        ca_file=tmp_path / "ca.pem",
        state_dir=tmp_path / "state",
    )
    save_config(tmp_path / "host.json", config)
    return tmp_path / "host.json"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["host", *args])
    return result.exit_code, result.output


def test_init_makes_private_files_prints_no_token_and_refuses_twice(tmp_path: Path) -> None:
    config = _config(tmp_path)
    code, out = _run("manage", "init", "--config", str(config), "--server-name", "127.0.0.1")
    assert code == 0, out
    files = ManagementFiles(tmp_path / "state" / "manage")
    assert files.ready()
    for role in ("admin", "reviewer"):
        token = files.token_file(role).read_text().strip()
        assert token not in out
        assert files.access().role_of(token) == role
        assert token not in files.access_file.read_text()
    for path in (files.server_key, files.access_file, files.token_file("admin")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    before = {p.name: p.read_bytes() for p in files.dir.iterdir()}
    code, out = _run("manage", "init", "--config", str(config))
    assert code != 0
    assert "already exists" in out
    assert {p.name: p.read_bytes() for p in files.dir.iterdir()} == before


def test_rotate_revokes_the_old_token_only(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert _run("manage", "init", "--config", str(config))[0] == 0
    files = ManagementFiles(tmp_path / "state" / "manage")
    old = files.token_file("reviewer").read_text().strip()
    admin = files.token_file("admin").read_text().strip()
    code, out = _run("manage", "rotate", "reviewer", "--config", str(config))
    assert code == 0, out
    new = files.token_file("reviewer").read_text().strip()
    table = AccessTable.load(files.access_file)
    assert token_digest(old) not in table.entries
    assert table.role_of(new) == "reviewer"
    assert table.role_of(admin) == "admin"
    assert stat.S_IMODE(files.token_file("reviewer").stat().st_mode) == 0o600


def test_audit_verify_without_a_log_says_so(tmp_path: Path) -> None:
    config = _config(tmp_path)
    code, out = _run("audit", "verify", "--config", str(config))
    assert code == 2
    assert "no audit log" in out
