"""``guardfab hgs`` admin commands through click's CliRunner, against a real HGS over HTTPS."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from guardfab.cli.hgs import hgs as hgs_group
from guardfab.cli.main import cli
from guardfab.formats.encoding import b64url_encode
from guardfab.tpm.structures import marshal_public2b
from hgs_harness import RunningHgs
from test_attestation_fixtures import CI_POLICY, GOLDEN, SoftHost, make_ca
from test_hgs_admin_fixtures import (
    UPDATED,
    Probe,
    attested,
    module_hgs,
    new_public_key_pem,
    pem,
    probe,
    tokens_of,
    write_json,
)

__all__ = ["module_hgs", "probe"]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli-hgs-admin")]
HOST = SoftHost("cli-host", ek_kind="p256-sha256-128", index=30, boot=UPDATED)
OUTPUTS: list[str] = []


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Input files an administrator would have."""
    root = tmp_path_factory.mktemp("inputs")
    data = {
        "ek.pub": marshal_public2b(HOST.ek.public),
        "vendor.pem": pem(make_ca("cli vendor").cert).encode(),
        "group-ca.pem": pem(make_ca("cli host CA").cert).encode(),
        "host-key.pem": new_public_key_pem().encode(),
        "golden.log": GOLDEN.log_bytes(),
        "updated.log": UPDATED.log_bytes(),
        "other-policy": b"appraise func=MODULE_CHECK\n",
    }
    for name, content in data.items():
        (root / name).write_bytes(content)
    return {name: root / name for name in data}


@pytest.fixture(scope="module", autouse=True)
def fleet(module_hgs: RunningHgs, probe: Probe) -> None:
    """What every test here may rely on, whatever ran before it on this worker's HGS:
    the golden baseline, the CI policy, a host group and key (audit records 1-4), and
    cli-host's last attestation (booted after a db update: it fails the baseline).
    """
    with module_hgs.client("admin") as client:
        for path, body in [
            ("/baselines", {"name": "golden-2026", "event_log": b64url_encode(GOLDEN.log_bytes())}),
            ("/ci-policies", {"name": CI_POLICY.name, "digest": CI_POLICY.digest.hex()}),
            ("/host-groups", {"name": "fleet-g"}),
            ("/host-keys", {"name": "fleet-k", "public_key": new_public_key_pem()}),
        ]:
            assert client.post("/admin/v1" + path, json=body).status_code == 201
    probe.put_last(attested(HOST))


def run(
    hgs: RunningHgs, *args: str, role: str = "admin", code: int = 0, last: str | None = None
) -> Result:
    """Run 'guardfab hgs ARGS' as ``role``; ``last`` goes after '--' (it may start with '-')."""
    conn = [
        "--url",
        hgs.url,
        "--ca",
        hgs.ca,
        "--token-file",
        str(hgs.directory / "tokens" / f"{role}.token"),
    ]
    tail = ["--", last] if last is not None else []
    result = CliRunner().invoke(cli, ["hgs", *args, *conn, *tail])
    OUTPUTS.append(result.output)
    assert result.exit_code == code, result.output
    return result


def run_json(hgs: RunningHgs, *args: str) -> Any:
    return json.loads(run(hgs, *args, "--json").stdout)


def test_register_a_tpm_host_and_refuse_the_duplicate(
    module_hgs: RunningHgs, files: dict[str, Path]
) -> None:
    out = run(
        module_hgs, "host", "add-tpm", "--name", "cli-host", "--ek-public", str(files["ek.pub"])
    )
    assert "registered TPM host cli-host" in out.output
    again = run(
        module_hgs,
        "host",
        "add-tpm",
        "--name",
        "cli-host",
        "--ek-public",
        str(files["ek.pub"]),
        code=2,
    )
    assert "already registered" in again.stderr
    rows = run_json(module_hgs, "host", "list")
    assert any(r["host_id"] == "cli-host" for r in rows)
    assert run(module_hgs, "host", "add-tpm", "--name", "x", code=2).exit_code == 2


def test_baselines_ci_policies_and_what_if(module_hgs: RunningHgs, files: dict[str, Path]) -> None:
    added = run(
        module_hgs, "baseline", "add", "--name", "cli-golden", "--log", str(files["golden.log"])
    )
    assert "same PCR values" in added.output
    policy = run_json(
        module_hgs, "ci-policy", "add", "--name", "cli-ima", "--file", str(files["other-policy"])
    )
    assert policy["digest"] == hashlib.sha256(files["other-policy"].read_bytes()).hexdigest()
    run(module_hgs, "ci-policy", "add", "--name", "x", code=2)  # neither --file nor --digest
    assert "cli-golden" in run(module_hgs, "baseline", "list").output
    assert "PCR 7" in run(module_hgs, "baseline", "show", "cli-golden").output
    run(module_hgs, "baseline", "remove", "cli-golden")
    run(module_hgs, "ci-policy", "remove", "cli-ima")
    report = run_json(
        module_hgs, "what-if", "--add-baseline", "upd", "--log", str(files["updated.log"])
    )
    assert report["newly_passing"] == ["cli-host"]
    text = run(module_hgs, "what-if", "--remove-ci-policy", CI_POLICY.name).output
    assert "cli-host: InsecureHostConfiguration -> InsecureHostConfiguration" in text
    run(module_hgs, "what-if", code=2)
    run(module_hgs, "what-if", "--revoke-host", "a", "--remove-baseline", "b", code=2)
    explained = run(module_hgs, "explain", "cli-host").output
    assert "closest baseline 'golden-2026'" in explained
    assert "PCR 7 changed" in explained


