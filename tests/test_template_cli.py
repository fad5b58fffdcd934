"""The 'template' commands end to end through click, including what a failure leaves behind."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardfab.cli import template as template_cli
from guardfab.cli.main import cli
from guardfab.cli.output import EXIT_INVALID, EXIT_USAGE


def run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["template", *map(str, args)])
    return result.exit_code, result.output


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A publisher and an impostor, each as private + public PEM (made once)."""
    directory = tmp_path_factory.mktemp("keys")
    paths = {}
    for who in ("publisher", "mallory"):
        key, pub = directory / f"{who}.pem", directory / f"{who}.pub"
        code, out = run("keygen", "--out", key, "--public-out", pub, "--algorithm", "es256")
        assert code == 0, out
        paths[who], paths[f"{who}.pub"] = key, pub
    return paths


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "ws.img"
    path.write_bytes(os.urandom(50_000))
    return path


def protect(disk: Path, key: Path, *extra: str | Path) -> tuple[int, str]:
    return run("protect", disk, "--name", "ws2025", "--version", "1.2.3.4", "--key", key, *extra)


def test_publisher_and_tenant_flow(disk: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    code, out = protect(disk, keys["publisher"], "--json")
    assert code == 0, out
    signed = json.loads(out)
    assert signed["size"] == 50_000
    assert signed["digest"]["alg"] == "sha256-merkle"
    assert Path(signed["signature"]) == disk.with_name("ws.img.sig")

    code, out = run("verify", disk, "--publisher", keys["publisher.pub"], "--json")
    assert code == 0, out
    assert json.loads(out)["publisher"] == signed["publisher"]

    vsc, vic = tmp_path / "ws.vsc", tmp_path / "ws.vic"
    code, out = run(
        "catalog", "--key", keys["publisher"], "--name", "ws2025", "--version", "1.2.3.0",
        "--out", vsc,
    )  # fmt: skip
    assert code == 0, out
    code, out = run("qualifier", "--catalog", vsc, "--rule", "greater-than", "--out", vic)
    assert code == 0, out
    code, out = run("verify", disk, "--publisher", vic)
    assert code == 0, out
    assert "OK:" in out
    # The catalog alone demands its exact version, which 1.2.3.4 is not.
    code, out = run("verify", disk, "--publisher", vsc)
    assert code == EXIT_INVALID
    assert "version 1.2.3.4 is not equals 1.2.3.0" in out


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    code, out = run("keygen", "--out", key, "--json")
    assert code == 0, out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(json.loads(out)["kid"]) == 43


def test_encrypted_publisher_key(disk: Path, tmp_path: Path) -> None:
    secret = tmp_path / "pass.txt"
    secret.write_text("correct horse\n")
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    code, out = run(
        "keygen", "--out", key, "--public-out", pub, "--encrypt-key", "--passphrase-file", secret
    )
    assert code == 0, out
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    code, out = protect(disk, key)  # no passphrase and no terminal to prompt on
    assert code == EXIT_INVALID
    assert "passphrase" in out
    assert not disk.with_name("ws.img.sig").exists()
    secret.write_text("wrong\n")
    code, out = protect(disk, key, "--passphrase-file", secret)
    assert code == EXIT_INVALID
    assert "wrong passphrase" in out
    secret.write_text("correct horse\n")
    assert protect(disk, key, "--passphrase-file", secret)[0] == 0
    assert run("verify", disk, "--publisher", pub)[0] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.write_bytes(d.read_bytes()[:-1]), "49999 bytes but the signature is for"),
        (lambda d: d.write_bytes(d.read_bytes() + b"\0"), "50001 bytes"),
        (lambda d: d.write_bytes(b"X" + d.read_bytes()[1:]), "content does not match"),
    ],
)
def test_verify_reports_a_changed_disk(
    change: object, message: str, disk: Path, keys: dict[str, Path]
) -> None:
    assert protect(disk, keys["publisher"])[0] == 0
    change(disk)  # type: ignore[operator]
    code, out = run("verify", disk, "--publisher", keys["publisher.pub"])
    assert code == EXIT_INVALID
    assert message in out


def test_verify_refuses_another_publishers_signature(disk: Path, keys: dict[str, Path]) -> None:
    assert protect(disk, keys["mallory"])[0] == 0
    code, out = run("verify", disk, "--publisher", keys["publisher.pub"])
    assert code == EXIT_INVALID
    assert "signature does not verify" in out
    assert "not the trusted publisher" in out


def test_verify_needs_a_signature_and_a_publisher(disk: Path, keys: dict[str, Path]) -> None:
    code, out = run("verify", disk, "--publisher", keys["publisher.pub"])
    assert code == EXIT_USAGE
    assert "signature file" in out
    code, out = run("verify", disk)
    assert code == EXIT_USAGE
    assert "--publisher" in out


def test_verify_refuses_a_private_key_as_the_trust_anchor(
    disk: Path, keys: dict[str, Path]
) -> None:
    assert protect(disk, keys["publisher"])[0] == 0
    code, out = run("verify", disk, "--publisher", keys["publisher"])
    assert code == EXIT_INVALID
    assert "neither a PEM public key nor a JWK" in out


