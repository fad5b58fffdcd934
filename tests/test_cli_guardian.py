"""The 'tenant guardian' commands, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from guardfab.cli.main import cli


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_new_export_import_list(home: Path, tmp_path: Path) -> None:
    code, out = run("tenant", "guardian", "new", "alice", "--algorithm", "ec-p256", "--json")
    assert code == 0, out
    alice = json.loads(out)
    assert alice["signing_alg"] == "ES256"
    assert alice["wrapping_alg"] == "ECDH-ES+A256KW"
    exported = tmp_path / "alice.guardian"
    assert run("tenant", "guardian", "export", "alice", "-o", str(exported))[0] == 0
    assert b"PRIVATE" not in exported.read_bytes()

    other_home = tmp_path / "other"
    code, out = run(
        "tenant",
        "guardian",
        "import",
        str(exported),
        "--home",
        str(other_home),
        "--expect-id",
        alice["id"],
        "--json",
    )
    assert code == 0, out
    code, out = run("tenant", "guardian", "list", "--home", str(other_home), "--json")
    assert [(r["local_name"], r["private"]) for r in json.loads(out)] == [("alice", False)]


def test_import_with_wrong_expected_id_writes_nothing(home: Path, tmp_path: Path) -> None:
    run("tenant", "guardian", "new", "alice", "--algorithm", "ec-p256")
    exported = tmp_path / "alice.guardian"
    run("tenant", "guardian", "export", "alice", "-o", str(exported))
    other_home = tmp_path / "other"
    code, out = run(
        "tenant",
        "guardian",
        "import",
        str(exported),
        "--home",
        str(other_home),
        "--expect-id",
        "not-the-id",
    )
    assert code != 0
    assert "not the expected" in out
    assert not (other_home / "guardians").exists()


def test_import_of_tampered_document_fails_clearly(home: Path, tmp_path: Path) -> None:
    run("tenant", "guardian", "new", "alice", "--algorithm", "ec-p256")
    exported = tmp_path / "alice.guardian"
    run("tenant", "guardian", "export", "alice", "-o", str(exported))
    data = bytearray(exported.read_bytes())
    data[len(data) // 2] ^= 0x01
    exported.write_bytes(bytes(data))
    code, out = run("tenant", "guardian", "import", str(exported), "--name", "x")
    assert code == 1
    assert out.startswith("error: guardian document")


def test_passphrase_file_encrypts_keys(home: Path, tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret passphrase\n")
    code, out = run(
        "tenant",
        "guardian",
        "new",
        "bob",
        "--algorithm",
        "ec-p256",
        "--encrypt-keys",
        "--passphrase-file",
        str(secret),
    )
    assert code == 0, out
    assert "s3cret" not in out
    pem = (home / "guardians" / "bob" / "signing-key.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


def test_export_never_overwrites(home: Path, tmp_path: Path) -> None:
    run("tenant", "guardian", "new", "alice", "--algorithm", "ec-p256")
    target = tmp_path / "exists"
    target.write_text("keep me")
    code, out = run("tenant", "guardian", "export", "alice", "-o", str(target))
    assert code == 2
    assert "already exists" in out
    assert target.read_text() == "keep me"


def test_every_command_has_help() -> None:
    for command in ("new", "export", "import", "list", "show"):
        code, out = run("tenant", "guardian", command, "--help")
        assert code == 0
        assert "Usage:" in out