def test_file_and_approve_a_candidate(module_hgs: RunningHgs) -> None:
    filed = run_json(
        module_hgs, "baseline", "file-candidate", "--host", "cli-host", "--name", "new"
    )
    run(module_hgs, "baseline", "candidates")
    approved = run(module_hgs, "baseline", "approve", filed["id"], "--name", "after-update")
    assert "baseline after-update added" in approved.output
    run(module_hgs, "baseline", "reject", filed["id"], "--reason", "late", code=2)
    assert "now would give: Passed" in run(module_hgs, "explain", "cli-host").output
    run(module_hgs, "baseline", "remove", "after-update")


def test_policies_and_the_locked_refusal(module_hgs: RunningHgs) -> None:
    assert "Hgs_SecureBootEnabled    locked" in run(module_hgs, "policy", "list").output
    assert "enabled -> disabled" in run(module_hgs, "policy", "disable", "Hgs_FullBoot").output
    assert "disabled -> enabled" in run(module_hgs, "policy", "enable", "Hgs_FullBoot").output
    refused = run(module_hgs, "policy", "disable", "Hgs_SecureBootEnabled", code=1)
    assert "locked" in refused.stderr
    run(module_hgs, "policy", "lock", "Hgs_UefiDebugDisabled")
    run(module_hgs, "policy", "disable", "Hgs_UefiDebugDisabled", code=1)


def test_modes_settings_cas_groups_keys_and_revocation(
    module_hgs: RunningHgs, files: dict[str, Path]
) -> None:
    switched = run(module_hgs, "mode", "set", "tpm", "admin-group").output
    assert "deprecated" in switched
    assert "stay valid" in switched
    run(module_hgs, "mode", "set", "tpm")
    assert (
        "admit_certified_eks: True"
        in run(module_hgs, "settings", "set", "--admit-certified-eks").output
    )
    ca = run_json(module_hgs, "ek-ca", "add", str(files["vendor.pem"]))
    assert ca["id"] in run(module_hgs, "ek-ca", "list").output
    run(module_hgs, "ek-ca", "remove", ca["id"])
    assert "deprecated" in run(module_hgs, "group", "add", "cli-group").output
    run(module_hgs, "group", "add-ca", str(files["group-ca.pem"]))
    assert "cli-group" in run(module_hgs, "group", "list").output
    key = run_json(
        module_hgs, "host", "add-key", "--name", "kh", "--public-key", str(files["host-key.pem"])
    )
    # A key id is base64url and may start with '-': it goes after '--'.
    run(module_hgs, "host", "revoke-key", last=key["key_id"])
    assert "yes" in run(module_hgs, "host", "keys").output
    run(module_hgs, "host", "revoke", "cli-host", "--reason", "lost")
    assert "lost" in run(module_hgs, "host", "revocations").output
    run(module_hgs, "host", "unrevoke", "cli-host")


def test_the_reviewer_reads_but_cannot_change(module_hgs: RunningHgs) -> None:
    run(module_hgs, "policy", "list", role="reviewer")
    refused = run(module_hgs, "group", "add", "by-reviewer", role="reviewer", code=1)
    assert "reviewer role may not" in refused.stderr


def test_audit_list_and_verify(module_hgs: RunningHgs, probe: Probe) -> None:
    page = run_json(module_hgs, "audit", "list", "--limit", "3")
    assert [r["seq"] for r in page["records"]] == [1, 2, 3]
    assert "more: --since 3" in run(module_hgs, "audit", "list", "--limit", "3").output
    assert "audit log OK" in run(module_hgs, "audit", "verify").output
    assert run_json(module_hgs, "audit", "verify")["records"] == probe.audit_seq()


def test_dir_option_reads_url_ca_and_admin_token_from_the_state(module_hgs: RunningHgs) -> None:
    config = json.loads((module_hgs.directory / "hgs.json").read_text())
    config["listen"] = module_hgs.url.removeprefix("https://")
    write_json(module_hgs.directory / "hgs.json", config)
    result = CliRunner().invoke(cli, ["hgs", "mode", "show", "--dir", str(module_hgs.directory)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("modes: tpm")


def test_without_connection_options_it_says_how(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["hgs", "host", "list"])
    assert result.exit_code == 2
    assert "--dir DIR" in result.stderr
    assert "--token-file" in result.stderr


_ADMIN_MODULES = ("guardfab.cli.hgs_admin", "guardfab.cli.hgs_admin_reports")


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        elif command.callback is not None and command.callback.__module__ in _ADMIN_MODULES:
            yield (*prefix, name)


@pytest.mark.parametrize("path", list(_commands(hgs_group)), ids=" ".join)
def test_every_admin_command_help_names_its_reference_counterpart(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, ["hgs", *path, "--help"])
    assert result.exit_code == 0
    assert "Hgs" in result.output or "reference" in result.output


def test_no_output_ever_held_a_token(module_hgs: RunningHgs) -> None:
    run(module_hgs, "audit", "list", "--json")
    run(module_hgs, "group", "add", "bad name", code=1)
    run(module_hgs, "policy", "enable", "Hgs_FullBoot", role="reviewer", code=1)
    assert all(token not in text for token in tokens_of(module_hgs) for text in OUTPUTS)
