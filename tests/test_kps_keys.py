"""KPS key files: what ``hgs init`` makes, tight modes, consistency checks, the key ring."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from guardfab.errors import FormatError, UsageError
from guardfab.formats.guardian import GuardianKind, load_guardian_document
from guardfab.hgs.kps_keys import KpsKeyDirectory, key_ring, kps_guardian_name
from guardfab.hgs.state import HgsConfig, init_state


@pytest.fixture
def keys(tmp_path: Path) -> KpsKeyDirectory:
    init_state(tmp_path / "hgs", HgsConfig(service_name="Contoso HGS/1"))
    return KpsKeyDirectory.of_state(tmp_path / "hgs")


def test_init_makes_one_kps_guardian_with_private_files(keys: KpsKeyDirectory) -> None:
    (key_id,) = keys.ids()
    key = keys.load(key_id)
    assert key.keys.guardian.kind is GuardianKind.KPS
    assert key.name == "Contoso-HGS-1-kps"
    assert load_guardian_document(key.document).id == key_id
    assert stat.S_IMODE(keys.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys.root / key_id).stat().st_mode) == 0o700
    for private in ("signing-key.pem", "encryption-key.pem"):
        assert stat.S_IMODE((keys.root / key_id / private).stat().st_mode) == 0o600


def test_a_key_readable_by_others_is_refused(keys: KpsKeyDirectory) -> None:
    (key_id,) = keys.ids()
    (keys.root / key_id / "encryption-key.pem").chmod(0o644)
    with pytest.raises(UsageError, match="readable by group or others"):
        keys.load(key_id)


def test_swapped_key_files_are_refused(keys: KpsKeyDirectory) -> None:
    other = keys.create("other", now=1)
    (first,) = [i for i in keys.ids() if i != other.id]
    source = keys.root / other.id / "encryption-key.pem"
    target = keys.root / first / "encryption-key.pem"
    target.write_bytes(source.read_bytes())
    with pytest.raises(FormatError, match="encryption key does not match"):
        keys.load(first)


def test_corrupt_key_metadata_is_refused(keys: KpsKeyDirectory) -> None:
    (key_id,) = keys.ids()
    (keys.root / key_id / "key.json").write_text("{}")
    with pytest.raises(FormatError, match=r"key\.json"):
        keys.load(key_id)


def test_unknown_ids_and_staging_directories_are_not_keys(keys: KpsKeyDirectory) -> None:
    (keys.root / ".half.new").mkdir()
    (keys.root / "not-an-id").mkdir()
    assert len(keys.ids()) == 1
    with pytest.raises(UsageError, match="no KPS key"):
        keys.load("../../etc")


def test_ring_puts_the_primary_first_then_newest(keys: KpsKeyDirectory) -> None:
    (initial,) = keys.ids()
    second = keys.create("second", now=2_000_000_000)
    third = keys.create("third", now=2_000_000_100)
    loaded = keys.load_all()
    assert [k.id for k in key_ring(loaded, None)] == [initial, third.id, second.id]
    assert [k.id for k in key_ring(loaded, second.id)] == [second.id, third.id, initial]
    with pytest.raises(UsageError, match="no key files"):
        key_ring(loaded, "A" * 43)
    assert key_ring([], None) == []
    meta = json.loads((keys.root / second.id / "key.json").read_text())
    assert meta == {"id": second.id, "name": "second", "created_at": 2_000_000_000}


@pytest.mark.parametrize(
    ("service", "name"), [("guardfab", "guardfab-kps"), ("...", "hgs-kps"), ("a b", "a-b-kps")]
)
def test_guardian_names_from_service_names(service: str, name: str) -> None:
    assert kps_guardian_name(service) == name


def test_a_key_generation_is_a_new_encryption_key_under_the_same_identity(
    keys: KpsKeyDirectory,
) -> None:
    (key_id,) = keys.ids()
    first = keys.load(key_id)
    rotated = keys.add_generation(key_id)
    assert (rotated.id, rotated.newest, len(rotated.generations)) == (key_id, 1, 2)
    newest = load_guardian_document(rotated.document)
    assert (newest.id, newest.key_generation) == (key_id, 1)
    assert newest.encryption_kid != first.keys.guardian.encryption_kid
    both = rotated.kps_keys(1)
    assert set(both.encryption_keys) == {g.guardian.encryption_kid for g in rotated.generations}
    assert rotated.kps_keys(0).guardian.key_generation == 0
    assert stat.S_IMODE((keys.root / key_id / "encryption-key.1.pem").stat().st_mode) == 0o600
    with pytest.raises(UsageError, match="no key generation 5"):
        rotated.kps_keys(5)


def test_broken_key_generations_are_refused(keys: KpsKeyDirectory) -> None:
    (key_id,) = keys.ids()
    keys.add_generation(key_id)
    keys.add_generation(key_id)
    directory = keys.root / key_id
    (directory / "guardian.1.jws").rename(directory / "guardian.7.jws")
    with pytest.raises(FormatError, match="not 1 to n"):
        keys.load(key_id)
    (directory / "guardian.7.jws").rename(directory / "guardian.1.jws")
    swapped = (directory / "encryption-key.2.pem").read_bytes()
    (directory / "encryption-key.1.pem").write_bytes(swapped)
    with pytest.raises(FormatError, match="does not match its document"):
        keys.load(key_id)
    other = keys.create("other", now=1)
    (directory / "guardian.1.jws").write_bytes((keys.root / other.id / "guardian.jws").read_bytes())
    with pytest.raises(FormatError, match="not this guardian's"):
        keys.load(key_id)