# --- nothing is written when a command fails ----------------------------------------------

FAILING_PROTECTS = {
    "bad version": ("--version", "1.2.3"),
    "leading zero version": ("--version", "1.02.3.4"),
    "empty name": ("--name", ""),
    "control character in name": ("--name", "ws\x1b[2J"),
}


@pytest.mark.parametrize("case", sorted(FAILING_PROTECTS))
def test_failed_protect_writes_nothing(
    case: str, disk: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    before = listing(tmp_path)
    option, value = FAILING_PROTECTS[case]
    args = {"--name": "ws2025", "--version": "1.2.3.4", option: value}
    code, out = run(
        "protect", disk, *[x for kv in args.items() for x in kv], "--key", keys["publisher"]
    )
    assert code == EXIT_INVALID, out
    assert listing(tmp_path) == before


def test_protect_with_a_public_key_writes_nothing(
    disk: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    before = listing(tmp_path)
    code, out = protect(disk, keys["publisher.pub"])
    assert code == EXIT_INVALID
    assert "not a PEM private key" in out
    assert listing(tmp_path) == before


def test_protect_does_not_overwrite_without_force(
    disk: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    sig = disk.with_name("ws.img.sig")
    sig.write_bytes(b"keep me")
    code, out = protect(disk, keys["publisher"])
    assert code == EXIT_USAGE
    assert "already exists" in out
    assert sig.read_bytes() == b"keep me"
    assert protect(disk, keys["publisher"], "--force")[0] == 0
    assert sig.read_bytes() != b"keep me"
    assert run("verify", disk, "--publisher", keys["publisher.pub"])[0] == 0


def test_protect_refuses_an_existing_output_before_hashing(
    disk: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk.with_name("ws.img.sig").write_bytes(b"keep me")

    def must_not_hash(*args: object, **kwargs: object) -> None:
        raise AssertionError("hashed a disk whose signature could not be written")

    monkeypatch.setattr(template_cli.disks, "protect_disk", must_not_hash)
    code, out = protect(disk, keys["publisher"])
    assert code == EXIT_USAGE, out


def test_protect_of_an_empty_disk_writes_nothing(keys: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    code, out = protect(empty, keys["publisher"], "--out", tmp_path / "e.sig")
    assert code == EXIT_INVALID
    assert "empty" in out
    assert not (tmp_path / "e.sig").exists()


def test_keygen_writes_neither_key_when_one_path_is_taken(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_bytes(b"taken")
    code, out = run("keygen", "--out", tmp_path / "k.pem", "--public-out", tmp_path / "k.pub")
    assert code == EXIT_USAGE
    assert "already exists" in out
    assert not (tmp_path / "k.pem").exists()
    assert (tmp_path / "k.pub").read_bytes() == b"taken"


def test_catalog_failures_write_nothing(keys: dict[str, Path], tmp_path: Path) -> None:
    out_file = tmp_path / "c.vsc"
    for args in (
        ("--key", keys["publisher"], "--name", "ws", "--version", "x"),
        ("--key", keys["publisher.pub"], "--name", "ws", "--version", "1.0.0.0"),
        ("--key", keys["publisher"], "--name", "", "--version", "1.0.0.0"),
    ):
        code, _ = run("catalog", *args, "--out", out_file)
        assert code == EXIT_INVALID
        assert not out_file.exists()


def test_qualifier_from_a_tampered_catalog_writes_nothing(
    keys: dict[str, Path], tmp_path: Path
) -> None:
    vsc = tmp_path / "c.vsc"
    args = ("--name", "ws", "--version", "1.0.0.0", "--out", vsc)
    assert run("catalog", "--key", keys["publisher"], *args)[0] == 0
    document = json.loads(vsc.read_bytes())
    document["catalog"] = document["catalog"][:-6] + "AAAAAA"
    vsc.write_text(json.dumps(document))
    code, out = run("qualifier", "--catalog", vsc, "--rule", "equals", "--out", tmp_path / "q")
    assert code == EXIT_INVALID
    assert "does not verify" in out
    assert not (tmp_path / "q").exists()


def test_qualifier_rejects_an_unknown_rule(keys: dict[str, Path], tmp_path: Path) -> None:
    code, out = run("qualifier", "--catalog", keys["publisher.pub"], "--rule", "less-than",
                    "--out", tmp_path / "q")  # fmt: skip
    assert code == EXIT_USAGE
    assert "less-than" in out
    assert not (tmp_path / "q").exists()


# --- help and progress -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["keygen", "protect", "verify", "catalog", "qualifier"])
def test_every_command_explains_itself(command: str) -> None:
    code, out = run(command, "--help")
    assert code == 0
    assert "--json" in out
    assert len(out.splitlines()) > 6


def test_progress_bar_only_on_a_terminal(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with template_cli._progress(disk, "hashing") as progress:
        assert progress is None  # pytest's captured stderr is not a terminal
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with template_cli._progress(disk, "hashing") as progress:
        assert progress is not None
        progress(50_000)
    assert "hashing" in screen.getvalue()
    assert "100%" in screen.getvalue()
