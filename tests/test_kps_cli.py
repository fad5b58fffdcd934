"""``guardfab hgs kps ...`` against a real HGS over HTTPS (the commands run in-process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from guardfab.attestation.trust import AttestationMode
from guardfab.cli.hgs_kps import parse_date
from guardfab.cli.main import cli
from guardfab.errors import FormatError
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.formats.key_protector import load_key_protector
from hgs_harness import RunningHgs, start_hgs
from test_kps_fixtures import Tenant, attested_host, enable_modes, kps_document, post_release

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hgs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHgs]:
    running = start_hgs(tmp_path_factory.mktemp("kps-cli") / "hgs")
    enable_modes(running, AttestationMode.HOST_KEY)
    try:
        yield running
    finally:
        running.stop()


def run(hgs: RunningHgs, *args: str, code: int = 0, role: str = "admin") -> Result:
    connection = ["--dir", str(hgs.directory), "--url", hgs.url]
    if role != "admin":
        connection += ["--token-file", str(hgs.directory / "tokens" / f"{role}.token")]
    result = CliRunner().invoke(cli, ["hgs", "kps", *args, *connection])
    assert result.exit_code == code, result.output
    return result


def as_json(hgs: RunningHgs, *args: str) -> Any:
    return json.loads(run(hgs, *args, "--json").output)


def test_metadata_file_imports_into_the_tenant_store(hgs: RunningHgs, tmp_path: Path) -> None:
    out = tmp_path / "fabric.jws"
    primary = as_json(hgs, "metadata", "--out", str(out))
    home = tmp_path / "home"
    imported = CliRunner().invoke(
        cli,
        ["tenant", "guardian", "import", str(out), "--expect-id", str(primary["id"]),
         "--home", str(home), "--json"],
    )  # fmt: skip
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.output)["kind"] == "kps"
    everything = tmp_path / "all.json"
    run(hgs, "metadata", "--all", "--out", str(everything))
    assert json.loads(everything.read_text())["primary"] == primary["id"]


def test_signers_list_add_remove_and_fetch_from_an_hgs(hgs: RunningHgs, tmp_path: Path) -> None:
    (own,) = as_json(hgs, "signer", "list")["signers"]
    assert own["source"] == "own (default)"
    host, cert = attested_host(hgs, "host-cli")
    kp = Tenant().kp(kps_document(hgs))

    run(hgs, "signer", "remove", own["kid"])
    assert as_json(hgs, "signer", "list")["signers"] == []
    refused = post_release(hgs, cert, kp)
    assert (refused.status_code, refused.json()["error"]["reason"]) == (401, "untrusted-signer")

    run(hgs, "signer", "add", "--from-hgs", hgs.url, "--from-ca", hgs.ca)
    assert [s["kid"] for s in as_json(hgs, "signer", "list")["signers"]] == [own["kid"]]
    assert post_release(hgs, cert, kp).status_code == 200

    jwk = tmp_path / "signer.jwk"
    jwk.write_text(json.dumps(own["jwk"]))
    run(hgs, "signer", "add", "--jwk", str(jwk))
    failed = run(hgs, "signer", "remove", "no-such-signer", code=2)
    assert "no trusted attestation signer" in failed.output
    assert host.host_id == "host-cli"


def test_deny_before_set_show_clear(hgs: RunningHgs) -> None:
    assert as_json(hgs, "deny-before")["deny_before"] is None
    run(hgs, "deny-before", "2020-01-01")
    assert as_json(hgs, "deny-before")["deny_before"] == 1577836800
    future = run(hgs, "deny-before", "2999-01-01", code=2)
    assert "in the future" in future.output
    run(hgs, "deny-before", "--clear")
    assert "not set" in run(hgs, "deny-before").output


def test_key_rotation_from_the_cli(hgs: RunningHgs) -> None:
    (first,) = as_json(hgs, "key", "list")["keys"]
    _host, cert = attested_host(hgs, "host-rotation")
    kp = Tenant().kp(kps_document(hgs))
    before = first["key_generation"]
    added = as_json(hgs, "key", "add", "--make-primary")
    assert (added["id"], added["key_generation"]) == (first["id"], before + 1)
    (listed,) = as_json(hgs, "key", "list")["keys"]
    assert (listed["id"], listed["key_generation"], listed["primary"]) == (
        first["id"],
        before + 1,
        True,
    )
    response = post_release(hgs, cert, kp)
    assert response.status_code == 200
    egress = load_key_protector(b64url_decode(response.json()["egress_key_protector"], what="t"))
    assert egress.guardian(first["id"]).key_generation == before + 1
    kp_id = egress.kp_id
    assert kp_id not in {r["kp_id"] for r in as_json(hgs, "report")["on_old_keys"]}
    back = run(hgs, "key", "make-primary", first["id"], "--key-generation", str(before), code=2)
    assert "going back" in back.output
    second = as_json(hgs, "key", "add", "--new-guardian", "--name", "cli-kps-2", "--make-primary")
    keys = as_json(hgs, "key", "list")["keys"]
    assert [(k["id"], k["primary"]) for k in keys] == [(second["id"], True), (first["id"], False)]
    on_old = as_json(hgs, "report")["on_old_keys"]
    assert (kp_id, first["id"]) in {(r["kp_id"], r["kps_key"]) for r in on_old}
    assert first["id"] in run(hgs, "report").output
    run(hgs, "key", "make-primary", first["id"])
    assert as_json(hgs, "report")["primary"] == first["id"]
    assert kp_id not in {r["kp_id"] for r in as_json(hgs, "report")["on_old_keys"]}
    missing = run(hgs, "key", "make-primary", "A" * 43, code=2)
    assert "no KPS key" in missing.output


def test_the_reviewer_reads_but_does_not_change(hgs: RunningHgs) -> None:
    run(hgs, "key", "list", role="reviewer")
    refused = run(hgs, "key", "add", role="reviewer", code=1)
    assert "may not do this" in refused.output


def test_release_request_body_is_base64url_of_the_kp_file(hgs: RunningHgs) -> None:
    _host, cert = attested_host(hgs, "host-b64")
    kp = Tenant().kp(kps_document(hgs))
    with hgs.client() as client:
        response = client.post(
            "/keyprotection/v1/release",
            json={"health_certificate": cert, "key_protector": b64url_encode(kp)},
        )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [("now", 1000), ("2026-11-27", 1795737600), ("2026-11-27T10:00:00Z", 1795773600)],
)
def test_parse_date(text: str, expected: int) -> None:
    assert parse_date(text, now=1000.5) == expected


def test_parse_date_refuses_nonsense() -> None:
    with pytest.raises(FormatError):
        parse_date("yesterday", now=0)


def test_backup_cli_with_a_passphrase_file(hgs: RunningHgs, tmp_path: Path) -> None:
    passphrase = tmp_path / "pass"
    passphrase.write_text("a long backup passphrase\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("another long passphrase\n")
    out = tmp_path / "b.jwe"
    runner = CliRunner()
    made = runner.invoke(cli, ["hgs", "export-state", "--dir", str(hgs.directory), "--out",
                               str(out), "--passphrase-file", str(passphrase)])  # fmt: skip
    assert made.exit_code == 0, made.output
    refused = runner.invoke(cli, ["hgs", "import-state", "--dir", str(tmp_path / "new"), "--in",
                                  str(out), "--passphrase-file", str(wrong)])  # fmt: skip
    assert refused.exit_code == 1
    assert "does not decrypt" in refused.output
    assert not (tmp_path / "new").exists()
    restored = runner.invoke(cli, ["hgs", "import-state", "--dir", str(tmp_path / "new"), "--in",
                                   str(out), "--passphrase-file", str(passphrase)])  # fmt: skip
    assert restored.exit_code == 0, restored.output
    assert (tmp_path / "new" / "state.db").is_file()
