"""The 'tenant pdk' commands end to end: a tenant home, a fabric home with its HGS
guardian, and a stranger's home; failed commands must leave no file behind."""

from __future__ import annotations

import json
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from joserfc.jwk import ECKey

from guardfab.cli import tenant_pdk as cli_pdk
from guardfab.cli.main import cli
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, canonical_json
from guardfab.formats.guardian import GuardianKind, KeyAlgorithm
from guardfab.formats.shielding_data import PDK_JWS_TYPE
from guardfab.formats.template import DiskVersion, PublisherKey, VersionRule, VolumeIdQualifier
from guardfab.tenant.guardians import GuardianStore

PASSWORD = "Tr0ub4dor&3 SECRET"
ANSWER = b"#cloud-config\npassword: ANSWER-SECRET\n"


@dataclass
class World:
    tenant: Path
    fabric: Path
    stranger: Path
    files: Path
    owner_id: str

    def pdk(self, *extra: str, home: Path | None = None, stdin: str | None = None) -> Run:
        return run("tenant", "pdk", *extra, "--home", str(home or self.tenant), stdin=stdin)


@dataclass
class Run:
    code: int
    out: str
    err: str


def run(*args: str, stdin: str | None = None) -> Run:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    return Run(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def world_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three guardfab homes and the input files, made once (stores fsync every file)."""
    root = tmp_path_factory.mktemp("world")
    tenant, fabric, stranger = (root / n for n in ("tenant", "fabric", "stranger"))
    GuardianStore(tenant).create("me", KeyAlgorithm.EC_P256)
    fabric_store = GuardianStore(fabric)
    for name in ("hgs", "hgs2"):
        fabric_store.create(name, KeyAlgorithm.EC_P256, kind=GuardianKind.KPS)
        GuardianStore(tenant).add_public(fabric_store.document(name))
    GuardianStore(stranger).create("stranger", KeyAlgorithm.EC_P256)
    files = root / "in"
    files.mkdir()
    (files / "pw").write_text(PASSWORD + "\n")
    (files / "user-data").write_bytes(ANSWER)
    (files / "setup.sh").write_bytes(b"echo FILE-SECRET\n")
    return root


@pytest.fixture
def world(world_template: Path, tmp_path: Path) -> World:
    """A private copy of the homes for one test."""
    root = tmp_path / "world"
    shutil.copytree(world_template, root)
    owner_id = GuardianStore(root / "tenant").get("me").id
    return World(root / "tenant", root / "fabric", root / "stranger", root / "in", owner_id)


def new_args(world: World, out: Path, *extra: str) -> list[str]:
    return [
        "new",
        "--name",
        "web01",
        "--owner",
        "me",
        "--guardian",
        "hgs",
        "--guardian",
        "hgs2",
        "--policy",
        "shielded",
        "--admin-user",
        "root",
        "--admin-password-file",
        str(world.files / "pw"),
        "--answer-file",
        str(world.files / "user-data"),
        "--answer-file-kind",
        "cloud-init",
        "--file",
        str(world.files / "setup.sh"),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture
def made(world: World, tmp_path: Path) -> Path:
    out = tmp_path / "web01.pdk"
    result = world.pdk(*new_args(world, out))
    assert result.code == 0, result.err
    return out


def without(args: list[str], *options: str) -> list[str]:
    """``args`` minus each of ``options`` and the value after it."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        else:
            kept.append(arg)
    return kept


def no_secret_in(text: str) -> None:
    for secret in (PASSWORD, "ANSWER-SECRET", "FILE-SECRET"):
        assert secret not in text


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- happy paths -------------------------------------------------------------------------


def test_new_writes_a_private_file_and_shows_only_the_header(world: World, made: Path) -> None:
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    shown = world.pdk("show", str(made), "--json")
    assert shown.code == 0, shown.err
    header = json.loads(shown.out)["header"]
    assert header["policy"] == "shielded"
    assert header["owner"] == {"name": "me", "id": world.owner_id}
    assert sorted(g["name"] for g in header["guardians"]) == ["hgs", "hgs2"]
    assert header["answer_file_kind"] == "cloud-init"
    assert "secrets" not in json.loads(shown.out)
    text = world.pdk("show", str(made))
    assert "shielded" in text.out
    assert "hgs2" in text.out
    for result in (shown, text):
        no_secret_in(result.out + result.err)
    no_secret_in(made.read_text())


def test_owner_reveals_the_secrets_in_text_and_json(world: World, made: Path) -> None:
    text = world.pdk("show", str(made), "--reveal")
    assert text.code == 0, text.err
    assert PASSWORD in text.out
    assert "ANSWER-SECRET" in text.out
    assert "setup.sh" in text.out
    as_json = json.loads(world.pdk("show", str(made), "--reveal", "--json").out)
    assert as_json["revealed_with"] == "me"
    secrets = as_json["secrets"]
    assert secrets["admin"] == {"username": "root", "password": PASSWORD}
    assert b64url_decode(secrets["answer_file"]["content"], what="t") == ANSWER
    assert b64url_decode(secrets["files"]["setup.sh"], what="t") == b"echo FILE-SECRET\n"


def test_a_fabric_guardian_reveals_with_its_own_keys(world: World, made: Path) -> None:
    result = world.pdk("show", str(made), "--reveal", "--json", home=world.fabric)
    assert result.code == 0, result.err
    assert json.loads(result.out)["revealed_with"] in {"hgs", "hgs2"}
    chosen = world.pdk("show", str(made), "--reveal", "--guardian", "hgs2", home=world.fabric)
    assert PASSWORD in chosen.out


def test_reveal_warns_on_a_terminal(
    world: World, made: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty = SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(cli_pdk, "sys", SimpleNamespace(stdin=tty, stdout=tty))
    result = world.pdk("show", str(made), "--reveal")
    assert "warning: printing the secrets" in result.err


def test_password_is_prompted_for_on_a_terminal_and_never_an_option(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "prompted.pdk"
    args = without(new_args(world, out), "--admin-password-file")
    refused = world.pdk(*args)
    assert refused.code == 2
    assert "--admin-password-file" in refused.err
    assert not out.exists()
    tty = SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(cli_pdk, "sys", SimpleNamespace(stdin=tty, stdout=tty))
    prompted = world.pdk(*args, stdin="typed secret\ntyped secret\n")
    assert prompted.code == 0, prompted.err
    assert "typed secret" not in prompted.out
    revealed = json.loads(world.pdk("show", str(out), "--reveal", "--json").out)
    assert revealed["secrets"]["admin"]["password"] == "typed secret"
    no_option = world.pdk(*args, "--admin-password", "x")
    assert no_option.code == 2
    assert "No such option" in no_option.err


def test_qualifiers_and_a_host_certificate_ride_along(world: World, tmp_path: Path) -> None:
    publisher = PublisherKey.from_key(ECKey.generate_key("P-256"))
    qualifier = VolumeIdQualifier(
        publisher, "ubuntu-24.04", DiskVersion(1, 0, 0, 0), VersionRule.EQUALS
    )
    (tmp_path / "q.json").write_bytes(qualifier.to_bytes())
    cert, key = _ssh_host_certificate()
    (tmp_path / "host.cert").write_bytes(cert)
    (tmp_path / "host.key").write_bytes(key)
    out = tmp_path / "q.pdk"
    extra = [
        "--qualifier",
        str(tmp_path / "q.json"),
        "--host-certificate",
        str(tmp_path / "host.cert"),
    ]
    extra += ["--host-key", str(tmp_path / "host.key"), "--host-cert-kind", "ssh", "--json"]
    made = world.pdk(*new_args(world, out, *extra))
    assert made.code == 0, made.err
    assert json.loads(made.out)["qualifiers"][0]["name"] == "ubuntu-24.04"
    shown = world.pdk("show", str(out))
    assert "ubuntu-24.04 equals 1.0.0.0" in shown.out
    revealed = json.loads(world.pdk("show", str(out), "--reveal", "--json").out)
    assert revealed["secrets"]["host_certificate"]["kind"] == "ssh"


def _ssh_host_certificate() -> tuple[bytes, bytes]:
    ca, host = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    cert = (
        serialization.SSHCertificateBuilder()
        .public_key(host.public_key())
        .type(serialization.SSHCertificateType.HOST)
        .valid_principals([b"web01"])
        .valid_after(0)
        .valid_before(2**63)
        .sign(ca)
    )
    key = host.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(), key


# --- signed by a non-owner, opened by a non-guardian ------------------------------------


def test_a_pdk_resigned_by_a_non_owner_is_refused(world: World, made: Path) -> None:
    stranger = GuardianStore(world.stranger).keys("stranger")
    payload = b64url_decode(made.read_text().split(".")[1], what="t")
    forged = made.with_name("forged.pdk")
    forged.write_text(jose.sign_compact(payload, stranger.signing_key, typ=PDK_JWS_TYPE))
    result = world.pdk("show", str(forged))
    assert result.code == 1
    assert "signature does not verify" in result.err


def test_expect_owner_pins_the_signer(world: World, made: Path) -> None:
    assert world.pdk("show", str(made), "--expect-owner", world.owner_id).code == 0
    other = GuardianStore(world.stranger).get("stranger").id
    result = world.pdk("show", str(made), "--expect-owner", other)
    assert result.code == 1
    assert "not the expected owner" in result.err


def test_a_pdk_opened_by_a_non_guardian_is_refused(world: World, made: Path) -> None:
    header_only = world.pdk("show", str(made), home=world.stranger)
    assert header_only.code == 0, header_only.err
    auto = world.pdk("show", str(made), "--reveal", home=world.stranger)
    assert auto.code == 2
    assert "none of the guardians" in auto.err
    forced = world.pdk("show", str(made), "--reveal", "--guardian", "stranger", home=world.stranger)
    assert forced.code == 1
    assert "neither its owner nor one of its guardians" in forced.err
    for result in (auto, forced):
        no_secret_in(result.out + result.err)


# --- failures write nothing ---------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


FAILURES = {
    "unknown guardian": (lambda w, t: ["--guardian", "nobody"], 2, "no guardian named"),
    "imported owner": (lambda w, t: ["--owner", "hgs"], 2, "no private key"),
    "files over 384 KiB": (
        lambda w, t: ["--file", str(_write(t / "big.bin", bytes(384 * 1024)))],
        1,
        "384 KiB",
    ),
    "password with a newline": (
        lambda w, t: ["--admin-password-file", str(_write(t / "pw2", b"a\nb\n"))],
        1,
        "newlines",
    ),
    "answer file kind without the file": (
        lambda w, t: ["--answer-file-kind", "unattend"],
        2,
        "go together",
    ),
    "mismatched host key": (
        lambda w, t: [
            "--host-certificate",
            str(_write(t / "c", _ssh_host_certificate()[0])),
            "--host-key",
            str(_write(t / "k", _ssh_host_certificate()[1])),
            "--host-cert-kind",
            "ssh",
        ],
        1,
        "does not belong",
    ),
    "bad qualifier file": (
        lambda w, t: ["--qualifier", str(_write(t / "q.json", b"{}"))],
        1,
        "volume ID qualifier",
    ),
    "bad name": (lambda w, t: ["--name", "a\tb"], 1, "control characters"),
}


@pytest.mark.parametrize("failure", FAILURES, ids=list(FAILURES))
def test_a_failed_new_writes_nothing(failure: str, world: World, tmp_path: Path) -> None:
    make_extra, code, message = FAILURES[failure]
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "x.pdk"
    extra = make_extra(world, tmp_path)
    args = new_args(world, out)
    if failure == "answer file kind without the file":
        args = without(args, "--answer-file", "--answer-file-kind")
    result = world.pdk(*args, *extra)
    assert result.code == code, result.err
    assert message in result.err
    assert list(outdir.iterdir()) == []
    no_secret_in(result.out + result.err)


def test_an_existing_file_needs_force(world: World, made: Path) -> None:
    before = made.read_bytes()
    refused = world.pdk(*new_args(world, made))
    assert refused.code == 2
    assert "already exists" in refused.err
    assert made.read_bytes() == before
    forced = world.pdk(*new_args(world, made, "--force"))
    assert forced.code == 0, forced.err
    assert made.read_bytes() != before
    assert leftovers(made.parent) == []


def test_an_existing_file_is_refused_before_any_prompt(
    world: World, made: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty = SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(cli_pdk, "sys", SimpleNamespace(stdin=tty, stdout=tty))
    result = world.pdk(*without(new_args(world, made), "--admin-password-file"), stdin="")
    assert result.code == 2
    assert "already exists" in result.err
    assert "password" not in result.out.lower()


def test_encrypted_owner_keys_need_their_passphrase(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    GuardianStore(world.tenant).create("locked", KeyAlgorithm.EC_P256, passphrase="open sesame")
    out = tmp_path / "locked.pdk"
    args = [*new_args(world, out)]
    args[args.index("me")] = "locked"
    refused = world.pdk(*args)
    assert refused.code == 1
    assert "passphrase is needed" in refused.err
    assert not out.exists()
    (tmp_path / "pass").write_text("open sesame\n")
    made = world.pdk(*args, "--passphrase-file", str(tmp_path / "pass"))
    assert made.code == 0, made.err
    tty = SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(cli_pdk, "sys", SimpleNamespace(stdin=tty, stdout=tty))
    prompted = world.pdk(*args, "--force", stdin="open sesame\n")
    assert prompted.code == 0, prompted.err
    wrong = world.pdk(*args, "--force", stdin="guess\n")
    assert wrong.code == 1
    assert "wrong passphrase" in wrong.err


def test_show_refuses_a_tampered_or_missing_file(world: World, made: Path) -> None:
    data = bytearray(made.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = _write(made.with_name("t.pdk"), bytes(data))
    assert world.pdk("show", str(tampered)).code == 1
    missing = world.pdk("show", str(made.with_name("none.pdk")))
    assert missing.code == 2
    assert "cannot read" in missing.err


def test_reveal_only_options_need_reveal(world: World, made: Path) -> None:
    result = world.pdk("show", str(made), "--guardian", "me")
    assert result.code == 2
    assert "only for --reveal" in result.err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--help"], ["Shielding data", "Example"]),
        (["new", "--help"], ["--admin-password-file", "384 KiB", "--force", "--qualifier"]),
        (["show", "--help"], ["--reveal", "--expect-owner", "public header"]),
    ],
)
def test_help_explains(args: list[str], words: list[str]) -> None:
    result = run("tenant", "pdk", *args)
    assert result.code == 0
    for word in words:
        assert word in result.out


def test_the_file_is_canonical_json_under_one_signature(made: Path) -> None:
    """One encoding for one content: what is signed is what is parsed."""
    parts = made.read_text().strip().split(".")
    assert len(parts) == 3
    payload = b64url_decode(parts[1], what="t")
    assert canonical_json(json.loads(payload)) == payload
