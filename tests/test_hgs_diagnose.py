"""``guardfab hgs diagnose``: a healthy HGS passes every check; each breakage is named with its fix.

Each row of the table breaks one thing in a freshly initialized state directory
and names the check that must fail (or warn) and a phrase of its fix.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardfab.attestation.trust import CiPolicy
from guardfab.cli.main import cli
from guardfab.formats.encoding import b64url_encode
from guardfab.hgs import registry as reg
from guardfab.hgs.diagnose import DiagnoseReport, Status, run_checks
from guardfab.hgs.state import HgsConfig, init_state
from guardfab.hgs.tls import make_private_ca_and_server
from guardfab.store.audit import AuditLog
from guardfab.store.sqlite import SqliteStore
from hgs_harness import RunningHgs
from test_attestation_fixtures import GOLDEN, SoftHost, golden_baseline
from test_hgs_admin_fixtures import ek_public_b64, write_json

pytestmark = pytest.mark.slow
NOW = datetime.datetime.now(datetime.UTC)


def status_of(report: DiagnoseReport, name: str) -> Status:
    found = [c.status for c in report.checks if c.name == name]
    assert found, f"no check {name}: {[c.name for c in report.checks]}"
    return found[0]


def fix_of(report: DiagnoseReport, name: str) -> str:
    return next(c.fix for c in report.checks if c.name == name)


def fresh(tmp_path: Path, **config: object) -> Path:
    directory = tmp_path / "hgs"
    init_state(directory, HgsConfig(service_name="diag", **config))  # type: ignore[arg-type]
    return directory


def registered(directory: Path) -> Path:
    """Register a baseline, a CI policy and a TPM host straight into the store."""
    store = SqliteStore(directory / "state.db")
    try:
        ci = CiPolicy("ima", bytes(32))
        txn = reg.Registry.trust_txn(
            puts=[
                (reg.BASELINES + "golden", golden_baseline().to_dict()),
                (reg.CI_POLICIES + ci.digest.hex(), ci.to_dict()),
            ]
        )
        AuditLog(store).append(
            kind="admin", actor="admin", subject="setup", outcome="success", txn=txn
        )
    finally:
        store.close()
    return directory


def test_a_healthy_hgs_passes_every_check(running_hgs: RunningHgs) -> None:
    with running_hgs.client("admin") as client:
        for path, body in [
            (
                "/admin/v1/baselines",
                {"name": "golden", "event_log": b64url_encode(GOLDEN.log_bytes())},
            ),
            ("/admin/v1/ci-policies", {"name": "ima", "digest": "11" * 32}),
            ("/admin/v1/tpm-hosts", {"name": "h", "ek_public": ek_public_b64(SoftHost())}),
        ]:
            assert client.post(path, json=body).status_code == 201
    config = json.loads((running_hgs.directory / "hgs.json").read_text())
    config["listen"] = running_hgs.url.removeprefix("https://")
    write_json(running_hgs.directory / "hgs.json", config)
    result = CliRunner().invoke(cli, ["hgs", "diagnose", "--dir", str(running_hgs.directory)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()[1:-1]
    assert lines, result.output
    assert all(line.startswith("OK ") for line in lines), result.output
    assert "service: https://127.0.0.1:" in result.output
    data = json.loads(
        CliRunner()
        .invoke(cli, ["hgs", "diagnose", "--dir", str(running_hgs.directory), "--json"])
        .stdout
    )
    assert data["ok"]
    assert data["counts"]["FAIL"] == 0
    assert data["counts"]["WARN"] == 0


def _remove_signing_key(d: Path) -> None:
    (d / "keys" / "attestation-signing.pem").unlink()


def _loosen_token(d: Path) -> None:
    (d / "tokens" / "admin.token").chmod(0o644)


def _tls(
    days_ago: int, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> Callable[[Path], None]:
    def breaks(d: Path) -> None:
        tls = make_private_ca_and_server(
            "diag", list(names), now=NOW - datetime.timedelta(days=days_ago)
        )
        (d / "tls" / "ca.pem").write_bytes(tls.ca_pem)
        (d / "tls" / "server.pem").write_bytes(tls.server_chain_pem)
        (d / "tls" / "server.key").write_bytes(tls.server_key_pem)

    return breaks


def _other_ca(d: Path) -> None:
    (d / "tls" / "ca.pem").write_bytes(
        make_private_ca_and_server("x", ["127.0.0.1"], now=NOW).ca_pem
    )


def _tamper_audit(d: Path, edit: str = "CAST(replace(value, 'setup', 'setuq') AS BLOB)") -> None:
    registered(d)
    with sqlite3.connect(d / "state.db") as db:
        db.execute(f"UPDATE kv SET value = {edit} WHERE key LIKE 'audit/0%'")


def _readable_store(d: Path) -> None:
    registered(d)
    (d / "state.db").chmod(0o640)


def _bad_config(d: Path) -> None:
    (d / "hgs.json").write_text("{not json")


def _wrong_token(d: Path) -> None:
    (d / "tokens" / "reviewer.token").write_text("not-the-token\n")


def _admin_group(d: Path) -> None:
    registered(d)
    store = SqliteStore(d / "state.db")
    store.put(reg.MODES_KEY, reg.encode(["admin-group", "tpm"]))
    store.close()


BROKEN: dict[str, tuple[Callable[[Path], None], str, Status, str]] = {
    "missing signing key": (
        _remove_signing_key,
        "file keys/attestation-signing.pem",
        Status.FAIL,
        "restore it from backup",
    ),
    "signing key does not load": (_remove_signing_key, "signing-key", Status.FAIL, "new signer"),
    "token readable by others": (
        _loosen_token,
        "mode tokens/admin.token",
        Status.FAIL,
        "chmod 600",
    ),
    "expired TLS certificate": (_tls(400), "tls-validity", Status.FAIL, "new server certificate"),
    "TLS certificate expiring soon": (
        _tls(380),
        "tls-validity",
        Status.WARN,
        "new server certificate",
    ),
    "TLS names miss the listen address": (
        _tls(0, ("hgs.other",)),
        "tls-names",
        Status.FAIL,
        "subjectAltName includes 127.0.0.1",
    ),
    "CA that did not issue the certificate": (_other_ca, "tls-chain", Status.FAIL, "tls/ca.pem"),
    "no baselines": (lambda d: None, "tpm-baselines", Status.FAIL, "hgs baseline add"),
    "no CI policy": (lambda d: None, "ci-policies", Status.FAIL, "hgs ci-policy add"),
    "no TPM host": (lambda d: None, "tpm-hosts", Status.FAIL, "hgs host add-tpm"),
    "service not running": (lambda d: None, "service", Status.FAIL, "guardfab hgs serve"),
    "store not created yet": (lambda d: None, "store", Status.WARN, "hgs serve"),
    "audit record edited": (_tamper_audit, "audit-chain", Status.FAIL, "compare it with a backup"),
    "audit record stored as text": (
        lambda d: _tamper_audit(d, "replace(value, 'setup', 'setuq')"),
        "audit-chain",
        Status.FAIL,
        "compare it with a backup",
    ),
    "store readable by group": (_readable_store, "store", Status.FAIL, "chmod 600"),
    "invalid hgs.json": (_bad_config, "config", Status.FAIL, ""),
    "token file not in access.json": (_wrong_token, "token reviewer", Status.FAIL, "access.json"),
    "admin-group mode": (_admin_group, "admin-group", Status.WARN, "mode set tpm"),
    "admin-group without groups": (_admin_group, "host-groups", Status.FAIL, "hgs group add"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_each_breakage_is_named_with_its_fix(tmp_path: Path, name: str) -> None:
    breaks, check, status, fix = BROKEN[name]
    directory = fresh(tmp_path)
    breaks(directory)
    report = run_checks(directory)
    assert status_of(report, check) is status, report.explain()
    assert fix in fix_of(report, check)
    assert report.ok is False  # the service is not running in these cases
    assert f"{status.value:<4} {check}:" in report.explain()


def test_checks_that_depend_on_a_failed_one_are_skipped_not_passed(tmp_path: Path) -> None:
    directory = fresh(tmp_path)
    _bad_config(directory)
    report = run_checks(directory)
    assert status_of(report, "keys") is Status.SKIP
    assert status_of(report, "store") is Status.SKIP
    assert status_of(report, "attestation") is Status.SKIP


def test_a_missing_directory_fails_with_how_to_create_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["hgs", "diagnose", "--dir", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "FAIL state-directory" in result.output
    assert "hgs init" in result.output


def test_a_broken_directory_lists_every_failure_with_its_fix(tmp_path: Path) -> None:
    directory = registered(fresh(tmp_path))
    _remove_signing_key(directory)
    _loosen_token(directory)
    _tls(400)(directory)
    result = CliRunner().invoke(cli, ["hgs", "diagnose", "--dir", str(directory)])
    assert result.exit_code == 1
    for line in (
        "FAIL file keys/attestation-signing.pem",
        "FAIL mode tokens/admin.token",
        "FAIL tls-validity: expired",
        "FAIL service",
    ):
        assert line in result.output
    assert result.output.count("     fix: ") >= 4
    assert "OK   tpm-baselines" in result.output
