"""``host diagnose`` checks the management API directory: file modes, certificate, audit chain."""

from __future__ import annotations

import datetime
import sqlite3
from pathlib import Path

import pytest

from guardfab.diagnostics import Status
from guardfab.host.config import HgsSite, HostConfig, HostMode
from guardfab.host.diagnose import check_management
from guardfab.host.manage.audit import ManagementAudit
from guardfab.host.manage.material import ManagementFiles, init_management

NOW = datetime.datetime.now(datetime.UTC)


def _config(tmp_path: Path) -> HostConfig:
    site = HgsSite("https://127.0.0.1:1/attestation", "https://127.0.0.1:1/keyprotection")
    return HostConfig(HostMode.TPM, site, tmp_path / "ca.pem", state_dir=tmp_path / "state")


def _results(config: HostConfig, now: float | None = None) -> dict[str, tuple[Status, str]]:
    when = NOW.timestamp() if now is None else now
    return {r.name: (r.status, r.message) for r in check_management(config, when)}


@pytest.fixture
def managed(tmp_path: Path) -> tuple[HostConfig, ManagementFiles]:
    config = _config(tmp_path)
    files = init_management(config.management_dir, ["127.0.0.1"], now=NOW)
    audit = ManagementAudit(files.audit_db)
    try:
        audit.record(actor="admin", operation="start", vm="vm1", outcome="granted", reason="ok")
    finally:
        audit.close()
    return config, files


def test_no_management_directory_is_a_skip(tmp_path: Path) -> None:
    assert _results(_config(tmp_path)) == {
        "manage": (Status.SKIP, f"{tmp_path}/state/manage: no management API set up"
                   " (guardfab host manage init)"),
    }  # fmt: skip


def test_a_healthy_directory_passes(managed: tuple[HostConfig, ManagementFiles]) -> None:
    results = _results(managed[0])
    assert {name: outcome for name, (outcome, _) in results.items()} == {
        "manage-files": Status.OK,
        "manage-tls": Status.OK,
        "manage-audit": Status.OK,
    }
    assert "1 record(s)" in results["manage-audit"][1]


def test_a_token_readable_by_others_fails(managed: tuple[HostConfig, ManagementFiles]) -> None:
    config, files = managed
    files.token_file("admin").chmod(0o644)
    outcome, detail = _results(config)["manage-files"]
    assert (outcome, detail) == (Status.FAIL, "readable by others: admin.token 0644")


def test_an_expired_or_expiring_certificate(managed: tuple[HostConfig, ManagementFiles]) -> None:
    config, _ = managed
    in_years = (NOW + datetime.timedelta(days=365 * 30)).timestamp()
    assert _results(config, in_years)["manage-tls"][0] is Status.FAIL


def test_an_edited_audit_record_fails(managed: tuple[HostConfig, ManagementFiles]) -> None:
    config, files = managed
    with sqlite3.connect(files.audit_db) as db:
        key, value = db.execute(
            "SELECT key, value FROM kv WHERE key LIKE 'audit/0%' LIMIT 1"
        ).fetchone()
        db.execute(
            "UPDATE kv SET value = ? WHERE key = ?",
            (value.replace(b'"granted"', b'"refused"'), key),
        )
    assert _results(config)["manage-audit"][0] is Status.FAIL


def test_a_missing_access_table_fails_without_crashing(
    managed: tuple[HostConfig, ManagementFiles],
) -> None:
    config, files = managed
    files.access_file.unlink()
    outcome, detail = _results(config)["manage-files"]
    assert outcome is Status.FAIL
    assert "accepts no token" in detail
