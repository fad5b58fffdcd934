"""The 'tenant kp' commands end to end: outputs, refusals, and nothing written on failure."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guardfab.cli.main import cli
from guardfab.formats.encoding import b64url_encode
from guardfab.formats.guardian import GuardianKind, KeyAlgorithm
from guardfab.formats.key_protector import TransportKey, load_key_protector, rekey
from guardfab.tenant.guardians import GuardianStore


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["tenant", "kp", *args])
    return result.exit_code, result.output


def run_json(*args: str) -> dict[str, Any]:
    code, out = run(*args, "--json")
    assert code == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass(frozen=True)
class Setup:
    """A tenant home with owner + co (private keys) and an imported KPS guardian 'hgs'."""

    home: Path
    hgs_store: GuardianStore
    tmp: Path

    @property
    def store(self) -> GuardianStore:
        return GuardianStore(self.home)

    def ids(self, *names: str) -> set[str]:
        return {self.store.get(n).id for n in names}


@pytest.fixture
def setup(home: Path, tmp_path: Path) -> Setup:
    store = GuardianStore(home)
    store.create("owner", KeyAlgorithm.EC_P256)
    store.create("co", KeyAlgorithm.EC_P256)
    hgs_store = GuardianStore(tmp_path / "hgs-home")
    for name in ("hgs", "hgs2"):
        hgs_store.create(name, KeyAlgorithm.EC_P256, kind=GuardianKind.KPS)
        store.add_public(hgs_store.document(name))
    return Setup(home, hgs_store, tmp_path)


def new_kp(s: Setup, name: str = "vm.kp", *extra: str) -> Path:
    out = s.tmp / name
    code, text = run("new", "--owner", "owner", "--guardian", "hgs", "--out", str(out), *extra)
    assert code == 0, text
    return out


def assert_no_key(text: str, key: TransportKey) -> None:
    for form in (key.reveal().hex(), b64url_encode(key.reveal())):
        assert form not in text


def test_new_and_show(setup: Setup) -> None:
    out = setup.tmp / "vm.kp"
    made = run_json("new", "--owner", "owner", "--guardian", "hgs", "--out", str(out))
    shown = run_json("show", str(out))
    assert made["path"] == str(out)
    assert made["kp_id"] == shown["kp_id"]
    assert shown["generation"] == 0
    assert shown["owner"] == shown["signer"] == setup.store.get("owner").id
    assert {g["id"] for g in shown["guardians"]} == setup.ids("owner", "hgs")
    assert {g["local_name"] for g in shown["guardians"]} == {"owner", "hgs"}
    assert shown["can_unwrap_here"] == ["owner"]
    kp = load_key_protector(out.read_bytes(), expected_owner=shown["owner"])
    key = kp.unwrap(setup.store.keys("owner"))
    assert kp.unwrap(setup.hgs_store.keys("hgs")) == key
    code, human = run("show", str(out))
    assert code == 0
    assert "could unwrap here: owner" in human
    for text in (json.dumps(made), json.dumps(shown), human, out.read_text()):
        assert_no_key(text, key)


def test_show_with_the_wrong_expected_owner_fails(setup: Setup) -> None:
    out = new_kp(setup)
    code, text = run("show", str(out), "--expect-owner", setup.store.get("co").id)
    assert code == 1
    assert "expected owner" in text
    assert run("show", str(out), "--expect-owner", setup.store.get("owner").id)[0] == 0


def test_new_refuses_to_overwrite_without_force(setup: Setup) -> None:
    out = new_kp(setup)
    before = out.read_bytes()
    code, text = run("new", "--owner", "owner", "--guardian", "hgs", "--out", str(out))
    assert code == 2
    assert "--force" in text
    assert out.read_bytes() == before
    new_kp(setup, "vm.kp", "--force")
    assert out.read_bytes() != before


@pytest.mark.parametrize(
    "args",
    [
        ["--owner", "owner", "--guardian", "nobody"],  # unknown guardian
        ["--owner", "nobody", "--guardian", "hgs"],  # unknown owner
        ["--owner", "hgs", "--guardian", "co"],  # imported: no private keys here
        ["--owner", "owner", "--guardian", "owner"],  # the owner twice
        ["--owner", "owner", "--guardian", "hgs", "--guardian", "hgs"],  # listed twice
    ],
)
def test_failed_new_writes_nothing(setup: Setup, args: list[str]) -> None:
    out = setup.tmp / "vm.kp"
    code, _ = run("new", *args, "--out", str(out))
    assert code != 0
    assert not out.exists()
    assert [p.name for p in setup.tmp.iterdir() if p.name.startswith(".vm.kp")] == []


def test_grant_then_revoke(setup: Setup) -> None:
    first = new_kp(setup)
    granted = setup.tmp / "granted.kp"
    shown = run_json("grant", str(first), "--guardian", "co", "--out", str(granted))
    assert shown["generation"] == 1
    assert {g["id"] for g in shown["guardians"]} == setup.ids("owner", "hgs", "co")
    assert sorted(shown["can_unwrap_here"]) == ["co", "owner"]
    revoked = setup.tmp / "revoked.kp"
    hgs_id = setup.store.get("hgs").id
    shown = run_json("revoke", str(granted), "--guardian", hgs_id, "--out", str(revoked))
    assert shown["generation"] == 2
    assert {g["id"] for g in shown["guardians"]} == setup.ids("owner", "co")
    key = load_key_protector(first.read_bytes()).unwrap(setup.store.keys("owner"))
    assert load_key_protector(revoked.read_bytes()).unwrap(setup.store.keys("co")) == key


@pytest.mark.parametrize("guardian", ["owner", "hgs", "stranger"])
def test_refused_revoke_writes_nothing(setup: Setup, guardian: str) -> None:
    """The owner cannot go, nor the last other guardian; a stranger is not there."""
    out = setup.tmp / "out.kp"
    code, _ = run("revoke", str(new_kp(setup)), "--guardian", guardian, "--out", str(out))
    assert code == 2
    assert not out.exists()


def test_grant_on_a_tampered_kp_writes_nothing(setup: Setup) -> None:
    first = new_kp(setup)
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0x01
    first.write_bytes(bytes(data))
    out = setup.tmp / "out.kp"
    code, text = run("grant", str(first), "--guardian", "co", "--out", str(out))
    assert code == 1
    assert text.startswith("error: key protector")
    assert not out.exists()
    assert run("show", str(first))[0] == 1


def test_grant_needs_the_owners_private_keys(setup: Setup, tmp_path: Path) -> None:
    """Elsewhere, with only public guardians, a KP can be shown but not changed."""
    first = new_kp(setup)
    other = GuardianStore(tmp_path / "elsewhere")
    for name in ("owner", "co", "hgs"):
        other.add_public(setup.store.document(name))
    out = tmp_path / "out.kp"
    args = ["--guardian", "co", "--out", str(out), "--home", str(other.root.parent)]
    code, text = run("grant", str(first), *args)
    assert code == 1
    assert "private keys" in text
    assert not out.exists()
    shown = run_json("show", str(first), "--home", str(other.root.parent))
    assert shown["can_unwrap_here"] == []


def test_encrypted_owner_keys_take_a_passphrase_file(setup: Setup) -> None:
    setup.store.create("locked", KeyAlgorithm.EC_P256, passphrase="correct horse")
    good, bad = setup.tmp / "good.pass", setup.tmp / "bad.pass"
    good.write_text("correct horse\n")
    bad.write_text("wrong\n")
    out = setup.tmp / "vm.kp"
    base = ["new", "--owner", "locked", "--guardian", "hgs", "--out", str(out)]
    for args in ([], ["--passphrase-file", str(bad)]):
        code, text = run(*base, *args)
        assert code == 1, text
        assert "correct horse" not in text
        assert not out.exists()
    assert run(*base, "--passphrase-file", str(good))[0] == 0
    assert load_key_protector(out.read_bytes()).owner == setup.store.get("locked").id


def test_an_egress_kp_shows_its_kps_signer_and_the_owner_can_still_grant(setup: Setup) -> None:
    first = new_kp(setup)
    egress, _, new = rekey(load_key_protector(first.read_bytes()), setup.hgs_store.keys("hgs"))
    egress_path = setup.tmp / "egress.kp"
    egress_path.write_bytes(egress)
    code, human = run("show", str(egress_path))
    assert code == 0
    assert "(a KPS re-key)" in human
    assert "generation 1" in human
    out = setup.tmp / "granted.kp"
    shown = run_json("grant", str(egress_path), "--guardian", "hgs2", "--out", str(out))
    assert shown["generation"] == 2
    assert load_key_protector(out.read_bytes()).unwrap(setup.hgs_store.keys("hgs2")) == new


@pytest.mark.parametrize("command", ["new", "grant", "revoke", "show"])
def test_every_command_has_help(command: str) -> None:
    code, text = run(command, "--help")
    assert code == 0
    assert "--json" in text
    assert "--home" in text


def test_group_help_explains_kps() -> None:
    code, text = run("--help")
    assert code == 0
    assert "owner" in text
